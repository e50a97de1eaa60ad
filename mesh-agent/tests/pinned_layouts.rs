//! Maps an older agent left pinned with another layout: a map whose entries only the agent's
//! table defines (or only counters) is re-created, any other is refused with what to do
//! about it.

mod lab;

use std::{path::Path, process::Command};

use aya::maps::{MapInfo, MapType};
use lab::{BACKENDS, CLIENT, Frame, Lab, NODE_IP, TC_ACT_REDIRECT, service, tcp};

/// Pins a map as an older agent would have, with bpftool (independent of this build).
fn pin_old_map(dir: &Path, name: &str, kind: &str, key: u32, value: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let pin = dir.join(name);
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            kind,
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", "16", "name", name])
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_older_networks_map_is_re_created_and_flows_go_on() {
    let dir = lab::pin_dir();
    // Before the VXLAN device was recorded, a network was 8 bytes.
    pin_old_map(&dir, "LB_NETWORKS", "hash", 4, 8);
    let mut lab = Lab::over(dir).expect("an older networks map is no reason to refuse");
    let info = MapInfo::from_pin(lab.pin().join("LB_NETWORKS")).unwrap();
    assert_eq!(
        info.value_size() as usize,
        size_of::<mesh_common::lb::Network>()
    );

    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert!(BACKENDS.contains(&Frame::parse(&out).dst));
}

#[test]
fn older_per_cpu_traffic_counters_are_re_created_and_count_again() {
    let dir = lab::pin_dir();
    // Before they had a stripe per CPU, the counters were per-CPU arrays of the same key
    // and value sizes.
    pin_old_map(&dir, "LB_SVC_COUNTERS", "percpu_array", 4, 32);
    pin_old_map(&dir, "LB_BE_COUNTERS", "percpu_array", 4, 32);
    let mut lab = Lab::over(dir).expect("older counters are no reason to refuse");
    for name in ["LB_SVC_COUNTERS", "LB_BE_COUNTERS"] {
        let info = MapInfo::from_pin(lab.pin().join(name)).unwrap();
        assert!(matches!(info.map_type(), Ok(MapType::Array)), "{name}");
        assert_ne!(info.map_flags() & (1 << 10), 0, "{name} is mmapable");
    }

    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let (verdict, _) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let stats = lab.dp.lb().service_stats("web").unwrap().unwrap();
    assert_eq!((stats.counters.flows, stats.counters.packets), (1, 1));
    assert_eq!(
        stats.backends.iter().map(|b| b.counters.flows).sum::<u64>(),
        1
    );
}

#[test]
fn an_older_flow_table_is_refused_with_how_to_fix_it() {
    let dir = lab::pin_dir();
    // Flow entries are connections: re-creating the table would reset every one of them,
    // which is the operator's call.
    pin_old_map(&dir, "LB_FLOWS", "lru_hash", 16, 32);
    let err = match Lab::over(dir.clone()) {
        Ok(_) => panic!("a flow table of another layout was adopted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("incompatible mesh version"), "{err}");
    assert!(err.contains("value 32 bytes"), "{err}");
    assert!(err.contains(&format!("remove {}", dir.display())), "{err}");
    assert!(!dir.exists(), "the lab cleans up after a refusal");
}

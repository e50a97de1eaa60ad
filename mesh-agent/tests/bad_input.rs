//! Bad input never panics the agent: API bodies, the user-facing parsers, and
//! gossip records from peers (a buggy or hostile peer that holds the cluster key). The same
//! properties are fuzz targets under fuzz/ (api_request, gossip_view).

use std::collections::BTreeMap;

use mesh_agent::{
    agent::validate_name,
    cluster::{Snapshot, SnapshotNode, View, ipam, key},
};
use mesh_api::{
    spec::PortSpec,
    v1::{
        ExecRequest, NetworkCreate, NodeUpdate, ServiceCreate, ServiceUpdate, TaskRun,
        decode_request,
    },
};
use proptest::prelude::*;

/// Runs every request type through the API's decoder and the checks that follow it.
fn every_request(bytes: &[u8]) {
    if let Ok(r) = decode_request::<ServiceCreate>(bytes) {
        let _ = validate_name("service", &r.spec.name);
        if let Some(t) = &r.spec.task {
            let _ = r.spec.placement.constraints.len() + t.command.len();
        }
    }
    if let Ok(r) = decode_request::<ServiceUpdate>(bytes) {
        let _ = r.health.apply(None, &r.publish_add);
        let _ = r.restart.apply(Default::default());
    }
    if let Ok(r) = decode_request::<NetworkCreate>(bytes) {
        let _ = validate_name("network", &r.name);
        if let Some(s) = r.subnet
            && let Ok(net) = s.parse()
        {
            let _ = ipam::validate_subnet(net);
        }
    }
    if let Ok(r) = decode_request::<NodeUpdate>(bytes) {
        let _ = r.labels_to_add();
    }
    let _ = decode_request::<TaskRun>(bytes);
    let _ = decode_request::<ExecRequest>(bytes);
}

/// Keys a peer may send: ours, with garbage after the prefix, and some that are not ours.
fn any_key() -> impl Strategy<Value = String> {
    let prefixes = prop::sample::select(vec![
        key::NODE,
        key::ENDPOINT,
        key::ATTACHMENT,
        key::BLOCK,
        key::NETWORK,
        key::SERVICE,
        key::NODE_SPEC,
        "x:",
    ]);
    (prefixes, "[a-z0-9:.-]{0,12}").prop_map(|(p, s)| format!("{p}{s}"))
}

/// Values: garbage, and JSON that looks like our records with wrong or hostile contents.
fn any_value() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,64}",
        Just(r#"{"name":"n","subnet":"10.0.0.0/8","gateway":"10.0.0.1","vni":4096}"#.to_owned()),
        (0u64..u64::MAX, "[a-z]{1,4}", 0u32..20_000_000, 0u8..40).prop_map(|(ms, node, vni, prefix)| {
            format!(
                r#"{{"spec":{{"name":"app","subnet":"10.0.0.0/{prefix}","gateway":"10.0.0.1","vni":{vni}}},"created":{{"ms":{ms},"node":"{node}"}},"updated":{{"ms":{ms},"node":"{node}"}}}}"#
            )
        }),
        (0u64..5, 0u32..100_000).prop_map(|(ms, index)| {
            format!(r#"{{"network":"app","index":{index},"stamp":{{"ms":{ms},"node":"a"}}}}"#)
        }),
        Just(r#"{"task":"t","network":"app","service":"web","ip":"10.0.0.9","mac":"zz","state":"running"}"#.to_owned()),
        Just(r#"{"name":"b","hostname":"h","address":"192.0.2.2","mtu":0,"agent_version":""}"#.to_owned()),
    ]
}

fn any_node() -> impl Strategy<Value = SnapshotNode> {
    (
        prop::sample::select(vec!["a", "b", "c"]),
        0u64..3,
        any::<bool>(),
        prop::collection::btree_map(any_key(), any_value(), 0..12),
    )
        .prop_map(|(name, generation, live, kv)| SnapshotNode {
            name: name.to_owned(),
            generation,
            live,
            kv,
            role: mesh_planner::Role::Admin,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn api_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        every_request(&bytes);
    }

    #[test]
    fn json_shaped_api_bodies_never_panic(
        name in ".{0,80}",
        publish in prop::collection::vec(".{0,24}", 0..4),
        subnet in prop::option::of(".{0,24}"),
    ) {
        let body = serde_json::json!({
            "name": name, "network": name, "publish": publish, "subnet": subnet,
            "label_add": publish, "command": publish, "env_rm": publish,
            "spec": { "name": name, "network": name, "task": { "command": publish } },
        });
        every_request(body.to_string().as_bytes());
    }

    #[test]
    fn port_specs_parse_or_explain(s in ".{0,32}") {
        match s.parse::<PortSpec>() {
            // Whatever parses prints back to something that parses to the same.
            Ok(p) => {
                let shown = match p.published {
                    Some(pub_) => format!("{pub_}:{}/{}", p.target, p.protocol),
                    None => format!("{}/{}", p.target, p.protocol),
                };
                prop_assert_eq!(shown.parse::<PortSpec>().unwrap(), p);
            }
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }

    #[test]
    fn gossip_from_peers_never_panics_and_merges_the_same_in_any_order(
        nodes in prop::collection::vec(any_node(), 0..5),
    ) {
        let a = View::compute(&Snapshot { nodes: nodes.clone(), now_ms: 1_000_000 });
        let mut reversed = nodes;
        reversed.reverse();
        let b = View::compute(&Snapshot { nodes: reversed, now_ms: 1_000_000 });
        let names = |v: &View| -> (Vec<String>, Vec<String>, BTreeMap<String, String>) {
            (v.networks.keys().cloned().collect(), v.services.keys().cloned().collect(), v.republish.clone())
        };
        prop_assert_eq!(names(&a), names(&b));
    }
}

//! Arbitrary gossip state from peers (what an authenticated but buggy or hostile peer could
//! send) merged into the cluster view: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::cluster::{Snapshot, SnapshotNode, View};

const PREFIXES: [&str; 7] = ["node", "ep:", "att:", "blk:", "obj:net:", "obj:svc:", "obj:nodespec:"];

fuzz_target!(|nodes: Vec<(u8, u8, bool, Vec<(u8, String, String)>)>| {
    let nodes = nodes
        .into_iter()
        .map(|(name, generation, live, kv)| SnapshotNode {
            name: format!("n{}", name % 4),
            generation: u64::from(generation % 3),
            live,
            kv: kv
                .into_iter()
                .map(|(p, k, v)| (format!("{}{k}", PREFIXES[usize::from(p) % PREFIXES.len()]), v))
                .collect(),
        })
        .collect();
    let _ = View::compute(&Snapshot { nodes, now_ms: 1_000_000 });
});

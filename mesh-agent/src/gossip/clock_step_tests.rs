//! Real gossip instances over sealed UDP on loopback whose wall clocks step or disagree, as
//! NTP or a wrong hardware clock makes them: they keep gossiping both ways.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{
    Gossip,
    auth::GossipAuth,
    hostile_peer_tests::{auth, sees, start_with},
};
use mesh_api::v1::DropReason;

/// A gossip instance whose clock is `offset_ms` off this machine's.
async fn start(
    name: &str,
    seeds: Vec<String>,
    offset_ms: i64,
) -> (Gossip, Arc<GossipAuth>, SocketAddr) {
    let auth = auth();
    auth.step_clock(offset_ms);
    let (g, addr) = start_with(name, seeds, auth.clone()).await;
    (g, auth, addr)
}

fn stale(a: &GossipAuth) -> u64 {
    a.dropped(DropReason::TooOld) + a.dropped(DropReason::TooNew)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_goes_on_both_ways_while_a_clock_steps_and_with_clocks_minutes_apart() {
    let (a, a_auth, a_addr) = start("a", vec![], 0).await;
    let (b, b_auth, _) = start("b", vec![a_addr.to_string()], 0).await;
    a.write([("k".into(), Some("0".into()))]).await;
    sees(&b, "a", "k", "0").await;

    // b's clock steps a minute ahead, then two back, then an hour ahead: every value
    // written after a step crosses both ways and both stay live.
    for (i, step) in [60_000i64, -120_000, 3_600_000].into_iter().enumerate() {
        b_auth.step_clock(step);
        let v = (i + 1).to_string();
        a.write([("k".into(), Some(v.clone()))]).await;
        b.write([("k".into(), Some(v.clone()))]).await;
        let took = sees(&b, "a", "k", &v)
            .await
            .max(sees(&a, "b", "k", &v).await);
        eprintln!("after a step of {step} ms both saw the other's write in {took:?}");
        // Long enough for the failure detector to call a silent peer down.
        tokio::time::sleep(Duration::from_secs(2)).await;
        sees(&b, "a", "k", &v).await;
        sees(&a, "b", "k", &v).await;
    }
    assert_eq!(
        stale(&a_auth) + stale(&b_auth),
        0,
        "running agents prove freshness by echo, not by their clocks"
    );

    // A node that starts with its clock ten minutes behind joins at once: its first
    // datagram is challenged, the rest echo.
    let (c, c_auth, _) = start("c", vec![a_addr.to_string()], -600_000).await;
    c.write([("k".into(), Some("c".into()))]).await;
    let took = sees(&a, "c", "k", "c").await;
    sees(&c, "b", "k", "3").await;
    eprintln!("a node ten minutes behind joined in {took:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    sees(&b, "c", "k", "c").await;
    let first_contacts = stale(&a_auth) + stale(&b_auth) + stale(&c_auth);
    assert!(
        first_contacts > 0,
        "c's clock is outside the window: first contacts are challenged"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = stale(&a_auth) + stale(&b_auth) + stale(&c_auth);
    eprintln!("datagrams dropped as stale at first contact: {first_contacts}, after: {later}");
    assert_eq!(later, first_contacts, "after first contact, none");
}

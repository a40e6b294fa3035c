//! Crash consistency (issue 18, item 5): an agent killed with SIGKILL at random points of a
//! stream of applies, a hundred times, restarts every time (its store's witness accepts a kill
//! on either side of a write), keeps every apply it acknowledged, and shows no apply half done.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::*;

/// Node names reused round after round, so that the store stays small and the agent's peers
/// (these nodes' made-up addresses, all on 127.0.0.x with nothing listening) stay few.
const SLOTS: u32 = 8;

/// An apply of two Nodes, `a{slot}` and `b{slot}`, whose addresses both carry `k`: after any
/// crash the two must carry the same `k`, one apply's or the other's, never one of each.
fn two_nodes(k: u32) -> String {
    let slot = k % SLOTS;
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: a{slot}}}\nspec: {{address: 127.0.2.1:{port}}}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {{name: b{slot}}}\nspec: {{address: 127.0.3.1:{port}}}\n",
        port = 10_000 + k
    )
}

/// The `k` of node `name`'s address, if the node is stored.
fn k_of(nodes: &serde_json::Value, name: &str) -> Option<u32> {
    nodes["items"].as_array()?.iter().find_map(|o| {
        (o["metadata"]["name"] == name).then(|| {
            let address = o["spec"]["address"].as_str().unwrap();
            address.rsplit(':').next().unwrap().parse::<u32>().unwrap() - 10_000
        })
    })
}

#[test]
fn an_agent_killed_during_applies_keeps_every_acknowledged_one_and_none_half_done() {
    let mut c = Cluster::start(1, &[]);
    let mut rng = StdRng::seed_from_u64(18);
    // The latest acknowledged k of each slot.
    let mut acknowledged = [None::<u32>; SLOTS as usize];
    let mut next = 1u32;
    let mut acks = 0;
    for round in 0..100 {
        let url = format!("http://{}/api/v1/apply", c.agents[0].listen);
        let killed = Arc::new(AtomicBool::new(false));
        let writer = {
            let killed = killed.clone();
            let mut k = next;
            std::thread::spawn(move || {
                let http = http_client(Duration::from_secs(10));
                let mut done = Vec::new();
                while !killed.load(Ordering::Relaxed) {
                    let sent = http
                        .post(&url)
                        .header("Authorization", &format!("Bearer {TOKEN}"))
                        .send(two_nodes(k).as_bytes());
                    match sent {
                        Ok(r) if r.status() == 200 => done.push(k),
                        Ok(r) => panic!("apply {k} answered {}", r.status()),
                        Err(_) => break,
                    }
                    k += 1;
                }
                (done, k + 1)
            })
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
        c.kill(0);
        killed.store(true, Ordering::Relaxed);
        let (done, after) = writer.join().unwrap();
        next = after;
        acks += done.len();
        for k in done {
            let slot = (k % SLOTS) as usize;
            acknowledged[slot] = acknowledged[slot].max(Some(k));
        }
        // Whatever the point of the kill, the agent starts again on its store.
        c.spawn(0);
        let nodes = c.get(0, "/api/v1/nodes");
        for slot in 0..SLOTS {
            let (a, b) = (
                k_of(&nodes, &format!("a{slot}")),
                k_of(&nodes, &format!("b{slot}")),
            );
            assert_eq!(
                a, b,
                "round {round}: slot {slot} holds half of an apply: {nodes}"
            );
            if let Some(want) = acknowledged[slot as usize] {
                assert!(
                    a.is_some_and(|k| k >= want),
                    "round {round}: slot {slot} lost acknowledged apply {want}: holds {a:?}"
                );
            }
        }
    }
    eprintln!("100 kills, {acks} applies acknowledged, every one kept");
    assert!(acks > 100, "too few applies to test anything: {acks}");
}

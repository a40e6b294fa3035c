//! Partitions: each agent in a network namespace of its own, joined by a bridge, cut apart by
//! blackhole routes on both sides (this process, in the root namespace, still reaches every
//! agent, as an operator on another network would). Applies on both sides of a partition
//! converge once it heals, nothing acknowledged lost and a conflict said in an event; a stream
//! through a cut link ends within the ring's silence bound, requests meanwhile get an answer,
//! and the cut-off node rejoins without a restart.
//!
//! Needs root and `ip` (CI runs as root); elsewhere the tests say SKIPPED.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

/// Namespaces, veth pairs and a bridge for `n` agents, removed on drop.
struct Net {
    tag: String,
    subnet: String,
    n: usize,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// The network, or `None` (said as SKIPPED, a failure under CI) where this process may not
    /// make one.
    fn new(n: usize) -> Option<Net> {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let k = COUNT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let net = Net {
            // Interface names stay under 16 bytes: `cah` + tag + `x` + index.
            tag: format!("{}{}", pid % 100_000, k % 10),
            subnet: format!("10.{}.{}", 200 + k % 50, pid % 250),
            n,
        };
        match net.build() {
            Ok(()) => Some(net),
            Err(why) => {
                cluster_fixtures::skip(&format!(
                    "network namespaces not available (run as root with `ip`): {why}"
                ));
                None
            }
        }
    }

    fn bridge(&self) -> String {
        format!("cab{}", self.tag)
    }

    fn ns(&self, i: usize) -> String {
        format!("can{}x{i}", self.tag)
    }

    fn address(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 2)
    }

    fn build(&self) -> Result<(), String> {
        let br = self.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}.1/24", self.subnet), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..self.n {
            let (ns, host, peer) = (
                self.ns(i),
                format!("cah{}x{i}", self.tag),
                format!("cap{}x{i}", self.tag),
            );
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &peer, "netns", &ns])?;
            ip(&["link", "set", &host, "master", &br])?;
            ip(&["link", "set", &host, "up"])?;
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &ns, "ip"];
                all.extend_from_slice(args);
                ip(&all)
            };
            inside(&[
                "addr",
                "add",
                &format!("{}/24", self.address(i)),
                "dev",
                &peer,
            ])?;
            inside(&["link", "set", &peer, "up"])?;
            inside(&["link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Hosts for [`Cluster::start_on`].
    fn hosts(&self) -> Vec<Host> {
        (0..self.n)
            .map(|i| Host {
                listen: format!("{}:7070", self.address(i)),
                ring: format!("{}:7071", self.address(i)),
                netns: Some(self.ns(i)),
            })
            .collect()
    }

    /// Routes between agents `a` and `b`, both ways: `add` blackholes them, `del` restores.
    fn route(&self, a: usize, b: usize, op: &str) {
        for (from, to) in [(a, b), (b, a)] {
            ip(&[
                "netns",
                "exec",
                &self.ns(from),
                "ip",
                "route",
                op,
                "blackhole",
                &format!("{}/32", self.address(to)),
            ])
            .unwrap();
        }
    }

    /// Cuts agent `i` off from every other agent.
    fn isolate(&self, i: usize) {
        for j in (0..self.n).filter(|&j| j != i) {
            self.route(i, j, "add");
        }
    }

    /// Undoes [`Net::isolate`].
    fn heal(&self, i: usize) {
        for j in (0..self.n).filter(|&j| j != i) {
            self.route(i, j, "del");
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // A namespace's end takes its veth pair with it.
        for i in 0..self.n {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

fn models(c: &Cluster, i: usize) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = c.get(i, "/api/v1/models")["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["metadata"]["name"].as_str().unwrap_or("").to_string(),
                        m["spec"]["dtype"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn model_doc(name: &str, path: &std::path::Path, dtype: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Model\nmetadata: {{name: {name}}}\nspec: {{source: {{path: \"{}\"}}, dtype: {dtype}}}\n",
        path.display()
    )
}

fn phase_of(c: &Cluster, i: usize, node: &str) -> String {
    c.get(i, &format!("/api/v1/nodes/{node}"))["status"]["phase"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn applies_on_both_sides_of_a_partition_converge_once_it_heals() {
    let Some(net) = Net::new(3) else { return };
    let c = Cluster::start_on(&net.hosts(), &[], &[]);
    // The agents share this machine's files: each side can open the model it applies.
    let model = c.dir.path().join("model");
    make_model(&model);
    c.apply_nodes();
    for i in 1..3 {
        c.wait_for(
            "every agent hears from every node",
            Duration::from_secs(15),
            || (0..3).all(|j| phase_of(&c, i, &format!("node-{j}")) == "Ready"),
        );
    }

    net.isolate(2);
    c.wait_for(
        "each side sees the other NotReady",
        Duration::from_secs(10),
        || phase_of(&c, 0, "node-2") == "NotReady" && phase_of(&c, 2, "node-0") == "NotReady",
    );
    // A peer that does not answer holds up no other: node-0 and node-1 stay Ready to each
    // other throughout (their heartbeats every 200 ms, NotReady after 1.5 s of silence).
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(4) {
        for (i, node) in [(0, "node-1"), (1, "node-0")] {
            let phase = phase_of(&c, i, node);
            assert_eq!(
                phase,
                "Ready",
                "node-{i} sees {node} {phase} {:.1} s into the partition",
                watch.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Acknowledged on each side: one model each, and one name written differently on both.
    let apply_on = |i: usize, file: &str, text: &str| {
        let f = c.write(file, text);
        let out = c.ctl_on(i, &["apply", "-f", f.to_str().unwrap()]);
        assert!(out.status.success(), "{}", shown(&out));
    };
    apply_on(0, "left.yaml", &model_doc("left", &model, "f32"));
    apply_on(2, "right.yaml", &model_doc("right", &model, "f32"));
    apply_on(0, "both-0.yaml", &model_doc("both", &model, "f16"));
    apply_on(2, "both-2.yaml", &model_doc("both", &model, "bf16"));
    // Each side has what it acknowledged while apart, and not the other side's.
    let has = |i: usize, name: &str| models(&c, i).iter().any(|(n, _)| n == name);
    let applied = Instant::now();
    c.wait_for("node-1 has node-0's apply", Duration::from_secs(10), || {
        has(1, "left")
    });
    println!(
        "node-1 had node-0's apply {:.2} s after it, while node-2 was cut off",
        applied.elapsed().as_secs_f64()
    );
    assert!(!has(1, "right") && !has(0, "right") && !has(2, "left"));
    assert!(has(2, "right"));

    net.heal(2);
    let healed = Instant::now();
    c.wait_for(
        "node-2 rejoins without a restart",
        Duration::from_secs(15),
        || phase_of(&c, 0, "node-2") == "Ready" && phase_of(&c, 2, "node-0") == "Ready",
    );
    c.wait_for(
        "every agent holds the same models",
        Duration::from_secs(15),
        || {
            let m0 = models(&c, 0);
            m0.len() == 3 && models(&c, 1) == m0 && models(&c, 2) == m0
        },
    );
    println!(
        "converged {:.1} s after the partition healed: {:?}",
        healed.elapsed().as_secs_f64(),
        models(&c, 0)
    );
    // One of the two writes of `both` won everywhere; when their versions were equal, the
    // agents said it.
    let versions: Vec<u64> = (0..3)
        .map(|i| {
            c.get(i, "/api/v1/models/both")["metadata"]["resourceVersion"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(versions.iter().all(|v| *v == versions[0]), "{versions:?}");
    let events: String = (0..3)
        .map(|i| String::from_utf8_lossy(&c.ctl_on(i, &["events"]).stdout).into_owned())
        .collect();
    let both = models(&c, 0)
        .into_iter()
        .find(|(n, _)| n == "both")
        .unwrap()
        .1;
    assert!(both == "f16" || both == "bf16", "{both}");
    let conflict = events.contains("Conflict");
    println!("`both` ended as {both} everywhere (a conflict event: {conflict})");
    if conflict {
        assert!(events.contains("both"), "{events}");
    }
}

/// Streams one completion from the endpoint at `address`; returns when it ends, with the
/// time it took after `cut` was called (on the 10th chunk) and whether it ended in an error.
fn stream_cut(address: &str, cut: impl FnOnce()) -> (usize, Option<Duration>, bool) {
    let body = json!({"model": "tiny-pipe", "prompt": "Hello", "max_tokens": 3000, "ignore_eos": true, "stream": true, "temperature": 0});
    let resp = http_client(Duration::from_secs(60))
        .post(&format!("http://{address}/v1/completions"))
        .send_json(&body)
        .unwrap();
    let mut chunks = 0;
    let mut cut = Some(cut);
    let mut cut_at = None;
    let mut failed = false;
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let Ok(line) = line else {
            failed = true;
            break;
        };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if v.get("error").is_some() {
            failed = true;
            continue;
        }
        chunks += 1;
        if chunks == 10
            && let Some(f) = cut.take()
        {
            f();
            cut_at = Some(Instant::now());
        }
    }
    (chunks, cut_at.map(|t| t.elapsed()), failed)
}

#[test]
fn a_stream_through_a_cut_link_ends_within_the_bound_and_the_ring_comes_back() {
    let Some(net) = Net::new(2) else { return };
    let c = Cluster::start_on(&net.hosts(), &[], &[]);
    let model = c.tiny_model();
    let want = one_process(&model, "Hello world", 10);
    let port = c.serve("cut.yaml", |port| {
        pipeline_yaml(&model, &[("node-0", "0-1"), ("node-1", "2-3")], port)
    });
    let endpoint = format!("{}:{port}", net.address(0));
    let generate_at =
        |limit: Duration| crate::harness::generate_at(&endpoint, "Hello world", 10, limit);
    assert_eq!(generate_at(Duration::from_secs(30)).unwrap(), want);

    // The link between the stages goes silent mid-stream: no reset, packets just vanish.
    let (chunks, ended, failed) = stream_cut(&endpoint, || net.isolate(1));
    let ended = ended.expect("the cut happened mid-stream");
    println!(
        "a stream cut after {chunks} chunks ended {:.2} s after its link went silent",
        ended.as_secs_f64()
    );
    assert!(failed, "the stream ended with an error event");
    assert!(
        ended < Duration::from_secs(6),
        "within the ring's 2 s silence bound and a margin: {ended:?}"
    );
    // Meanwhile a request is answered, never left hanging.
    let start = Instant::now();
    assert!(generate_at(Duration::from_secs(20)).is_err());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );

    net.heal(1);
    let healed = Instant::now();
    c.wait_for(
        "the pipeline is Ready again without a restart",
        Duration::from_secs(30),
        || c.phase(0, "tiny-pipe") == "Ready",
    );
    c.wait_for("generation works again", Duration::from_secs(15), || {
        generate_at(Duration::from_secs(10)).is_ok()
    });
    println!(
        "serving again {:.1} s after the link healed",
        healed.elapsed().as_secs_f64()
    );
    assert_eq!(generate_at(Duration::from_secs(30)).unwrap(), want);
}

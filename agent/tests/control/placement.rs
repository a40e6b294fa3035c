//! `placement: auto`, and several pipelines sharing each agent's ring port.

use std::time::Duration;

use crate::harness::*;

fn model_doc(model: &std::path::Path) -> String {
    format!(
        "apiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec: {{source: {{path: \"{}\"}}}}\n---\n",
        model.display()
    )
}

fn endpoint_doc(name: &str, pipeline: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Endpoint\nmetadata: {{name: {name}}}\nspec: {{pipeline: {pipeline}, port: {port}}}\n---\n"
    )
}

fn stages_of(c: &Cluster, pipeline: &str) -> Vec<(String, String)> {
    c.get(0, &format!("/api/v1/pipelines/{pipeline}"))["status"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["node"].as_str().unwrap().to_string(),
                s["layers"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn auto_placement_splits_by_free_memory_or_keeps_one_node() {
    // The 4-layer model takes ~680 KiB; node-0 and node-1 offer 500 KB each for weights (beside
    // what a stage computes in), node-2 all it has.
    let room = tiny_room(500_000);
    let c = Cluster::start(
        3,
        &[&["--max-memory", &room], &["--max-memory", &room], &[]],
    );
    let model = c.dir.path().join("model");
    make_model(&model);
    let want = one_process(&model, "Hello world", 10);
    let (pa, pb) = (free_port(), free_port());
    let text = format!(
        "{}{}apiVersion: v1\nkind: Pipeline\nmetadata: {{name: split}}\nspec: {{model: tiny, device: cpu, placement: auto, nodes: [node-0, node-1]}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: whole}}\nspec: {{model: tiny, device: cpu, placement: auto}}\n---\n{}{}",
        c.nodes_yaml(),
        model_doc(&model),
        endpoint_doc("split-api", "split", pa),
        endpoint_doc("whole-api", "whole", pb),
    );
    // Placement needs every node's report: wait until agent 0 has heard from them all.
    c.apply_nodes();
    c.apply_wait("auto.yaml", &text);
    assert_eq!(
        stages_of(&c, "split"),
        vec![
            ("node-0".into(), "0-1".into()),
            ("node-1".into(), "2-3".into())
        ]
    );
    assert_eq!(
        stages_of(&c, "whole"),
        vec![("node-2".into(), "0-3".into())]
    );
    let described =
        String::from_utf8_lossy(&c.ctl(&["describe", "pipeline", "whole"]).stdout).into_owned();
    assert!(described.contains("stays on one node"), "{described}");
    let described =
        String::from_utf8_lossy(&c.ctl(&["describe", "pipeline", "split"]).stdout).into_owned();
    assert!(
        described.contains("does not fit on one node"),
        "{described}"
    );
    assert_eq!(generate(pa, "Hello world", 10).unwrap(), want);
    assert_eq!(generate(pb, "Hello world", 10).unwrap(), want);
    // node-0's limit is now mostly taken by `split`: a third pipeline cannot also go there.
    let third = c.write(
        "third.yaml",
        "apiVersion: v1\nkind: Pipeline\nmetadata: {name: third}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n    - {node: node-0, layers: \"0-1\"}\n    - {node: node-2, layers: \"2-3\"}\n",
    );
    let out = c.ctl(&["apply", "-f", third.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node node-0 offers"),
        "{}",
        shown(&out)
    );
}

#[test]
fn two_pipelines_share_each_agents_ring_port() {
    let c = Cluster::start(2, &[]);
    let model = c.dir.path().join("model");
    make_model(&model);
    let prompts = ["Hello world", "The quick brown fox"];
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| one_process(&model, p, 10)).collect();
    let (pa, pb) = (free_port(), free_port());
    let text = format!(
        "{}{}apiVersion: v1\nkind: Pipeline\nmetadata: {{name: forward}}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n    - {{node: node-0, layers: \"0-1\"}}\n    - {{node: node-1, layers: \"2-3\"}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: backward}}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n    - {{node: node-1, layers: \"0-2\"}}\n    - {{node: node-0, layers: \"3-3\"}}\n---\n{}{}",
        c.nodes_yaml(),
        model_doc(&model),
        endpoint_doc("forward-api", "forward", pa),
        endpoint_doc("backward-api", "backward", pb),
    );
    c.apply_wait("two.yaml", &text);
    let handles: Vec<_> = [pa, pb]
        .into_iter()
        .flat_map(|port| prompts.iter().map(move |p| (port, *p)))
        .map(|(port, p)| std::thread::spawn(move || (p, generate(port, p, 10))))
        .collect();
    for h in handles {
        let (p, got) = h.join().unwrap();
        let i = prompts.iter().position(|x| *x == p).unwrap();
        assert_eq!(got.unwrap(), want[i], "{p:?}");
    }
    let endpoints = String::from_utf8_lossy(&c.ctl(&["get", "endpoints"]).stdout).into_owned();
    assert!(
        endpoints.contains("node-1") && endpoints.contains("node-0"),
        "{endpoints}"
    );
}

#[test]
fn a_model_only_on_another_node_is_sized_there_and_a_stage_that_cannot_load_says_why() {
    let c = Cluster::start(2, &[]);
    // The model exists only in node-1's working directory, under a relative path.
    make_model(&c.agents[1].cwd.join("m"));
    let want = one_process(&c.agents[1].cwd.join("m"), "Hello world", 8);
    let port = free_port();
    let nodes = c.write("nodes.yaml", &c.nodes_yaml());
    assert!(
        c.ctl(&["apply", "-f", nodes.to_str().unwrap()])
            .status
            .success()
    );
    c.wait_for("agent 0 hears from node-1", Duration::from_secs(10), || {
        c.get(0, "/api/v1/nodes/node-1")["status"]["phase"] == "Ready"
    });
    let model =
        "apiVersion: v1\nkind: Model\nmetadata: {name: tiny}\nspec: {source: {path: m}}\n---\n";
    let one = format!(
        "{model}apiVersion: v1\nkind: Pipeline\nmetadata: {{name: there}}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n    - {{node: node-1, layers: \"0-3\"}}\n---\n{}",
        endpoint_doc("there-api", "there", port)
    );
    c.apply_wait("there.yaml", &one);
    assert_eq!(generate(port, "Hello world", 8).unwrap(), want);

    // A stage placed where the files are not fails to load, and its status says why.
    let split = c.write(
        "split.yaml",
        "apiVersion: v1\nkind: Pipeline\nmetadata: {name: split}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n    - {node: node-0, layers: \"0-1\"}\n    - {node: node-1, layers: \"2-3\"}\n",
    );
    let out = c.ctl(&["apply", "-f", split.to_str().unwrap()]);
    assert!(out.status.success(), "{}", shown(&out));
    c.wait_for(
        "the split pipeline fails on node-0",
        Duration::from_secs(10),
        || c.phase(1, "split") == "Failed",
    );
    let status = c.get(1, "/api/v1/pipelines/split")["status"].clone();
    let message = status["message"].as_str().unwrap_or("");
    assert!(
        message.contains("stage 0 on node-0") && message.contains("retrying in"),
        "{status}"
    );
    let events = String::from_utf8_lossy(&c.ctl(&["events", "--object", "pipeline/split"]).stdout)
        .into_owned();
    assert!(events.contains("LoadFailed"), "{events}");
}

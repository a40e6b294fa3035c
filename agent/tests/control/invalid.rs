//! Invalid manifests: each is refused, by clusterctl and by the agent itself, with a message
//! that names the problem, and the store is the same afterwards.

use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

fn pipeline(stages: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n{stages}"
    )
}

fn two(a: &str, b: &str) -> String {
    pipeline(&format!(
        "    - {{node: node-0, layers: \"{a}\"}}\n    - {{node: node-x, layers: \"{b}\"}}\n"
    ))
}

/// Everything the agent stores, for before/after comparisons.
fn snapshot(c: &Cluster) -> Vec<Value> {
    ["nodes", "models", "pipelines", "endpoints"]
        .iter()
        .map(|k| {
            let mut items = c.get(0, &format!("/api/v1/{k}"))["items"].clone();
            for item in items.as_array_mut().into_iter().flatten() {
                // Status is live (memory, last seen); the stored object is what must not change.
                item.as_object_mut().unwrap().remove("status");
            }
            items
        })
        .collect()
}

#[test]
fn invalid_manifests_are_refused_and_nothing_is_stored() {
    // Room for half the model on node-0, not all of it.
    let room = tiny_room(500_000);
    let c = Cluster::start(1, &[&["--max-memory", &room]]);
    let model = c.dir.path().join("model");
    make_model(&model);
    let base = format!(
        "{}apiVersion: v1\nkind: Node\nmetadata: {{name: node-x}}\nspec: {{address: \"127.0.0.1:1\"}}\n---\napiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec: {{source: {{path: \"{}\"}}}}\n---\n{}",
        c.nodes_yaml(),
        model.display(),
        two("0-1", "2-3")
    );
    let base_file = c.write("base.yaml", &base);
    let out = c.ctl(&["apply", "-f", base_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", shown(&out));
    c.wait_for(
        "the agent has the base objects",
        Duration::from_secs(5),
        || {
            c.get(0, "/api/v1/pipelines")["items"]
                .as_array()
                .is_some_and(|a| a.len() == 1)
        },
    );
    let before = snapshot(&c);
    let good_node = "apiVersion: v1\nkind: Node\nmetadata: {name: extra}\nspec: {address: \"127.0.0.1:2\"}\n---\n";
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad YAML", "apiVersion: v1\nkind: Node\nmetadata: {name: a\nspec: {}\n".into(), "line 4"),
        ("unknown kind", "apiVersion: v1\nkind: Deployment\nmetadata: {name: a}\nspec: {}\n".into(), "unknown kind \"Deployment\""),
        ("unknown field", two("0-1", "2-3").replace("device: cpu", "device: cpu\n  replica: 2"), "unknown field `replica`"),
        ("overlapping layers", two("0-2", "2-3"), "spec.stages[1].layers: stage 1 has layers 2-3 but should start at layer 3"),
        ("a gap", two("0-1", "3-3"), "should start at layer 2"),
        ("past the last layer", two("0-1", "2-5"), "runs past the model's 4 layers"),
        ("layers not a range", two("0-1", "two-three"), "not of the form"),
        ("stages missing layers", two("0-1", "2-2"), "layers 3-3 are not placed"),
        ("missing model", two("0-1", "2-3").replace("model: tiny", "model: nope"), "Model \"nope\" does not exist"),
        ("missing node", two("0-1", "2-3").replace("node-x", "ghost"), "Node \"ghost\" does not exist"),
        ("port out of range", "apiVersion: v1\nkind: Endpoint\nmetadata: {name: e}\nspec: {pipeline: p, port: 70000}\n".into(), "spec.port"),
        ("port zero", "apiVersion: v1\nkind: Endpoint\nmetadata: {name: e}\nspec: {pipeline: p, port: 0}\n".into(), "port 0"),
        ("endpoint for a missing pipeline", "apiVersion: v1\nkind: Endpoint\nmetadata: {name: e}\nspec: {pipeline: nope, port: 8000}\n".into(), "Pipeline \"nope\" does not exist"),
        ("does not fit in memory", pipeline("    - {node: node-0, layers: \"0-3\"}\n"), "node node-0 offers"),
        ("wrong apiVersion", "apiVersion: apps/v1\nkind: Node\nmetadata: {name: a}\nspec: {address: \"127.0.0.1:9\"}\n".into(), "unsupported apiVersion"),
        ("invalid name", "apiVersion: v1\nkind: Node\nmetadata: {name: Bad_Name}\nspec: {address: \"127.0.0.1:9\"}\n".into(), "metadata.name"),
        ("address without port", "apiVersion: v1\nkind: Node\nmetadata: {name: a}\nspec: {address: localhost}\n".into(), "is not host:port"),
        ("stages and auto placement", two("0-1", "2-3").replace("  stages:", "  placement: auto\n  stages:"), "not both"),
        ("unknown device", two("0-1", "2-3").replace("device: cpu", "device: tpu"), "unknown variant `tpu`"),
        ("model folder missing", "apiVersion: v1\nkind: Model\nmetadata: {name: m2}\nspec: {source: {path: /nonexistent/model}}\n".into(), "cannot open the model"),
        ("an object twice", format!("{good_node}{good_node}"), "appears twice"),
        ("a good document beside a bad one", format!("{good_node}{}", two("0-1", "2-4")), "runs past"),
        ("no documents", "# nothing here\n".into(), "no objects"),
    ];
    assert!(cases.len() >= 15);
    let http = http_client(Duration::from_secs(30));
    for (what, text, needle) in &cases {
        let file = c.write("bad.yaml", text);
        let out = c.ctl(&["apply", "-f", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", shown(&out));
        assert!(
            stderr.contains(needle),
            "{what}: expected {needle:?} in:\n{stderr}"
        );
        // The agent refuses it too, whoever sends it.
        let mut r = http
            .post(&format!("http://{}/api/v1/apply", c.agents[0].listen))
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .send(text.as_str())
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.body_mut().read_json().unwrap();
        assert_eq!(status, 400, "{what}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{what}: expected {needle:?} in {message}"
        );
    }
    // A YAML syntax error is placed by line and column.
    let mut r = http
        .post(&format!("http://{}/api/v1/apply", c.agents[0].listen))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .send(cases[0].1.as_str())
        .unwrap();
    let body: Value = r.body_mut().read_json().unwrap();
    assert_eq!(body["error"]["details"][0]["line"], 4, "{body}");
    assert!(
        body["error"]["details"][0]["column"].as_u64().is_some(),
        "{body}"
    );
    assert_eq!(snapshot(&c), before, "a refused apply changed the store");
    // Deleting what others use is refused as well.
    let out = c.ctl(&["delete", "model", "tiny"]);
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("used by Pipeline p"));
    // Usage errors exit with 2.
    assert_eq!(c.ctl(&["get", "widgets"]).status.code(), Some(2));
    assert_eq!(c.ctl(&["apply"]).status.code(), Some(2));
    assert_eq!(snapshot(&c), before);
}

//! Three agents bring a split model up from one apply, serve it, keep it through a restart,
//! re-place it when the split changes, and free it on delete.

use std::time::Duration;

use crate::harness::*;

const PROMPTS: [&str; 2] = ["Hello world", "The quick brown fox"];

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", shown(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn three_agents_apply_serve_reapply_resplit_and_delete() {
    let c = Cluster::start(3, &[]);
    let model = c.dir.path().join("model");
    make_model(&model);
    let expected: Vec<Vec<u32>> = PROMPTS.iter().map(|p| one_process(&model, p, 12)).collect();
    let port = free_port();
    let first = format!(
        "{}{}",
        c.nodes_yaml(),
        pipeline_yaml(&model, &[("node-0", "0-1"), ("node-1", "2-3")], port)
    );
    let out = c.apply_wait("cluster.yaml", &first);
    let file = c.dir.path().join("cluster.yaml");
    assert!(out.contains("pipeline/tiny-pipe created"), "{out}");
    assert!(out.contains("pipeline/tiny-pipe ready"), "{out}");

    // get and describe show the stages, their layers and memory.
    let table = ok(&c.ctl(&["get", "pipelines", "-o", "wide"]));
    assert!(
        table.contains("Ready") && table.contains("node-0:0-1,node-1:2-3"),
        "{table}"
    );
    let described = ok(&c.ctl(&["describe", "pipeline", "tiny-pipe"]));
    for needle in ["node-0", "0-1", "node-1", "2-3", "KiB", "Loaded"] {
        assert!(described.contains(needle), "{needle} missing:\n{described}");
    }
    let memory = c.stage_memory();
    assert!(
        memory[0] > 0 && memory[1] > 0 && memory[2] == 0,
        "{memory:?}"
    );
    // A node's description says how much of the agent sits in huge pages where the OS tells.
    let node = ok(&c.ctl(&["describe", "node", "node-0"]));
    assert_eq!(
        node.contains("in huge pages"),
        cfg!(target_os = "linux"),
        "{node}"
    );

    // Generation through the ring = the one-process engine, token for token.
    for (p, want) in PROMPTS.iter().zip(&expected) {
        assert_eq!(&generate(port, p, 12).unwrap(), want, "prompt {p:?}");
    }

    // The same manifest through another agent changes nothing.
    let before = c.get(2, "/api/v1/pipelines/tiny-pipe")["metadata"].clone();
    let again = ok(&c.ctl_on(2, &["apply", "-f", file.to_str().unwrap()]));
    assert_eq!(again.matches("unchanged").count(), 6, "{again}");
    let after = c.get(2, "/api/v1/pipelines/tiny-pipe")["metadata"].clone();
    assert_eq!(before, after);

    // A changed split, applied through agent 1, re-places the stages; node-0 lets go.
    let moved = format!(
        "{}{}",
        c.nodes_yaml(),
        pipeline_yaml(&model, &[("node-1", "0-0"), ("node-2", "1-3")], port)
    );
    let out = c.apply_wait_on(1, "moved.yaml", &moved);
    assert!(out.contains("pipeline/tiny-pipe configured"), "{out}");
    c.wait_for("node-0 frees its stage", Duration::from_secs(10), || {
        c.stage_memory()[0] == 0
    });
    let wide = ok(&c.ctl_on(0, &["get", "pipelines", "-o", "wide"]));
    assert!(wide.contains("node-1:0-0,node-2:1-3"), "{wide}");
    // The endpoint followed stage 0 to node-1 (same host and port here).
    c.wait_for("the endpoint serves again", Duration::from_secs(15), || {
        generate(port, PROMPTS[0], 12).is_ok()
    });
    for (p, want) in PROMPTS.iter().zip(&expected) {
        assert_eq!(
            &generate(port, p, 12).unwrap(),
            want,
            "after re-placement, {p:?}"
        );
    }

    // Deleting the endpoint and pipeline unloads every stage.
    ok(&c.ctl(&["delete", "endpoint", "tiny-api"]));
    ok(&c.ctl(&["delete", "pipeline", "tiny-pipe"]));
    c.wait_for(
        "every node reports zero stage memory",
        Duration::from_secs(10),
        || c.stage_memory() == vec![0, 0, 0],
    );
    let out = c.ctl(&["get", "pipeline", "tiny-pipe"]);
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn a_killed_agent_comes_back_to_ready_without_a_new_apply() {
    let mut c = Cluster::start(2, &[]);
    let model = c.tiny_model();
    let want = one_process(&model, PROMPTS[1], 10);
    let port = c.serve("cluster.yaml", |port| {
        pipeline_yaml(&model, &[("node-0", "0-2"), ("node-1", "3-3")], port)
    });
    assert_eq!(generate(port, PROMPTS[1], 10).unwrap(), want);

    c.kill(1);
    c.wait_for(
        "agent 0 sees the pipeline degraded",
        Duration::from_secs(10),
        || c.phase(0, "tiny-pipe") == "Degraded",
    );
    let described = ok(&c.ctl(&["describe", "pipeline", "tiny-pipe"]));
    assert!(described.contains("node-1"), "{described}");
    // Requests meanwhile fail fast rather than hang.
    assert!(generate(port, PROMPTS[1], 10).is_err());

    c.spawn(1);
    c.wait_for(
        "the pipeline is Ready again",
        Duration::from_secs(30),
        || c.phase(0, "tiny-pipe") == "Ready",
    );
    c.wait_for("generation works again", Duration::from_secs(10), || {
        generate(port, PROMPTS[1], 10).is_ok()
    });
    assert_eq!(generate(port, PROMPTS[1], 10).unwrap(), want);
    assert!(
        c.log(1).contains("loaded"),
        "node-1 reloaded its stage from its store:\n{}",
        c.log(1)
    );
}

#[test]
fn changes_need_the_token_and_an_agent_that_was_away_catches_up() {
    let mut c = Cluster::start(2, &[]);
    let nodes = c.write("nodes.yaml", &c.nodes_yaml());
    let path = nodes.to_str().unwrap();
    for token in [None, Some("wrong")] {
        let out = c.ctl_with(0, token, &["apply", "-f", path]);
        assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("401"),
            "{}",
            shown(&out)
        );
    }
    let listed = c.get(0, "/api/v1/nodes");
    assert_eq!(listed["items"].as_array().unwrap().len(), 0, "{listed}");
    // The agents' own exchange needs it too.
    let agent = http_client(Duration::from_secs(30));
    let r = agent
        .post(&format!("http://{}/internal/v1/sync", c.agents[0].listen))
        .send_json(serde_json::json!({"report": {}, "records": []}))
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    ok(&c.ctl(&["apply", "-f", path]));
    c.wait_for("node-1 has the nodes", Duration::from_secs(5), || {
        c.get(1, "/api/v1/nodes")["items"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    });
    // node-1 misses an apply while it is down, and catches up when it returns.
    c.kill(1);
    let model = c.dir.path().join("model");
    make_model(&model);
    let extra = c.write(
        "model.yaml",
        &format!(
            "apiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec: {{source: {{path: \"{}\"}}}}\n",
            model.display()
        ),
    );
    ok(&c.ctl(&["apply", "-f", extra.to_str().unwrap()]));
    c.wait_for(
        "node-0 marks node-1 NotReady",
        Duration::from_secs(5),
        || c.get(0, "/api/v1/nodes/node-1")["status"]["phase"] == "NotReady",
    );
    c.spawn(1);
    c.wait_for("node-1 caught up", Duration::from_secs(5), || {
        c.get(1, "/api/v1/models/tiny")["metadata"]["name"] == "tiny"
    });
    c.wait_for("node-0 sees node-1 Ready", Duration::from_secs(5), || {
        c.get(0, "/api/v1/nodes/node-1")["status"]["phase"] == "Ready"
    });
}

/// The agents' exchange is checked as an apply is: a record whose name apply would refuse, or
/// whose version would wrap the clock, is not stored and is said in an event; the rest of the
/// exchange is kept, and later applies still order after it.
#[test]
fn records_from_a_peer_that_apply_would_refuse_are_dropped_and_said() {
    let c = Cluster::start(1, &[]);
    let report = cluster_api::cluster::NodeReport {
        node: "node-9".into(),
        ..Default::default()
    };
    let record = |name: &str, version: u64| {
        serde_json::json!({"object": {
            "apiVersion": "v1",
            "kind": "Model",
            "metadata": {"name": name, "resourceVersion": version, "updatedBy": "node-9", "generation": 1},
            "spec": {"source": {"path": "/nowhere"}}
        }})
    };
    let body = serde_json::json!({
        "report": report,
        "records": [record("BAD/Name..x", 5), record("huge", u64::MAX), record("fine", 7)],
    });
    let r = http_client(Duration::from_secs(30))
        .post(&format!("http://{}/internal/v1/sync", c.agents[0].listen))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(body)
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let names: Vec<String> = c.get(0, "/api/v1/models")["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["fine"]);
    let out = c.ctl(&["events"]);
    let events = String::from_utf8_lossy(&out.stdout);
    assert_eq!(events.matches("RefusedFromPeer").count(), 2, "{events}");
    assert!(
        events.contains("BAD/Name..x") && events.contains("is past"),
        "{events}"
    );
    // The clock did not wrap: the next apply orders right after the stored record.
    let yaml = c.write(
        "after.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-x}\nspec: {address: \"127.0.0.1:1\"}\n",
    );
    let out = c.ctl(&["apply", "-f", yaml.to_str().unwrap()]);
    assert!(out.status.success(), "{}", shown(&out));
    let version = c.get(0, "/api/v1/nodes/node-x")["metadata"]["resourceVersion"]
        .as_u64()
        .unwrap();
    assert_eq!(version, 8);
}

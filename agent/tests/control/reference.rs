//! Every route docs/reference.md lists is answered by a running agent or endpoint.

use serde_json::{Value, json};

use crate::harness::*;

/// `(method, path)` of each route in the table under `### {heading}`.
fn routes(doc: &str, heading: &str) -> Vec<(String, String)> {
    let start = doc.find(&format!("### {heading}")).unwrap();
    let rest = &doc[start + 4..];
    // The table ends at the next section of either level.
    let end = rest
        .find("\n### ")
        .into_iter()
        .chain(rest.find("\n## "))
        .min()
        .unwrap_or(rest.len());
    rest[..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(|r| {
            let (m, p) = r.split_once(' ').unwrap();
            (m.to_string(), p.to_string())
        })
        .collect()
}

fn call(base: &str, method: &str, path: &str, token: &str, body: Option<Value>) -> String {
    let agent = http_client(std::time::Duration::from_secs(30));
    let url = format!("{base}{path}");
    let auth = format!("Bearer {token}");
    let resp = match (method, body) {
        ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
        ("DELETE", _) => agent.delete(&url).header("Authorization", &auth).call(),
        ("POST", Some(b)) => agent
            .post(&url)
            .header("Authorization", &auth)
            .send_json(&b),
        ("POST", None) => agent.post(&url).header("Authorization", &auth).send(""),
        _ => panic!("method {method}"),
    };
    resp.unwrap().body_mut().read_to_string().unwrap()
}

#[test]
fn every_documented_route_is_served() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reference.md"))
        .unwrap();
    let c = Cluster::start(1, &[]);
    let model = c.tiny_model();
    let port = c.serve("one.yaml", |port| {
        pipeline_yaml(&model, &[("node-0", "0-3")], port)
    });
    let base = format!("http://{}", c.agents[0].listen);
    let agent_routes = routes(&doc, "Agent (control plane");
    assert!(agent_routes.len() >= 10, "{agent_routes:?}");
    for (method, path) in &agent_routes {
        let path = path
            .replace("{kind}", "nodes")
            .replace("{name}", "no-such-node");
        let body = match path.as_str() {
            "/api/v1/apply" => Some(json!([])),
            "/internal/v1/sync" => Some(json!({"report": {"node": "someone-else"}, "records": []})),
            "/internal/v1/inspect-model" => Some(json!({"source": {"path": "/no/such/model"}})),
            _ => None,
        };
        let answer = call(&base, method, &path, TOKEN, body);
        assert!(!answer.contains("no route"), "{method} {path}: {answer}");
    }
    assert!(call(&base, "GET", "/api/v1/undocumented", TOKEN, None).contains("kind"));
    assert!(call(&base, "GET", "/nothing/here", TOKEN, None).contains("no route"));
    // A route given another method says so (405), in the agent's error body.
    let resp = http_client(std::time::Duration::from_secs(30))
        .put(&format!("{base}/api/v1/apply"))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .send("")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let body: Value = serde_json::from_str(&resp.into_body().read_to_string().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], 405, "{body}");
    // An apply over the body limit is refused from its length (413), not read as empty.
    let answer = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&c.agents[0].listen).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(format!("POST /api/v1/apply HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 70000000\r\n\r\n").as_bytes()).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("at most"),
        "{answer}"
    );
    // Without the token a write is refused before its route runs.
    let resp = http_client(std::time::Duration::from_secs(30))
        .delete(&format!("{base}/api/v1/nodes/node-0"))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    let ep = format!("http://127.0.0.1:{port}");
    let endpoint_routes = routes(&doc, "Endpoint (on its node");
    assert_eq!(endpoint_routes.len(), 6, "{endpoint_routes:?}");
    for (method, path) in &endpoint_routes {
        let body = match path.as_str() {
            "/v1/chat/completions" => Some(
                json!({"model": "tiny-pipe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
            ),
            "/v1/completions" => {
                Some(json!({"model": "tiny-pipe", "prompt": "hi", "max_tokens": 2}))
            }
            "/generate" => Some(json!({"prompt": "hi", "max_tokens": 2})),
            _ => None,
        };
        let answer = call(&ep, method, path, "", body);
        assert!(
            !answer.contains("no route") && !answer.contains("\"error\""),
            "{method} {path}: {answer}"
        );
    }
    assert!(call(&ep, "GET", "/v2/other", "", None).contains("no route"));
}

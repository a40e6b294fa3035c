//! docs/reference.md lists exactly the fields the manifest types have.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use cluster_api::manifest::parse_manifests;
use serde_json::Value;

/// Every field path of a JSON value under `prefix`, lists marked `[]`.
fn paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{prefix}.{k}");
                // A map of free-form strings (labels) is one field.
                if k == "labels" {
                    out.insert(p);
                    continue;
                }
                match x {
                    Value::Object(_) | Value::Array(_) => {
                        if matches!(x, Value::Array(a) if a.iter().all(|i| !i.is_object())) {
                            out.insert(p.clone());
                        } else {
                            if matches!(x, Value::Array(_)) {
                                out.insert(p.clone());
                            }
                            paths(x, &p, out);
                        }
                    }
                    _ => {
                        out.insert(p);
                    }
                }
            }
        }
        Value::Array(items) => {
            for i in items {
                paths(i, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// The backticked first cells of the table under `### {heading}`.
fn documented(doc: &str, heading: &str) -> BTreeSet<String> {
    let start = doc
        .find(&format!("### {heading}\n"))
        .unwrap_or_else(|| panic!("no section {heading}"));
    let rest = &doc[start + heading.len() + 5..];
    let end = rest
        .find("\n### ")
        .or_else(|| rest.find("\n## "))
        .unwrap_or(rest.len());
    rest[..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

/// Every field set, so that every field serializes.
const FULL: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: a, labels: {room: office}, uid: u, generation: 1, resourceVersion: 2, creationTimestamp: "2026-01-01T00:00:00Z", updatedBy: a}
spec: {address: "10.0.0.1:7070", ringAddress: "10.0.0.1:7071", unschedulable: true}
---
apiVersion: v1
kind: Model
metadata: {name: m}
spec: {source: {path: /models/m}, dtype: bf16}
---
apiVersion: v1
kind: Model
metadata: {name: h}
spec: {source: {hf: {repo: org/m, revision: v1, files: [m.gguf], endpoint: "http://mirror:8080"}}}
---
apiVersion: v1
kind: Model
metadata: {name: u}
spec: {source: {url: "https://example.com/m.gguf"}}
---
apiVersion: v1
kind: Pipeline
metadata: {name: p}
spec: {model: m, device: metal, replicas: 1, stages: [{replica: 0, node: a, layers: "0-13"}], maxSequences: 8, prefillChunk: 64, firstTokenTimeout: 30s}
---
apiVersion: v1
kind: Pipeline
metadata: {name: q}
spec: {model: m, placement: auto, replicas: auto, nodes: [a], failover: {replaceAfter: 2m}}
---
apiVersion: v1
kind: Endpoint
metadata: {name: e}
spec: {pipeline: p, node: a, port: 8000, servedModelName: qwen, apiKeys: [k]}
"#;

#[test]
fn the_reference_lists_every_manifest_field_and_no_other() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/reference.md"
    ))
    .unwrap();
    let objects = parse_manifests(FULL).unwrap();
    let mut by_kind: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    let mut metadata = BTreeSet::new();
    for o in &objects {
        let v = serde_json::to_value(o).unwrap();
        paths(
            &v["spec"],
            "spec",
            by_kind.entry(o.kind.to_string()).or_default(),
        );
        paths(&v["metadata"], "metadata", &mut metadata);
    }
    assert_eq!(documented(&doc, "Metadata (every kind)"), metadata);
    for (kind, fields) in by_kind {
        assert_eq!(documented(&doc, &kind), fields, "section {kind}");
    }
}

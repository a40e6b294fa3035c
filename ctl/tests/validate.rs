//! `clusterctl validate` on the example manifests, and on broken ones.

// A test that cannot unwrap has failed; the panic message is the report.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn validate(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .args(["validate", "-f", path.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn every_example_manifest_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = validate(&path);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            seen += 1;
        }
    }
    assert!(seen >= 3, "only {seen} manifests in {}", dir.display());
}

#[test]
fn a_split_is_checked_against_the_models_layer_count() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), r#"{"num_hidden_layers": 28}"#).unwrap();
    let text = |second: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: a}}\nspec: {{address: \"10.0.0.1:7070\"}}\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: b}}\nspec: {{address: \"10.0.0.2:7070\"}}\n---\napiVersion: v1\nkind: Model\nmetadata: {{name: m}}\nspec: {{source: {{path: \"{}\"}}}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: p}}\nspec:\n  model: m\n  stages:\n    - {{node: a, layers: \"0-13\"}}\n    - {{node: b, layers: \"{second}\"}}\n",
            model.display()
        )
    };
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, text("14-27")).unwrap();
    assert!(validate(&file).status.success());
    std::fs::write(&file, text("14-26")).unwrap();
    let out = validate(&file);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("layers 27-27 are not placed"), "{err}");
    std::fs::write(&file, text("14-27").replace("node: b", "node: c")).unwrap();
    let err = String::from_utf8_lossy(&validate(&file).stderr).into_owned();
    assert!(err.contains("Node \"c\" does not exist"), "{err}");
    let out = validate(&dir.path().join("missing.yaml"));
    assert_eq!(out.status.code(), Some(2));
}

//! Fuzzing as a test: the project's own manifests, damaged (`cluster_fixtures::damage`: bytes
//! flipped, set, cut out, repeated, numbers overwritten), parsed, validated and checked against
//! the undamaged objects as if those were stored. Every case must end in objects or in errors
//! naming the problem; a panic fails, and proptest shrinks it and keeps it in
//! `fuzz_manifests.regressions` beside this file. `PROPTEST_CASES` sets the count.

#![allow(clippy::unwrap_used)]

use cluster_api::manifest::{check_references, parse_manifests};
use cluster_fixtures::damage::{apply, config, damages};
use proptest::prelude::*;

const SEEDS: [&str; 5] = [
    include_str!("../../../manifests/demo.yaml"),
    include_str!("../../../manifests/auto-placement.yaml"),
    include_str!("../../../manifests/smollm2.yaml"),
    include_str!("../../../manifests/two-mac-minis.yaml"),
    include_str!("../../../manifests/replicas.yaml"),
];

#[test]
fn the_undamaged_seeds_parse() {
    for seed in SEEDS {
        let objects = parse_manifests(seed).unwrap();
        assert!(check_references(&objects, &[]).is_empty(), "{seed}");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn damaged_manifests_parse_or_are_refused(which in 0usize..SEEDS.len(), damage in damages(2048, 8)) {
        let seed = SEEDS[which];
        let damaged = apply(seed.as_bytes(), &damage);
        let text = String::from_utf8_lossy(&damaged);
        let stored = parse_manifests(seed).unwrap();
        let outcome = std::panic::catch_unwind(|| match parse_manifests(&text) {
            Ok(objects) => {
                let _ = check_references(&objects, &stored);
                let _ = check_references(&objects, &[]);
            }
            Err(errors) => assert!(!errors.is_empty()),
        });
        prop_assert!(outcome.is_ok(), "panicked on {text:?}");
    }
}

use super::peers::hex;
use super::*;

#[test]
fn pieces_merge_and_say_what_is_missing() {
    let mut p = Pieces::default();
    p.add(10, 20);
    p.add(30, 40);
    p.add(20, 25);
    assert_eq!(p.have, vec![(10, 25), (30, 40)]);
    assert_eq!(p.missing(0, 50), vec![(0, 10), (25, 30), (40, 50)]);
    assert_eq!(p.missing(12, 24), vec![]);
    assert_eq!(p.missing(24, 31), vec![(25, 30)]);
    p.add(0, 100);
    assert_eq!(p.have, vec![(0, 100)]);
    p.remove(10, 20);
    p.remove(90, 120);
    assert_eq!(p.have, vec![(0, 10), (20, 90)]);
    assert_eq!(
        missing_pieces(&p, &[(5, 12), (12, 15), (80, 95)]),
        vec![(10, 15), (90, 95)]
    );
}

#[test]
fn tensors_streamed_whole_are_hashed_as_they_arrive_and_others_are_not() {
    let data: Vec<u8> = (0..100u8).collect();
    let tensors = [(0, 10), (10, 40), (40, 100)];
    let mut s = Streamed::new(&tensors);
    // The first tensor was held before: only bytes 10.. stream through, in uneven parts.
    s.feed(10, &data[10..25]);
    s.feed(25, &data[25..70]);
    s.feed(70, &data[70..100]);
    assert_eq!(s.digest(0), None);
    let sha = |r: std::ops::Range<usize>| hex(&Sha256::digest(&data[r]));
    assert_eq!(s.digest(1), Some(sha(10..40)));
    assert_eq!(s.digest(2), Some(sha(40..100)));
    // A tensor whose start never streamed is not hashed from its middle.
    let mut s = Streamed::new(&tensors);
    s.feed(50, &data[50..100]);
    assert_eq!(s.digest(2), None);
}

#[test]
fn cache_paths_keep_sources_apart() {
    let cache = Path::new("/c");
    let hf = |rev: &str, files: &[&str]| ModelSource {
        hf: Some(cluster_api::manifest::HfSource {
            repo: "org/model".into(),
            revision: rev.into(),
            files: files.iter().map(|f| f.to_string()).collect(),
            endpoint: None,
        }),
        ..ModelSource::default()
    };
    let a = local_path(cache, &hf("main", &[]));
    assert!(a.starts_with("/c/hf") && a.to_string_lossy().contains("org--model-main-"));
    assert_ne!(a, local_path(cache, &hf("v2", &[])));
    assert!(local_path(cache, &hf("main", &["m.Q4_K_M.gguf"])).ends_with("m.Q4_K_M.gguf"));
    let url = ModelSource {
        url: Some("http://h/x/model.gguf".into()),
        ..ModelSource::default()
    };
    assert!(local_path(cache, &url).ends_with("model.gguf"));
    assert_eq!(
        local_path(cache, &ModelSource::local("/m")),
        PathBuf::from("/m")
    );
}

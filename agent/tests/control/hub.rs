//! Models fetched from a hub: a test server on 127.0.0.1 with the Hugging Face Hub's URL layout
//! (`/{owner}/{name}/resolve/{revision}/{file}`, byte ranges, 404s) and plain file URLs
//! (`/files/{path}`), counting the bytes it serves. Nothing reaches the internet.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// What the hub served: bytes per file (body bytes only), and requests per file.
#[derive(Default)]
struct Served {
    bytes: BTreeMap<String, u64>,
    requests: BTreeMap<String, u64>,
}

/// A hub serving the folders under `root`: repository `owner/name` at revision `main` is
/// `root/owner/name/`; `/files/P` is `root/P`.
pub struct Hub {
    pub address: String,
    root: PathBuf,
    served: Arc<Mutex<Served>>,
    /// Milliseconds the hub waits after each 256 KiB it sends (0: as fast as it can).
    pub pause_ms: Arc<AtomicU64>,
    /// When set, HEAD answers give a wrong sha256 (a file that changed, or a damaged copy).
    pub wrong_sha: Arc<AtomicBool>,
}

impl Hub {
    pub fn start(root: &Path) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let served = Arc::new(Mutex::new(Served::default()));
        let pause_ms = Arc::new(AtomicU64::new(0));
        let wrong_sha = Arc::new(AtomicBool::new(false));
        let (root2, served2, pause2, wrong2) = (
            root.to_path_buf(),
            served.clone(),
            pause_ms.clone(),
            wrong_sha.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (root, served, pause, wrong) = (
                    root2.clone(),
                    served2.clone(),
                    pause2.clone(),
                    wrong2.clone(),
                );
                std::thread::spawn(move || {
                    let _ = serve(conn, &root, &served, &pause, &wrong);
                });
            }
        });
        Hub {
            address,
            root: root.to_path_buf(),
            served,
            pause_ms,
            wrong_sha,
        }
    }

    /// Body bytes served for files under the repository folder or path `prefix`.
    pub fn bytes_served(&self, filter: impl Fn(&str) -> bool) -> u64 {
        let s = self.served.lock().unwrap();
        s.bytes
            .iter()
            .filter(|(k, _)| filter(k))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn report(&self) -> String {
        let s = self.served.lock().unwrap();
        s.bytes
            .iter()
            .map(|(k, v)| format!("{k}: {v} B in {} requests", s.requests.get(k).unwrap_or(&0)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The commit a repository's `main` is at: its folder's `.commit` file, else a fixed one.
pub fn main_commit(root: &Path, repo: &str) -> String {
    std::fs::read_to_string(root.join(repo).join(".commit"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "0123456789abcdef0123456789abcdef01234567".into())
}

/// The file a request path names, relative to the root, with the commit the hub says it
/// served it from: `main` and its commit are the repository's folder; another commit is the
/// folder `owner/name@COMMIT`, where a test kept the files `main` had then. `None` for anything
/// else (404).
fn file_of(path: &str, root: &Path) -> Option<(String, Option<String>)> {
    if let Some(p) = path.strip_prefix("/files/") {
        return Some((p.to_string(), None));
    }
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let [owner, name, "resolve", revision, file] = parts.as_slice() else {
        return None;
    };
    let repo = format!("{owner}/{name}");
    let main = main_commit(root, &repo);
    if *revision == "main" || *revision == main {
        return Some((format!("{repo}/{file}"), Some(main)));
    }
    let old = format!("{repo}@{revision}");
    root.join(&old)
        .is_dir()
        .then(|| (format!("{old}/{file}"), Some(revision.to_string())))
}

fn serve(
    conn: TcpStream,
    root: &Path,
    served: &Mutex<Served>,
    pause_ms: &AtomicU64,
    wrong_sha: &AtomicBool,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut range = None;
        let mut authorization = String::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("authorization")
            {
                authorization = v.trim().to_string();
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("range")
            {
                let v = v.trim().trim_start_matches("bytes=");
                if let Some((a, b)) = v.split_once('-') {
                    range = Some((a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()));
                }
            }
        }
        // Repositories of the owner `private-org` need the token `hub-secret`.
        if path.starts_with("/private-org/") && authorization != "Bearer hub-secret" {
            write!(
                out,
                "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n"
            )?;
            continue;
        }
        let found =
            file_of(&path, root).filter(|(f, _)| !f.contains("..") && root.join(f).is_file());
        let Some((file, commit)) = found else {
            let body = b"{\"error\": \"Entry not found\"}";
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n",
                body.len()
            )?;
            out.write_all(body)?;
            continue;
        };
        let mut f = std::fs::File::open(root.join(&file))?;
        let size = f.metadata()?.len();
        let (status, start, end) = match range {
            Some((a, b)) if a < size => ("206 Partial Content", a, (b + 1).min(size)),
            Some(_) => {
                write!(
                    out,
                    "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-length: 0\r\ncontent-range: bytes */{size}\r\n\r\n"
                )?;
                continue;
            }
            None => ("200 OK", 0, size),
        };
        write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\naccept-ranges: bytes\r\n",
            end - start
        )?;
        if let Some(commit) = commit {
            write!(out, "x-repo-commit: {commit}\r\n")?;
        }
        if method == "HEAD" {
            // As the hub answers for LFS files: the sha256 of the whole file.
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            std::io::copy(&mut std::fs::File::open(root.join(&file))?, &mut h)?;
            let mut digest = h.finalize();
            if wrong_sha.load(Ordering::Relaxed) {
                digest[0] ^= 1;
            }
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            write!(out, "x-linked-etag: \"{hex}\"\r\n")?;
        }
        if range.is_some() {
            write!(out, "content-range: bytes {start}-{}/{size}\r\n", end - 1)?;
        }
        write!(out, "\r\n")?;
        if method == "HEAD" {
            continue;
        }
        f.seek(SeekFrom::Start(start))?;
        *served
            .lock()
            .unwrap()
            .requests
            .entry(file.clone())
            .or_default() += 1;
        let mut buf = vec![0u8; 256 << 10];
        let mut left = end - start;
        while left > 0 {
            let chunk = left.min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..chunk])?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            left -= n as u64;
            *served
                .lock()
                .unwrap()
                .bytes
                .entry(file.clone())
                .or_default() += n as u64;
            let pause = pause_ms.load(Ordering::Relaxed);
            if pause > 0 {
                std::thread::sleep(Duration::from_millis(pause));
            }
        }
    }
}

/// Bytes a folder's files take on disk (allocated blocks: holes of sparse files are free).
fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let m = entry.metadata().unwrap();
        total += if m.is_dir() {
            disk_bytes(&entry.path())
        } else {
            m.blocks() * 512
        };
    }
    total
}

fn size_of(dir: &Path, pick: impl Fn(&str) -> bool) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| pick(&e.file_name().to_string_lossy()))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// The cluster's Nodes, and a Model from repository `repo` of the hub with a pipeline over
/// `stages` and its endpoint on `port`.
fn hf_model_yaml(
    c: &Cluster,
    hub: &str,
    repo: &str,
    files: &[&str],
    stages: &[(&str, &str)],
    port: u16,
) -> String {
    let files = if files.is_empty() {
        String::new()
    } else {
        format!(", files: [{}]", files.join(", "))
    };
    let stages: String = stages
        .iter()
        .map(|(n, l)| format!("    - {{node: {n}, layers: \"{l}\"}}\n"))
        .collect();
    format!(
        "{}apiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec:\n  source:\n    hf: {{repo: {repo}, endpoint: \"{hub}\"{files}}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: tiny-pipe}}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n{stages}---\napiVersion: v1\nkind: Endpoint\nmetadata: {{name: tiny-api}}\nspec: {{pipeline: tiny-pipe, port: {port}}}\n",
        c.nodes_yaml()
    )
}

/// Writes `text` to a file and applies it with clusterctl (not waiting): success and output.
fn apply(c: &Cluster, text: &str) -> (bool, String) {
    let path = c.write("manifest.yaml", text);
    ctl(c, &["apply", "-f", path.to_str().unwrap()])
}

/// clusterctl's success and its output, stdout and stderr together.
fn ctl(c: &Cluster, args: &[&str]) -> (bool, String) {
    ctl_on(c, 0, args)
}

/// [`ctl`] against agent `i`.
fn ctl_on(c: &Cluster, i: usize, args: &[&str]) -> (bool, String) {
    let out = c.ctl_on(i, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn stage_share(model: &Path, layers: &str, first: bool, last: bool) -> u64 {
    let folder = cluster_engine::ModelFolder::open(model).unwrap();
    let range: cluster_api::LayerRange = layers.parse().unwrap();
    folder.stage_bytes(range, first, last, None)
}

#[test]
fn three_agents_fetch_a_sharded_model_from_a_hub_each_only_its_stage() {
    let root = tempfile::tempdir().unwrap();
    let repo_dir = root.path().join("test-org/tiny-llama");
    crate::common::make_model(
        &repo_dir,
        &[
            "--layers",
            "6",
            "--hidden",
            "512",
            "--intermediate",
            "1024",
            "--shards",
            "3",
        ],
    );
    let hub = Hub::start(root.path());
    let c = Cluster::start(3, &[]);
    let port = free_port();
    let split = [("node-0", "0-1"), ("node-1", "2-3"), ("node-2", "4-5")];
    let manifest = hf_model_yaml(&c, &hub.address, "test-org/tiny-llama", &[], &split, port);
    c.apply_wait("hub.yaml", &manifest);

    // The same tokens as one process reading the original folder.
    for prompt in ["The quick brown fox", "Once upon a time"] {
        let want = one_process(&repo_dir, prompt, 12);
        assert_eq!(generate(port, prompt, 12).unwrap(), want, "{prompt:?}");
    }

    // The hub served each byte of the weights about once, not once per node.
    let weights = size_of(&repo_dir, |n| n.ends_with(".safetensors"));
    let served = hub.bytes_served(|f| f.ends_with(".safetensors"));
    eprintln!(
        "weights {weights} B, served {served} B ({:.3}x)\n{}",
        served as f64 / weights as f64,
        hub.report()
    );
    assert!(
        served as f64 <= 1.05 * weights as f64,
        "the hub served {served} B of weights for a model of {weights} B"
    );
    // Each node holds its own share of the weights, not the model.
    let small = size_of(&repo_dir, |n| !n.ends_with(".safetensors"));
    for (i, (_, layers)) in split.iter().enumerate() {
        let share = stage_share(&repo_dir, layers, i == 0, i == 2);
        let held = disk_bytes(&c.agents[i].data_dir.join("models"));
        eprintln!(
            "node-{i} (layers {layers}): share {share} B, cache {held} B ({:.3}x)",
            held as f64 / share as f64
        );
        assert!(
            held as f64 <= 1.05 * share as f64 + small as f64,
            "node-{i} holds {held} B for a share of {share} B"
        );
    }
    // Events say what each stage fetched, from where.
    for i in 0..3 {
        let (_, events) = ctl_on(&c, i, &["events", "--object", "pipeline/tiny-pipe"]);
        assert!(
            events.contains(&format!("stage {i} loaded in"))
                && events.contains("of its weights from")
                // The commit main was at when it was applied, which every node fetched.
                && events.contains(&format!(
                    "hf://test-org/tiny-llama@{}",
                    main_commit(hub.root(), "test-org/tiny-llama")
                )),
            "node-{i}: {events}"
        );
    }
    // `get` names the source.
    let (_, models) = ctl(&c, &["get", "models"]);
    assert!(models.contains("hf://test-org/tiny-llama@main"), "{models}");
}

#[test]
fn a_gguf_over_a_url_splits_in_two_and_a_restarted_node_resumes_from_its_cache() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("m");
    crate::common::make_model(
        &dir,
        &[
            "--layers",
            "4",
            "--hidden",
            "512",
            "--intermediate",
            "1024",
            "--gguf",
            "q8_0",
        ],
    );
    let gguf = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .unwrap();
    let name = gguf.file_name().unwrap().to_str().unwrap().to_string();
    let hub = Hub::start(root.path());
    let mut c = Cluster::start(2, &[]);
    let port = free_port();
    let url = format!("{}/files/m/{name}", hub.address);
    let manifest = format!(
        "{}apiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec:\n  source: {{url: \"{url}\"}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: tiny-pipe}}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n    - {{node: node-0, layers: \"0-1\"}}\n    - {{node: node-1, layers: \"2-3\"}}\n---\napiVersion: v1\nkind: Endpoint\nmetadata: {{name: tiny-api}}\nspec: {{pipeline: tiny-pipe, port: {port}}}\n",
        c.nodes_yaml()
    );
    c.apply_wait("url.yaml", &manifest);
    let want = one_process(&gguf, "The quick brown fox", 12);
    assert_eq!(generate(port, "The quick brown fox", 12).unwrap(), want);
    let size = std::fs::metadata(&gguf).unwrap().len();
    let first = hub.bytes_served(|_| true);
    eprintln!(
        "GGUF {size} B, served {first} B ({:.3}x)\n{}",
        first as f64 / size as f64,
        hub.report()
    );
    assert!(first as f64 <= 1.05 * size as f64, "served {first} B");

    // A node that restarts loads from its cache: nothing more is fetched.
    c.kill(1);
    c.spawn(1);
    let start = std::time::Instant::now();
    loop {
        if generate(port, "The quick brown fox", 12).ok() == Some(want.clone()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the pipeline did not come back: {}",
            c.log(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = hub.bytes_served(|_| true) - first;
    eprintln!("after node-1 restarted: {again} B more");
    assert!(again == 0, "a restarted node fetched {again} B again");
    let (_, events) = ctl_on(&c, 1, &["events", "--object", "pipeline/tiny-pipe"]);
    assert!(
        events.contains("its weights all in this node's cache"),
        "{events}"
    );
    let _ = hub.root();
}

#[test]
fn a_missing_repository_or_file_is_refused_at_apply_and_nothing_is_stored() {
    let root = tempfile::tempdir().unwrap();
    let repo_dir = root.path().join("test-org/tiny-llama");
    make_model(&repo_dir);
    let hub = Hub::start(root.path());
    let c = Cluster::start(1, &[]);
    let port = free_port();
    for (repo, files, want) in [
        ("test-org/nothing", vec![], "404"),
        (
            "test-org/tiny-llama",
            vec!["model.Q4_0.gguf"],
            "model.Q4_0.gguf",
        ),
    ] {
        let manifest = hf_model_yaml(&c, &hub.address, repo, &files, &[("node-0", "0-3")], port);
        let (ok, out) = apply(&c, &manifest);
        assert!(!ok, "{out}");
        assert!(
            out.contains("spec.source") && out.contains(want),
            "{repo}: {out}"
        );
    }
    let (_, listed) = ctl(&c, &["get", "models", "-o", "json"]);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    // A split past the model's layers is refused with the count.
    let manifest = hf_model_yaml(
        &c,
        &hub.address,
        "test-org/tiny-llama",
        &[],
        &[("node-0", "0-9")],
        port,
    );
    let (ok, out) = apply(&c, &manifest);
    assert!(!ok && out.contains("4 layers"), "{out}");
}

#[test]
fn a_node_killed_mid_fetch_resumes_where_it_stopped() {
    let root = tempfile::tempdir().unwrap();
    let repo_dir = root.path().join("test-org/tiny-llama");
    crate::common::make_model(
        &repo_dir,
        &["--layers", "6", "--hidden", "512", "--intermediate", "1024"],
    );
    let hub = Hub::start(root.path());
    // About 12 MB/s: the 57 MB of weights take a few seconds.
    hub.pause_ms.store(20, Ordering::Relaxed);
    let mut c = Cluster::start(1, &[]);
    let port = free_port();
    let manifest = hf_model_yaml(
        &c,
        &hub.address,
        "test-org/tiny-llama",
        &[],
        &[("node-0", "0-5")],
        port,
    );
    let (ok, out) = apply(&c, &manifest);
    assert!(ok, "{out}");
    let weights = size_of(&repo_dir, |n| n.ends_with(".safetensors"));
    // Status says it is fetching, with a byte count.
    let start = std::time::Instant::now();
    let mut said = String::new();
    while hub.bytes_served(|f| f.ends_with(".safetensors")) < weights / 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            hub.report()
        );
        let (_, d) = ctl(&c, &["describe", "pipeline", "tiny-pipe"]);
        if d.contains("fetching") {
            said = d;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c.kill(0);
    let before = hub.bytes_served(|f| f.ends_with(".safetensors"));
    eprintln!("killed after {before} B of {weights} B");
    assert!(
        said.contains("fetching its weights") && said.contains(" of "),
        "describe while fetching: {said}"
    );
    // The rest of the fetch (about 2 s) is seen by `apply --wait` below.
    c.spawn(0);
    // `apply --wait` follows the rest of the fetch with the stage's byte count.
    let path = c.write("hub.yaml", &manifest);
    let (ok, waited) = ctl(&c, &["apply", "-f", path.to_str().unwrap(), "--wait"]);
    assert!(ok, "{waited}");
    assert!(
        waited.contains("fetching its weights") && waited.contains("ready"),
        "apply --wait: {waited}"
    );
    let want = one_process(&repo_dir, "The quick brown fox", 12);
    let start = std::time::Instant::now();
    while generate(port, "The quick brown fox", 12).ok() != Some(want.clone()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no answer after the restart: {}",
            c.log(0)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let total = hub.bytes_served(|f| f.ends_with(".safetensors"));
    eprintln!(
        "weights {weights} B; served {total} B in all ({:.3}x)",
        total as f64 / weights as f64
    );
    assert!(
        total as f64 <= 1.1 * weights as f64,
        "a resumed fetch took {total} B for {weights} B"
    );
}

#[test]
fn a_private_repository_needs_the_agents_hub_token() {
    let root = tempfile::tempdir().unwrap();
    // A GGUF file in a subfolder of the repository, named in `files`.
    let repo_dir = root.path().join("private-org/tiny-llama/q8");
    crate::common::make_model(&repo_dir, &["--layers", "4", "--gguf", "q8_0"]);
    let hub = Hub::start(root.path());
    let token_file = root.path().join("hf-token");
    std::fs::write(&token_file, "hub-secret\n").unwrap();
    let with_token = [("HF_TOKEN_PATH", token_file.to_str().unwrap())];
    let manifest = |c: &Cluster, port: u16| {
        hf_model_yaml(
            c,
            &hub.address,
            "private-org/tiny-llama",
            &["q8/model.gguf"],
            &[("node-0", "0-3")],
            port,
        )
    };
    // An agent without the token is refused, saying why.
    let c = Cluster::start(1, &[]);
    let (ok, out) = apply(&c, &manifest(&c, free_port()));
    assert!(
        !ok && out.contains("401") && out.contains("private or gated"),
        "{out}"
    );
    drop(c);
    // One with the token fetches and serves it.
    let c = Cluster::start_with_env(1, &[], &[&with_token]);
    let port = free_port();
    c.apply_wait("private.yaml", &manifest(&c, port));
    let want = one_process(&repo_dir.join("model.gguf"), "The quick brown fox", 8);
    assert_eq!(generate(port, "The quick brown fox", 8).unwrap(), want);
}

/// A model, a pipeline holding it whole on node-0, and a second one split over node-1 and
/// node-2, all from the hub.
fn two_pipelines(c: &Cluster, hub: &str, ports: (u16, u16), split: bool) -> String {
    let mut text = format!(
        "{}apiVersion: v1\nkind: Model\nmetadata: {{name: tiny}}\nspec:\n  source:\n    hf: {{repo: test-org/tiny-llama, endpoint: \"{hub}\"}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: whole}}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n    - {{node: node-0, layers: \"0-5\"}}\n---\napiVersion: v1\nkind: Endpoint\nmetadata: {{name: whole-api}}\nspec: {{pipeline: whole, port: {}}}\n",
        c.nodes_yaml(),
        ports.0
    );
    if split {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: split}}\nspec:\n  model: tiny\n  device: cpu\n  stages:\n    - {{node: node-1, layers: \"0-2\"}}\n    - {{node: node-2, layers: \"3-5\"}}\n---\napiVersion: v1\nkind: Endpoint\nmetadata: {{name: split-api}}\nspec: {{pipeline: split, port: {}}}\n",
            ports.1
        ));
    }
    text
}

#[test]
fn a_node_holding_a_model_serves_its_peers_stages_and_bad_bytes_from_it_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let repo_dir = root.path().join("test-org/tiny-llama");
    crate::common::make_model(
        &repo_dir,
        &["--layers", "6", "--hidden", "512", "--intermediate", "1024"],
    );
    let weights = size_of(&repo_dir, |n| n.ends_with(".safetensors"));
    let want = one_process(&repo_dir, "The quick brown fox", 12);
    for corrupt in [false, true] {
        let hub = Hub::start(root.path());
        let env: &[(&str, &str)] = if corrupt {
            &[("CLUSTERAGENT_TEST_CORRUPT_SERVED_BYTES", "1")]
        } else {
            &[]
        };
        let c = Cluster::start_with_env(3, &[], &[env]);
        let ports = (free_port(), free_port());
        c.apply_wait("whole.yaml", &two_pipelines(&c, &hub.address, ports, false));
        let after_whole = hub.bytes_served(|f| f.ends_with(".safetensors"));
        assert!(after_whole >= weights, "{}", hub.report());
        // node-0 now holds every byte, checked against the hub's sha256.
        c.apply_wait("split.yaml", &two_pipelines(&c, &hub.address, ports, true));
        assert_eq!(generate(ports.1, "The quick brown fox", 12).unwrap(), want);
        let for_split = hub.bytes_served(|f| f.ends_with(".safetensors")) - after_whole;
        let mut events = String::new();
        for i in [1, 2] {
            events.push_str(&ctl_on(&c, i, &["events", "--object", "pipeline/split"]).1);
        }
        eprintln!(
            "corrupt={corrupt}: the hub served {for_split} B of weights for the split (model {weights} B)\n{events}"
        );
        if corrupt {
            // node-0 damages the first byte of each range it serves: the tensors those bytes
            // belong to fail their digests, are said to, and come from the hub instead (the
            // tokens above are the one-process tokens all the same).
            assert!(
                events.contains("did not match the digests published"),
                "{events}"
            );
            assert!(for_split as f64 > 0.02 * weights as f64, "{for_split}");
        } else {
            // Only the headers came from the hub; node-0 served the rest.
            assert!(
                (for_split as f64) < 0.01 * weights as f64,
                "the hub served {for_split} B with a peer holding the model\n{}",
                hub.report()
            );
            assert_eq!(events.matches("from peer node-0").count(), 2, "{events}");
            // The digests node-1 and node-2 checked node-0's bytes against came through the
            // store, published by node-0 when it sealed the file, not with the bytes.
            for i in [1, 2] {
                let (ok, d) = ctl_on(&c, i, &["describe", "model", "tiny"]);
                let row = d
                    .lines()
                    .find(|l| l.trim_start().starts_with("model.safetensors"))
                    .unwrap_or_else(|| panic!("node-{i}: no published digests\n{d}"));
                assert!(ok && row.contains("yes") && row.ends_with("node-0"), "{d}");
            }
            peer_rate_against_curl(&c);
        }
    }
}

#[test]
fn a_file_that_does_not_match_the_hubs_sha256_is_discarded_and_said() {
    let root = tempfile::tempdir().unwrap();
    let repo_dir = root.path().join("test-org/tiny-llama");
    make_model(&repo_dir);
    let hub = Hub::start(root.path());
    hub.wrong_sha.store(true, Ordering::Relaxed);
    let c = Cluster::start(1, &[]);
    let port = free_port();
    let manifest = hf_model_yaml(
        &c,
        &hub.address,
        "test-org/tiny-llama",
        &[],
        &[("node-0", "0-3")],
        port,
    );
    let (ok, out) = apply(&c, &manifest);
    assert!(ok, "{out}");
    let start = std::time::Instant::now();
    loop {
        let (_, d) = ctl(&c, &["describe", "pipeline", "tiny-pipe"]);
        if d.contains("sha256") {
            assert!(d.contains("discarded") && d.contains("Failed"), "{d}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Once the hub's digest is right again, the retry fetches and serves.
    hub.wrong_sha.store(false, Ordering::Relaxed);
    let want = one_process(&repo_dir, "The quick brown fox", 8);
    let start = std::time::Instant::now();
    while generate(port, "The quick brown fox", 8).ok() != Some(want.clone()) {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", c.log(0));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_capped_cache_removes_models_no_pipeline_uses_and_keeps_those_in_use() {
    let root = tempfile::tempdir().unwrap();
    for repo in ["a", "b"] {
        make_model(&root.path().join("test-org").join(repo));
    }
    let hub = Hub::start(root.path());
    // A cap below one model: only what is in use may stay.
    let c = Cluster::start(1, &[&["--model-cache-max", "1B"]]);
    let yaml = |repo: &str, port: u16| {
        format!(
            "{}apiVersion: v1\nkind: Model\nmetadata: {{name: m-{repo}}}\nspec:\n  source:\n    hf: {{repo: test-org/{repo}, endpoint: \"{}\"}}\n---\napiVersion: v1\nkind: Pipeline\nmetadata: {{name: p-{repo}}}\nspec:\n  model: m-{repo}\n  device: cpu\n  stages:\n    - {{node: node-0, layers: \"0-3\"}}\n---\napiVersion: v1\nkind: Endpoint\nmetadata: {{name: e-{repo}}}\nspec: {{pipeline: p-{repo}, port: {port}}}\n",
            c.nodes_yaml(),
            hub.address
        )
    };
    let cache = c.agents[0].data_dir.join("models/hf");
    let held = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (pa, pb) = (free_port(), free_port());
    c.apply_wait("a.yaml", &yaml("a", pa));
    let want = one_process(&root.path().join("test-org/a"), "The quick brown fox", 8);
    assert_eq!(generate(pa, "The quick brown fox", 8).unwrap(), want);
    assert_eq!(held().len(), 1, "{:?}", held());
    for (kind, name) in [("endpoint", "e-a"), ("pipeline", "p-a")] {
        let (ok, out) = ctl(&c, &["delete", kind, name]);
        assert!(ok, "{out}");
    }
    c.apply_wait("b.yaml", &yaml("b", pb));
    let want = one_process(&root.path().join("test-org/b"), "The quick brown fox", 8);
    assert_eq!(generate(pb, "The quick brown fox", 8).unwrap(), want);
    let now = held();
    assert!(
        now.len() == 1 && now[0].starts_with("test-org--b-"),
        "the cache holds {now:?}"
    );
    let (_, events) = ctl(&c, &["events"]);
    assert!(
        events.contains("Evicted") && events.contains("test-org--a-"),
        "{events}"
    );
}

/// Prints, side by side, the rate at which node-1 and node-2 fetched their stages from node-0
/// at the same time (their logs' bytes and milliseconds: requests, disk writes, syncs and
/// digest checks included) and the rate of two `curl`s at once fetching the same numbers of
/// bytes from the same route in 16 MiB ranges, each saving them to a file as a download does
/// (`curl -o`, no sync, no digest). A measurement, not a check: this machine is shared.
fn peer_rate_against_curl(c: &Cluster) {
    let fetched = |i: usize| -> (u64, f64) {
        let log = c.log(i);
        let line = log
            .lines()
            .find(|l| l.contains("stage's weights fetched"))
            .unwrap_or_else(|| panic!("no fetch line in node-{i}'s log:\n{log}"))
            .to_string();
        let field = |key: &str| -> f64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.trim_matches('"').parse().ok())
                .unwrap_or_else(|| panic!("{key} in {line}"))
        };
        (field("from_peers") as u64, field("ms").max(1.0))
    };
    let ours: Vec<(u64, f64)> = [1, 2].iter().map(|&i| fetched(i)).collect();
    let url = format!(
        "http://{}/internal/v1/models/tiny/files/model.safetensors",
        c.agents[0].listen
    );
    let saved = tempfile::tempdir().unwrap();
    let curl = |bytes: u64| {
        let url = url.clone();
        let dir = saved.path().to_path_buf();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut at = 0u64;
            while at < bytes {
                let end = (at + (16 << 20)).min(bytes) - 1;
                let ok = std::process::Command::new("curl")
                    .arg("-sfo")
                    .arg(dir.join(format!("{bytes}-{at}")))
                    .arg("-H")
                    .arg(format!("Authorization: Bearer {TOKEN}"))
                    .args(["-H", &format!("Range: bytes={at}-{end}"), &url])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "curl {url} bytes {at}-{end}");
                at = end + 1;
            }
            start.elapsed().as_secs_f64() * 1e3
        })
    };
    let runs: Vec<_> = ours.iter().map(|&(b, _)| curl(b)).collect();
    let curl_ms: Vec<f64> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let rate = |bytes: u64, ms: f64| bytes as f64 / ms / 1e3;
    let ours_rate = (rate(ours[0].0, ours[0].1) + rate(ours[1].0, ours[1].1)) / 2.0;
    let curl_rate = (rate(ours[0].0, curl_ms[0]) + rate(ours[1].0, curl_ms[1])) / 2.0;
    eprintln!(
        "peer fetch, two stages at once: {ours_rate:.0} MB/s each into their caches; two curls of the same bytes at once: {curl_rate:.0} MB/s each; ratio {:.2}",
        ours_rate / curl_rate
    );
}

/// A branch that moves on the hub after an apply changes nothing until the model is applied
/// again: a node that fetches later (here: its cache lost) fetches the commit the apply
/// resolved, so a pipeline never runs two versions of a model; the next apply moves every
/// stage to the new commit, and says so.
#[test]
fn a_moved_branch_is_fetched_at_the_applied_commit_until_the_next_apply() {
    let root = tempfile::tempdir().unwrap();
    let repo = "test-org/tiny-llama";
    let repo_dir = root.path().join(repo);
    make_model(&repo_dir);
    let first = "1111111111111111111111111111111111111111";
    std::fs::write(repo_dir.join(".commit"), first).unwrap();
    let hub = Hub::start(root.path());
    let mut c = Cluster::start(2, &[]);
    let port = free_port();
    let manifest = hf_model_yaml(
        &c,
        &hub.address,
        repo,
        &[],
        &[("node-0", "0-1"), ("node-1", "2-3")],
        port,
    );
    c.apply_wait("hub.yaml", &manifest);
    let prompt = "The quick brown fox";
    let want_old = one_process(&repo_dir, prompt, 12);
    assert_eq!(generate(port, prompt, 12).unwrap(), want_old);
    let (_, d) = ctl(&c, &["describe", "model", "tiny"]);
    assert!(d.contains(&format!("Commit:    {first}")), "{d}");

    // main moves on: the old files stay at their commit, main gets other weights.
    let kept = root.path().join(format!("{repo}@{first}"));
    std::fs::rename(&repo_dir, &kept).unwrap();
    crate::common::make_model(&repo_dir, &["--layers", "4", "--seed", "7"]);
    let second = "2222222222222222222222222222222222222222";
    std::fs::write(repo_dir.join(".commit"), second).unwrap();
    let want_new = one_process(&repo_dir, prompt, 12);
    assert_ne!(want_new, want_old, "the two commits' models answer alike");

    // node-1 loses its cache and restarts: it fetches its stage at the applied commit.
    c.kill(1);
    std::fs::remove_dir_all(c.agents[1].data_dir.join("models")).unwrap();
    let old_bytes = |hub: &Hub| {
        hub.bytes_served(|f| {
            f.starts_with(&format!("{repo}@{first}/")) && f.ends_with(".safetensors")
        })
    };
    assert_eq!(old_bytes(&hub), 0);
    c.spawn(1);
    c.wait_for("the pipeline Ready again", Duration::from_secs(60), || {
        c.phase(0, "tiny-pipe") == "Ready" && generate(port, prompt, 12).is_ok()
    });
    assert_eq!(generate(port, prompt, 12).unwrap(), want_old);
    assert!(old_bytes(&hub) > 0, "{}", hub.report());

    // Applying again resolves main anew: every stage moves to the new commit.
    let (ok, out) = apply(&c, &manifest);
    assert!(
        ok && out.contains("revision main now at commit 222222222222"),
        "{out}"
    );
    let start = std::time::Instant::now();
    while generate(port, prompt, 12).ok() != Some(want_new.clone()) {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", c.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, d) = ctl(&c, &["describe", "model", "tiny"]);
    assert!(d.contains(&format!("Commit:    {second}")), "{d}");
}

//! The daemon: `clusteragent --name NAME --listen HOST:PORT --data-dir DIR`.
//!
//! Settings come from flags, then environment variables (`CLUSTERAGENT_*`), then a config file
//! (`--config`, YAML with the flags' names as keys), then defaults.
//!
//! # Layout
//!
//! - [`agent`]: the agent's state (store, peers, events, runtime) and the statuses built from it.
//! - [`apply`]: validation, placement and versioned writes of applied manifests; deletes.
//! - [`rest`]: the REST control plane, its authentication and error mapping.
//! - [`peers`]: state exchange with the other agents: propagation, catch-up, heartbeats.
//! - [`reconcile`]: loads and unloads this node's stages and endpoints to match the store.

pub mod agent;
pub mod apply;
pub mod peers;
pub mod reconcile;
pub mod rest;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;

/// The daemon's settings as given: flags of `clusteragent` with no subcommand (each also an
/// environment variable), and the same settings, by the flags' names, in the config file.
/// [`Settings::resolve`] takes each from the first of flags, environment, file that has it.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DaemonArgs {
    /// Config file (YAML; keys are these flags' names: name, listen, data-dir, ...).
    #[arg(long, env = "CLUSTERAGENT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's name: the `Node` object it answers for [default: the host name].
    #[arg(long, env = "CLUSTERAGENT_NAME")]
    pub name: Option<String>,
    /// Where the REST control plane listens [default: 0.0.0.0:7070].
    #[arg(long, env = "CLUSTERAGENT_LISTEN")]
    pub listen: Option<String>,
    /// Where the store and the generated cluster token live
    /// [default: ~/.local/share/clusteragent, ~/Library/Application Support/clusteragent on macOS].
    #[arg(long, env = "CLUSTERAGENT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where ring connections from other agents' stages arrive [default: --listen's port + 1].
    #[arg(long, env = "CLUSTERAGENT_RING_LISTEN")]
    pub ring_listen: Option<String>,
    /// File holding the cluster token, the same on every agent [default: DATA_DIR/cluster-token,
    /// created on first start].
    #[arg(long, env = "CLUSTERAGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve reads (get, describe, events) without the token.
    #[arg(long, env = "CLUSTERAGENT_OPEN_READS", num_args = 0..=1, default_missing_value = "true")]
    pub open_reads: Option<bool>,
    /// Most memory this node's stages may take, counted by placement (e.g. 12GiB, 500MB).
    #[arg(long, env = "CLUSTERAGENT_MAX_MEMORY")]
    pub max_memory: Option<String>,
    /// Most disk the cache of fetched models (DATA_DIR/models) may take (e.g. 200GB): models no
    /// pipeline uses are removed, least recently used first [default: no cap].
    #[arg(long, env = "CLUSTERAGENT_MODEL_CACHE_MAX")]
    pub model_cache_max: Option<String>,
    /// Milliseconds between state exchanges with each peer (the heartbeat) [default: 1000].
    #[arg(long, env = "CLUSTERAGENT_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// A peer not heard from for this many milliseconds is NotReady [default: 5000].
    #[arg(long, env = "CLUSTERAGENT_NODE_TIMEOUT_MS")]
    pub node_timeout_ms: Option<u64>,
    /// Seconds SIGTERM waits for streams in flight before stopping [default: 10].
    #[arg(long, env = "CLUSTERAGENT_GRACE_PERIOD")]
    pub grace_period: Option<f64>,
    /// Milliseconds a stage's compute thread polls for work before sleeping [default: 20].
    #[arg(long, env = "CLUSTERAGENT_COMPUTE_SPIN_MS")]
    pub compute_spin_ms: Option<u64>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Node name.
    pub name: String,
    /// REST address.
    pub listen: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Ring address.
    pub ring_listen: String,
    /// The cluster token.
    pub token: String,
    /// Where the token came from, for the startup line.
    pub token_source: PathBuf,
    /// The token was made at this start and is written to `token_source` once the agent holds
    /// its data directory (an agent refused because another holds it leaves no file behind).
    pub new_token: bool,
    /// Reads without the token.
    pub open_reads: bool,
    /// Cap on stage memory.
    pub max_memory: Option<u64>,
    /// Cap on the disk the cache of fetched models takes.
    pub model_cache_max: Option<u64>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// NotReady bound.
    pub node_timeout: Duration,
    /// Drain bound on SIGTERM.
    pub grace_period: Duration,
    /// Compute thread polling.
    pub compute_spin: Duration,
}

/// Parses `12GiB`, `500MB`, `1.5G` or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 12GiB, 500MB, 1073741824)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    Ok((value * scale) as u64)
}

fn default_data_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if cfg!(target_os = "macos")
        && let Some(h) = &home
    {
        return h.join("Library/Application Support/clusteragent");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("clusteragent");
    }
    home.unwrap_or_else(|| PathBuf::from("."))
        .join(".local/share/clusteragent")
}

fn default_name() -> String {
    let host = sysinfo::System::host_name().unwrap_or_else(|_| "node".into());
    let host = host
        .split('.')
        .next()
        .unwrap_or("node")
        .to_ascii_lowercase();
    let name: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() { "node".into() } else { name }
}

/// Reads the token from `file`, or from `DATA_DIR/cluster-token`, or makes a random one for that
/// file; the third answer is `true` when the token is new and still to be written
/// ([`Settings::keep_new_token`], once the agent holds its data directory).
fn load_token(file: Option<&Path>, data_dir: &Path) -> Result<(String, PathBuf, bool)> {
    if let Some(f) = file {
        let token = std::fs::read_to_string(f)
            .with_context(|| format!("reading the cluster token from {}", f.display()))?
            .trim()
            .to_string();
        if token.is_empty() {
            bail!("the cluster token file {} is empty", f.display());
        }
        return Ok((token, f.to_path_buf(), false));
    }
    let path = data_dir.join("cluster-token");
    if path.exists() {
        return load_token(Some(&path), data_dir);
    }
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok((token, path, true))
}

impl Settings {
    /// Writes a token made at this start to `DATA_DIR/cluster-token` (0600) and says so; called
    /// once the store, and so the data directory, is this agent's.
    pub fn keep_new_token(&self) -> Result<()> {
        if !self.new_token {
            return Ok(());
        }
        let path = &self.token_source;
        std::fs::write(path, format!("{}\n", self.token))
            .with_context(|| format!("writing a new cluster token to {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        eprintln!(
            "clusteragent: created a cluster token in {}; give the same file to every agent (--token-file) and to clusterctl (--token)",
            path.display()
        );
        Ok(())
    }

    /// Flags and environment over the config file over defaults.
    pub fn resolve(args: DaemonArgs) -> Result<Self> {
        let file: DaemonArgs = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the config file {}", path.display()))?;
                serde_yaml::from_str(&text)
                    .with_context(|| format!("config file {}", path.display()))?
            }
            None => DaemonArgs::default(),
        };
        let name = args.name.or(file.name).unwrap_or_else(default_name);
        cluster_api::manifest::check_name(&name).map_err(|why| anyhow::anyhow!("--name: {why}"))?;
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "0.0.0.0:7070".into());
        let (host, port) = cluster_api::manifest::split_host_port(&listen)
            .map_err(|why| anyhow::anyhow!("--listen: {why}"))?;
        let ring_listen = args
            .ring_listen
            .or(file.ring_listen)
            .unwrap_or_else(|| format!("{host}:{}", port.saturating_add(1)));
        cluster_api::manifest::split_host_port(&ring_listen)
            .map_err(|why| anyhow::anyhow!("--ring-listen: {why}"))?;
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(default_data_dir);
        let (token, token_source, new_token) =
            load_token(args.token_file.or(file.token_file).as_deref(), &data_dir)?;
        let max_memory = args
            .max_memory
            .or(file.max_memory)
            .map(|m| parse_size(&m).map_err(|why| anyhow::anyhow!("--max-memory: {why}")))
            .transpose()?;
        let model_cache_max = args
            .model_cache_max
            .or(file.model_cache_max)
            .map(|m| parse_size(&m).map_err(|why| anyhow::anyhow!("--model-cache-max: {why}")))
            .transpose()?;
        let grace = args.grace_period.or(file.grace_period).unwrap_or(10.0);
        if !grace.is_finite() || grace < 0.0 {
            bail!("--grace-period must be zero or more seconds, got {grace}");
        }
        let heartbeat = args.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(1000);
        let node_timeout = args
            .node_timeout_ms
            .or(file.node_timeout_ms)
            .unwrap_or(5000);
        if heartbeat == 0 || node_timeout <= heartbeat {
            bail!(
                "--node-timeout-ms ({node_timeout}) must be more than --heartbeat-ms ({heartbeat}), which must be positive"
            );
        }
        Ok(Self {
            name,
            listen,
            data_dir,
            ring_listen,
            token,
            token_source,
            new_token,
            open_reads: args.open_reads.or(file.open_reads).unwrap_or(false),
            max_memory,
            model_cache_max,
            heartbeat: Duration::from_millis(heartbeat),
            node_timeout: Duration::from_millis(node_timeout),
            grace_period: Duration::from_secs_f64(grace),
            compute_spin: Duration::from_millis(
                args.compute_spin_ms.or(file.compute_spin_ms).unwrap_or(20),
            ),
        })
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(args: DaemonArgs) -> Result<()> {
    let settings = Settings::resolve(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(settings))
}

async fn serve(settings: Settings) -> Result<()> {
    let listen: SocketAddr = tokio::net::lookup_host(&settings.listen)
        .await
        .with_context(|| format!("--listen {}", settings.listen))?
        .next()
        .with_context(|| format!("--listen {} resolves to no address", settings.listen))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the control plane on {listen}"))?;
    let mux = crate::ring::RingMux::bind(&settings.ring_listen, &settings.token).await?;
    let agent = agent::Agent::open(settings, mux)?;
    agent.settings.keep_new_token()?;
    eprintln!(
        "clusteragent {}: node {} serving the control plane on http://{}, ring on {}, data in {}, token from {}",
        env!("CARGO_PKG_VERSION"),
        agent.settings.name,
        listener.local_addr()?,
        agent.runtime.ring_addr(),
        agent.settings.data_dir.display(),
        agent.settings.token_source.display(),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let rest_task = {
        let agent = agent.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(rest::serve(agent, listener, async move {
            let _ = stop.changed().await;
        }))
    };
    tokio::spawn(peers::heartbeat_loop(agent.clone(), stop_rx.clone()));
    tokio::spawn(reconcile::reconcile_loop(agent.clone(), stop_rx.clone()));
    tokio::spawn(agent::inventory_loop(agent.clone(), stop_rx.clone()));
    crate::web::wait_for_signal().await;
    eprintln!(
        "clusteragent: stopping: no new requests; waiting up to {:.0} s for {} stream(s) in flight",
        agent.settings.grace_period.as_secs_f64(),
        agent.runtime.in_flight()
    );
    agent.begin_shutdown();
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + agent.settings.grace_period;
    while agent.runtime.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = agent.runtime.in_flight();
    if left > 0 {
        eprintln!("clusteragent: grace period over; ending {left} streams");
    }
    agent.runtime.stop_all();
    let _ = tokio::time::timeout(Duration::from_secs(2), rest_task).await;
    agent.store.flush()?;
    eprintln!("clusteragent: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert!(parse_size("12 parsecs").is_err());
    }
}

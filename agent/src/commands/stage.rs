//! `clusteragent stage`: runs one stage of a pipeline ring from a ring configuration file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use cluster_api::RingConfig;

use crate::ring::{NodeOptions, RingNode, http};

/// Flags of `clusteragent stage`.
#[derive(Debug, Args)]
pub struct StageArgs {
    /// Ring configuration (JSON): pipeline, generation, model, stages with addresses and layers.
    #[arg(long)]
    pub config: PathBuf,
    /// Which stage of the ring this process runs.
    #[arg(long)]
    pub index: usize,
    /// Read the cluster token from this file instead of the configuration.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Stage 0 only: where to serve the generation API (POST /generate, GET /health).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Milliseconds the compute thread keeps polling for work before it sleeps: keeps the CPU
    /// awake between a sequence's steps (faster, notably on virtual machines); 0 sleeps at once.
    #[arg(long, env = "CLUSTERAGENT_COMPUTE_SPIN_MS", default_value_t = 20)]
    pub compute_spin_ms: u64,
}

/// Runs `clusteragent stage` until SIGINT or SIGTERM.
pub fn run(args: StageArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let mut config: RingConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a ring configuration", args.config.display()))?;
    if let Some(file) = &args.token_file {
        config.token = std::fs::read_to_string(file)
            .with_context(|| format!("reading the token from {}", file.display()))?
            .trim()
            .to_string();
    }
    if args.http.is_some() && args.index != 0 {
        bail!(
            "--http is for stage 0, which runs the generation loop; this is stage {}",
            args.index
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let options = NodeOptions {
            peers: Default::default(),
            index: args.index,
            compute_spin: Duration::from_millis(args.compute_spin_ms),
            pass_floor: crate::ring::node::PassFloor::from_env()?,
        };
        let node = RingNode::start(config, options).await?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if let Some(addr) = args.http {
            let listener = http::bind(addr).await?;
            eprintln!(
                "stage 0 serving the generation API on http://{}",
                listener.local_addr()?
            );
            let mut stop = stop_rx.clone();
            tokio::spawn(http::serve(
                http::fixed(node.shared.clone()),
                listener,
                async move {
                    let _ = stop.changed().await;
                },
            ));
        }
        eprintln!(
            "stage {} listening for its predecessor on {}",
            args.index, node.ring_addr
        );
        crate::web::wait_for_signal().await;
        let _ = stop_tx.send(true);
        node.shutdown();
        Ok(())
    })
}

//! `clusterctl`: the kubectl-style command line of a clusteragent cluster.
//!
//! This build carries the verbs' flags and help; the verbs that talk to agents need the control
//! plane (REST on each agent), which comes with the control-plane work. Until then they say so
//! and exit with code 1 rather than pretend.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// clusterctl: declare models, layer splits and endpoints; inspect and change a cluster.
#[derive(Debug, Parser)]
#[command(name = "clusterctl", version, about)]
struct Cli {
    /// Agent to talk to, e.g. http://192.168.5.1:7070 (or CLUSTERCTL_SERVER).
    #[arg(long, global = true, env = "CLUSTERCTL_SERVER")]
    server: Option<String>,
    /// Cluster token for mutating calls (or CLUSTERCTL_TOKEN).
    #[arg(long, global = true, env = "CLUSTERCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Create or update objects from manifests (a file, a folder, or - for stdin).
    Apply {
        /// Manifest file, folder or -.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Show what would change without changing it.
        #[arg(long)]
        dry_run: bool,
        /// Wait until the applied pipelines are Ready, showing each stage's progress.
        #[arg(long)]
        wait: bool,
    },
    /// List objects of a kind (nodes, models, pipelines, endpoints), or show one.
    Get {
        /// Kind of object.
        kind: String,
        /// Name of one object.
        name: Option<String>,
        /// Output format: wide, yaml or json.
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
    /// Show an object's spec, status, stages and recent events.
    Describe {
        /// Kind of object.
        kind: String,
        /// Its name.
        name: String,
    },
    /// Delete an object, or every object in a manifest.
    Delete {
        /// Kind of object.
        kind: Option<String>,
        /// Its name.
        name: Option<String>,
        /// Delete the objects this manifest declares.
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
    },
    /// Show the nodes' inventory: CPU, memory, GPU.
    Nodes,
    /// Show an agent's logs.
    Logs {
        /// Node whose agent's logs to show.
        node: String,
    },
    /// Chat with an endpoint, interactively or with one prompt.
    Chat {
        /// Endpoint name.
        endpoint: String,
        /// One prompt: print the answer and exit.
        #[arg(short = 'p', long)]
        prompt: Option<String>,
    },
    /// Measure an endpoint's throughput and latency.
    Bench {
        /// Endpoint name.
        endpoint: String,
    },
    /// Check manifests offline, without a running cluster.
    Validate {
        /// Manifest file or folder.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Manage contexts: server URLs and tokens kept in the user's config directory.
    Config {
        /// Sub-command: view, use-context, set-context.
        action: Vec<String>,
    },
}

impl Verb {
    fn name(&self) -> &'static str {
        match self {
            Verb::Apply { .. } => "apply",
            Verb::Get { .. } => "get",
            Verb::Describe { .. } => "describe",
            Verb::Delete { .. } => "delete",
            Verb::Nodes => "nodes",
            Verb::Logs { .. } => "logs",
            Verb::Chat { .. } => "chat",
            Verb::Bench { .. } => "bench",
            Verb::Validate { .. } => "validate",
            Verb::Config { .. } => "config",
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let _ = (&cli.server, &cli.token);
    eprintln!(
        "clusterctl {}: this build has no control plane to talk to yet; run a model in one process with `clusteragent generate` meanwhile",
        cli.command.name()
    );
    ExitCode::from(1)
}

//! `clusterctl`: the kubectl-style command line of a clusteragent cluster.
//!
//! Exit codes: 0 success, 1 the server refused or failed (or could not be reached), 2 usage
//! error.
//!
//! # Layout
//!
//! - [`client`]: REST calls with time bounds and the server's error bodies.
//! - [`config`]: contexts (server URL and token) in the user's config directory.
//! - [`output`]: tables, ages, sizes, YAML and JSON.
//! - [`manifests`]: reading manifest files, folders and stdin.
//! - [`openai`]: requests to OpenAI-compatible endpoints (`chat`, `bench`).
//! - [`commands`]: one file per verb.

mod client;
mod commands;
mod config;
mod manifests;
mod openai;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// clusterctl: declare models, layer splits and endpoints; inspect and change a cluster.
#[derive(Debug, Parser)]
#[command(name = "clusterctl", version, about)]
struct Cli {
    /// Agent to talk to, e.g. http://192.168.5.1:7070 [default: the context's, else
    /// http://127.0.0.1:7070].
    #[arg(long, global = true, env = "CLUSTERCTL_SERVER")]
    server: Option<String>,
    /// Cluster token (needed for changes, and for reads unless the agent opens them).
    #[arg(long, global = true, env = "CLUSTERCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the cluster token (an agent's DATA_DIR/cluster-token); --token wins.
    #[arg(long, global = true, env = "CLUSTERCTL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Context to use instead of the current one.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Seconds to wait for each answer from the agent.
    #[arg(long, global = true, default_value_t = 30)]
    request_timeout: u64,
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Create or update objects from manifests (a file, a folder, or - for stdin).
    Apply(commands::apply::ApplyArgs),
    /// List objects of a kind (nodes, models, pipelines, endpoints), or show one.
    Get(commands::get::GetArgs),
    /// Show an object's spec, status, stages and recent events.
    Describe(commands::describe::DescribeArgs),
    /// Delete an object, or every object a manifest declares.
    Delete(commands::delete::DeleteArgs),
    /// Show the nodes' inventory: CPU, memory, GPU, stage memory.
    Nodes,
    /// Cordon a node and wait until automatically placed stages serve from other nodes.
    Drain(commands::drain::DrainArgs),
    /// Let placement use a drained node again.
    Uncordon(commands::drain::UncordonArgs),
    /// Chat with an endpoint through its OpenAI-compatible API (interactive, or -p once).
    Chat(commands::chat::ChatArgs),
    /// Measure an endpoint's throughput and latency at 1, 4, 16 and 32 concurrent streams.
    Bench(commands::bench::BenchArgs),
    /// Show recent events the agent recorded.
    Events(commands::events::EventsArgs),
    /// Check manifests offline, without a running cluster.
    Validate(commands::validate::ValidateArgs),
    /// Manage contexts: server URLs and tokens kept in the user's config directory.
    #[command(subcommand)]
    Config(commands::config::ConfigVerb),
}

/// A usage error (exit code 2) rather than a refusal.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// How the verbs reach the agent.
pub struct Env {
    server: Option<String>,
    token: Option<String>,
    context: Option<String>,
    timeout: Duration,
}

impl Env {
    /// A client for the resolved server and token.
    pub fn client(&self) -> anyhow::Result<client::Client> {
        let target = config::resolve(
            self.server.clone(),
            self.token.clone(),
            self.context.as_deref(),
        )?;
        Ok(client::Client::new(
            &target.server,
            target.token,
            self.timeout,
        ))
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
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                eprintln!(
                    "clusterctl: error: reading the token file {}: {e}",
                    f.display()
                );
                return ExitCode::from(2);
            }
        },
        (None, None) => None,
    };
    let env = Env {
        server: cli.server,
        token,
        context: cli.context,
        timeout: Duration::from_secs(cli.request_timeout.max(1)),
    };
    let result = match cli.command {
        Verb::Apply(a) => commands::apply::run(&env, a),
        Verb::Get(a) => commands::get::run(&env, a),
        Verb::Describe(a) => commands::describe::run(&env, a),
        Verb::Delete(a) => commands::delete::run(&env, a),
        Verb::Nodes => commands::nodes::run(&env),
        Verb::Drain(a) => commands::drain::drain(&env, a),
        Verb::Uncordon(a) => commands::drain::uncordon(&env, a),
        Verb::Events(a) => commands::events::run(&env, a),
        Verb::Chat(a) => commands::chat::run(&env, a),
        Verb::Bench(a) => commands::bench::run(&env, a),
        Verb::Validate(a) => commands::validate::run(a),
        Verb::Config(v) => commands::config::run(v),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clusterctl: error: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

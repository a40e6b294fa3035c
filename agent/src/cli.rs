//! Command-line entry: parses flags, sets up logging, runs a subcommand, maps errors to exit
//! codes (0 success, 1 failure, 2 usage error) and prints the whole cause chain.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands;

/// clusteragent: runs a host's share of a large language model. With no subcommand it is the
/// daemon: the control plane, this node's stages and endpoints.
#[derive(Debug, Parser)]
#[command(name = "clusteragent", version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A one-process tool instead of the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The daemon's settings.
    #[command(flatten)]
    pub daemon: crate::daemon::DaemonArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a model folder in this one process (optionally through several
    /// in-process stages), streaming it as it comes.
    Generate(commands::generate::GenerateArgs),
    /// Write a random-weight model folder (config, trained BPE tokenizer, safetensors) to try
    /// the engine and the cluster without downloading anything.
    MakeModel(commands::make_model::MakeModelArgs),
    /// Load one stage of a model and report the bytes of weights it holds and the memory this
    /// process takes, as JSON.
    InspectStage(commands::inspect::InspectArgs),
    /// Run one stage of a pipeline ring (stage 0 also runs the generation loop and its API).
    Stage(commands::stage::StageArgs),
    /// Send one prompt to a ring's stage 0 and stream the answer.
    Ask(commands::ask::AskArgs),
    /// Benchmark a 2-stage ring against one process, side by side, ratios printed last.
    BenchRing(commands::bench_ring::BenchRingArgs),
    /// Write the launchd plist (macOS) or systemd unit (Linux) that starts the daemon at boot.
    Install(commands::install::InstallArgs),
    /// Remove what `install` wrote.
    Uninstall(commands::install::InstallArgs),
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    crate::hugepages::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging();
    let Some(command) = cli.command else {
        return finish(crate::daemon::run(cli.daemon));
    };
    let result = match command {
        Command::Generate(args) => commands::generate::run(args),
        Command::MakeModel(args) => commands::make_model::run(args),
        Command::InspectStage(args) => commands::inspect::run(args),
        Command::Stage(args) => commands::stage::run(args),
        Command::BenchRing(args) => commands::bench_ring::run(args),
        Command::Ask(args) => commands::ask::run(args),
        Command::Install(args) => commands::install::install(args),
        Command::Uninstall(args) => commands::install::uninstall(args),
    };
    finish(result)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("clusteragent: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: warnings and errors), in colour only
/// on a terminal: under launchd, systemd or a redirect they land in files and journals, where
/// escape codes are noise that breaks grep.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

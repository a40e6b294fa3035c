//! `clusterctl apply -f FILE|DIR|-`: sends manifests to the agent, which validates them all
//! before storing any; `--dry-run` shows what would change; `--wait` follows the applied
//! pipelines until Ready with a progress bar per stage.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use cluster_api::cluster::{ApplyReply, Phase, PipelineStatus};
use cluster_api::manifest::{Kind, Object};

use super::{Outcome, refused, slug};
use crate::{Env, manifests};

/// Flags of `apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest file, folder or - for stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Show what would change without changing it.
    #[arg(long)]
    pub dry_run: bool,
    /// Wait until the applied pipelines are Ready, showing each stage's progress.
    #[arg(long)]
    pub wait: bool,
    /// Seconds `--wait` waits before giving up.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// Runs `apply`.
pub fn run(env: &Env, args: ApplyArgs) -> Outcome {
    let sources = manifests::read(&args.file)?;
    let objects = manifests::parse(&sources)?;
    let label_of = |object: &str| {
        objects
            .iter()
            .find(|(_, o)| o.describe() == object)
            .map(|(l, _)| l.clone())
    };
    let body = serde_json::to_string(&objects.iter().map(|(_, o)| o).collect::<Vec<_>>())?;
    let client = env.client()?;
    let path = if args.dry_run {
        "/api/v1/apply?dryRun=true"
    } else {
        "/api/v1/apply"
    };
    let answer: ApplyReply = client
        .post_text(path, &body)
        .map_err(|e| refused(e, &label_of))?;
    for item in &answer.items {
        let mut line = format!("{} {}", slug(item.kind.as_str(), &item.name), item.action);
        if args.dry_run {
            line.push_str(" (dry run)");
        }
        if !item.changes.is_empty() {
            line.push_str(&format!(": {}", item.changes.join("; ")));
        }
        println!("{line}");
    }
    if args.wait && !args.dry_run {
        let pipelines: Vec<String> = objects
            .iter()
            .filter(|(_, o)| o.kind == Kind::Pipeline)
            .map(|(_, o)| o.name().to_string())
            .collect();
        wait_ready(&client, &pipelines, Duration::from_secs(args.timeout))?;
    }
    Ok(())
}

fn bar(percent: f64, width: usize) -> String {
    let filled = ((percent / 100.0) * width as f64).round() as usize;
    let filled = filled.min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

fn render(name: &str, status: Option<&PipelineStatus>) -> Vec<String> {
    let Some(status) = status else {
        return vec![format!("pipeline/{name}: no status yet")];
    };
    let said = |m: &Option<String>| m.as_ref().map(|m| format!(" - {m}")).unwrap_or_default();
    let mut lines = vec![format!(
        "pipeline/{name}: {} {:.0}%{}",
        status.phase,
        status.progress,
        said(&status.message)
    )];
    for s in &status.stages {
        // The stage's own message says what the bar counts while it is not plain loading
        // (bytes fetched from the hub or a peer) or why it failed.
        let replica = if status.replicas.is_empty() {
            String::new()
        } else {
            format!("replica {} ", s.replica)
        };
        lines.push(format!(
            "  {replica}stage {} {:<10} layers {:<7} {} {:>3.0}% {}{}",
            s.index,
            s.node,
            s.layers.to_string(),
            bar(s.progress, 24),
            s.progress,
            s.phase,
            said(&s.message)
        ));
    }
    lines
}

/// Polls the pipelines until every one is Ready, redrawing progress on a terminal (or printing
/// each change otherwise).
pub fn wait_ready(
    client: &crate::client::Client,
    pipelines: &[String],
    limit: Duration,
) -> Outcome {
    if pipelines.is_empty() {
        return Ok(());
    }
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut drawn = 0usize;
    let mut last: Vec<String> = Vec::new();
    loop {
        let mut lines = Vec::new();
        let mut ready = true;
        for name in pipelines {
            match client.get::<Object>(&format!("/api/v1/pipelines/{name}")) {
                Ok(p) => {
                    let status = p.pipeline_status();
                    if status.is_none_or(|s| s.phase != Phase::Ready) {
                        ready = false;
                    }
                    lines.extend(render(name, status));
                }
                Err(e) => {
                    ready = false;
                    lines.push(format!("pipeline/{name}: {e}"));
                }
            }
        }
        let mut err = std::io::stderr();
        if tty {
            if drawn > 0 {
                let _ = write!(err, "\x1b[{drawn}A");
            }
            for l in &lines {
                let _ = writeln!(err, "\x1b[2K{l}");
            }
            drawn = lines.len();
        } else if lines != last {
            for l in &lines {
                let _ = writeln!(err, "{l}");
            }
        }
        last = lines;
        if ready {
            println!(
                "{} ready",
                pipelines
                    .iter()
                    .map(|p| format!("pipeline/{p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!(
                "gave up after {} s waiting for Ready:\n{}",
                limit.as_secs(),
                last.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

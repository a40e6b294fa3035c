//! `clusterctl delete KIND NAME` and `clusterctl delete -f FILE`: the agent refuses to delete
//! an object others still use; from a file, dependents go first (endpoints, pipelines, models,
//! nodes).

use std::path::PathBuf;

use clap::Args;
use cluster_api::cluster::DeleteReply;
use cluster_api::manifest::Kind;

use super::{Outcome, slug};
use crate::client::CallError;
use crate::{Env, Usage, manifests};

/// Flags of `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kind of object.
    pub kind: Option<String>,
    /// Its name.
    pub name: Option<String>,
    /// Delete every object this manifest declares.
    #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "name"])]
    pub file: Option<PathBuf>,
    /// Say what would be deleted without deleting it.
    #[arg(long)]
    pub dry_run: bool,
    /// Objects that do not exist are not an error.
    #[arg(long)]
    pub ignore_not_found: bool,
}

/// Runs `delete`.
pub fn run(env: &Env, args: DeleteArgs) -> Outcome {
    let targets: Vec<(Kind, String)> = match (&args.file, &args.kind, &args.name) {
        (Some(f), None, None) => {
            let objects = manifests::parse(&manifests::read(f)?)?;
            let mut t: Vec<(Kind, String)> = objects
                .into_iter()
                .map(|(_, o)| (o.kind, o.metadata.name))
                .collect();
            t.sort_by_key(|k| std::cmp::Reverse(k.0));
            t
        }
        (None, Some(k), Some(n)) => vec![(Kind::parse(k).map_err(Usage)?, n.clone())],
        _ => {
            return Err(Usage("give KIND NAME, or -f FILE".into()).into());
        }
    };
    let client = env.client()?;
    let mut failed = Vec::new();
    for (kind, name) in targets {
        let mut path = format!("/api/v1/{}/{name}", kind.plural());
        if args.dry_run {
            path.push_str("?dryRun=true");
        }
        match client.delete::<DeleteReply>(&path) {
            Ok(r) => println!(
                "{} deleted{}",
                slug(r.kind.as_str(), &r.name),
                if r.dry_run { " (dry run)" } else { "" }
            ),
            Err(CallError::Refused { status: 404, .. }) if args.ignore_not_found => {}
            Err(e) => failed.push(format!("{}: {e}", slug(kind.as_str(), &name))),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("{}", failed.join("\n")))
    }
}

//! `clusterctl config ...`: contexts (server URL and token) in the user's config directory.

use std::path::PathBuf;

use clap::Subcommand;

use super::Outcome;
use crate::Usage;
use crate::config::{Config, Context, path};
use crate::output::table;

/// The `config` sub-verbs.
#[derive(Debug, Subcommand)]
pub enum ConfigVerb {
    /// Print the config file (tokens hidden).
    View,
    /// List the contexts; `*` marks the current one.
    GetContexts,
    /// Print the current context's name.
    CurrentContext,
    /// Make a context the current one.
    UseContext {
        /// Its name.
        name: String,
    },
    /// Create or change a context.
    SetContext {
        /// Its name.
        name: String,
        /// Agent URL, e.g. http://192.168.5.1:7070.
        #[arg(long)]
        server: Option<String>,
        /// The cluster token.
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the cluster token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Also make it the current context.
        #[arg(long)]
        current: bool,
    },
    /// Remove a context.
    DeleteContext {
        /// Its name.
        name: String,
    },
}

/// Runs `config`.
pub fn run(verb: ConfigVerb) -> Outcome {
    let mut config = Config::load()?;
    match verb {
        ConfigVerb::View => {
            let mut shown = config.clone();
            for c in &mut shown.contexts {
                if c.token.is_some() {
                    c.token = Some("<hidden>".into());
                }
            }
            println!("# {}", path().display());
            print!("{}", serde_yaml::to_string(&shown)?);
        }
        ConfigVerb::GetContexts => {
            let rows: Vec<Vec<String>> = config
                .contexts
                .iter()
                .map(|c| {
                    vec![
                        if config.current_context.as_deref() == Some(c.name.as_str()) {
                            "*".into()
                        } else {
                            String::new()
                        },
                        c.name.clone(),
                        c.server.clone(),
                        match (&c.token, &c.token_file) {
                            (Some(_), _) => "inline".into(),
                            (None, Some(f)) => f.display().to_string(),
                            (None, None) => "none".into(),
                        },
                    ]
                })
                .collect();
            print!("{}", table(&["CURRENT", "NAME", "SERVER", "TOKEN"], &rows));
        }
        ConfigVerb::CurrentContext => match &config.current_context {
            Some(c) => println!("{c}"),
            None => return Err(anyhow::anyhow!("no current context is set")),
        },
        ConfigVerb::UseContext { name } => {
            if !config.contexts.iter().any(|c| c.name == name) {
                return Err(Usage(format!("no context named {name:?}")).into());
            }
            config.current_context = Some(name.clone());
            config.save()?;
            println!("switched to context {name:?}");
        }
        ConfigVerb::SetContext {
            name,
            server,
            token,
            token_file,
            current,
        } => {
            let existing = config.contexts.iter().position(|c| c.name == name);
            let mut ctx = existing
                .map(|i| config.contexts[i].clone())
                .unwrap_or(Context {
                    name: name.clone(),
                    ..Context::default()
                });
            if let Some(s) = server {
                ctx.server = s;
            }
            if ctx.server.is_empty() {
                return Err(Usage(format!("context {name:?} needs --server")).into());
            }
            if token.is_some() {
                ctx.token = token;
                ctx.token_file = None;
            }
            if token_file.is_some() {
                ctx.token_file = token_file;
                ctx.token = None;
            }
            match existing {
                Some(i) => config.contexts[i] = ctx,
                None => config.contexts.push(ctx),
            }
            if current || config.current_context.is_none() {
                config.current_context = Some(name.clone());
            }
            let p = config.save()?;
            println!("context {name:?} saved in {}", p.display());
        }
        ConfigVerb::DeleteContext { name } => {
            let before = config.contexts.len();
            config.contexts.retain(|c| c.name != name);
            if config.contexts.len() == before {
                return Err(Usage(format!("no context named {name:?}")).into());
            }
            if config.current_context.as_deref() == Some(name.as_str()) {
                config.current_context = None;
            }
            config.save()?;
            println!("context {name:?} deleted");
        }
    }
    Ok(())
}

//! Contexts: named pairs of server URL and token, kept in `~/.config/clusterctl/config.yaml`
//! (or `$XDG_CONFIG_HOME/clusterctl/`, or the file `$CLUSTERCTL_CONFIG` names). Flags and
//! environment variables override the current context.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

/// Where the agent is when nothing says otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// One context.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Context {
    /// Its name.
    pub name: String,
    /// Agent URL.
    pub server: String,
    /// The cluster token itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Or a file holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// The config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// The context used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// Every context.
    #[serde(default)]
    pub contexts: Vec<Context>,
}

/// The config file's path.
pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("CLUSTERCTL_CONFIG") {
        return PathBuf::from(p);
    }
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    dir.join("clusterctl").join("config.yaml")
}

impl Config {
    /// Reads the file; an absent file is an empty config.
    pub fn load() -> Result<Self> {
        let p = path();
        match std::fs::read_to_string(&p) {
            Ok(text) => serde_yaml::from_str(&text)
                .with_context(|| format!("the clusterctl config {} is not valid", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Writes the file (owner-only: it may hold tokens).
    pub fn save(&self) -> Result<PathBuf> {
        let p = path();
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&p, serde_yaml::to_string(self)?)
            .with_context(|| format!("writing {}", p.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
        }
        Ok(p)
    }

    /// The context named, or the current one.
    pub fn context(&self, name: Option<&str>) -> Result<Option<&Context>> {
        let Some(name) = name.or(self.current_context.as_deref()) else {
            return Ok(None);
        };
        match self.contexts.iter().find(|c| c.name == name) {
            Some(c) => Ok(Some(c)),
            None => bail!(
                "no context named {name:?} in {} (clusterctl config get-contexts lists them)",
                path().display()
            ),
        }
    }
}

/// Server and token after flags, environment and context.
pub struct Target {
    /// Agent URL.
    pub server: String,
    /// Token, if any.
    pub token: Option<String>,
}

/// Resolves where to connect: `--server`/`CLUSTERCTL_SERVER` and `--token`/`CLUSTERCTL_TOKEN`
/// (clap has merged flag and environment) over the context over the default.
pub fn resolve(
    server: Option<String>,
    token: Option<String>,
    context: Option<&str>,
) -> Result<Target> {
    let config = Config::load()?;
    let ctx = config.context(context)?;
    let server = server
        .or_else(|| ctx.map(|c| c.server.clone()))
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let token = match token {
        Some(t) => Some(t),
        None => match ctx {
            Some(Context { token: Some(t), .. }) => Some(t.clone()),
            Some(Context {
                token_file: Some(f),
                ..
            }) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading the token file {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            _ => None,
        },
    };
    Ok(Target { server, token })
}

//! `clusteragent install` and `uninstall`: the launchd property list (macOS) or systemd unit
//! (Linux) that starts the daemon at boot and restarts it when it dies, written with this
//! machine's binary path, data directory and flags; the commands that load it are printed, or
//! run with `--now`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

/// The launchd label and systemd unit name.
pub const LABEL: &str = "dev.clusteragent.agent";
/// The systemd unit's file name.
pub const UNIT: &str = "clusteragent.service";

/// Which service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    /// macOS.
    Launchd,
    /// Linux.
    Systemd,
}

/// Flags of `install` and `uninstall`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Write a launchd property list (the default on macOS).
    #[arg(long, conflicts_with = "systemd")]
    pub launchd: bool,
    /// Write a systemd unit (the default elsewhere).
    #[arg(long)]
    pub systemd: bool,
    /// For this user only (~/Library/LaunchAgents, ~/.config/systemd/user) instead of the
    /// whole machine (/Library/LaunchDaemons, /etc/systemd/system, which need root).
    #[arg(long)]
    pub user: bool,
    /// Also run the launchctl or systemctl commands instead of only printing them.
    #[arg(long)]
    pub now: bool,
    /// Print the file instead of writing it.
    #[arg(long)]
    pub print: bool,
    /// Write the file here instead of the service manager's folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The clusteragent binary the service runs [default: this one].
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Where logs go [default: ~/Library/Logs/clusteragent or /var/log/clusteragent on macOS;
    /// the journal on Linux].
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// The node's name (--name).
    #[arg(long)]
    pub name: Option<String>,
    /// The control plane's address (--listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// The data directory (--data-dir) [default: as the daemon's].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The ring address (--ring-listen).
    #[arg(long)]
    pub ring_listen: Option<String>,
    /// The cluster token file (--token-file).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// A config file (--config) for everything else.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The memory cap (--max-memory).
    #[arg(long)]
    pub max_memory: Option<String>,
    /// `RUST_LOG` of the service.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

impl InstallArgs {
    fn manager(&self) -> Manager {
        if self.launchd {
            Manager::Launchd
        } else if self.systemd || !cfg!(target_os = "macos") {
            Manager::Systemd
        } else {
            Manager::Launchd
        }
    }

    fn home() -> Result<PathBuf> {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .context("HOME is not set")
    }

    /// Where the file goes.
    pub fn target(&self) -> Result<PathBuf> {
        if let Some(o) = &self.out {
            return Ok(o.clone());
        }
        Ok(match (self.manager(), self.user) {
            (Manager::Launchd, true) => Self::home()?
                .join("Library/LaunchAgents")
                .join(format!("{LABEL}.plist")),
            (Manager::Launchd, false) => {
                PathBuf::from("/Library/LaunchDaemons").join(format!("{LABEL}.plist"))
            }
            (Manager::Systemd, true) => Self::home()?.join(".config/systemd/user").join(UNIT),
            (Manager::Systemd, false) => PathBuf::from("/etc/systemd/system").join(UNIT),
        })
    }

    fn data_dir(&self) -> Result<PathBuf> {
        match &self.data_dir {
            Some(d) => absolute(d),
            None if self.user || self.manager() == Manager::Launchd => {
                let home = Self::home()?;
                Ok(if self.manager() == Manager::Launchd {
                    home.join("Library/Application Support/clusteragent")
                } else {
                    home.join(".local/share/clusteragent")
                })
            }
            None => Ok(PathBuf::from("/var/lib/clusteragent")),
        }
    }

    /// The daemon's command line.
    pub fn program(&self) -> Result<Vec<String>> {
        let binary = match &self.binary {
            Some(b) => absolute(b)?,
            None => std::env::current_exe().context("finding this binary's path")?,
        };
        let mut args = vec![binary.display().to_string()];
        let mut flag = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                args.push(format!("--{name}"));
                args.push(v);
            }
        };
        flag(
            "config",
            self.config
                .as_ref()
                .map(|p| absolute(p).map(|p| p.display().to_string()))
                .transpose()?,
        );
        flag("name", self.name.clone());
        flag("listen", self.listen.clone());
        flag("ring-listen", self.ring_listen.clone());
        flag("data-dir", Some(self.data_dir()?.display().to_string()));
        flag(
            "token-file",
            self.token_file
                .as_ref()
                .map(|p| absolute(p).map(|p| p.display().to_string()))
                .transpose()?,
        );
        flag("max-memory", self.max_memory.clone());
        Ok(args)
    }

    fn log_dir(&self) -> Result<PathBuf> {
        match &self.log_dir {
            Some(d) => absolute(d),
            None if self.user => Ok(Self::home()?.join("Library/Logs/clusteragent")),
            None => Ok(PathBuf::from("/var/log/clusteragent")),
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The launchd property list.
pub fn plist(args: &InstallArgs) -> Result<String> {
    let program = args.program()?;
    let logs = args.log_dir()?;
    let data = args.data_dir()?;
    let mut out = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n<plist version=\"1.0\">\n<dict>\n",
    );
    let key = |out: &mut String, k: &str, v: &str| {
        out.push_str(&format!("  <key>{k}</key>\n  {v}\n"));
    };
    key(&mut out, "Label", &format!("<string>{LABEL}</string>"));
    let mut items = String::from("<array>\n");
    for a in &program {
        items.push_str(&format!("    <string>{}</string>\n", xml(a)));
    }
    items.push_str("  </array>");
    key(&mut out, "ProgramArguments", &items);
    // Relative model paths in manifests resolve against the data directory.
    key(
        &mut out,
        "WorkingDirectory",
        &format!("<string>{}</string>", xml(&data.display().to_string())),
    );
    key(&mut out, "RunAtLoad", "<true/>");
    key(&mut out, "KeepAlive", "<true/>");
    // Restarting a crashing agent at most every 10 s keeps a broken setup from spinning.
    key(&mut out, "ThrottleInterval", "<integer>10</integer>");
    // SIGTERM drains streams for --grace-period (10 s) before the agent exits.
    key(&mut out, "ExitTimeOut", "<integer>20</integer>");
    key(
        &mut out,
        "StandardOutPath",
        &format!(
            "<string>{}</string>",
            xml(&logs.join("agent.log").display().to_string())
        ),
    );
    key(
        &mut out,
        "StandardErrorPath",
        &format!(
            "<string>{}</string>",
            xml(&logs.join("agent.log").display().to_string())
        ),
    );
    key(
        &mut out,
        "EnvironmentVariables",
        &format!(
            "<dict>\n    <key>RUST_LOG</key>\n    <string>{}</string>\n  </dict>",
            xml(&args.log_level)
        ),
    );
    key(&mut out, "ProcessType", "<string>Interactive</string>");
    // launchd's default of 256 open files is used up by a few hundred clients (each connection
    // a descriptor, as in the systemd unit's LimitNOFILE).
    let files = "<dict>\n    <key>NumberOfFiles</key>\n    <integer>65536</integer>\n  </dict>";
    key(&mut out, "SoftResourceLimits", files);
    key(&mut out, "HardResourceLimits", files);
    out.push_str("</dict>\n</plist>\n");
    Ok(out)
}

fn quote(a: &str) -> String {
    if a.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-:=@".contains(c))
    {
        a.to_string()
    } else {
        format!("\"{}\"", a.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The systemd unit.
pub fn unit(args: &InstallArgs) -> Result<String> {
    let program = args.program()?;
    let data = args.data_dir()?;
    let exec: Vec<String> = program.iter().map(|a| quote(a)).collect();
    let wanted = if args.user {
        "default.target"
    } else {
        "multi-user.target"
    };
    Ok(format!(
        "[Unit]\nDescription=clusteragent: this host's share of the cluster's models\nWants=network-online.target\nAfter=network-online.target\n\n[Service]\nType=simple\nExecStart={}\nWorkingDirectory={}\nEnvironment=RUST_LOG={}\nRestart=always\nRestartSec=5\n# SIGTERM drains streams for --grace-period (10 s) before the agent exits.\nKillSignal=SIGTERM\nTimeoutStopSec=20\nLimitNOFILE=65536\n\n[Install]\nWantedBy={wanted}\n",
        exec.join(" "),
        quote(&data.display().to_string()),
        quote(&args.log_level),
    ))
}

fn commands(args: &InstallArgs, target: &Path, install: bool) -> Vec<Vec<String>> {
    let t = target.display().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match (args.manager(), args.user, install) {
        (Manager::Launchd, user, true) => {
            let domain = launchd_domain(user);
            vec![
                s(&["launchctl", "bootstrap", &domain, &t]),
                s(&["launchctl", "kickstart", "-k", &format!("{domain}/{LABEL}")]),
            ]
        }
        (Manager::Launchd, user, false) => {
            vec![s(&[
                "launchctl",
                "bootout",
                &format!("{}/{LABEL}", launchd_domain(user)),
            ])]
        }
        (Manager::Systemd, user, true) => {
            let mut base = vec!["systemctl"];
            if user {
                base.push("--user");
            }
            vec![
                [base.clone(), vec!["daemon-reload"]]
                    .concat()
                    .iter()
                    .map(|x| x.to_string())
                    .collect(),
                [base, vec!["enable", "--now", UNIT]]
                    .concat()
                    .iter()
                    .map(|x| x.to_string())
                    .collect(),
            ]
        }
        (Manager::Systemd, user, false) => {
            let mut base = vec!["systemctl"];
            if user {
                base.push("--user");
            }
            vec![
                [base, vec!["disable", "--now", UNIT]]
                    .concat()
                    .iter()
                    .map(|x| x.to_string())
                    .collect(),
            ]
        }
    }
}

fn launchd_domain(user: bool) -> String {
    if user {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "$(id -u)".into());
        format!("gui/{uid}")
    } else {
        "system".into()
    }
}

fn run_all(cmds: &[Vec<String>]) -> Result<()> {
    for c in cmds {
        eprintln!("$ {}", c.join(" "));
        let status = Command::new(&c[0])
            .args(&c[1..])
            .status()
            .with_context(|| format!("running {}", c[0]))?;
        if !status.success() {
            bail!("`{}` failed with {status}", c.join(" "));
        }
    }
    Ok(())
}

/// Runs `install`.
pub fn install(args: InstallArgs) -> Result<()> {
    let text = match args.manager() {
        Manager::Launchd => plist(&args)?,
        Manager::Systemd => unit(&args)?,
    };
    if args.print {
        print!("{text}");
        return Ok(());
    }
    let target = args.target()?;
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&target, &text).with_context(|| {
        format!(
            "writing {}{}",
            target.display(),
            if args.user {
                ""
            } else {
                " (the machine-wide folder needs root; --user installs for you alone)"
            }
        )
    })?;
    let data = args.data_dir()?;
    std::fs::create_dir_all(&data).ok();
    if args.manager() == Manager::Launchd {
        std::fs::create_dir_all(args.log_dir()?).ok();
    }
    println!("wrote {}", target.display());
    let cmds = commands(&args, &target, true);
    if args.now {
        run_all(&cmds)?;
        println!("clusteragent is running and will start at boot");
    } else {
        println!("load it now and at every boot with:");
        for c in &cmds {
            println!("  {}", c.join(" "));
        }
    }
    Ok(())
}

/// Runs `uninstall`.
pub fn uninstall(args: InstallArgs) -> Result<()> {
    let target = args.target()?;
    let cmds = commands(&args, &target, false);
    if args.now {
        // The service may already be stopped; removing the file is what matters.
        if let Err(e) = run_all(&cmds) {
            eprintln!("note: {e:#}");
        }
    } else {
        println!("stop it first with:");
        for c in &cmds {
            println!("  {}", c.join(" "));
        }
    }
    match std::fs::remove_file(&target) {
        Ok(()) => println!("removed {}", target.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("{} was not installed", target.display())
        }
        Err(e) => return Err(e).with_context(|| format!("removing {}", target.display())),
    }
    Ok(())
}

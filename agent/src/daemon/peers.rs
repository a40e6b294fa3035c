//! State exchange between agents. Every heartbeat (and at once after a local change) this
//! agent sends each peer its records and its report, and gets the peer's back; both sides keep
//! the higher version of each record. The same exchange propagates applies, lets an agent that
//! was away catch up, and is the heartbeat that decides Ready and NotReady.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cluster_api::cluster::{FileDigests, NodeReport, Record};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::agent::Agent;

/// Longest wait for one exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a peer to read a model's headers.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Body of `POST /internal/v1/sync`, both ways.
#[derive(Debug, Serialize, Deserialize)]
pub struct SyncBody {
    /// The sender's report (its name inside).
    pub report: NodeReport,
    /// Every record the sender holds, tombstones included.
    pub records: Vec<Record>,
    /// Every file digest entry the sender holds (absent from agents that predate them).
    #[serde(default)]
    pub digests: Vec<FileDigests>,
}

/// This agent's side of an exchange.
pub fn our_side(agent: &Agent) -> Result<SyncBody> {
    Ok(SyncBody {
        report: agent.report(),
        records: agent.store.all_records()?,
        digests: agent.store.all_file_digests()?,
    })
}

/// Takes a peer's side of an exchange.
pub fn take_theirs(agent: &Agent, body: SyncBody) -> Result<()> {
    if body.report.node == agent.name() {
        bail!(
            "a peer calls itself {:?}, this node's own name: two agents share a name",
            body.report.node
        );
    }
    agent.merge(body.records)?;
    // Only entries that name a model as apply would and a file inside its folder.
    let digests: Vec<FileDigests> = body
        .digests
        .into_iter()
        .filter(|d| {
            cluster_api::manifest::check_name(&d.model).is_ok()
                && !d.file.is_empty()
                && d.file
                    .split('/')
                    .all(|p| !p.is_empty() && p != "." && p != ".." && !p.contains('\\'))
        })
        .collect();
    agent.store.merge_file_digests(&digests)?;
    agent.peer_seen(body.report);
    Ok(())
}

fn exchange(agent: &Agent, http: &ureq::Agent, name: &str, address: &str) -> Result<()> {
    let ours = our_side(agent)?;
    let url = format!("http://{address}/internal/v1/sync");
    let mut response = http
        .post(&url)
        .header("Authorization", &format!("Bearer {}", agent.settings.token))
        .send_json(&ours)
        .with_context(|| format!("POST {url}"))?;
    let status = response.status().as_u16();
    if status != 200 {
        let text = response.body_mut().read_to_string().unwrap_or_default();
        bail!("POST {url}: HTTP {status}: {}", text.trim());
    }
    let theirs: SyncBody = response
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_json()
        .with_context(|| format!("POST {url}: unreadable answer"))?;
    if theirs.report.node != name {
        bail!(
            "{address} answered as node {:?}, not {name}: check the Node's address",
            theirs.report.node
        );
    }
    take_theirs(agent, theirs)
}

/// Asks the agent at `address` for the byte profile of a model it can read.
pub fn inspect_remote(
    agent: &Agent,
    address: &str,
    model: &cluster_api::manifest::ModelSpec,
) -> Result<cluster_api::cluster::ByteProfile> {
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(INSPECT_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://{address}/internal/v1/inspect-model");
    let mut response = http
        .post(&url)
        .header("Authorization", &format!("Bearer {}", agent.settings.token))
        .send_json(model)
        .with_context(|| format!("POST {url}"))?;
    if response.status().as_u16() != 200 {
        let body: serde_json::Value = response.body_mut().read_json().unwrap_or_default();
        bail!(
            "{}",
            body["error"]["message"]
                .as_str()
                .unwrap_or("refused without a message")
        );
    }
    Ok(response.body_mut().read_json()?)
}

/// Exchanges state with every peer each heartbeat, or at once when woken, until `stop`.
pub async fn heartbeat_loop(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(EXCHANGE_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    // Each peer's exchange runs on its own: one that does not answer (a partition drops its
    // packets, so each try waits out the timeout) must not hold up the heartbeats to the
    // others, who would otherwise take this node for gone. A peer whose last exchange is
    // still under way is skipped this round.
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        running.retain(|_, task| !task.is_finished());
        for (name, address) in agent.peer_addresses() {
            if running.contains_key(&name) {
                continue;
            }
            let agent = agent.clone();
            let http = http.clone();
            let peer = name.clone();
            running.insert(
                name,
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = exchange(&agent, &http, &peer, &address) {
                        agent.peer_failed(&peer, format!("{e:#}"));
                    }
                }),
            );
        }
        agent.check_readiness();
        tokio::select! {
            _ = tokio::time::sleep(agent.settings.heartbeat) => {}
            _ = agent.sync_now.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

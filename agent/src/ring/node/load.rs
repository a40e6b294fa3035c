//! Loading a stage's weights: fetching what this node's cache lacks, then reading its layers.

use super::*;

/// Fetches the bytes of stage `index`'s tensors that this node's cache lacks (peers first),
/// seals the files now held whole, and reports on `progress` what came from where.
fn fetch_weights(
    config: &RingConfig,
    index: usize,
    source: &cluster_api::manifest::ModelSource,
    folder: &ModelFolder,
    peers: &crate::fetch::Peers,
    progress: Option<&LoadProgress>,
) -> Result<()> {
    let range = config.stages[index].layers;
    let (first, last) = (index == 0, index + 1 == config.stages.len());
    let started = Instant::now();
    if let Some(p) = progress {
        p.fetching.store(true, Ordering::Relaxed);
    }
    let fetched = crate::fetch::fetch_stage(
        source,
        folder,
        range,
        first,
        last,
        peers,
        &mut |note| {
            tracing::warn!(stage = index, "{note}");
            if let Some(p) = progress {
                p.notes.lock().unwrap_or_else(|e| e.into_inner()).push(note);
            }
        },
        &mut |done, total| {
            if let Some(p) = progress {
                p.loaded.store(done, Ordering::Relaxed);
                p.total.store(total, Ordering::Relaxed);
            }
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{}: fetching layers {range}: {e}",
            config.describe_stage(index)
        )
    })?;
    tracing::info!(
        stage = index,
        layers = %range,
        source = %source.describe(),
        bytes = fetched.bytes,
        from_peers = fetched.peer_bytes,
        requests = fetched.requests,
        ms = started.elapsed().as_millis() as u64,
        "stage's weights fetched"
    );
    // Files now held whole are checked against the source's digest and get digests
    // of their own, so that peers may fetch from this node.
    let sealed = crate::fetch::seal(source, folder).map_err(anyhow::Error::msg)?;
    if !sealed.is_empty() {
        tracing::info!(
            stage = index,
            files = sealed.len(),
            "whole files sealed for peers"
        );
    }
    // Published through the store, so that the bytes this node serves its peers are checked
    // against digests that do not come with them (and the cluster knows them while this node
    // is away). Files sealed before a restart are published again if the store lacks them.
    let node = &config.stages[index].node;
    crate::fetch::publish_held(source, folder, peers, node).map_err(anyhow::Error::msg)?;
    if let Some(p) = progress {
        p.fetching.store(false, Ordering::Relaxed);
        p.fetched.store(fetched.bytes, Ordering::Relaxed);
        let peers: Vec<&str> = fetched.peers.iter().map(String::as_str).collect();
        let from = match fetched.bytes - fetched.peer_bytes {
            _ if fetched.peer_bytes == 0 => source.describe(),
            // Headers aside, which always come from the source.
            rest if rest <= fetched.bytes / 100 => format!(
                "peer {} (the headers from {})",
                peers.join(", "),
                source.describe()
            ),
            rest => format!(
                "peer {} ({}) and {} ({})",
                peers.join(", "),
                cluster_api::human_bytes(fetched.peer_bytes),
                source.describe(),
                cluster_api::human_bytes(rest)
            ),
        };
        *p.fetched_from.lock().unwrap_or_else(|e| e.into_inner()) = from;
    }
    Ok(())
}

pub(super) fn load_stage(
    config: &RingConfig,
    index: usize,
    peers: &crate::fetch::Peers,
    progress: Option<&LoadProgress>,
) -> Result<(ModelFolder, Stage)> {
    let range = config.stages[index].layers;
    let (first, last) = (index == 0, index + 1 == config.stages.len());
    // A fetched model's `model` is its place in this node's cache: its small files and headers
    // first, so that the split is checked before any weights are fetched.
    if let Some(source) = &config.fetch {
        crate::fetch::prepare(&config.model, source).map_err(anyhow::Error::msg)?;
    }
    let folder = ModelFolder::open(&config.model).with_context(|| match &config.fetch {
        Some(source) => format!("opening model {}", source.describe()),
        None => format!("opening model {}", config.model.display()),
    })?;
    config
        .validate(folder.config.num_hidden_layers)
        .map_err(anyhow::Error::msg)?;
    if let Some(source) = &config.fetch {
        fetch_weights(config, index, source, &folder, peers, progress)?;
    }
    let device = open_device(config.device)?;
    let dtype = choose_dtype(config.dtype, folder.config.dtype);
    let started = Instant::now();
    let stage = Stage::load(
        StageSpec {
            config: folder.config.clone(),
            weights: &folder.weights,
            range,
            first,
            last,
            device,
            dtype,
        },
        &mut |done, total| {
            if let Some(p) = progress {
                p.loaded.store(done, Ordering::Relaxed);
                p.total.store(total, Ordering::Relaxed);
            }
        },
    )
    .with_context(|| format!("{}: loading layers {range}", config.describe_stage(index)))?;
    tracing::info!(
        stage = index,
        layers = %range,
        weight_bytes = stage.weight_bytes(),
        ms = started.elapsed().as_millis() as u64,
        "stage loaded"
    );
    Ok((folder, stage))
}

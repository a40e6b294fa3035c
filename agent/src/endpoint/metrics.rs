//! An endpoint's Prometheus metrics: requests by route and status, prompt and generated tokens,
//! time-to-first-token and inter-token-latency histograms, cancellations; gauges of the
//! pipeline (sequences in flight, queue depth, per-stage compute, per-hop network) are added
//! when scraped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A label value as the text exposition format writes it: backslash, double quote and line
/// feed escaped, so no name a user chose can end a label or a line early.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Counters of one endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Streams whose client went away before the end.
    pub cancelled: AtomicU64,
    /// Time from admission to the first token.
    pub ttft: Histogram,
    /// Time between tokens of a sequence.
    pub itl: Histogram,
    /// Time from a sequence losing its replica to its next token from another.
    pub failover_gap: Histogram,
    /// Sequences moved to another replica.
    failovers: AtomicU64,
    /// Sequences started or resumed at each replica.
    routed: Mutex<BTreeMap<usize, u64>>,
}

/// One stage's figures, from its node's report.
#[derive(Debug, Clone, Default)]
pub struct StageGauge {
    /// Stage index.
    pub index: usize,
    /// Its node.
    pub node: String,
    /// Seconds in forward passes.
    pub compute_seconds: f64,
    /// Forward passes.
    pub forward_passes: u64,
    /// Sequences holding a cache on it.
    pub cached_sequences: usize,
    /// Bytes of weights it holds.
    pub memory_bytes: u64,
    /// Its recent forward passes' times.
    pub passes: cluster_api::cluster::PassStats,
}

/// Gauges read from the pipeline at scrape time.
#[derive(Debug, Default)]
pub struct PipelineGauges {
    /// Sequences admitted and not finished.
    pub in_flight: usize,
    /// Most sequences admitted at once.
    pub max_sequences: usize,
    /// Jobs waiting in stage 0's compute queue.
    pub queue_depth: usize,
    /// Per stage.
    pub stages: Vec<StageGauge>,
    /// Mean seconds per hop of the last probes around the ring (network and framing only).
    pub hop_seconds: Option<f64>,
    /// Whether the ring admits requests, where stage 0 runs here.
    pub serving: Option<bool>,
}

impl Metrics {
    /// Counts a sequence started or resumed at `replica`.
    pub fn routed(&self, replica: usize) {
        *self
            .routed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(replica)
            .or_insert(0) += 1;
    }

    /// Counts a sequence moved to another replica.
    pub fn failed_over(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a finished request.
    pub fn request(&self, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self, endpoint: &str, pipeline: &str, g: &PipelineGauges) -> String {
        let mut out = String::new();
        let l = format!(
            "endpoint=\"{}\",pipeline=\"{}\"",
            label(endpoint),
            label(pipeline)
        );
        let _ = writeln!(
            out,
            "# HELP clusteragent_requests_total Requests by route and HTTP status.\n# TYPE clusteragent_requests_total counter"
        );
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "clusteragent_requests_total{{{l},route=\"{}\",status=\"{status}\"}} {n}",
                label(route)
            );
        }
        let counters = [
            (
                "clusteragent_prompt_tokens_total",
                "Prompt tokens of admitted requests.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "clusteragent_generation_tokens_total",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "clusteragent_failovers_total",
                "Sequences that lost their replica and went on at another.",
                self.failovers.load(Ordering::Relaxed),
            ),
            (
                "clusteragent_requests_cancelled_total",
                "Streams whose client went away before the end; their sequences were cancelled around the ring.",
                self.cancelled.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{l}}} {v}"
            );
        }
        self.ttft.write(
            &mut out,
            "clusteragent_time_to_first_token_seconds",
            &l,
            "Time from admission to the first generated token.",
        );
        self.itl.write(
            &mut out,
            "clusteragent_inter_token_latency_seconds",
            &l,
            "Time between two tokens of a sequence.",
        );
        self.failover_gap.write(
            &mut out,
            "clusteragent_failover_gap_seconds",
            &l,
            "Time from a sequence losing its replica to its next token from another.",
        );
        let name = "clusteragent_replica_sequences_total";
        let _ = writeln!(
            out,
            "# HELP {name} Sequences started or resumed at each replica.\n# TYPE {name} counter"
        );
        for (replica, n) in self
            .routed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(out, "{name}{{{l},replica=\"{replica}\"}} {n}");
        }
        let gauges = [
            (
                "clusteragent_sequences_in_flight",
                "Sequences admitted and not finished.",
                g.in_flight as f64,
            ),
            (
                "clusteragent_max_sequences",
                "Sequences the pipeline admits at once.",
                g.max_sequences as f64,
            ),
            (
                "clusteragent_queue_depth",
                "Jobs waiting in stage 0's compute queue.",
                g.queue_depth as f64,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{l}}} {v}"
            );
        }
        type Series = (
            &'static str,
            &'static str,
            &'static str,
            fn(&StageGauge) -> f64,
        );
        let per_stage: [Series; 9] = [
            (
                "clusteragent_stage_compute_seconds_total",
                "counter",
                "Time each stage spent in forward passes.",
                |s| s.compute_seconds,
            ),
            (
                "clusteragent_stage_forward_passes_total",
                "counter",
                "Forward passes of each stage (a batched pass counts once).",
                |s| s.forward_passes as f64,
            ),
            (
                "clusteragent_stage_cached_sequences",
                "gauge",
                "Sequences holding a KV cache on each stage.",
                |s| s.cached_sequences as f64,
            ),
            (
                "clusteragent_stage_memory_bytes",
                "gauge",
                "Bytes of weights each stage holds.",
                |s| s.memory_bytes as f64,
            ),
            (
                "clusteragent_stage_last_pass_seconds",
                "gauge",
                "Time of each stage's latest forward pass.",
                |s| s.passes.last_seconds.unwrap_or(0.0),
            ),
            (
                "clusteragent_stage_mean_recent_pass_seconds",
                "gauge",
                "Mean time of each stage's recent forward passes (the last 32).",
                |s| s.passes.mean_recent_seconds.unwrap_or(0.0),
            ),
            (
                "clusteragent_stage_slowest_recent_pass_seconds",
                "gauge",
                "Time of each stage's slowest recent forward pass (of the last 32).",
                |s| s.passes.slowest_recent_seconds.unwrap_or(0.0),
            ),
            (
                "clusteragent_stage_running_pass_seconds",
                "gauge",
                "How long each stage's pass in progress has run (0 when idle).",
                |s| s.passes.running_seconds.unwrap_or(0.0),
            ),
            (
                "clusteragent_stage_stall_after_seconds",
                "gauge",
                "How long the pass in progress may run before the stage counts as stalled.",
                |s| s.passes.stall_after_seconds,
            ),
        ];
        for (name, kind, help, value) in per_stage {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for st in &g.stages {
                let _ = writeln!(
                    out,
                    "{name}{{{l},stage=\"{}\",node=\"{}\"}} {}",
                    st.index,
                    label(&st.node),
                    value(st)
                );
            }
        }
        if let Some(serving) = g.serving {
            let _ = writeln!(
                out,
                "# HELP clusteragent_ring_serving Whether the ring admits requests (every link live, no stage stalled, warmed up).\n# TYPE clusteragent_ring_serving gauge\nclusteragent_ring_serving{{{l}}} {}",
                u8::from(serving)
            );
        }
        if let Some(h) = g.hop_seconds {
            let _ = writeln!(
                out,
                "# HELP clusteragent_hop_network_seconds Mean time of one hop around the ring, from probes (network and framing, no compute).\n# TYPE clusteragent_hop_network_seconds gauge\nclusteragent_hop_network_seconds{{{l}}} {h}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.request("/v1/chat/completions", 200);
        m.request("/v1/chat/completions", 200);
        m.ttft.observe(Duration::from_millis(20));
        let text = m.render(
            "api",
            "p",
            &PipelineGauges {
                in_flight: 3,
                stages: vec![StageGauge {
                    index: 0,
                    node: "a".into(),
                    compute_seconds: 1.5,
                    forward_passes: 10,
                    cached_sequences: 2,
                    memory_bytes: 1024,
                    passes: cluster_api::cluster::PassStats {
                        last_seconds: Some(0.25),
                        ..Default::default()
                    },
                }],
                serving: Some(true),
                ..PipelineGauges::default()
            },
        );
        assert!(text.contains(
            "clusteragent_requests_total{endpoint=\"api\",pipeline=\"p\",route=\"/v1/chat/completions\",status=\"200\"} 2"
        ));
        assert!(text.contains("clusteragent_time_to_first_token_seconds_bucket{endpoint=\"api\",pipeline=\"p\",le=\"0.025\"} 1"));
        assert!(text.contains("clusteragent_time_to_first_token_seconds_bucket{endpoint=\"api\",pipeline=\"p\",le=\"0.01\"} 0"));
        assert!(
            text.contains("clusteragent_sequences_in_flight{endpoint=\"api\",pipeline=\"p\"} 3")
        );
        assert!(text.contains("clusteragent_stage_cached_sequences{endpoint=\"api\",pipeline=\"p\",stage=\"0\",node=\"a\"} 2"));
        assert!(text.contains("clusteragent_stage_memory_bytes{endpoint=\"api\",pipeline=\"p\",stage=\"0\",node=\"a\"} 1024"));
        assert!(text.contains("clusteragent_stage_last_pass_seconds{endpoint=\"api\",pipeline=\"p\",stage=\"0\",node=\"a\"} 0.25"));
        assert!(text.contains("clusteragent_ring_serving{endpoint=\"api\",pipeline=\"p\"} 1"));
    }

    #[test]
    fn label_values_are_escaped() {
        let text = Metrics::default().render("a\"b", "c\\d\ne", &PipelineGauges::default());
        assert!(
            text.contains(
                "clusteragent_prompt_tokens_total{endpoint=\"a\\\"b\",pipeline=\"c\\\\d\\ne\"} 0"
            ),
            "{text}"
        );
        // Every sample is one line: no value broke one.
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.starts_with("clusteragent_"))
        );
    }
}

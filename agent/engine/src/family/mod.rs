//! The model families, one file each: what a family's checkpoints are called (in `config.json`
//! and in GGUF), which tensors one decoder layer has under which names, and which of the
//! numerics its reference implementations use. Everything else (the config readers, both
//! loaders, the size estimates) reads this table, so adding a family is one file here plus its
//! line in [`FAMILIES`].
//!
//! Every family shares one decoder-layer shape: RMSNorm, attention with rotary positions and
//! grouped-query heads, RMSNorm, a gated SiLU MLP. What differs is naming, fused projections
//! (split into their parts at load time, so the forward pass never knows), optional biases and
//! norms, and the last-bit choices of the references.

mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

use crate::config::ModelConfig;

/// The model families the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `LlamaForCausalLM`: Llama 2, 3, 3.1, 3.2.
    Llama,
    /// `MistralForCausalLM`: Llama's layer with an optional sliding window.
    Mistral,
    /// `Qwen2ForCausalLM`: q/k/v biases.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head RMSNorm on q and k, an explicit `head_dim`.
    Qwen3,
    /// `Phi3ForCausalLM`: fused q/k/v and gate/up projections.
    Phi3,
}

/// Every family, in the order error messages list them.
pub const FAMILIES: [&FamilySpec; 5] = [
    &llama::SPEC,
    &mistral::SPEC,
    &qwen2::SPEC,
    &qwen3::SPEC,
    &phi3::SPEC,
];

/// One family's entry in the table.
#[derive(Debug)]
pub struct FamilySpec {
    /// The family.
    pub family: Family,
    /// `architectures[0]` in `config.json`.
    pub hf_architecture: &'static str,
    /// `general.architecture` in GGUF files; `None` where the family's files say another's
    /// (llama.cpp writes Mistral models as `llama`).
    pub gguf_architecture: Option<&'static str>,
    /// The tensors of one decoder layer. Biases and q/k norms are read only where the config
    /// (or, in GGUF, the file) has them.
    pub layer: &'static [TensorRule],
    /// Whether q, k and v have biases.
    pub qkv_bias: Bias,
    /// Whether the output projection has a bias.
    pub o_bias: Bias,
    /// Whether queries and keys are RMS-normalised per head before RoPE.
    pub qk_norm: bool,
    /// How `config.json` speaks of a sliding attention window.
    pub window: Window,
    /// Numerics of the family's reference for safetensors checkpoints.
    pub hf_numerics: Numerics,
    /// Numerics of the family's reference for GGUF files.
    pub gguf_numerics: Numerics,
    /// llama.cpp's converter permutes q and k rows so that rotary pairs are adjacent.
    pub gguf_rope_interleaved: bool,
}

impl FamilySpec {
    /// The layer's rule for `part`, if the family stores that tensor.
    pub fn rule(&self, part: Part) -> Option<&'static TensorRule> {
        self.layer.iter().find(|r| r.part == part)
    }
}

/// Where a projection's bias comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    /// Always there, whatever the config says (Qwen2's q, k and v).
    Always,
    /// Never there.
    Never,
    /// As `attention_bias` says (default false).
    AttentionBias,
}

/// How a family's `config.json` speaks of a sliding attention window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Not a field of the family.
    None,
    /// `sliding_window` (null or absent: none) applies to every layer.
    EveryLayer,
    /// `sliding_window` applies only with `use_sliding_window: true`, which is refused:
    /// Qwen's per-layer windows are not implemented.
    QwenSwitch,
}

/// The last-bit choices of a family's reference implementation. In f32 any order agrees within
/// 1e-5; quantized products round their input to 8 bits, which turns a one-ulp difference into a
/// visible one, so each family follows its reference (see docs/decisions.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numerics {
    /// Rope frequencies take the power in f32 (otherwise in f64, then divide in f32).
    pub rope_power_in_f32: bool,
    /// Attention scores are divided by √d (otherwise multiplied by 1/√d).
    pub divide_scores: bool,
    /// Quantized stages on the CPU attend through candle's flash-attention kernel.
    pub quantized_flash_attention: bool,
}

/// Llama's references: the power in f32, scores divided.
pub(crate) const LLAMA_NUMERICS: Numerics = Numerics {
    rope_power_in_f32: true,
    divide_scores: true,
    quantized_flash_attention: false,
};

/// Qwen's and Mistral's references: the power in f64, scores multiplied.
pub(crate) const QWEN_NUMERICS: Numerics = Numerics {
    rope_power_in_f32: false,
    divide_scores: false,
    quantized_flash_attention: false,
};

/// A logical tensor of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The norm before attention.
    AttnNorm,
    /// The norm before the MLP.
    MlpNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Query, key and value projections in one matrix, rows in that order.
    Qkv,
    /// Output projection.
    O,
    /// Query bias.
    QBias,
    /// Key bias.
    KBias,
    /// Value bias.
    VBias,
    /// Output bias.
    OBias,
    /// Per-head query norm.
    QNorm,
    /// Per-head key norm.
    KNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// Gate and up projections in one matrix, the gate's rows first.
    GateUp,
    /// MLP down projection.
    Down,
    /// Gate bias.
    GateBias,
    /// Up bias.
    UpBias,
    /// Down bias.
    DownBias,
}

impl Part {
    /// The tensor's shape (rows first, as both formats' readers give it) under `cfg`.
    pub fn shape(self, cfg: &ModelConfig) -> Vec<usize> {
        let (h, m, q, kv) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_width(),
            cfg.kv_width(),
        );
        match self {
            Self::AttnNorm | Self::MlpNorm | Self::OBias | Self::DownBias => vec![h],
            Self::Q => vec![q, h],
            Self::K | Self::V => vec![kv, h],
            Self::Qkv => vec![q + 2 * kv, h],
            Self::O => vec![h, q],
            Self::QBias => vec![q],
            Self::KBias | Self::VBias => vec![kv],
            Self::QNorm | Self::KNorm => vec![cfg.head_dim],
            Self::Gate | Self::Up => vec![m, h],
            Self::GateUp => vec![2 * m, h],
            Self::Down => vec![h, m],
            Self::GateBias | Self::UpBias => vec![m],
        }
    }

    /// Whether a model with `cfg` has this tensor.
    pub fn present(self, cfg: &ModelConfig) -> bool {
        match self {
            Self::QBias | Self::KBias | Self::VBias => cfg.qkv_bias,
            Self::OBias => cfg.o_bias,
            Self::GateBias | Self::UpBias | Self::DownBias => cfg.mlp_bias,
            Self::QNorm | Self::KNorm => cfg.qk_norm,
            _ => true,
        }
    }
}

/// One tensor of a decoder layer: its part and its names in each format, after the layer's
/// prefix (`model.layers.{i}.`, `blk.{i}.`).
#[derive(Debug, Clone, Copy)]
pub struct TensorRule {
    /// What the tensor is.
    pub part: Part,
    /// Name in safetensors checkpoints.
    pub hf: &'static str,
    /// Name in GGUF files.
    pub gguf: &'static str,
}

const fn rule(part: Part, hf: &'static str, gguf: &'static str) -> TensorRule {
    TensorRule { part, hf, gguf }
}

// The names most families share, written once.
pub(crate) const ATTN_NORM: TensorRule =
    rule(Part::AttnNorm, "input_layernorm.weight", "attn_norm.weight");
pub(crate) const MLP_NORM: TensorRule = rule(
    Part::MlpNorm,
    "post_attention_layernorm.weight",
    "ffn_norm.weight",
);
pub(crate) const Q: TensorRule = rule(Part::Q, "self_attn.q_proj.weight", "attn_q.weight");
pub(crate) const K: TensorRule = rule(Part::K, "self_attn.k_proj.weight", "attn_k.weight");
pub(crate) const V: TensorRule = rule(Part::V, "self_attn.v_proj.weight", "attn_v.weight");
pub(crate) const O: TensorRule = rule(Part::O, "self_attn.o_proj.weight", "attn_output.weight");
pub(crate) const Q_BIAS: TensorRule = rule(Part::QBias, "self_attn.q_proj.bias", "attn_q.bias");
pub(crate) const K_BIAS: TensorRule = rule(Part::KBias, "self_attn.k_proj.bias", "attn_k.bias");
pub(crate) const V_BIAS: TensorRule = rule(Part::VBias, "self_attn.v_proj.bias", "attn_v.bias");
pub(crate) const O_BIAS: TensorRule =
    rule(Part::OBias, "self_attn.o_proj.bias", "attn_output.bias");
pub(crate) const GATE: TensorRule = rule(Part::Gate, "mlp.gate_proj.weight", "ffn_gate.weight");
pub(crate) const UP: TensorRule = rule(Part::Up, "mlp.up_proj.weight", "ffn_up.weight");
pub(crate) const DOWN: TensorRule = rule(Part::Down, "mlp.down_proj.weight", "ffn_down.weight");
pub(crate) const GATE_BIAS: TensorRule =
    rule(Part::GateBias, "mlp.gate_proj.bias", "ffn_gate.bias");
pub(crate) const UP_BIAS: TensorRule = rule(Part::UpBias, "mlp.up_proj.bias", "ffn_up.bias");
pub(crate) const DOWN_BIAS: TensorRule =
    rule(Part::DownBias, "mlp.down_proj.bias", "ffn_down.bias");

/// The tensors outside the layers, which every family names alike.
const EMBED: (&str, &str) = ("model.embed_tokens.weight", "token_embd.weight");
const FINAL_NORM: (&str, &str) = ("model.norm.weight", "output_norm.weight");
const LM_HEAD: (&str, &str) = ("lm_head.weight", "output.weight");

/// The two checkpoint formats, which name the same tensors differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Hugging Face safetensors.
    Safetensors,
    /// llama.cpp's GGUF.
    Gguf,
}

impl Format {
    fn pick(self, names: (&'static str, &'static str)) -> &'static str {
        match self {
            Self::Safetensors => names.0,
            Self::Gguf => names.1,
        }
    }

    /// The prefix of layer `i`'s tensor names.
    pub fn layer_prefix(self, i: usize) -> String {
        match self {
            Self::Safetensors => format!("model.layers.{i}"),
            Self::Gguf => format!("blk.{i}"),
        }
    }

    /// The name of the embedding.
    pub fn embed(self) -> &'static str {
        self.pick(EMBED)
    }

    /// The name of the norm before the LM head.
    pub fn final_norm(self) -> &'static str {
        self.pick(FINAL_NORM)
    }

    /// The name of an untied LM head.
    pub fn lm_head(self) -> &'static str {
        self.pick(LM_HEAD)
    }

    /// A rule's name in this format.
    pub fn name(self, rule: &TensorRule) -> &'static str {
        self.pick((rule.hf, rule.gguf))
    }
}

impl Family {
    /// The family's entry in the table.
    pub fn spec(self) -> &'static FamilySpec {
        match FAMILIES.iter().find(|s| s.family == self) {
            Some(spec) => spec,
            // Each variant has its file; the test below holds the table to that.
            None => unreachable!("{self:?} has no entry in FAMILIES"),
        }
    }

    /// The family named by `architectures[0]` in `config.json`.
    pub fn from_hf_architecture(name: &str) -> Option<Self> {
        FAMILIES
            .iter()
            .find(|s| s.hf_architecture == name)
            .map(|s| s.family)
    }

    /// The family of a GGUF file's `general.architecture`.
    pub fn from_gguf_architecture(name: &str) -> Option<Self> {
        FAMILIES
            .iter()
            .find(|s| s.gguf_architecture == Some(name))
            .map(|s| s.family)
    }

    /// The architecture name as Hugging Face writes it.
    pub fn architecture(self) -> &'static str {
        self.spec().hf_architecture
    }
}

/// The architectures `config.json` may name.
pub fn hf_architectures() -> Vec<&'static str> {
    FAMILIES.iter().map(|s| s.hf_architecture).collect()
}

/// The architectures a GGUF file may name.
pub fn gguf_architectures() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .filter_map(|s| s.gguf_architecture)
        .collect()
}

/// Names and shapes of the tensors a stage of `cfg`'s model reads in `format`: the embedding
/// when it is first (or its tied head needs it), its layers' tensors, and the final norm and an
/// untied head when it is last.
pub fn stage_tensors(
    cfg: &ModelConfig,
    format: Format,
    layers: impl Iterator<Item = usize>,
    first: bool,
    last: bool,
) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mut list = Vec::new();
    if first || (last && cfg.tie_word_embeddings) {
        list.push((format.embed().to_string(), vec![cfg.vocab_size, h]));
    }
    let rules = cfg.family.spec().layer;
    for i in layers {
        let prefix = format.layer_prefix(i);
        for r in rules.iter().filter(|r| r.part.present(cfg)) {
            list.push((format!("{prefix}.{}", format.name(r)), r.part.shape(cfg)));
        }
    }
    if last {
        list.push((format.final_norm().to_string(), vec![h]));
        if !cfg.tie_word_embeddings {
            list.push((format.lm_head().to_string(), vec![cfg.vocab_size, h]));
        }
    }
    list
}

/// The names of one layer's tensors in one format.
pub(crate) struct LayerNames {
    prefix: String,
    format: Format,
    spec: &'static FamilySpec,
}

impl LayerNames {
    pub(crate) fn new(cfg: &ModelConfig, format: Format, layer: usize) -> Self {
        Self {
            prefix: format.layer_prefix(layer),
            format,
            spec: cfg.family.spec(),
        }
    }

    /// The full name of `part` in this layer, if the family has it.
    pub(crate) fn get(&self, part: Part) -> Option<String> {
        self.spec
            .rule(part)
            .map(|r| format!("{}.{}", self.prefix, self.format.name(r)))
    }

    /// Whether the family stores `part` as one tensor.
    pub(crate) fn has(&self, part: Part) -> bool {
        self.spec.rule(part).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_one_entry_and_distinct_names() {
        for f in [
            Family::Llama,
            Family::Mistral,
            Family::Qwen2,
            Family::Qwen3,
            Family::Phi3,
        ] {
            assert_eq!(
                FAMILIES.iter().filter(|s| s.family == f).count(),
                1,
                "{f:?}"
            );
            assert_eq!(Family::from_hf_architecture(f.architecture()), Some(f));
        }
        let hf = hf_architectures();
        let gguf = gguf_architectures();
        for list in [&hf, &gguf] {
            let mut sorted = list.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), list.len(), "{list:?}");
        }
    }

    #[test]
    fn each_layer_names_every_part_it_needs_once() {
        use Part::*;
        for spec in FAMILIES {
            let has = |p: Part| spec.layer.iter().filter(|r| r.part == p).count();
            for p in [AttnNorm, MlpNorm, O, Down] {
                assert_eq!(has(p), 1, "{:?} {p:?}", spec.family);
            }
            // Either the three projections or the fused one, never both.
            assert_eq!(
                has(Qkv) + has(Q).min(has(K)).min(has(V)),
                1,
                "{:?}",
                spec.family
            );
            assert_eq!(has(GateUp) + has(Gate).min(has(Up)), 1, "{:?}", spec.family);
            assert_eq!(has(QNorm) == 1, spec.qk_norm, "{:?}", spec.family);
            for r in spec.layer {
                assert_eq!(
                    spec.layer
                        .iter()
                        .filter(|o| o.hf == r.hf || o.gguf == r.gguf)
                        .count(),
                    1,
                    "{:?}: {r:?} named twice",
                    spec.family
                );
            }
        }
    }
}

//! Qwen3 (`Qwen3ForCausalLM`, GGUF `qwen3`): per-head RMSNorm on q and k, an explicit
//! `head_dim`.

use super::{
    ATTN_NORM, Bias, DOWN, Family, FamilySpec, GATE, K, K_BIAS, MLP_NORM, Numerics, O, O_BIAS,
    Part, Q, Q_BIAS, QWEN_NUMERICS, TensorRule, UP, V, V_BIAS, Window,
};

const Q_NORM: TensorRule = TensorRule {
    part: Part::QNorm,
    hf: "self_attn.q_norm.weight",
    gguf: "attn_q_norm.weight",
};
const K_NORM: TensorRule = TensorRule {
    part: Part::KNorm,
    hf: "self_attn.k_norm.weight",
    gguf: "attn_k_norm.weight",
};

pub(super) const SPEC: FamilySpec = FamilySpec {
    family: Family::Qwen3,
    hf_architecture: "Qwen3ForCausalLM",
    gguf_architecture: Some("qwen3"),
    layer: &[
        ATTN_NORM, MLP_NORM, Q, K, V, O, Q_BIAS, K_BIAS, V_BIAS, O_BIAS, Q_NORM, K_NORM, GATE, UP,
        DOWN,
    ],
    qkv_bias: Bias::AttentionBias,
    o_bias: Bias::AttentionBias,
    qk_norm: true,
    window: Window::QwenSwitch,
    hf_numerics: QWEN_NUMERICS,
    // candle-transformers' quantized Qwen3 attends through its flash kernel on the CPU.
    gguf_numerics: Numerics {
        quantized_flash_attention: true,
        ..QWEN_NUMERICS
    },
    gguf_rope_interleaved: false,
};

//! Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`, GGUF `qwen2`): biases on q, k and v, always.

use super::{
    ATTN_NORM, Bias, DOWN, Family, FamilySpec, GATE, K, K_BIAS, MLP_NORM, O, Q, Q_BIAS,
    QWEN_NUMERICS, UP, V, V_BIAS, Window,
};

pub(super) const SPEC: FamilySpec = FamilySpec {
    family: Family::Qwen2,
    hf_architecture: "Qwen2ForCausalLM",
    gguf_architecture: Some("qwen2"),
    layer: &[
        ATTN_NORM, MLP_NORM, Q, K, V, O, Q_BIAS, K_BIAS, V_BIAS, GATE, UP, DOWN,
    ],
    // The config does not say: every Qwen2 checkpoint has them, and never one on o_proj.
    qkv_bias: Bias::Always,
    o_bias: Bias::Never,
    qk_norm: false,
    window: Window::QwenSwitch,
    hf_numerics: QWEN_NUMERICS,
    gguf_numerics: QWEN_NUMERICS,
    gguf_rope_interleaved: false,
};

//! Llama 2, 3, 3.1 and 3.2 (`LlamaForCausalLM`, GGUF `llama`).

use super::{
    ATTN_NORM, Bias, DOWN, DOWN_BIAS, Family, FamilySpec, GATE, GATE_BIAS, K, K_BIAS,
    LLAMA_NUMERICS, MLP_NORM, O, O_BIAS, Q, Q_BIAS, UP, UP_BIAS, V, V_BIAS, Window,
};

pub(super) const SPEC: FamilySpec = FamilySpec {
    family: Family::Llama,
    hf_architecture: "LlamaForCausalLM",
    gguf_architecture: Some("llama"),
    layer: &[
        ATTN_NORM, MLP_NORM, Q, K, V, O, Q_BIAS, K_BIAS, V_BIAS, O_BIAS, GATE, UP, DOWN, GATE_BIAS,
        UP_BIAS, DOWN_BIAS,
    ],
    qkv_bias: Bias::AttentionBias,
    o_bias: Bias::AttentionBias,
    qk_norm: false,
    window: Window::None,
    hf_numerics: LLAMA_NUMERICS,
    gguf_numerics: LLAMA_NUMERICS,
    gguf_rope_interleaved: true,
};

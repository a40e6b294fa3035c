//! Mistral (`MistralForCausalLM`): Llama's layer with an optional sliding window. llama.cpp
//! writes its GGUF files as `llama`, so they load as Llama.

use super::{
    ATTN_NORM, Bias, DOWN, Family, FamilySpec, GATE, K, K_BIAS, MLP_NORM, O, O_BIAS, Q, Q_BIAS,
    QWEN_NUMERICS, UP, V, V_BIAS, Window,
};

pub(super) const SPEC: FamilySpec = FamilySpec {
    family: Family::Mistral,
    hf_architecture: "MistralForCausalLM",
    gguf_architecture: None,
    layer: &[
        ATTN_NORM, MLP_NORM, Q, K, V, O, Q_BIAS, K_BIAS, V_BIAS, O_BIAS, GATE, UP, DOWN,
    ],
    qkv_bias: Bias::AttentionBias,
    o_bias: Bias::AttentionBias,
    qk_norm: false,
    window: Window::EveryLayer,
    hf_numerics: QWEN_NUMERICS,
    gguf_numerics: QWEN_NUMERICS,
    gguf_rope_interleaved: false,
};

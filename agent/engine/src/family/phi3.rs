//! Phi-3 and Phi-3.5 (`Phi3ForCausalLM`, GGUF `phi3`): q, k and v in one matrix, gate and up in
//! another (in GGUF under `ffn_up`), split into their parts at load time. Long-context
//! checkpoints (`longrope` scaling, GGUF `rope_factors_*` tensors) are refused by the config
//! readers.

use super::{
    ATTN_NORM, Bias, DOWN, Family, FamilySpec, LLAMA_NUMERICS, MLP_NORM, O, Part, QWEN_NUMERICS,
    TensorRule, Window,
};

const QKV: TensorRule = TensorRule {
    part: Part::Qkv,
    hf: "self_attn.qkv_proj.weight",
    gguf: "attn_qkv.weight",
};
const GATE_UP: TensorRule = TensorRule {
    part: Part::GateUp,
    hf: "mlp.gate_up_proj.weight",
    gguf: "ffn_up.weight",
};

pub(super) const SPEC: FamilySpec = FamilySpec {
    family: Family::Phi3,
    hf_architecture: "Phi3ForCausalLM",
    gguf_architecture: Some("phi3"),
    layer: &[ATTN_NORM, MLP_NORM, QKV, O, GATE_UP, DOWN],
    qkv_bias: Bias::Never,
    o_bias: Bias::Never,
    qk_norm: false,
    window: Window::EveryLayer,
    // candle-transformers' Phi-3 multiplies scores and takes the power in f64; its quantized
    // Phi-3 divides and takes it in f32, as Llama's do.
    hf_numerics: QWEN_NUMERICS,
    gguf_numerics: LLAMA_NUMERICS,
    gguf_rope_interleaved: false,
};

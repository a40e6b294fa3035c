use super::*;

fn parse(json: &str) -> Result<ModelConfig> {
    let v: Value = serde_json::from_str(json).unwrap();
    ModelConfig::from_json(Path::new("m/config.json"), v.as_object().unwrap())
}

const QWEN3_1_7B: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "bos_token_id": 151643,
  "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
  "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 28,
  "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
  "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": null,
  "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 151936 }"#;

#[test]
fn reads_qwen3_as_published() {
    let c = parse(QWEN3_1_7B).unwrap();
    assert_eq!(c.family, Family::Qwen3);
    assert_eq!((c.head_dim, c.q_width(), c.kv_width()), (128, 2048, 1024));
    assert!(c.tie_word_embeddings && c.qk_norm && !c.qkv_bias);
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.dtype, Some(WeightDType::Bf16));
    assert_eq!(c.eos_token_ids, vec![151645]);
}

#[test]
fn reads_llama31_rope_scaling_from_transformers_4_and_5() {
    let v4 = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
      "num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":2,"vocab_size":100,
      "max_position_embeddings":128,"rms_norm_eps":1e-5,"rope_theta":500000.0,
      "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
      "original_max_position_embeddings":8192,"rope_type":"llama3"},
      "eos_token_id":[128001,128008,128009],"torch_dtype":"bfloat16"}"#;
    let v5 = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
      "num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":2,"vocab_size":100,
      "max_position_embeddings":128,"rms_norm_eps":1e-5,
      "rope_parameters":{"rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,
      "high_freq_factor":4.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},
      "eos_token_id":[128001,128008,128009],"dtype":"bfloat16"}"#;
    let a = parse(v4).unwrap();
    let b = parse(v5).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.rope_theta, 500000.0);
    assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    assert_eq!(a.eos_token_ids, vec![128001, 128008, 128009]);
}

const PHI3_MINI_4K: &str = r#"{
  "architectures": ["Phi3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu",
  "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
  "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
  "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": null,
  "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": true,
  "vocab_size": 32064 }"#;

#[test]
fn reads_phi3_as_published_and_refuses_its_long_context_variant_by_name() {
    let c = parse(PHI3_MINI_4K).unwrap();
    assert_eq!(c.family, Family::Phi3);
    assert_eq!((c.head_dim, c.q_width(), c.kv_width()), (96, 3072, 3072));
    assert_eq!(c.sliding_window, Some(2047));
    assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.o_bias && !c.qk_norm);
    assert_eq!(c.numerics, Family::Phi3.spec().hf_numerics);
    // Phi-3-mini's config with one field set otherwise: refused, naming the field.
    let refused = |field: &str, value: Value| {
        let mut v: Value = serde_json::from_str(PHI3_MINI_4K).unwrap();
        v[field] = value;
        parse(&v.to_string()).unwrap_err().to_string()
    };
    // Phi-3.5-mini's 128k context scales rope by `longrope`, which is not implemented.
    let err = refused(
        "rope_scaling",
        serde_json::json!({"type": "longrope", "long_factor": [1.0, 1.1], "short_factor": [1.0, 1.0]}),
    );
    assert!(
        err.contains("rope_scaling") && err.contains("\"longrope\""),
        "{err}"
    );
    // Phi-4-mini rotates three quarters of each head.
    let err = refused("partial_rotary_factor", serde_json::json!(0.75));
    assert!(
        err.contains("`partial_rotary_factor`") && err.contains("0.75"),
        "{err}"
    );
    let err = refused("attention_bias", serde_json::json!(true));
    assert!(
        err.contains("`attention_bias`") && err.contains("Phi3ForCausalLM"),
        "{err}"
    );
}

#[test]
fn names_the_unsupported_architecture_and_lists_ours() {
    let err = parse(r#"{"architectures":["GPT2LMHeadModel"]}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"GPT2LMHeadModel\""), "{err}");
    assert!(
        err.contains("Qwen3ForCausalLM") && err.contains("LlamaForCausalLM"),
        "{err}"
    );
}

#[test]
fn names_missing_and_mistyped_fields() {
    let err = parse(r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":"big"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("m/config.json: field `hidden_size`"), "{err}");
    assert!(err.contains("\"big\""), "{err}");
    let err = parse(
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"num_attention_heads":4,
        "intermediate_size":8,"vocab_size":9,"num_hidden_layers":1,"max_position_embeddings":9,
        "rope_scaling":{"rope_type":"yarn","factor":4.0}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rope_scaling.rope_type") && err.contains("\"yarn\""),
        "{err}"
    );
}

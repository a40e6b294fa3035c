//! `clusteragent make-model`: writes a random-weight model folder in the real formats.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use cluster_fixtures::{Arch, TinyModel};

/// The architectures the fixtures write, listed in `--help` and in the error for another.
fn arch_parser() -> impl TypedValueParser<Value = Arch> {
    PossibleValuesParser::new(Arch::ALL.map(|a| a.names().1)).try_map(|s| s.parse::<Arch>())
}

/// Flags of `clusteragent make-model`.
#[derive(Debug, Args)]
pub struct MakeModelArgs {
    /// Folder to write (created; must be empty or absent).
    #[arg(long)]
    pub out: PathBuf,
    /// Architecture (its `model_type`).
    #[arg(long, default_value = "qwen3", value_parser = arch_parser())]
    pub arch: Arch,
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Residual width.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// MLP width.
    #[arg(long, default_value_t = 128)]
    pub intermediate: usize,
    /// Query heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// Head width (Qwen3 only; the others use hidden / heads).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Tokens of the trained BPE tokenizer.
    #[arg(long, default_value_t = 384)]
    pub vocab: usize,
    /// Number of safetensors shards (more than one writes model.safetensors.index.json).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Store the weights in bf16.
    #[arg(long, conflicts_with = "f16")]
    pub bf16: bool,
    /// Store the weights in f16.
    #[arg(long)]
    pub f16: bool,
    /// Context length (`max_position_embeddings`).
    #[arg(long, default_value_t = 4096)]
    pub max_position: usize,
    /// Copy `tokenizer.json` and `tokenizer_config.json` from this folder (a real model's, such
    /// as `../shared/data/qwen-tokenizer`) instead of training a tokenizer; `--vocab` is then
    /// ignored.
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    /// Rows of the embedding (`vocab_size`), at least the tokenizer's vocabulary: real
    /// checkpoints pad it (Qwen3's 151,669 tokens sit in 151,936 rows). Default: the tokenizer's
    /// vocabulary plus 16.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write the model as `model.gguf`, its matrices in one GGUF type: f32, f16, bf16, q4_0,
    /// q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k or q6_k.
    #[arg(long)]
    pub gguf: Option<String>,
}

/// Runs `clusteragent make-model`.
pub fn run(args: MakeModelArgs) -> Result<()> {
    if args.out.exists()
        && std::fs::read_dir(&args.out)
            .with_context(|| format!("reading {}", args.out.display()))?
            .next()
            .is_some()
    {
        bail!("{} is not empty; choose a new folder", args.out.display());
    }
    if args.layers == 0
        || args.heads == 0
        || args.kv_heads == 0
        || !args.heads.is_multiple_of(args.kv_heads)
    {
        bail!(
            "--layers, --heads and --kv-heads must be positive and --kv-heads ({}) must divide --heads ({})",
            args.kv_heads,
            args.heads
        );
    }
    let base = TinyModel::of(args.arch);
    let model = TinyModel {
        hidden: args.hidden,
        intermediate: args.intermediate,
        layers: args.layers,
        heads: args.heads,
        kv_heads: args.kv_heads,
        head_dim: args.head_dim.unwrap_or(args.hidden / args.heads),
        tokenizer_vocab: args.vocab,
        shards: args.shards,
        bf16: args.bf16,
        f16: args.f16,
        seed: args.seed,
        max_position: args.max_position,
        tokenizer_from: args.tokenizer_from.clone(),
        vocab_rows: args.vocab_size,
        ..base
    };
    if model.arch != Arch::Qwen3 && !args.hidden.is_multiple_of(args.heads) {
        bail!(
            "--hidden ({}) must be a multiple of --heads ({})",
            args.hidden,
            args.heads
        );
    }
    match &args.gguf {
        None => model
            .write(&args.out)
            .with_context(|| format!("writing model to {}", args.out.display()))?,
        Some(kind) => {
            use cluster_engine::candle_core::quantized::GgmlDType;
            let dtype = match kind.to_ascii_lowercase().as_str() {
                "f32" => GgmlDType::F32,
                "f16" => GgmlDType::F16,
                "bf16" => GgmlDType::BF16,
                "q4_0" => GgmlDType::Q4_0,
                "q4_1" => GgmlDType::Q4_1,
                "q5_0" => GgmlDType::Q5_0,
                "q5_1" => GgmlDType::Q5_1,
                "q8_0" => GgmlDType::Q8_0,
                "q2_k" => GgmlDType::Q2K,
                "q3_k" => GgmlDType::Q3K,
                "q4_k" => GgmlDType::Q4K,
                "q5_k" => GgmlDType::Q5K,
                "q6_k" => GgmlDType::Q6K,
                other => bail!(
                    "--gguf {other:?}: expected one of f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, \
                     q8_0, q2_k, q3_k, q4_k, q5_k, q6_k"
                ),
            };
            let path = model
                .write_gguf(&args.out, dtype)
                .with_context(|| format!("writing model to {}", args.out.display()))?;
            println!("wrote {}", path.display());
        }
    }
    let bytes: u64 = std::fs::read_dir(&args.out)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "wrote {:?} model with {} layers ({:.1} MB of weights) to {}",
        args.arch,
        args.layers,
        bytes as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}

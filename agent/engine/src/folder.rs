//! A model folder as people download it from Hugging Face: `config.json`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json` when present, and the weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::chat::ChatTemplate;
use crate::config::{ModelConfig, read_json_object, read_token_ids};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::TextTokenizer;
use crate::weights::{WeightFiles, Weights};

/// What `tokenizer_config.json` (or `chat_template.jinja`) says about chats and special tokens.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// Text of the begin-of-sequence token, for templates that print it.
    pub bos_token: Option<String>,
    /// Text of the end-of-sequence token.
    pub eos_token: Option<String>,
}

/// A model folder, opened and checked: config, tokenizer, chat template, weights index.
pub struct ModelFolder {
    /// The folder.
    pub dir: PathBuf,
    /// Parsed `config.json`.
    pub config: Arc<ModelConfig>,
    /// Where each tensor lives.
    pub weights: Weights,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// Special tokens and chat template.
    pub tokenizer_config: TokenizerConfig,
    /// The compiled chat template, when the model has one.
    pub chat_template: Option<ChatTemplate>,
    /// Every id that ends a generation: from config.json, generation_config.json and the
    /// tokenizer's EOS token.
    pub eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for ModelFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFolder")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish_non_exhaustive()
    }
}

/// A special token written as a string or as an added-token object `{"content": ...}`.
fn token_text(obj: &Map<String, Value>, key: &str) -> Option<String> {
    match obj.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Every id that ends a generation: those the config files name, and the tokenizer config's EOS
/// token, deduplicated.
fn eos_ids(
    named: &[u32],
    tokenizer_config: &TokenizerConfig,
    tokenizer: &TextTokenizer,
) -> Vec<u32> {
    let mut ids = named.to_vec();
    if let Some(eos) = &tokenizer_config.eos_token
        && let Some(id) = tokenizer.token_id(eos)
    {
        ids.push(id);
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl TokenizerConfig {
    /// Compiles the chat template, if there is one; errors name `source`, where it came from.
    fn compile(&self, source: &Path) -> Result<Option<ChatTemplate>> {
        let Some(src) = &self.chat_template else {
            return Ok(None);
        };
        ChatTemplate::new(
            src,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
        .map(Some)
        .map_err(|e| EngineError::Template(format!("{}: {e}", source.display())))
    }

    /// Reads `tokenizer_config.json` in `dir`, and `chat_template.jinja` when the config has no
    /// template (transformers 4.43+ saves it apart).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let mut cfg = TokenizerConfig::default();
        if path.is_file() {
            let obj = read_json_object(&path)?;
            cfg.bos_token = token_text(&obj, "bos_token");
            cfg.eos_token = token_text(&obj, "eos_token");
            cfg.chat_template = match obj.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the one named "default" serves plain chats.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                Some(other) => {
                    return Err(EngineError::config(
                        &path,
                        "chat_template",
                        format!("expected a string or a list of named templates, got {other}"),
                    ));
                }
            };
        }
        if cfg.chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                cfg.chat_template =
                    Some(std::fs::read_to_string(&jinja).map_err(|e| EngineError::io(&jinja, e))?);
            }
        }
        Ok(cfg)
    }
}

impl ModelFolder {
    /// A GGUF file: config and chat template from its metadata; `tokenizer.json` (and
    /// `tokenizer_config.json`, when present) from its folder.
    fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = file.config()?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        // A tokenizer.json beside the file wins (it is what the model's authors published);
        // otherwise the file's own metadata builds one.
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.is_file() {
            TextTokenizer::from_file(&tokenizer_path)?
        } else {
            file.tokenizer()?
        };
        let mut tokenizer_config = TokenizerConfig::read(&dir)?;
        if tokenizer_config.eos_token.is_none()
            && let Some(&eos) = config.eos_token_ids.first()
        {
            tokenizer_config.eos_token = file.token_text(eos as usize);
        }
        if tokenizer_config.bos_token.is_none()
            && let Some(bos) = config.bos_token_id
        {
            tokenizer_config.bos_token = file.token_text(bos as usize);
        }
        if let Some(template) = file.chat_template() {
            tokenizer_config.chat_template = Some(template);
        }
        let chat_template = tokenizer_config.compile(path)?;
        let eos_token_ids = eos_ids(&config.eos_token_ids, &tokenizer_config, &tokenizer);
        Ok(Self {
            dir,
            config: Arc::new(config),
            weights: Weights::Gguf(file),
            tokenizer,
            tokenizer_config,
            chat_template,
            eos_token_ids,
        })
    }

    /// Bytes of weights a stage holding `range` takes: in `dtype` (the checkpoint's when
    /// absent, f32 when the checkpoint does not say) for safetensors, as stored for GGUF.
    pub fn stage_bytes(
        &self,
        range: cluster_api::LayerRange,
        first: bool,
        last: bool,
        dtype: Option<cluster_api::WeightDType>,
    ) -> u64 {
        match &self.weights {
            crate::weights::Weights::Safetensors(_) => {
                let size = dtype
                    .or(self.config.dtype)
                    .map(|d| crate::device::dtype_of(d).size_in_bytes())
                    .unwrap_or(4) as u64;
                crate::Stage::tensor_list(&self.config, range, first, last)
                    .iter()
                    .map(|(_, shape)| shape.iter().product::<usize>() as u64 * size)
                    .sum()
            }
            crate::weights::Weights::Gguf(file) => {
                // As a GGUF stage on the CPU holds them: matrices as stored (in their block
                // format, F16 and BF16 in half precision; the embedding too, once even where it
                // is also the tied head), norms and biases in f32.
                let dense = |shape: &[usize]| shape.iter().product::<usize>() as u64 * 4;
                crate::Stage::gguf_tensor_list(&self.config, range, first, last)
                    .iter()
                    .map(|(name, shape)| {
                        if name.ends_with("norm.weight") || name.ends_with(".bias") {
                            dense(shape)
                        } else {
                            file.tensor_bytes(name)
                        }
                    })
                    .sum()
            }
        }
    }

    /// Where the weights of a stage holding `range` lie: (file, first byte, end byte) per
    /// tensor, from the headers alone. What a node must fetch before it loads that stage.
    pub fn stage_ranges(
        &self,
        range: cluster_api::LayerRange,
        first: bool,
        last: bool,
    ) -> Result<Vec<(PathBuf, u64, u64)>> {
        match &self.weights {
            Weights::Safetensors(files) => {
                let names: Vec<String> =
                    crate::Stage::tensor_list(&self.config, range, first, last)
                        .into_iter()
                        .map(|(n, _)| n)
                        .collect();
                files.ranges(&names)
            }
            Weights::Gguf(file) => crate::Stage::gguf_tensor_list(&self.config, range, first, last)
                .iter()
                .map(|(name, _)| {
                    file.tensor_range(name)
                        .map(|(a, b)| (file.path().to_path_buf(), a, b))
                        .ok_or_else(|| EngineError::MissingTensor {
                            name: name.clone(),
                            place: file.path().to_path_buf(),
                        })
                })
                .collect(),
        }
    }

    /// Every tensor of the model's weights files: (file, name, first byte, end byte).
    pub fn all_ranges(&self) -> Result<Vec<(PathBuf, String, u64, u64)>> {
        match &self.weights {
            Weights::Safetensors(files) => files.all_ranges(),
            Weights::Gguf(file) => Ok(file
                .all_ranges()
                .into_iter()
                .map(|(n, a, b)| (file.path().to_path_buf(), n, a, b))
                .collect()),
        }
    }

    /// How the weight bytes fall across layers, embedding and head (see [`Self::stage_bytes`]).
    pub fn byte_profile(
        &self,
        dtype: Option<cluster_api::WeightDType>,
    ) -> cluster_api::cluster::ByteProfile {
        let n = self.config.num_hidden_layers;
        let one = |i: usize| cluster_api::LayerRange { first: i, last: i };
        let per_layer: Vec<u64> = (0..n)
            .map(|i| self.stage_bytes(one(i), false, false, dtype))
            .collect();
        let first_layer = per_layer.first().copied().unwrap_or(0);
        cluster_api::cluster::ByteProfile {
            embed: self.stage_bytes(one(0), true, false, dtype) - first_layer,
            head: self.stage_bytes(one(0), false, true, dtype) - first_layer,
            // A stage holding the embedding and a tied head holds the table once.
            tied: self.config.tie_word_embeddings,
            per_layer,
            widths: cluster_api::cluster::ComputeWidths {
                hidden: self.config.hidden_size as u64,
                intermediate: self.config.intermediate_size as u64,
                q_width: self.config.q_width() as u64,
                kv_width: self.config.kv_width() as u64,
                heads: self.config.num_attention_heads as u64,
                vocab: self.config.vocab_size as u64,
                context: self.config.max_position_embeddings as u64,
                half: matches!(self.weights, crate::weights::Weights::Safetensors(_))
                    && matches!(
                        dtype.or(self.config.dtype),
                        Some(cluster_api::WeightDType::Bf16 | cluster_api::WeightDType::F16)
                    ),
            },
        }
    }

    /// Opens `dir`, reading everything but the weights themselves. `dir` may also name a `.gguf`
    /// file, with its `tokenizer.json` beside it.
    pub fn open(dir: &Path) -> Result<Self> {
        if dir
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Self::open_gguf(dir);
        }
        // Absent, unreadable (a loop of links, no permission) and not a folder are three
        // answers, not one "not found".
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::MissingFile {
                    path: dir.to_path_buf(),
                    what: "model folder".into(),
                });
            }
            Err(e) => return Err(EngineError::io(dir, e)),
            Ok(m) if !m.is_dir() => {
                return Err(EngineError::io(
                    dir,
                    std::io::Error::other(
                        "not a folder: give a model folder (config.json, tokenizer.json, *.safetensors) or a .gguf file",
                    ),
                ));
            }
            Ok(_) => {}
        }
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
        let tokenizer_config = TokenizerConfig::read(dir)?;
        let chat_template = tokenizer_config.compile(&dir.join("tokenizer_config.json"))?;
        let mut named = config.eos_token_ids.clone();
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let obj = read_json_object(&gen_path)?;
            named.extend(read_token_ids(&gen_path, &obj, "eos_token_id")?);
        }
        let eos_token_ids = eos_ids(&named, &tokenizer_config, &tokenizer);
        let weights = Weights::Safetensors(WeightFiles::open(dir)?);
        Ok(Self {
            dir: dir.to_path_buf(),
            config: Arc::new(config),
            weights,
            tokenizer,
            tokenizer_config,
            chat_template,
            eos_token_ids,
        })
    }
}

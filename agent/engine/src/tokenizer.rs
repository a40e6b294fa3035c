//! Tokenization with Hugging Face's `tokenizers`, and detokenization one token at a time that
//! never emits half a UTF-8 character.

use std::path::Path;

use crate::error::{EngineError, Result};

/// A model's tokenizer, loaded from its `tokenizer.json`.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::config::regular_file(path, "the model's tokenizer", 1 << 30)?;
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| EngineError::Tokenizer {
            context: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self { inner })
    }

    /// Wraps a tokenizer built in code (from a GGUF file's metadata, say).
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
    }

    /// Token ids of `text`; `special` adds what the tokenizer's post-processor adds (a BOS for
    /// Llama). Chat prompts rendered from a template carry their own BOS and pass `false`.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| EngineError::Tokenizer {
                context: "encode".into(),
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, skipping special tokens when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenizer {
                context: "decode".into(),
                message: e.to_string(),
            })
    }

    /// The id of a token given by its text, such as `<|im_end|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids the tokenizer can produce, added tokens included. Model vocabularies are
    /// often padded past it; ids beyond it have no text.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a stream of token ids into a stream of text pieces.
///
/// Decoding token by token breaks multi-byte characters (byte-level BPE splits them across
/// tokens) and loses the spaces some decoders add between tokens. We decode a short window of
/// recent tokens and emit only the text that the window adds beyond what was already emitted,
/// holding it back while it ends in an incomplete character (shown by the replacement char).
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    /// A decoder for one sequence's generated tokens.
    pub fn new(skip_special: bool) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special,
        }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Text still held back at the end of the sequence (an incomplete character, shown as the
    /// replacement character, rather than silently dropped).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(Some(full[prefix.len()..].to_string()))
        } else {
            Ok(None)
        }
    }
}

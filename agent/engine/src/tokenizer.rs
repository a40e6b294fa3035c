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

    /// [`TextTokenizer::encode`] for text that may be far longer than a model's context:
    /// `Ok(Err(n))` when it has more than `limit` tokens, `n` being a count past `limit`
    /// reached without tokenizing the rest. Tokenizing holds about a hundred bytes per token,
    /// so a prompt of megabytes, tokenized whole only to be refused, would cost an agent
    /// gigabytes. A token covers at least one byte, so text of at most `limit` bytes is
    /// tokenized whole at once; longer text is first counted piece by piece ([`PIECE_BYTES`],
    /// cut after white space), and tokenized whole only when that count is within the limit.
    pub fn encode_within(
        &self,
        text: &str,
        special: bool,
        limit: usize,
    ) -> Result<std::result::Result<Vec<u32>, usize>> {
        if text.len() > limit {
            let (mut counted, mut cuts, mut rest) = (0usize, 0usize, text);
            while !rest.is_empty() {
                let (piece, after) = rest.split_at(piece_end(rest, PIECE_BYTES));
                counted += self.encode(piece, false)?.len();
                rest = after;
                // A cut may split or merge a token or two; only a count past that is sure.
                if counted > limit + CUT_SLACK * cuts {
                    return Ok(Err(counted - CUT_SLACK * cuts));
                }
                cuts += 1;
            }
        }
        let ids = self.encode(text, special)?;
        Ok(if ids.len() > limit {
            Err(ids.len())
        } else {
            Ok(ids)
        })
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

/// Bytes of text [`TextTokenizer::encode_within`] counts at a time.
pub const PIECE_BYTES: usize = 64 << 10;

/// Tokens a cut between two pieces may add or remove from the count.
const CUT_SLACK: usize = 4;

/// Where the first piece of `text` of about `most` bytes ends: after the last white space
/// before `most` when there is one, else at the last character boundary before it.
fn piece_end(text: &str, most: usize) -> usize {
    if text.len() <= most {
        return text.len();
    }
    let mut end = most;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text[..end].rfind(char::is_whitespace) {
        Some(at) if at > 0 => at,
        _ if end > 0 => end,
        // A first character longer than `most` (never with a `most` of kilobytes).
        _ => text.char_indices().nth(1).map_or(text.len(), |(i, _)| i),
    }
}

/// Turns a stream of token ids into a stream of text pieces.
///
/// Decoding token by token breaks multi-byte characters (byte-level BPE splits them across
/// tokens) and loses the spaces some decoders add between tokens. Each step is the
/// `tokenizers` crate's own streaming step (what its `DecodeStream` runs): a short window of
/// recent tokens is decoded, and only the text it adds beyond what was already emitted comes
/// out, held back while it ends in an incomplete character (the replacement character). The
/// state lives here rather than in a `DecodeStream`, which borrows the tokenizer for the
/// stream's whole life; [`IncrementalDecoder::finish`] adds what `DecodeStream` has no step
/// for: the text still held back when a sequence ends.
pub struct IncrementalDecoder {
    /// The window decoded together.
    ids: Vec<u32>,
    /// The window's text already emitted.
    prefix: String,
    /// Where, in `ids`, the tokens of `prefix` end.
    prefix_index: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    /// A decoder for one sequence's generated tokens.
    pub fn new(skip_special: bool) -> Self {
        Self {
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
            skip_special,
        }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<Option<String>> {
        tokenizers::tokenizer::step_decode_stream(
            &*tokenizer.inner,
            vec![id],
            self.skip_special,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| EngineError::Tokenizer {
            context: format!("decoding token {id}"),
            message: e.to_string(),
        })
    }

    /// Text still held back at the end of the sequence (an incomplete character, shown as the
    /// replacement character, rather than silently dropped).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<Option<String>> {
        if self.ids.is_empty() {
            return Ok(None);
        }
        let full = tokenizer.decode(&self.ids, self.skip_special)?;
        self.ids.clear();
        let prefix = std::mem::take(&mut self.prefix);
        self.prefix_index = 0;
        Ok(match full.strip_prefix(prefix.as_str()) {
            Some(rest) if !rest.is_empty() => Some(rest.to_string()),
            _ => None,
        })
    }
}

//! A completion request read and checked before admission: OpenAI's fields (unknown ones
//! ignored), messages flattened and rendered with the model's chat template, the prompt counted
//! against the context, stop sequences, sampling and limits.

use super::*;

fn bad(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
    ApiError::new(400, message, "invalid_request_error", param, None)
}

/// A prompt's ids from [`TextTokenizer::encode_within`](cluster_engine::tokenizer::TextTokenizer::encode_within),
/// or OpenAI's context error when it holds more tokens than the model's `context`.
fn within_context(
    encoded: cluster_engine::Result<Result<Vec<u32>, usize>>,
    context: usize,
    param: &'static str,
) -> Result<Vec<u32>, ApiError> {
    match encoded {
        Ok(Ok(ids)) => Ok(ids),
        Ok(Err(n)) => Err(ApiError::new(
            400,
            format!(
                "This model's maximum context length is {context} tokens; your prompt has at least {n} tokens"
            ),
            "invalid_request_error",
            Some(param),
            Some("context_length_exceeded"),
        )),
        Err(e) => Err(bad(e.to_string(), Some(param))),
    }
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
    /// vLLM's extension: usage in every chunk, so that a client can count tokens as they come
    /// (what `clusterctl bench` times its gaps by).
    #[serde(default)]
    continuous_usage_stats: Option<bool>,
}

/// Where a stream reports usage.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct StreamUsage {
    /// A last chunk with the usage (`include_usage`); the others carry `"usage": null`.
    pub(super) last: bool,
    /// The usage so far in every chunk, and a chunk for every token even where its text is
    /// held back (a character cut between tokens, a possible stop sequence), its text then
    /// empty (`continuous_usage_stats`).
    pub(super) every_chunk: bool,
}

/// A message whose `content` is a list of parts (as many OpenAI clients send it) with its text
/// parts joined into one string, which text models' chat templates expect; any other part is
/// refused by name.
fn flatten_content(i: usize, msg: &Value) -> Result<Value, ApiError> {
    let Some(Value::Array(parts)) = msg.get("content") else {
        return Ok(msg.clone());
    };
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        match (
            part.get("type").and_then(Value::as_str),
            part.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            (kind, _) => {
                return Err(ApiError::new(
                    400,
                    format!(
                        "messages[{i}].content[{j}] is a part of type {}: this model reads text parts only",
                        kind.map(|k| format!("{k:?}"))
                            .unwrap_or_else(|| "(none)".into())
                    ),
                    "invalid_request_error",
                    Some("messages"),
                    None,
                ));
            }
        }
    }
    let mut out = msg.clone();
    out["content"] = Value::String(text);
    Ok(out)
}

/// The fields of a chat or text completion request this server reads; others are ignored.
#[derive(Debug, Default, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    messages: Option<Value>,
    prompt: Option<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    ignore_eos: Option<bool>,
    repetition_penalty: Option<f32>,
    tools: Option<Value>,
    logprobs: Option<Value>,
    echo: Option<bool>,
    best_of: Option<i64>,
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Chat,
    Text,
}

/// Most stop sequences a request may give (OpenAI takes 4): each is matched against every
/// token's text, so their number is work per token.
const MAX_STOPS: usize = 16;

/// Longest stop sequence, in bytes.
const MAX_STOP_BYTES: usize = 1024;

fn stops(v: &Option<Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    bad("`stop` must be a string or a list of strings", Some("stop"))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(bad(
                "`stop` must be a string or a list of strings",
                Some("stop"),
            ));
        }
    };
    if list.len() > MAX_STOPS {
        return Err(bad(
            format!(
                "`stop` has {} sequences; at most {MAX_STOPS} are taken",
                list.len()
            ),
            Some("stop"),
        ));
    }
    if let Some(long) = list.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(bad(
            format!(
                "a `stop` sequence of {} bytes; at most {MAX_STOP_BYTES} are taken",
                long.len()
            ),
            Some("stop"),
        ));
    }
    Ok(list)
}

/// Everything checked and prepared before admission.
pub(super) struct Prepared {
    pub(super) request: Request,
    pub(super) stops: Vec<String>,
    pub(super) stream: bool,
    pub(super) usage: StreamUsage,
}

pub(super) fn prepare(
    state: &EndpointState,
    head: &crate::ring::head::Head,
    kind: Kind,
    body: &[u8],
) -> Result<Prepared, ApiError> {
    let req: CompletionRequest = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the request body is not valid: {e}"), None))?;
    let Some(model) = &req.model else {
        return Err(bad("you must give `model`", Some("model")));
    };
    if *model != state.served_model {
        return Err(ApiError::new(
            404,
            format!(
                "The model `{model}` does not exist: this endpoint serves `{}`",
                state.served_model
            ),
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
        ));
    }
    if let Some(n) = req.n
        && n != 1
    {
        return Err(bad(
            format!("n = {n} is not supported: this server returns one choice per request"),
            Some("n"),
        ));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(bad(
            "best_of other than 1 is not supported",
            Some("best_of"),
        ));
    }
    if req.echo == Some(true) {
        return Err(bad("echo is not supported", Some("echo")));
    }
    let wants_logprobs = match &req.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(_) => true,
    };
    if wants_logprobs {
        return Err(bad("logprobs are not supported", Some("logprobs")));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            format!("temperature {temperature} is outside 0-2"),
            Some("temperature"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            format!("top_p {top_p} is outside (0, 1]"),
            Some("top_p"),
        ));
    }
    let stops = stops(&req.stop)?;
    let tokenizer = head.tokenizer();
    let context = head.folder().config.max_position_embeddings;
    let prompt_ids = match kind {
        Kind::Chat => {
            let messages = match &req.messages {
                Some(Value::Array(m)) if !m.is_empty() => Value::Array(
                    m.iter()
                        .enumerate()
                        .map(|(i, msg)| flatten_content(i, msg))
                        .collect::<Result<_, _>>()?,
                ),
                _ => {
                    return Err(bad(
                        "`messages` must be a non-empty list of messages",
                        Some("messages"),
                    ));
                }
            };
            let template = head.folder().chat_template.as_ref().ok_or_else(|| {
                bad(
                    "the model has no chat template: use /v1/completions with a prompt",
                    Some("messages"),
                )
            })?;
            let mut extra = serde_json::Map::new();
            if let Some(t) = &req.tools {
                extra.insert("tools".into(), t.clone());
            }
            let text = template
                .render(&messages, true, (!extra.is_empty()).then_some(&extra))
                .map_err(|e| {
                    bad(
                        format!("rendering the chat template: {e}"),
                        Some("messages"),
                    )
                })?;
            within_context(
                tokenizer.encode_within(&text, false, context),
                context,
                "messages",
            )?
        }
        Kind::Text => {
            let one = match &req.prompt {
                Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
                    Value::Array(items.clone())
                }
                Some(Value::Array(items)) if items.len() == 1 => items[0].clone(),
                Some(Value::Array(_)) => {
                    return Err(bad(
                        "one prompt per request: a list of several prompts is not supported",
                        Some("prompt"),
                    ));
                }
                Some(v) => v.clone(),
                None => return Err(bad("you must give `prompt`", Some("prompt"))),
            };
            match one {
                Value::String(s) => within_context(
                    tokenizer.encode_within(&s, true, context),
                    context,
                    "prompt",
                )?,
                Value::Array(ids) => {
                    let ids = ids
                        .iter()
                        .map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()))
                        .collect::<Option<Vec<u32>>>()
                        .ok_or_else(|| {
                            bad("a token-id prompt must hold integers", Some("prompt"))
                        })?;
                    let vocab = head.folder().config.vocab_size;
                    if let Some((at, id)) = ids
                        .iter()
                        .enumerate()
                        .find(|(_, id)| **id as usize >= vocab)
                    {
                        return Err(bad(
                            format!(
                                "token id {id} at position {at} is outside the model's vocabulary (ids 0-{})",
                                vocab - 1
                            ),
                            Some("prompt"),
                        ));
                    }
                    ids
                }
                _ => {
                    return Err(bad(
                        "`prompt` must be a string or a list of token ids",
                        Some("prompt"),
                    ));
                }
            }
        }
    };
    let room = context.saturating_sub(prompt_ids.len());
    if room == 0 {
        return Err(ApiError::new(
            400,
            format!(
                "This model's maximum context length is {context} tokens; your prompt has {} tokens",
                prompt_ids.len()
            ),
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
        ));
    }
    let asked = req.max_completion_tokens.or(req.max_tokens);
    let (param, max_tokens) = match asked {
        None => ("max_tokens", room),
        Some(n) if n < 1 => {
            return Err(bad(
                format!("max_tokens must be at least 1, got {n}"),
                Some("max_tokens"),
            ));
        }
        Some(n) => ("max_tokens", n as usize),
    };
    if max_tokens > room {
        return Err(ApiError::new(
            400,
            format!(
                "This model's maximum context length is {context} tokens; the prompt has {} tokens and {max_tokens} more were requested",
                prompt_ids.len()
            ),
            "invalid_request_error",
            Some(param),
            Some("context_length_exceeded"),
        ));
    }
    let seed = match req.seed {
        Some(s) => s as u64,
        None => rand::random(),
    };
    let sampling = SamplingParams {
        temperature,
        top_p: (top_p < 1.0).then_some(top_p),
        top_k: req.top_k.filter(|k| *k > 0).map(|k| k as usize),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        seed,
        ..SamplingParams::default()
    };
    sampling
        .validate()
        .map_err(|m| bad(m, Some("repetition_penalty")))?;
    Ok(Prepared {
        request: Request {
            prompt_ids,
            max_tokens,
            sampling,
            ignore_eos: req.ignore_eos.unwrap_or(false),
            resumed: 0,
        },
        stops,
        stream: req.stream.unwrap_or(false),
        usage: StreamUsage {
            last: req
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            every_chunk: req
                .stream_options
                .as_ref()
                .and_then(|o| o.continuous_usage_stats)
                .unwrap_or(false),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_lists_are_read_and_bounded() {
        assert_eq!(stops(&None).unwrap_or_default(), Vec::<String>::new());
        assert_eq!(
            stops(&Some(serde_json::json!(["\n\n", "END"]))).unwrap_or_default(),
            ["\n\n", "END"]
        );
        let many: Vec<String> = (0..=MAX_STOPS).map(|i| i.to_string()).collect();
        let e = stops(&Some(serde_json::json!(many)))
            .err()
            .map(|e| format!("{e:?}"));
        assert!(
            e.as_deref().is_some_and(|e| e.contains("17 sequences")),
            "{e:?}"
        );
        let long = "x".repeat(MAX_STOP_BYTES + 1);
        let e = stops(&Some(serde_json::json!([long])))
            .err()
            .map(|e| format!("{e:?}"));
        assert!(
            e.as_deref().is_some_and(|e| e.contains("1025 bytes")),
            "{e:?}"
        );
        assert!(stops(&Some(serde_json::json!(7))).is_err());
    }
}

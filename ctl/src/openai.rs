//! What `chat` and `bench` share in talking to an OpenAI-compatible endpoint.

use std::io::BufReader;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::Env;
use crate::output::text;

/// An Endpoint's base URL (no trailing slash) and the model name it serves, from the cluster.
pub fn endpoint(env: &Env, name: &str) -> anyhow::Result<(String, String)> {
    let ep = env.client()?.get(&format!("/api/v1/endpoints/{name}"))?;
    let url = text(&ep, "/status/url").trim_end_matches('/').to_string();
    if url.is_empty() {
        bail!(
            "endpoint {name} is not listening yet: {}",
            text(&ep, "/status/message")
        );
    }
    let model = ep
        .pointer("/spec/servedModelName")
        .and_then(Value::as_str)
        .unwrap_or_else(|| text(&ep, "/spec/pipeline"))
        .to_string();
    Ok((url, model))
}

/// Posts `body` to `url` (with `api_key` as a bearer token, when given) and returns the reader
/// of a 200 answer's body; anything else is an error with the server's own message, naming the
/// server as `who`.
pub fn post(
    http: &ureq::Agent,
    url: &str,
    api_key: Option<&str>,
    body: &Value,
    who: &str,
) -> anyhow::Result<BufReader<ureq::BodyReader<'static>>> {
    let mut req = http.post(url);
    if let Some(k) = api_key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let resp = req
        .send_json(body)
        .with_context(|| format!("cannot reach {who}"))?;
    let status = resp.status().as_u16();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    if status != 200 {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut text);
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or(text);
        bail!("{who} refused ({status}): {message}");
    }
    Ok(reader)
}

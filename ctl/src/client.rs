//! Talking to an agent's REST control plane: every call has a time bound, every refusal
//! becomes an error carrying the server's message (and, for a refused apply, each problem).

use std::time::Duration;

use cluster_api::cluster::ErrorBody;
use serde::de::DeserializeOwned;

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// The server answered with an error status.
    Refused {
        /// HTTP status.
        status: u16,
        /// The server's error body, when it sent one.
        body: Option<ErrorBody>,
        /// The raw text otherwise.
        text: String,
    },
    /// The server could not be reached or answered nonsense.
    Transport(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused {
                status,
                body: Some(b),
                ..
            } => write!(f, "the server refused ({status}): {}", b.error.message),
            Self::Refused { status, text, .. } => {
                write!(f, "the server refused ({status}): {}", text.trim())
            }
            Self::Transport(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CallError {}

/// A client for one agent.
pub struct Client {
    base: String,
    token: Option<String>,
    http: ureq::Agent,
}

impl Client {
    /// A client for `server` (`http://host:port` or `host:port`).
    pub fn new(server: &str, token: Option<String>, timeout: Duration) -> Self {
        let base = if server.contains("://") {
            server.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", server.trim_end_matches('/'))
        };
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Self { base, token, http }
    }

    /// The server's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The answer as `T`: every agent reply has its type in `cluster_api::cluster`.
    fn finish<T: DeserializeOwned>(
        &self,
        what: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, CallError> {
        let mut response = result.map_err(|e| {
            CallError::Transport(format!(
                "cannot reach the agent at {} ({what}): {e}; is it running? (set --server or CLUSTERCTL_SERVER)",
                self.base
            ))
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .map_err(|e| CallError::Transport(format!("{what}: reading the answer: {e}")))?;
        if !(200..300).contains(&status) {
            let body = serde_json::from_str::<ErrorBody>(&text).ok();
            return Err(CallError::Refused { status, body, text });
        }
        serde_json::from_str(&text).map_err(|e| {
            CallError::Transport(format!(
                "{what}: the answer is not what this clusterctl ({}) reads: {e} (is the agent \
                 another version?)",
                env!("CARGO_PKG_VERSION")
            ))
        })
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        let url = format!("{}{path}", self.base);
        let r = self.auth(self.http.get(&url)).call();
        self.finish(&format!("GET {path}"), r)
    }

    /// `POST path` with a text body.
    pub fn post_text<T: DeserializeOwned>(&self, path: &str, body: &str) -> Result<T, CallError> {
        let url = format!("{}{path}", self.base);
        let r = self
            .auth(self.http.post(&url))
            .header("Content-Type", "application/yaml")
            .send(body);
        self.finish(&format!("POST {path}"), r)
    }

    /// `DELETE path`.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        let url = format!("{}{path}", self.base);
        let r = self.auth(self.http.delete(&url)).call();
        self.finish(&format!("DELETE {path}"), r)
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

//! The OpenAI-compatible chat-completions backend (OpenAI, vLLM, llama.cpp server, Ollama, …).
//!
//! Request and response bodies are async-openai's types, so the wire format is the one that crate
//! maintains; the transport is a plain reqwest client because the retry logic needs what
//! async-openai's client hides: the HTTP status and the `Retry-After` header of every failure.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestUserMessage, CreateChatCompletionRequest,
    CreateChatCompletionResponse, FinishReason as WireFinishReason,
};
use hyper::body::Bytes;
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;

use super::retry::{parse_retry_after, RequestCounters, Throttle};
use super::{
    Answer, FinishReason, HttpSettings, MaxTokensField, Sampling, Teacher, TeacherError, Usage,
};

/// The API key, read from the environment once; its `Debug` never shows it.
struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{url} needs an API key: set the environment variable `{key_var}` (or name another one with --api-key-env)")]
    MissingKey { url: String, key_var: String },
    #[error("--base-url `{url}` is not an http(s) URL: expected e.g. https://api.openai.com/v1 or http://localhost:8000/v1")]
    BadUrl { url: String },
    #[error("could not create the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

pub struct OpenAiTeacher {
    settings: HttpSettings,
    /// `{base_url}/chat/completions`, parsed once.
    url: reqwest::Url,
    key: Option<ApiKey>,
    client: reqwest::Client,
    throttle: Throttle,
    counters: RequestCounters,
    /// The serialized request minus the prompt, prepared once: `{"messages":[…],` is prefixed per call.
    body_tail: String,
}

/// How one HTTP exchange ended.
enum Exchange {
    Answer(Answer),
    /// Worth another try; `overload` carries the pause the server asked for (429/503).
    Retry {
        reason: String,
        overload: Option<Option<Duration>>,
    },
    Fatal(TeacherError),
}

impl OpenAiTeacher {
    pub fn new(settings: HttpSettings) -> Result<Self, SetupError> {
        let base = settings.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(SetupError::BadUrl {
                url: settings.base_url.clone(),
            });
        }
        let url = reqwest::Url::parse(&format!("{base}/chat/completions")).map_err(|_| {
            SetupError::BadUrl {
                url: settings.base_url.clone(),
            }
        })?;
        let key = std::env::var(&settings.api_key_env)
            .ok()
            .filter(|k| !k.trim().is_empty())
            .map(ApiKey);
        let is_openai = base.contains("api.openai.com");
        if key.is_none() && is_openai {
            return Err(SetupError::MissingKey {
                url: base.to_string(),
                key_var: settings.api_key_env.clone(),
            });
        }
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(settings.concurrency)
            .tcp_nodelay(true)
            .connect_timeout(settings.timeout.min(Duration::from_secs(30)))
            .build()?;
        let field = match settings.max_tokens_field {
            MaxTokensField::Auto if is_openai => MaxTokensField::MaxCompletionTokens,
            MaxTokensField::Auto => MaxTokensField::MaxTokens,
            explicit => explicit,
        };
        let body_tail = request_body_tail(&settings.model, settings.sampling, field);
        Ok(OpenAiTeacher {
            throttle: Throttle::new(settings.concurrency),
            counters: RequestCounters::default(),
            url,
            key,
            client,
            settings,
            body_tail,
        })
    }

    /// The request for `prompt`, with the record's `seed` (OpenAI, vLLM, llama.cpp's server and
    /// `phigen serve` read it).
    fn body(&self, prompt: &str, seed: u64) -> String {
        let messages: Vec<ChatCompletionRequestMessage> =
            vec![ChatCompletionRequestUserMessage::from(prompt).into()];
        let messages = serde_json::to_string(&messages).expect("chat messages always serialize");
        format!(
            "{{\"messages\":{messages},\"seed\":{seed},{}",
            self.body_tail
        )
    }

    async fn exchange(&self, body: Bytes) -> Exchange {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .timeout(self.settings.timeout)
            .body(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(&key.0);
        }
        RequestCounters::bump(&self.counters.sent);
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return self.transport_failure(e),
        };
        let status = response.status();
        if status.is_success() {
            return match response.bytes().await {
                Ok(bytes) => self.parse_answer(&bytes),
                Err(e) => self.transport_failure(e),
            };
        }
        let retry_after = retry_after(response.headers());
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Exchange::Fatal(TeacherError::Auth {
                    url: self.redact(&self.settings.base_url),
                    status: status.as_u16(),
                    key_var: self.settings.api_key_env.clone(),
                    hint: if self.key.is_none() {
                        " (it is not set)"
                    } else {
                        ""
                    },
                })
            }
            StatusCode::TOO_MANY_REQUESTS => {
                RequestCounters::bump(&self.counters.throttled);
                Exchange::Retry {
                    reason: "HTTP 429 Too Many Requests".into(),
                    overload: Some(retry_after),
                }
            }
            s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
                RequestCounters::bump(&self.counters.server_errors);
                let overload = (s == StatusCode::SERVICE_UNAVAILABLE).then_some(retry_after);
                Exchange::Retry {
                    reason: format!("HTTP {s}"),
                    overload,
                }
            }
            s => {
                // Redacted before it is cut: a cut could split a key and leave its head readable.
                let body = self.redact(&response.text().await.unwrap_or_default());
                let body: String = body.chars().take(500).collect();
                Exchange::Fatal(TeacherError::Rejected {
                    url: self.redact(self.url.as_str()),
                    status: s.as_u16(),
                    body,
                })
            }
        }
    }

    fn transport_failure(&self, e: reqwest::Error) -> Exchange {
        let counter: &AtomicU64 = if e.is_timeout() {
            &self.counters.timeouts
        } else {
            &self.counters.connection_errors
        };
        RequestCounters::bump(counter);
        let kind = if e.is_timeout() {
            "timed out"
        } else {
            "connection failed"
        };
        Exchange::Retry {
            reason: self.redact(&format!("{kind}: {e}")),
            overload: None,
        }
    }

    /// What the server (or the transport) said, fit to keep: every error string this backend
    /// makes passes here before it reaches a log, an error or `rejects.parquet`.
    fn redact(&self, text: &str) -> String {
        redact(text, self.key.as_ref().map(|k| k.0.as_str()))
    }

    fn parse_answer(&self, bytes: &[u8]) -> Exchange {
        let malformed = |why: String| {
            RequestCounters::bump(&self.counters.malformed);
            Exchange::Retry {
                reason: format!("malformed response: {why}"),
                overload: None,
            }
        };
        let parsed: CreateChatCompletionResponse = match serde_json::from_slice(bytes) {
            Ok(p) => p,
            Err(e) => return malformed(e.to_string()),
        };
        let Some(choice) = parsed.choices.into_iter().next() else {
            return malformed("no choices".into());
        };
        let usage = parsed.usage.map_or(Usage::default(), |u| Usage {
            prompt_tokens: u.prompt_tokens.into(),
            completion_tokens: u.completion_tokens.into(),
        });
        let finish_reason = match choice.finish_reason {
            Some(WireFinishReason::Stop) => FinishReason::Stop,
            Some(WireFinishReason::Length) => FinishReason::Length,
            Some(WireFinishReason::ContentFilter) => FinishReason::ContentFilter,
            _ => FinishReason::Other,
        };
        // A refusal comes back in its own field; keep it as the text so the output checks see it.
        let text = choice
            .message
            .content
            .or(choice.message.refusal)
            .unwrap_or_default();
        Exchange::Answer(Answer {
            text,
            finish_reason,
            usage,
            attempts: 0,
        })
    }
}

/// What replaces a credential in stored and logged text.
pub const REDACTED: &str = "[redacted]";

/// `text` with anything that looks like a credential replaced by [`REDACTED`]: the value of
/// `key` (the configured API key) wherever it appears, the value of an `Authorization` header
/// (`Authorization: Bearer …`, `"authorization": "…"`), the token after `Bearer`, keys shaped like
/// `sk-…` / `sk_…` / `hf_…` / `gsk_…` / `xai-…`, and the user and password of a URL
/// (`https://user:pass@host`). A server that echoes the request in a 4xx body would otherwise put
/// the key into `rejects.parquet` and the logs.
pub fn redact(text: &str, key: Option<&str>) -> String {
    // Shorter "keys" are placeholders local servers ignore (`x`, `none`); replacing them would
    // garble every message without hiding anything.
    let text = match key.map(str::trim) {
        Some(k) if k.len() >= 4 => text.replace(k, REDACTED),
        _ => text.to_string(),
    };
    let mut spans = credential_spans(&text);
    if spans.is_empty() {
        return text;
    }
    spans.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut spans = spans.into_iter().peekable();
    while let Some((start, mut end)) = spans.next() {
        // Overlapping spans (`Authorization: Bearer sk-…` matches three ways) become one.
        while let Some((_, e)) = spans.next_if(|&(s, _)| s <= end) {
            end = end.max(e);
        }
        out.push_str(&text[at..start]);
        out.push_str(REDACTED);
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// Prefixes of API keys in common use; a key is the prefix and at least 8 more key characters.
const KEY_PREFIXES: &[&str] = &["sk-", "sk_", "hf_", "gsk_", "xai-"];

/// Byte ranges of `text` to hide. Every range starts and ends at an ASCII byte or at the end of
/// `text`, so each is a valid `str` range.
fn credential_spans(text: &str) -> Vec<(usize, usize)> {
    let lower = text.to_ascii_lowercase();
    let b = lower.as_bytes();
    let is_key_byte = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    // Where a header value or a token ends: quotes, escapes and separators of JSON, Python reprs
    // and header lists, or the end of the line.
    let ends_value = |c: u8| matches!(c, b'"' | b'\'' | b'\\' | b',' | b';' | b'}' | b'\r' | b'\n');
    let skip = |mut i: usize, what: &dyn Fn(u8) -> bool| {
        while i < b.len() && what(b[i]) {
            i += 1;
        }
        i
    };
    let mut spans = Vec::new();
    let quote_or_space = |c: u8| matches!(c, b'"' | b'\'' | b' ' | b'\t');
    for (at, _) in lower.match_indices("authorization") {
        // A header (`Authorization: …`, `"authorization": "…"`, `('authorization', '…')`), not
        // the word in a sentence.
        let sep = skip(at + "authorization".len(), &quote_or_space);
        if !matches!(b.get(sep), Some(b':' | b'=' | b',')) {
            continue;
        }
        let start = skip(sep + 1, &quote_or_space);
        let end = skip(start, &|c| !ends_value(c));
        if end > start {
            spans.push((start, end));
        }
    }
    for (at, _) in lower.match_indices("bearer") {
        if at > 0 && b[at - 1].is_ascii_alphanumeric() {
            continue; // the end of a longer word
        }
        let start = skip(at + "bearer".len(), &|c| c == b' ' || c == b'\t');
        if start == at + "bearer".len() {
            continue; // `bearer` as a word inside other text, not a scheme before a token
        }
        let end = skip(start, &|c| !ends_value(c) && !c.is_ascii_whitespace());
        if end > start {
            spans.push((start, end));
        }
    }
    for prefix in KEY_PREFIXES {
        for (at, _) in lower.match_indices(prefix) {
            if at > 0 && is_key_byte(b[at - 1]) {
                continue; // inside a longer word, e.g. `task_`
            }
            let end = skip(at + prefix.len(), &is_key_byte);
            if end - at - prefix.len() >= 8 {
                spans.push((at, end));
            }
        }
    }
    for (at, _) in lower.match_indices("://") {
        let start = at + 3;
        let end = skip(start, &|c| {
            !matches!(c, b'/' | b'@' | b'"' | b'\'') && !c.is_ascii_whitespace()
        });
        if b.get(end) == Some(&b'@') && end > start {
            spans.push((start, end));
        }
    }
    spans
}

/// The request body after `messages`, e.g. `"model":"gpt-4o-mini","max_tokens":800,…}`.
#[allow(deprecated)] // `max_tokens` is deprecated by OpenAI but the only field many local servers read.
fn request_body_tail(model: &str, sampling: Sampling, field: MaxTokensField) -> String {
    let mut request = CreateChatCompletionRequest {
        model: model.to_string(),
        temperature: Some(sampling.temperature),
        top_p: Some(sampling.top_p),
        ..Default::default()
    };
    match field {
        MaxTokensField::MaxCompletionTokens => {
            request.max_completion_tokens = Some(sampling.max_tokens)
        }
        MaxTokensField::MaxTokens | MaxTokensField::Auto => {
            request.max_tokens = Some(sampling.max_tokens)
        }
    }
    let mut value = serde_json::to_value(&request).expect("chat request always serializes");
    let object = value
        .as_object_mut()
        .expect("a request serializes to an object");
    object.remove("messages");
    // Not in OpenAI's API; vLLM, llama.cpp's server and `phigen serve` read them. Sent only when
    // asked for, so OpenAI itself never sees them.
    if let Some(k) = sampling.top_k {
        object.insert("top_k".into(), k.into());
    }
    if let Some(p) = sampling.min_p {
        object.insert("min_p".into(), p.into());
    }
    if let Some(p) = sampling.repetition_penalty {
        // vLLM's name, then llama.cpp's server's.
        object.insert("repetition_penalty".into(), p.into());
        object.insert("repeat_penalty".into(), p.into());
    }
    if let Some(n) = sampling.min_tokens {
        // vLLM's name; OpenAI's API has no such field.
        object.insert("min_tokens".into(), n.into());
    }
    let tail = serde_json::to_string(&value).expect("json value always serializes");
    tail[1..].to_string()
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now())
}

impl Teacher for OpenAiTeacher {
    fn model(&self) -> &str {
        &self.settings.model
    }

    fn sampling(&self) -> Sampling {
        self.settings.sampling
    }

    fn counters(&self) -> &RequestCounters {
        &self.counters
    }

    async fn chat(&self, prompt: &str, seed: u64) -> Result<Answer, TeacherError> {
        let policy = self.settings.retry;
        // Shared, not copied, by the retries.
        let body = Bytes::from(self.body(prompt, seed));
        let mut last = String::new();
        for attempt in 1..=policy.max_attempts {
            let outcome = {
                let _permit = self.throttle.acquire().await;
                self.exchange(body.clone()).await
            };
            match outcome {
                Exchange::Answer(mut answer) => {
                    self.throttle.on_success();
                    answer.attempts = attempt;
                    return Ok(answer);
                }
                Exchange::Fatal(e) => return Err(e),
                Exchange::Retry { reason, overload } => {
                    tracing::debug!(attempt, %reason, "request failed, will retry");
                    last = reason;
                    if attempt == policy.max_attempts {
                        break;
                    }
                    RequestCounters::bump(&self.counters.retries);
                    let backoff = policy.backoff(attempt);
                    match overload {
                        // The pool pauses for the server's Retry-After (or our backoff) and shrinks;
                        // this worker's next `acquire` waits out that pause.
                        Some(asked) => self
                            .throttle
                            .on_overload(asked.map_or(backoff, |d| d.min(policy.max_retry_after))),
                        None => tokio::time::sleep(backoff).await,
                    }
                }
            }
        }
        Err(TeacherError::Exhausted {
            attempts: policy.max_attempts,
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_body_is_valid_openai_json_with_the_chosen_limit_field() {
        let s = Sampling {
            temperature: 0.7,
            top_p: 0.95,
            max_tokens: 321,
            top_k: None,
            min_p: None,
            repetition_penalty: None,
            min_tokens: None,
        };
        for (field, key) in [
            (MaxTokensField::MaxTokens, "max_tokens"),
            (MaxTokensField::MaxCompletionTokens, "max_completion_tokens"),
        ] {
            let tail = request_body_tail("m", s, field);
            let body = format!("{{\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],{tail}");
            // async-openai's own request type is the oracle for the wire format.
            let parsed: CreateChatCompletionRequest = serde_json::from_str(&body).unwrap();
            assert_eq!(parsed.model, "m");
            assert_eq!(parsed.temperature, Some(0.7));
            let raw: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(raw[key], 321, "{body}");
            for absent in [
                "top_k",
                "min_p",
                "repetition_penalty",
                "repeat_penalty",
                "min_tokens",
            ] {
                assert!(raw.get(absent).is_none(), "{body}");
            }
        }
        // Top-k, min-p, the repetition penalty and min-tokens go out only when asked for, under
        // vLLM's names (the penalty under llama.cpp's as well).
        let s = Sampling {
            top_k: Some(40),
            min_p: Some(0.25),
            repetition_penalty: Some(1.5),
            min_tokens: Some(120),
            ..s
        };
        let tail = request_body_tail("m", s, MaxTokensField::MaxTokens);
        let raw: serde_json::Value = serde_json::from_str(&format!("{{{tail}")).unwrap();
        assert_eq!(
            (raw["top_k"].as_u64(), raw["min_p"].as_f64()),
            (Some(40), Some(0.25))
        );
        assert_eq!(
            (
                raw["repetition_penalty"].as_f64(),
                raw["repeat_penalty"].as_f64()
            ),
            (Some(1.5), Some(1.5))
        );
        assert_eq!(raw["min_tokens"].as_u64(), Some(120));
    }

    /// Bodies as servers echo a request back (raw headers, JSON, a Python repr), with the key
    /// `sk-proj-abcdef123456`: none keeps the key, the token after `Bearer`, or a URL password;
    /// the words around them stay readable.
    #[test]
    fn credentials_are_redacted_from_server_text() {
        let key = "sk-proj-abcdef123456";
        for (text, expected) in [
            (
                "Authorization: Bearer sk-proj-abcdef123456\r\nHost: x",
                "Authorization: [redacted]\r\nHost: x",
            ),
            (
                r#"{"error":"bad model","headers":{"authorization":"Bearer sk-proj-abcdef123456","accept":"*/*"}}"#,
                r#"{"error":"bad model","headers":{"authorization":"[redacted]","accept":"*/*"}}"#,
            ),
            (
                "[('authorization', 'tok-1234'), ('host', 'x')]",
                "[('authorization', '[redacted]'), ('host', 'x')]",
            ),
            (
                "invalid token: Bearer abc.def-ghi",
                "invalid token: Bearer [redacted]",
            ),
            (
                "key sk-proj-abcdef123456 is revoked",
                "key [redacted] is revoked",
            ),
            (
                "other key sk-otherkey0000000 is revoked",
                "other key [redacted] is revoked",
            ),
            (
                "hf_abcdefghijklmnop and gsk_ABCDEFGH12",
                "[redacted] and [redacted]",
            ),
            (
                "error sending request for url (http://user:pa55@127.0.0.1:9/v1)",
                "error sending request for url (http://[redacted]@127.0.0.1:9/v1)",
            ),
            // The raw key wherever it appears, even without a recognisable shape around it.
            ("x=sk-proj-abcdef123456=y", "x=[redacted]=y"),
        ] {
            assert_eq!(redact(text, Some(key)), expected, "{text}");
        }
        // Ordinary text is left alone: words that only resemble the patterns, and no key set.
        for text in [
            "unknown model `gpt-5`: see sk-learn, the Authorization header and task_sk-1",
            "Bearer",
            "a forbearer of errors",
            "http://127.0.0.1:8000/v1 said 404 — ünïcode stays",
        ] {
            assert_eq!(redact(text, None), text);
        }
        // A configured key without a known shape is still hidden; a placeholder is not.
        assert_eq!(
            redact("echo: my-own-key-42", Some("my-own-key-42")),
            "echo: [redacted]"
        );
        assert_eq!(redact("a b", Some("a")), "a b");
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let k = ApiKey("sk-secret-123".into());
        assert!(!format!("{k:?}").contains("sk-secret"));
    }
}

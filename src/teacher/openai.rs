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

    fn body(&self, prompt: &str) -> String {
        let messages: Vec<ChatCompletionRequestMessage> =
            vec![ChatCompletionRequestUserMessage::from(prompt).into()];
        let messages = serde_json::to_string(&messages).expect("chat messages always serialize");
        format!("{{\"messages\":{messages},{}", self.body_tail)
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
                    url: self.settings.base_url.clone(),
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
                let body = response.text().await.unwrap_or_default();
                let body: String = body.chars().take(500).collect();
                Exchange::Fatal(TeacherError::Rejected {
                    url: self.url.to_string(),
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
            reason: format!("{kind}: {e}"),
            overload: None,
        }
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

    async fn chat(&self, prompt: &str) -> Result<Answer, TeacherError> {
        let policy = self.settings.retry;
        // Shared, not copied, by the retries.
        let body = Bytes::from(self.body(prompt));
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
        }
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let k = ApiKey("sk-secret-123".into());
        assert!(!format!("{k:?}").contains("sk-secret"));
    }
}

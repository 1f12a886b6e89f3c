//! `phigen serve`: any model phigen loads, behind an OpenAI-compatible API on localhost, so other
//! tools — and phigen's own HTTP teacher — can use the models phigen trained.
//!
//! Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (non-streaming;
//! `n` = 1). Requests are batched by the local teacher's [`Engine`]. Also the HTTP plumbing the
//! mock server shares: [`listen`] and [`json`].

use std::future::Future;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use super::local::{Completion, Engine, EngineError};
use super::FinishReason;
use crate::model::chat::Message;

pub type Body = Full<Bytes>;

/// Serves HTTP/1 connections on `listener` with `handle` until the task is aborted. A handler
/// error closes the connection unanswered.
pub fn listen<H, F, E>(listener: TcpListener, handle: H) -> tokio::task::JoinHandle<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(handle);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("json value always serializes");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// An OpenAI-style error response.
pub fn error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": {"message": message, "type": kind}}),
    )
}

/// `content` as a string, or as a list of parts of which the text parts are joined.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<serde_json::Value>),
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

/// `stop` is one string or a list of them.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// The fields both endpoints share.
#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Stop,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    /// vLLM's extension: generate `max_tokens` whatever the model says (benchmarks).
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

/// `prompt` is one string or a list of one.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

/// What the server answers with when a request leaves the output length open.
pub const DEFAULT_MAX_TOKENS: usize = 512;

struct Server {
    engine: Arc<Engine>,
    model: String,
    created: i64,
}

/// Serves `engine` under the model name `model` on `listener`.
pub fn start(
    listener: TcpListener,
    engine: Arc<Engine>,
    model: String,
) -> tokio::task::JoinHandle<()> {
    let server = Arc::new(Server {
        engine,
        model,
        created: chrono::Utc::now().timestamp(),
    });
    listen(listener, move |req| {
        let server = server.clone();
        async move { Ok::<_, std::convert::Infallible>(server.handle(req).await) }
    })
}

impl Server {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let method = req.method().clone();
        let route = path.strip_prefix("/v1").unwrap_or(&path).to_string();
        match (method, route.as_str()) {
            (Method::GET, "/models") => json(
                StatusCode::OK,
                &serde_json::json!({"object": "list", "data": [
                    {"id": self.model, "object": "model", "created": self.created, "owned_by": "phigen"}]}),
            ),
            (Method::POST, "/chat/completions" | "/completions") => {
                let body = match req.into_body().collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &format!("could not read the body: {e}")),
                };
                let chat = route == "/chat/completions";
                match self.answer(&body, chat).await {
                    Ok(r) => r,
                    Err((status, message)) => error(status, "invalid_request_error", &message),
                }
            }
            (_, "/models" | "/chat/completions" | "/completions") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method not allowed",
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &format!("no route {path}: this server has /v1/models, /v1/chat/completions and /v1/completions"),
            ),
        }
    }

    async fn answer(
        &self,
        body: &[u8],
        chat: bool,
    ) -> Result<Response<Body>, (StatusCode, String)> {
        let bad = |m: String| (StatusCode::BAD_REQUEST, m);
        let model = self.engine.model();
        let (prompt, common) = if chat {
            let r: ChatRequest = serde_json::from_slice(body)
                .map_err(|e| bad(format!("expected a chat completion request ({{\"messages\": [{{\"role\", \"content\"}}], …}}): {e}")))?;
            let messages: Vec<Message> = r
                .messages
                .into_iter()
                .map(|m| Message {
                    role: m.role,
                    content: match m.content {
                        Content::Text(t) => t,
                        Content::Parts(parts) => parts
                            .iter()
                            .filter_map(|p| p["text"].as_str())
                            .collect::<Vec<_>>()
                            .join("\n"),
                    },
                })
                .collect();
            let ids = model
                .prompt_ids(&messages)
                .map_err(|e| bad(e.to_string()))?;
            (ids, r.common)
        } else {
            let r: CompletionRequest = serde_json::from_slice(body).map_err(|e| {
                bad(format!(
                    "expected a completion request ({{\"prompt\": \"…\", …}}): {e}"
                ))
            })?;
            let text = match r.prompt {
                Prompt::One(t) => t,
                Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
                Prompt::Many(v) => {
                    return Err(bad(format!(
                        "`prompt` has {} strings; send one per request",
                        v.len()
                    )))
                }
            };
            let ids = model
                .tokenizer
                .encode(&text)
                .map_err(|e| bad(e.to_string()))?;
            (ids, r.common)
        };
        if common.stream {
            return Err(bad(
                "`stream: true` is not supported by phigen serve; send the request without it"
                    .into(),
            ));
        }
        if common.n.is_some_and(|n| n != 1) {
            return Err(bad("only `n: 1` is supported".into()));
        }
        if prompt.is_empty() {
            return Err(bad("the prompt is empty".into()));
        }
        let request = super::local::Request {
            prompt,
            max_tokens: common
                .max_completion_tokens
                .or(common.max_tokens)
                .unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: common.temperature.unwrap_or(1.0),
            top_p: common.top_p.unwrap_or(1.0),
            stop: match common.stop {
                Stop::None => Vec::new(),
                Stop::One(s) => vec![s],
                Stop::Many(v) => v,
            },
            ignore_eos: common.ignore_eos,
        };
        let c = self.engine.complete(request).await.map_err(|e| match e {
            EngineError::PromptTooLong { .. } => bad(e.to_string()),
            EngineError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        })?;
        Ok(json(StatusCode::OK, &self.response(&c, chat)))
    }

    fn response(&self, c: &Completion, chat: bool) -> serde_json::Value {
        let finish = match c.finish {
            FinishReason::Length => "length",
            _ => "stop",
        };
        let usage = serde_json::json!({
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        });
        let id = format!("{:016x}", rand::random::<u64>());
        let created = chrono::Utc::now().timestamp();
        if chat {
            serde_json::json!({
                "id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": created,
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": finish, "logprobs": null}],
                "usage": usage,
            })
        } else {
            serde_json::json!({
                "id": format!("cmpl-{id}"), "object": "text_completion", "created": created,
                "model": self.model,
                "choices": [{"index": 0, "text": c.text, "finish_reason": finish, "logprobs": null}],
                "usage": usage,
            })
        }
    }
}

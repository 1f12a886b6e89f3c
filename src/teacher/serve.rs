//! `phigen serve`: any model phigen loads, behind an OpenAI-compatible API on localhost, so other
//! tools — and phigen's own HTTP teacher — can use the models phigen trained.
//!
//! Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (non-streaming;
//! `n` = 1). Requests are batched by the local teacher's [`Engine`] (`super::engine`). A request
//! is sampled with its `seed`; one without a seed (or with a negative one, llama.cpp's "random")
//! gets a seed derived from the server's `--seed` and the request's content (prompt ids and
//! sampling settings), never from its arrival, so the same request gets the same answer. The loop
//! stop of the local teacher is off here: a server returns what was asked for, as vLLM and
//! llama.cpp do. Also the HTTP plumbing the mock server shares: [`listen`], which holds every
//! client within [`Limits`] (body size, time to send a request or read an answer, connections at
//! once), and [`json`] / [`error`].

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::engine::{self, Completion, Engine, EngineError};
use super::local::LocalModel;
use super::{FinishReason, Sampling};
use crate::model::chat::Message;
use crate::model::checkpoint::{tokenizer_name, tokenizer_size};
use crate::model::tokenizer::Tokenizer;

pub type Body = Full<Bytes>;

/// What one client may cost the server, so that a hostile or broken client cannot take its
/// memory, its connections or its file descriptors.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request body read; a larger one is answered 413 and not read.
    pub max_body_bytes: usize,
    /// Time allowed to receive a request's head. hyper starts this clock whenever the connection
    /// waits for a request, so it is also how long an idle keep-alive connection is kept.
    pub header_timeout: Duration,
    /// Time allowed to receive a whole request body once its head has arrived (answered 408).
    pub body_timeout: Duration,
    /// How long a response write may make no progress (a client that does not read its
    /// answers) before the connection is closed.
    pub write_timeout: Duration,
    /// Connections served at once; a connection past this is answered 503 and closed.
    pub max_connections: usize,
}

/// 8 MiB: a chat request that fills a 128k-token context is about 0.5 MiB of JSON.
pub const MAX_BODY_BYTES: usize = 8 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: MAX_BODY_BYTES,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_connections: default_max_connections(),
        }
    }
}

/// Half the process's file-descriptor limit, between 16 and 1,024: the other half stays free for
/// the connections being answered 503, model files and logs.
fn default_max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    usize::try_from(soft / 2).unwrap_or(1024).clamp(16, 1024)
}

/// Connections answered 503 at once; past it an over-the-limit connection is closed unanswered.
const REJECTING_AT_ONCE: usize = 64;
/// The most time an over-the-limit connection may take to send its request head and get its 503.
const REJECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves HTTP/1 connections on `listener` with `handle` until the task is aborted, within
/// `limits`. The handler gets the request with its whole body; its error closes the connection
/// unanswered, its panic is answered 500 (the panic is logged, never sent).
pub fn listen<H, F, E>(
    listener: TcpListener,
    limits: Limits,
    handle: H,
) -> tokio::task::JoinHandle<()>
where
    H: Fn(Request<Bytes>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    tokio::spawn(async move {
        let connections = Arc::new(Semaphore::new(limits.max_connections));
        let rejecting = Arc::new(Semaphore::new(REJECTING_AT_ONCE));
        let mut failures = 0u32;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // The client gave up before we accepted: nothing is wrong with the listener.
                Err(e) if is_per_connection(&e) => continue,
                // Out of file descriptors or memory: accepting again at once would fail again and
                // spin. Wait, longer each time, while the connections being served end.
                Err(e) => {
                    if failures == 0 {
                        tracing::warn!("cannot accept connections ({e}); retrying with backoff");
                    }
                    tokio::time::sleep(accept_pause(failures)).await;
                    failures = failures.saturating_add(1);
                    continue;
                }
            };
            if failures > 0 {
                tracing::info!("accepting connections again after {failures} failed attempts");
                failures = 0;
            }
            let _ = stream.set_nodelay(true);
            if let Ok(permit) = connections.clone().try_acquire_owned() {
                tokio::spawn(serve_connection(stream, limits, handle.clone(), permit));
            } else if let Ok(permit) = rejecting.clone().try_acquire_owned() {
                tokio::spawn(reject_connection(stream, limits.max_connections, permit));
            }
        }
    })
}

/// Accept errors that concern one connection only, after which the next accept can succeed.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

/// The wait after the `failures`+1-th accept error in a row: 5 ms, doubling, at most 1 s.
fn accept_pause(failures: u32) -> Duration {
    let ms = 5u64.saturating_mul(1u64 << failures.min(20));
    Duration::from_millis(ms.min(1000))
}

async fn serve_connection<H, F, E>(
    stream: TcpStream,
    limits: Limits,
    handle: H,
    _permit: OwnedSemaphorePermit,
) where
    H: Fn(Request<Bytes>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| respond(req, limits, handle.clone()));
    let io = WriteDeadline::new(stream, limits.write_timeout);
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// Answers one request: reads its body within `limits`, then runs `handle`, turning a panic
/// into a 500 whose body says nothing of the panic.
async fn respond<H, F, E>(
    req: Request<Incoming>,
    limits: Limits,
    handle: H,
) -> Result<Response<Body>, E>
where
    H: Fn(Request<Bytes>) -> F,
    F: Future<Output = Result<Response<Body>, E>>,
{
    let req = match read_body(req, &limits).await {
        Ok(req) => req,
        Err(refusal) => return Ok(refusal),
    };
    match AssertUnwindSafe(async { handle(req).await })
        .catch_unwind()
        .await
    {
        Ok(answer) => answer,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            tracing::error!("a request handler panicked: {what}");
            Ok(closing(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the server failed while answering this request; its log has the details",
            )))
        }
    }
}

/// The request with its whole body, or the error response when the body is too large (413, from
/// its `Content-Length` before any of it is read, or once the limit is passed), too slow (408) or
/// broken (400).
async fn read_body(
    req: Request<Incoming>,
    limits: &Limits,
) -> Result<Request<Bytes>, Response<Body>> {
    let (parts, body) = req.into_parts();
    let max = limits.max_body_bytes;
    let too_large = || {
        closing(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            &format!("the request body is larger than {max} bytes, the most this server reads: send a smaller request"),
        ))
    };
    if hyper::body::Body::size_hint(&body).lower() > max as u64 {
        return Err(too_large());
    }
    match tokio::time::timeout(limits.body_timeout, Limited::new(body, max).collect()).await {
        Ok(Ok(collected)) => Ok(Request::from_parts(parts, collected.to_bytes())),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(closing(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("could not read the request body: {e}"),
        ))),
        Err(_) => Err(closing(error(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            &format!(
                "the request body did not arrive within {} s: send it at once",
                limits.body_timeout.as_secs_f64()
            ),
        ))),
    }
}

/// `response`, asking hyper to close the connection after it (a request body left unread
/// cannot be skipped cheaply).
fn closing(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    response
}

/// Answers a connection past `max_connections` 503 (after its request head, so the client reads
/// the answer rather than a reset), then closes it.
async fn reject_connection(
    stream: TcpStream,
    max_connections: usize,
    _permit: OwnedSemaphorePermit,
) {
    let message = format!(
        "the server is serving its maximum of {max_connections} connections: retry later, or use fewer connections at once"
    );
    let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
        let mut response = closing(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            &message,
        ));
        response.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from_static("1"),
        );
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REJECT_TIMEOUT)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REJECT_TIMEOUT, connection).await;
}

/// A stream whose writes fail once one has made no progress for `timeout`: a client that sends
/// requests but never reads the answers cannot hold its connection forever. Reads are not timed
/// here (hyper times request heads, [`read_body`] bodies), so a long generation is never cut.
struct WriteDeadline {
    stream: TcpStream,
    timeout: Duration,
    /// Running while a write is blocked; reset by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadline {
    fn new(stream: TcpStream, timeout: Duration) -> Self {
        WriteDeadline {
            stream,
            timeout,
            stalled: None,
        }
    }

    /// `poll` is a blocked write's result: Pending until the deadline, then an error.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {} s", timeout.as_secs_f64()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.check(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.check(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.check(cx, poll)
    }
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
    /// vLLM's and llama.cpp's extensions (absent: the whole distribution, as OpenAI).
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: Option<f32>,
    /// vLLM's name, then llama.cpp's.
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    /// vLLM's: end-of-sequence tokens are held back until the answer has this many tokens.
    #[serde(default)]
    min_tokens: Option<usize>,
    #[serde(default)]
    seed: Option<i64>,
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

/// The seed of a request that brings none: a hash of the server's seed, the prompt ids and the
/// sampling settings.
fn content_seed(server_seed: u64, prompt: &[u32], settings: &Sampling) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"phigen/serve-seed");
    h.update(&server_seed.to_le_bytes());
    for id in prompt {
        h.update(&id.to_le_bytes());
    }
    h.update(&serde_json::to_vec(settings).expect("sampling settings serialize"));
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// What the server answers with when a request leaves the output length open.
pub const DEFAULT_MAX_TOKENS: usize = 512;

struct Server {
    engine: Arc<Engine>,
    model: String,
    created: i64,
}

/// Why `phigen serve` refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{model}: the model has {vocab_size} token embeddings (vocab_size in its config) but its tokenizer ({tokenizer}) produces ids up to {}, which the model cannot embed, so requests would fail. Serve a checkpoint whose vocab_size is at least {tokenizer_size}: `phigen init` sizes new checkpoints to their tokenizer", tokenizer_size - 1)]
    VocabTooSmall {
        model: String,
        vocab_size: usize,
        tokenizer: String,
        tokenizer_size: usize,
    },
}

/// Refuses a model whose tokenizer makes ids its embedding does not have: every prompt holding
/// one would fail inside the forward pass.
fn check_vocab(model: &LocalModel) -> Result<(), ServeError> {
    let vocab_size = model.decoder.config().vocab_size;
    let size = tokenizer_size(&model.tokenizer);
    if size <= vocab_size {
        return Ok(());
    }
    Err(ServeError::VocabTooSmall {
        model: model.name.clone(),
        vocab_size,
        tokenizer: match &model.tokenizer {
            Tokenizer::Tiktoken(e) => tokenizer_name(*e),
            Tokenizer::HuggingFace(_) => crate::model::tokenizer::HF_TOKENIZER_FILE.into(),
        },
        tokenizer_size: size,
    })
}

/// Serves `engine` under the model name `model` on `listener`, within `limits`; refuses a model
/// that cannot answer (see [`ServeError`]).
pub fn start(
    listener: TcpListener,
    engine: Arc<Engine>,
    model: String,
    limits: Limits,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    check_vocab(engine.model())?;
    let server = Arc::new(Server {
        engine,
        model,
        created: chrono::Utc::now().timestamp(),
    });
    Ok(listen(listener, limits, move |req| {
        let server = server.clone();
        async move { Ok::<_, std::convert::Infallible>(server.handle(req).await) }
    }))
}

impl Server {
    async fn handle(&self, req: Request<Bytes>) -> Response<Body> {
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
                let chat = route == "/chat/completions";
                match self.answer(req.body(), chat).await {
                    Ok(r) => r,
                    Err((status, message)) => {
                        let kind = if status.is_server_error() {
                            "server_error"
                        } else {
                            "invalid_request_error"
                        };
                        error(status, kind, &message)
                    }
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
            let mut common = r.common;
            // The answer ends at the template's end of turn, as at an end-of-turn token.
            if !model.chat_stop.is_empty() {
                let mut stop = match std::mem::take(&mut common.stop) {
                    Stop::None => Vec::new(),
                    Stop::One(s) => vec![s],
                    Stop::Many(v) => v,
                };
                stop.extend(model.chat_stop.iter().cloned());
                common.stop = Stop::Many(stop);
            }
            (ids, common)
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
        if let Some(p) = common.min_p.filter(|p| !(0.0..=1.0).contains(p)) {
            return Err(bad(format!("`min_p` must be in [0, 1], found {p}")));
        }
        let penalty = common.repetition_penalty.or(common.repeat_penalty);
        let range = crate::range::REPETITION_PENALTY;
        if let Some(p) = penalty.filter(|&p| !range.contains(f64::from(p))) {
            return Err(bad(format!(
                "`repetition_penalty` must be in {range} (1 = off), found {p}"
            )));
        }
        let max_tokens = common
            .max_completion_tokens
            .or(common.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        // vLLM's rule: at most max_tokens.
        if let Some(m) = common.min_tokens.filter(|&m| m > max_tokens) {
            return Err(bad(format!(
                "`min_tokens` ({m}) must be at most `max_tokens` ({max_tokens})"
            )));
        }
        let settings = Sampling {
            temperature: common.temperature.unwrap_or(1.0),
            top_p: common.top_p.unwrap_or(1.0),
            max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
            // vLLM reads 0 and -1 as "off"; a negative number does not parse as u32 here.
            top_k: common.top_k.filter(|&k| k > 0),
            min_p: common.min_p,
            repetition_penalty: penalty,
            // 0 is off, as in vLLM.
            min_tokens: common
                .min_tokens
                .filter(|&m| m > 0)
                .map(|m| u32::try_from(m).unwrap_or(u32::MAX)),
        };
        let seed = match common.seed {
            Some(seed) if seed >= 0 => seed as u64,
            _ => content_seed(self.engine.seed(), &prompt, &settings),
        };
        let request = engine::Request {
            max_tokens,
            stop: match common.stop {
                Stop::None => Vec::new(),
                Stop::One(s) => vec![s],
                Stop::Many(v) => v,
            },
            ignore_eos: common.ignore_eos,
            ..engine::Request::new(prompt, &settings, seed)
        };
        let c = self.engine.complete(request).await.map_err(|e| match e {
            EngineError::PromptTooLong { .. } => bad(e.to_string()),
            // A model error may carry a multi-line backtrace (candle adds one under
            // RUST_BACKTRACE): the log gets all of it, the client its first line.
            EngineError::Failed(_) => {
                let full = e.to_string();
                tracing::error!("a request failed: {full}");
                let first = full.lines().next().unwrap_or_default();
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{first} (the server's log has the details)"),
                )
            }
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Limits small enough for a test to pass them quickly.
    fn small() -> Limits {
        Limits {
            max_body_bytes: 1 << 20,
            header_timeout: Duration::from_millis(300),
            body_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
            max_connections: 4,
        }
    }

    /// A server whose handler answers 200 with the body's length, or panics when the path is
    /// `/panic`, or answers 16 MiB at `/big`.
    async fn server(limits: Limits) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let big = Bytes::from(vec![b'x'; 16 << 20]);
        let task = listen(listener, limits, move |req: Request<Bytes>| {
            let big = big.clone();
            async move {
                match req.uri().path() {
                    "/panic" => panic!("boom at {}", req.uri()),
                    "/big" => Ok::<_, std::convert::Infallible>(Response::new(Full::new(big))),
                    _ => Ok(json(
                        StatusCode::OK,
                        &serde_json::json!({"len": req.body().len()}),
                    )),
                }
            }
        });
        (addr, task)
    }

    /// Everything the server sends until it closes the connection (at most 10 s).
    async fn read_all(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("the server closes the connection within 10 s");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The first response on `stream`: head and a JSON body of `Content-Length` bytes.
    async fn read_response(stream: &mut TcpStream) -> (u16, String) {
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    let status = text[9..12].parse().unwrap();
                    return (status, text[..end + 4 + length].to_string());
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline.into(), stream.read(&mut chunk))
                .await
                .expect("a response within 10 s")
                .unwrap();
            assert!(n > 0, "closed before a whole response: {text:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_response(&mut s).await
    }

    /// Errors are the JSON of [`error`], with nothing of Rust's panic machinery in them.
    fn assert_json_error(response: &str, kind: &str) {
        let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], kind, "{response}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        for word in ["panicked", "backtrace", "RUST_BACKTRACE", "boom", ".rs:"] {
            assert!(!response.contains(word), "{word} in {response}");
        }
    }

    /// A body announced larger than the cap is answered 413 after 64 KiB of a 400 MiB body have
    /// been sent, so the server did not wait for (or store) the rest; a chunked body (no length
    /// announced) is cut off once it passes the cap. Both connections are then closed.
    #[tokio::test]
    async fn a_body_over_the_cap_is_refused_unread() {
        let (addr, _task) = server(small()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 419430400\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&vec![b'a'; 64 << 10]).await.unwrap();
        let (status, response) = read_response(&mut s).await;
        assert_eq!(status, 413, "{response}");
        assert_json_error(&response, "invalid_request_error");
        assert!(response.contains("1048576 bytes"), "{response}");
        read_all(&mut s).await;

        let s = TcpStream::connect(addr).await.unwrap();
        let (mut reader, mut writer) = s.into_split();
        writer
            .write_all(b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        // 3 MiB in 64 KiB chunks; the server may close before all of it is sent.
        let sender = tokio::spawn(async move {
            let chunk = format!("10000\r\n{}\r\n", "b".repeat(1 << 16));
            for _ in 0..48 {
                if writer.write_all(chunk.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        let mut head = vec![0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), reader.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 413");
        sender.await.unwrap();

        // The server still answers, and a body under the cap is read whole.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let (status, response) = read_response(&mut s).await;
        assert_eq!(status, 200);
        assert!(response.ends_with(r#"{"len":5}"#), "{response}");
    }

    /// Half a request head then silence (slowloris) is disconnected after the header timeout
    /// (300 ms here), as is a keep-alive connection idle after its answer; a body that stops
    /// coming is answered 408 after the body timeout.
    #[tokio::test]
    async fn stalled_clients_are_disconnected() {
        let (addr, _task) = server(small()).await;
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /x HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await
            .unwrap();
        read_all(&mut s).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "{took:?}"
        );

        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut s).await.0, 200);
        let idle = Instant::now();
        assert_eq!(read_all(&mut s).await, "", "nothing after the answer");
        assert!(idle.elapsed() < Duration::from_secs(5));

        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly ten.")
            .await
            .unwrap();
        let (status, response) = read_response(&mut s).await;
        assert_eq!(status, 408, "{response}");
        assert_json_error(&response, "invalid_request_error");
    }

    /// With a cap of 2 connections, a third is answered 503 (JSON, `Retry-After`) and closed;
    /// once one of the two closes, a new connection is served again.
    #[tokio::test]
    async fn connections_past_the_cap_get_503() {
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_secs(30),
            ..small()
        };
        let (addr, _task) = server(limits).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            // An answer proves the server accepted the connection and holds its place.
            s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(read_response(&mut s).await.0, 200);
            held.push(s);
        }
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (status, response) = read_response(&mut s).await;
        assert_eq!(status, 503, "{response}");
        assert!(
            response.to_ascii_lowercase().contains("retry-after: 1"),
            "{response}"
        );
        assert_json_error(&response, "server_error");
        read_all(&mut s).await;

        drop(held.pop());
        // The server notices the close when it next reads that connection: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (status, _) = get(addr, "/x").await;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still {status} after a connection closed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client that asks for a large answer and never reads it loses its connection after the
    /// write timeout: with a cap of one connection, a second client is served again (without the
    /// timeout it would get 503 forever).
    #[tokio::test]
    async fn a_client_that_never_reads_is_cut_off() {
        let limits = Limits {
            max_connections: 1,
            header_timeout: Duration::from_secs(30),
            ..small()
        };
        let (addr, _task) = server(limits).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stuck = socket.connect(addr).await.unwrap();
        stuck
            .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut saw_503 = false;
        loop {
            let (status, _) = get(addr, "/x").await;
            if status == 200 {
                break;
            }
            saw_503 |= status == 503;
            assert!(
                Instant::now() < deadline,
                "still {status} 5 s after the write stalled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            saw_503,
            "the stalled connection held the only place at first"
        );
        drop(stuck);
    }

    /// A handler that panics gets its client a JSON 500 that says nothing of the panic, and the
    /// server goes on answering.
    #[tokio::test]
    async fn a_panicking_handler_answers_json_500() {
        let (addr, _task) = server(small()).await;
        let (status, response) = get(addr, "/panic").await;
        assert_eq!(status, 500, "{response}");
        assert_json_error(&response, "server_error");
        assert_eq!(get(addr, "/x").await.0, 200);
    }

    /// The pauses after accept errors in a row: 5 ms doubling, capped at 1 s (so a listener out of
    /// file descriptors wakes at most once a second), never overflowing.
    #[test]
    fn accept_pauses_grow_to_one_second() {
        let ms: Vec<u128> = (0..10).map(|n| accept_pause(n).as_millis()).collect();
        assert_eq!(ms, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(accept_pause(u32::MAX), Duration::from_secs(1));
    }

    /// Which accept errors are retried at once (the peer gave up) and which wait.
    #[test]
    fn out_of_descriptors_is_not_per_connection() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let enfile = std::io::Error::from_raw_os_error(libc::ENFILE);
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert!(!is_per_connection(&emfile) && !is_per_connection(&enfile));
        assert!(is_per_connection(&aborted));
    }

    /// `phigen serve` refuses a checkpoint whose tokenizer makes ids its embedding lacks (the
    /// tiny-phi preset's 512 with GPT-2's 50,257 ids), naming the model, both sizes and the fix;
    /// at 50,304 it serves.
    #[tokio::test]
    async fn serve_refuses_a_vocab_smaller_than_its_tokenizer() {
        use crate::model::{checkpoint, tokenizer::Encoding, PhiConfig, Preset};
        let tmp = tempfile::tempdir().unwrap();
        let engine = |vocab_size: usize| {
            let dir = tmp.path().join(format!("v{vocab_size}"));
            let cfg = PhiConfig {
                vocab_size,
                ..PhiConfig::preset(Preset::TinyPhi)
            };
            checkpoint::save_random(&dir, &cfg, 0, candle_core::DType::F32, Encoding::Gpt2)
                .unwrap();
            let model =
                LocalModel::load(dir.to_str().unwrap(), candle_core::DType::F32, false).unwrap();
            (dir, Arc::new(Engine::start(Arc::new(model), 1, 0)))
        };
        let (dir, small_vocab) = engine(512);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = start(listener, small_vocab, "tiny".into(), Limits::default())
            .unwrap_err()
            .to_string();
        for part in [
            dir.to_str().unwrap(),
            "512",
            "gpt2",
            "50256",
            "50257",
            "phigen init",
        ] {
            assert!(err.contains(part), "{part} not in {err}");
        }
        let (_, fits) = engine(50_304);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _task = start(listener, fits, "tiny".into(), Limits::default()).unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let body = r#"{"prompt": "Hello, world", "max_tokens": 3}"#;
        s.write_all(
            format!(
                "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let (status, response) = read_response(&mut s).await;
        assert_eq!(status, 200, "{response}");
        assert!(response.contains("\"completion_tokens\":3"), "{response}");
    }
}

//! A deterministic OpenAI-compatible server on loopback, for tests, benchmarks and offline trials
//! of a pipeline (`phigen mock-server`).
//!
//! It answers `POST …/chat/completions` from the prompt alone: the answer quotes every word the
//! prompt puts in double quotes (so constraint checks pass), contains a line of dialogue, and varies
//! with a hash of the prompt (so answers are not duplicates). Faults are injected deterministically:
//! whether the n-th request carrying a given prompt fails depends only on (prompt, n), so a run with
//! faults is reproducible and retries eventually succeed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::cli::numbers::{self, f64_in, int_in, MAX_SECONDS};

/// Probabilities (0–1) of each fault per request, and how the faults behave.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Faults {
    /// Share of requests answered 429 with a `Retry-After` header.
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_429: f64,
    /// `Retry-After` sent with 429/503, in seconds (a number) or as an HTTP date when negative.
    #[arg(long, default_value_t = 0.05, value_parser = f64_in(numbers::closed(-MAX_SECONDS, MAX_SECONDS)))]
    pub retry_after_secs: f64,
    /// Share of requests answered 500.
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_500: f64,
    /// Share of requests answered 503 with `Retry-After`.
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_503: f64,
    /// Share of requests answered only after `--slow-secs` (to trip client timeouts).
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_slow: f64,
    /// How long a slow answer waits, in seconds.
    #[arg(long, default_value_t = 5.0, value_parser = f64_in(numbers::closed(0.0, MAX_SECONDS)))]
    pub slow_secs: f64,
    /// Share of requests answered 200 with a body that is not JSON.
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_malformed: f64,
    /// Share of requests whose answer is cut short with `finish_reason: "length"`.
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_length: f64,
    /// Share of requests whose connection is closed without any response.
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_drop: f64,
    /// Share of requests answered with a refusal ("I'm sorry, but I can't…").
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_refuse: f64,
    /// Share of requests answered with one fixed text (exact duplicates of each other).
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_duplicate: f64,
    /// For prompts that ask for Python: share of answers whose code block does not parse.
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_bad_code: f64,
    /// For prompts that ask for Python: share of answers without any code block.
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_no_code: f64,
    /// For prompts that ask for Python: share of answers whose code fails when run (an
    /// exercise's asserts; a textbook section's program raises).
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::UNIT))]
    pub rate_failing_tests: f64,
    /// Answer every request 401 (a revoked key).
    #[arg(long)]
    pub unauthorized: bool,
    /// Answer 500 to every request whose prompt contains this text (to lose one kind of request,
    /// e.g. the summaries of `phigen stories --instruct`, while the others succeed).
    #[arg(long)]
    pub fail_containing: Option<String>,
    /// Fixed delay before every answer, in milliseconds (0 = answer at once).
    #[arg(long, default_value_t = 0, value_parser = int_in(0u64, 86_400_000))]
    pub latency_ms: u64,
}

/// What the server saw, for assertions.
#[derive(Debug, Default)]
pub struct MockLog {
    pub requests: AtomicU64,
    pub answered: AtomicU64,
    /// How often each prompt was received (all requests, faults included).
    pub per_prompt: Mutex<HashMap<String, u64>>,
}

pub struct MockServer {
    pub addr: SocketAddr,
    pub log: Arc<MockLog>,
    task: tokio::task::JoinHandle<()>,
}

impl MockServer {
    /// Binds `addr` (use port 0 for a free one) and serves in the background, within the
    /// default [`Limits`] of `phigen serve`.
    pub async fn start(addr: SocketAddr, faults: Faults) -> std::io::Result<MockServer> {
        Self::start_with_limits(addr, faults, Limits::default()).await
    }

    /// [`MockServer::start`] within `limits`.
    pub async fn start_with_limits(
        addr: SocketAddr,
        faults: Faults,
        limits: Limits,
    ) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let log = Arc::new(MockLog::default());
        let state = Arc::new(State {
            faults,
            log: log.clone(),
        });
        // A handler error (the "drop" fault) makes hyper close the connection unanswered.
        let task = super::serve::listen(listener, limits, move |req| handle(state.clone(), req));
        Ok(MockServer { addr, log, task })
    }

    /// The base URL to pass as `--base-url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    faults: Faults,
    log: Arc<MockLog>,
}

#[derive(Debug, thiserror::Error)]
#[error("connection dropped on purpose")]
struct Dropped;

use super::serve::{json, Body, Limits};

async fn handle(state: Arc<State>, req: Request<Bytes>) -> Result<Response<Body>, Dropped> {
    let path = req.uri().path().to_string();
    if req.method() == hyper::Method::GET && path.ends_with("/models") {
        return Ok(json(
            StatusCode::OK,
            &serde_json::json!({"object": "list", "data": [{"id": "mock", "object": "model"}]}),
        ));
    }
    if !path.ends_with("/chat/completions") {
        return Ok(json(StatusCode::NOT_FOUND, &error_body("no such route")));
    }
    let f = &state.faults;
    let body = req.into_body();
    state.log.requests.fetch_add(1, Ordering::Relaxed);
    let Chat {
        prompt,
        model,
        max_tokens,
    } = match Chat::parse(&body) {
        Ok(c) => c,
        Err(refusal) => return Ok(*refusal),
    };
    let seen = {
        let mut per = state
            .log
            .per_prompt
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = per.entry(prompt.clone()).or_insert(0);
        *n += 1;
        *n
    };
    if f.unauthorized {
        return Ok(json(
            StatusCode::UNAUTHORIZED,
            &error_body("Incorrect API key provided"),
        ));
    }
    if f.fail_containing
        .as_ref()
        .is_some_and(|t| prompt.contains(t.as_str()))
    {
        return Ok(json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &error_body("internal error (--fail-containing)"),
        ));
    }
    if f.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(f.latency_ms)).await;
    }
    // One uniform draw per (prompt, n) walks the cumulative fault rates.
    let mut u = unit(&prompt, seen, 0);
    let mut hit = |rate: f64| {
        if u < rate {
            u = f64::INFINITY; // at most one fault per request
            true
        } else {
            u -= rate;
            false
        }
    };
    if let Some(fault) = error_fault(f, &mut hit) {
        return fault;
    }
    if hit(f.rate_slow) {
        tokio::time::sleep(Duration::from_secs_f64(f.slow_secs)).await;
    }
    let (mut text, mut finish) = if hit(f.rate_refuse) {
        (
            "I'm sorry, but I can't help with that request.".to_string(),
            "stop",
        )
    } else if hit(f.rate_duplicate) {
        (DUPLICATE_ANSWER.to_string(), "stop")
    } else {
        let code = if !prompt.contains("Python") {
            Code::None
        } else if hit(f.rate_bad_code) {
            Code::Broken
        } else if hit(f.rate_no_code) {
            Code::None
        } else if hit(f.rate_failing_tests) {
            Code::Failing
        } else {
            Code::Good
        };
        (answer_for(&prompt, code), "stop")
    };
    let mut completion_tokens = text.split_whitespace().count() as u64;
    if hit(f.rate_length) || completion_tokens > max_tokens {
        let keep = (completion_tokens / 2).min(max_tokens) as usize;
        text = text
            .split_whitespace()
            .take(keep)
            .collect::<Vec<_>>()
            .join(" ");
        completion_tokens = keep as u64;
        finish = "length";
    }
    state.log.answered.fetch_add(1, Ordering::Relaxed);
    Ok(completion(
        &prompt,
        seen,
        &model,
        &text,
        finish,
        completion_tokens,
    ))
}

/// The faults that answer with an error, or no answer: 429, 500, 503, a dropped connection, a
/// malformed body.
fn error_fault(
    f: &Faults,
    hit: &mut impl FnMut(f64) -> bool,
) -> Option<Result<Response<Body>, Dropped>> {
    let response = if hit(f.rate_429) {
        with_retry_after(
            json(
                StatusCode::TOO_MANY_REQUESTS,
                &error_body("Rate limit reached"),
            ),
            f.retry_after_secs,
        )
    } else if hit(f.rate_500) {
        json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &error_body("internal error"),
        )
    } else if hit(f.rate_503) {
        with_retry_after(
            json(StatusCode::SERVICE_UNAVAILABLE, &error_body("overloaded")),
            f.retry_after_secs,
        )
    } else if hit(f.rate_drop) {
        return Some(Err(Dropped));
    } else if hit(f.rate_malformed) {
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                b"{\"id\": \"x\", \"choices\": [",
            )))
            .expect("static response is valid")
    } else {
        return None;
    };
    Some(Ok(response))
}

/// What the mock reads of a chat request: the last message, the model and the token limit.
struct Chat {
    prompt: String,
    model: String,
    max_tokens: u64,
}

impl Chat {
    /// The request, or the error answer an OpenAI server gives for it (400 for a body it cannot
    /// read, 404 for [`MISSING_MODEL`]).
    fn parse(body: &[u8]) -> Result<Chat, Box<Response<Body>>> {
        let request: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            Box::new(json(
                StatusCode::BAD_REQUEST,
                &error_body(&format!("body is not JSON: {e}")),
            ))
        })?;
        let prompt = request["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                Box::new(json(
                    StatusCode::BAD_REQUEST,
                    &error_body("messages[-1].content missing"),
                ))
            })?;
        let model = request["model"].as_str().unwrap_or("mock").to_string();
        if model == MISSING_MODEL {
            return Err(Box::new(json(
                StatusCode::NOT_FOUND,
                &error_body(&format!("The model `{model}` does not exist")),
            )));
        }
        let max_tokens = request["max_completion_tokens"]
            .as_u64()
            .or(request["max_tokens"].as_u64())
            .unwrap_or(u64::MAX);
        Ok(Chat {
            prompt,
            model,
            max_tokens,
        })
    }
}

/// A `chat.completion` answer with `text`; tokens are counted as words, as the mock's usage is.
fn completion(
    prompt: &str,
    seen: u64,
    model: &str,
    text: &str,
    finish: &str,
    completion_tokens: u64,
) -> Response<Body> {
    let prompt_tokens = prompt.split_whitespace().count() as u64;
    json(
        StatusCode::OK,
        &serde_json::json!({
            "id": format!("chatcmpl-{:016x}", hash64(prompt, seen, 1)),
            "object": "chat.completion",
            "created": 1_700_000_000u32,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }),
    )
}

/// A model name the mock answers 404 for, as OpenAI does for unknown models.
pub const MISSING_MODEL: &str = "missing-model";

const DUPLICATE_ANSWER: &str = "Once upon a time there was a little cat. The cat sat in the warm sun all day. \"I like the sun,\" said the cat. A bird came to play with the cat. They ran and jumped in the green grass. Then they took a long nap together under a big tree. The end.";

const OPENINGS: &[&str] = &[
    "Once upon a time,",
    "One sunny day,",
    "Long ago,",
    "There was once",
    "Every morning,",
];
const FILLER: &[&str] = &[
    "the dog ran to the park",
    "a little bird sang a song",
    "mom made a big cake",
    "the sun was warm and bright",
    "they played with a red ball",
    "the boy found a shiny stone",
    "the girl had a soft toy",
    "a friendly frog jumped high",
    "the tree was tall and green",
    "they shared the food",
    "the cat took a long nap",
    "a small boat went on the lake",
];

/// A deterministic answer that uses every double-quoted word of the prompt.
/// The Python an answer carries.
#[derive(Clone, Copy, PartialEq)]
enum Code {
    None,
    Good,
    Broken,
    /// Parses, but fails when run: its asserts (exercises), its program (textbook sections).
    Failing,
}

/// A deterministic answer that uses every double-quoted word of the prompt; prompts that ask for
/// Python get a longer, textbook-like answer with a code block.
fn answer_for(prompt: &str, code: Code) -> String {
    if prompt.contains("educational value") {
        return rate_code(prompt);
    }
    if prompt.contains("grade the student's completion") {
        return grade_story(prompt);
    }
    if prompt.contains("follows the instructions") {
        return judge_instructions(prompt);
    }
    if prompt.contains("You are judging answers to the same request") {
        return judge_responses(prompt);
    }
    if prompt.contains("per line as a numbered list") {
        return topic_list(prompt);
    }
    if prompt.contains("### Assistant") && prompt.contains("Exchanges: ") {
        return conversation(prompt, code);
    }
    let quoted: Vec<&str> = prompt
        .split(['"', '“', '”'])
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.len() < 40)
        .collect();
    let h = hash64(prompt, 0, 2);
    let mut parts = vec![OPENINGS[(h % OPENINGS.len() as u64) as usize].to_string()];
    if !quoted.is_empty() {
        parts.push(format!("there was a story about {}.", quoted.join(" and ")));
    }
    parts.push("\"Look at this!\" said Tom.".into());
    for i in 0..6u64 {
        let f = FILLER[((h >> (i * 5)) % FILLER.len() as u64) as usize];
        parts.push(format!("Then {f}."));
    }
    parts.push(format!(
        "It was day {} and everyone was happy.",
        h % 100_000
    ));
    // Textbook prompts, prose ones included, get a section's length.
    if prompt.contains("Python") || prompt.contains("textbook") {
        for i in 0..18u64 {
            let f = FILLER[((h >> (i * 3)) % FILLER.len() as u64) as usize];
            parts.push(format!("In the next example {f}."));
        }
    }
    let n = h % 1000;
    // Exercise prompts quote the function name and ask for asserts.
    if let Some(name) = quoted
        .iter()
        .find(|q| q.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .filter(|_| prompt.contains("`assert`"))
    {
        let expected = if code == Code::Failing { n + 2 } else { n + 1 };
        match code {
            Code::None => {}
            Code::Broken => parts.push(format!("\n\n```python\ndef {name}(x)\n    return x + 1\n```\n")),
            Code::Good | Code::Failing => parts.push(format!(
                "\n\n```python\ndef {name}(x):\n    \"\"\"Return x plus one, e.g. {name}(1) == 2.\"\"\"\n    return x + 1\n\nassert {name}(1) == 2\nassert {name}({n}) == {expected}\n```\n"
            )),
        }
        return parts.join(" ");
    }
    match code {
        Code::None => {}
        Code::Good => parts.push(format!(
            "\n\n```python\ndef step_{n}(x):\n    return x + {n}\n\nprint(step_{n}(1))\n```\n"
        )),
        Code::Failing => parts.push(format!(
            "\n\n```python\ndef step_{n}(x):\n    return x + {n}\n\nprint(step_{n}(1) / 0)\n```\n"
        )),
        Code::Broken => parts.push(format!(
            "\n\n```python\nfor i in range({n})\n    print(i)\n```\n"
        )),
    }
    parts.join(" ")
}

/// A chat-data prompt (`phigen chat-data`: `### User` / `### Assistant` blocks, `Exchanges: N`)
/// gets a well-formed conversation of N exchanges (1 if the line is missing, at most 20), its
/// sentences drawn from a hash of the prompt. The first answer holds a Python block when the
/// prompt names Python (one that does not parse with `--rate-bad-code`, none with
/// `--rate-no-code`), and a small one anyway for a third of the other prompts.
fn conversation(prompt: &str, code: Code) -> String {
    const NOUNS: [&str; 16] = [
        "river", "engine", "garden", "market", "planet", "bridge", "library", "kitchen", "forest",
        "harbor", "school", "clock", "orchard", "castle", "meadow", "workshop",
    ];
    const VERBS: [&str; 12] = [
        "feeds", "moves", "shapes", "measures", "protects", "connects", "warms", "balances",
        "changes", "follows", "supports", "lights",
    ];
    let turns = prompt
        .lines()
        .find_map(|l| l.strip_prefix("Exchanges: "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(1)
        .clamp(1, 20);
    let topic = prompt
        .lines()
        .find_map(|l| l.strip_prefix("Topic: "))
        .unwrap_or("this")
        .trim();
    let h = hash64(prompt, 0, 7);
    let n = h % 1000;
    let mut blocks = Vec::new();
    for i in 0..turns {
        let g = hash64(prompt, i + 1, 7);
        let clause = |k: u64| {
            let x = g >> (k * 8);
            format!(
                "the {} {} the {}",
                NOUNS[(x % 16) as usize],
                VERBS[((x >> 4) % 12) as usize],
                NOUNS[((x >> 2) % 16) as usize]
            )
        };
        let question = if i == 0 {
            format!(
                "Can you help me with {topic}? I read that {} and that {}.",
                clause(0),
                clause(1)
            )
        } else {
            format!("Thanks. And what if {}? (follow-up {})", clause(0), i + 1)
        };
        let mut answer = format!(
            "Good question. In short, {}, so {}. After that {}, which is why {}. Remember the number {}.",
            clause(2),
            clause(3),
            clause(4),
            clause(5),
            g % 100_000
        );
        let code = match code {
            Code::None if h.is_multiple_of(3) => Code::Good,
            c => c,
        };
        if i == 0 {
            match code {
                Code::None => {}
                Code::Good | Code::Failing => answer.push_str(&format!(
                    "\n\n```python\ndef step_{n}(x):\n    return x + {n}\n\nprint(step_{n}(1))\n```"
                )),
                Code::Broken => answer.push_str(&format!(
                    "\n\n```python\nfor i in range({n})\n    print(i)\n```"
                )),
            }
        }
        blocks.push(format!("### User\n{question}\n\n### Assistant\n{answer}"));
    }
    blocks.join("\n\n")
}

/// A rating prompt (`phigen annotate`) gets a rule-of-thumb rating of the fenced code: 4 with a
/// docstring and a function, 2 with a function only, else 0.
fn rate_code(prompt: &str) -> String {
    let code = prompt.split("```").nth(1).unwrap_or("");
    let (score, reason) = match (code.contains("\"\"\""), code.contains("def ")) {
        (true, true) => (4, "Documented functions a student can follow."),
        (false, true) => (2, "Working functions without explanation."),
        _ => (0, "Data or generated code with no logic to learn from."),
    };
    format!("{reason}\nScore: {score}")
}

/// A story-grading prompt (`phigen eval stories`) gets grades from a hash of the prompt (1–10) and
/// an age group, in the rubric's five lines.
fn grade_story(prompt: &str) -> String {
    let h = hash64(prompt, 0, 3);
    let g = |i: u64| 1 + (h >> (8 * i)) % 10;
    let age = ["A", "B", "C", "D", "E", "F"][((h >> 40) % 6) as usize];
    format!(
        "The completion continues the story.\nGrammar: {}/10\nCreativity: {}/10\nConsistency: {}/10\nPlot: {}/10\nAge group: {age}",
        g(0), g(1), g(2), g(3)
    )
}

/// A preference-judging prompt (`phigen prefs`, prompts/prefs-judge.txt) gets a score from 1 to
/// 10 for each response it shows (`### Response K` headings), from a hash of the prompt and K, in
/// the `Response K: N/10` lines the rubric asks for.
fn judge_responses(prompt: &str) -> String {
    let count = prompt
        .lines()
        .filter(|l| l.trim_start().starts_with("### Response "))
        .count();
    let mut lines = vec!["The responses differ in how well they answer.".to_string()];
    for k in 1..=count {
        lines.push(format!(
            "Response {k}: {}/10",
            1 + hash64(prompt, k as u64, 5) % 10
        ));
    }
    lines.join("\n")
}

/// An instruction-following prompt (`phigen eval stories --instruct`) gets an answer to each
/// labelled line it asks for, from a hash of the prompt: `Consistency: N/10` (1–10) and
/// `<Feature>: yes|no`.
fn judge_instructions(prompt: &str) -> String {
    let h = hash64(prompt, 0, 4);
    let mut lines = vec!["The story follows some of the instructions.".to_string()];
    for (i, line) in prompt.lines().enumerate() {
        if line.starts_with("Consistency: N/10") {
            lines.push(format!("Consistency: {}/10", 1 + h % 10));
        } else if let Some(label) = line.strip_suffix(": yes or no") {
            let yes = (h >> (i % 64)) & 1 == 1;
            lines.push(format!("{label}: {}", if yes { "yes" } else { "no" }));
        }
    }
    lines.join("\n")
}

/// A list prompt (`phigen topics`: "List N …, one … per line as a numbered list") gets N numbered
/// three-word topics drawn from a hash of the prompt, each fourth the one before it plus
/// "basics" (a near duplicate); N is the number after "List" (10 if none, at most 200).
fn topic_list(prompt: &str) -> String {
    const WORDS: [&str; 40] = [
        "energy", "water", "light", "cells", "trade", "music", "maps", "soil", "money", "time",
        "rivers", "stars", "bread", "tools", "trees", "sound", "heat", "birds", "rocks", "wind",
        "fairness", "friends", "numbers", "plants", "weather", "habits", "seasons", "machines",
        "stories", "colours", "markets", "oceans", "forests", "engines", "letters", "games",
        "shadows", "bridges", "gardens", "clocks",
    ];
    let count = prompt
        .split_whitespace()
        .skip_while(|w| *w != "List")
        .nth(1)
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(10)
        .min(200);
    let mut lines = Vec::new();
    let mut previous = String::new();
    for i in 0..count {
        let item = if i % 4 == 3 {
            format!("{previous} basics")
        } else {
            let h = hash64(prompt, i, 6);
            let w = |k: u64| WORDS[((h >> (k * 16)) % WORDS.len() as u64) as usize];
            format!("{} {} {}", w(0), w(1), w(2))
        };
        lines.push(format!("{}. {item}", i + 1));
        previous = item;
    }
    lines.join("\n")
}

fn hash64(prompt: &str, n: u64, salt: u8) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&[salt]);
    h.update(&n.to_le_bytes());
    h.update(prompt.as_bytes());
    let bytes = h.finalize();
    u64::from_le_bytes(
        bytes.as_bytes()[..8]
            .try_into()
            .expect("blake3 gives 32 bytes"),
    )
}

fn unit(prompt: &str, n: u64, salt: u8) -> f64 {
    (hash64(prompt, n, salt) >> 11) as f64 / (1u64 << 53) as f64
}

fn error_body(message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"message": message, "type": "mock_error"}})
}

/// Adds `Retry-After`: delta-seconds when `secs >= 0`, else an HTTP date `|secs|` from now.
fn with_retry_after(mut response: Response<Body>, secs: f64) -> Response<Body> {
    let value = if secs >= 0.0 {
        format!("{secs}")
    } else {
        httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs_f64(-secs))
    };
    response.headers_mut().insert(
        "retry-after",
        value.parse().expect("a number or date is a valid header"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mock server shares `phigen serve`'s limits: a body over the cap is answered 413 in
    /// JSON, and a body under it is still answered.
    #[tokio::test]
    async fn the_mock_server_refuses_a_body_over_the_cap() {
        let limits = Limits {
            max_body_bytes: 1024,
            ..Limits::default()
        };
        let server = MockServer::start_with_limits(
            "127.0.0.1:0".parse().unwrap(),
            Faults::default(),
            limits,
        )
        .await
        .unwrap();
        let client = reqwest::Client::new();
        let url = format!("{}/chat/completions", server.base_url());
        let long = "word ".repeat(1000);
        let refused = client
            .post(&url)
            .json(&serde_json::json!({"messages": [{"role": "user", "content": long}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 413);
        let body: serde_json::Value = refused.json().await.unwrap();
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1024 bytes"));
        let answered = client
            .post(&url)
            .json(&serde_json::json!({"messages": [{"role": "user", "content": "a \"cat\""}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(answered.status(), 200);
        assert_eq!(server.log.requests.load(Ordering::Relaxed), 1);
    }
}

//! The teacher: an LLM that writes the synthetic data.
//!
//! One trait, [`Teacher`], with an OpenAI-compatible HTTP backend ([`openai::OpenAiTeacher`]) that
//! works against OpenAI, vLLM, llama.cpp server and Ollama. Retries, the shared slow-down of the
//! worker pool and token accounting live here so every corpus gets them for free; the generation
//! engine (`crate::generate`) only sees a finished answer or a typed failure.

pub mod engine;
pub mod factory;
pub mod local;
pub mod mock;
pub mod openai;
pub mod pricing;
pub mod retry;
pub mod serve;

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Sampling parameters sent with every request; stored with each record and part of its id.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: u32,
    /// Top-k and min-p where asked for (`--top-k`, `--min-p`). `None`: the HTTP teacher sends
    /// nothing (the server's defaults), the local teacher samples the whole distribution. Absent
    /// from the record ids when `None`, so ids of runs without them are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// `--repetition-penalty` where asked for: sent to an HTTP teacher as `repetition_penalty`
    /// (vLLM) and `repeat_penalty` (llama.cpp's server); the local teacher applies it to the
    /// last [`engine::REPEAT_LAST_N`] ids. Absent from the record ids when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// `--min-tokens` where asked for: the answer's end-of-sequence tokens get probability 0
    /// until it has this many tokens (the local teacher), sent to an HTTP teacher as vLLM's
    /// `min_tokens`. Absent from the record ids when `None` (0 is off and recorded as `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
}

impl Sampling {
    /// How phigen's own decoder samples under these settings, seeded by `seed`: temperature 0 is
    /// greedy; top-p 1, top-k 0 and min-p 0 are off (as the APIs read them).
    pub fn decoding(&self, seed: u64) -> crate::model::sample::Sampling {
        crate::model::sample::Sampling::new(
            f64::from(self.temperature),
            f64::from(self.top_p),
            self.top_k.map(|k| k as usize),
            self.min_p.map(f64::from),
            seed,
        )
    }
}

/// The sampling seed of the request for the record `id`: 31 bits of its hash, so that every
/// server's `seed` field holds it (llama.cpp reads a uint32, some servers an int32). The same
/// record gets the same seed from every teacher and at any concurrency; the next attempt of a
/// slot (another id) gets another.
pub fn request_seed(id: &str) -> u64 {
    let digest = blake3::hash(id.as_bytes());
    let head: [u8; 4] = digest.as_bytes()[..4]
        .try_into()
        .expect("a digest has 32 bytes");
    u64::from(u32::from_le_bytes(head) >> 1)
}

/// Why the model stopped, as reported by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    /// Cut off by `max_tokens`: the text is incomplete.
    Length,
    ContentFilter,
    Other,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Other => "other",
        }
    }
}

/// Token counts reported by the server's `usage` block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One finished answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// Requests sent for this answer, retries included (1 = first try succeeded).
    pub attempts: u32,
}

/// A request that did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    /// 401/403: nothing will work until the key is fixed, so the run stops at once.
    #[error("the server at {url} refused the credentials (HTTP {status}): check the key in the environment variable `{key_var}`{hint}")]
    Auth {
        url: String,
        status: u16,
        key_var: String,
        hint: &'static str,
    },
    /// 400/404/422…: the request itself is wrong (model name, parameters); retrying cannot help.
    #[error("the server at {url} rejected the request (HTTP {status}): {body}")]
    Rejected {
        url: String,
        status: u16,
        body: String,
    },
    /// The prompt does not fit the local teacher's context. Like a rejected request this is the
    /// prompt's fault, not the teacher's: that record fails, the others go on, nothing is retried.
    #[error("the local teacher {model} cannot take this prompt: it has {prompt} tokens, the model's context is {context}; shorten the prompt (its template or inputs) or pick a teacher with a longer context")]
    PromptTooLong {
        model: String,
        prompt: usize,
        context: usize,
    },
    /// Retryable failures (429, 5xx, timeouts, dropped connections, malformed bodies) that kept failing.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: String },
    /// The in-process model failed; it would fail the same way for every other request.
    #[error("the local teacher {model} failed: {reason}")]
    Local { model: String, reason: String },
    // The variants below are set-up errors of [`factory`]: the teacher's settings, before any
    // request is sent.
    /// A setting outside its range (a recipe's; the CLI's value parsers refuse these earlier).
    #[error("{flag} {found}: {expected}; pass a value in that range")]
    Setting {
        flag: &'static str,
        found: String,
        expected: String,
    },
    #[error("--teacher {found:?}: expected `http` or `local:SPEC` (SPEC: a checkpoint directory, a .gguf file or a Hugging Face id such as {})", local::DEFAULT_MODEL)]
    BadSpec { found: String },
    #[error("{given} was given without {missing}: pass both (USD per 1M input and output tokens) or neither")]
    HalfPrice {
        given: &'static str,
        missing: &'static str,
    },
    #[error("--max-cost needs the price of `{model}`, which phigen does not know: pass --price-input and --price-output (USD per 1M tokens; 0 for a local server)")]
    UnknownPrice { model: String },
    #[error("could not load the local teacher `{spec}`: {source}")]
    Load {
        spec: String,
        source: Box<crate::model::ModelError>,
    },
    #[error(transparent)]
    Http(#[from] Box<openai::SetupError>),
}

impl TeacherError {
    /// Errors after which no other request can succeed either: stop the whole run.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            TeacherError::Rejected { .. }
                | TeacherError::PromptTooLong { .. }
                | TeacherError::Exhausted { .. }
        )
    }
}

/// An LLM that answers a chat prompt. Implementations handle their own retries.
pub trait Teacher: Send + Sync + 'static {
    /// The model name recorded with each record and used in its id.
    fn model(&self) -> &str;
    fn sampling(&self) -> Sampling;
    /// Sends one user prompt and waits for the complete answer, sampled with `seed` (see
    /// [`request_seed`]) where the backend takes one.
    fn chat(
        &self,
        prompt: &str,
        seed: u64,
    ) -> impl Future<Output = Result<Answer, TeacherError>> + Send;
    /// A caveat about the data this teacher writes, recorded in `stats.json`.
    fn note(&self) -> Option<&str> {
        None
    }
    /// Counters of what the backend did (requests, retries, throttling) for progress and stats.
    fn counters(&self) -> &retry::RequestCounters;
}

/// Settings shared by every HTTP teacher; filled from the common CLI flags.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Base URL of the OpenAI-compatible API, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub model: String,
    /// Name of the environment variable that holds the key (the key itself is never stored here).
    pub api_key_env: String,
    pub sampling: Sampling,
    pub timeout: Duration,
    pub concurrency: usize,
    pub retry: retry::RetryPolicy,
    pub max_tokens_field: MaxTokensField,
}

/// Which request field carries the output limit: OpenAI's current API wants `max_completion_tokens`,
/// older servers (and some local ones) only read `max_tokens`. Recipes name it as the CLI does
/// (`auto`, `max-tokens`, `max-completion-tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaxTokensField {
    /// `max_completion_tokens` for api.openai.com, `max_tokens` elsewhere.
    Auto,
    MaxTokens,
    MaxCompletionTokens,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record's seed is a function of its id alone, fits in 31 bits (an int32 `seed` field
    /// holds it), and two ids get two seeds.
    #[test]
    fn request_seeds_come_from_the_record_id() {
        let a = "30cb8700c581e1a6c6386d611e5c1aa4";
        let b = "56a8131cb7d0bc90f5370fed97da41bc";
        assert_eq!(request_seed(a), request_seed(a));
        assert_ne!(request_seed(a), request_seed(b));
        assert!(request_seed(a) < 1 << 31 && request_seed(b) < 1 << 31);
    }

    /// Temperature 0 is greedy; the rest as [`crate::model::sample::Sampling::new`] reads the
    /// APIs' settings, with the seed given.
    #[test]
    fn wire_settings_convert_to_the_decoder_sampler() {
        use crate::model::sample::Sampling as Decoding;
        let s = Sampling {
            temperature: 0.7,
            top_p: 1.0,
            max_tokens: 10,
            top_k: Some(40),
            min_p: Some(0.05),
            repetition_penalty: None,
            min_tokens: None,
        };
        assert_eq!(
            s.decoding(3),
            Decoding::Random {
                temperature: f64::from(0.7f32),
                top_k: Some(40),
                top_p: None,
                min_p: Some(f64::from(0.05f32)),
                seed: 3
            }
        );
        let greedy = Sampling {
            temperature: 0.0,
            ..s
        };
        assert_eq!(greedy.decoding(3), Decoding::Greedy);
    }
}

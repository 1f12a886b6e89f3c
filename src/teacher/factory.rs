//! Which teacher a run uses and what it pays: the settings every teacher-driven stage shares
//! ([`TeacherConfig`], the CLI's teacher flags as plain data a recipe can hold), the choice
//! between the HTTP API and an in-process model ([`TeacherConfig::resolve`]), the price policy,
//! and loading a local model ([`local_engine`]). The generation driver
//! (`crate::generate::run`) builds the teacher from these.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::engine::Engine;
use super::local::{self, LocalModel};
use super::pricing::{default_price, Price};
use super::{MaxTokensField, Sampling, TeacherError};
use crate::range::{self, Ints};

/// The default API (`--base-url` when only `--teacher http` or a key is given).
pub const OPENAI_URL: &str = "https://api.openai.com/v1";

/// A local teacher's default sampling: the settings Qwen publishes with its Qwen2/2.5 instruct
/// models (`generation_config.json`: temperature 0.7, top-p 0.8, top-k 20, repetition penalty
/// 1.05) and llama.cpp's min-p 0.05. An API's defaults (the whole distribution at 1.0) suit
/// GPT-class teachers; a small model's tail is noise. On the default local teacher,
/// Qwen2.5-Coder-0.5B-Instruct (textbooks, n 80, seed 1, README): 80 of 88 answers kept (91%),
/// 70% of them runnable, against the earlier defaults (temperature 1.0, top-p 1, top-k 40, no
/// penalty): 80 of 96 kept (83%), 59% runnable, and 12.0 against 9.0 sections a minute.
pub const LOCAL_TEMPERATURE: f32 = 0.7;
pub const LOCAL_TOP_P: f32 = 0.8;
pub const LOCAL_TOP_K: u32 = 20;
pub const LOCAL_MIN_P: f32 = 0.05;
pub const LOCAL_REPETITION_PENALTY: f32 = 1.05;

/// `--top-k`: at least one token, at most a vocabulary far beyond any model's.
pub const TOP_K: Ints<u32> = Ints {
    min: 1,
    max: 1_000_000,
};
/// `--min-tokens`: tokens an answer must have before it may end (0: off); at most `--max-tokens`.
/// Off unless given, for every teacher: on SmolLM2-135M it turned too-short textbook sections
/// into loops and syntax errors more than into kept ones (README, "The local teacher").
pub const MIN_TOKENS: Ints<u32> = Ints {
    min: 0,
    max: 10_000_000,
};
/// `--max-tokens`: output tokens of one answer.
pub const MAX_TOKENS: Ints<u32> = Ints {
    min: 1,
    max: 10_000_000,
};
/// `--concurrency`: requests in flight (sequences batched, for a local teacher).
pub const CONCURRENCY: Ints<usize> = Ints {
    min: 1,
    max: 10_000,
};
/// `--retries`: retries of one request.
pub const RETRIES: Ints<u32> = Ints { min: 0, max: 100 };

/// Who writes the data: `http` (the OpenAI-compatible API at the base URL) or `local:SPEC`, a
/// model run inside phigen (SPEC: a checkpoint directory, a .gguf file or a Hugging Face id).
/// Written and read as that string, on the command line and in recipes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TeacherSpec {
    Http,
    Local(String),
}

impl FromStr for TeacherSpec {
    type Err = TeacherError;

    fn from_str(s: &str) -> Result<Self, TeacherError> {
        if s == "http" {
            return Ok(TeacherSpec::Http);
        }
        match s.strip_prefix("local:") {
            Some(spec) if !spec.is_empty() => Ok(TeacherSpec::Local(spec.to_string())),
            _ => Err(TeacherError::BadSpec {
                found: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for TeacherSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TeacherSpec::Http => f.write_str("http"),
            TeacherSpec::Local(spec) => write!(f, "local:{spec}"),
        }
    }
}

impl TryFrom<String> for TeacherSpec {
    type Error = TeacherError;
    fn try_from(s: String) -> Result<Self, TeacherError> {
        s.parse()
    }
}

impl From<TeacherSpec> for String {
    fn from(t: TeacherSpec) -> String {
        t.to_string()
    }
}

/// How to reach the teacher and what to pay it: the CLI's teacher flags (field = flag name with
/// `_`; `timeout_secs` is `--timeout`) with the same defaults, so a recipe can hold them and a
/// manifest can hash them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherConfig {
    /// `None`: `http` when `base_url` or the key variable is set, else the local default model.
    pub teacher: Option<TeacherSpec>,
    pub base_url: Option<String>,
    /// Model name as the server knows it.
    pub model: String,
    /// Environment variable that holds the API key (the key itself is never stored).
    pub api_key_env: String,
    /// Run a local teacher in float32 instead of a GGUF file's quantized types (or a checkpoint's
    /// 8-bit copies).
    pub dequantize: bool,
    /// `None`: 1.0 for an HTTP teacher, [`LOCAL_TEMPERATURE`] for a local one.
    pub temperature: Option<f32>,
    /// `None`: 1.0 for an HTTP teacher, [`LOCAL_TOP_P`] for a local one.
    pub top_p: Option<f32>,
    /// `None`: not sent to an HTTP teacher; [`LOCAL_TOP_K`] for a local one.
    pub top_k: Option<u32>,
    /// `None`: not sent to an HTTP teacher; [`LOCAL_MIN_P`] for a local one (0 turns it off).
    pub min_p: Option<f32>,
    /// `None`: off and not sent to an HTTP teacher; [`LOCAL_REPETITION_PENALTY`] for a local one
    /// (1 turns it off).
    pub repetition_penalty: Option<f32>,
    /// `None`: the corpus's limit (e.g. 1024 for stories).
    pub max_tokens: Option<u32>,
    /// `None` or 0: off (and not sent to an HTTP teacher).
    pub min_tokens: Option<u32>,
    pub max_tokens_field: MaxTokensField,
    pub timeout_secs: f64,
    pub concurrency: usize,
    pub retries: u32,
    /// USD per 1M input / output tokens; `None`: the list price of known models.
    pub price_input: Option<f64>,
    pub price_output: Option<f64>,
    /// Stop cleanly before the run's spend in USD would exceed this.
    pub max_cost: Option<f64>,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        TeacherConfig {
            teacher: None,
            base_url: None,
            model: "gpt-4o-mini".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            dequantize: false,
            temperature: None,
            top_p: None,
            top_k: None,
            min_p: None,
            repetition_penalty: None,
            max_tokens: None,
            min_tokens: None,
            max_tokens_field: MaxTokensField::Auto,
            timeout_secs: 120.0,
            concurrency: 32,
            retries: 7,
            price_input: None,
            price_output: None,
            max_cost: None,
        }
    }
}

/// Which teacher a run uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Http { base_url: String },
    Local { spec: String },
}

/// What [`TeacherConfig::resolve`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedTeacher {
    pub backend: Backend,
    /// The model name records carry: the server's name, or `local:SPEC`.
    pub model: String,
    /// `None`: unknown (no `--max-cost` then).
    pub price: Option<Price>,
    /// Why the local default was chosen, when nothing asked for a teacher; worth showing the user.
    pub note: Option<String>,
}

impl TeacherConfig {
    /// The range checks of the CLI's value parsers, for settings that did not come through them
    /// (a recipe), and the prices given together or not at all.
    pub fn validate(&self) -> Result<(), TeacherError> {
        fn float(flag: &'static str, x: f64, r: range::Range) -> Result<(), TeacherError> {
            r.check(x)
                .map(drop)
                .map_err(|expected| TeacherError::Setting {
                    flag,
                    found: x.to_string(),
                    expected,
                })
        }
        fn int<T: PartialOrd + fmt::Display + Copy>(
            flag: &'static str,
            x: T,
            r: Ints<T>,
        ) -> Result<(), TeacherError> {
            r.check(x)
                .map(drop)
                .map_err(|expected| TeacherError::Setting {
                    flag,
                    found: x.to_string(),
                    expected,
                })
        }
        if let Some(t) = self.temperature {
            float("--temperature", t as f64, range::TEMPERATURE)?;
        }
        if let Some(p) = self.top_p {
            float("--top-p", p as f64, range::TOP_P)?;
        }
        if let Some(k) = self.top_k {
            int("--top-k", k, TOP_K)?;
        }
        if let Some(p) = self.min_p {
            float("--min-p", p as f64, range::UNIT)?;
        }
        if let Some(p) = self.repetition_penalty {
            float("--repetition-penalty", p as f64, range::REPETITION_PENALTY)?;
        }
        if let Some(m) = self.max_tokens {
            int("--max-tokens", m, MAX_TOKENS)?;
        }
        if let Some(m) = self.min_tokens {
            int("--min-tokens", m, MIN_TOKENS)?;
            if let Some(max) = self.max_tokens {
                min_within_max(m, max, "--max-tokens")?;
            }
        }
        float("--timeout", self.timeout_secs, range::SECONDS)?;
        int("--concurrency", self.concurrency, CONCURRENCY)?;
        int("--retries", self.retries, RETRIES)?;
        for (flag, price) in [
            ("--price-input", self.price_input),
            ("--price-output", self.price_output),
        ] {
            if let Some(p) = price {
                float(flag, p, range::PRICE)?;
            }
        }
        if let Some(m) = self.max_cost {
            float("--max-cost", m, range::NON_NEGATIVE)?;
        }
        match (self.price_input, self.price_output) {
            (Some(_), None) => Err(TeacherError::HalfPrice {
                given: "--price-input",
                missing: "--price-output",
            }),
            (None, Some(_)) => Err(TeacherError::HalfPrice {
                given: "--price-output",
                missing: "--price-input",
            }),
            _ => Ok(()),
        }
    }

    /// Which backend, at what price, under which model name. Without `teacher`, `base_url` or
    /// the key variable the local default model is used, and `note` says so. A local teacher
    /// costs 0 unless prices are given; `max_cost` without a known price is an error.
    pub fn resolve(&self) -> Result<ResolvedTeacher, TeacherError> {
        self.validate()?;
        let http = || Backend::Http {
            base_url: self.base_url.clone().unwrap_or_else(|| OPENAI_URL.into()),
        };
        let mut note = None;
        let backend = match &self.teacher {
            Some(TeacherSpec::Http) => http(),
            Some(TeacherSpec::Local(spec)) => Backend::Local { spec: spec.clone() },
            None if self.base_url.is_some() || std::env::var_os(&self.api_key_env).is_some() => {
                http()
            }
            None => {
                note = Some(format!("no --base-url and no ${} set: using the local teacher {} (--teacher local:SPEC picks another; {})", self.api_key_env, local::DEFAULT_MODEL, local::SMALL_TEACHER_NOTE));
                Backend::Local {
                    spec: local::DEFAULT_MODEL.into(),
                }
            }
        };
        let price = match (self.price_input, self.price_output, &backend) {
            (Some(input_per_m), Some(output_per_m), _) => Some(Price {
                input_per_m,
                output_per_m,
            }),
            (_, _, Backend::Local { .. }) => Some(Price {
                input_per_m: 0.0,
                output_per_m: 0.0,
            }),
            _ => default_price(&self.model),
        };
        if self.max_cost.is_some() && price.is_none() {
            return Err(TeacherError::UnknownPrice {
                model: self.model.clone(),
            });
        }
        let model = match &backend {
            Backend::Http { .. } => self.model.clone(),
            Backend::Local { spec } => format!("local:{spec}"),
        };
        Ok(ResolvedTeacher {
            backend,
            model,
            price,
            note,
        })
    }
}

/// `--min-tokens min` against the output limit `max` (named by `limit`): at most it.
fn min_within_max(min: u32, max: u32, limit: &str) -> Result<(), TeacherError> {
    if min <= max {
        return Ok(());
    }
    Err(TeacherError::Setting {
        flag: "--min-tokens",
        found: min.to_string(),
        expected: format!("must be at most the output limit, {max} ({limit})"),
    })
}

impl TeacherConfig {
    /// `--min-tokens` against the output limit in force: `--max-tokens`, else the corpus's
    /// `default_max_tokens`. Checked before a model is loaded, and by [`TeacherConfig::sampling`].
    pub fn check_min_tokens(&self, default_max_tokens: u32) -> Result<(), TeacherError> {
        let Some(m) = self.min_tokens else {
            return Ok(());
        };
        match self.max_tokens {
            Some(max) => min_within_max(m, max, "--max-tokens"),
            None => min_within_max(m, default_max_tokens, "this corpus's default --max-tokens"),
        }
    }

    /// The sampling parameters a run sends to `backend`: the settings given, the backend's
    /// defaults for the others (an HTTP teacher: temperature and top-p 1, and no top-k, min-p or
    /// penalty, so the server's own defaults hold; a local teacher: [`LOCAL_TEMPERATURE`],
    /// [`LOCAL_TOP_P`], [`LOCAL_TOP_K`], [`LOCAL_MIN_P`], [`LOCAL_REPETITION_PENALTY`]), and the corpus's output
    /// limit `default_max_tokens` unless one is set. A `--min-tokens` above the output limit in
    /// force is an error naming both.
    pub fn sampling(
        &self,
        backend: &Backend,
        default_max_tokens: u32,
    ) -> Result<Sampling, TeacherError> {
        self.check_min_tokens(default_max_tokens)?;
        Ok(Sampling {
            max_tokens: self.max_tokens.unwrap_or(default_max_tokens),
            // 0 is off: the same draws as none, so it is not recorded either.
            min_tokens: self.min_tokens.filter(|&m| m > 0),
            ..self.draws(backend)
        })
    }

    /// How tokens are drawn from `backend`: the settings given and the backend's defaults for
    /// the others (see [`TeacherConfig::sampling`]); no output limits.
    pub fn draws(&self, backend: &Backend) -> Sampling {
        let local = matches!(backend, Backend::Local { .. });
        Sampling {
            temperature: self
                .temperature
                .unwrap_or(if local { LOCAL_TEMPERATURE } else { 1.0 }),
            top_p: self.top_p.unwrap_or(if local { LOCAL_TOP_P } else { 1.0 }),
            max_tokens: 0,
            top_k: self.top_k.or(local.then_some(LOCAL_TOP_K)),
            // min-p 0 is off: the same draws as no min-p, so it is not recorded either.
            min_p: self
                .min_p
                .or(local.then_some(LOCAL_MIN_P))
                .filter(|&p| p > 0.0),
            // 1 is off: the same draws as none, so it is not recorded either.
            repetition_penalty: self
                .repetition_penalty
                .or(local.then_some(LOCAL_REPETITION_PENALTY))
                .filter(|&p| p != 1.0),
            min_tokens: None,
        }
    }
}

/// Loads a local model (downloading it first if it is a Hub id not yet cached) and starts its
/// batching engine: `max_batch` sequences at once; `seed` as [`Engine::start`] takes it.
pub async fn local_engine(
    spec: &str,
    quantized: bool,
    max_batch: usize,
    seed: u64,
) -> Result<Arc<Engine>, TeacherError> {
    let owned = spec.to_string();
    let model = tokio::task::spawn_blocking(move || {
        LocalModel::load(&owned, candle_core::DType::F32, quantized)
    })
    .await
    .map_err(|e| TeacherError::Local {
        model: spec.to_string(),
        reason: format!("the loading thread failed: {e}"),
    })?
    .map_err(|source| TeacherError::Load {
        spec: spec.to_string(),
        source: Box::new(source),
    })?;
    tracing::info!(
        "local teacher {} ({} parameters, context {}, {} at a time)",
        model.name,
        model.decoder.config().parameter_count(),
        model.context(),
        max_batch
    );
    Ok(Arc::new(Engine::start(Arc::new(model), max_batch, seed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two accepted forms parse and print back as written; anything else names `--teacher`,
    /// the value and both forms.
    #[test]
    fn teacher_specs_parse_and_print_back() {
        assert_eq!("http".parse::<TeacherSpec>().unwrap(), TeacherSpec::Http);
        let local: TeacherSpec = "local:models/x.gguf".parse().unwrap();
        assert_eq!(local, TeacherSpec::Local("models/x.gguf".into()));
        assert_eq!(local.to_string(), "local:models/x.gguf");
        for bad in ["local:", "HTTP", "", "openai", "local"] {
            let e = bad.parse::<TeacherSpec>().unwrap_err().to_string();
            assert!(
                e.contains("--teacher")
                    && e.contains(&format!("{bad:?}"))
                    && e.contains("`http`")
                    && e.contains("`local:SPEC`"),
                "{e}"
            );
        }
    }

    /// The defaults are the CLI's: `phigen stories` with no teacher flag (and none of the flags'
    /// environment variables) converts to `TeacherConfig::default()`.
    #[test]
    fn defaults_are_the_cli_defaults() {
        use clap::Parser;
        // The flags read these variables; a developer's shell may set them.
        for var in ["PHIGEN_TEACHER", "OPENAI_BASE_URL", "PHIGEN_MODEL"] {
            if std::env::var_os(var).is_some() {
                eprintln!("skipped: {var} is set in this environment");
                return;
            }
        }
        let cli = crate::cli::Cli::try_parse_from(["phigen", "stories"]).unwrap();
        let crate::cli::Command::Stories(args) = cli.command else {
            unreachable!("parsed `stories`")
        };
        assert_eq!(TeacherConfig::from(&args.teacher), TeacherConfig::default());
    }

    /// Each range is the CLI's: a value its flag refuses is refused here, naming the flag.
    #[test]
    fn validate_refuses_what_the_flags_refuse() {
        let ok = TeacherConfig::default();
        ok.validate().unwrap();
        let bad = [
            (
                TeacherConfig {
                    temperature: Some(f32::NAN),
                    ..ok.clone()
                },
                "--temperature",
            ),
            (
                TeacherConfig {
                    top_p: Some(0.0),
                    ..ok.clone()
                },
                "--top-p",
            ),
            (
                TeacherConfig {
                    top_k: Some(0),
                    ..ok.clone()
                },
                "--top-k",
            ),
            (
                TeacherConfig {
                    min_p: Some(1.5),
                    ..ok.clone()
                },
                "--min-p",
            ),
            (
                TeacherConfig {
                    repetition_penalty: Some(0.0),
                    ..ok.clone()
                },
                "--repetition-penalty",
            ),
            (
                TeacherConfig {
                    max_tokens: Some(0),
                    ..ok.clone()
                },
                "--max-tokens",
            ),
            (
                TeacherConfig {
                    min_tokens: Some(10_000_001),
                    ..ok.clone()
                },
                "--min-tokens",
            ),
            (
                TeacherConfig {
                    min_tokens: Some(11),
                    max_tokens: Some(10),
                    ..ok.clone()
                },
                "--min-tokens",
            ),
            (
                TeacherConfig {
                    timeout_secs: 86_401.0,
                    ..ok.clone()
                },
                "--timeout",
            ),
            (
                TeacherConfig {
                    concurrency: 0,
                    ..ok.clone()
                },
                "--concurrency",
            ),
            (
                TeacherConfig {
                    retries: 101,
                    ..ok.clone()
                },
                "--retries",
            ),
            (
                TeacherConfig {
                    price_input: Some(-1.0),
                    price_output: Some(1.0),
                    ..ok.clone()
                },
                "--price-input",
            ),
            (
                TeacherConfig {
                    price_output: Some(1.0),
                    ..ok.clone()
                },
                "--price-input",
            ),
            (
                TeacherConfig {
                    max_cost: Some(f64::INFINITY),
                    ..ok.clone()
                },
                "--max-cost",
            ),
        ];
        for (cfg, flag) in bad {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{flag}: {e}");
        }
    }

    /// A recipe's teacher table: a misspelt key is an error naming it, not a silent default;
    /// the spec and the field names read as the flags write them.
    #[test]
    fn a_recipe_table_with_an_unknown_key_is_refused() {
        let e = toml::from_str::<TeacherConfig>("model = \"m\"\ntemprature = 0.5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("temprature"), "{e}");
        let cfg: TeacherConfig = toml::from_str(
            "teacher = \"local:a/b\"\nmax_tokens_field = \"max-completion-tokens\"\nmax_cost = 2.5\n",
        )
        .unwrap();
        assert_eq!(cfg.teacher, Some(TeacherSpec::Local("a/b".into())));
        assert_eq!(cfg.max_tokens_field, MaxTokensField::MaxCompletionTokens);
        assert_eq!(
            (cfg.max_cost, cfg.model.as_str()),
            (Some(2.5), "gpt-4o-mini")
        );
        assert!(toml::from_str::<TeacherConfig>("teacher = \"ftp\"\n").is_err());
    }

    /// The price rules: given prices win, a local teacher is free, known models have list
    /// prices, and a budget needs a price.
    #[test]
    fn resolve_prices_and_names_the_model() {
        let local = TeacherConfig {
            teacher: Some(TeacherSpec::Local("m.gguf".into())),
            model: "unknown-model".into(),
            max_cost: Some(1.0),
            ..TeacherConfig::default()
        };
        let r = local.resolve().unwrap();
        assert_eq!(r.model, "local:m.gguf");
        assert_eq!(r.price.unwrap().input_per_m, 0.0);
        assert_eq!(r.note, None);
        let http = TeacherConfig {
            teacher: Some(TeacherSpec::Http),
            ..local
        };
        let e = http.resolve().unwrap_err().to_string();
        assert!(
            e.contains("--max-cost") && e.contains("unknown-model"),
            "{e}"
        );
        let priced = TeacherConfig {
            price_input: Some(1.0),
            price_output: Some(2.0),
            ..http
        };
        let r = priced.resolve().unwrap();
        assert_eq!(
            r.backend,
            Backend::Http {
                base_url: OPENAI_URL.into()
            }
        );
        assert_eq!(r.price.unwrap().output_per_m, 2.0);
    }

    /// An HTTP backend (OpenAI's URL) and a local one.
    fn backends() -> (Backend, Backend) {
        let http = Backend::Http {
            base_url: OPENAI_URL.into(),
        };
        let local = Backend::Local {
            spec: "m.gguf".into(),
        };
        (http, local)
    }

    /// Sampling defaults depend on the teacher: an HTTP teacher gets temperature and top-p 1 and
    /// no top-k / min-p / penalty (the server's defaults hold); a local one gets Qwen's published
    /// instruct settings (temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05) and
    /// llama.cpp's min-p 0.05. Given settings win on both; min-p 0 and penalty 1 are off and not
    /// recorded.
    #[test]
    fn sampling_defaults_depend_on_the_backend() {
        let (http, local) = backends();
        let cfg = TeacherConfig::default();
        let s = cfg.sampling(&http, 1024).unwrap();
        assert_eq!(
            (
                s.temperature,
                s.top_p,
                s.top_k,
                s.min_p,
                s.repetition_penalty
            ),
            (1.0, 1.0, None, None, None)
        );
        assert_eq!((s.max_tokens, s.min_tokens), (1024, None));
        let s = cfg.sampling(&local, 1024).unwrap();
        assert_eq!(
            (
                s.temperature,
                s.top_p,
                s.top_k,
                s.min_p,
                s.repetition_penalty
            ),
            (0.7, 0.8, Some(20), Some(0.05), Some(1.05))
        );
        let given = TeacherConfig {
            temperature: Some(0.3),
            top_p: Some(0.9),
            top_k: Some(7),
            min_p: Some(0.0),
            repetition_penalty: Some(1.0),
            max_tokens: Some(50),
            ..TeacherConfig::default()
        };
        for backend in [&http, &local] {
            let s = given.sampling(backend, 1024).unwrap();
            assert_eq!(
                (
                    s.temperature,
                    s.top_p,
                    s.top_k,
                    s.min_p,
                    s.repetition_penalty
                ),
                (0.3, 0.9, Some(7), None, None)
            );
            assert_eq!(s.max_tokens, 50);
        }
    }

    /// Min-tokens is off unless given, for both backends; a given value is used by both, and
    /// 0 is off and not recorded (the same draws as none).
    #[test]
    fn min_tokens_is_off_unless_given() {
        let (http, local) = backends();
        let min = |cfg: &TeacherConfig, b: &Backend| cfg.sampling(b, 2048).unwrap().min_tokens;
        let cfg = TeacherConfig::default();
        assert_eq!((min(&cfg, &http), min(&cfg, &local)), (None, None));
        let given = TeacherConfig {
            min_tokens: Some(270),
            ..TeacherConfig::default()
        };
        assert_eq!(
            (min(&given, &http), min(&given, &local)),
            (Some(270), Some(270))
        );
        let off = TeacherConfig {
            min_tokens: Some(0),
            ..TeacherConfig::default()
        };
        assert_eq!((min(&off, &http), min(&off, &local)), (None, None));
    }

    /// `--min-tokens` above the output limit in force is refused naming `--min-tokens`, the
    /// value and the limit: against `--max-tokens` when given (in `validate`, so a recipe is
    /// refused before anything runs), else against the corpus's default limit.
    #[test]
    fn min_tokens_above_the_limit_is_refused() {
        let local = Backend::Local {
            spec: "m.gguf".into(),
        };
        let both = TeacherConfig {
            min_tokens: Some(300),
            max_tokens: Some(200),
            ..TeacherConfig::default()
        };
        let e = both.validate().unwrap_err().to_string();
        assert!(
            e.contains("--min-tokens 300") && e.contains("200 (--max-tokens)"),
            "{e}"
        );
        let e = both.sampling(&local, 2048).unwrap_err().to_string();
        assert!(e.contains("--min-tokens 300"), "{e}");
        let default_limit = TeacherConfig {
            min_tokens: Some(1025),
            ..TeacherConfig::default()
        };
        default_limit.validate().unwrap();
        let e = default_limit
            .sampling(&local, 1024)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--min-tokens 1025") && e.contains("1024 (this corpus's default"),
            "{e}"
        );
        let equal = TeacherConfig {
            min_tokens: Some(1024),
            ..TeacherConfig::default()
        };
        assert_eq!(equal.sampling(&local, 1024).unwrap().min_tokens, Some(1024));
    }
}

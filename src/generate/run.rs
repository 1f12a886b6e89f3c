//! The generation driver: builds the teacher a [`TeacherConfig`] describes (the HTTP client or
//! the local engine), runs the engine ([`super::engine::generate`]) with it and reports progress
//! to the caller about every 200 ms. [`CorpusSettings`] names the three generating corpora as
//! plain settings (the CLI's flags, or a recipe's step) and loads their templates and seed lists.
//!
//! Nothing here prints: the caller draws progress from [`Progress`] and summarises the returned
//! [`Stats`]; stopping (Ctrl-C) is the caller's [`RunState::stop`].

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::engine::{self, DryRun, GenerateError, GenerateOptions, RunState, Stats};
use super::exercises::{self, Exercises, Verify};
use super::prompt::Template;
use super::stories::{self, Stories, StoriesError, Vocabulary};
use super::textbooks::{self, ProseTextbooks, SectionStyle, SeedListError, Textbooks};
use super::Corpus;
use crate::artifact::shards::{self, Layout};
use crate::artifact::table;
use crate::range;
use crate::sandbox::{Isolation, Limits, Sandbox, SandboxError};
use crate::teacher::engine::Engine;
use crate::teacher::factory::{local_engine, Backend, ResolvedTeacher, TeacherConfig};
use crate::teacher::local::LocalTeacher;
use crate::teacher::openai::OpenAiTeacher;
use crate::teacher::pricing::Ledger;
use crate::teacher::retry::RetryPolicy;
use crate::teacher::{HttpSettings, Teacher, TeacherError};

/// A progress snapshot, sent about every 200 ms while a generation runs (and once at its end).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// Records wanted (known once the output directory has been read).
    pub total: u64,
    /// Records in the output directory: earlier runs' and this run's.
    pub done: u64,
    pub retries: u64,
    /// Requests that failed after every retry.
    pub failed: u64,
    /// Answers dropped by a check (and asked again).
    pub dropped: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `None` when the teacher's price is unknown.
    pub spent_usd: Option<f64>,
}

/// What stops a generation before its first request: the run's settings, the teacher's, the
/// corpus's seed lists, the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--n 0: nothing to generate; pass the number of records wanted")]
    NothingWanted,
    #[error("--max-attempts 0: every record would be given up before its first request; pass at least 1")]
    NoAttempts,
    #[error("--shard-size 0: records are written in Parquet shards of that many; pass at least 1")]
    NoShardSize,
    /// A corpus setting outside its range (a recipe's; the CLI's value parsers refuse these earlier).
    #[error("{flag} {found}: {expected}; pass a value in that range")]
    Setting {
        flag: &'static str,
        found: String,
        expected: String,
    },
    #[error(transparent)]
    Teacher(TeacherError),
    #[error(transparent)]
    Stories(#[from] StoriesError),
    #[error(transparent)]
    Seeds(#[from] SeedListError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Instruct(#[from] super::instruct::InstructError),
    #[error(transparent)]
    Topics(#[from] super::topics::TopicsError),
    #[error("--web {}: web snippets seed prose sections only; pass --style prose (in a recipe: style = \"prose\") or drop --web", path.display())]
    WebWithoutProse { path: PathBuf },
    #[error("summary prompt {}: summaries are asked for only with --instruct (in a recipe: instruct = true); add it or drop the summary prompt", path.display())]
    SummaryWithoutInstruct { path: PathBuf },
    #[error("{0}. A local teacher's textbook sections run in the sandbox by default: `--run-code false` (in a recipe: run_code = false) keeps every section whose code parses, running nothing")]
    RunCodeByDefault(String),
    #[error("--run-code runs the Python of code sections; prose sections need none: drop --run-code (in a recipe: run_code) or --style prose")]
    RunCodeWithProse,
}

impl GenerateError {
    /// Whether the teacher refused the credentials (the CLI exits 3 then).
    pub fn is_auth(&self) -> bool {
        matches!(self, GenerateError::Teacher(TeacherError::Auth { .. }))
    }
}

fn check_options(opts: &GenerateOptions) -> Result<(), SetupError> {
    if opts.n == 0 {
        return Err(SetupError::NothingWanted);
    }
    if opts.max_attempts == 0 {
        return Err(SetupError::NoAttempts);
    }
    if opts.shard_size == 0 {
        return Err(SetupError::NoShardSize);
    }
    Ok(())
}

/// Checks the run's options and resolves the teacher.
fn prepare(cfg: &TeacherConfig, opts: &GenerateOptions) -> Result<ResolvedTeacher, SetupError> {
    check_options(opts)?;
    cfg.resolve().map_err(SetupError::Teacher)
}

/// The teacher of a run, loaded before any corpus runs on it: a local model is loaded here (so
/// its tokenizer can measure prompts before they are built), an HTTP client is built per run.
pub struct LoadedTeacher {
    resolved: ResolvedTeacher,
    /// The local model's batching engine; `None` for an HTTP teacher.
    engine: Option<Arc<Engine>>,
}

impl LoadedTeacher {
    /// Resolves `cfg` and loads a local model (`seed` seeds its engine, as the run's seed).
    pub async fn load(cfg: &TeacherConfig, seed: u64) -> Result<LoadedTeacher, GenerateError> {
        let resolved = cfg.resolve().map_err(SetupError::Teacher)?;
        let engine = match &resolved.backend {
            Backend::Http { .. } => None,
            Backend::Local { spec } => Some(
                local_engine(spec, !cfg.dequantize, cfg.concurrency, seed)
                    .await
                    .map_err(SetupError::Teacher)?,
            ),
        };
        Ok(LoadedTeacher { resolved, engine })
    }

    /// The model that answers, as records name it: the server's model name, or for a local
    /// teacher the model it loaded (e.g. `local:HuggingFaceTB/SmolLM2-135M-Instruct/….gguf`).
    pub fn model(&self) -> &str {
        match &self.engine {
            Some(engine) => &engine.model().name,
            None => &self.resolved.model,
        }
    }

    /// Tokens of `text` in the teacher's own tokenizer, where phigen has it (a local model);
    /// `None` for an HTTP teacher (or a text the tokenizer refuses).
    pub fn count_tokens(&self, text: &str) -> Option<usize> {
        let engine = self.engine.as_ref()?;
        engine
            .model()
            .tokenizer
            .encode(text)
            .ok()
            .map(|ids| ids.len())
    }

    /// Positions of a local model's context (a prompt and its answer must fit); `None` for HTTP.
    pub fn context(&self) -> Option<usize> {
        self.engine.as_ref().map(|e| e.model().context())
    }

    /// Whether this is a model run inside phigen.
    pub fn is_local(&self) -> bool {
        self.engine.is_some()
    }

    /// Whether this is a local model under a billion parameters (those the local teacher's note
    /// warns about).
    pub fn is_small_local(&self) -> bool {
        self.engine
            .as_ref()
            .is_some_and(|e| e.model().decoder.config().parameter_count() < 1_000_000_000)
    }
}

/// Generates until `opts.n` records of `corpus` are in `opts.out` (or the run stops), with the
/// teacher `cfg` describes; `default_max_tokens` is the corpus's output limit when `cfg` has none.
/// The prompts worked on at once are `cfg.concurrency` (`opts.concurrency` is not read). `state`
/// lets the caller stop the run (its requests in flight are finished and written); `progress` is
/// called about every 200 ms, from this task.
pub async fn run_corpus<C: Corpus>(
    corpus: Arc<C>,
    cfg: &TeacherConfig,
    opts: &GenerateOptions,
    default_max_tokens: u32,
    state: Arc<RunState>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Stats, GenerateError> {
    check_options(opts)?;
    // A --min-tokens beyond the output limit is refused before the model loads.
    cfg.check_min_tokens(default_max_tokens)
        .map_err(SetupError::Teacher)?;
    let teacher = LoadedTeacher::load(cfg, opts.seed).await?;
    run_corpus_on(
        corpus,
        &teacher,
        cfg,
        opts,
        default_max_tokens,
        state,
        progress,
    )
    .await
}

/// [`run_corpus`] with a teacher already loaded (from the same `cfg`).
pub async fn run_corpus_on<C: Corpus>(
    corpus: Arc<C>,
    teacher: &LoadedTeacher,
    cfg: &TeacherConfig,
    opts: &GenerateOptions,
    default_max_tokens: u32,
    state: Arc<RunState>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Stats, GenerateError> {
    check_options(opts)?;
    let resolved = &teacher.resolved;
    let sampling = cfg
        .sampling(&resolved.backend, default_max_tokens)
        .map_err(SetupError::Teacher)?;
    let opts = GenerateOptions {
        concurrency: cfg.concurrency.max(1),
        ..opts.clone()
    };
    let ledger = Arc::new(Ledger::new(resolved.price, cfg.max_cost));
    match (&resolved.backend, &teacher.engine) {
        (_, Some(engine)) => {
            let teacher = LocalTeacher::new(engine.clone(), sampling);
            drive(corpus, Arc::new(teacher), ledger, state, &opts, progress).await
        }
        (Backend::Http { base_url }, None) => {
            let teacher = OpenAiTeacher::new(HttpSettings {
                base_url: base_url.clone(),
                model: cfg.model.clone(),
                api_key_env: cfg.api_key_env.clone(),
                sampling,
                timeout: Duration::from_secs_f64(cfg.timeout_secs.max(0.001)),
                concurrency: cfg.concurrency.max(1),
                retry: RetryPolicy {
                    max_attempts: cfg.retries + 1,
                    ..RetryPolicy::default()
                },
                max_tokens_field: cfg.max_tokens_field,
            })
            .map_err(|e| SetupError::Teacher(Box::new(e).into()))?;
            drive(corpus, Arc::new(teacher), ledger, state, &opts, progress).await
        }
        (Backend::Local { .. }, None) => {
            unreachable!("LoadedTeacher::load starts an engine for every local backend")
        }
    }
}

/// Counts what [`run_corpus`] would send (prompts, tokens, cost), sending and writing nothing.
pub fn dry_run_corpus<C: Corpus>(
    corpus: Arc<C>,
    cfg: &TeacherConfig,
    opts: &GenerateOptions,
    default_max_tokens: u32,
) -> Result<DryRun, GenerateError> {
    let resolved = prepare(cfg, opts)?;
    let sampling = cfg
        .sampling(&resolved.backend, default_max_tokens)
        .map_err(SetupError::Teacher)?;
    engine::dry_run(
        corpus,
        &resolved.model,
        sampling,
        resolved.price,
        &in_task_dir(opts),
    )
}

/// A task of an array writes below the array's directory, in `tasks/NNNNN` (its own lock,
/// manifest, journals and shards); a whole run writes in `opts.out`.
fn in_task_dir(opts: &GenerateOptions) -> GenerateOptions {
    GenerateOptions {
        out: opts.task.map_or(opts.out.clone(), |t| t.dir(&opts.out)),
        ..opts.clone()
    }
}

/// The completion marker of `opts.task` when that task already finished: a relaunched array
/// skips it without loading a teacher.
pub fn task_done(opts: &GenerateOptions) -> Option<PathBuf> {
    let task = opts.task?;
    task.is_done(&opts.out).then(|| task.marker(&opts.out))
}

/// Runs the engine with `teacher`, reporting progress until it returns.
async fn drive<C: Corpus, T: Teacher>(
    corpus: Arc<C>,
    teacher: Arc<T>,
    ledger: Arc<Ledger>,
    state: Arc<RunState>,
    opts: &GenerateOptions,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Stats, GenerateError> {
    let show = || progress(&snapshot(&state, &*teacher, &ledger));
    let task_opts = in_task_dir(opts);
    let run = engine::generate(
        corpus,
        teacher.clone(),
        ledger.clone(),
        state.clone(),
        &task_opts,
    );
    tokio::pin!(run);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            _ = tick.tick() => show(),
        }
    };
    show();
    // A task that filled all its slots says so, last, for the merge and for a relaunch.
    if let (Some(task), Ok(stats)) = (opts.task, &result) {
        if stats.complete {
            let stats = serde_json::to_value(stats).expect("stats serialize");
            task.mark_done(&opts.out, stats)
                .map_err(|source| GenerateError::Io {
                    path: task.marker(&opts.out),
                    source,
                })?;
        }
    }
    result
}

fn snapshot<T: Teacher>(state: &RunState, teacher: &T, ledger: &Ledger) -> Progress {
    let spend = ledger.snapshot();
    Progress {
        total: state.total.load(Ordering::Relaxed),
        done: state.done_before.load(Ordering::Relaxed) + state.written.load(Ordering::Relaxed),
        retries: teacher.counters().snapshot().retries,
        failed: state.failed.load(Ordering::Relaxed),
        dropped: state.dropped_total(),
        prompt_tokens: spend.prompt_tokens,
        completion_tokens: spend.completion_tokens,
        spent_usd: ledger.price().map(|_| spend.spent),
    }
}

fn default_max_features() -> usize {
    3
}

fn default_sandbox_workers() -> usize {
    2
}

fn default_exec_timeout() -> f64 {
    3.0
}

/// TinyStories (`phigen stories`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoriesSettings {
    /// Directory of the word lists [default: the built-in seeds/tinystories].
    #[serde(default)]
    pub words: Option<PathBuf>,
    /// Prompt template [default: the built-in prompts/tinystories.txt].
    #[serde(default)]
    pub prompt: Option<PathBuf>,
    /// At most this many story features per prompt.
    #[serde(default = "default_max_features")]
    pub max_features: usize,
    /// Drop stories that do not use all three required words.
    #[serde(default)]
    pub strict_words: bool,
    /// TinyStories-Instruct: each story preceded by a random subset of `Summary:`, `Features:`,
    /// `Sentence:` and `Words:` (see [`super::instruct`]). Off is left out of the step's
    /// identity, so recipes written before this setting keep their ids.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub instruct: bool,
    /// The summary prompt of `instruct` [default: the built-in prompts/story-summary.txt].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_prompt: Option<PathBuf>,
}

impl Default for StoriesSettings {
    fn default() -> Self {
        StoriesSettings {
            words: None,
            prompt: None,
            max_features: default_max_features(),
            strict_words: false,
            instruct: false,
            summary_prompt: None,
        }
    }
}

/// CodeTextbook (`phigen textbooks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextbooksSettings {
    /// Topics file (`topic` or `topic > subtopic` a line, or `phigen topics`'s
    /// `subject > subtopic > leaf`).
    pub topics: PathBuf,
    /// [default: the built-in seeds/audiences.txt]
    #[serde(default)]
    pub audiences: Option<PathBuf>,
    /// [default: the built-in seeds/styles.txt]
    #[serde(default)]
    pub styles: Option<PathBuf>,
    /// [default: the built-in prompts/textbook.txt; prompts/textbook-small.txt for a local
    /// teacher; prompts/textbook-prose.txt for prose]
    #[serde(default)]
    pub prompt: Option<PathBuf>,
    /// Python sections (phi-1) or natural-language ones (phi-1.5). Code, the default, is left
    /// out of the step's identity, so recipes written before this setting keep their ids.
    #[serde(default, skip_serializing_if = "SectionStyle::is_code")]
    pub style: SectionStyle,
    /// Web texts (jsonl or Parquet with `text`) whose excerpts prose prompts quote, for diversity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web: Option<PathBuf>,
    /// Run each code section's Python blocks, in order as one program, in the sandbox, and keep
    /// only sections whose program runs to its end (`--run-code`). `None`: on for a local
    /// teacher, off for an HTTP one. Left out of the step's identity when not given, so recipes
    /// written before this setting keep their ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_code: Option<bool>,
    /// The sandbox sections run in; `None`: [`SandboxSettings::default`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxSettings>,
}

/// Where generated code runs, and its limits (`--python`, `--sandbox-workers`,
/// `--unsafe-sandbox`, `--exec-timeout`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    /// Python of the sandbox [default: python3 on PATH, then /usr/bin/python3].
    #[serde(default)]
    pub python: Option<PathBuf>,
    #[serde(default = "default_sandbox_workers")]
    pub sandbox_workers: usize,
    /// Run programs without the bubblewrap namespaces (recorded in stats.json).
    #[serde(default)]
    pub unsafe_sandbox: bool,
    /// Wall-clock seconds a program may run.
    #[serde(default = "default_exec_timeout")]
    pub exec_timeout: f64,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            python: None,
            sandbox_workers: default_sandbox_workers(),
            unsafe_sandbox: false,
            exec_timeout: default_exec_timeout(),
        }
    }
}

impl SandboxSettings {
    /// `None` where every field is its default: a default sandbox is no setting, so settings
    /// written before the sandbox was one compare (and resume) as they were.
    pub fn unless_default(self) -> Option<Self> {
        (self != SandboxSettings::default()).then_some(self)
    }

    /// The part of these settings that decides which programs pass, for step ids: all but
    /// `sandbox_workers`, which only sets how many run at once (`None` where that part is the
    /// defaults).
    pub fn kept_identity(self) -> Option<Self> {
        SandboxSettings {
            sandbox_workers: default_sandbox_workers(),
            ..self
        }
        .unless_default()
    }

    /// Checks the limits and starts the sandbox.
    async fn start(&self) -> Result<Arc<Sandbox>, GenerateError> {
        let setting = |flag, found: String, expected| SetupError::Setting {
            flag,
            found,
            expected,
        };
        range::SECONDS
            .check(self.exec_timeout)
            .map_err(|e| setting("--exec-timeout", self.exec_timeout.to_string(), e))?;
        range::Ints { min: 1, max: 1024 }
            .check(self.sandbox_workers)
            .map_err(|e| setting("--sandbox-workers", self.sandbox_workers.to_string(), e))?;
        let limits = Limits {
            wall: Duration::from_secs_f64(self.exec_timeout.max(0.1)),
            cpu_secs: self.exec_timeout.ceil().max(1.0) as u64,
            ..Limits::default()
        };
        let sandbox = Sandbox::new(
            self.python.as_deref(),
            limits,
            self.sandbox_workers,
            Isolation::requested(self.unsafe_sandbox),
        )
        .await
        .map_err(SetupError::from)?;
        tracing::info!(python = %sandbox.python().display(), isolation = ?sandbox.isolation(), "sandbox ready");
        Ok(Arc::new(sandbox))
    }
}

/// CodeExercises (`phigen exercises`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExercisesSettings {
    /// [default: the built-in seeds/topics.txt]
    #[serde(default)]
    pub topics: Option<PathBuf>,
    /// Directory with verbs.txt and objects.txt [default: the built-in seeds/exercises].
    #[serde(default)]
    pub names: Option<PathBuf>,
    /// [default: the built-in prompts/exercises.txt]
    #[serde(default)]
    pub prompt: Option<PathBuf>,
    /// Python of the sandbox [default: python3 on PATH, then /usr/bin/python3].
    #[serde(default)]
    pub python: Option<PathBuf>,
    #[serde(default = "default_sandbox_workers")]
    pub sandbox_workers: usize,
    /// Run exercises without the bubblewrap namespaces (recorded in stats.json).
    #[serde(default)]
    pub unsafe_sandbox: bool,
    /// Wall-clock seconds a program may run.
    #[serde(default = "default_exec_timeout")]
    pub exec_timeout: f64,
    /// How an exercise is checked: its asserts run (the default; left out of the step's
    /// identity, so recipes written before this setting keep their ids) or it only parses.
    #[serde(default, skip_serializing_if = "Verify::is_tests")]
    pub verify: Verify,
}

impl Default for ExercisesSettings {
    fn default() -> Self {
        ExercisesSettings {
            topics: None,
            names: None,
            prompt: None,
            python: None,
            sandbox_workers: default_sandbox_workers(),
            unsafe_sandbox: false,
            exec_timeout: default_exec_timeout(),
            verify: Verify::Tests,
        }
    }
}

/// One of the generating corpora, with its settings (`topics` writes a topics list for the
/// others to read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "corpus", rename_all = "lowercase")]
pub enum CorpusSettings {
    Stories(StoriesSettings),
    Textbooks(TextbooksSettings),
    Exercises(ExercisesSettings),
    Topics(super::topics::TopicsSettings),
    /// Chat SFT conversations (`phigen chat-data`).
    Chat(ChatSettings),
}

fn default_max_turns() -> u64 {
    super::chat::DEFAULT_MAX_TURNS
}

/// Chat SFT conversations (`phigen chat-data`, a recipe's `kind = "chat-data"` step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSettings {
    /// Topics file (`topic` or `topic > subtopic` a line, or `phigen topics`'s list) [default:
    /// the built-in seeds/chat-topics.txt].
    #[serde(default)]
    pub topics: Option<PathBuf>,
    /// Exchanges (user message and answer) a conversation has at most; each draws 1 to this.
    #[serde(default = "default_max_turns")]
    pub max_turns: u64,
    /// [default: the built-in prompts/chat.txt]
    #[serde(default)]
    pub prompt: Option<PathBuf>,
}

impl Default for ChatSettings {
    fn default() -> Self {
        ChatSettings {
            topics: None,
            max_turns: default_max_turns(),
            prompt: None,
        }
    }
}

impl ChatSettings {
    /// `out`: the directory the conversations go to, whose kept ones new ones must not nearly
    /// repeat.
    fn corpus(&self, out: &Path) -> Result<super::chat::Chat, GenerateError> {
        use super::chat;
        chat::MAX_TURNS
            .check(self.max_turns)
            .map_err(|expected| SetupError::Setting {
                flag: "--max-turns",
                found: self.max_turns.to_string(),
                expected,
            })?;
        let template =
            Template::load_or_builtin(self.prompt.as_deref(), "chat.txt", chat::BUILTIN_TEMPLATE)?;
        let topics = match &self.topics {
            Some(p) => textbooks::load_topics(Some(p)),
            None => {
                textbooks::parse_topics("<built-in seeds/chat-topics.txt>", chat::BUILTIN_TOPICS)
            }
        }
        .map_err(SetupError::from)?;
        Ok(chat::Chat::new(
            template,
            topics,
            self.max_turns,
            &chat::kept_texts(out)?,
        ))
    }
}

impl StoriesSettings {
    fn corpus(&self) -> Result<Stories, GenerateError> {
        let template = Template::load_or_builtin(
            self.prompt.as_deref(),
            "tinystories.txt",
            stories::BUILTIN_TEMPLATE,
        )?;
        if let (false, Some(path)) = (self.instruct, &self.summary_prompt) {
            return Err(SetupError::SummaryWithoutInstruct { path: path.clone() }.into());
        }
        let vocab = Vocabulary::load(self.words.as_deref()).map_err(SetupError::from)?;
        // An instruct prefix's `Words:` line must hold: such stories use all three words.
        Ok(Stories::new(
            template,
            vocab,
            self.max_features,
            self.strict_words || self.instruct,
        ))
    }

    /// Stories, then the summaries their instruct prefixes need (see [`super::instruct::run`]).
    async fn run_instruct(
        &self,
        cfg: &TeacherConfig,
        opts: &GenerateOptions,
        max_tokens: u32,
        state: Arc<RunState>,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<Stats, GenerateError> {
        let summary = Template::load_or_builtin(
            self.summary_prompt.as_deref(),
            "story-summary.txt",
            super::instruct::BUILTIN_SUMMARY_TEMPLATE,
        )?;
        let corpus = Arc::new(self.corpus()?);
        super::instruct::run(corpus, summary, cfg, opts, max_tokens, state, progress).await
    }
}

impl TextbooksSettings {
    /// phi-1.5's prose sections; `out` is the directory they go to, whose texts new sections
    /// must not nearly repeat.
    fn prose_corpus(&self, out: &Path) -> Result<ProseTextbooks, GenerateError> {
        if self.run_code == Some(true) {
            return Err(SetupError::RunCodeWithProse.into());
        }
        let template = Template::load_or_builtin(
            self.prompt.as_deref(),
            "textbook-prose.txt",
            textbooks::BUILTIN_PROSE_TEMPLATE,
        )?;
        let seeds = || -> Result<_, SeedListError> {
            let topics = textbooks::load_topics(Some(&self.topics))?;
            let audiences = textbooks::load_plain(
                self.audiences.as_deref(),
                textbooks::BUILTIN_PROSE_AUDIENCES,
                "prose-audiences.txt",
            )?;
            let styles = textbooks::load_plain(
                self.styles.as_deref(),
                textbooks::BUILTIN_PROSE_STYLES,
                "prose-styles.txt",
            )?;
            let snippets = match &self.web {
                Some(p) => textbooks::load_snippets(p)?,
                None => Vec::new(),
            };
            Ok((topics, audiences, styles, snippets))
        };
        let (topics, audiences, styles, snippets) = seeds().map_err(SetupError::from)?;
        let kept = kept_texts(out)?;
        Ok(ProseTextbooks::new(
            template, topics, audiences, styles, snippets, &kept,
        ))
    }

    /// `local`: the teacher runs in-process, and gets the small-model prompt unless one is given.
    async fn corpus(&self, local: bool) -> Result<Textbooks, GenerateError> {
        if let Some(web) = &self.web {
            return Err(SetupError::WebWithoutProse { path: web.clone() }.into());
        }
        let (name, builtin) = if local {
            ("textbook-small.txt", textbooks::BUILTIN_SMALL_TEMPLATE)
        } else {
            ("textbook.txt", textbooks::BUILTIN_TEMPLATE)
        };
        if local && self.prompt.is_none() {
            tracing::info!("a local teacher gets the small-model prompt prompts/{name} (--prompt prompts/textbook.txt gives it the full one)");
        }
        let template = Template::load_or_builtin(self.prompt.as_deref(), name, builtin)?;
        let seeds = || -> Result<_, SeedListError> {
            let topics = textbooks::load_topics(Some(&self.topics))?;
            let audiences = textbooks::load_plain(
                self.audiences.as_deref(),
                textbooks::BUILTIN_AUDIENCES,
                "audiences.txt",
            )?;
            let styles = textbooks::load_plain(
                self.styles.as_deref(),
                textbooks::BUILTIN_STYLES,
                "styles.txt",
            )?;
            Ok((topics, audiences, styles))
        };
        let (topics, audiences, styles) = seeds().map_err(SetupError::from)?;
        let sandbox = if self.run_code.unwrap_or(local) {
            if local && self.run_code.is_none() {
                tracing::info!("a local teacher's sections run in the sandbox and are kept only if their code runs (--run-code false keeps every section whose code parses)");
            }
            let sandbox = self.sandbox.clone().unwrap_or_default().start().await;
            Some(sandbox.map_err(|e| match self.run_code {
                None => SetupError::RunCodeByDefault(e.to_string()).into(),
                Some(_) => e,
            })?)
        } else {
            None
        };
        Ok(Textbooks::new(template, topics, audiences, styles, sandbox))
    }
}

impl ExercisesSettings {
    /// Loads the seed lists and starts the sandbox the asserts run in (none for
    /// [`Verify::Parse`]).
    async fn corpus(&self) -> Result<Exercises, GenerateError> {
        let template = Template::load_or_builtin(
            self.prompt.as_deref(),
            "exercises.txt",
            exercises::BUILTIN_TEMPLATE,
        )?;
        let names = |file: &str, builtin| {
            let p = self.names.as_ref().map(|d| d.join(file));
            textbooks::load_plain(p.as_deref(), builtin, &format!("exercises/{file}"))
        };
        let seeds = || -> Result<_, SeedListError> {
            Ok((
                textbooks::load_topics(self.topics.as_deref())?,
                names("verbs.txt", exercises::BUILTIN_VERBS)?,
                names("objects.txt", exercises::BUILTIN_OBJECTS)?,
            ))
        };
        let (topics, verbs, objects) = seeds().map_err(SetupError::from)?;
        let sandbox = match self.verify {
            Verify::Parse => None,
            Verify::Tests => Some(self.sandbox().start().await?),
        };
        Ok(Exercises::new(template, topics, verbs, objects, sandbox))
    }

    /// The sandbox settings among these (kept as fields of their own for the recipes' format).
    fn sandbox(&self) -> SandboxSettings {
        SandboxSettings {
            python: self.python.clone(),
            sandbox_workers: self.sandbox_workers,
            unsafe_sandbox: self.unsafe_sandbox,
            exec_timeout: self.exec_timeout,
        }
    }
}

/// The texts already kept in a generation directory (its shards and its journal).
fn kept_texts(dir: &Path) -> Result<Vec<String>, GenerateError> {
    let mut texts = Vec::new();
    for path in shards::list_files(dir, &Layout::Parts { prefix: "part" })? {
        let df = table::read_columns(&path, &["text"])?;
        texts.extend(
            table::text_column(&df, &path, "text")?
                .into_iter()
                .flatten(),
        );
    }
    for row in shards::read_journal_rows(&dir.join("records.journal.jsonl"))? {
        if let Some(t) = row.get("text").and_then(serde_json::Value::as_str) {
            texts.push(t.to_string());
        }
    }
    Ok(texts)
}

/// Whether `cfg` resolves to an in-process teacher.
fn local(cfg: &TeacherConfig) -> Result<bool, SetupError> {
    let resolved = cfg.resolve().map_err(SetupError::Teacher)?;
    Ok(matches!(resolved.backend, Backend::Local { .. }))
}

impl CorpusSettings {
    /// The corpus's output token limit per answer when the teacher config sets none.
    pub fn default_max_tokens(&self) -> u32 {
        match self {
            CorpusSettings::Stories(_) => 1024,
            CorpusSettings::Textbooks(_) => 2048,
            CorpusSettings::Exercises(_) => 1024,
            CorpusSettings::Topics(_) => 1024,
            CorpusSettings::Chat(_) => 2048,
        }
    }

    /// Loads the template and seed lists, builds the corpus (for exercises, with its sandbox) and
    /// runs it with [`run_corpus`].
    pub async fn run(
        &self,
        cfg: &TeacherConfig,
        opts: &GenerateOptions,
        state: Arc<RunState>,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<Stats, GenerateError> {
        let max = self.default_max_tokens();
        match self {
            CorpusSettings::Stories(s) if s.instruct => {
                check_options(opts)?;
                s.run_instruct(cfg, opts, max, state, progress).await
            }
            CorpusSettings::Stories(s) => {
                run_corpus(Arc::new(s.corpus()?), cfg, opts, max, state, progress).await
            }
            CorpusSettings::Textbooks(s) if s.style == SectionStyle::Prose => {
                let corpus = Arc::new(s.prose_corpus(&in_task_dir(opts).out)?);
                run_corpus(corpus, cfg, opts, max, state, progress).await
            }
            CorpusSettings::Textbooks(s) => {
                let corpus = Arc::new(s.corpus(local(cfg)?).await?);
                run_corpus(corpus, cfg, opts, max, state, progress).await
            }
            CorpusSettings::Exercises(s) => {
                let corpus = Arc::new(s.corpus().await?);
                run_corpus(corpus, cfg, opts, max, state, progress).await
            }
            CorpusSettings::Topics(s) => {
                check_options(opts)?;
                super::topics::run(s, cfg, opts, max, state, progress).await
            }
            CorpusSettings::Chat(s) => {
                let corpus = Arc::new(s.corpus(&in_task_dir(opts).out)?);
                run_corpus(corpus, cfg, opts, max, state, progress).await
            }
        }
    }

    /// What [`CorpusSettings::run`] would send; loads everything it loads (the exercises'
    /// sandbox included, so a dry run also finds a missing Python).
    pub async fn dry_run(
        &self,
        cfg: &TeacherConfig,
        opts: &GenerateOptions,
    ) -> Result<DryRun, GenerateError> {
        let max = self.default_max_tokens();
        match self {
            // The stories' prompts; the summaries are asked for once the stories exist.
            CorpusSettings::Stories(s) if s.instruct => {
                let work = opts.out.join(super::instruct::WORK_DIR).join("stories");
                let opts = GenerateOptions {
                    out: work,
                    ..opts.clone()
                };
                dry_run_corpus(Arc::new(s.corpus()?), cfg, &opts, max)
            }
            CorpusSettings::Stories(s) => dry_run_corpus(Arc::new(s.corpus()?), cfg, opts, max),
            CorpusSettings::Textbooks(s) if s.style == SectionStyle::Prose => {
                let corpus = Arc::new(s.prose_corpus(&in_task_dir(opts).out)?);
                dry_run_corpus(corpus, cfg, opts, max)
            }
            CorpusSettings::Textbooks(s) => {
                dry_run_corpus(Arc::new(s.corpus(local(cfg)?).await?), cfg, opts, max)
            }
            CorpusSettings::Exercises(s) => {
                dry_run_corpus(Arc::new(s.corpus().await?), cfg, opts, max)
            }
            // The subtopics' prompts; the leaves are asked for once the subtopics exist.
            CorpusSettings::Topics(s) => {
                check_options(opts)?;
                s.dry_run(cfg, opts, max)
            }
            CorpusSettings::Chat(s) => {
                dry_run_corpus(Arc::new(s.corpus(&in_task_dir(opts).out)?), cfg, opts, max)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recipe names a corpus by `corpus = "…"` with the flags' names and defaults; a misspelt
    /// key is an error, not a silent default.
    #[test]
    fn corpus_settings_read_from_a_recipe_table() {
        let s: CorpusSettings =
            toml::from_str("corpus = \"stories\"\nstrict_words = true\n").unwrap();
        assert_eq!(
            s,
            CorpusSettings::Stories(StoriesSettings {
                strict_words: true,
                ..StoriesSettings::default()
            })
        );
        assert_eq!(s.default_max_tokens(), 1024);
        let s: CorpusSettings = toml::from_str("corpus = \"exercises\"\n").unwrap();
        assert_eq!(s, CorpusSettings::Exercises(ExercisesSettings::default()));
        let e = toml::from_str::<CorpusSettings>("corpus = \"stories\"\nmax_feature = 2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_feature"), "{e}");
        assert!(toml::from_str::<CorpusSettings>("corpus = \"textbooks\"\n").is_err());
    }

    /// Issue 30's recipe keys: `instruct = true` for stories and `style = "prose"` (with `web`)
    /// for textbooks. Left at their defaults they are absent from the serialized settings, which
    /// are the step's identity, so the ids of existing recipes do not change.
    #[test]
    fn instruct_and_prose_are_recipe_keys_that_leave_default_ids_alone() {
        let s: CorpusSettings = toml::from_str("corpus = \"stories\"\ninstruct = true\n").unwrap();
        assert!(matches!(
            s,
            CorpusSettings::Stories(StoriesSettings { instruct: true, .. })
        ));
        let s: CorpusSettings = toml::from_str(
            "corpus = \"textbooks\"\ntopics = \"t.txt\"\nstyle = \"prose\"\nweb = \"w.jsonl\"\n",
        )
        .unwrap();
        let CorpusSettings::Textbooks(t) = &s else {
            panic!("{s:?}")
        };
        assert_eq!(
            (t.style, t.web.as_deref()),
            (SectionStyle::Prose, Some(Path::new("w.jsonl")))
        );
        assert!(toml::from_str::<CorpusSettings>(
            "corpus = \"textbooks\"\ntopics = \"t.txt\"\nstyle = \"poetry\"\n"
        )
        .is_err());
        let stories =
            serde_json::to_value(CorpusSettings::Stories(StoriesSettings::default())).unwrap();
        assert_eq!(
            stories,
            serde_json::json!({"corpus": "stories", "words": null, "prompt": null, "max_features": 3, "strict_words": false})
        );
        let code: CorpusSettings =
            toml::from_str("corpus = \"textbooks\"\ntopics = \"t.txt\"\n").unwrap();
        assert_eq!(
            serde_json::to_value(code).unwrap(),
            serde_json::json!({"corpus": "textbooks", "topics": "t.txt", "audiences": null, "styles": null, "prompt": null})
        );
    }

    /// The checks `phigen stories` made before it sent anything are the library's now.
    #[test]
    fn options_that_would_generate_nothing_are_refused() {
        let ok = GenerateOptions {
            out: PathBuf::from("o"),
            n: 1,
            seed: 0,
            max_attempts: 1,
            shard_size: 1,
            concurrency: 1,
            task: None,
        };
        check_options(&ok).unwrap();
        let msg = |o: GenerateOptions| check_options(&o).unwrap_err().to_string();
        assert!(msg(GenerateOptions { n: 0, ..ok.clone() }).starts_with("--n 0"));
        assert!(msg(GenerateOptions {
            max_attempts: 0,
            ..ok.clone()
        })
        .starts_with("--max-attempts 0"));
        assert!(msg(GenerateOptions {
            shard_size: 0,
            ..ok
        })
        .starts_with("--shard-size 0"));
    }
}

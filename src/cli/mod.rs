//! The command line: clap definitions, logging, the progress bar, and exit codes.
//! Everything user-facing that is not an artifact lives here; the library below never prints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

mod decontaminate;
mod dedup;
mod eval;
mod filter;
mod model;
pub(crate) mod numbers;
mod tokenize;
mod train;

use anyhow::{bail, Context};
use clap::{ArgAction, Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use numbers::{f32_in, f64_in, int_in};

use crate::generate::engine::{
    self, DryRun, GenerateError, GenerateOptions, RunState, Stats, StopReason,
};
use crate::generate::exercises::{self, Exercises};
use crate::generate::prompt::Template;
use crate::generate::stories::{self, Stories, Vocabulary};
use crate::generate::textbooks::{self, Textbooks};
use crate::generate::Corpus;
use crate::sandbox::{Limits, Sandbox};
use crate::teacher::local::{self, Engine, LocalModel, LocalTeacher};
use crate::teacher::mock::{Faults, MockServer};
use crate::teacher::openai::OpenAiTeacher;
use crate::teacher::pricing::{default_price, Ledger, Price};
use crate::teacher::retry::RetryPolicy;
use crate::teacher::{HttpSettings, MaxTokensField, Sampling, Teacher, TeacherError};

#[derive(Debug, Parser)]
#[command(
    name = "phigen",
    version,
    about = "Reproduce the Phi / TinyStories recipe: synthetic textbook-quality data from teacher LLMs, filtering, dedup, training and evaluation of phi-family models."
)]
pub struct Cli {
    /// More log output: -v for debug, -vv for trace (default: info). RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors: no progress bar, no summary.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a TinyStories corpus: short stories in the words a 3-4 year old understands.
    Stories(StoriesArgs),
    /// Write a CodeTextbook corpus: textbook sections mixing explanation with Python (topic × audience × style).
    Textbooks(TextbooksArgs),
    /// Write a CodeExercises corpus: function exercises with solutions and asserts, kept only if the asserts pass in the sandbox.
    Exercises(ExercisesArgs),
    /// Serve a deterministic fake OpenAI-compatible API on loopback (tests, benchmarks, trying a pipeline offline).
    MockServer(MockServerArgs),
    /// Serve a model (a checkpoint directory phigen trained or from Hugging Face, a .gguf file, or a Hub id) as an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.
    Serve(ServeArgs),
    /// Generate text from a checkpoint (phi-1/1.5/2, phi-3 or llama layout, Hugging Face format).
    Sample(model::SampleArgs),
    /// Write a randomly initialised checkpoint of a preset size (training from scratch, benchmarks).
    Init(model::InitArgs),
    /// Turn corpus shards (Parquet, jsonl, text) into token shards for training.
    Tokenize(tokenize::TokenizeArgs),
    /// Look inside token shards.
    #[command(subcommand)]
    Shards(tokenize::ShardsCommand),
    /// Train a phi-family model with a recipe (stages, data mixture, AdamW, schedule); resumable.
    Train(train::TrainArgs),
    /// Remove exact and near duplicates (MinHash-LSH) from corpus files; incremental with --index, shardable with --shard.
    Dedup(dedup::DedupArgs),
    /// Find documents sharing n-grams with HumanEval / MBPP problems; drop or flag them.
    Decontaminate(decontaminate::DecontaminateArgs),
    /// Have the teacher rate a deterministic sample of code files for educational value (0-5).
    Annotate(filter::AnnotateArgs),
    /// Train the educational-value classifier (random forest over file embeddings).
    #[command(subcommand)]
    Classify(filter::ClassifyCommand),
    /// Score every code file with the classifier and keep the educational ones; without --model, first rates a sample and trains one (phi-1's filter).
    #[command(mut_arg("model", |a| a.long("teacher-model").help("Teacher model name as the server knows it (for the recipe's ratings)")))]
    Filter(Box<filter::FilterArgs>),
    /// Evaluate a model: HumanEval / MBPP functional correctness with pass@k (sandboxed execution).
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// A table of each run's numbers (size, tokens, val loss, pass@k, story grades) next to the published phi-1 / TinyStories anchors.
    Scoreboard(eval::ScoreboardArgs),
}

/// How to reach the teacher and what to pay it; shared by every generating command.
#[derive(Debug, Clone, Args)]
pub struct TeacherArgs {
    /// Who writes the data: `http` (the OpenAI-compatible API at --base-url) or `local:SPEC`, a model run inside phigen: SPEC is a checkpoint directory (config.json, model.safetensors, tokenizer.json), a .gguf file, or a Hugging Face id fetched into the Hugging Face cache on first use. [default: http when --base-url or the key variable is set, else local:HuggingFaceTB/SmolLM2-135M-Instruct, a 135M model for trying the pipeline]
    #[arg(long, env = "PHIGEN_TEACHER")]
    pub teacher: Option<String>,
    /// Base URL of an OpenAI-compatible API: OpenAI (https://api.openai.com/v1, the default), vLLM (http://HOST:8000/v1), llama.cpp server (http://HOST:8080/v1), Ollama (http://localhost:11434/v1), `phigen serve` (http://127.0.0.1:8000/v1).
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub base_url: Option<String>,
    /// Run a local GGUF teacher in float32 instead of the file's quantized types (slower; the numbers transformers computes when it loads the file).
    #[arg(long)]
    pub dequantize: bool,
    /// Model name as the server knows it.
    #[arg(long, env = "PHIGEN_MODEL", default_value = "gpt-4o-mini")]
    pub model: String,
    /// Environment variable that holds the API key (the key is never written to logs or outputs). Local servers need none.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// Sampling temperature, 0 to 10.
    #[arg(long, default_value_t = 1.0, value_parser = f32_in(numbers::TEMPERATURE))]
    pub temperature: f32,
    /// Nucleus sampling top-p, above 0 and at most 1.
    #[arg(long, default_value_t = 1.0, value_parser = f32_in(numbers::TOP_P))]
    pub top_p: f32,
    /// Sample only from the k most likely tokens [default: all; sent to an HTTP teacher only when
    /// given (vLLM and llama.cpp servers read it)].
    #[arg(long, value_parser = int_in(1u32, 1_000_000))]
    pub top_k: Option<u32>,
    /// Drop tokens less likely than this share of the most likely one [default: off; sent to an
    /// HTTP teacher only when given].
    #[arg(long, value_parser = f32_in(numbers::UNIT))]
    pub min_p: Option<f32>,
    /// Output token limit per answer [default: the corpus's, e.g. 1024 for stories].
    #[arg(long, value_parser = int_in(1u32, 10_000_000))]
    pub max_tokens: Option<u32>,
    /// Which request field carries the limit: auto = max_completion_tokens for api.openai.com, max_tokens elsewhere.
    #[arg(long, value_enum, default_value = "auto")]
    pub max_tokens_field: MaxTokensField,
    /// Seconds before one request is abandoned (and retried); at most a day.
    #[arg(long, default_value_t = 120.0, value_parser = f64_in(numbers::SECONDS))]
    pub timeout: f64,
    /// Requests in flight at most (for a local teacher: sequences generated together); the pool shrinks by itself when the server answers 429/503.
    #[arg(long, default_value_t = 32, value_parser = int_in(1usize, 10_000))]
    pub concurrency: usize,
    /// Retries of one request after 429, 5xx, timeouts, dropped connections or malformed bodies (at most 100).
    #[arg(long, default_value_t = 7, value_parser = int_in(0u32, 100))]
    pub retries: u32,
    /// USD per 1M input tokens [default: the list price of known models, see the README].
    #[arg(long, requires = "price_output", value_parser = f64_in(numbers::PRICE))]
    pub price_input: Option<f64>,
    /// USD per 1M output tokens [default: the list price of known models].
    #[arg(long, requires = "price_input", value_parser = f64_in(numbers::PRICE))]
    pub price_output: Option<f64>,
    /// Stop cleanly before this run's spend in USD would exceed this (requests in flight included).
    #[arg(long, value_parser = f64_in(numbers::NON_NEGATIVE))]
    pub max_cost: Option<f64>,
    /// Print how many prompts would be sent, their tokens and cost, and send nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Where the records go and how many; shared by every generating command.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Good records wanted in the output directory (records already there count; a larger N adds only the missing ones). At most 100,000,000 (a run holds its slots in memory).
    #[arg(long, default_value_t = 100, value_parser = int_in(1u64, 100_000_000))]
    pub n: u64,
    /// Seed of the constraint sampler; the same seed gives the same prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Attempts per record before giving up on it (each dropped answer costs one).
    #[arg(long, default_value_t = 3, value_parser = int_in(1u32, 1000))]
    pub max_attempts: u32,
    /// Records per Parquet shard.
    #[arg(long, default_value_t = 1000, value_parser = int_in(1usize, 10_000_000))]
    pub shard_size: usize,
}

#[derive(Debug, Clone, Args)]
pub struct StoriesArgs {
    /// Output directory.
    #[arg(long, default_value = "data/stories")]
    pub out: PathBuf,
    /// Directory with verbs.txt, nouns.txt, adjectives.txt, function_words.txt and features.txt [default: the built-in seeds/tinystories].
    #[arg(long)]
    pub words: Option<PathBuf>,
    /// Prompt template file [default: the built-in prompts/tinystories.txt].
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// At most this many story features per prompt (a random subset of 0..=N).
    #[arg(long, default_value_t = 3, value_parser = int_in(0usize, 1000))]
    pub max_features: usize,
    /// Drop stories that do not use all three required words (default: keep them and record it).
    #[arg(long)]
    pub strict_words: bool,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TextbooksArgs {
    /// Topics file: one `topic` or `topic > subtopic` a line, `#` comments (e.g. seeds/topics.txt).
    #[arg(long)]
    pub topics: PathBuf,
    /// Audiences file, one a line [default: the built-in seeds/audiences.txt].
    #[arg(long)]
    pub audiences: Option<PathBuf>,
    /// Styles file, one a line [default: the built-in seeds/styles.txt].
    #[arg(long)]
    pub styles: Option<PathBuf>,
    /// Prompt template file [default: the built-in prompts/textbook.txt].
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "data/textbooks")]
    pub out: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ExercisesArgs {
    /// Topics file (`topic` or `topic > subtopic` a line) [default: the built-in seeds/topics.txt].
    #[arg(long)]
    pub topics: Option<PathBuf>,
    /// Directory with verbs.txt and objects.txt, the halves of function names [default: the built-in seeds/exercises].
    #[arg(long)]
    pub names: Option<PathBuf>,
    /// Prompt template file [default: the built-in prompts/exercises.txt].
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// Python interpreter for the sandbox [default: python3 on PATH, then /usr/bin/python3].
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Programs run in the sandbox at once.
    #[arg(long, default_value_t = 2, value_parser = int_in(1usize, 1024))]
    pub sandbox_workers: usize,
    /// Run exercises without the bubblewrap namespaces, as the calling user (they can read your
    /// files and reach the network). Only where you trust the teacher's code; stats.json records it.
    #[arg(long)]
    pub unsafe_sandbox: bool,
    /// Wall-clock seconds a program may run (the HumanEval harness uses 3); at most a day.
    #[arg(long, default_value_t = 3.0, value_parser = f64_in(numbers::SECONDS))]
    pub exec_timeout: f64,
    /// Output directory.
    #[arg(long, default_value = "data/exercises")]
    pub out: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MockServerArgs {
    /// Address to listen on (loopback only; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub faults: Faults,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The model: a checkpoint directory (config.json, model.safetensors, tokenizer), a .gguf file, or a Hugging Face id.
    #[arg(long)]
    pub checkpoint: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Address to bind. The server has no authentication: keep it on loopback unless the network is trusted.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// The model name in /v1/models and in answers [default: local:CHECKPOINT].
    #[arg(long)]
    pub name: Option<String>,
    /// Sequences generated together (requests waiting beyond this queue up).
    #[arg(long, default_value_t = 32, value_parser = int_in(1usize, 10_000))]
    pub batch: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run a GGUF model in float32 instead of the file's quantized types.
    #[arg(long)]
    pub dequantize: bool,
}

/// How a successful command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    /// Stopped early (budget, failures); re-running the same command continues.
    Incomplete,
    Interrupted,
}

impl Outcome {
    pub fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Complete => ExitCode::SUCCESS,
            Outcome::Incomplete => ExitCode::from(4),
            Outcome::Interrupted => ExitCode::from(130),
        }
    }
}

/// 3: the teacher refused the credentials; 1: any other error. (2 is clap's usage error.)
pub fn error_exit_code(e: &anyhow::Error) -> ExitCode {
    let auth = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<GenerateError>(),
            Some(GenerateError::Teacher(TeacherError::Auth { .. }))
        ) || matches!(
            c.downcast_ref::<TeacherError>(),
            Some(TeacherError::Auth { .. })
        )
    });
    ExitCode::from(if auth { 3 } else { 1 })
}

pub fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("phigen={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Stories(args) => {
            let template = Template::load_or_builtin(
                args.prompt.as_deref(),
                "tinystories.txt",
                stories::BUILTIN_TEMPLATE,
            )?;
            let vocab = Vocabulary::load(args.words.as_deref())?;
            let corpus = Arc::new(Stories::new(
                template,
                vocab,
                args.max_features,
                args.strict_words,
            ));
            run_corpus(
                corpus,
                &args.teacher,
                &args.output,
                args.out.clone(),
                1024,
                cli.quiet,
            )
            .await
        }
        Command::Textbooks(args) => {
            let template = Template::load_or_builtin(
                args.prompt.as_deref(),
                "textbook.txt",
                textbooks::BUILTIN_TEMPLATE,
            )?;
            let topics = textbooks::load_topics(Some(&args.topics))?;
            let audiences = textbooks::load_plain(
                args.audiences.as_deref(),
                textbooks::BUILTIN_AUDIENCES,
                "audiences.txt",
            )?;
            let styles = textbooks::load_plain(
                args.styles.as_deref(),
                textbooks::BUILTIN_STYLES,
                "styles.txt",
            )?;
            let corpus = Arc::new(Textbooks::new(template, topics, audiences, styles));
            run_corpus(
                corpus,
                &args.teacher,
                &args.output,
                args.out.clone(),
                2048,
                cli.quiet,
            )
            .await
        }
        Command::Exercises(args) => {
            let template = Template::load_or_builtin(
                args.prompt.as_deref(),
                "exercises.txt",
                exercises::BUILTIN_TEMPLATE,
            )?;
            let topics = textbooks::load_topics(args.topics.as_deref())?;
            let names = |file: &str, builtin| -> anyhow::Result<Vec<String>> {
                let p = args.names.as_ref().map(|d| d.join(file));
                Ok(textbooks::load_plain(
                    p.as_deref(),
                    builtin,
                    &format!("exercises/{file}"),
                )?)
            };
            let verbs = names("verbs.txt", exercises::BUILTIN_VERBS)?;
            let objects = names("objects.txt", exercises::BUILTIN_OBJECTS)?;
            let limits = Limits {
                wall: Duration::from_secs_f64(args.exec_timeout.max(0.1)),
                cpu_secs: args.exec_timeout.ceil().max(1.0) as u64,
                ..Limits::default()
            };
            let sandbox = Arc::new(
                Sandbox::new(
                    args.python.as_deref(),
                    limits,
                    args.sandbox_workers,
                    crate::sandbox::Isolation::requested(args.unsafe_sandbox),
                )
                .await?,
            );
            tracing::info!(python = %sandbox.python().display(), isolation = ?sandbox.isolation(), "sandbox ready");
            let corpus = Arc::new(Exercises::new(template, topics, verbs, objects, sandbox));
            run_corpus(
                corpus,
                &args.teacher,
                &args.output,
                args.out.clone(),
                1024,
                cli.quiet,
            )
            .await
        }
        Command::Sample(args) => model::sample(&args).map(|_| Outcome::Complete),
        Command::Init(args) => model::init(&args).map(|_| Outcome::Complete),
        Command::Tokenize(args) => tokenize::tokenize(&args, cli.quiet),
        Command::Shards(cmd) => tokenize::shards(&cmd),
        Command::Train(args) => train::train(&args, cli.quiet),
        Command::Dedup(args) => dedup::dedup(&args, cli.quiet),
        Command::Decontaminate(args) => decontaminate::decontaminate(&args, cli.quiet),
        Command::Annotate(args) => filter::annotate(&args, cli.quiet).await,
        Command::Classify(cmd) => filter::classify(&cmd),
        Command::Filter(args) => filter::filter(&args, cli.quiet).await,
        Command::Eval(cmd) => eval::eval(&cmd, cli.quiet).await,
        Command::Scoreboard(args) => eval::scoreboard(&args),
        Command::Serve(args) => {
            let engine =
                local_engine(&args.checkpoint, !args.dequantize, args.batch, args.seed).await?;
            let addr = SocketAddr::new(args.host, args.port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("could not listen on {addr}"))?;
            let addr = listener.local_addr()?;
            let name = args
                .name
                .clone()
                .unwrap_or_else(|| engine.model().name.clone());
            let _server =
                crate::teacher::serve::start(listener, engine, name.clone(), Default::default())?;
            println!("serving {name} on http://{addr}/v1 (Ctrl-C stops)");
            tokio::signal::ctrl_c().await?;
            Ok(Outcome::Complete)
        }
        Command::MockServer(args) => {
            if !args.addr.ip().is_loopback() {
                bail!("--addr {} is not a loopback address: the mock server only listens on 127.0.0.0/8 or [::1]", args.addr);
            }
            let server = MockServer::start(args.addr, args.faults)
                .await
                .with_context(|| format!("could not listen on {}", args.addr))?;
            println!("listening on {}", server.base_url());
            tokio::signal::ctrl_c().await?;
            Ok(Outcome::Complete)
        }
    }
}

/// Which teacher a generating command uses.
enum Backend {
    Http { base_url: String },
    Local { spec: String },
}

const OPENAI_URL: &str = "https://api.openai.com/v1";

impl TeacherArgs {
    fn backend(&self) -> anyhow::Result<Backend> {
        let http = || Backend::Http {
            base_url: self.base_url.clone().unwrap_or_else(|| OPENAI_URL.into()),
        };
        match self.teacher.as_deref() {
            Some("http") => Ok(http()),
            Some(t) => match t.strip_prefix("local:") {
                Some(spec) if !spec.is_empty() => Ok(Backend::Local { spec: spec.into() }),
                _ => bail!("--teacher {t:?}: expected `http` or `local:SPEC` (SPEC: a checkpoint directory, a .gguf file or a Hugging Face id such as {})", local::DEFAULT_MODEL),
            },
            None if self.base_url.is_some() || std::env::var_os(&self.api_key_env).is_some() => Ok(http()),
            None => {
                eprintln!("no --base-url and no ${} set: using the local teacher {} (--teacher local:SPEC picks another; {})", self.api_key_env, local::DEFAULT_MODEL, local::SMALL_TEACHER_NOTE);
                Ok(Backend::Local { spec: local::DEFAULT_MODEL.into() })
            }
        }
    }
}

fn resolve_price(t: &TeacherArgs, backend: &Backend) -> anyhow::Result<Option<Price>> {
    let price = match (t.price_input, t.price_output, backend) {
        (Some(input_per_m), Some(output_per_m), _) => Some(Price {
            input_per_m,
            output_per_m,
        }),
        (_, _, Backend::Local { .. }) => Some(Price {
            input_per_m: 0.0,
            output_per_m: 0.0,
        }),
        _ => default_price(&t.model),
    };
    if t.max_cost.is_some() && price.is_none() {
        bail!("--max-cost needs the price of `{}`, which phigen does not know: pass --price-input and --price-output (USD per 1M tokens; 0 for a local server)", t.model);
    }
    Ok(price)
}

async fn run_corpus<C: Corpus>(
    corpus: Arc<C>,
    t: &TeacherArgs,
    o: &OutputArgs,
    out: PathBuf,
    default_max_tokens: u32,
    quiet: bool,
) -> anyhow::Result<Outcome> {
    if o.n == 0 {
        bail!("--n 0: nothing to generate; pass the number of records wanted");
    }
    if o.max_attempts == 0 {
        bail!("--max-attempts must be at least 1");
    }
    let sampling = Sampling {
        temperature: t.temperature,
        top_p: t.top_p,
        max_tokens: t.max_tokens.unwrap_or(default_max_tokens),
        top_k: t.top_k,
        min_p: t.min_p,
    };
    let backend = t.backend()?;
    let price = resolve_price(t, &backend)?;
    let opts = GenerateOptions {
        out,
        n: o.n,
        seed: o.seed,
        max_attempts: o.max_attempts,
        shard_size: o.shard_size,
        concurrency: t.concurrency.max(1),
    };
    let model = match &backend {
        Backend::Http { .. } => t.model.clone(),
        Backend::Local { spec } => format!("local:{spec}"),
    };
    if t.dry_run {
        let plan = engine::dry_run(corpus, &model, sampling, price, &opts)?;
        print_dry_run(&plan, &model);
        return Ok(Outcome::Complete);
    }
    let ledger = Arc::new(Ledger::new(price, t.max_cost));
    match backend {
        Backend::Http { base_url } => {
            let teacher = OpenAiTeacher::new(HttpSettings {
                base_url,
                model: t.model.clone(),
                api_key_env: t.api_key_env.clone(),
                sampling,
                timeout: Duration::from_secs_f64(t.timeout.max(0.001)),
                concurrency: t.concurrency.max(1),
                retry: RetryPolicy {
                    max_attempts: t.retries + 1,
                    ..RetryPolicy::default()
                },
                max_tokens_field: t.max_tokens_field,
            })?;
            drive(corpus, Arc::new(teacher), ledger, &opts, quiet).await
        }
        Backend::Local { spec } => {
            let engine = local_engine(&spec, !t.dequantize, t.concurrency, o.seed).await?;
            let teacher = LocalTeacher::new(engine, sampling);
            drive(corpus, Arc::new(teacher), ledger, &opts, quiet).await
        }
    }
}

/// Loads a local model (downloading it first if it is a Hub id not yet cached) and starts its
/// batching engine.
async fn local_engine(
    spec: &str,
    quantized: bool,
    max_batch: usize,
    seed: u64,
) -> anyhow::Result<Arc<Engine>> {
    let owned = spec.to_string();
    let model = tokio::task::spawn_blocking(move || {
        LocalModel::load(&owned, candle_core::DType::F32, quantized)
    })
    .await?
    .with_context(|| format!("could not load the local teacher `{spec}`"))?;
    tracing::info!(
        "local teacher {} ({} parameters, context {}, {} at a time)",
        model.name,
        model.decoder.config().parameter_count(),
        model.context(),
        max_batch
    );
    Ok(Arc::new(Engine::start(Arc::new(model), max_batch, seed)))
}

/// Runs the generation engine with `teacher`, drawing the progress bar and the summary.
async fn drive<C: Corpus, T: Teacher>(
    corpus: Arc<C>,
    teacher: Arc<T>,
    ledger: Arc<Ledger>,
    opts: &GenerateOptions,
    quiet: bool,
) -> anyhow::Result<Outcome> {
    let state = Arc::new(RunState::default());
    let bar = progress_bar(
        quiet,
        Some(0),
        "{spinner} {pos}/{len} [{elapsed_precise} < {eta_precise}] {per_sec} {msg}",
    );
    let ticker = tokio::spawn(tick(
        bar.clone(),
        state.clone(),
        teacher.clone(),
        ledger.clone(),
    ));
    let interrupt = tokio::spawn(watch_interrupt(state.clone()));
    let result =
        engine::generate(corpus, teacher.clone(), ledger.clone(), state.clone(), opts).await;
    ticker.abort();
    interrupt.abort();
    bar.finish_and_clear();
    let stats = result?;
    if !quiet {
        print_summary(&stats, opts);
    }
    Ok(match stats.stopped {
        Some(StopReason::Interrupted) => Outcome::Interrupted,
        _ if stats.complete => Outcome::Complete,
        _ => Outcome::Incomplete,
    })
}

/// A progress bar on stderr (hidden with `--quiet`) of `len` steps (`None`: unknown) drawn with
/// an indicatif `template`.
fn progress_bar(quiet: bool, len: Option<u64>, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        len,
        if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(ProgressStyle::with_template(template).expect("the template is valid"));
    bar
}

async fn tick<T: Teacher>(
    bar: ProgressBar,
    state: Arc<RunState>,
    teacher: Arc<T>,
    ledger: Arc<Ledger>,
) {
    loop {
        let r = teacher.counters().snapshot();
        let spend = ledger.snapshot();
        bar.set_length(state.total.load(Ordering::Relaxed));
        bar.set_position(
            state.done_before.load(Ordering::Relaxed) + state.written.load(Ordering::Relaxed),
        );
        let cost = ledger
            .price()
            .map_or(String::new(), |_| format!(" · ${:.4}", spend.spent));
        bar.set_message(format!(
            "retries {} · failed {} · dropped {} · tokens {}/{}{cost}",
            r.retries,
            state.failed.load(Ordering::Relaxed),
            state.dropped_total(),
            spend.prompt_tokens,
            spend.completion_tokens,
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn watch_interrupt(state: Arc<RunState>) {
    if tokio::signal::ctrl_c().await.is_ok() {
        state.stop(StopReason::Interrupted);
        eprintln!("\ninterrupted: finishing the requests in flight and saving them (Ctrl-C again to quit at once; nothing written is lost)");
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    }
}

fn print_dry_run(d: &DryRun, model: &str) {
    let usd = |v: Option<f64>| {
        v.map_or(
            "unknown (pass --price-input/--price-output)".to_string(),
            |c| format!("${c:.4}"),
        )
    };
    println!("dry run: nothing was sent");
    println!("  records requested        {}", d.requested);
    println!("  already done             {}", d.already_done);
    println!("  given up (max attempts)  {}", d.given_up);
    println!("  prompts to send          {}", d.prompts);
    println!(
        "  prompt tokens            {} (tiktoken encoding of {model})",
        d.prompt_tokens
    );
    println!(
        "  completion tokens        ~{} expected, {} at most",
        d.expected_completion_tokens, d.max_completion_tokens
    );
    println!("  cost                     ~{} expected, {} at most (first attempts only; dropped answers cost more)", usd(d.expected_cost_usd), usd(d.max_cost_usd));
}

fn print_summary(s: &Stats, opts: &GenerateOptions) {
    if let Some(note) = &s.teacher_note {
        println!("note: {note}");
    }
    let r = &s.run;
    println!(
        "{}: {} new records in {} ({} in all of {} requested) in {:.1}s, {:.0} requests/s",
        s.kind,
        r.written,
        opts.out.display(),
        s.records,
        s.requested,
        r.wall_seconds,
        r.requests_per_second
    );
    if !r.dropped.is_empty() {
        let d: Vec<String> = r.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  dropped and retried: {}", d.join(", "));
    }
    println!(
        "  requests {} (retries {}, 429 {}, 5xx {}, timeouts {}, connection errors {}, malformed {}); failed after retries {}",
        r.requests.sent, r.requests.retries, r.requests.throttled, r.requests.server_errors, r.requests.timeouts, r.requests.connection_errors, r.requests.malformed, r.failed_requests
    );
    let cost = r
        .cost_usd
        .map_or("cost unknown".into(), |c| format!("${c:.4}"));
    println!(
        "  tokens {} in / {} out, {cost}",
        r.prompt_tokens, r.completion_tokens
    );
    match s.stopped {
        Some(StopReason::Budget) => println!("  stopped: the next request could exceed --max-cost; re-run with a higher limit to continue"),
        Some(StopReason::Interrupted) => println!("  interrupted: re-run the same command to continue"),
        Some(StopReason::Fatal) => println!("  stopped by an error"),
        None if !s.complete => println!("  incomplete: {} requests failed after retries (re-run to send them again), {} records gave up after --max-attempts drops (raise it to try them again)", r.failed_requests, r.given_up_slots),
        None => {}
    }
    println!("  stats: {}", opts.out.join("stats.json").display());
}

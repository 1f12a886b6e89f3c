//! The command line: clap definitions, logging, the progress bar, and exit codes.
//! Everything user-facing that is not an artifact lives here; the library below never prints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

mod decontaminate;
mod dedup;
mod eval;
mod filter;
mod model;
pub(crate) mod numbers;
mod prefs;
mod recipe;
mod report;
mod tokenize;
mod train;

use anyhow::{bail, Context};
use clap::{ArgAction, Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use numbers::{f32_in, f64_in, int_in, ints};

use crate::artifact::task::{self, Task};
use crate::generate::engine::{
    self as engine, DryRun, GenerateError, GenerateOptions, LikelyCause, LowKeep, RunState, Stats,
    StopReason,
};
use crate::generate::exercises::Verify;
use crate::generate::run::{
    ChatSettings, CorpusSettings, ExercisesSettings, Progress, SandboxSettings, StoriesSettings,
    TextbooksSettings,
};
use crate::generate::textbooks::SectionStyle;
use crate::generate::topics::{self, TopicsSettings};
use crate::teacher::factory::{self, ResolvedTeacher, TeacherConfig, TeacherSpec};
use crate::teacher::mock::{Faults, MockServer};
use crate::teacher::{MaxTokensField, TeacherError};

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
    /// Expand seed subjects into a large topic list (subject > subtopic > leaf) with the teacher, near duplicates removed: OUT/topics.txt, which `textbooks --topics` reads.
    Topics(TopicsArgs),
    /// Write chat SFT data: conversations (single and multi-turn, topic × task × difficulty) the teacher writes, parsed into OpenAI-style `messages` that an `objective = "sft"` stage reads; or, with --input, check and import existing jsonl/Parquet `messages` data.
    ChatData(ChatDataArgs),
    /// Combine the N tasks of a sharded generation, decontamination or tokenize (--shard K/N, or a Slurm / Kubernetes array) in DIR: checks that every task finished, with the same settings, then writes DIR/stats.json (contamination.json; the token shards and meta.json).
    Merge(MergeArgs),
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
    /// Train with a recipe: a training recipe (stages, data mixture, AdamW, schedule) or a whole-run recipe whose [[data]] and [[eval]] steps make the data and judge the model, run end to end; resumable.
    Train(train::TrainArgs),
    /// Print the chain of steps behind a recipe run's artifact (a data step, training run, checkpoint or eval directory).
    Lineage(recipe::LineageArgs),
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
    /// Preference pairs for DPO: a student checkpoint samples several responses per prompt, the teacher judges them (versioned rubric, order randomized), the best and worst become {prompt, chosen, rejected}; or import existing pairs (--input).
    Prefs(Box<prefs::PrefsArgs>),
    /// Evaluate a model: HumanEval / MBPP functional correctness with pass@k (sandboxed execution).
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// A table of each run's numbers (size, tokens, val loss, pass@k, story grades) next to the published phi-1 / TinyStories anchors.
    Scoreboard(eval::ScoreboardArgs),
    /// Write one self-contained HTML page for corpora, training runs and recipe runs: records, drops, lengths, constraint coverage, diversity (distinct-n, compression, near duplicates, embeddings), loss curves, scores, lineage.
    Report(report::ReportArgs),
}

/// How to reach the teacher and what to pay it; shared by every generating command.
#[derive(Debug, Clone, Args)]
pub struct TeacherArgs {
    /// Who writes the data: `http` (the OpenAI-compatible API at --base-url) or `local:SPEC`, a model run inside phigen: SPEC is a checkpoint directory (config.json, model.safetensors, tokenizer.json), a .gguf file, or a Hugging Face id fetched into the Hugging Face cache on first use. [default: http when --base-url or the key variable is set, else local:Qwen/Qwen2.5-Coder-0.5B-Instruct, a 0.5B model for trying the pipeline]
    #[arg(long, env = "PHIGEN_TEACHER")]
    pub teacher: Option<TeacherSpec>,
    /// Base URL of an OpenAI-compatible API: OpenAI (https://api.openai.com/v1, the default), vLLM (http://HOST:8000/v1), llama.cpp server (http://HOST:8080/v1), Ollama (http://localhost:11434/v1), `phigen serve` (http://127.0.0.1:8000/v1).
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub base_url: Option<String>,
    /// Run a local teacher in float32 instead of a GGUF file's quantized types or the 8-bit copies a checkpoint's projections get (slower; the numbers transformers computes when it loads the model).
    #[arg(long)]
    pub dequantize: bool,
    /// Model name as the server knows it.
    #[arg(long, env = "PHIGEN_MODEL", default_value = "gpt-4o-mini")]
    pub model: String,
    /// Environment variable that holds the API key (the key is never written to logs or outputs). Local servers need none.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// Sampling temperature, 0 to 10 [default: 1.0; 0.7 for a local teacher].
    #[arg(long, value_parser = f32_in(numbers::TEMPERATURE))]
    pub temperature: Option<f32>,
    /// Nucleus sampling top-p, above 0 and at most 1 [default: 1.0; 0.8 for a local teacher].
    #[arg(long, value_parser = f32_in(numbers::TOP_P))]
    pub top_p: Option<f32>,
    /// Sample only from the k most likely tokens [default: 20 for a local teacher; an HTTP teacher
    /// gets it only when given (vLLM and llama.cpp servers read it), else the server's default].
    #[arg(long, value_parser = ints(factory::TOP_K))]
    pub top_k: Option<u32>,
    /// Drop tokens less likely than this share of the most likely one; 0 is off [default: 0.05
    /// for a local teacher; an HTTP teacher gets it only when given].
    #[arg(long, value_parser = f32_in(numbers::UNIT))]
    pub min_p: Option<f32>,
    /// Make tokens seen recently less likely: their logits are divided by this when positive and
    /// multiplied when negative (above 0, at most 10; 1 = off; 1.1 is typical). The local teacher
    /// looks at the last 64 tokens, as llama.cpp does [default: 1.05 for a local teacher; sent to
    /// an HTTP teacher only when given, as `repetition_penalty` (vLLM) and `repeat_penalty`
    /// (llama.cpp)].
    #[arg(long, value_parser = f32_in(numbers::REPETITION_PENALTY))]
    pub repetition_penalty: Option<f32>,
    /// Output token limit per answer [default: the corpus's, e.g. 1024 for stories].
    #[arg(long, value_parser = ints(factory::MAX_TOKENS))]
    pub max_tokens: Option<u32>,
    /// Tokens an answer must have before it may end: until then its end-of-sequence tokens get
    /// probability 0 (0 is off; at most the output limit) [default: off; sent to an HTTP teacher
    /// only when given, as `min_tokens` (vLLM reads it; OpenAI's API has no such field)].
    #[arg(long, value_parser = ints(factory::MIN_TOKENS))]
    pub min_tokens: Option<u32>,
    /// Which request field carries the limit: auto = max_completion_tokens for api.openai.com, max_tokens elsewhere.
    #[arg(long, value_enum, default_value = "auto")]
    pub max_tokens_field: MaxTokensField,
    /// Seconds before one request is abandoned (and retried); at most a day.
    #[arg(long, default_value_t = 120.0, value_parser = f64_in(numbers::SECONDS))]
    pub timeout: f64,
    /// Requests in flight at most (for a local teacher: sequences generated together); the pool shrinks by itself when the server answers 429/503.
    #[arg(long, default_value_t = 32, value_parser = ints(factory::CONCURRENCY))]
    pub concurrency: usize,
    /// Retries of one request after 429, 5xx, timeouts, dropped connections or malformed bodies (at most 100).
    #[arg(long, default_value_t = 7, value_parser = ints(factory::RETRIES))]
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

impl From<&TeacherArgs> for TeacherConfig {
    fn from(t: &TeacherArgs) -> TeacherConfig {
        TeacherConfig {
            teacher: t.teacher.clone(),
            base_url: t.base_url.clone(),
            model: t.model.clone(),
            api_key_env: t.api_key_env.clone(),
            dequantize: t.dequantize,
            temperature: t.temperature,
            top_p: t.top_p,
            top_k: t.top_k,
            min_p: t.min_p,
            repetition_penalty: t.repetition_penalty,
            max_tokens: t.max_tokens,
            min_tokens: t.min_tokens,
            max_tokens_field: t.max_tokens_field,
            timeout_secs: t.timeout,
            concurrency: t.concurrency,
            retries: t.retries,
            price_input: t.price_input,
            price_output: t.price_output,
            max_cost: t.max_cost,
        }
    }
}

impl TeacherArgs {
    /// The teacher's settings, resolved; prints the note on a teacher chosen by default.
    fn resolve(&self) -> anyhow::Result<(TeacherConfig, ResolvedTeacher)> {
        self.resolve_noting(true)
    }

    /// [`TeacherArgs::resolve`], printing the note only if the teacher will be asked (`used`).
    fn resolve_noting(&self, used: bool) -> anyhow::Result<(TeacherConfig, ResolvedTeacher)> {
        let cfg = TeacherConfig::from(self);
        let resolved = cfg.resolve()?;
        if let Some(note) = resolved.note.as_ref().filter(|_| used) {
            eprintln!("{note}");
        }
        Ok((cfg, resolved))
    }
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
    #[command(flatten)]
    pub array: ArrayArgs,
}

impl OutputArgs {
    fn options(&self, out: &Path, t: &TeacherArgs) -> anyhow::Result<GenerateOptions> {
        Ok(GenerateOptions {
            out: out.to_path_buf(),
            n: self.n,
            seed: self.seed,
            max_attempts: self.max_attempts,
            shard_size: self.shard_size,
            concurrency: t.concurrency,
            task: self.array.task()?,
        })
    }
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
    /// TinyStories-Instruct: precede each story by a random subset of `Summary:`, `Features:`, `Sentence:` and `Words:` lines (the summary is a second teacher call per story; implies --strict-words). OUT holds the joined records; the stories and summaries runs live in OUT/.phigen.instruct/.
    #[arg(long)]
    pub instruct: bool,
    /// The summary prompt of --instruct [default: the built-in prompts/story-summary.txt].
    #[arg(long, requires = "instruct")]
    pub summary_prompt: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TextbooksArgs {
    /// Topics file: one `topic` or `topic > subtopic` a line, or the `subject > subtopic > leaf` lines `phigen topics` writes (the section is about the leaf, the path above it is context), `#` comments (e.g. seeds/topics.txt).
    #[arg(long)]
    pub topics: PathBuf,
    /// Audiences file, one a line [default: the built-in seeds/audiences.txt].
    #[arg(long)]
    pub audiences: Option<PathBuf>,
    /// Styles file, one a line [default: the built-in seeds/styles.txt].
    #[arg(long)]
    pub styles: Option<PathBuf>,
    /// Prompt template file [default: the built-in prompts/textbook.txt; prompts/textbook-prose.txt with --style prose].
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// `code`: Python textbook sections whose code must parse (phi-1); `prose`: natural-language sections (phi-1.5: common sense, science, daily activities, theory of mind), checked for length, English, refusals, truncation and exact and near duplicates, code allowed but not required (audiences and styles default to seeds/prose-audiences.txt and seeds/prose-styles.txt).
    #[arg(long, value_enum, default_value_t = SectionStyle::Code)]
    pub style: SectionStyle,
    /// With --style prose: web texts (jsonl or Parquet with `text`, `id` optional) of which each prompt quotes an excerpt, for diversity; the record keeps its id.
    #[arg(long)]
    pub web: Option<PathBuf>,
    /// Keep only code sections whose program runs: their Python blocks, in order as one program,
    /// run in the sandbox (below) to the end without an error (`code_failed` otherwise)
    /// [default: true for a local teacher, whose sections' code runs about 70% of the time
    /// (README); false for an HTTP teacher].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub run_code: Option<bool>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Output directory.
    #[arg(long, default_value = "data/textbooks")]
    pub out: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

/// Where generated code runs (`exercises`, `textbooks --run-code`).
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Python interpreter for the sandbox [default: python3 on PATH, then /usr/bin/python3].
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Programs run in the sandbox at once.
    #[arg(long, default_value_t = 2, value_parser = int_in(1usize, 1024))]
    pub sandbox_workers: usize,
    /// Run generated code without the bubblewrap namespaces, as the calling user (it can read
    /// your files and reach the network). Only where you trust the teacher's code; stats.json
    /// records it.
    #[arg(long)]
    pub unsafe_sandbox: bool,
    /// Wall-clock seconds a program may run (the HumanEval harness uses 3); at most a day.
    #[arg(long, default_value_t = 3.0, value_parser = f64_in(numbers::SECONDS))]
    pub exec_timeout: f64,
}

impl From<SandboxArgs> for SandboxSettings {
    fn from(a: SandboxArgs) -> SandboxSettings {
        SandboxSettings {
            python: a.python,
            sandbox_workers: a.sandbox_workers,
            unsafe_sandbox: a.unsafe_sandbox,
            exec_timeout: a.exec_timeout,
        }
    }
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
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// How an exercise is checked before it is kept: `tests` runs its asserts in the sandbox,
    /// `parse` keeps a function that parses and has a docstring, running nothing (for a small
    /// local teacher, which rarely writes asserts that pass; stats.json records the choice).
    #[arg(long, value_enum, default_value_t = Verify::Tests)]
    pub verify: Verify,
    /// Output directory.
    #[arg(long, default_value = "data/exercises")]
    pub out: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TopicsArgs {
    /// Seed subjects: one `subject` (or a `subject > area` path) a line, `#` comments (e.g. seeds/prose-topics.txt).
    #[arg(long)]
    pub seeds: PathBuf,
    /// Subtopics asked for in one answer (level 1: subject → subtopics).
    #[arg(long, default_value_t = 20, value_parser = ints(topics::LIST_LENGTH))]
    pub subtopics: u64,
    /// Leaf topics asked for in one answer (level 2: subtopic → leaves).
    #[arg(long, default_value_t = 20, value_parser = ints(topics::LIST_LENGTH))]
    pub leaves: u64,
    /// Two topics are near duplicates when the exact Jaccard similarity of their word 2-gram sets is at least this; the later one is dropped (stats.json records the threshold and the share removed).
    #[arg(long, default_value_t = topics::DEFAULT_MAX_SIMILARITY, value_parser = f64_in(topics::SIMILARITY))]
    pub max_similarity: f64,
    /// Rounds of leaf lists at most: when a round leaves fewer than --n topics, every subtopic is asked again for less obvious ones.
    #[arg(long, default_value_t = 4, value_parser = ints(topics::ROUNDS))]
    pub max_rounds: u64,
    /// Web texts (jsonl or Parquet with `text`, `id` optional) of which each leaves prompt quotes an excerpt, for diversity; topics.jsonl keeps its id.
    #[arg(long)]
    pub web: Option<PathBuf>,
    /// Subtopics prompt template [default: the built-in prompts/topics-subtopics.txt].
    #[arg(long)]
    pub subtopics_prompt: Option<PathBuf>,
    /// Leaves prompt template [default: the built-in prompts/topics-leaves.txt].
    #[arg(long)]
    pub leaves_prompt: Option<PathBuf>,
    /// Output directory: topics.txt, topics.jsonl, stats.json (the two teacher runs live in OUT/.phigen.topics/).
    #[arg(long, default_value = "data/topics")]
    pub out: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ChatDataArgs {
    /// Import existing conversations instead of asking the teacher: jsonl (.jsonl.gz too) or Parquet files with OpenAI-style `messages` ([{role, content}, …]), or directories of them. Each row gets the same checks (drops counted by reason in stats.json, with file and line in rejects.parquet); records keep their source file and row.
    #[arg(long, num_args = 1.., conflicts_with_all = ["topics", "max_turns", "prompt"])]
    pub input: Vec<PathBuf>,
    /// Topics file: one `topic` or `topic > subtopic` a line (or `phigen topics`'s list), `#` comments [default: the built-in seeds/chat-topics.txt].
    #[arg(long)]
    pub topics: Option<PathBuf>,
    /// Exchanges (a user message and the assistant's answer) a conversation has at most; each one draws 1 to this.
    #[arg(long, default_value_t = crate::generate::chat::DEFAULT_MAX_TURNS, value_parser = ints(crate::generate::chat::MAX_TURNS))]
    pub max_turns: u64,
    /// Prompt template file [default: the built-in prompts/chat.txt].
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "data/chat")]
    pub out: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

/// Which task of an array job a run is, for the stages that shard (generation, decontaminate,
/// tokenize).
#[derive(Debug, Clone, Args)]
pub struct ArrayArgs {
    /// Run as task K of an array of N (0-based): do the share i mod N = K (generation slots; input
    /// files for decontaminate and tokenize) into OUT/tasks/K, then write OUT/completions/K;
    /// `phigen merge OUT` combines the N tasks. In a Slurm array (SLURM_ARRAY_TASK_ID) or a
    /// Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with --shards) the task comes from the
    /// environment.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Task>,
    /// The number of tasks of the array, where the environment gives only the task's index.
    #[arg(long, value_parser = int_in(1usize, task::MAX_TASKS))]
    pub shards: Option<usize>,
}

impl ArrayArgs {
    /// The task: the flag, else the scheduler's environment; `None` for a whole run.
    pub fn task(&self) -> Result<Option<Task>, task::TaskError> {
        Task::from_env(self.shard, self.shards)
    }
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// The --out directory the array's tasks shared.
    pub dir: PathBuf,
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
    /// Run the model in float32 instead of a GGUF file's quantized types or the 8-bit copies a checkpoint's projections get.
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
    // The library's stage errors wrap the engine's transparently: ask each kind.
    let auth = e.chain().any(|c| {
        c.downcast_ref::<GenerateError>()
            .is_some_and(GenerateError::is_auth)
            || matches!(
                c.downcast_ref::<TeacherError>(),
                Some(TeacherError::Auth { .. })
            )
            || c.downcast_ref::<crate::classify::pipeline::PipelineError>()
                .is_some_and(|e| e.is_auth())
            || c.downcast_ref::<crate::eval::EvalError>()
                .is_some_and(|e| e.is_auth())
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
            let settings = CorpusSettings::Stories(StoriesSettings {
                words: args.words,
                prompt: args.prompt,
                max_features: args.max_features,
                strict_words: args.strict_words,
                instruct: args.instruct,
                summary_prompt: args.summary_prompt,
            });
            let (output, teacher) = (&args.output, &args.teacher);
            with_storage(&[], &args.out, |_, out| async move {
                generate(&settings, &out, output, teacher, cli.quiet).await
            })
            .await
        }
        Command::Textbooks(args) => {
            let settings = CorpusSettings::Textbooks(TextbooksSettings {
                topics: args.topics,
                audiences: args.audiences,
                styles: args.styles,
                prompt: args.prompt,
                style: args.style,
                web: args.web,
                run_code: args.run_code,
                // Only sandbox flags that differ from the defaults are settings of the run, so
                // directories written before them resume.
                sandbox: SandboxSettings::from(args.sandbox).unless_default(),
            });
            let (output, teacher) = (&args.output, &args.teacher);
            with_storage(&[], &args.out, |_, out| async move {
                generate(&settings, &out, output, teacher, cli.quiet).await
            })
            .await
        }
        Command::Exercises(args) => {
            let settings = CorpusSettings::Exercises(ExercisesSettings {
                topics: args.topics,
                names: args.names,
                prompt: args.prompt,
                python: args.sandbox.python,
                sandbox_workers: args.sandbox.sandbox_workers,
                unsafe_sandbox: args.sandbox.unsafe_sandbox,
                exec_timeout: args.sandbox.exec_timeout,
                verify: args.verify,
            });
            let (output, teacher) = (&args.output, &args.teacher);
            with_storage(&[], &args.out, |_, out| async move {
                generate(&settings, &out, output, teacher, cli.quiet).await
            })
            .await
        }
        Command::Topics(args) => {
            let settings = CorpusSettings::Topics(TopicsSettings {
                seeds: args.seeds,
                subtopics: args.subtopics,
                leaves: args.leaves,
                max_similarity: args.max_similarity,
                max_rounds: args.max_rounds,
                web: args.web,
                subtopics_prompt: args.subtopics_prompt,
                leaves_prompt: args.leaves_prompt,
            });
            let (output, teacher) = (&args.output, &args.teacher);
            with_storage(&[], &args.out, |_, out| async move {
                generate(&settings, &out, output, teacher, cli.quiet).await
            })
            .await
        }
        Command::ChatData(args) if !args.input.is_empty() => {
            let args = &args;
            with_storage(&args.input, &args.out, |input, out| async move {
                import_chat(&input, &out, args.output.shard_size, cli.quiet)
            })
            .await
        }
        Command::ChatData(args) => {
            let settings = CorpusSettings::Chat(ChatSettings {
                topics: args.topics,
                max_turns: args.max_turns,
                prompt: args.prompt,
            });
            let (output, teacher) = (&args.output, &args.teacher);
            with_storage(&[], &args.out, |_, out| async move {
                generate(&settings, &out, output, teacher, cli.quiet).await
            })
            .await
        }
        Command::Merge(ref args) => with_storage(&[], &args.dir, |_, local| async move {
            use crate::pipeline::merge::{merge, Merged};
            let merged = merge(&local)?;
            if !cli.quiet {
                let dir = args.dir.display();
                match merged {
                    Merged::Tokenize(meta) => println!(
                        "{dir}: tokenize tasks merged: {} sources, {} tokens in {} shards",
                        meta.sources.len(),
                        meta.splits.values().map(|s| s.tokens).sum::<u64>(),
                        meta.splits.values().map(|s| s.shards.len()).sum::<usize>()
                    ),
                    Merged::Decontamination(r) => println!(
                        "{dir}: decontamination tasks merged: {} documents, {} contaminated; wrote {}",
                        r.documents,
                        r.contaminated_documents,
                        args.dir.join(crate::dedup::decontaminate::REPORT_FILE).display()
                    ),
                    Merged::Generation { tasks, stats } => println!(
                        "{dir}: {tasks} tasks merged: {} records, keep rate {:.1}%; wrote {}",
                        stats["records"],
                        100.0 * stats["keep_rate"].as_f64().unwrap_or(0.0),
                        args.dir.join("stats.json").display()
                    ),
                }
            }
            Ok(Outcome::Complete)
        })
        .await,
        Command::Sample(args) => model::sample(&args).map(|_| Outcome::Complete),
        Command::Init(args) => model::init(&args).map(|_| Outcome::Complete),
        Command::Tokenize(args) => {
            let args = &args;
            with_storage(&args.input, &args.out, |input, out| async move {
                tokenize::tokenize(&tokenize::TokenizeArgs { input, out, ..args.clone() }, cli.quiet)
            })
            .await
        }
        Command::Shards(cmd) => tokenize::shards(&cmd),
        Command::Train(args) if crate::pipeline::Pipeline::is_whole_run(&args.recipe)? => {
            recipe::run(&args, cli.quiet).await
        }
        Command::Train(args) => train::train(&args, cli.quiet),
        Command::Lineage(args) => recipe::lineage(&args),
        Command::Dedup(args) => {
            let args = &args;
            with_storage(&args.input, &args.out, |input, out| async move {
                dedup::dedup(&dedup::DedupArgs { input, out, ..args.clone() }, cli.quiet)
            })
            .await
        }
        Command::Decontaminate(args) => {
            let args = &args;
            with_storage(&args.input, &args.out, |input, out| async move {
                let local = decontaminate::DecontaminateArgs { input, out, ..args.clone() };
                decontaminate::decontaminate(&local, cli.quiet)
            })
            .await
        }
        Command::Annotate(args) => {
            let args = &args;
            with_storage(&args.input.input, &args.out, |input, out| async move {
                let mut local = args.clone();
                (local.input.input, local.out) = (input, out);
                filter::annotate(&local, cli.quiet).await
            })
            .await
        }
        Command::Classify(cmd) => filter::classify(&cmd),
        Command::Filter(args) => {
            let args = &args;
            with_storage(&args.input.input, &args.out, |input, out| async move {
                let mut local = args.clone();
                (local.input.input, local.out) = (input, out);
                filter::filter(&local, cli.quiet).await
            })
            .await
        }
        Command::Prefs(args) => prefs::prefs(&args, cli.quiet).await,
        Command::Eval(cmd) => eval::eval(&cmd, cli.quiet).await,
        Command::Scoreboard(args) => eval::scoreboard(&args),
        Command::Report(args) => report::report(&args, cli.quiet),
        Command::Serve(args) => {
            let engine =
                factory::local_engine(&args.checkpoint, !args.dequantize, args.batch, args.seed)
                    .await?;
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

/// Runs a data stage whose `--input`s and `--out` may be object-storage URLs (s3://, gs://, az://,
/// https:// for inputs): `run` gets local paths (remote inputs mirrored into the cache, a remote
/// output's staging directory), and once it has returned what it wrote is uploaded, manifests and
/// markers last. Local paths pass through untouched.
async fn with_storage<F>(
    inputs: &[PathBuf],
    out: &Path,
    run: impl FnOnce(Vec<PathBuf>, PathBuf) -> F,
) -> anyhow::Result<Outcome>
where
    F: std::future::Future<Output = anyhow::Result<Outcome>>,
{
    let staged = crate::artifact::store::Staged::open(inputs, out).await?;
    let outcome = run(staged.inputs.clone(), staged.out.clone()).await?;
    let remote = staged.remote_out().map(str::to_string);
    if let (Some(t), Some(url)) = (staged.commit().await?, remote) {
        tracing::info!(
            "{url}: uploaded {} files ({:.1} MB); {} were already there",
            t.files,
            t.bytes as f64 / 1e6,
            t.skipped
        );
    }
    Ok(outcome)
}

/// Whether `task` of an array writing into `out` finished already (its marker exists: a
/// relaunched array skips it without loading a teacher); says so unless `quiet`.
fn task_finished(task: Option<Task>, out: &Path, quiet: bool) -> bool {
    let Some(t) = task.filter(|t| t.is_done(out)) else {
        return false;
    };
    if !quiet {
        println!(
            "task {t} is done (its marker {} exists): nothing to do",
            t.marker(out).display()
        );
    }
    true
}

/// `phigen stories`, `textbooks` or `exercises`: the dry run's estimate, or the run with a
/// progress bar and its summary.
async fn generate(
    settings: &CorpusSettings,
    out: &Path,
    output: &OutputArgs,
    t: &TeacherArgs,
    quiet: bool,
) -> anyhow::Result<Outcome> {
    let (cfg, resolved) = t.resolve()?;
    let opts = output.options(out, t)?;
    if task_finished(opts.task, out, quiet) {
        return Ok(Outcome::Complete);
    }
    if t.dry_run {
        let plan = settings.dry_run(&cfg, &opts).await?;
        print_dry_run(&plan, &resolved.model);
        return Ok(Outcome::Complete);
    }
    let live = Live::start(quiet);
    let result = settings
        .run(&cfg, &opts, live.state.clone(), &|p| live.show(p))
        .await;
    live.finish();
    Ok(finished(&result?, out, quiet))
}

/// `phigen chat-data --input`: imports the conversations of `input` into `out`.
fn import_chat(
    input: &[PathBuf],
    out: &Path,
    shard_size: usize,
    quiet: bool,
) -> anyhow::Result<Outcome> {
    use crate::generate::chat::{import, ChatImportSettings};
    let stats = import(input, out, &ChatImportSettings { shard_size })?;
    if !quiet {
        let drops = stats
            .rejects_total
            .iter()
            .map(|(r, c)| format!("{r} {c}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{}: kept {} of {} conversations ({:.1}%){}; wrote {}",
            out.display(),
            stats.records,
            stats.rows,
            100.0 * stats.keep_rate,
            if drops.is_empty() {
                String::new()
            } else {
                format!(", dropped: {drops}")
            },
            out.join("stats.json").display()
        );
    }
    Ok(Outcome::Complete)
}

/// Prints a finished generation's summary (unless `quiet`) and says how it ended.
fn finished(stats: &Stats, out: &Path, quiet: bool) -> Outcome {
    if !quiet {
        print_summary(stats, out);
    }
    match stats.stopped {
        Some(StopReason::Interrupted) => Outcome::Interrupted,
        _ if stats.complete => Outcome::Complete,
        _ => Outcome::Incomplete,
    }
}

/// A generation under way: its progress bar, and Ctrl-C stopping it cleanly once it has started
/// (before, as while a model loads or writes continuations, Ctrl-C quits at once).
struct Live {
    state: Arc<RunState>,
    bar: ProgressBar,
    interrupt: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
    /// The run's low-keep report has been shown (it is shown once, even with --quiet).
    warned: std::sync::atomic::AtomicBool,
}

impl Live {
    fn start(quiet: bool) -> Live {
        Live::watch(Arc::new(RunState::default()), quiet)
    }

    /// A bar for the run `state` belongs to.
    fn watch(state: Arc<RunState>, quiet: bool) -> Live {
        let bar = progress_bar(
            quiet,
            Some(0),
            "{spinner} {pos}/{len} [{elapsed_precise} < {eta_precise}] {per_sec} {msg}",
        );
        Live {
            state,
            bar,
            interrupt: std::sync::OnceLock::new(),
            warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Draws `p`; the first call (the run has started) hands Ctrl-C to the run.
    fn show(&self, p: &Progress) {
        self.interrupt
            .get_or_init(|| tokio::spawn(watch_interrupt(self.state.clone())));
        self.bar.set_length(p.total);
        self.bar.set_position(p.done);
        let cost = p.spent_usd.map_or(String::new(), |c| format!(" · ${c:.4}"));
        self.bar.set_message(format!(
            "retries {} · failed {} · dropped {} · tokens {}/{}{cost}",
            p.retries, p.failed, p.dropped, p.prompt_tokens, p.completion_tokens,
        ));
        if let Some(report) = self.state.low_keep() {
            if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                let text = low_keep_warning(report, self.state.teacher());
                self.bar.suspend(|| eprintln!("{text}"));
            }
        }
    }

    fn finish(self) {
        if let Some(interrupt) = self.interrupt.get() {
            interrupt.abort();
        }
        self.bar.finish_and_clear();
    }
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

/// The warning of a run that keeps too few answers: what was seen, the likely cause, the flag.
fn low_keep_warning(r: &LowKeep, teacher: Option<&str>) -> String {
    let teacher = teacher.unwrap_or("the teacher");
    let advice = match r.cause {
        LikelyCause::MaxTokens => "answers run into the output limit: raise --max-tokens".to_string(),
        LikelyCause::SmallTeacher => format!("{teacher} is likely too small to write what this corpus asks for: pass --teacher local:SPEC with a larger model, or --teacher http with an API key"),
        LikelyCause::Unclear => "read the dropped answers in rejects.parquet of --out; a stronger --model, a larger --max-tokens or a clearer --prompt may help".to_string(),
    };
    format!(
        "warning: after {} answers only {} were kept ({:.0}%, below {:.0}%); most drops: {}. {advice}. The run goes on (Ctrl-C stops it cleanly).",
        r.answers,
        r.kept,
        100.0 * r.kept as f64 / r.answers.max(1) as f64,
        100.0 * engine::LOW_KEEP_RATE,
        reasons_list(&r.top_reasons),
    )
}

/// `truncated 40, too_short 5`.
fn reasons_list(reasons: &[(crate::generate::DropReason, u64)]) -> String {
    let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    parts.join(", ")
}

fn print_summary(s: &Stats, out: &Path) {
    if let Some(note) = &s.teacher_note {
        println!("note: {note}");
    }
    let r = &s.run;
    println!(
        "{}: {} new records in {} ({} in all of {} requested) in {:.1}s, {:.0} requests/s",
        s.kind,
        r.written,
        out.display(),
        s.records,
        s.requested,
        r.wall_seconds,
        r.requests_per_second
    );
    if !r.dropped.is_empty() {
        let d: Vec<String> = r.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  dropped and retried: {}", d.join(", "));
    }
    let top = engine::top_reasons(&s.rejects_total, 3);
    println!(
        "  keep rate {:.1}% of {} answers checked{}",
        100.0 * s.keep_rate,
        s.answers_checked,
        if top.is_empty() {
            String::new()
        } else {
            format!("; top reject reasons: {}", reasons_list(&top))
        }
    );
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
    println!("  stats: {}", out.join("stats.json").display());
}

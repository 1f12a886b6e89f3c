//! `phigen eval humaneval` and `phigen eval mbpp`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Args, Subcommand};
use indicatif::ProgressBar;

use super::numbers::{self, f64_in, int_in};
use super::Outcome;
use crate::eval::code::{self, GenerateSettings, HUMANEVAL_STOPS};
use crate::model::checkpoint;
use crate::model::sample::SamplingParams;
use crate::model::tokenizer::Tokenizer;
use crate::sandbox::{Isolation, Limits, Sandbox};

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Functional correctness on HumanEval (HumanEval.jsonl(.gz) as openai/human-eval ships it).
    Humaneval(CodeEvalArgs),
    /// Functional correctness on MBPP (jsonl with task_id, text, code, test_list).
    Mbpp(CodeEvalArgs),
    /// Validation loss and perplexity of a checkpoint on token shards (`phigen tokenize` output).
    Loss(LossArgs),
    /// Continue story beginnings with a checkpoint and have a teacher grade them (TinyStories rubric).
    Stories(Box<StoriesArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct StoriesArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Story beginnings, one a line [default: the built-in seeds/story-beginnings.txt].
    #[arg(long)]
    pub beginnings: Option<PathBuf>,
    /// Grading prompt [default: the built-in prompts/story-grade.txt].
    #[arg(long)]
    pub rubric: Option<PathBuf>,
    /// Output directory: continuations.jsonl, grades/<judge>-v<rubric>/, stories.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens the model writes after each beginning.
    #[arg(long, default_value_t = 200, value_parser = int_in(1usize, 1 << 20))]
    pub max_new_tokens: usize,
    /// The model's sampling temperature, 0 (greedy) to 10.
    #[arg(long, default_value_t = 0.8, value_parser = f64_in(numbers::TEMPERATURE))]
    pub gen_temperature: f64,
    /// The model's nucleus top-p, above 0 and at most 1 (1 = off).
    #[arg(long, default_value_t = 0.95, value_parser = f64_in(numbers::TOP_P))]
    pub gen_top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub teacher: super::TeacherArgs,
}

#[derive(Debug, Clone, Args)]
pub struct LossArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A token directory; its validation split is used.
    #[arg(long)]
    pub shards: PathBuf,
    /// Tokens of context per row.
    #[arg(long, default_value_t = 512, value_parser = int_in(1usize, 1 << 20))]
    pub seq_len: usize,
    /// Batches of --rows rows (fewer if the split is smaller).
    #[arg(long, default_value_t = 50, value_parser = int_in(1usize, 1 << 20))]
    pub batches: usize,
    /// Rows per batch.
    #[arg(long, default_value_t = 8, value_parser = int_in(1usize, 1 << 16))]
    pub rows: usize,
    /// Also write the report here (JSON).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CodeEvalArgs {
    /// The problems file; nothing is downloaded.
    #[arg(long)]
    pub problems: PathBuf,
    /// Generate completions with this checkpoint (resumes from OUT/samples.jsonl).
    #[arg(long, conflicts_with = "samples", required_unless_present = "samples")]
    pub checkpoint: Option<PathBuf>,
    /// Evaluate completions made elsewhere: jsonl of {"task_id", "completion"} (human-eval's samples format).
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Output directory: samples.jsonl (generated), results.jsonl, summary.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Completions per problem.
    #[arg(long, default_value_t = 1, value_parser = int_in(1usize, 100_000))]
    pub samples_per_task: usize,
    /// Sampling temperature, 0 (greedy) to 10.
    #[arg(long, default_value_t = 0.0, value_parser = f64_in(numbers::TEMPERATURE))]
    pub temperature: f64,
    /// Nucleus sampling top-p, above 0 and at most 1 (1 = off).
    #[arg(long, default_value_t = 0.95, value_parser = f64_in(numbers::TOP_P))]
    pub top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Token limit of a completion.
    #[arg(long, default_value_t = 384, value_parser = int_in(1usize, 1 << 20))]
    pub max_new_tokens: usize,
    /// Completions decoded at once.
    #[arg(long, default_value_t = 8, value_parser = int_in(1usize, 1 << 16))]
    pub batch: usize,
    /// pass@k reported for each k (those up to --samples-per-task).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100", value_parser = int_in(1usize, 100_000))]
    pub k: Vec<usize>,
    /// Programs run at once.
    #[arg(long, default_value_t = 2, value_parser = int_in(1usize, 1024))]
    pub workers: usize,
    /// Wall-clock seconds per program (the reference harness uses 3); at most a day.
    #[arg(long, default_value_t = 3.0, value_parser = f64_in(numbers::SECONDS))]
    pub timeout: f64,
    /// Address-space limit per program, MiB: at least 64 (below that not even the Python interpreter starts), at most 1048576 (1 TiB).
    #[arg(long, default_value_t = 1024, value_parser = int_in(64u64, 1 << 20))]
    pub memory_mb: u64,
    /// Python interpreter [default: python3 on PATH, then /usr/bin/python3].
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Run programs without the bubblewrap namespaces, as the calling user (they can read your
    /// files and reach the network). Only for completions you would run yourself; recorded in
    /// summary.json.
    #[arg(long)]
    pub unsafe_sandbox: bool,
}

/// The sampler of a model under evaluation: temperature 0 is greedy, top-p 1 is off.
fn sampling(max_new_tokens: usize, temperature: f64, top_p: f64, seed: u64) -> SamplingParams {
    SamplingParams {
        max_new_tokens,
        temperature,
        top_k: None,
        top_p: (top_p < 1.0).then_some(top_p),
        min_p: None,
        repetition_penalty: 1.0,
        seed,
        greedy: temperature <= 0.0,
    }
}

fn bar(quiet: bool, len: usize, what: &str) -> ProgressBar {
    super::progress_bar(
        quiet,
        Some(len as u64),
        &format!(
            "{{spinner}} {what} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{per_sec}}"
        ),
    )
}

pub async fn eval(cmd: &EvalCommand, quiet: bool) -> anyhow::Result<Outcome> {
    let args = match cmd {
        EvalCommand::Humaneval(args) | EvalCommand::Mbpp(args) => args,
        EvalCommand::Stories(a) => return stories(a, quiet).await,
        EvalCommand::Loss(a) => {
            let r = crate::eval::validation_loss(
                &a.checkpoint,
                &a.shards,
                a.seq_len,
                a.batches,
                a.rows,
            )?;
            let json = serde_json::to_string_pretty(&r)?;
            if let Some(out) = &a.out {
                if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("could not create {}", dir.display()))?;
                }
                crate::artifact::atomic::write_bytes(out, json.as_bytes())
                    .with_context(|| format!("could not write {}", out.display()))?;
            }
            println!("{json}");
            return Ok(Outcome::Complete);
        }
    };
    if args.samples_per_task == 0 {
        bail!("--samples-per-task must be at least 1");
    }
    let problems = code::load_problems(&args.problems)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("could not create {}", args.out.display()))?;
    let _lock = crate::artifact::outdir::DirLock::exclusive(&args.out)?;
    let samples = match (&args.samples, &args.checkpoint) {
        (Some(path), _) => code::load_samples(path)?,
        (None, Some(dir)) => {
            let model = checkpoint::load(dir, candle_core::DType::F32, &Device::Cpu)?;
            let tokenizer = Tokenizer::for_checkpoint(dir)?;
            let settings = GenerateSettings {
                samples_per_task: args.samples_per_task,
                params: sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed),
                stops: HUMANEVAL_STOPS.iter().map(|s| s.to_string()).collect(),
                batch: args.batch,
            };
            let b = bar(quiet, problems.len(), "generating");
            let s = code::generate_samples(
                &model,
                &tokenizer,
                &problems,
                &settings,
                &code::samples_path(&args.out),
                |done| b.set_position(done as u64),
            )?;
            b.finish_and_clear();
            s
        }
        (None, None) => bail!("pass --checkpoint DIR or --samples FILE"),
    };
    let limits = Limits {
        wall: Duration::from_secs_f64(args.timeout.max(0.1)),
        cpu_secs: args.timeout.ceil().max(1.0) as u64,
        memory_bytes: args.memory_mb << 20,
        ..Limits::default()
    };
    let sandbox = Arc::new(
        Sandbox::new(
            args.python.as_deref(),
            limits,
            args.workers.max(1),
            Isolation::requested(args.unsafe_sandbox),
        )
        .await?,
    );
    let b = bar(quiet, samples.len(), "executing");
    let started = Instant::now();
    let outcomes = code::execute(&problems, &samples, sandbox.clone(), |n| {
        b.set_position(n as u64)
    })
    .await?;
    b.finish_and_clear();
    let benchmark = match cmd {
        EvalCommand::Mbpp(_) => "mbpp",
        _ => "humaneval",
    };
    let mut summary = code::summarize(
        benchmark,
        &problems,
        &outcomes,
        &args.k,
        started.elapsed().as_secs_f64(),
    );
    summary.sandbox_isolation = Some(sandbox.isolation());
    code::write_results(&args.out, &outcomes, &summary)?;
    if !quiet {
        let scores: Vec<String> = summary
            .pass_at_k
            .iter()
            .map(|(k, v)| format!("{k} {:.2}%", 100.0 * v))
            .collect();
        println!(
            "{}: {} samples of {} problems, {} passed ({} timed out); {} — executed in {:.1}s with {} workers ({:?} isolation)",
            args.problems.display(),
            summary.samples,
            summary.problems_with_samples,
            summary.passed,
            summary.timed_out,
            scores.join(", "),
            summary.execution_seconds,
            args.workers.max(1),
            sandbox.isolation()
        );
        println!("  results: {}", args.out.join("results.jsonl").display());
    }
    Ok(Outcome::Complete)
}

async fn stories(a: &StoriesArgs, quiet: bool) -> anyhow::Result<Outcome> {
    use crate::eval::stories::{self, StorySettings};
    let (cfg, resolved) = a.teacher.resolve()?;
    let settings = StorySettings {
        checkpoint: a.checkpoint.clone(),
        beginnings: a.beginnings.clone(),
        rubric: a.rubric.clone(),
        out: a.out.clone(),
        max_new_tokens: a.max_new_tokens,
        gen_temperature: a.gen_temperature,
        gen_top_p: a.gen_top_p,
        seed: a.seed,
    };
    if a.teacher.dry_run {
        let plan = stories::dry_run(&settings, &cfg)?;
        super::print_dry_run(&plan, &resolved.model);
        return Ok(Outcome::Complete);
    }
    let live = super::Live::start(quiet);
    let result = stories::run(&settings, &cfg, live.state.clone(), &|p| live.show(p)).await;
    live.finish();
    let r = result?;
    let outcome = super::finished(&r.grading, &r.grades, quiet);
    if !quiet {
        let summary = &r.summary;
        let m: Vec<String> = summary
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {:.2} ± {:.2}", v.mean, v.ci95))
            .collect();
        println!(
            "stories: {} of {} graded by {}: {} (95% intervals); age groups {:?}\n  {}",
            summary.graded,
            summary.stories,
            summary.judge,
            m.join(", "),
            summary.age_groups,
            r.summary_path.display()
        );
    }
    Ok(outcome)
}

#[derive(Debug, Clone, Args)]
pub struct ScoreboardArgs {
    /// Run directories: a training run and/or `phigen eval` output directories.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Print JSON instead of Markdown.
    #[arg(long)]
    pub json: bool,
}

pub fn scoreboard(args: &ScoreboardArgs) -> anyhow::Result<Outcome> {
    use crate::eval::scoreboard;
    let runs = args
        .runs
        .iter()
        .map(|d| scoreboard::collect(d))
        .collect::<Result<Vec<_>, _>>()?;
    if args.json {
        let anchors: Vec<_> = scoreboard::ANCHORS
            .iter()
            .map(|(m, k, v)| serde_json::json!({"model": m, "metric": k, "value": v}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"runs": runs, "anchors": anchors}))?
        );
    } else {
        print!("{}", scoreboard::markdown(&runs));
    }
    Ok(Outcome::Complete)
}

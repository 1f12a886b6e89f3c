//! `phigen eval humaneval` and `phigen eval mbpp`.

use std::path::PathBuf;
use std::sync::OnceLock;

use clap::{Args, Subcommand};
use indicatif::ProgressBar;

use super::numbers::{self, f64_in, int_in};
use super::Outcome;
use crate::eval::code::{self, Benchmark, CodeEvalProgress, CodeEvalSettings};

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
    /// Grading prompt [default: the built-in prompts/story-grade.txt; prompts/instruct-grade.txt with --instruct].
    #[arg(long)]
    pub rubric: Option<PathBuf>,
    /// Measure instruction following instead: the model continues the prefixes of these TinyStories-Instruct records (the --out of a `phigen stories --instruct` run it was not trained on), and its stories are checked for the required words, the features (dialogue by rule, the others by the judge) and consistency with the summary (judge); writes instruct.json.
    #[arg(long, conflicts_with = "beginnings")]
    pub instruct: Option<PathBuf>,
    /// Output directory: continuations.jsonl, grades/<judge>-v<rubric>/, stories.json (instruct.json with --instruct).
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

fn bar(quiet: bool, len: usize, what: &str) -> ProgressBar {
    super::progress_bar(
        quiet,
        Some(len as u64),
        &format!(
            "{{spinner}} {what} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{per_sec}}"
        ),
    )
}

impl CodeEvalArgs {
    fn settings(&self, benchmark: Benchmark) -> CodeEvalSettings {
        CodeEvalSettings {
            benchmark,
            problems: self.problems.clone(),
            checkpoint: self.checkpoint.clone(),
            samples: self.samples.clone(),
            out: self.out.clone(),
            samples_per_task: self.samples_per_task,
            k: self.k.clone(),
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            batch: self.batch,
            python: self.python.clone(),
            workers: self.workers,
            timeout: self.timeout,
            memory_mb: self.memory_mb,
            unsafe_sandbox: self.unsafe_sandbox,
        }
    }
}

pub async fn eval(cmd: &EvalCommand, quiet: bool) -> anyhow::Result<Outcome> {
    let (args, benchmark) = match cmd {
        EvalCommand::Humaneval(args) => (args, Benchmark::HumanEval),
        EvalCommand::Mbpp(args) => (args, Benchmark::Mbpp),
        EvalCommand::Stories(a) => return stories(a, quiet).await,
        EvalCommand::Loss(a) => {
            let r = crate::eval::validation_loss(
                &a.checkpoint,
                &a.shards,
                a.seq_len,
                a.batches,
                a.rows,
            )?;
            if let Some(out) = &a.out {
                crate::eval::write_loss_report(out, &r)?;
            }
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(Outcome::Complete);
        }
    };
    // A bar per phase, made at its first report; the generating one closes when execution starts.
    let (generating, executing) = (OnceLock::new(), OnceLock::new());
    let progress = |p: CodeEvalProgress| match p {
        CodeEvalProgress::Generating { done, total } => generating
            .get_or_init(|| bar(quiet, total, "generating"))
            .set_position(done as u64),
        CodeEvalProgress::Executing { done, total } => executing
            .get_or_init(|| {
                if let Some(b) = generating.get() {
                    b.finish_and_clear();
                }
                bar(quiet, total, "executing")
            })
            .set_position(done as u64),
    };
    let summary = code::run(&args.settings(benchmark), &progress).await;
    for b in [&generating, &executing]
        .into_iter()
        .filter_map(OnceLock::get)
    {
        b.finish_and_clear();
    }
    let summary = summary?;
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
            summary.sandbox_isolation.unwrap_or_default()
        );
        println!("  results: {}", args.out.join("results.jsonl").display());
    }
    Ok(Outcome::Complete)
}

async fn stories(a: &StoriesArgs, quiet: bool) -> anyhow::Result<Outcome> {
    use crate::eval::stories::{self, StorySettings};
    if let Some(records) = &a.instruct {
        return instruct(a, records, quiet).await;
    }
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

/// `phigen eval stories --instruct DIR`.
async fn instruct(
    a: &StoriesArgs,
    records: &std::path::Path,
    quiet: bool,
) -> anyhow::Result<Outcome> {
    use crate::eval::instruct::{self, InstructEvalSettings};
    if a.teacher.dry_run {
        anyhow::bail!("--dry-run with --instruct: the judge's prompts depend on the model's stories, which a dry run does not write; run without --dry-run (the judge is asked only about features and summaries, one request per story)");
    }
    let (cfg, _) = a.teacher.resolve()?;
    let settings = InstructEvalSettings {
        checkpoint: a.checkpoint.clone(),
        records: records.to_path_buf(),
        rubric: a.rubric.clone(),
        out: a.out.clone(),
        max_new_tokens: a.max_new_tokens,
        gen_temperature: a.gen_temperature,
        gen_top_p: a.gen_top_p,
        seed: a.seed,
    };
    let live = super::Live::start(quiet);
    let result = instruct::run(&settings, &cfg, live.state.clone(), &|p| live.show(p)).await;
    live.finish();
    let r = result?;
    let outcome = match &r.judging {
        Some(stats) => super::finished(stats, &a.out, quiet),
        None => Outcome::Complete,
    };
    if !quiet {
        let s = &r.summary;
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
        let features: Vec<String> = s
            .features
            .iter()
            .map(|(f, v)| format!("{f} {} of {} ({})", pct(v.present), v.asked, v.by))
            .collect();
        println!(
            "instruct: {} completions; all words used {} of {}; features: {}; consistency with the summary {}\n  {}",
            s.completions,
            pct(s.all_words_used),
            s.words_asked,
            features.join(", "),
            s.consistency
                .as_ref()
                .map_or("-".to_string(), |c| format!("{:.2} ± {:.2} (n {})", c.mean, c.ci95, c.n)),
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

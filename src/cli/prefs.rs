//! `phigen prefs`: preference pairs for DPO, made by a student and a judge or imported.

use std::path::PathBuf;

use clap::Args;

use super::numbers::{self, f64_in, int_in};
use super::Outcome;
use crate::generate::engine::StopReason;
use crate::generate::prefs::{self, PrefsSettings, PrefsStats, StudentSampling};

#[derive(Debug, Clone, Args)]
pub struct PrefsArgs {
    /// Prompts: jsonl or Parquet with `prompt` (a string or messages) or `messages` (the turns before the first assistant turn), a directory of such files (e.g. chat data), or a text file with one prompt a line.
    #[arg(
        long,
        required_unless_present = "input",
        conflicts_with = "input",
        requires = "student"
    )]
    pub prompts: Option<PathBuf>,
    /// The student that samples the responses: a checkpoint directory or a .gguf file (run in-process with its chat template).
    #[arg(long, requires = "prompts")]
    pub student: Option<PathBuf>,
    /// Import existing `{prompt, chosen, rejected}` jsonl or Parquet files (or directories of them) instead: bad rows are dropped with their file, line and reason.
    #[arg(long, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Output directory: pairs.jsonl (what a DPO stage reads), prefs.json, work/ (samples, the judge's records, rejects).
    #[arg(long)]
    pub out: PathBuf,
    /// Responses sampled per prompt (at least 2); the judge scores them all, the best becomes `chosen` and the worst `rejected`.
    #[arg(long, default_value_t = 2, value_parser = int_in(2usize, 64))]
    pub samples: usize,
    /// Tokens the student writes per response.
    #[arg(long, default_value_t = 256, value_parser = int_in(1usize, 1 << 20))]
    pub max_new_tokens: usize,
    /// The student's sampling temperature, 0 (greedy: every response the same) to 10.
    #[arg(long, default_value_t = 1.0, value_parser = f64_in(numbers::TEMPERATURE))]
    pub gen_temperature: f64,
    /// The student's nucleus top-p, above 0 and at most 1 (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = f64_in(numbers::TOP_P))]
    pub gen_top_p: f64,
    /// Sequences the student generates at once (the responses do not depend on it).
    #[arg(long, default_value_t = 8, value_parser = int_in(1usize, 4096))]
    pub student_batch: usize,
    /// Seeds the student's samples and the order the judge sees them in.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Judging prompt [default: the built-in prompts/prefs-judge.txt].
    #[arg(long)]
    pub rubric: Option<PathBuf>,
    /// Judge requests per prompt before it is given up (each unparseable verdict costs one).
    #[arg(long, default_value_t = 3, value_parser = int_in(1u32, 100))]
    pub max_attempts: u32,
    #[command(flatten)]
    pub teacher: super::TeacherArgs,
}

pub async fn prefs(a: &PrefsArgs, quiet: bool) -> anyhow::Result<Outcome> {
    if !a.input.is_empty() {
        let stats = prefs::import(&a.input, &a.out)?;
        if !quiet {
            print(&stats);
        }
        return Ok(Outcome::Complete);
    }
    let (Some(prompts), Some(student)) = (&a.prompts, &a.student) else {
        anyhow::bail!("give --prompts FILE and --student CHECKPOINT to make pairs, or --input FILE… to import them");
    };
    if a.teacher.dry_run {
        anyhow::bail!("--dry-run with prefs: the judge's prompts hold the student's responses, which a dry run does not sample; run without --dry-run (one judge request per prompt)");
    }
    let (cfg, _) = a.teacher.resolve()?;
    let settings = PrefsSettings {
        prompts: prompts.clone(),
        student: student.clone(),
        out: a.out.clone(),
        sampling: StudentSampling {
            samples: a.samples,
            max_new_tokens: a.max_new_tokens,
            temperature: a.gen_temperature,
            top_p: a.gen_top_p,
            seed: a.seed,
            batch: a.student_batch,
        },
        rubric: a.rubric.clone(),
        max_attempts: a.max_attempts,
    };
    let live = super::Live::start(quiet);
    let state = live.state.clone();
    let result = prefs::run(&settings, &cfg, state.clone(), &|p| live.show(p)).await;
    live.finish();
    let stats = result?;
    if !quiet {
        print(&stats);
    }
    Ok(match state.stopped() {
        Some(StopReason::Interrupted) => Outcome::Interrupted,
        _ if stats.complete => Outcome::Complete,
        _ => Outcome::Incomplete,
    })
}

fn print(s: &PrefsStats) {
    let dropped: Vec<String> = s
        .dropped
        .iter()
        .map(|(r, n)| {
            format!(
                "{} {n}",
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            )
        })
        .collect();
    println!(
        "prefs ({}): {} pairs from {} {}{}{}\n  pairs: {}\n  rejects: {}",
        s.mode,
        s.pairs,
        s.inputs,
        if s.mode == "import" {
            "rows"
        } else {
            "prompts"
        },
        if dropped.is_empty() {
            String::new()
        } else {
            format!("; dropped: {}", dropped.join(", "))
        },
        if s.complete {
            ""
        } else {
            "; stopped before the end: run the same command again to go on"
        },
        s.pairs_path.display(),
        s.rejects_path.display()
    );
}

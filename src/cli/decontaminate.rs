//! `phigen decontaminate`.

use std::path::PathBuf;

use clap::Args;

use super::dedup::byte_bar;
use super::numbers::{self, f64_in, int_in};
use super::Outcome;
use crate::dedup::decontaminate::{self, DecontaminateOptions, Mode};

#[derive(Debug, Clone, Args)]
pub struct DecontaminateArgs {
    /// Corpus directories or files (Parquet, jsonl, .txt). Repeatable.
    #[arg(long, required = true)]
    pub input: Vec<PathBuf>,
    /// Output directory: the documents (without contaminated ones with --mode drop), contaminated.parquet, contamination.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Benchmark problems: HumanEval.jsonl(.gz) or MBPP jsonl. Repeatable; nothing is downloaded.
    #[arg(long = "bench", required = true)]
    pub benchmarks: Vec<PathBuf>,
    /// Tokens per n-gram (phi-1 used 13).
    #[arg(long, default_value_t = 13, value_parser = int_in(1usize, 1000))]
    pub ngram: usize,
    /// Tokens per n-gram of the renamed-identifier check (0 turns the check off).
    #[arg(long, default_value_t = 10, value_parser = int_in(0usize, 1000))]
    pub identifier_ngram: usize,
    /// Share of a solution's identifier-placeholder n-grams a document must contain to be a hit: above 0 (else every document is one), at most 1.
    #[arg(long, default_value_t = 0.8, value_parser = f64_in(numbers::above(0.0, 1.0)))]
    pub identifier_share: f64,
    /// drop: leave contaminated documents out; flag: keep them and only report.
    #[arg(long, value_enum, default_value = "drop")]
    pub mode: Mode,
    /// Read symlinks that lead out of the input directories (by default they are skipped and counted).
    #[arg(long)]
    pub follow_symlinks: bool,
    #[command(flatten)]
    pub array: super::ArrayArgs,
}

pub fn decontaminate(args: &DecontaminateArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let opts = DecontaminateOptions {
        inputs: args.input.clone(),
        out: args.out.clone(),
        benchmarks: args.benchmarks.clone(),
        ngram: args.ngram,
        identifier_ngram: (args.identifier_ngram > 0).then_some(args.identifier_ngram),
        identifier_share: args.identifier_share,
        mode: args.mode,
        follow_symlinks: args.follow_symlinks,
        task: args.array.task()?,
    };
    let bar = byte_bar(quiet);
    let report = decontaminate::run(&opts, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    for (name, b) in &report.benchmarks {
        tracing::info!(
            "{name}: {} of {} problems appear in the corpus",
            b.tasks_hit,
            b.tasks
        );
    }
    tracing::info!(
        "{} documents ({:.1} MB) in {:.1}s ({:.1} MB/s): {} contaminated ({}) → {}",
        report.documents,
        report.bytes as f64 / 1e6,
        report.seconds,
        report.bytes as f64 / 1e6 / report.seconds.max(1e-9),
        report.contaminated_documents,
        if report.mode == Mode::Drop {
            "dropped"
        } else {
            "kept, flagged"
        },
        args.out.display()
    );
    Ok(Outcome::Complete)
}

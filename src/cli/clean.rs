//! `phigen dedup` and `phigen decontaminate`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::numbers::{self, f64_in, int_in};
use super::Outcome;
use crate::dedup::decontaminate::{self, DecontaminateOptions, Mode};
use crate::dedup::minhash::{Normalize, Params, Shingles};
use crate::dedup::{self, DedupOptions, Slice};

#[derive(Debug, Clone, Args)]
pub struct DedupArgs {
    /// Corpus directories or files (Parquet, jsonl, .txt). Repeatable.
    #[arg(long, required = true)]
    pub input: Vec<PathBuf>,
    /// Output directory: the kept documents (same files, formats and columns), removed.parquet, stats.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Words per shingle.
    #[arg(long, default_value_t = 5, value_parser = int_in(1usize, 1000))]
    pub shingle: usize,
    /// Shingles of this many bytes (of the whitespace-collapsed text) instead of words: for code. At least 3: shorter byte strings are shared by almost any two texts, so nearly everything would look like a near duplicate.
    #[arg(long, conflicts_with = "shingle", value_parser = int_in(3usize, 10_000))]
    pub char_ngrams: Option<usize>,
    /// LSH bands; documents are candidates when all rows of one band agree.
    #[arg(long, default_value_t = 14, value_parser = int_in(1usize, 1024))]
    pub bands: usize,
    /// MinHash values per band (bands × rows permutations in all).
    #[arg(long, default_value_t = 8, value_parser = int_in(1usize, 1024))]
    pub rows: usize,
    /// Seed of the permutations.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Normalisation before the exact-duplicate hash: whitespace, case (comma-separated), or none.
    #[arg(long, default_value = "whitespace,case")]
    pub exact_normalize: String,
    /// Join candidates only when their exact shingle-set Jaccard reaches this, 0 to 1 (re-reads the inputs).
    #[arg(long, value_parser = f64_in(numbers::UNIT))]
    pub verify_jaccard: Option<f64>,
    /// An LSH index directory: documents duplicating its documents are removed too, and the kept ones are added to it.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Only compute the signatures of slice K of N (input files i with i mod N = K), e.g. a Slurm array task; run again without --shard to cluster and write.
    #[arg(long)]
    pub shard: Option<Slice>,
    /// Read symlinks that lead out of the input directories (by default they are skipped and counted).
    #[arg(long)]
    pub follow_symlinks: bool,
}

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
}

fn byte_bar(quiet: bool) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {binary_bytes} {binary_bytes_per_sec} {elapsed}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

pub fn dedup(args: &DedupArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let mut exact = Normalize::default();
    for part in args
        .exact_normalize
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && *p != "none")
    {
        match part {
            "whitespace" => exact.whitespace = true,
            "case" => exact.case = true,
            other => {
                anyhow::bail!("--exact-normalize: unknown `{other}`; use whitespace, case or none")
            }
        }
    }
    let opts = DedupOptions {
        inputs: args.input.clone(),
        out: args.out.clone(),
        params: Params {
            shingles: match args.char_ngrams {
                Some(n) => Shingles::Chars(n),
                None => Shingles::Words(args.shingle),
            },
            bands: args.bands,
            rows: args.rows,
            seed: args.seed,
        },
        exact,
        verify_jaccard: args.verify_jaccard,
        index: args.index.clone(),
        shard: args.shard,
        follow_symlinks: args.follow_symlinks,
    };
    let bar = byte_bar(quiet);
    let outcome = dedup::run(&opts, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    let stats = match outcome {
        dedup::Outcome::Slice { slice, documents } => {
            tracing::info!("signatures of slice {}/{}: {documents} documents; run without --shard to cluster once every slice is done", slice.k, slice.n);
            return Ok(Outcome::Complete);
        }
        dedup::Outcome::UpToDate(stats) => {
            tracing::info!(
                "up to date: {} already holds the result for these inputs and settings",
                args.out.display()
            );
            stats
        }
        dedup::Outcome::Done(stats) => stats,
    };
    tracing::info!(
        "{} documents ({:.1} MB): kept {}, removed {} exact + {} near duplicates in {} clusters ({} against the index); signatures {:.1}s ({:.1} MB/s), clusters {:.1}s, writing {:.1}s → {}",
        stats.documents,
        stats.bytes as f64 / 1e6,
        stats.kept,
        stats.removed_exact,
        stats.removed_near,
        stats.clusters,
        stats.removed_by_index,
        stats.signature_seconds,
        stats.bytes as f64 / 1e6 / stats.signature_seconds.max(1e-9),
        stats.cluster_seconds,
        stats.write_seconds,
        args.out.display()
    );
    Ok(Outcome::Complete)
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

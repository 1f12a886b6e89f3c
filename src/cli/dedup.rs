//! `phigen dedup`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::numbers::{self, f64_in, int_in};
use super::Outcome;
use crate::artifact::task::Task;
use crate::dedup::minhash::{Normalize, Params, Shingles};
use crate::dedup::{self, DedupOptions, Keep, Stage};

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
    /// Run one array stage (in this order: signatures, buckets, clusters, filter) as task K of N
    /// (--shard, or SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX with --shards); together the tasks
    /// write what one run writes. Without it: the whole run in this process.
    #[arg(long, value_enum)]
    pub stage: Option<Stage>,
    /// This task of the stage's array, K of N (0-based), e.g. 3/8. Without --stage: a signature
    /// task; a later run without --shard reuses the signatures, then clusters and writes.
    #[arg(long)]
    pub shard: Option<Task>,
    /// The size of the array when the task comes from the scheduler (SLURM_ARRAY_TASK_ID with
    /// SLURM_ARRAY_TASK_COUNT needs none; Kubernetes' JOB_COMPLETION_INDEX does).
    #[arg(long, requires = "stage", value_parser = int_in(1usize, crate::artifact::task::MAX_TASKS))]
    pub shards: Option<usize>,
    /// Read symlinks that lead out of the input directories (by default they are skipped and counted).
    #[arg(long)]
    pub follow_symlinks: bool,
    /// Which document of a duplicate cluster is kept: the first by (file, row), or the one with the
    /// least id (the same survivor whatever order a corpus was written in).
    #[arg(long, value_enum, default_value = "first")]
    pub keep: Keep,
}

/// A spinner over the bytes read, shared with `phigen decontaminate` (which reads corpora the same
/// way).
pub(super) fn byte_bar(quiet: bool) -> ProgressBar {
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
        stage: args.stage,
        // The scheduler's variables name the task only of an array stage: a whole run started
        // inside an array job is still a whole run.
        shard: match args.stage {
            Some(_) => Task::from_env(args.shard, args.shards)?,
            None => args.shard,
        },
        follow_symlinks: args.follow_symlinks,
        keep: args.keep,
    };
    let bar = byte_bar(quiet);
    let outcome = dedup::run(&opts, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    let stats = match outcome {
        dedup::Outcome::Task(t) => return Ok(report_task(&t, args)),
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

/// Logs what one task of an array stage did, and what runs next.
fn report_task(t: &dedup::TaskOutcome, args: &DedupArgs) -> Outcome {
    let did = if t.skipped {
        "already finished (its completion marker matches), skipped"
    } else {
        "done"
    };
    tracing::info!("dedup --stage {} task {}: {did}", t.stage, t.task);
    let next = match t.stage {
        Stage::Signatures => Some(Stage::Buckets),
        Stage::Buckets => Some(Stage::Clusters),
        Stage::Clusters => Some(Stage::Filter),
        Stage::Filter => None,
    };
    match (&t.merged, next) {
        (Some(stats), _) => tracing::info!(
            "every filter task has finished: {} documents, kept {}, removed {} exact + {} near duplicates → {}",
            stats.documents,
            stats.kept,
            stats.removed_exact,
            stats.removed_near,
            args.out.join(dedup::STATS_FILE).display()
        ),
        (None, Some(next)) => tracing::info!("once every task of this stage has finished, run --stage {next}"),
        (None, None) => tracing::info!("stats.json is written by the last filter task to finish"),
    }
    Outcome::Complete
}

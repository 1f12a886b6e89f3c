//! `phigen annotate`, `phigen classify train` and `phigen filter`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::numbers::{self, f32_in, f64_in, int_at_least, int_in};
use super::{run_corpus, Outcome, OutputArgs, TeacherArgs};
use crate::classify::annotate::{self, Annotate};
use crate::classify::embed::EmbedderSpec;
use crate::classify::forest::{Engine, ForestParams};
use crate::classify::{self, FilterOptions, InputOptions, TrainOptions};
use crate::dedup::Slice;
use crate::generate::prompt::Template;

#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// Code to rate or score: directories of source files, Parquet or jsonl(.gz) files with a `content` (or `text`) column, or a mix. Repeatable.
    #[arg(long, required = true)]
    pub input: Vec<PathBuf>,
    /// Extensions of loose source files to read (comma-separated, without dots).
    #[arg(long, default_value = "py", value_delimiter = ',')]
    pub ext: Vec<String>,
    /// Files larger than this many bytes are skipped (counted as oversized).
    #[arg(long, default_value_t = 1 << 20, value_parser = int_at_least(1u64))]
    pub max_bytes: u64,
    /// Read symlinks that lead out of the input directories (by default they are skipped and counted).
    #[arg(long)]
    pub follow_symlinks: bool,
}

impl InputArgs {
    fn options(&self) -> InputOptions {
        InputOptions {
            inputs: self.input.clone(),
            extensions: self.ext.clone(),
            max_bytes: self.max_bytes,
            follow_symlinks: self.follow_symlinks,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// Files the teacher rates (a deterministic sample; a larger N later extends it).
    #[arg(long, default_value_t = 1000, value_parser = int_in(1usize, 100_000_000))]
    pub sample: usize,
    /// Seed of the sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Characters of each file the teacher sees (its head).
    #[arg(long, default_value_t = 6000, value_parser = int_at_least(1usize))]
    pub max_chars: usize,
    /// Prompt template file [default: the built-in prompts/educational-value.txt].
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// Attempts per file before its rating is given up (unparseable answers are asked again).
    #[arg(long, default_value_t = 3, value_parser = int_in(1u32, 1000))]
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Args)]
pub struct AnnotateArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Output directory: part-*.parquet ratings (file_id, score 0-5, reason), rejects, sample.json, stats.json.
    #[arg(long, default_value = "data/labels")]
    pub out: PathBuf,
    #[command(flatten)]
    pub sample: SampleArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmbedderKind {
    /// Hashed token n-grams + code statistics: fast, no model (the offline default).
    Hashed,
    /// Mean-pooled last hidden states of a causal LM checkpoint (--checkpoint), as phi-1 did.
    Lm,
    /// A BERT-family sentence encoder (--bert-model), e.g. all-MiniLM-L6-v2.
    Bert,
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// How files become feature vectors.
    #[arg(long, value_enum, default_value = "hashed")]
    pub embedder: EmbedderKind,
    /// Hash buckets of the hashed embedder (n-gram features; 22 statistics are added).
    #[arg(long, default_value_t = 256, value_parser = int_in(1usize, 1 << 20))]
    pub buckets: usize,
    /// Checkpoint directory of the LM embedder (any model `phigen sample` loads).
    #[arg(long, required_if_eq("embedder", "lm"))]
    pub checkpoint: Option<PathBuf>,
    /// Sentence encoder of `--embedder bert`: a directory, or a model id in the Hugging Face cache.
    #[arg(long, default_value = "sentence-transformers/all-MiniLM-L6-v2")]
    pub bert_model: String,
    /// Tokens of each file the LM or encoder embeds (its head; at most what the encoder was trained for).
    #[arg(long, default_value_t = 512, value_parser = int_in(1usize, 1 << 20))]
    pub embed_tokens: usize,
    /// Files the LM or encoder embeds per forward pass.
    #[arg(long, default_value_t = 8, value_parser = int_in(1usize, 1 << 16))]
    pub embed_batch: usize,
    /// Where LM embeddings are cached by content hash.
    #[arg(long, default_value = "data/cache/embeddings")]
    pub embed_cache: PathBuf,
    /// Trees in the forest.
    #[arg(long, default_value_t = 100, value_parser = int_in(1usize, 100_000))]
    pub trees: usize,
    /// Deepest tree level [default: unlimited].
    #[arg(long, value_parser = int_in(1usize, 1000))]
    pub max_depth: Option<usize>,
    /// Features tried at each split [default 0: √features].
    #[arg(long, default_value_t = 0)]
    pub max_features: usize,
    /// Fewest files in a leaf.
    #[arg(long, default_value_t = 1, value_parser = int_at_least(1usize))]
    pub min_samples_leaf: usize,
    /// Do not reweight classes to equal total weight.
    #[arg(long)]
    pub no_balance: bool,
    /// hist: binned splits, fast (default); linfa: linfa-trees' exact CART on a per-tree feature subspace.
    #[arg(long, value_enum, default_value = "hist")]
    pub engine: Engine,
    /// Seed of the bootstrap samples and feature choices.
    #[arg(long, default_value_t = 0)]
    pub forest_seed: u64,
    /// Share of labeled files held out for metrics: at least 0, below 1 (something must be left to train on).
    #[arg(long, default_value_t = 0.2, value_parser = f64_in(numbers::below(0.0, 1.0)))]
    pub holdout: f64,
    /// Ratings (0-5) at or above this are positive.
    #[arg(long, default_value_t = 3.0, value_parser = f64_in(numbers::closed(0.0, 5.0)))]
    pub positive_at: f64,
    /// Score (0 to 1) at or above which a file is kept (stored in the model; the sweep in metrics.json helps choose).
    #[arg(long, default_value_t = 0.5, value_parser = f32_in(numbers::UNIT))]
    pub keep_at: f32,
}

impl ModelArgs {
    fn spec(&self) -> anyhow::Result<EmbedderSpec> {
        Ok(match self.embedder {
            EmbedderKind::Hashed => EmbedderSpec::Hashed {
                buckets: self.buckets.max(1),
            },
            EmbedderKind::Lm => EmbedderSpec::Lm {
                checkpoint: self
                    .checkpoint
                    .clone()
                    .context("--embedder lm needs --checkpoint DIR")?,
                max_tokens: self.embed_tokens,
                batch: self.embed_batch,
            },
            EmbedderKind::Bert => EmbedderSpec::Bert {
                model: self.bert_model.clone(),
                max_tokens: self.embed_tokens,
                batch: self.embed_batch,
            },
        })
    }

    fn train_options(
        &self,
        labels: PathBuf,
        input: InputOptions,
        out: PathBuf,
    ) -> anyhow::Result<TrainOptions> {
        if !(0.0..1.0).contains(&self.holdout) {
            bail!("--holdout {} must be at least 0 and below 1", self.holdout);
        }
        Ok(TrainOptions {
            labels,
            input,
            out,
            embedder: self.spec()?,
            cache: Some(self.embed_cache.clone()),
            forest: ForestParams {
                trees: self.trees.max(1),
                max_depth: self.max_depth,
                min_samples_leaf: self.min_samples_leaf.max(1),
                max_features: self.max_features,
                balanced: !self.no_balance,
                bootstrap: true,
                seed: self.forest_seed,
                engine: self.engine,
            },
            holdout: self.holdout,
            positive_at: self.positive_at,
            threshold: self.keep_at,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum ClassifyCommand {
    /// Train the educational-value classifier on labels (`phigen annotate` output or a path,label CSV / Parquet).
    Train(ClassifyTrainArgs),
    /// Write the feature vector of every readable input file to Parquet (`id`, `f0`, `f1`, …).
    Embed(ClassifyEmbedArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ClassifyEmbedArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// The Parquet file to write.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ClassifyTrainArgs {
    /// Ratings: a `phigen annotate` directory, or a CSV (`path,label`) or Parquet file; labels are 0-5 scores or high/low.
    #[arg(long)]
    pub labels: PathBuf,
    #[command(flatten)]
    pub input: InputArgs,
    /// The classifier file to write (metrics go to NAME.metrics.json beside it).
    #[arg(long, default_value = "models/edu.rf")]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// A classifier from `phigen classify train`. Without it, the whole recipe runs in --out: annotate a sample with the teacher, train, score.
    #[arg(long = "model")]
    pub classifier: Option<PathBuf>,
    /// Output directory: scored/ (every row with score, kept, skip), kept/ (kept rows, content as `text`), stats.json.
    #[arg(long, default_value = "data/filtered")]
    pub out: PathBuf,
    /// Keep files scoring at or above this, 0 to 1 [default: the classifier's].
    #[arg(long, value_parser = f32_in(numbers::UNIT))]
    pub threshold: Option<f32>,
    /// Only score parts K, K+N, … (0-based), e.g. a Slurm array task; stats.json covers every part finished so far.
    #[arg(long)]
    pub shard: Option<Slice>,
    /// Files embedded and scored at once.
    #[arg(long, default_value_t = 512, value_parser = int_in(1usize, 1 << 20))]
    pub batch: usize,
    #[command(flatten)]
    pub sample: SampleArgs,
    #[command(flatten)]
    pub model_args: ModelArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

fn template(path: Option<&Path>) -> anyhow::Result<Template> {
    Ok(Template::load_or_builtin(
        path,
        "educational-value.txt",
        annotate::BUILTIN_TEMPLATE,
    )?)
}

/// Draws (or re-draws and checks) the sample recorded in `out`: the corpus to rate and its size.
fn prepare(
    input: &InputOptions,
    s: &SampleArgs,
    out: &Path,
) -> anyhow::Result<(Arc<Annotate>, OutputArgs)> {
    if s.sample == 0 {
        bail!("--sample 0: nothing to rate");
    }
    let template = template(s.prompt.as_deref())?;
    let parts = input.parts()?;
    let sample = annotate::draw_sample(&parts, s.sample, s.seed, input.max_bytes, s.max_chars)?;
    if sample.is_empty() {
        bail!("no readable code files in {:?} to rate", input.inputs);
    }
    if sample.len() < s.sample {
        tracing::warn!("only {} readable files: rating all of them", sample.len());
    }
    annotate::record_sample(out, &input.inputs, s.seed, &sample)?;
    let output = OutputArgs {
        n: sample.len() as u64,
        seed: s.seed,
        max_attempts: s.max_attempts,
        shard_size: 1000,
    };
    Ok((Arc::new(Annotate::new(template, sample)), output))
}

const RATING_MAX_TOKENS: u32 = 256;

pub async fn annotate(args: &AnnotateArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let (corpus, output) = prepare(&args.input.options(), &args.sample, &args.out)?;
    run_corpus(
        corpus,
        &args.teacher,
        &output,
        args.out.clone(),
        RATING_MAX_TOKENS,
        quiet,
    )
    .await
}

pub fn classify(cmd: &ClassifyCommand) -> anyhow::Result<Outcome> {
    let args = match cmd {
        ClassifyCommand::Train(args) => args,
        ClassifyCommand::Embed(args) => {
            let started = std::time::Instant::now();
            let mut df = classify::embed_files(
                &args.input.options(),
                &args.model.spec()?,
                Some(&args.model.embed_cache),
            )?;
            crate::artifact::table::write_frame(&args.out, &mut df)?;
            println!(
                "{} files embedded ({} features) in {:.2}s: {}",
                df.height(),
                df.width() - 1,
                started.elapsed().as_secs_f64(),
                args.out.display()
            );
            return Ok(Outcome::Complete);
        }
    };
    let opts =
        args.model
            .train_options(args.labels.clone(), args.input.options(), args.out.clone())?;
    train(&opts)
}

fn train(opts: &TrainOptions) -> anyhow::Result<Outcome> {
    let r = classify::train(opts)?;
    println!(
        "classifier {}: {} labeled files found of {} ({} positive), {} trained on, {} held out; embed {:.1}s, fit {:.2}s",
        opts.out.display(),
        r.found,
        r.labels,
        r.positives,
        r.train,
        r.held_out,
        r.embed_seconds,
        r.fit_seconds
    );
    if let Some(m) = &r.metrics {
        println!(
            "  held out at threshold {}: precision {:.3}, recall {:.3}, F1 {:.3}, ROC-AUC {:.3}; best F1 {:.3} at {}",
            m.threshold, m.precision, m.recall, m.f1, m.roc_auc, m.best_f1, m.best_f1_threshold
        );
    }
    println!("  metrics: {}", r.metrics_path.display());
    Ok(Outcome::Complete)
}

pub async fn filter(args: &FilterArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let input = args.input.options();
    let model = match &args.classifier {
        Some(m) => m.clone(),
        None => {
            let (labels, model) = annotate::recipe_paths(&args.out);
            recipe_steps(args, &input, &labels, &model, quiet).await?;
            if args.teacher.dry_run {
                return Ok(Outcome::Complete);
            }
            model
        }
    };
    let slice = args.shard.unwrap_or(Slice { k: 0, n: 1 });
    let opts = FilterOptions {
        input,
        out: args.out.clone(),
        model,
        threshold: args.threshold,
        shard: (slice.k, slice.n),
        cache: Some(args.model_args.embed_cache.clone()),
        batch: args.batch,
    };
    let bar = super::progress_bar(
        quiet,
        None,
        "{spinner} scoring: {pos} files [{elapsed_precise}] {per_sec}",
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let stats = classify::filter(&opts, &|files| bar.inc(files))?;
    bar.finish_and_clear();
    if !quiet {
        let skipped: u64 = stats.skipped.values().sum();
        println!(
            "filter: {} of {} files kept ({:.1}%, {} GPT-2 tokens) at threshold {}; {} skipped {:?}; {}/{} parts done ({} by this run) in {:.1}s",
            stats.kept,
            stats.scored,
            100.0 * stats.kept_share,
            stats.tokens_kept,
            stats.threshold,
            skipped,
            stats.skipped,
            stats.parts_done,
            stats.parts,
            stats.parts_this_run,
            stats.wall_seconds
        );
        println!(
            "  kept: {}  stats: {}",
            args.out.join("kept").display(),
            args.out.join("stats.json").display()
        );
    }
    Ok(if stats.parts_done == stats.parts || args.shard.is_some() {
        Outcome::Complete
    } else {
        Outcome::Incomplete
    })
}

/// The recipe's first two steps in `OUT/labels` and `OUT/model.rf`, each skipped when done.
async fn recipe_steps(
    args: &FilterArgs,
    input: &InputOptions,
    labels: &Path,
    model: &Path,
    quiet: bool,
) -> anyhow::Result<()> {
    let t = &args.teacher;
    let rated = annotate::load_labels(labels).map(|l| l.len()).unwrap_or(0);
    if rated < args.sample.sample {
        let (corpus, output) = prepare(input, &args.sample, labels)?;
        println!(
            "filter recipe, step 1 of 3: rating a sample of {} files with {}{}",
            output.n,
            t.model,
            t.max_cost
                .map_or(String::new(), |m| format!(" (stopping before ${m:.2})")),
        );
        // The estimate first, as `--dry-run` prints it; then, unless that was asked for, the run.
        let preview = TeacherArgs {
            dry_run: true,
            ..t.clone()
        };
        let dir = labels.to_path_buf();
        run_corpus(
            corpus.clone(),
            &preview,
            &output,
            dir.clone(),
            RATING_MAX_TOKENS,
            quiet,
        )
        .await?;
        if t.dry_run {
            return Ok(());
        }
        let outcome = run_corpus(corpus, t, &output, dir, RATING_MAX_TOKENS, quiet).await?;
        match outcome {
            Outcome::Interrupted => {
                bail!("interrupted while rating: re-run the same command to continue")
            }
            Outcome::Incomplete => tracing::warn!(
                "not every sampled file got a rating; training on those that did (re-run to rate the rest)"
            ),
            Outcome::Complete => {}
        }
    } else if t.dry_run {
        println!("dry run: {rated} files are rated already; nothing would be sent");
        return Ok(());
    }
    let newest_label = newest_mtime(labels);
    let model_time = std::fs::metadata(model).and_then(|m| m.modified()).ok();
    if model_time.is_none() || model_time < newest_label {
        if !quiet {
            println!("filter recipe, step 2 of 3: training the classifier");
        }
        let opts = args.model_args.train_options(
            labels.to_path_buf(),
            input.clone(),
            model.to_path_buf(),
        )?;
        train(&opts)?;
    } else {
        tracing::info!(
            "classifier {} is newer than the labels: reused",
            model.display()
        );
    }
    if !quiet {
        println!("filter recipe, step 3 of 3: scoring every file");
    }
    Ok(())
}

/// The newest file of `dir`; its lock and file list (rewritten by every run) are not labels.
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            !e.file_name()
                .to_str()
                .is_some_and(crate::artifact::outdir::is_control_file)
        })
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
}

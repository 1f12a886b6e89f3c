//! `phigen annotate`, `phigen classify train` and `phigen filter`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Subcommand};

use super::numbers::{self, f32_in, f64_in, int_at_least, int_in, ints};
use super::{finished, print_dry_run, Live, Outcome, TeacherArgs};
use crate::artifact::task::Task;
use crate::classify::embed::EmbedderSpec;
use crate::classify::forest::{Engine, ForestParams};
use crate::classify::pipeline::{
    self, FilterDryRun, FilterRecipe, ModelSettings, PipelineProgress, SampleSettings,
};
use crate::classify::preset::Preset;
use crate::classify::{self, InputOptions, TrainReport};
use crate::generate::engine::RunState;

#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// Code to rate or score: directories of source files, Parquet or jsonl(.gz) files with a `content` (or `text`) column, or a mix; with --preset web, Parquet or jsonl(.gz) with a `text` column. Repeatable.
    #[arg(long, required = true)]
    pub input: Vec<PathBuf>,
    /// What the inputs are: code files (phi-1's filter) or web text (rated on FineWeb-Edu's additive 0-5 scale); picks the text column, the rating prompt and the hashed features, and is recorded in the classifier.
    #[arg(long, value_enum, default_value = "code")]
    pub preset: Preset,
    /// Extensions of loose files to read (comma-separated, without dots) [default: py for code, none for web text].
    #[arg(long, value_delimiter = ',')]
    pub ext: Option<Vec<String>>,
    /// Files larger than this many bytes are skipped (counted as oversized).
    #[arg(long, default_value_t = 1 << 20, value_parser = int_at_least(1u64))]
    pub max_bytes: u64,
    /// Read symlinks that lead out of the input directories (by default they are skipped and counted).
    #[arg(long)]
    pub follow_symlinks: bool,
}

impl InputArgs {
    pub(super) fn options(&self) -> InputOptions {
        InputOptions {
            inputs: self.input.clone(),
            preset: self.preset,
            extensions: self
                .ext
                .clone()
                .unwrap_or_else(|| self.preset.default_extensions()),
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
    /// Characters of each file read for the rating prompt (its head), before --max-file-tokens cuts it.
    #[arg(long, default_value_t = 6000, value_parser = int_at_least(1usize))]
    pub max_chars: usize,
    /// Tokens of each file the teacher sees, counted with a local teacher's own tokenizer (tiktoken's for an HTTP one); the ratings record what was cut [default: 512 with a local teacher, whose cost is prefill; 2048 with an HTTP one].
    #[arg(long, value_parser = ints(pipeline::FILE_TOKENS))]
    pub max_file_tokens: Option<usize>,
    /// Prompt template file [default: the built-in prompts/educational-value.txt; prompts/educational-value-web.txt with --preset web].
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// Attempts per file before its rating is given up (unparseable answers are asked again).
    #[arg(long, default_value_t = 3, value_parser = int_in(1u32, 1000))]
    pub max_attempts: u32,
}

impl SampleArgs {
    fn settings(&self) -> SampleSettings {
        SampleSettings {
            sample: self.sample,
            seed: self.seed,
            max_chars: self.max_chars,
            max_file_tokens: self.max_file_tokens,
            max_attempts: self.max_attempts,
            prompt: self.prompt.clone(),
        }
    }
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
    #[command(flatten)]
    pub array: super::ArrayArgs,
}

/// `--embedder`: how files become feature vectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedderKind {
    /// Hashed token n-grams + code (or prose) statistics: fast, no model (the offline default).
    Hashed,
    /// Mean-pooled last hidden states of a causal LM checkpoint, as phi-1 did: `lm:DIR`, or `lm`
    /// with --checkpoint DIR.
    Lm(Option<PathBuf>),
    /// A BERT-family sentence encoder (--bert-model), e.g. all-MiniLM-L6-v2.
    Bert,
}

/// `hashed`, `bert`, `lm:DIR` (or `lm` with --checkpoint).
fn embedder_kind(s: &str) -> Result<EmbedderKind, String> {
    match s {
        "hashed" => Ok(EmbedderKind::Hashed),
        "bert" => Ok(EmbedderKind::Bert),
        "lm" => Ok(EmbedderKind::Lm(None)),
        _ => match s.strip_prefix("lm:") {
            Some("") => Err("`lm:` names no directory; write lm:DIR, DIR a checkpoint directory (phigen's, or a Hugging Face safetensors one)".into()),
            Some(dir) => Ok(EmbedderKind::Lm(Some(PathBuf::from(dir)))),
            None => Err("expected `hashed`, `bert` or `lm:DIR` (DIR a checkpoint directory: phigen's, or a Hugging Face safetensors one)".into()),
        },
    }
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// How files become feature vectors: hashed (n-grams + statistics, no model), lm:DIR (mean-pooled last hidden states of a causal LM checkpoint, as phi-1 did) or bert (--bert-model).
    #[arg(long, default_value = "hashed", value_parser = embedder_kind)]
    pub embedder: EmbedderKind,
    /// Hash buckets of the hashed embedder (n-gram features; 22 statistics are added).
    #[arg(long, default_value_t = 256, value_parser = int_in(1usize, 1 << 20))]
    pub buckets: usize,
    /// Checkpoint directory of `--embedder lm` (any model `phigen sample` loads); `--embedder lm:DIR` says it in one flag.
    #[arg(long)]
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
        Ok(match &self.embedder {
            EmbedderKind::Hashed => EmbedderSpec::Hashed {
                buckets: self.buckets.max(1),
            },
            EmbedderKind::Lm(dir) => EmbedderSpec::Lm {
                checkpoint: match (dir, &self.checkpoint) {
                    (Some(a), Some(b)) if a != b => anyhow::bail!(
                        "--embedder lm:{} and --checkpoint {} name two checkpoints; give one (lm:DIR alone is enough)",
                        a.display(),
                        b.display()
                    ),
                    (Some(d), _) | (None, Some(d)) => d.clone(),
                    (None, None) => anyhow::bail!(
                        "--embedder lm names no checkpoint: write --embedder lm:DIR (or add --checkpoint DIR)"
                    ),
                },
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

    fn settings(&self) -> anyhow::Result<ModelSettings> {
        Ok(ModelSettings {
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
    pub shard: Option<Task>,
    /// Files embedded and scored at once.
    #[arg(long, default_value_t = 512, value_parser = int_in(1usize, 1 << 20))]
    pub batch: usize,
    /// Also count the GPT-2 tokens of the kept files (stats.json `tokens_kept`), as `phigen tokenize` encodes them; the BPE costs more than the scoring, so it is off unless asked for.
    #[arg(long)]
    pub count_tokens: bool,
    #[command(flatten)]
    pub sample: SampleArgs,
    #[command(flatten)]
    pub model_args: ModelArgs,
    #[command(flatten)]
    pub teacher: TeacherArgs,
}

pub async fn annotate(args: &AnnotateArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let (cfg, resolved) = args.teacher.resolve()?;
    let input = args.input.options();
    let sample = args.sample.settings();
    if args.teacher.dry_run {
        let plan = pipeline::annotate_dry_run(&input, &sample, &args.out, &cfg)?;
        print_dry_run(&plan, &resolved.model);
        return Ok(Outcome::Complete);
    }
    let task = args.array.task()?;
    if super::task_finished(task, &args.out, quiet) {
        return Ok(Outcome::Complete);
    }
    let live = Live::start(quiet);
    let result = pipeline::annotate(
        &input,
        &sample,
        &args.out,
        &cfg,
        task,
        live.state.clone(),
        &|p| live.show(p),
    )
    .await;
    live.finish();
    let stats = result?;
    let outcome = finished(&stats, &args.out, quiet);
    print_rater_note(&stats, quiet);
    Ok(outcome)
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
    let opts = args.model.settings()?.train_options(
        args.labels.clone(),
        args.input.options(),
        args.out.clone(),
    )?;
    let report = classify::train(&opts)?;
    print_train_report(&opts.out, &report);
    Ok(Outcome::Complete)
}

fn print_train_report(out: &Path, r: &TrainReport) {
    println!(
        "classifier {}: {} labeled files found of {} ({} positive), {} trained on, {} held out; embed {:.1}s, fit {:.2}s",
        out.display(),
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
}

/// What the ratings' `stats.json` says about a small rater (`corpus.rater_note`), after the summary.
fn print_rater_note(stats: &crate::generate::engine::Stats, quiet: bool) {
    if let Some(note) = stats.corpus.get("rater_note").and_then(|n| n.as_str()) {
        if !quiet {
            println!("note on the rater: {note}");
        }
    }
}

/// The recipe's first line, as the rating starts (or would, in a dry run).
fn print_rating(files: u64, model: &str, max_cost: Option<f64>) {
    println!(
        "filter recipe, step 1 of 3: rating a sample of {files} files with {model}{}",
        max_cost.map_or(String::new(), |m| format!(" (stopping before ${m:.2})")),
    );
}

pub async fn filter(args: &FilterArgs, quiet: bool) -> anyhow::Result<Outcome> {
    // Scoring with a trained classifier (`--model`) asks no teacher: no note on which one.
    let (cfg, resolved) = args.teacher.resolve_noting(args.classifier.is_none())?;
    let recipe = FilterRecipe {
        input: args.input.options(),
        sample: args.sample.settings(),
        model: args.model_args.settings()?,
        threshold: args.threshold,
        shard: args.shard.map(|s| (s.k, s.n)),
        batch: args.batch,
        count_tokens: args.count_tokens,
        out: args.out.clone(),
        classifier: args.classifier.clone(),
    };
    let in_recipe = args.classifier.is_none();
    if in_recipe && args.teacher.dry_run {
        match pipeline::dry_run(&recipe, &cfg)? {
            FilterDryRun::Rate {
                files,
                model,
                max_cost,
                plan,
            } => {
                print_rating(files, &model, max_cost);
                print_dry_run(&plan, &resolved.model);
            }
            FilterDryRun::AlreadyRated { files } => {
                println!("dry run: {files} files are rated already; nothing would be sent")
            }
        }
        return Ok(Outcome::Complete);
    }
    let state = Arc::new(RunState::default());
    // The rating's bar and Ctrl-C watcher live while the teacher is asked, as for `annotate`.
    let rating: Mutex<Option<Live>> = Mutex::new(None);
    let scoring = super::progress_bar(
        quiet,
        None,
        "{spinner} scoring: {pos} files [{elapsed_precise}] {per_sec}",
    );
    let show = |event: PipelineProgress| match event {
        PipelineProgress::Rating {
            files,
            model,
            max_cost,
            plan,
        } => {
            print_rating(files, model, max_cost);
            print_dry_run(plan, model);
            *rating.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Live::watch(state.clone(), quiet));
        }
        PipelineProgress::Generation(p) => {
            if let Some(live) = rating.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                live.show(p);
            }
        }
        PipelineProgress::Rated { stats, labels } => {
            if let Some(live) = rating.lock().unwrap_or_else(|e| e.into_inner()).take() {
                live.finish();
            }
            finished(stats, labels, quiet);
            print_rater_note(stats, quiet);
        }
        PipelineProgress::Training => {
            if !quiet {
                println!("filter recipe, step 2 of 3: training the classifier");
            }
        }
        PipelineProgress::Trained { classifier, report } => print_train_report(classifier, report),
        PipelineProgress::Scoring => {
            if in_recipe && !quiet {
                println!("filter recipe, step 3 of 3: scoring every file");
            }
            scoring.enable_steady_tick(Duration::from_millis(200));
        }
        PipelineProgress::Scored { files } => scoring.inc(files),
    };
    let result = pipeline::run(&recipe, &cfg, state.clone(), &show).await;
    if let Some(live) = rating.lock().unwrap_or_else(|e| e.into_inner()).take() {
        live.finish();
    }
    scoring.finish_and_clear();
    let stats = result?;
    if !quiet {
        let skipped: u64 = stats.skipped.values().sum();
        println!(
            "filter (--preset {}): {} of {} {}s kept ({:.1}%, {}) at threshold {}; {} skipped {:?}; {}/{} parts done ({} by this run) in {:.1}s",
            stats.preset,
            stats.kept,
            stats.scored,
            stats.preset.unit(),
            100.0 * stats.kept_share,
            stats.tokens_kept.map_or_else(
                || "tokens not counted: --count-tokens".to_string(),
                |t| format!("{t} GPT-2 tokens")
            ),
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// `--max-file-tokens` takes an integer in the library's range (`pipeline::FILE_TOKENS`);
    /// zero, a fraction, a float spelling and a word are refused naming the flag.
    #[test]
    fn the_file_budget_flag_refuses_zero_and_garbage() {
        let parse = |v: &str| {
            crate::cli::Cli::try_parse_from([
                "phigen",
                "filter",
                "--input",
                "src",
                &format!("--max-file-tokens={v}"),
            ])
        };
        assert!(parse("512").is_ok());
        for bad in ["0", "0.5", "1e3", "many", "-4", "NaN"] {
            let Err(e) = parse(bad) else {
                panic!("--max-file-tokens={bad} was accepted")
            };
            let e = e.to_string();
            assert!(
                e.contains("--max-file-tokens") && e.contains("[16, 1000000]"),
                "{bad}: {e}"
            );
        }
    }

    /// `--embedder lm:DIR` names the checkpoint in one flag (`lm` + `--checkpoint` still works);
    /// a bad value is refused naming the flag and the accepted forms; `--preset web` reads no
    /// loose files unless `--ext` is given.
    #[test]
    fn the_embedder_and_preset_flags() {
        use super::EmbedderKind;
        use crate::classify::embed::EmbedderSpec;
        use crate::classify::preset::Preset;
        use crate::cli::{Cli, Command};
        use std::path::{Path, PathBuf};
        let parse = |extra: &[&str]| {
            let mut args = vec!["phigen", "filter", "--input", "web"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|c| match c.command {
                Command::Filter(f) => *f,
                _ => unreachable!("a filter command"),
            })
        };
        let a = parse(&["--embedder", "lm:runs/tiny/final"]).unwrap();
        assert_eq!(
            a.model_args.embedder,
            EmbedderKind::Lm(Some(PathBuf::from("runs/tiny/final")))
        );
        let spec = a.model_args.spec().unwrap();
        assert!(
            matches!(&spec, EmbedderSpec::Lm { checkpoint, .. } if checkpoint == Path::new("runs/tiny/final")),
            "{spec:?}"
        );
        let old = parse(&["--embedder", "lm", "--checkpoint", "c"]).unwrap();
        assert!(
            matches!(old.model_args.spec().unwrap(), EmbedderSpec::Lm { checkpoint, .. } if checkpoint == Path::new("c"))
        );
        let e = parse(&["--embedder", "lm"])
            .unwrap()
            .model_args
            .spec()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--embedder lm") && e.contains("lm:DIR"), "{e}");
        for bad in ["gpt", "lm:"] {
            let Err(e) = parse(&["--embedder", bad]) else {
                panic!("--embedder {bad} was accepted")
            };
            let e = e.to_string();
            assert!(
                e.contains("--embedder") && e.contains("lm:DIR"),
                "{bad}: {e}"
            );
        }
        let web = parse(&["--preset", "web"]).unwrap();
        assert_eq!(web.input.preset, Preset::Web);
        assert!(web.input.options().extensions.is_empty());
        let code = parse(&[]).unwrap();
        assert_eq!(
            (code.input.preset, code.input.options().extensions),
            (Preset::Code, vec!["py".to_string()])
        );
        let txt = parse(&["--preset", "web", "--ext", "txt,md"]).unwrap();
        assert_eq!(txt.input.options().extensions, ["txt", "md"]);
    }
}

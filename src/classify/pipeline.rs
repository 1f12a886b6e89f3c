//! phi-1's filter as one library call ([`run`]): a teacher rates a deterministic sample of the
//! code files (`OUT/labels/`, an [`annotate`] corpus of the generation engine), a classifier is
//! trained on the ratings (`OUT/model.rf`), and every file is scored (`OUT/scored/`, `OUT/kept/`).
//! Each step is skipped when its output is done: ratings already in `OUT/labels` are not asked
//! again, and a classifier newer than every label file is reused. With a classifier given, only
//! the scoring runs. [`annotate`] is the rating step alone (`phigen annotate`).
//!
//! Nothing here prints: the caller follows the steps through [`PipelineProgress`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::annotate::{self, Annotate};
use super::embed::EmbedderSpec;
use super::forest::ForestParams;
use super::{ClassifyError, FilterOptions, FilterStats, InputOptions, TrainOptions, TrainReport};
use crate::artifact::task::Task;
use crate::generate::engine::{
    DryRun, GenerateError, GenerateOptions, RunState, Stats, StopReason,
};
use crate::generate::prompt::{Template, TemplateError};
use crate::generate::run::{dry_run_corpus, run_corpus_on, LoadedTeacher, Progress};
use crate::range::Ints;
use crate::teacher::factory::{Backend, TeacherConfig};
use crate::teacher::TeacherError;

/// Output tokens of one rating: a score and a sentence or two of reason.
pub const RATING_MAX_TOKENS: u32 = 256;

/// Shown with ratings by a local teacher under a billion parameters (`stats.json`:
/// `corpus.rater_note`), from the measurement in README.md ("How good is the embedded rater").
pub const SMALL_RATER_NOTE: &str = "a local rater under a billion parameters rarely answers in the rating format: SmolLM2-135M-Instruct gave a score for 1 of 40 CPython files in 79 answers (README.md, \"How good is the embedded rater\"), so its labels cannot train a useful classifier; rate with an API teacher (--teacher http and $OPENAI_API_KEY) or a larger --teacher local:SPEC";

/// `--max-file-tokens`: each file's share of the rating prompt.
pub const FILE_TOKENS: Ints<usize> = Ints {
    min: 16,
    max: 1_000_000,
};
/// The share with a local teacher. Its cost is prefill on the CPU, and a small model's context
/// may be short (its own limit is also applied). 512 tokens of each file plus the ~265 of the prompt are half the
/// ~1,500 that the 6,000-character head cost SmolLM2-135M: measured 12 s a rating on a loaded
/// 2-core VM (README, "How good is the embedded rater"), so 40 files take about 8 minutes.
pub const LOCAL_FILE_TOKENS: usize = 512;
/// The share with an HTTP teacher: about the 6,000 characters of code phigen showed before the
/// budget existed. An API model reads it in a second, and a demanding user pays for a fuller view.
pub const HTTP_FILE_TOKENS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("--sample 0: nothing to rate; pass the number of files the teacher should rate")]
    NothingToRate,
    #[error("no readable files or texts in {inputs:?} to rate: check --input, --ext and --preset")]
    NoReadableFiles { inputs: Vec<PathBuf> },
    #[error("--prompt {path}: --preset {preset} fills the rating prompt's {vars}, but this template asks for others; use `vars:` of those (the built-in prompts/{builtin} is an example), or pass the --preset the prompt was written for")]
    PromptVars {
        path: PathBuf,
        preset: super::preset::Preset,
        vars: &'static str,
        builtin: &'static str,
    },
    #[error(
        "--holdout {found}: must be at least 0 and below 1 (something must be left to train on)"
    )]
    Holdout { found: f64 },
    #[error("interrupted {step}: re-run the same command to continue")]
    Interrupted { step: &'static str },
    #[error("{flag} {found}: {expected}; pass a value in that range")]
    Setting {
        flag: &'static str,
        found: String,
        expected: String,
    },
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Teacher(#[from] TeacherError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Classify(#[from] ClassifyError),
}

impl PipelineError {
    /// Whether the teacher refused the credentials (the CLI exits 3 then).
    pub fn is_auth(&self) -> bool {
        match self {
            PipelineError::Generate(e) => e.is_auth(),
            PipelineError::Teacher(e) => matches!(e, TeacherError::Auth { .. }),
            _ => false,
        }
    }
}

/// Which files the teacher rates and how (`phigen annotate`'s and `phigen filter`'s sample flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleSettings {
    /// Files rated: a deterministic sample; a larger one later extends it.
    pub sample: usize,
    pub seed: u64,
    /// Characters of each file read for the prompt (its head), before the token budget.
    pub max_chars: usize,
    /// Tokens of each file the teacher sees [default: `LOCAL_FILE_TOKENS` for a local teacher,
    /// `HTTP_FILE_TOKENS` for an HTTP one].
    pub max_file_tokens: Option<usize>,
    /// Attempts per file before its rating is given up.
    pub max_attempts: u32,
    /// Prompt template [default: the built-in prompts/educational-value.txt].
    pub prompt: Option<PathBuf>,
}

impl Default for SampleSettings {
    fn default() -> Self {
        SampleSettings {
            sample: 1000,
            seed: 0,
            max_chars: 6000,
            max_file_tokens: None,
            max_attempts: 3,
            prompt: None,
        }
    }
}

/// How the classifier is trained: everything of [`TrainOptions`] but its files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    pub embedder: EmbedderSpec,
    /// Where embeddings are cached by content hash (for the embedders worth caching).
    pub cache: Option<PathBuf>,
    pub forest: ForestParams,
    /// Share of labeled files held out for metrics, in `[0, 1)`.
    pub holdout: f64,
    /// Ratings at or above this are positive.
    pub positive_at: f64,
    /// Score at or above which a file is kept (stored in the classifier).
    pub threshold: f32,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            embedder: EmbedderSpec::Hashed { buckets: 256 },
            cache: Some(PathBuf::from("data/cache/embeddings")),
            forest: ForestParams::default(),
            holdout: 0.2,
            positive_at: 3.0,
            threshold: 0.5,
        }
    }
}

impl ModelSettings {
    /// Training on the ratings in `labels` of the files in `input`, writing the classifier `out`.
    pub fn train_options(
        &self,
        labels: PathBuf,
        input: InputOptions,
        out: PathBuf,
    ) -> Result<TrainOptions, PipelineError> {
        if !(0.0..1.0).contains(&self.holdout) {
            return Err(PipelineError::Holdout {
                found: self.holdout,
            });
        }
        Ok(TrainOptions {
            labels,
            input,
            out,
            embedder: self.embedder.clone(),
            cache: self.cache.clone(),
            forest: self.forest.clone(),
            holdout: self.holdout,
            positive_at: self.positive_at,
            threshold: self.threshold,
        })
    }
}

/// `phigen filter`: the files, the recipe's steps and the scoring.
#[derive(Debug, Clone)]
pub struct FilterRecipe {
    pub input: InputOptions,
    pub sample: SampleSettings,
    pub model: ModelSettings,
    /// Overrides the classifier's keep threshold.
    pub threshold: Option<f32>,
    /// (K, N): score only parts K, K+N, … [default: all].
    pub shard: Option<(usize, usize)>,
    /// Files embedded and scored at once.
    pub batch: usize,
    /// Count the GPT-2 tokens of the kept files ([`FilterOptions::count_tokens`]).
    pub count_tokens: bool,
    pub out: PathBuf,
    /// A trained classifier: only the scoring runs. `None`: the whole recipe, in `out`.
    pub classifier: Option<PathBuf>,
}

/// Where a filter run is, for the caller to show.
#[derive(Debug)]
pub enum PipelineProgress<'a> {
    /// Step 1 of 3 starts: `files` sampled files go to the teacher `model` (the name the loaded
    /// teacher gives itself); `plan` is what that will send and cost.
    Rating {
        files: u64,
        model: &'a str,
        max_cost: Option<f64>,
        plan: &'a DryRun,
    },
    /// The rating run's progress.
    Generation(&'a Progress),
    /// The rating run ended (written to `labels`).
    Rated { stats: &'a Stats, labels: &'a Path },
    /// Step 2 of 3 starts.
    Training,
    /// The classifier was trained and written to `classifier`.
    Trained {
        classifier: &'a Path,
        report: &'a TrainReport,
    },
    /// Scoring starts (step 3 of 3 in the recipe).
    Scoring,
    /// `files` more files were scored.
    Scored { files: u64 },
}

/// What `phigen filter --dry-run` reports: what rating the sample would send, or that the sample
/// is rated already.
#[derive(Debug, Clone)]
pub enum FilterDryRun {
    Rate {
        files: u64,
        model: String,
        max_cost: Option<f64>,
        plan: DryRun,
    },
    AlreadyRated {
        files: usize,
    },
}

/// The sample drawn (or re-drawn and checked) and recorded in `out`, before its heads are cut to
/// the teacher's token budget.
struct Prepared {
    template: Template,
    preset: super::preset::Preset,
    sample: Vec<annotate::Sampled>,
    opts: GenerateOptions,
}

/// Draws (or re-draws and checks) the sample recorded in `out` and the generation options rating
/// it.
fn prepare(
    input: &InputOptions,
    s: &SampleSettings,
    out: &Path,
    teacher: &TeacherConfig,
    task: Option<Task>,
) -> Result<Prepared, PipelineError> {
    if s.sample == 0 {
        return Err(PipelineError::NothingToRate);
    }
    if let Some(t) = s.max_file_tokens {
        FILE_TOKENS
            .check(t)
            .map_err(|expected| PipelineError::Setting {
                flag: "--max-file-tokens",
                found: t.to_string(),
                expected,
            })?;
    }
    let (builtin, builtin_text) = input.preset.builtin_prompt();
    let template = Template::load_or_builtin(s.prompt.as_deref(), builtin, builtin_text)?;
    if let (Some(path), false) = (&s.prompt, input.preset.fills(&template)) {
        return Err(PipelineError::PromptVars {
            path: path.clone(),
            preset: input.preset,
            vars: input.preset.prompt_var_names(),
            builtin,
        });
    }
    let parts = input.parts()?;
    let sample = annotate::draw_sample(
        &parts,
        input.preset,
        s.sample,
        s.seed,
        input.max_bytes,
        s.max_chars,
    )?;
    if sample.is_empty() {
        return Err(PipelineError::NoReadableFiles {
            inputs: input.inputs.clone(),
        });
    }
    if sample.len() < s.sample {
        tracing::warn!("only {} readable files: rating all of them", sample.len());
    }
    // Every task draws the same sample (a function of the seed) and rates its slots i mod N = K;
    // each records the sample in its own directory, so tasks starting together do not race.
    let recorded = task.map_or(out.to_path_buf(), |t| t.dir(out));
    annotate::record_sample(&recorded, &input.inputs, s.seed, &sample)?;
    let opts = GenerateOptions {
        out: out.to_path_buf(),
        n: sample.len() as u64,
        seed: s.seed,
        max_attempts: s.max_attempts,
        shard_size: 1000,
        concurrency: teacher.concurrency,
        task,
    };
    Ok(Prepared {
        template,
        preset: input.preset,
        sample,
        opts,
    })
}

/// tiktoken's encoding of `model` (cl100k_base for names it does not know) and how to say so.
fn tiktoken_for(model: &str) -> (&'static tiktoken_rs::CoreBPE, String) {
    let name = model.rsplit('/').next().unwrap_or(model);
    match tiktoken_rs::bpe_for_model(name) {
        Ok(bpe) => (bpe, format!("tiktoken's encoding of {model}")),
        Err(_) => (
            tiktoken_rs::cl100k_base_singleton(),
            format!("tiktoken cl100k_base (an estimate: {model} is not a model tiktoken knows)"),
        ),
    }
}

impl Prepared {
    /// The corpus with each head cut to `s`'s token budget, counted with `teacher`'s own
    /// tokenizer where phigen has it (a loaded local model) and tiktoken's otherwise (an HTTP
    /// teacher, or a dry run, which loads no model). A local model's budget also leaves room in
    /// its context for the prompt around the file and the answer.
    fn corpus(
        mut self,
        s: &SampleSettings,
        model: &str,
        local: bool,
        teacher: Option<&LoadedTeacher>,
    ) -> (Annotate, GenerateOptions) {
        let (bpe, tiktoken_label) = tiktoken_for(model);
        let tiktoken = |t: &str| bpe.encode_ordinary(t).len();
        let own = |t: &str| {
            teacher
                .and_then(|l| l.count_tokens(t))
                .unwrap_or_else(|| tiktoken(t))
        };
        let (count, counted_with): (&(dyn Fn(&str) -> usize + Sync), String) =
            match teacher.filter(|l| l.is_local()) {
                Some(_) => (&own, format!("the tokenizer of {model}")),
                None if local => (
                    &tiktoken,
                    format!("{tiktoken_label}; the run counts with the model's own tokenizer"),
                ),
                None => (&tiktoken, tiktoken_label),
            };
        let mut tokens = s.max_file_tokens.unwrap_or(if local {
            LOCAL_FILE_TOKENS
        } else {
            HTTP_FILE_TOKENS
        });
        if let Some(context) = teacher.and_then(LoadedTeacher::context) {
            let vars = self
                .preset
                .prompt_vars("a/longish/path/to/the/file.py", String::new());
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let around = self.template.render(&vars).map_or(0, |p| count(&p)) + 64; // the chat template's tokens and the cut note
            let room = context.saturating_sub(around + RATING_MAX_TOKENS as usize);
            if tokens > room {
                tracing::warn!(
                    "--max-file-tokens {tokens} would not fit the {context}-token context of {model} with the prompt and the answer: {room} tokens of each file are used"
                );
                tokens = room.max(1);
            }
        }
        let budget = annotate::FileBudget {
            tokens,
            count,
            counted_with,
        };
        annotate::fit_sample(&mut self.sample, &budget);
        let corpus = Annotate::fitted(self.template, self.sample, &budget).with_preset(self.preset);
        (corpus, self.opts)
    }
}

/// The corpus of a dry run: heads cut with tiktoken (no model is loaded).
fn dry_corpus(
    prepared: Prepared,
    s: &SampleSettings,
    teacher: &TeacherConfig,
) -> Result<(Arc<Annotate>, GenerateOptions, String), PipelineError> {
    let resolved = teacher.resolve()?;
    let local = matches!(resolved.backend, Backend::Local { .. });
    let (corpus, opts) = prepared.corpus(s, &resolved.model, local, None);
    Ok((Arc::new(corpus), opts, resolved.model))
}

/// Loads the teacher (a local model's tokenizer measures the heads) and cuts the heads.
async fn loaded_corpus(
    prepared: Prepared,
    s: &SampleSettings,
    teacher: &TeacherConfig,
) -> Result<(Arc<Annotate>, GenerateOptions, LoadedTeacher), PipelineError> {
    let loaded = LoadedTeacher::load(teacher, s.seed).await?;
    let (mut corpus, opts) = prepared.corpus(s, loaded.model(), loaded.is_local(), Some(&loaded));
    if loaded.is_small_local() {
        corpus = corpus.with_rater_note(SMALL_RATER_NOTE);
    }
    Ok((Arc::new(corpus), opts, loaded))
}

/// `phigen annotate`: the teacher rates the sample of `input` into `out`; as `task` of an array,
/// its share of the sample into `out/tasks/K`, then its marker (`phigen merge` combines them).
pub async fn annotate(
    input: &InputOptions,
    sample: &SampleSettings,
    out: &Path,
    teacher: &TeacherConfig,
    task: Option<Task>,
    state: Arc<RunState>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Stats, PipelineError> {
    let prepared = prepare(input, sample, out, teacher, task)?;
    let (corpus, opts, loaded) = loaded_corpus(prepared, sample, teacher).await?;
    Ok(run_corpus_on(
        corpus,
        &loaded,
        teacher,
        &opts,
        RATING_MAX_TOKENS,
        state,
        progress,
    )
    .await?)
}

/// What [`annotate`] would send. The sample is drawn and recorded in `out` (`sample.json`), as a
/// run would.
pub fn annotate_dry_run(
    input: &InputOptions,
    sample: &SampleSettings,
    out: &Path,
    teacher: &TeacherConfig,
) -> Result<DryRun, PipelineError> {
    let prepared = prepare(input, sample, out, teacher, None)?;
    let (corpus, opts, _) = dry_corpus(prepared, sample, teacher)?;
    Ok(dry_run_corpus(corpus, teacher, &opts, RATING_MAX_TOKENS)?)
}

/// The filter's parts when it runs on a cluster (`phigen train --only FILTER --filter-stage`):
/// one job makes the classifier, then an array of tasks scores the files with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// One job: the teacher rates the sample and the classifier is trained on the ratings.
    Classifier,
    /// Task K of N scores the parts it owns (i mod N = K) with that classifier.
    Score,
}

/// Runs the filter: the recipe's steps that are not done (none with a classifier given), then the
/// scoring. `state` stops the rating (Ctrl-C), and an interrupted rating stops the run.
pub async fn run(
    recipe: &FilterRecipe,
    teacher: &TeacherConfig,
    state: Arc<RunState>,
    progress: &(dyn Fn(PipelineProgress) + Send + Sync),
) -> Result<FilterStats, PipelineError> {
    let model = match &recipe.classifier {
        Some(m) => m.clone(),
        None => classifier(recipe, teacher, state, progress).await?,
    };
    progress(PipelineProgress::Scoring);
    let opts = FilterOptions {
        input: recipe.input.clone(),
        out: recipe.out.clone(),
        model,
        threshold: recipe.threshold,
        shard: recipe.shard.unwrap_or((0, 1)),
        cache: recipe.model.cache.clone(),
        batch: recipe.batch,
        count_tokens: recipe.count_tokens,
    };
    Ok(super::filter(&opts, &|files| {
        progress(PipelineProgress::Scored { files })
    })?)
}

/// The recipe's first two steps, those not done: the teacher rates the sample into `OUT/labels`
/// and the classifier `OUT/model.rf` is trained on the ratings; returns the classifier's path.
pub async fn classifier(
    recipe: &FilterRecipe,
    teacher: &TeacherConfig,
    state: Arc<RunState>,
    progress: &(dyn Fn(PipelineProgress) + Send + Sync),
) -> Result<PathBuf, PipelineError> {
    let (labels, model) = annotate::recipe_paths(&recipe.out);
    rate(recipe, teacher, &labels, state.clone(), progress).await?;
    if state.stopped() == Some(StopReason::Interrupted) {
        return Err(PipelineError::Interrupted {
            step: "before training",
        });
    }
    train(recipe, &labels, &model, progress)?;
    Ok(model)
}

/// What [`run`] would send to the teacher (the classifier and the scores cost nothing). Like a
/// run, it draws and records the sample when the labels are not complete.
pub fn dry_run(
    recipe: &FilterRecipe,
    teacher: &TeacherConfig,
) -> Result<FilterDryRun, PipelineError> {
    let (labels, _) = annotate::recipe_paths(&recipe.out);
    let rated = rated(&labels);
    if rated >= recipe.sample.sample {
        return Ok(FilterDryRun::AlreadyRated { files: rated });
    }
    let prepared = prepare(&recipe.input, &recipe.sample, &labels, teacher, None)?;
    let (corpus, opts, model) = dry_corpus(prepared, &recipe.sample, teacher)?;
    let plan = dry_run_corpus(corpus, teacher, &opts, RATING_MAX_TOKENS)?;
    Ok(FilterDryRun::Rate {
        files: opts.n,
        model,
        max_cost: teacher.max_cost,
        plan,
    })
}

/// Files rated in `labels` so far (0 when there are none yet).
fn rated(labels: &Path) -> usize {
    annotate::load_labels(labels).map(|l| l.len()).unwrap_or(0)
}

/// Step 1: rates the sample into `labels` unless every sampled file is rated.
async fn rate(
    recipe: &FilterRecipe,
    teacher: &TeacherConfig,
    labels: &Path,
    state: Arc<RunState>,
    progress: &(dyn Fn(PipelineProgress) + Send + Sync),
) -> Result<(), PipelineError> {
    if rated(labels) >= recipe.sample.sample {
        return Ok(());
    }
    let prepared = prepare(&recipe.input, &recipe.sample, labels, teacher, None)?;
    let (corpus, opts, loaded) = loaded_corpus(prepared, &recipe.sample, teacher).await?;
    let plan = dry_run_corpus(corpus.clone(), teacher, &opts, RATING_MAX_TOKENS)?;
    // Named as the loaded teacher names itself: what really rates (a local teacher's file).
    progress(PipelineProgress::Rating {
        files: opts.n,
        model: loaded.model(),
        max_cost: teacher.max_cost,
        plan: &plan,
    });
    let stats = run_corpus_on(
        corpus,
        &loaded,
        teacher,
        &opts,
        RATING_MAX_TOKENS,
        state,
        &|p| progress(PipelineProgress::Generation(p)),
    )
    .await?;
    progress(PipelineProgress::Rated {
        stats: &stats,
        labels,
    });
    match stats.stopped {
        Some(StopReason::Interrupted) => Err(PipelineError::Interrupted {
            step: "while rating",
        }),
        _ if !stats.complete => {
            tracing::warn!("not every sampled file got a rating; training on those that did (re-run to rate the rest)");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Step 2: trains the classifier `model` unless it is newer than every label file.
fn train(
    recipe: &FilterRecipe,
    labels: &Path,
    model: &Path,
    progress: &(dyn Fn(PipelineProgress) + Send + Sync),
) -> Result<(), PipelineError> {
    let newest_label = newest_mtime(labels);
    let model_time = std::fs::metadata(model).and_then(|m| m.modified()).ok();
    if model_time.is_some() && model_time >= newest_label {
        tracing::info!(
            "classifier {} is newer than the labels: reused",
            model.display()
        );
        return Ok(());
    }
    progress(PipelineProgress::Training);
    let opts = recipe.model.train_options(
        labels.to_path_buf(),
        recipe.input.clone(),
        model.to_path_buf(),
    )?;
    let report = super::train(&opts)?;
    progress(PipelineProgress::Trained {
        classifier: model,
        report: &report,
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A recipe's `max_file_tokens` (which skips the CLI's parser) is checked like the flag: 0 is
    /// refused naming the flag and the range (`FILE_TOKENS`), before any file is read.
    #[test]
    fn a_budget_out_of_range_is_refused_naming_the_flag() {
        let input = InputOptions {
            inputs: vec![PathBuf::from("does/not/matter")],
            preset: super::super::preset::Preset::Code,
            extensions: vec!["py".into()],
            max_bytes: 1 << 20,
            follow_symlinks: false,
        };
        let dir = tempfile::tempdir().unwrap();
        for bad in [0, 15, 1_000_001] {
            let s = SampleSettings {
                max_file_tokens: Some(bad),
                ..SampleSettings::default()
            };
            let e = prepare(&input, &s, dir.path(), &TeacherConfig::default(), None)
                .err()
                .expect("refused")
                .to_string();
            assert!(
                e.starts_with(&format!("--max-file-tokens {bad}:")) && e.contains("[16, 1000000]"),
                "{e}"
            );
        }
    }

    /// A code prompt given to a web run is refused before any text is read, naming the flag,
    /// the file, the variables the web preset fills and what to do.
    #[test]
    fn a_prompt_of_the_other_preset_is_refused() {
        use super::super::preset::{Preset, CODE_PROMPT};
        let dir = tempfile::tempdir().unwrap();
        let prompt = dir.path().join("code-prompt.txt");
        std::fs::write(&prompt, CODE_PROMPT).unwrap();
        let input = InputOptions {
            inputs: vec![PathBuf::from("does/not/matter")],
            preset: Preset::Web,
            extensions: vec![],
            max_bytes: 1 << 20,
            follow_symlinks: false,
        };
        let s = SampleSettings {
            prompt: Some(prompt),
            ..SampleSettings::default()
        };
        let e = prepare(&input, &s, dir.path(), &TeacherConfig::default(), None)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("--prompt")
                && e.contains("code-prompt.txt")
                && e.contains("--preset web")
                && e.contains("{text}")
                && e.contains("educational-value-web.txt"),
            "{e}"
        );
    }
}

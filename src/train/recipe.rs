//! Recipes: a TOML file naming the model, its initialisation, the data mixture and every
//! optimisation setting, in one or more stages (pretrain, then finetune from its last checkpoint).
//!
//! Parse, then resolve: the raw TOML (`deny_unknown_fields`, so a typo is an error) becomes a
//! validated [`Recipe`] once; `--set key=value` edits the TOML before that, so overrides are
//! checked exactly like the file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::tokenizer::TokenizerSpec;
use crate::model::{PhiConfig, Preset};

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{path}: `{key}` {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("--set {0}: expected KEY=VALUE with a dotted key, e.g. stage.0.lr=3e-4 or model.preset=tiny-phi")]
    BadSet(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeToml {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    pub model: ModelToml,
    #[serde(rename = "stage")]
    pub stages: Vec<StageToml>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelToml {
    /// A preset (`phi-1-small`, `tiny-phi`, …) …
    #[serde(default)]
    pub preset: Option<Preset>,
    /// … or a `config.json` path (or its directory).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Tokenizer of the shards and of the saved checkpoints: a tiktoken encoding's name, a
    /// Hugging Face tokenizer.json, or a checkpoint directory holding one.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
    /// Context length override (`max_position_embeddings`).
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// Vocabulary override (e.g. the tokenizer's exact size for a small model).
    #[serde(default)]
    pub vocab_size: Option<usize>,
}

fn default_tokenizer() -> String {
    "gpt2".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Linear,
    Cosine,
    Constant,
}

/// What a stage trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveName {
    /// Next-token prediction on `phigen tokenize` shards.
    #[default]
    Pretrain,
    /// Chat SFT: conversations (`messages`), the loss on the assistant's tokens only.
    Sft,
    /// DPO on `{prompt, chosen, rejected}` pairs against the stage's initial weights.
    Dpo,
}

impl ObjectiveName {
    pub fn is_pretrain(&self) -> bool {
        *self == ObjectiveName::Pretrain
    }
}

/// DPO's β when the stage does not give one (TRL's default).
pub const DEFAULT_BETA: f64 = 0.1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataToml {
    /// A `phigen tokenize` output directory (pretrain), or a jsonl / Parquet file or a directory
    /// of them (sft: `messages`; dpo: `prompt`, `chosen`, `rejected`); relative to the working
    /// directory, as every path here.
    pub path: PathBuf,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageToml {
    pub name: String,
    /// `random`, `previous` (the last checkpoint of the stage before), `checkpoint:DIR`, or
    /// `tile:DIR` (a smaller checkpoint's weights tiled to this model's shapes).
    #[serde(default = "random")]
    pub init: String,
    /// `pretrain` (the default), `sft` or `dpo`.
    #[serde(default, skip_serializing_if = "ObjectiveName::is_pretrain")]
    pub objective: ObjectiveName,
    /// DPO's β: how far from the reference model the policy may move (default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// sft / dpo: the chat template, `phi-3`, `chatml` or a `.jinja` file; by default the init
    /// checkpoint's (`chat_template.jinja` or `tokenizer_config.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    pub data: Vec<DataToml>,
    pub seq_len: usize,
    /// Sequences per forward pass, or `"auto"`: the largest that fits the device's memory by
    /// the estimate (see [`super::memory`]); then `batch` names the sequences per optimizer step
    /// and the trainer sets `grad_accum = batch / micro_batch`.
    pub micro_batch: MicroBatch,
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    /// Sequences per optimizer step (the global batch): required with `micro_batch = "auto"`;
    /// with a number, optional and then equal to micro_batch × grad_accum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// Activation recompute: `"none"`, or `"blocks"` (the forward pass keeps only each block's
    /// input; the backward pass runs the block again). Same gradients, less memory, about a
    /// third more compute.
    #[serde(default, skip_serializing_if = "Recompute::is_off")]
    pub checkpoint: Recompute,
    /// Optimizer steps; or give `tokens` and the steps follow from the batch.
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub tokens: Option<u64>,
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup: usize,
    #[serde(default = "linear")]
    pub decay: Decay,
    #[serde(default = "beta1")]
    pub beta1: f64,
    #[serde(default = "beta2")]
    pub beta2: f64,
    #[serde(default = "eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    #[serde(default = "clip")]
    pub grad_clip: f64,
    /// Embedding, residual and attention dropout.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "eval_every")]
    pub eval_every: usize,
    #[serde(default = "eval_batches")]
    pub eval_batches: usize,
    #[serde(default = "checkpoint_every")]
    pub checkpoint_every: usize,
    /// Checkpoints kept besides the best-validation one.
    #[serde(default = "keep_last")]
    pub keep_last: usize,
}

fn random() -> String {
    "random".into()
}
fn one_usize() -> usize {
    1
}
fn linear() -> Decay {
    Decay::Linear
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.95
}
fn eps() -> f64 {
    1e-8
}
fn clip() -> f64 {
    1.0
}
fn eval_every() -> usize {
    100
}
fn eval_batches() -> usize {
    8
}
fn checkpoint_every() -> usize {
    500
}
fn keep_last() -> usize {
    2
}

/// `micro_batch`: a number of sequences, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MicroBatch {
    Rows(usize),
    Auto,
}

impl Serialize for MicroBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MicroBatch::Rows(n) => s.serialize_u64(*n as u64),
            MicroBatch::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for MicroBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MicroBatch;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of sequences or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<MicroBatch, E> {
                usize::try_from(n)
                    .map(MicroBatch::Rows)
                    .map_err(|_| E::custom(format!("{n} sequences do not fit in memory")))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<MicroBatch, E> {
                u64::try_from(n)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
                    .and_then(|n| self.visit_u64(n))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MicroBatch, E> {
                match v {
                    "auto" => Ok(MicroBatch::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `checkpoint`: which activations the backward pass recomputes instead of keeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Recompute {
    /// Keep every activation (the fastest; the most memory).
    #[default]
    #[serde(rename = "none")]
    Off,
    /// Keep each block's input only; run the block again in the backward pass.
    #[serde(rename = "blocks")]
    Blocks,
}

impl Recompute {
    pub fn is_off(&self) -> bool {
        *self == Recompute::Off
    }
}

/// Where a stage's weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    Random,
    Previous,
    Checkpoint(PathBuf),
    Tile(PathBuf),
}

/// A chat template a stage names (see [`super::sft::builtin_template`]).
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateChoice {
    /// The init checkpoint's own.
    Checkpoint,
    /// `phi-3` or `chatml`.
    Builtin(super::sft::Builtin),
    /// A Jinja file.
    File(PathBuf),
}

/// What a stage trains, resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    Pretrain,
    Sft { template: TemplateChoice },
    Dpo { template: TemplateChoice, beta: f64 },
}

impl Objective {
    /// Sequences in one item of a batch: DPO's items are pairs (chosen and rejected).
    pub fn rows_per_item(&self) -> usize {
        match self {
            Objective::Dpo { .. } => 2,
            _ => 1,
        }
    }
}

/// A validated stage: paths resolved against the recipe's directory, steps known.
#[derive(Debug, Clone)]
pub struct Stage {
    pub raw: StageToml,
    pub init: Init,
    pub objective: Objective,
    pub data: Vec<(PathBuf, f64)>,
    pub steps: usize,
    /// Sequences per forward pass. `micro_batch = "auto"` resolves to 1 here (every batch
    /// divides by it); the trainer and the plan raise it with [`Stage::with_micro_batch`] to what
    /// fits the device.
    pub micro_batch: usize,
    /// Forward passes per optimizer step.
    pub grad_accum: usize,
}

impl Stage {
    pub fn tokens_per_step(&self) -> usize {
        self.raw.seq_len * self.sequences_per_step() * self.objective.rows_per_item()
    }

    /// The global batch (DPO: pairs), which no choice of micro_batch changes.
    pub fn sequences_per_step(&self) -> usize {
        self.micro_batch * self.grad_accum
    }

    pub fn is_auto(&self) -> bool {
        self.raw.micro_batch == MicroBatch::Auto
    }

    pub fn recompute(&self) -> Recompute {
        self.raw.checkpoint
    }

    /// This stage run `micro_batch` sequences at a time, with the accumulation that keeps its
    /// global batch. `micro_batch` must divide the global batch.
    pub fn with_micro_batch(&self, micro_batch: usize) -> Stage {
        let sequences = self.sequences_per_step();
        assert!(
            micro_batch > 0 && sequences.is_multiple_of(micro_batch),
            "micro_batch {micro_batch} must divide the {sequences} sequences of a step"
        );
        Stage {
            micro_batch,
            grad_accum: sequences / micro_batch,
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Recipe {
    pub raw: RecipeToml,
    pub path: PathBuf,
    pub model: PhiConfig,
    /// `model.tokenizer`, resolved (a file's hash taken).
    pub tokenizer: TokenizerSpec,
    pub stages: Vec<Stage>,
}

/// Longest context a recipe may give a model (`max_position_embeddings`): 16M positions.
const MAX_CONTEXT: usize = 1 << 24;
/// Largest vocabulary: 16M tokens (the largest in use have about 256k).
const MAX_VOCAB: usize = 1 << 24;
/// Largest `micro_batch`, `grad_accum` and `eval_batches`: 1M each.
const MAX_BATCH: usize = 1 << 20;

/// Why `name` cannot name a directory: it must be one plain path component (letters, digits,
/// `.`, `_`, `-`, not starting with `.`), so that what is written under it stays inside the run
/// directory.
pub(crate) fn plain_name(name: &str) -> Result<(), String> {
    let why = if name.is_empty() {
        "it is empty"
    } else if name.starts_with('.') {
        "it starts with `.`"
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        "use only letters, digits, `.`, `_` and `-`"
    } else {
        return Ok(());
    };
    Err(format!("is not a plain name ({why})"))
}

/// `value` must be finite and satisfy `ok`, which `expected` describes for the error.
fn check_float(value: f64, ok: impl Fn(f64) -> bool, expected: &str) -> Result<(), String> {
    if value.is_finite() && ok(value) {
        Ok(())
    } else {
        Err(format!("must be a finite number {expected}, found {value}"))
    }
}

/// `value` must be a count in `[min, max]`.
fn check_count(value: usize, min: usize, max: usize) -> Result<(), String> {
    if value < min {
        Err(format!("must be at least {min}, found {value}"))
    } else if value > max {
        Err(format!("must be at most {max}, found {value}"))
    } else {
        Ok(())
    }
}

/// Sets `key` (dotted, numeric parts index arrays; `stage` is the list of stages) to `value`
/// (read as a TOML value, else as a string) in `doc`.
pub(crate) fn apply_set(doc: &mut toml::Table, assignment: &str) -> Result<(), RecipeError> {
    let bad = || RecipeError::BadSet(assignment.to_string());
    let (key, value) = assignment.split_once('=').ok_or_else(bad)?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (first, rest) = parts.split_first().ok_or_else(bad)?;
    if rest.is_empty() {
        doc.insert(first.to_string(), value);
        return Ok(());
    }
    let mut node = doc.get_mut(*first).ok_or_else(bad)?;
    for (i, part) in rest.iter().enumerate() {
        let last = i + 1 == rest.len();
        node = match node {
            toml::Value::Array(items) => items
                .get_mut(part.parse::<usize>().map_err(|_| bad())?)
                .ok_or_else(bad)?,
            toml::Value::Table(t) => {
                // A key the file left at its default may be set.
                if last && !t.contains_key(*part) {
                    t.insert(part.to_string(), toml::Value::Boolean(false));
                }
                t.get_mut(*part).ok_or_else(bad)?
            }
            _ => return Err(bad()),
        };
    }
    *node = value;
    Ok(())
}

impl Recipe {
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, sets)
    }

    pub fn parse(text: &str, path: &Path, sets: &[String]) -> Result<Self, RecipeError> {
        let toml_err = |e: toml::de::Error| RecipeError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut doc: toml::Table = toml::from_str(text).map_err(toml_err)?;
        for s in sets {
            apply_set(&mut doc, s)?;
        }
        Self::from_table(doc, path)
    }

    /// A recipe from its TOML table (after `--set`).
    pub fn from_table(doc: toml::Table, path: &Path) -> Result<Self, RecipeError> {
        let raw: RecipeToml = toml::Table::try_into(doc).map_err(|e| RecipeError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::resolve(raw, path)
    }

    fn resolve(raw: RecipeToml, path: &Path) -> Result<Self, RecipeError> {
        let invalid = |key: &str, message: String| invalid_key(path, key, message);
        if let Err(why) = plain_name(&raw.name) {
            return Err(invalid(
                "name",
                format!(
                    "`{}` {why}: it names the default run directory runs/NAME; use e.g. `phi-1`",
                    raw.name
                ),
            ));
        }
        let (model, tokenizer) = resolve_model(&raw.model, path)?;
        if raw.stages.is_empty() {
            return Err(invalid(
                "stage",
                "a recipe needs at least one [[stage]]".into(),
            ));
        }
        let stages = raw
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| resolve_stage(i, s, &model, path))
            .collect::<Result<Vec<_>, _>>()?;
        let names: std::collections::HashSet<&str> =
            raw.stages.iter().map(|s| s.name.as_str()).collect();
        if names.len() != raw.stages.len() {
            return Err(invalid("stage.name", "stage names must be unique".into()));
        }
        Ok(Recipe {
            path: path.to_path_buf(),
            model,
            tokenizer,
            stages,
            raw,
        })
    }

    /// The effective recipe (after `--set`), as TOML, for the run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.raw).unwrap_or_default()
    }
}

fn invalid_key(path: &Path, key: &str, message: String) -> RecipeError {
    RecipeError::Invalid {
        path: path.to_path_buf(),
        key: key.into(),
        message,
    }
}

/// The model of `[model]`: a preset or a checkpoint's `config.json`, with the recipe's overrides,
/// checked against the size limits and the tokenizer; and the tokenizer.
fn resolve_model(raw: &ModelToml, path: &Path) -> Result<(PhiConfig, TokenizerSpec), RecipeError> {
    let invalid = |key: &str, message: String| invalid_key(path, key, message);
    let mut model = match (&raw.preset, &raw.config) {
        (Some(p), None) => PhiConfig::preset(*p),
        (None, Some(c)) => {
            let dir = if c.is_file() {
                c.parent().unwrap_or(Path::new(".")).to_path_buf()
            } else {
                c.clone()
            };
            crate::model::checkpoint::read_config(&dir)
                .map_err(|e| invalid("model.config", e.to_string()))?
        }
        _ => {
            return Err(invalid(
                "model",
                "give exactly one of `preset` or `config`".into(),
            ))
        }
    };
    if let Some(n) = raw.max_position_embeddings {
        model.max_position_embeddings = n;
    }
    if let Some(v) = raw.vocab_size {
        model.vocab_size = v;
    }
    // The model's sizes decide its tensors' shapes; beyond these no weights fit in memory.
    for (k, v, max) in [
        (
            "model.max_position_embeddings",
            model.max_position_embeddings,
            MAX_CONTEXT,
        ),
        ("model.vocab_size", model.vocab_size, MAX_VOCAB),
    ] {
        check_count(v, 1, max).map_err(|m| invalid(k, m))?;
    }
    let tokenizer = TokenizerSpec::parse(&raw.tokenizer)
        .map_err(|e| invalid("model.tokenizer", e.to_string()))?;
    let vocab = tokenizer
        .vocab_size()
        .map_err(|e| invalid("model.tokenizer", e.to_string()))?;
    if model.vocab_size < vocab {
        return Err(invalid(
            "model.vocab_size",
            format!(
                "{} is smaller than the `{tokenizer}` tokenizer's {vocab} tokens",
                model.vocab_size
            ),
        ));
    }
    Ok((model, tokenizer))
}

/// Stage `i` of the recipe, every value checked (`stage.I.KEY` names a bad one).
fn resolve_stage(
    i: usize,
    s: &StageToml,
    model: &PhiConfig,
    path: &Path,
) -> Result<Stage, RecipeError> {
    let invalid = |key: &str, message: String| invalid_key(path, key, message);
    let key = |k: &str| format!("stage.{i}.{k}");
    if let Err(why) = plain_name(&s.name) {
        return Err(invalid(
            &key("name"),
            format!(
                "`{}` {why}: it names the stage's checkpoint directory inside the run directory; use e.g. `pretrain`",
                s.name
            ),
        ));
    }
    let init = match s.init.split_once(':') {
        None if s.init == "random" => Init::Random,
        None if s.init == "previous" && i > 0 => Init::Previous,
        Some(("checkpoint", dir)) => Init::Checkpoint(dir.into()),
        Some(("tile", dir)) => Init::Tile(dir.into()),
        _ => {
            return Err(invalid(
                &key("init"),
                format!("`{}`: expected random, previous (not in the first stage), checkpoint:DIR or tile:DIR", s.init),
            ))
        }
    };
    if s.data.is_empty() {
        return Err(invalid(
            &key("data"),
            "needs at least one { path, weight > 0 }".into(),
        ));
    }
    for (j, d) in s.data.iter().enumerate() {
        let k = key(&format!("data.{j}.weight"));
        check_float(d.weight, |w| w > 0.0, "> 0").map_err(|m| invalid(&k, m))?;
        if !s.objective.is_pretrain() && d.weight != 1.0 {
            return Err(invalid(
                &k,
                format!("is {}, but a {:?} stage reads every example of its files once per epoch; remove the weight (repeat a file to weigh it up)", d.weight, s.objective),
            ));
        }
    }
    let objective = resolve_objective(s).map_err(|(k, m)| invalid(&key(k), m))?;
    if s.seq_len > model.max_position_embeddings {
        return Err(invalid(
            &key("seq_len"),
            format!(
                "{} exceeds the model's context of {}",
                s.seq_len, model.max_position_embeddings
            ),
        ));
    }
    for (k, v, min, max) in [
        ("seq_len", s.seq_len, 1, MAX_CONTEXT),
        ("grad_accum", s.grad_accum, 1, MAX_BATCH),
        ("batch", s.batch.unwrap_or(1), 1, MAX_BATCH),
        ("eval_batches", s.eval_batches, 0, MAX_BATCH),
        ("eval_every", s.eval_every, 1, usize::MAX),
        ("checkpoint_every", s.checkpoint_every, 1, usize::MAX),
        ("keep_last", s.keep_last, 1, usize::MAX),
    ] {
        check_count(v, min, max).map_err(|m| invalid(&key(k), m))?;
    }
    let (micro_batch, grad_accum) = stage_batch(i, s, path)?;
    let steps = stage_steps(i, s, micro_batch * grad_accum, path)?;
    if s.warmup >= steps && s.warmup > 0 {
        return Err(invalid(
            &key("warmup"),
            format!("{} must be < steps ({steps})", s.warmup),
        ));
    }
    check_float(s.lr, |v| v > 0.0, "> 0").map_err(|m| invalid(&key("lr"), m))?;
    check_float(
        s.min_lr,
        |v| (0.0..=s.lr).contains(&v),
        &format!("in [0, lr = {}]", s.lr),
    )
    .map_err(|m| invalid(&key("min_lr"), m))?;
    for (k, v) in [("beta1", s.beta1), ("beta2", s.beta2)] {
        check_float(v, |b| (0.0..1.0).contains(&b), "in [0, 1)")
            .map_err(|m| invalid(&key(k), m))?;
    }
    check_float(s.eps, |v| v > 0.0, "> 0").map_err(|m| invalid(&key("eps"), m))?;
    for (k, v) in [("weight_decay", s.weight_decay), ("grad_clip", s.grad_clip)] {
        check_float(v, |x| x >= 0.0, ">= 0").map_err(|m| invalid(&key(k), m))?;
    }
    check_float(s.dropout, |v| (0.0..1.0).contains(&v), "in [0, 1)")
        .map_err(|m| invalid(&key("dropout"), m))?;
    let data = s.data.iter().map(|d| (d.path.clone(), d.weight)).collect();
    Ok(Stage {
        raw: s.clone(),
        init,
        objective,
        data,
        steps,
        micro_batch,
        grad_accum,
    })
}

/// The stage's objective with its settings, or the key at fault and why.
fn resolve_objective(s: &StageToml) -> Result<Objective, (&'static str, String)> {
    let template = match s.chat_template.as_deref() {
        None => TemplateChoice::Checkpoint,
        Some(name) if name.ends_with(".jinja") => TemplateChoice::File(name.into()),
        Some(name) => {
            TemplateChoice::Builtin(super::sft::Builtin::parse(name).ok_or_else(|| {
                (
                    "chat_template",
                    format!("`{name}`: expected `phi-3`, `chatml` or a .jinja file"),
                )
            })?)
        }
    };
    let beta = s.beta.unwrap_or(DEFAULT_BETA);
    check_float(beta, |b| b > 0.0, "> 0").map_err(|m| ("beta", m))?;
    match s.objective {
        ObjectiveName::Dpo => Ok(Objective::Dpo { template, beta }),
        _ if s.beta.is_some() => Err((
            "beta",
            "is DPO's; set objective = \"dpo\" or remove beta".into(),
        )),
        ObjectiveName::Sft => Ok(Objective::Sft { template }),
        ObjectiveName::Pretrain if s.chat_template.is_some() => Err((
            "chat_template",
            "renders conversations for objective = \"sft\" or \"dpo\"; a pretrain stage reads token shards: remove it".into(),
        )),
        ObjectiveName::Pretrain => Ok(Objective::Pretrain),
    }
}

/// Stage `i`'s (micro_batch, grad_accum): as written, or for `micro_batch = "auto"` 1 × `batch`
/// until the trainer knows the device (see [`Stage::with_micro_batch`]).
fn stage_batch(i: usize, s: &StageToml, path: &Path) -> Result<(usize, usize), RecipeError> {
    let invalid = |k: &str, message: String| invalid_key(path, &format!("stage.{i}.{k}"), message);
    match (s.micro_batch, s.batch) {
        (MicroBatch::Rows(n), batch) => {
            check_count(n, 1, MAX_BATCH).map_err(|m| invalid("micro_batch", m))?;
            match batch {
                Some(b) if Some(b) != n.checked_mul(s.grad_accum) => Err(invalid(
                    "batch",
                    format!(
                        "is {b} sequences per step, but micro_batch {n} × grad_accum {} = {}; set grad_accum = batch / micro_batch, or micro_batch = \"auto\" to have it chosen",
                        s.grad_accum,
                        n.saturating_mul(s.grad_accum)
                    ),
                )),
                _ => Ok((n, s.grad_accum)),
            }
        }
        (MicroBatch::Auto, None) => Err(invalid(
            "batch",
            "is missing: micro_batch = \"auto\" needs the sequences per optimizer step to keep, e.g. batch = 1024 (phi-1)".into(),
        )),
        (MicroBatch::Auto, Some(_)) if s.grad_accum != 1 => Err(invalid(
            "grad_accum",
            format!(
                "is {}, but with micro_batch = \"auto\" the trainer sets grad_accum = batch / micro_batch; remove grad_accum",
                s.grad_accum
            ),
        )),
        (MicroBatch::Auto, Some(b)) => Ok((1, b)),
    }
}

/// Stage `i`'s optimizer steps: `steps`, or `tokens` over the tokens per step, rounded up.
fn stage_steps(
    i: usize,
    s: &StageToml,
    sequences: usize,
    path: &Path,
) -> Result<usize, RecipeError> {
    let invalid = |key: &str, message: String| invalid_key(path, key, message);
    let key = |k: &str| format!("stage.{i}.{k}");
    // Checked: a wrapped product could be 0 tokens per step (a division by zero below).
    let per_step = s.seq_len.checked_mul(sequences).ok_or_else(|| {
        invalid(
            &key("micro_batch"),
            format!(
                "seq_len {} × {sequences} sequences per step do not fit in memory",
                s.seq_len
            ),
        )
    })?;
    let steps = match (s.steps, s.tokens) {
        (Some(n), None) => n,
        (None, Some(0)) => {
            return Err(invalid(
                &key("tokens"),
                "must be at least 1, found 0".into(),
            ))
        }
        (None, Some(t)) => usize::try_from(t.div_ceil(per_step as u64)).unwrap_or(usize::MAX),
        _ => {
            return Err(invalid(
                &key("steps"),
                "give exactly one of `steps` or `tokens`".into(),
            ))
        }
    };
    if steps == 0 {
        return Err(invalid(&key("steps"), "must be at least 1, found 0".into()));
    }
    // Tokens seen are counted in a u64 (metrics, checkpoints): the whole stage must fit.
    if (steps as u64).checked_mul(per_step as u64).is_none() {
        return Err(invalid(
            &key("steps"),
            format!("{steps} steps of {per_step} tokens are more tokens than can be counted (2^64); lower steps or the batch"),
        ));
    }
    Ok(steps)
}

/// The learning rate at optimizer step `step` (0-based): linear warmup from 0 to `lr` over `warmup`
/// steps, then linear or cosine decay to `min_lr` at the last step (or constant).
pub fn learning_rate(stage: &Stage, step: usize) -> f64 {
    let s = &stage.raw;
    if step < s.warmup {
        return s.lr * (step + 1) as f64 / s.warmup as f64;
    }
    let span = (stage.steps - s.warmup).max(1) as f64;
    let progress = ((step - s.warmup) as f64 / span).min(1.0);
    match s.decay {
        Decay::Constant => s.lr,
        Decay::Linear => s.lr - (s.lr - s.min_lr) * progress,
        Decay::Cosine => {
            s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = r#"
name = "t"
[model]
preset = "tiny-phi"
vocab_size = 50304
[[stage]]
name = "pretrain"
data = [{ path = "tok" }]
seq_len = 32
micro_batch = 4
grad_accum = 2
steps = 110
lr = 1e-3
min_lr = 1e-4
warmup = 10
decay = "cosine"
"#;

    fn parse(sets: &[&str]) -> Result<Recipe, RecipeError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Recipe::parse(RECIPE, Path::new("recipes/t.toml"), &sets)
    }

    /// Schedule values worked by hand: warmup step 0 → lr/10; step 9 → lr; cosine midpoint (step
    /// 60 of 10 + 100) → (lr + min_lr) / 2; linear at the midpoint the same; last step → near min_lr.
    #[test]
    fn schedule_at_known_steps() {
        let r = parse(&[]).unwrap();
        let s = &r.stages[0];
        assert!((learning_rate(s, 0) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(s, 9) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(s, 60) - 5.5e-4).abs() < 1e-12);
        assert!((learning_rate(s, 110) - 1e-4).abs() < 1e-12);
        let r = parse(&["stage.0.decay=\"linear\""]).unwrap();
        assert!((learning_rate(&r.stages[0], 60) - 5.5e-4).abs() < 1e-12);
        assert!((learning_rate(&r.stages[0], 35) - (1e-3 - 9e-4 * 0.25)).abs() < 1e-12);
        let r = parse(&["stage.0.decay=constant"]).unwrap();
        assert_eq!(learning_rate(&r.stages[0], 100), 1e-3);
    }

    #[test]
    fn sets_and_typos() {
        let r = parse(&[
            "stage.0.steps=7",
            "model.preset=tiny-phi3",
            "stage.0.warmup=0",
            "seed=3",
        ])
        .unwrap();
        assert_eq!((r.stages[0].steps, r.raw.seed), (7, 3));
        assert_eq!(r.model.model_type, crate::model::ModelType::Phi3);
        assert_eq!(r.stages[0].data[0].0, PathBuf::from("tok"));
        let r = parse(&["stage.0.tokens=1000", "stage.0.steps=nothing"]);
        assert!(r.is_err());
        let err = Recipe::parse(
            &RECIPE.replace("micro_batch", "micro_bach"),
            Path::new("r.toml"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("r.toml") && err.contains("micro_bach"),
            "{err}"
        );
        let err = parse(&["stage.0.warmup=200"]).unwrap_err().to_string();
        assert!(
            err.contains("stage.0.warmup") && err.contains("110"),
            "{err}"
        );
        let err = parse(&["stage.0.init=previous"]).unwrap_err().to_string();
        assert!(err.contains("not in the first stage"), "{err}");
        let err = parse(&["model.vocab_size=100"]).unwrap_err().to_string();
        assert!(err.contains("50257"), "{err}");
        assert!(parse(&["nonsense"])
            .unwrap_err()
            .to_string()
            .contains("KEY=VALUE"));
    }

    /// `model.preset` is read as a [`Preset`]: an unknown name is refused naming the file, the
    /// key and every known name (`Preset::name`'s spellings), and the effective recipe written
    /// back spells the preset as it was given.
    #[test]
    fn presets_parse_by_name_and_unknown_ones_list_the_choices() {
        let r = parse(&["model.preset=tiny-phi3"]).unwrap();
        assert_eq!(r.raw.model.preset, Some(Preset::TinyPhi3));
        assert!(
            r.to_toml().contains(r#"preset = "tiny-phi3""#),
            "{}",
            r.to_toml()
        );
        let err = parse(&["model.preset=phi-9"]).unwrap_err().to_string();
        for part in [
            "recipes/t.toml",
            "model.preset",
            "`phi-9`",
            "phi-1-small",
            "tiny-llama",
        ] {
            assert!(err.contains(part), "{part}: {err}");
        }
    }

    /// Issue 23: values a recipe (or `--set`) can carry that would train NaN, divide by zero,
    /// overflow or allocate without bound are refused, naming the file, the key and the value.
    /// Each row is one attack; the expected text is the range `resolve` documents for the key.
    #[test]
    fn out_of_range_numbers_name_the_file_key_and_value() {
        for (set, key, expected) in [
            (
                "stage.0.lr=inf",
                "stage.0.lr",
                "must be a finite number > 0, found inf",
            ),
            ("stage.0.lr=nan", "stage.0.lr", "found NaN"),
            ("stage.0.lr=-1e-3", "stage.0.lr", "found -0.001"),
            ("stage.0.lr=0", "stage.0.lr", "found 0"),
            (
                "stage.0.min_lr=nan",
                "stage.0.min_lr",
                "in [0, lr = 0.001], found NaN",
            ),
            ("stage.0.min_lr=-1e-4", "stage.0.min_lr", "found -0.0001"),
            ("stage.0.min_lr=1", "stage.0.min_lr", "found 1"),
            ("stage.0.eps=inf", "stage.0.eps", "found inf"),
            ("stage.0.eps=0", "stage.0.eps", "found 0"),
            (
                "stage.0.weight_decay=nan",
                "stage.0.weight_decay",
                "found NaN",
            ),
            (
                "stage.0.weight_decay=-0.1",
                "stage.0.weight_decay",
                ">= 0, found -0.1",
            ),
            ("stage.0.grad_clip=-inf", "stage.0.grad_clip", "found -inf"),
            ("stage.0.grad_clip=inf", "stage.0.grad_clip", "found inf"),
            ("stage.0.beta1=nan", "stage.0.beta1", "in [0, 1), found NaN"),
            ("stage.0.beta2=1", "stage.0.beta2", "found 1"),
            ("stage.0.dropout=nan", "stage.0.dropout", "found NaN"),
            ("stage.0.dropout=1", "stage.0.dropout", "found 1"),
            (
                "stage.0.data.0.weight=inf",
                "stage.0.data.0.weight",
                "found inf",
            ),
            (
                "stage.0.data.0.weight=0",
                "stage.0.data.0.weight",
                "> 0, found 0",
            ),
            (
                "stage.0.micro_batch=0",
                "stage.0.micro_batch",
                "at least 1, found 0",
            ),
            (
                "stage.0.micro_batch=4611686018427387904",
                "stage.0.micro_batch",
                "at most 1048576, found 4611686018427387904",
            ),
            (
                "stage.0.grad_accum=9223372036854775807",
                "stage.0.grad_accum",
                "at most 1048576",
            ),
            ("stage.0.seq_len=0", "stage.0.seq_len", "found 0"),
            ("stage.0.eval_every=0", "stage.0.eval_every", "found 0"),
            (
                "stage.0.checkpoint_every=0",
                "stage.0.checkpoint_every",
                "found 0",
            ),
            ("stage.0.keep_last=0", "stage.0.keep_last", "found 0"),
            (
                "stage.0.eval_batches=2000000",
                "stage.0.eval_batches",
                "at most 1048576",
            ),
            ("stage.0.steps=0", "stage.0.steps", "found 0"),
            (
                "model.vocab_size=9223372036854775807",
                "model.vocab_size",
                "at most 16777216",
            ),
            (
                "model.max_position_embeddings=0",
                "model.max_position_embeddings",
                "at least 1, found 0",
            ),
        ] {
            let err = parse(&[set]).unwrap_err().to_string();
            assert!(
                err.starts_with("recipes/t.toml: ")
                    && err.contains(&format!("`{key}`"))
                    && err.contains(expected),
                "{set}: {err}"
            );
        }
        // The largest batch allowed still resolves: the limits sit above every real recipe.
        let r = parse(&["stage.0.micro_batch=1048576", "stage.0.grad_accum=1048576"]).unwrap();
        assert_eq!(r.stages[0].tokens_per_step(), 32 << 40);
        // 2^40 steps of 2^45 tokens pass 2^64 tokens: no counter could hold the stage.
        let err = parse(&[
            "stage.0.micro_batch=1048576",
            "stage.0.grad_accum=1048576",
            "stage.0.steps=1099511627776",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("stage.0.steps") && err.contains("2^64"),
            "{err}"
        );
    }

    /// Issue 23: a stage name is a directory under `--out` (and the recipe name one under
    /// runs/), so `../../x` would write checkpoints outside it. Only plain names pass.
    #[test]
    fn names_must_be_plain() {
        for bad in [
            "../../x",
            "..",
            ".hidden",
            "",
            "a/b",
            "a\\b",
            "/abs",
            "two words",
            "é",
        ] {
            let value = format!("{bad:?}"); // a TOML basic string, quotes and escapes included
            let err = parse(&[&format!("stage.0.name={value}")])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("recipes/t.toml: `stage.0.name`")
                    && err.contains(&format!("`{bad}`")),
                "{bad:?}: {err}"
            );
            let err = parse(&[&format!("name={value}")]).unwrap_err().to_string();
            assert!(err.starts_with("recipes/t.toml: `name`"), "{bad:?}: {err}");
        }
        let r = parse(&["stage.0.name=\"pre-train_2.v1\"", "name=\"run.1\""]).unwrap();
        assert_eq!(
            (r.stages[0].raw.name.as_str(), r.raw.name.as_str()),
            ("pre-train_2.v1", "run.1")
        );
    }

    /// The post-training keys: `objective` picks the resolved [`Objective`] with β (0.1 unless
    /// given) and the template; β outside DPO, a template on a pretrain stage, an unknown
    /// template name and a data weight on a chat stage are refused naming the key.
    #[test]
    fn objectives_resolve_and_misplaced_keys_are_refused() {
        let r = parse(&["stage.0.objective=dpo", "stage.0.chat_template=phi-3"]).unwrap();
        assert_eq!(
            r.stages[0].objective,
            Objective::Dpo {
                template: TemplateChoice::Builtin(super::super::sft::Builtin::Phi3),
                beta: DEFAULT_BETA
            }
        );
        assert_eq!(r.stages[0].tokens_per_step(), 2 * 32 * 8);
        assert!(
            r.to_toml().contains("objective = \"dpo\""),
            "{}",
            r.to_toml()
        );
        let r = parse(&["stage.0.objective=sft", "stage.0.chat_template=t.jinja"]).unwrap();
        assert_eq!(
            r.stages[0].objective,
            Objective::Sft {
                template: TemplateChoice::File("t.jinja".into())
            }
        );
        assert_eq!(parse(&[]).unwrap().stages[0].objective, Objective::Pretrain);
        assert!(!parse(&[]).unwrap().to_toml().contains("objective"));
        for (sets, key) in [
            (&["stage.0.beta=0.2"][..], "stage.0.beta"),
            (
                &["stage.0.objective=dpo", "stage.0.beta=0"][..],
                "stage.0.beta",
            ),
            (
                &["stage.0.chat_template=phi-3"][..],
                "stage.0.chat_template",
            ),
            (
                &["stage.0.objective=sft", "stage.0.chat_template=llama"][..],
                "stage.0.chat_template",
            ),
            (
                &["stage.0.objective=sft", "stage.0.data.0.weight=2"][..],
                "stage.0.data.0.weight",
            ),
        ] {
            let err = parse(sets).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{sets:?}: {err}");
        }
    }
}

//! `phigen train --recipe R`: runs a recipe's stages on token shards with the candle decoder.
//!
//! Run directory (`--out`, default `runs/NAME`):
//! - `recipe.toml`: the effective recipe (after `--set`);
//! - `metrics.jsonl`: one line per optimizer step (and per evaluation) — step, tokens, train loss,
//!   val loss, lr, grad norm, tokens/s, TFLOP/s, MFU when the peak is known;
//! - `loss.png`: the loss curve, redrawn at each evaluation;
//! - `STAGE/step-NNNNNN/`: checkpoints in the Hugging Face layout (`config.json`,
//!   `model.safetensors`, `phigen.json`) plus `optimizer.safetensors` (fp32 masters' moments) and
//!   `trainer.json`; each written under a temp name and renamed; the last `keep_last` and the best
//!   validation one are kept.
//!
//! Resume (`--resume`) continues from the newest checkpoint: the data order is a function of the
//! step (see [`data`]), so the resumed curve equals the uninterrupted one. A stop request
//! (SIGINT / SIGTERM) writes a checkpoint after the current step.

pub mod data;
pub mod dist;
pub mod dpo;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod plot;
pub mod recipe;
mod recompute;
pub mod sft;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::artifact::{atomic, records};
use crate::model::{checkpoint, tokenizer, Decoder, ModelError, ModelType, PhiConfig, Weights};
use data::{DataError, Mixture};
use dist::{Comm, DistError, World};
use memory::Budget;
pub use memory::{available_memory, estimate as memory_estimate};
use optim::{AdamW, Hyper, Slot};
use recipe::{Init, Recipe, Recompute, Stage};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";

/// A stage that does not fit its device by the estimate ([`TrainError::OutOfMemory`]).
#[derive(Debug, thiserror::Error)]
#[error("stage `{stage}`: a step needs about {need_gb:.1} GB by the estimate (weights, gradients, AdamW moments; activations of micro_batch {micro_batch} × seq_len {seq_len}{how}), but {usable_gb:.1} GB of the {budget_gb:.1} GB of {budget_from} are usable (the rest is headroom); {advice}")]
pub struct OutOfMemory {
    pub stage: String,
    pub need_gb: f64,
    pub usable_gb: f64,
    pub budget_gb: f64,
    pub budget_from: memory::BudgetSource,
    pub micro_batch: usize,
    pub seq_len: usize,
    /// ", the largest micro_batch \"auto\" could take", ", recompute on", …
    pub how: String,
    pub advice: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    OutDir(#[from] crate::artifact::outdir::OutDirError),
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error(transparent)]
    Chat(#[from] sft::SftError),
    #[error("stage `{stage}`: no chat template: {why}; set the stage's chat_template = \"phi-3\", \"chatml\" or a .jinja file")]
    NoChatTemplate { stage: String, why: String },
    #[error("stage `{stage}`: {ranks} ranks, but a step has {micro_batches} micro-batches (micro_batch {micro_batch} × grad_accum {micro_batches}) and each rank computes whole ones; raise grad_accum to a multiple of {ranks} (keeping the batch: lower micro_batch), or launch fewer ranks")]
    TooManyRanks {
        stage: String,
        ranks: usize,
        micro_batches: usize,
        micro_batch: usize,
    },
    #[error("stage `{stage}` starts from `{previous}`, which has no checkpoint yet: run `{previous}` first (the same command does, in order)")]
    NoPreviousCheckpoint { stage: String, previous: String },
    #[error("{}: already holds a run of this recipe; pass --resume to continue it, or another --out", out.display())]
    RunExists { out: PathBuf },
    #[error("--resume: no checkpoint under {}; run without --resume to start", out.display())]
    NothingToResume { out: PathBuf },
    #[error("{}: checkpoint of recipe `{found}`, not `{expected}`; pass the recipe that made it, or another --out", dir.display())]
    OtherRecipe {
        dir: PathBuf,
        found: String,
        expected: String,
    },
    /// Boxed: its numbers would make every `Result<_, TrainError>` large.
    #[error(transparent)]
    OutOfMemory(Box<OutOfMemory>),
    #[error("stage `{stage}`: micro_batch = \"auto\" needs the device's memory, which could not be read on {device:?}; pass --device-memory GB (e.g. 80 for an 80 GB GPU)")]
    NoMemoryBudget { stage: String, device: Device },
    #[error("{path}: {reason}")]
    BadState { path: PathBuf, reason: String },
    #[error("{}: a stage's `init = \"tile:DIR\"` needs a checkpoint of the recipe model's type `{expected:?}`, found `{found:?}`; tile from a smaller `{expected:?}` checkpoint, or start from `random`", dir.display())]
    TileModelType {
        dir: PathBuf,
        expected: ModelType,
        found: ModelType,
    },
    #[error("{}: tensor `{tensor}` has rank {found}, the recipe's model needs shape {expected:?} (rank {}); tile from a checkpoint of the same architecture", dir.display(), expected.len())]
    TileRank {
        dir: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: usize,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub struct TrainOptions {
    pub recipe: Recipe,
    pub out: PathBuf,
    pub resume: bool,
    pub device: Device,
    /// The dtype the model computes in; masters and moments are always fp32.
    pub dtype: DType,
    /// The device's peak TFLOP/s in `dtype`, for the MFU estimate.
    pub peak_tflops: Option<f64>,
    /// Set by a signal handler: checkpoint after the current step and return.
    pub stop: Arc<AtomicBool>,
    /// Stop (with a checkpoint) after this many optimizer steps in this invocation (tests, probes).
    pub max_steps_this_run: Option<usize>,
    /// Bytes the run may plan with on the device (`--device-memory`); `None`: what the device
    /// reports free at the start of each stage (see [`memory::Budget::of`]).
    pub device_memory: Option<f64>,
    /// The ranks of a data parallel run ([`World::single`] for one process).
    pub world: World,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub stage: String,
    pub step: usize,
    pub tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    pub lr: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    pub tokens_per_sec: f64,
    pub tflops: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Seconds of the step spent summing gradients over the ranks (data parallel runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_secs: Option<f64>,
    /// DPO: the fraction of pairs whose implicit reward β(π − ref) is higher for the chosen
    /// answer (of the step's pairs, or of the validation pairs on an evaluation line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_accuracy: Option<f64>,
    /// DPO: the mean of chosen minus rejected reward over the same pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_margin: Option<f64>,
}

/// What the loop reports to its caller (progress bar, logs).
pub enum Event<'a> {
    StageStart {
        stage: &'a Stage,
        index: usize,
        start_step: usize,
        params: usize,
        memory_gb: f64,
    },
    Step(&'a Metrics),
    Eval(&'a Metrics),
    Checkpoint(&'a Path),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Stopped early (signal or `max_steps_this_run`); a checkpoint was written: `--resume` goes on.
    Stopped,
}

/// `trainer.json`: where a checkpoint sits in the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainerState {
    recipe: String,
    stage: String,
    stage_index: usize,
    /// Optimizer steps completed in this stage.
    step: usize,
    tokens: u64,
    adam_t: u64,
    val_loss: Option<f64>,
    /// The micro_batch `"auto"` chose: a resumed run keeps it, so it reads the same batches
    /// (rows are drawn per micro-batch) whatever memory is free then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    micro_batch: Option<usize>,
}

/// Training FLOPs per token: 6 per weight that multiplies (the input embedding is a lookup unless
/// tied to the head) plus attention's 12 · layers · context · hidden (PaLM, appendix B).
pub fn flops_per_token(cfg: &PhiConfig, seq_len: usize) -> f64 {
    let mut n = cfg.parameter_count();
    if !cfg.tie_word_embeddings {
        n -= cfg.vocab_size * cfg.hidden_size;
    }
    6.0 * n as f64
        + 12.0 * (cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim()) as f64
}

/// Mean next-token cross-entropy of a batch of rows (B, T + 1).
pub fn next_token_loss(model: &Decoder, batch: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t) = batch.dims2()?;
    let hidden = model.hidden_states(&batch.narrow(1, 0, t - 1)?, None)?; //        (B, T, C)
    let targets = batch.narrow(1, 1, t - 1)?.flatten_all()?;
    let (weight, bias) = model.head_parts()?;
    loss::linear_cross_entropy(&hidden.reshape((b * (t - 1), ()))?, weight, bias, &targets)
}

/// One micro-batch of token ids (B, T+1), the seed of its dropout masks, and what its loss is.
pub struct MicroBatch {
    pub ids: Tensor,
    pub dropout_seed: u64,
    pub target: Target,
}

/// What a micro-batch's loss is: every micro-batch computes its share of the step's mean, so the
/// shares of all micro-batches on all ranks sum to it exactly, whatever their sizes.
pub enum Target {
    /// Every next token; the share is their mean over the step's micro-batches (pretraining).
    Next,
    /// Σ weight · cross-entropy over the rows' targets (B · T): SFT's assistant mask divided by
    /// the trained tokens of the whole step (of all its micro-batches, on every rank).
    Weighted(Vec<f32>),
    /// DPO pairs, rows chosen₀, rejected₀, chosen₁, …: the response mask of the targets (B · T),
    /// each row's reference log-prob, β, and the pairs of the whole step (see [`dpo`]).
    Pairs {
        mask: Vec<f32>,
        reference: Vec<f64>,
        beta: f64,
        of: usize,
    },
}

/// Sums over a step's micro-batches: the loss, and DPO's reward accuracy and margin (zero for
/// the other objectives).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sums {
    pub loss: f64,
    pub accuracy: f64,
    pub margin: f64,
}

impl Sums {
    fn add(&mut self, o: Sums) {
        self.loss += o.loss;
        self.accuracy += o.accuracy;
        self.margin += o.margin;
    }
}

/// The loss share of `batch` (see [`Target`]) from the final hidden states (B, T, C) of its
/// inputs; `of`: the step's micro-batches (what [`Target::Next`] averages over). Returns the share
/// as a graph (a scalar) and its sums.
pub fn loss_share(
    model: &Decoder,
    hidden: &Tensor,
    batch: &MicroBatch,
    of: usize,
) -> candle_core::Result<(Tensor, Sums)> {
    let (b, n) = batch.ids.dims2()?;
    let t = n - 1;
    let hidden = hidden.reshape((b * t, ()))?; //                                      (B·T, C)
    let targets = batch.ids.narrow(1, 1, t)?.flatten_all()?;
    let (weight, bias) = model.head_parts()?;
    let (share, accuracy, margin) = match &batch.target {
        Target::Next => {
            let mean = loss::linear_cross_entropy(&hidden, weight, bias, &targets)?;
            ((mean / of as f64)?, 0.0, 0.0)
        }
        Target::Weighted(w) => (
            loss::weighted_linear_cross_entropy(&hidden, weight, bias, &targets, w)?,
            0.0,
            0.0,
        ),
        Target::Pairs {
            mask,
            reference,
            beta,
            of,
        } => {
            let ce = loss::row_cross_entropy(&hidden, weight, bias, &targets)?;
            let logps: Vec<f64> = ce
                .chunks(t)
                .zip(mask.chunks(t))
                .map(|(c, m)| -c.iter().zip(m).map(|(c, m)| f64::from(c * m)).sum::<f64>())
                .collect();
            let s = dpo::share(&logps, reference, *beta, *of)?;
            // The weighted cross-entropy whose gradient is the DPO loss's (see [`dpo`]), shifted
            // to the loss's value.
            let weights: Vec<f32> = mask
                .chunks(t)
                .zip(&s.grad)
                .flat_map(|(m, g)| m.iter().map(move |&m| (-g * f64::from(m)) as f32))
                .collect();
            let w = loss::weighted_linear_cross_entropy(&hidden, weight, bias, &targets, &weights)?;
            let value = f64::from(w.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            (w.affine(1.0, s.loss - value)?, s.accuracy, s.margin)
        }
    };
    let loss = f64::from(share.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    Ok((
        share,
        Sums {
            loss,
            accuracy,
            margin,
        },
    ))
}

/// One optimizer step over micro-batches (gradients averaged): returns the mean loss and the
/// gradient norm before clipping.
pub fn train_step(
    cfg: &PhiConfig,
    opt: &mut AdamW,
    batches: &[MicroBatch],
    grad_clip: f64,
    hyper: Hyper,
    dtype: DType,
    recompute: Recompute,
) -> Result<(f64, f64), TrainError> {
    let (sums, grads) = gradients(cfg, opt, batches, batches.len(), dtype, recompute)?;
    let grad_norm = clip_and_step(opt, grads, grad_clip, hyper)?;
    Ok((sums.loss, grad_norm))
}

/// Clips `grads` to norm `grad_clip` and takes the AdamW step; returns the norm before clipping.
fn clip_and_step(
    opt: &mut AdamW,
    mut grads: HashMap<String, Tensor>,
    grad_clip: f64,
    hyper: Hyper,
) -> Result<f64, TrainError> {
    let grad_norm = optim::clip_grad_norm(&mut grads, grad_clip)?;
    opt.step(&grads, hyper)?;
    Ok(grad_norm)
}

/// The summed loss shares of `batches` and the fp32 gradient of their sum (this rank's share of
/// the step's loss), by parameter name; `of`: the step's micro-batches on every rank. With
/// `recompute` on, each micro-batch's backward pass runs block by block (see [`recompute`]): the
/// same gradients within round-off, less memory.
fn gradients(
    cfg: &PhiConfig,
    opt: &AdamW,
    batches: &[MicroBatch],
    of: usize,
    dtype: DType,
    recompute: Recompute,
) -> Result<(Sums, HashMap<String, Tensor>), TrainError> {
    let mut model = Decoder::new(cfg, &opt.weights(dtype)?)?;
    model.set_training(true);
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let mut sums = Sums::default();
    for batch in batches {
        model.set_dropout_seed(batch.dropout_seed);
        let mut collect = |store: &GradStore| accumulate(&mut grads, &opt.slots, store);
        let (_, n) = batch.ids.dims2()?;
        let ids = batch.ids.narrow(1, 0, n - 1)?; //                                     (B, T)
        let mut batch_sums = Sums::default();
        let mut head = |hidden: &Tensor| {
            let (share, s) = loss_share(&model, hidden, batch, of)?;
            batch_sums = s;
            Ok(share)
        };
        match recompute {
            Recompute::Off => {
                let share = head(&model.hidden_states(&ids, None)?)?;
                collect(&share.backward()?)?;
            }
            Recompute::Blocks => {
                recompute::loss(&model, &ids, head, collect)?;
            }
        }
        sums.add(batch_sums);
    }
    Ok((sums, grads))
}

/// `grads` summed over the ranks: one flat fp32 buffer in slot order (a parameter this rank has
/// no gradient for adds zeros), summed by `comm`, cut back into tensors.
fn all_reduce_gradients(
    comm: &mut Comm,
    slots: &[Slot],
    mut grads: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let flat = slots
        .iter()
        .map(|s| match grads.remove(&s.name) {
            Some(g) => g.flatten_all(),
            None => s.m.zeros_like()?.flatten_all(),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let summed = comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
    let mut at = 0;
    slots
        .iter()
        .map(|s| {
            let n = s.m.elem_count();
            let g = summed.narrow(0, at, n)?.reshape(s.m.shape())?;
            at += n;
            Ok((s.name.clone(), g))
        })
        .collect()
}

/// Adds the fp32 gradient `store` holds for each parameter to its sum in `grads`.
fn accumulate(
    grads: &mut HashMap<String, Tensor>,
    slots: &[Slot],
    store: &GradStore,
) -> candle_core::Result<()> {
    for slot in slots {
        if let Some(g) = store.get(slot.var.as_tensor()) {
            let g = g.to_dtype(DType::F32)?;
            let sum = match grads.remove(&slot.name) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            grads.insert(slot.name.clone(), sum);
        }
    }
    Ok(())
}

fn step_dir(out: &Path, stage: &str, step: usize) -> PathBuf {
    out.join(stage).join(format!("step-{step:06}"))
}

/// The newest complete checkpoint of any stage of `recipe` in run directory `out` (what `--resume`
/// continues from).
pub fn latest_checkpoint(out: &Path, recipe: &Recipe) -> Result<Option<PathBuf>, TrainError> {
    for s in recipe.stages.iter().rev() {
        if let Some((_, d)) = checkpoints(out, &s.raw.name)?.pop() {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

/// Complete checkpoints of `stage` in run directory `out`, oldest first.
pub fn checkpoints(out: &Path, stage: &str) -> Result<Vec<(usize, PathBuf)>, TrainError> {
    let dir = out.join(stage);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
        let path = entry.map_err(io_err(&dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if path.join(TRAINER_FILE).is_file() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let path = dir.join(TRAINER_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::BadState {
        path,
        reason: format!("not a phigen trainer.json: {e}"),
    })
}

/// Weights of `cfg`'s shapes tiled from a smaller checkpoint of the same layout: each tensor is
/// repeated along every dimension and cut to size; layer i takes the small model's layer i mod L.
fn tile_weights(cfg: &PhiConfig, dir: &Path) -> Result<Weights, TrainError> {
    let (small_cfg, small) = checkpoint::load_weights(dir, DType::F32, &Device::Cpu)?;
    if small_cfg.model_type != cfg.model_type {
        return Err(TrainError::TileModelType {
            dir: dir.to_path_buf(),
            expected: cfg.model_type,
            found: small_cfg.model_type,
        });
    }
    let mut out = Weights::new();
    for p in crate::model::names::parameter_table(cfg)? {
        let source = match p
            .name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
        {
            Some((i, rest)) => {
                let i: usize = i.parse().expect("layer names are numbered");
                format!("model.layers.{}.{rest}", i % small_cfg.num_hidden_layers)
            }
            None => p.name.clone(),
        };
        let mut t = small
            .get(&source)
            .ok_or_else(|| ModelError::MissingParameter(source.clone()))?
            .clone();
        if t.rank() != p.shape.len() {
            return Err(TrainError::TileRank {
                dir: dir.to_path_buf(),
                tensor: source,
                expected: p.shape.clone(),
                found: t.rank(),
            });
        }
        for (d, &want) in p.shape.iter().enumerate() {
            let have = t.dim(d)?;
            let mut reps = vec![1; t.rank()];
            reps[d] = want.div_ceil(have);
            t = t.repeat(reps)?.narrow(d, 0, want)?;
        }
        out.insert(p.name, t.contiguous()?);
    }
    Ok(out)
}

struct Run<'a> {
    opts: &'a TrainOptions,
    cfg: PhiConfig,
    metrics: Vec<Metrics>,
    /// The sums over the ranks ([`Comm::Single`] in one process).
    comm: RefCell<Comm>,
}

impl Run<'_> {
    /// Rank 0 writes the run directory; the other ranks only compute.
    fn writes(&self) -> bool {
        self.opts.world.is_root()
    }

    fn append_metrics(&mut self, m: Metrics) -> Result<(), TrainError> {
        if !self.writes() {
            return Ok(());
        }
        let path = self.opts.out.join(METRICS_FILE);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut line = serde_json::to_vec(&m).expect("metrics serialize");
        line.push(b'\n');
        f.write_all(&line).map_err(io_err(&path))?;
        self.metrics.push(m);
        Ok(())
    }

    /// Keeps only metric lines up to (stage, step) — what a checkpoint had seen.
    fn truncate_metrics(&mut self, stage_index: usize, step: usize) -> Result<(), TrainError> {
        let path = self.opts.out.join(METRICS_FILE);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let order: HashMap<&str, usize> = self
            .opts
            .recipe
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.raw.name.as_str(), i))
            .collect();
        self.metrics = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Metrics>(l).ok())
            .filter(|m| {
                let si = order.get(m.stage.as_str()).copied().unwrap_or(usize::MAX);
                si < stage_index || (si == stage_index && m.step <= step)
            })
            .collect();
        let mut bytes = Vec::new();
        for m in &self.metrics {
            bytes.extend(serde_json::to_vec(m).expect("metrics serialize"));
            bytes.push(b'\n');
        }
        atomic::write_bytes(&path, &bytes).map_err(io_err(&path))
    }

    fn save(
        &self,
        stage: &Stage,
        opt: &AdamW,
        state: &TrainerState,
        chat: Option<&crate::model::chat::ChatTemplate>,
    ) -> Result<PathBuf, TrainError> {
        let out = &self.opts.out;
        let dir = step_dir(out, &stage.raw.name, state.step);
        let tmp = atomic::temp_path(&dir);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        let weights = opt.weights(DType::F32)?;
        checkpoint::save(&tmp, &self.cfg, &weights, DType::F32)?;
        tokenizer::write_phigen_file(&tmp, &self.opts.recipe.tokenizer)?;
        // A chat stage's model answers in its template: serve and the local teacher read it here.
        if let Some(t) = chat {
            t.save(&tmp)?;
        }
        let mut moments: Vec<(String, Tensor)> = Vec::new();
        for s in &opt.slots {
            moments.push((format!("{}.exp_avg", s.name), s.m.clone()));
            moments.push((format!("{}.exp_avg_sq", s.name), s.v.clone()));
        }
        let opt_path = tmp.join(OPTIMIZER_FILE);
        safetensors::serialize_to_file(
            moments.iter().map(|(n, t)| (n.as_str(), t)),
            None,
            &opt_path,
        )
        .map_err(|e| TrainError::BadState {
            path: opt_path.clone(),
            reason: format!("writing: {e}"),
        })?;
        let state_path = tmp.join(TRAINER_FILE);
        atomic::write_json(&state_path, state).map_err(io_err(&state_path))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        self.prune(stage)?;
        Ok(dir)
    }

    /// Keeps the last `keep_last` checkpoints of the stage and its best validation one.
    fn prune(&self, stage: &Stage) -> Result<(), TrainError> {
        let all = checkpoints(&self.opts.out, &stage.raw.name)?;
        let best = all
            .iter()
            .filter_map(|(step, dir)| {
                read_state(dir)
                    .ok()
                    .and_then(|s| s.val_loss)
                    .map(|v| (v, *step))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, step)| step);
        let keep_from = all.len().saturating_sub(stage.raw.keep_last.max(1));
        for (i, (step, dir)) in all.iter().enumerate() {
            if i < keep_from && Some(*step) != best {
                std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
            }
        }
        Ok(())
    }

    fn load_optimizer(&self, dir: &Path, opt: &mut AdamW, t: u64) -> Result<(), TrainError> {
        let path = dir.join(OPTIMIZER_FILE);
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
            TrainError::BadState {
                path: path.clone(),
                reason: format!("unreadable: {e}"),
            }
        })?;
        for s in &mut opt.slots {
            for (suffix, target) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let name = format!("{}.{suffix}", s.name);
                let t = tensors.get(&name).ok_or_else(|| TrainError::BadState {
                    path: path.clone(),
                    reason: format!("no `{name}`; the checkpoint is from another model"),
                })?;
                *target = t.to_device(&self.opts.device)?;
            }
        }
        opt.t = t;
        Ok(())
    }

    /// Weights a stage starts from.
    fn initial_weights(&self, stage: &Stage, index: usize) -> Result<Weights, TrainError> {
        let cpu = Device::Cpu;
        let weights = match &stage.init {
            Init::Random => {
                Decoder::init_weights(&self.cfg, self.opts.recipe.raw.seed, DType::F32, &cpu)?
            }
            Init::Checkpoint(dir) => checkpoint::load_weights(dir, DType::F32, &cpu)?.1,
            Init::Tile(dir) => tile_weights(&self.cfg, dir)?,
            Init::Previous => {
                let prev = &self.opts.recipe.stages[index - 1].raw.name;
                let (_, dir) = checkpoints(&self.opts.out, prev)?.pop().ok_or_else(|| {
                    TrainError::NoPreviousCheckpoint {
                        stage: stage.raw.name.clone(),
                        previous: prev.clone(),
                    }
                })?;
                checkpoint::load_weights(&dir, DType::F32, &cpu)?.1
            }
        };
        weights
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&self.opts.device)?)))
            .collect()
    }

    /// What stage `index` reads: its token shards, or its conversations tokenized (from the
    /// run directory's cache when it holds them) and, for DPO, the reference log-probs; and a
    /// chat stage's template, which its checkpoints carry.
    fn stage_data(
        &self,
        stage: &Stage,
        index: usize,
    ) -> Result<(StageData, Option<crate::model::chat::ChatTemplate>), TrainError> {
        let (opts, s) = (self.opts, &stage.raw);
        let (template, beta) = match &stage.objective {
            recipe::Objective::Pretrain => {
                let mixture = Mixture::open(
                    &stage.data,
                    &opts.recipe.tokenizer,
                    self.cfg.vocab_size,
                    s.seq_len,
                )?;
                return Ok((StageData::Tokens(mixture), None));
            }
            recipe::Objective::Sft { template } => (template, None),
            recipe::Objective::Dpo { template, beta } => (template, Some(*beta)),
        };
        let init_dir = self.init_dir(stage, index)?;
        let template = self.chat_template(stage, template, init_dir.as_deref())?;
        // The init checkpoint's tokenizer.json (what sampling it reads), else the recipe's.
        let spec = match init_dir
            .as_deref()
            .filter(|d| d.join(tokenizer::HF_TOKENIZER_FILE).is_file())
        {
            Some(dir) => tokenizer::TokenizerSpec::for_checkpoint(dir)?,
            None => opts.recipe.tokenizer.clone(),
        };
        let tokenizer = tokenizer::Tokenizer::from_spec(&spec)?;
        // The cached examples' key: the files' hash, not where a copy of them lies.
        let tokenizer_id = match &spec {
            tokenizer::TokenizerSpec::File { blake3, .. } => format!("tokenizer files {blake3}"),
            tokenizer::TokenizerSpec::Tiktoken(e) => e.name(),
        };
        let paths: Vec<PathBuf> = stage.data.iter().map(|(p, _)| p.clone()).collect();
        let files = records::table_files(&paths).map_err(sft::SftError::Data)?;
        let source = sft::Source {
            stage: &s.name,
            files: &files,
            pairs: beta.is_some(),
            template: &template,
            tokenizer_id: &tokenizer_id,
            tokenizer: &tokenizer,
            seq_len: s.seq_len,
            vocab: self.cfg.vocab_size,
        };
        let cache = opts.out.join(&s.name);
        let examples = source.examples(&cache, self.writes())?;
        let data = sft::ChatData::new(examples, stage.objective.rows_per_item(), s.seq_len);
        let data = match beta {
            None => StageData::Chat(data),
            Some(beta) => StageData::Pairs {
                reference: self.reference_logps(stage, index, &data, &cache)?,
                data,
                beta,
            },
        };
        Ok((data, Some(template)))
    }

    /// The checkpoint directory a stage starts from, if any (its tokenizer and chat template).
    fn init_dir(&self, stage: &Stage, index: usize) -> Result<Option<PathBuf>, TrainError> {
        Ok(match &stage.init {
            Init::Random => None,
            Init::Checkpoint(dir) | Init::Tile(dir) => Some(dir.clone()),
            Init::Previous => {
                let prev = &self.opts.recipe.stages[index - 1].raw.name;
                let (_, dir) = checkpoints(&self.opts.out, prev)?.pop().ok_or_else(|| {
                    TrainError::NoPreviousCheckpoint {
                        stage: stage.raw.name.clone(),
                        previous: prev.clone(),
                    }
                })?;
                Some(dir)
            }
        })
    }

    fn chat_template(
        &self,
        stage: &Stage,
        choice: &recipe::TemplateChoice,
        init_dir: Option<&Path>,
    ) -> Result<crate::model::chat::ChatTemplate, TrainError> {
        use crate::model::chat::ChatTemplate;
        let none = |why: String| TrainError::NoChatTemplate {
            stage: stage.raw.name.clone(),
            why,
        };
        match choice {
            recipe::TemplateChoice::Builtin(b) => Ok(b.template()),
            recipe::TemplateChoice::File(path) => {
                let source = std::fs::read_to_string(path).map_err(io_err(path))?;
                ChatTemplate::new(source, String::new(), String::new())
                    .map_err(|e| none(format!("{}: {e}", path.display())))
            }
            recipe::TemplateChoice::Checkpoint => match init_dir {
                None => Err(none("the stage starts from random weights".into())),
                Some(dir) => ChatTemplate::for_checkpoint(dir)?.ok_or_else(|| {
                    none(format!(
                        "{} has no chat_template.jinja and no chat_template in tokenizer_config.json",
                        dir.display()
                    ))
                }),
            },
        }
    }

    /// The log-prob of each example's response under the stage's initial weights (DPO's frozen
    /// reference), from the run directory when a file there was made from the same examples and
    /// weights, else computed now, each rank every N-th batch, and written there.
    fn reference_logps(
        &self,
        stage: &Stage,
        index: usize,
        data: &sft::ChatData,
        cache: &Path,
    ) -> Result<Vec<f32>, TrainError> {
        let opts = self.opts;
        let weights = self.initial_weights(stage, index)?;
        let mut h = blake3::Hasher::new();
        let e = &data.examples;
        for part in [
            bytemuck_u32(&e.ids),
            e.mask.clone(),
            bytemuck_u32(&e.starts.iter().map(|&x| x as u32).collect::<Vec<_>>()),
        ] {
            h.update(&part);
        }
        let mut names: Vec<&String> = weights.keys().collect();
        names.sort();
        for n in names {
            h.update(n.as_bytes());
            let values = weights[n]
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for v in values {
                h.update(&v.to_le_bytes());
            }
        }
        let path = cache.join(format!(
            "reference-{}.safetensors",
            &h.finalize().to_hex()[..16]
        ));
        let found = candle_core::safetensors::load(&path, &Device::Cpu)
            .ok()
            .and_then(|t| t.get("logps")?.to_vec1::<f32>().ok())
            .filter(|v| v.len() == e.len());
        if let Some(v) = found {
            return Ok(v);
        }
        let dtype = opts.dtype;
        let weights = weights
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
            .collect::<candle_core::Result<Weights>>()?;
        let model = Decoder::new(&self.cfg, &weights)?;
        let all: Vec<usize> = (0..e.len() / data.per_item).collect();
        let chunks: Vec<&[usize]> = all.chunks(stage.micro_batch).collect();
        let mut logps = vec![0f32; e.len()];
        for i in opts.world.my_share(chunks.len()) {
            let rows = data.rows(chunks[i], &opts.device)?;
            let (b, n) = rows.ids.dims2()?;
            let hidden = model.hidden_states(&rows.ids.narrow(1, 0, n - 1)?, None)?;
            let targets = rows.ids.narrow(1, 1, n - 1)?.flatten_all()?;
            let (w, bias) = model.head_parts()?;
            let ce =
                loss::row_cross_entropy(&hidden.reshape((b * (n - 1), ()))?, w, bias, &targets)?;
            for ((row_ce, m), &ex) in ce
                .chunks(n - 1)
                .zip(rows.mask.chunks(n - 1))
                .zip(&rows.examples)
            {
                logps[ex] = -row_ce.iter().zip(m).map(|(c, m)| c * m).sum::<f32>();
            }
        }
        self.comm.borrow_mut().sum_host(&mut logps)?;
        if self.writes() {
            let t = Tensor::from_slice(&logps, logps.len(), &Device::Cpu)?;
            let tmp = atomic::temp_path(&path);
            candle_core::safetensors::save(&HashMap::from([("logps", t)]), &tmp)?;
            std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
        Ok(logps)
    }

    /// The validation micro-batches of a stage, the same at every evaluation.
    fn val_batches(&self, stage: &Stage, data: &StageData) -> Result<Vec<MicroBatch>, TrainError> {
        let (m, device) = (stage.micro_batch, &self.opts.device);
        match data {
            StageData::Tokens(mixture) => Ok(mixture
                .val_batches(stage.raw.eval_batches, m, device)?
                .into_iter()
                .map(|ids| MicroBatch {
                    ids,
                    dropout_seed: 0,
                    target: Target::Next,
                })
                .collect()),
            StageData::Chat(d) | StageData::Pairs { data: d, .. } => {
                let items = d.val_items(stage.raw.eval_batches * m);
                let parts: Vec<&[usize]> = items.chunks(m).collect();
                data.chat_batches(items, &parts, device)
            }
        }
    }

    /// The loss (and DPO's rewards) of the validation batches, each rank computing every N-th.
    fn evaluate(&self, opt: &AdamW, val: &[MicroBatch]) -> Result<Option<Sums>, TrainError> {
        if val.is_empty() {
            return Ok(None);
        }
        let model = Decoder::new(&self.cfg, &opt.weights(self.opts.dtype)?)?;
        let mut sum = [0f32; 3];
        for i in self.opts.world.my_share(val.len()) {
            let (_, n) = val[i].ids.dims2()?;
            let hidden = model.hidden_states(&val[i].ids.narrow(1, 0, n - 1)?, None)?;
            let (_, s) = loss_share(&model, &hidden, &val[i], val.len())?;
            sum[0] += s.loss as f32;
            sum[1] += s.accuracy as f32;
            sum[2] += s.margin as f32;
        }
        self.comm.borrow_mut().sum_host(&mut sum)?;
        Ok(Some(Sums {
            loss: f64::from(sum[0]),
            accuracy: f64::from(sum[1]),
            margin: f64::from(sum[2]),
        }))
    }
}

/// What a stage reads: token shards, or tokenized conversations (SFT) or pairs (DPO, with the
/// reference model's log-prob of each row).
enum StageData {
    Tokens(Mixture),
    Chat(sft::ChatData),
    Pairs {
        data: sft::ChatData,
        reference: Vec<f32>,
        beta: f64,
    },
}

impl StageData {
    /// Micro-batches `micros` of `step` (rows as [`data`] and [`sft`] draw them).
    fn train_batches(
        &self,
        stage: &Stage,
        seed: u64,
        index: usize,
        step: usize,
        micros: &[usize],
        device: &Device,
    ) -> Result<Vec<MicroBatch>, TrainError> {
        let m = stage.micro_batch;
        let dropout_seed = |micro| data::dropout_seed(seed, index, step, micro);
        let chat = match self {
            StageData::Tokens(mixture) => {
                return micros
                    .iter()
                    .map(|&micro| {
                        Ok(MicroBatch {
                            ids: mixture.train_batch(seed, index, step, micro, m, device)?,
                            dropout_seed: dropout_seed(micro),
                            target: Target::Next,
                        })
                    })
                    .collect()
            }
            StageData::Chat(d) | StageData::Pairs { data: d, .. } => d,
        };
        let per_step = stage.sequences_per_step();
        let items = chat.train_items_at(seed, index, step * per_step..(step + 1) * per_step);
        let parts: Vec<&[usize]> = items.chunks(m).collect();
        let mine: Vec<&[usize]> = micros.iter().map(|&i| parts[i]).collect();
        let mut batches = self.chat_batches(&items, &mine, device)?;
        for (b, &micro) in batches.iter_mut().zip(micros) {
            b.dropout_seed = dropout_seed(micro);
        }
        Ok(batches)
    }

    /// Batches of `parts` (lists of items), their loss normalized over all of `of`'s items.
    fn chat_batches(
        &self,
        of: &[usize],
        parts: &[&[usize]],
        device: &Device,
    ) -> Result<Vec<MicroBatch>, TrainError> {
        parts
            .iter()
            .map(|items| {
                let (target, rows) = match self {
                    StageData::Tokens(_) => unreachable!("token stages draw windows"),
                    StageData::Chat(d) => {
                        let rows = d.rows(items, device)?;
                        let trained = d.trained_tokens(of) as f32;
                        let w = rows.mask.iter().map(|m| m / trained).collect();
                        (Target::Weighted(w), rows)
                    }
                    StageData::Pairs {
                        data,
                        reference,
                        beta,
                    } => {
                        let rows = data.rows(items, device)?;
                        let target = Target::Pairs {
                            reference: rows
                                .examples
                                .iter()
                                .map(|&e| f64::from(reference[e]))
                                .collect(),
                            mask: rows.mask.clone(),
                            beta: *beta,
                            of: of.len(),
                        };
                        (target, rows)
                    }
                };
                Ok(MicroBatch {
                    ids: rows.ids,
                    dropout_seed: 0,
                    target,
                })
            })
            .collect()
    }
}

/// The little-endian bytes of `v`.
fn bytemuck_u32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Where a run begins.
struct Start {
    /// The first stage to run.
    stage: usize,
    /// The checkpoint that stage continues from (`--resume` in the middle of a stage).
    from: Option<(PathBuf, TrainerState)>,
}

/// What an optimizer step did.
struct StepDone {
    /// The step's loss (and DPO's reward metrics), all ranks'.
    sums: Sums,
    /// The gradient norm before clipping.
    grad_norm: f64,
    /// A stop was asked of some rank: all stop after this step.
    stop: bool,
    /// Seconds spent in the sums over the ranks.
    comm_secs: Option<f64>,
}

/// Where a stage stands: the optimizer (weights and moments), steps and tokens done.
struct Progress {
    opt: AdamW,
    step: usize,
    tokens: u64,
}

impl Run<'_> {
    /// Where to begin. Without `--resume` the run directory must hold no checkpoint; with it, the
    /// newest checkpoint is continued and metrics after it are dropped.
    fn start(&mut self) -> Result<Start, TrainError> {
        let (opts, recipe) = (self.opts, &self.opts.recipe);
        let existing: Vec<_> = recipe
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| checkpoints(&opts.out, &s.raw.name).map(|c| (i, c)))
            .collect::<Result<_, _>>()?;
        let latest = existing
            .iter()
            .rev()
            .find_map(|(i, c)| c.last().map(|(_, d)| (*i, d.clone())));
        match (latest, opts.resume) {
            (Some(_), false) => Err(TrainError::RunExists {
                out: opts.out.clone(),
            }),
            (None, true) => Err(TrainError::NothingToResume {
                out: opts.out.clone(),
            }),
            (Some((i, dir)), true) => {
                let state = read_state(&dir)?;
                if state.recipe != recipe.raw.name {
                    return Err(TrainError::OtherRecipe {
                        dir,
                        found: state.recipe,
                        expected: recipe.raw.name.clone(),
                    });
                }
                if self.writes() {
                    self.truncate_metrics(i, state.step)?;
                }
                Ok(if state.step >= recipe.stages[i].steps {
                    Start {
                        stage: i + 1,
                        from: None,
                    }
                } else {
                    Start {
                        stage: i,
                        from: Some((dir, state)),
                    }
                })
            }
            (None, false) => {
                if self.writes() {
                    let _ = std::fs::remove_file(opts.out.join(METRICS_FILE));
                }
                Ok(Start {
                    stage: 0,
                    from: None,
                })
            }
        }
    }

    /// Runs stage `index` from `resumed` (else from its initial weights) to its last step, or
    /// until a stop request or `max_steps_this_run` ends it early with a checkpoint.
    fn run_stage(
        &mut self,
        index: usize,
        stage: &Stage,
        resumed: Option<(PathBuf, TrainerState)>,
        steps_this_run: &mut usize,
        on_event: &mut impl FnMut(Event),
    ) -> Result<Outcome, TrainError> {
        let (opts, recipe) = (self.opts, &self.opts.recipe);
        self.cfg.embd_pdrop = stage.raw.dropout;
        self.cfg.resid_pdrop = stage.raw.dropout;
        self.cfg.attention_dropout = stage.raw.dropout;
        let chosen = resumed.as_ref().and_then(|(_, state)| state.micro_batch);
        let (stage, need) = self.fit(stage, chosen)?;
        let stage = &stage;
        let s = &stage.raw;
        let (data, chat) = self.stage_data(stage, index)?;
        let val = self.val_batches(stage, &data)?;
        let mut at = self.stage_start(stage, index, resumed)?;
        // Ranks that disagree on where they are would sum gradients of different steps.
        self.comm.borrow_mut().agree(
            "the stage, step and micro-batch",
            &[index as f32, at.step as f32, stage.micro_batch as f32],
        )?;
        let mut on_event = |e: Event| {
            if opts.world.is_root() {
                on_event(e)
            }
        };
        on_event(Event::StageStart {
            stage,
            index,
            start_step: at.step,
            params: self.cfg.parameter_count(),
            memory_gb: need / 1e9,
        });
        let flops = flops_per_token(&self.cfg, s.seq_len);
        let mut last_val = None;
        while at.step < stage.steps {
            let started = Instant::now();
            let lr = recipe::learning_rate(stage, at.step);
            let asked = opts.stop.load(Ordering::SeqCst);
            let done = self.optimizer_step(stage, index, &data, &mut at, lr, asked)?;
            let (loss, grad_norm) = (done.sums.loss, done.grad_norm);
            let dpo = matches!(stage.objective, recipe::Objective::Dpo { .. });
            *steps_this_run += 1;
            let step_tokens = stage.tokens_per_step() as u64;
            let secs = started.elapsed().as_secs_f64();
            let tflops = flops * step_tokens as f64 / secs / 1e12;
            let m = Metrics {
                stage: s.name.clone(),
                step: at.step,
                tokens: at.tokens,
                train_loss: Some(loss),
                val_loss: None,
                lr,
                grad_norm: Some(grad_norm),
                tokens_per_sec: step_tokens as f64 / secs,
                tflops,
                mfu: opts.peak_tflops.map(|p| tflops / p),
                comm_secs: done.comm_secs,
                reward_accuracy: dpo.then_some(done.sums.accuracy),
                reward_margin: dpo.then_some(done.sums.margin),
            };
            on_event(Event::Step(&m));
            self.append_metrics(m.clone())?;
            let last = at.step == stage.steps;
            let evaluated = at.step % s.eval_every == 0 || last;
            if evaluated {
                last_val = self.evaluate_and_record(&at.opt, &val, dpo, m, &mut on_event)?;
            }
            // Every rank stops at the same step: a stop asked of any one counts for all.
            let stop = done.stop
                || opts
                    .max_steps_this_run
                    .is_some_and(|n| *steps_this_run >= n);
            if at.step % s.checkpoint_every == 0 || last || stop {
                let state = TrainerState {
                    recipe: recipe.raw.name.clone(),
                    stage: s.name.clone(),
                    stage_index: index,
                    step: at.step,
                    tokens: at.tokens,
                    adam_t: at.opt.t,
                    val_loss: if evaluated { last_val } else { None },
                    micro_batch: stage.is_auto().then_some(stage.micro_batch),
                };
                if self.writes() {
                    let dir = self.save(stage, &at.opt, &state, chat.as_ref())?;
                    on_event(Event::Checkpoint(&dir));
                }
            }
            if stop && !(last && index + 1 == recipe.stages.len()) {
                return Ok(Outcome::Stopped);
            }
        }
        Ok(Outcome::Finished)
    }

    /// `stage` as it runs on this device — `micro_batch = "auto"` resolved, or kept at the size
    /// `chosen` by the checkpoint a resumed run starts from — and its memory estimate in bytes;
    /// refused when the estimate exceeds the usable part of the device's memory.
    fn fit(&self, stage: &Stage, chosen: Option<usize>) -> Result<(Stage, f64), TrainError> {
        let dtype = self.opts.dtype;
        let budget = Budget::of(&self.opts.device, self.opts.device_memory);
        let ranks = self.opts.world.size;
        let sequences = stage.sequences_per_step();
        let kept = chosen
            .filter(|&m| stage.is_auto() && sequences.is_multiple_of(m) && sequences / m >= ranks);
        let fitted = match (kept, budget) {
            (Some(m), _) => stage.with_micro_batch(m),
            (None, None) if stage.is_auto() => {
                return Err(TrainError::NoMemoryBudget {
                    stage: stage.raw.name.clone(),
                    device: self.opts.device.clone(),
                })
            }
            (None, budget) => memory::fit(&self.cfg, stage, dtype, budget, ranks),
        };
        if fitted.grad_accum < ranks {
            return Err(TrainError::TooManyRanks {
                stage: stage.raw.name.clone(),
                ranks,
                micro_batches: fitted.grad_accum,
                micro_batch: fitted.micro_batch,
            });
        }
        let need = memory::estimate(&self.cfg, &fitted, dtype);
        if let Some(budget) = budget.filter(|b| need > b.usable()) {
            let mut how = String::new();
            if fitted.is_auto() {
                how.push_str(", the smallest micro_batch \"auto\" can take");
            }
            if !fitted.recompute().is_off() {
                how.push_str(", recomputing blocks");
            }
            return Err(TrainError::OutOfMemory(Box::new(OutOfMemory {
                stage: stage.raw.name.clone(),
                need_gb: need / 1e9,
                usable_gb: budget.usable() / 1e9,
                budget_gb: budget.bytes / 1e9,
                budget_from: budget.source,
                micro_batch: fitted.micro_batch,
                seq_len: fitted.raw.seq_len,
                how,
                advice: memory::advice(&fitted, dtype),
            })));
        }
        Ok((fitted, need))
    }

    /// The optimizer a stage starts with: a checkpoint's weights and moments, or fresh moments
    /// over the stage's initial weights.
    fn stage_start(
        &self,
        stage: &Stage,
        index: usize,
        resumed: Option<(PathBuf, TrainerState)>,
    ) -> Result<Progress, TrainError> {
        Ok(match resumed {
            Some((dir, state)) => {
                let weights = checkpoint::load_weights(&dir, DType::F32, &self.opts.device)?.1;
                let mut opt = AdamW::new(&weights)?;
                self.load_optimizer(&dir, &mut opt, state.adam_t)?;
                Progress {
                    opt,
                    step: state.step,
                    tokens: state.tokens,
                }
            }
            None => Progress {
                opt: AdamW::new(&self.initial_weights(stage, index)?)?,
                step: 0,
                tokens: 0,
            },
        })
    }

    /// One optimizer step over `grad_accum` micro-batches (a function of the seed, stage and
    /// step), this rank computing its share of them; `asked`: a stop was asked of this rank.
    fn optimizer_step(
        &self,
        stage: &Stage,
        index: usize,
        data: &StageData,
        at: &mut Progress,
        lr: f64,
        asked: bool,
    ) -> Result<StepDone, TrainError> {
        let (opts, seed) = (self.opts, self.opts.recipe.raw.seed);
        let s = &stage.raw;
        let mine: Vec<usize> = opts.world.my_share(stage.grad_accum).collect();
        let batches = data.train_batches(stage, seed, index, at.step, &mine, &opts.device)?;
        let (mut sums, mut grads) = gradients(
            &self.cfg,
            &at.opt,
            &batches,
            stage.grad_accum,
            opts.dtype,
            stage.recompute(),
        )?;
        let (mut stop, mut comm_secs) = (asked, None);
        if opts.world.size > 1 {
            let started = Instant::now();
            let mut comm = self.comm.borrow_mut();
            grads = all_reduce_gradients(&mut comm, &at.opt.slots, grads)?;
            let mut host = [
                sums.loss as f32,
                f32::from(u8::from(asked)),
                sums.accuracy as f32,
                sums.margin as f32,
            ];
            comm.sum_host(&mut host)?;
            stop = host[1] > 0.0;
            sums = Sums {
                loss: f64::from(host[0]),
                accuracy: f64::from(host[2]),
                margin: f64::from(host[3]),
            };
            comm_secs = Some(started.elapsed().as_secs_f64());
        }
        let hyper = Hyper {
            lr,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
        };
        let grad_norm = clip_and_step(&mut at.opt, grads, s.grad_clip, hyper)?;
        at.step += 1;
        at.tokens += stage.tokens_per_step() as u64;
        Ok(StepDone {
            sums,
            grad_norm,
            stop,
            comm_secs,
        })
    }

    /// The validation loss after the step `m` records; reported, appended to the metrics and
    /// drawn in `loss.png` (None without validation data).
    fn evaluate_and_record(
        &mut self,
        opt: &AdamW,
        val: &[MicroBatch],
        dpo: bool,
        m: Metrics,
        on_event: &mut impl FnMut(Event),
    ) -> Result<Option<f64>, TrainError> {
        let sums = self.evaluate(opt, val)?;
        let val_loss = sums.map(|s| s.loss);
        if let Some(v) = sums {
            let e = Metrics {
                train_loss: None,
                grad_norm: None,
                val_loss: Some(v.loss),
                reward_accuracy: dpo.then_some(v.accuracy),
                reward_margin: dpo.then_some(v.margin),
                ..m
            };
            on_event(Event::Eval(&e));
            self.append_metrics(e)?;
            plot::draw(&self.opts.out.join("loss.png"), &self.metrics).unwrap_or_else(|e| {
                tracing::warn!("loss.png: {e}");
            });
        }
        Ok(val_loss)
    }
}

/// Runs (or resumes) every stage of the recipe; the ranks of a data parallel run meet first.
pub fn run(opts: &TrainOptions, on_event: impl FnMut(Event)) -> Result<Outcome, TrainError> {
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    let lock = lock_run(opts)?;
    let comm = Comm::connect(&opts.world, &opts.out, &opts.device)?;
    run_locked(opts, lock, comm, on_event)
}

/// [`run`] for ranks that have met already (`comm`), as a whole-run recipe's do at its start.
pub fn run_connected(
    opts: &TrainOptions,
    comm: Comm,
    on_event: impl FnMut(Event),
) -> Result<Outcome, TrainError> {
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    run_locked(opts, lock_run(opts)?, comm, on_event)
}

/// One run per run directory: two would write the same checkpoints and metrics. Rank 0 holds the
/// lock for the ranks of a data parallel run (the others write nothing there).
fn lock_run(opts: &TrainOptions) -> Result<Option<crate::artifact::outdir::DirLock>, TrainError> {
    Ok(if opts.world.is_root() {
        Some(crate::artifact::outdir::DirLock::exclusive(&opts.out)?)
    } else {
        None
    })
}

fn run_locked(
    opts: &TrainOptions,
    _lock: Option<crate::artifact::outdir::DirLock>,
    comm: Comm,
    mut on_event: impl FnMut(Event),
) -> Result<Outcome, TrainError> {
    let recipe = &opts.recipe;
    let mut run = Run {
        opts,
        cfg: recipe.model.clone(),
        metrics: Vec::new(),
        comm: RefCell::new(comm),
    };
    let mut start = run.start()?;
    if opts.world.is_root() {
        let recipe_path = opts.out.join("recipe.toml");
        atomic::write_bytes(&recipe_path, recipe.to_toml().as_bytes())
            .map_err(io_err(&recipe_path))?;
    }

    let mut steps_this_run = 0;
    for (index, stage) in recipe.stages.iter().enumerate().skip(start.stage) {
        let resumed = if index == start.stage {
            start.from.take()
        } else {
            None
        };
        let outcome = run.run_stage(index, stage, resumed, &mut steps_this_run, &mut on_event)?;
        if outcome == Outcome::Stopped {
            return Ok(Outcome::Stopped);
        }
    }
    Ok(Outcome::Finished)
}

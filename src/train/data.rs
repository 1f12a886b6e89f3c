//! Batches from a weighted mixture of token directories.
//!
//! A training row is `seq_len + 1` consecutive tokens at a random place: a directory drawn by
//! weight, a shard by its token count, an offset uniformly. The random stream of (seed, stage, step,
//! micro-batch) alone decides it, so the data order needs no saved position: a resumed run draws
//! exactly the batches the uninterrupted one would have. Validation rows are the first
//! non-overlapping windows of each directory's validation split, the same at every evaluation.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::tokenizer::TokenizerSpec;
use crate::tokenize::{self, Split, TokenDir, TokenizeError};

pub struct Mixture {
    dirs: Vec<TokenDir>,
    /// Cumulative normalised weights of the directories that have training tokens.
    cumulative: Vec<f64>,
    seq_len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Tokens(#[from] TokenizeError),
    #[error("{path}: the train split has no shard with more than {need} tokens (seq_len + 1); tokenize more text or lower seq_len")]
    TooShort { path: PathBuf, need: usize },
    #[error("{path}: token ids go up to {vocab} (`{tokenizer}`), beyond the model's vocab_size {model_vocab}; raise model.vocab_size")]
    Vocab {
        path: PathBuf,
        tokenizer: TokenizerSpec,
        vocab: usize,
        model_vocab: usize,
    },
    #[error("{first} was tokenized with `{first_tokenizer}`, {other} with `{other_tokenizer}`: the data of one stage must share a tokenizer; re-run `phigen tokenize` on one of them with the other's --tokenizer")]
    MixedTokenizers {
        first: PathBuf,
        first_tokenizer: Box<TokenizerSpec>,
        other: PathBuf,
        other_tokenizer: Box<TokenizerSpec>,
    },
}

impl Mixture {
    pub fn open(
        data: &[(PathBuf, f64)],
        tokenizer: &TokenizerSpec,
        model_vocab: usize,
        seq_len: usize,
    ) -> Result<Self, DataError> {
        let mut dirs: Vec<TokenDir> = Vec::new();
        let mut cumulative = Vec::new();
        let total: f64 = data.iter().map(|(_, w)| w).sum();
        let mut acc = 0.0;
        for (path, weight) in data {
            let dir = TokenDir::open(path, None)?;
            if let Some(first) = dirs.first() {
                if !first.meta.tokenizer.same_tokenizer(&dir.meta.tokenizer) {
                    return Err(DataError::MixedTokenizers {
                        first: first.dir.clone(),
                        first_tokenizer: Box::new(first.meta.tokenizer.clone()),
                        other: path.clone(),
                        other_tokenizer: Box::new(dir.meta.tokenizer.clone()),
                    });
                }
            }
            tokenize::check_tokenizer(path, &dir.meta, tokenizer)?;
            if dir.meta.vocab_size > model_vocab {
                return Err(DataError::Vocab {
                    path: path.clone(),
                    tokenizer: dir.meta.tokenizer.clone(),
                    vocab: dir.meta.vocab_size,
                    model_vocab,
                });
            }
            if !dir.train.iter().any(|s| s.tokens > seq_len + 1) {
                return Err(DataError::TooShort {
                    path: path.clone(),
                    need: seq_len + 1,
                });
            }
            acc += weight / total;
            cumulative.push(acc);
            dirs.push(dir);
        }
        Ok(Mixture {
            dirs,
            cumulative,
            seq_len,
        })
    }

    /// `rows` training rows (rows, seq_len + 1) for micro-batch `micro` of `step` in stage
    /// `stage`: rows `micro · rows ..` of the step, each a function of the seed, stage, step and
    /// its index alone, so a resumed run reads what an uninterrupted one would, and a step reads
    /// the same rows however they are cut into micro-batches (`micro_batch = "auto"` on another
    /// device) or shared out between data parallel ranks.
    pub fn train_batch(
        &self,
        seed: u64,
        stage: usize,
        step: usize,
        micro: usize,
        rows: usize,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = self.seq_len + 1;
        let mut ids = Vec::with_capacity(rows * n);
        for row in micro * rows..(micro + 1) * rows {
            let key = blake3::hash(format!("{seed}/{stage}/{step}/row {row}").as_bytes());
            let mut rng = ChaCha8Rng::from_seed(*key.as_bytes());
            let x: f64 = rng.random();
            let d = self
                .cumulative
                .iter()
                .position(|&c| x < c)
                .unwrap_or(self.dirs.len() - 1);
            let shards: Vec<_> = self.dirs[d].train.iter().filter(|s| s.tokens > n).collect();
            let total: usize = shards.iter().map(|s| s.tokens - n).sum();
            let mut at = rng.random_range(0..total);
            let shard = shards
                .iter()
                .find(|s| {
                    let span = s.tokens - n;
                    if at < span {
                        true
                    } else {
                        at -= span;
                        false
                    }
                })
                .expect("offset drawn within the total span");
            ids.extend(shard.slice(at, n));
        }
        Tensor::from_vec(ids, (rows, n), device)
    }

    /// Up to `batches` validation micro-batches of `rows` rows, the same every time.
    pub fn val_batches(
        &self,
        batches: usize,
        rows: usize,
        device: &Device,
    ) -> candle_core::Result<Vec<Tensor>> {
        let n = self.seq_len + 1;
        let mut windows: Vec<Vec<u32>> = Vec::new();
        // Round-robin over directories so each contributes.
        let totals: Vec<usize> = self
            .dirs
            .iter()
            .map(|d| {
                d.meta
                    .splits
                    .get(&Split::Val)
                    .map_or(0, |s| s.tokens as usize)
            })
            .collect();
        let mut k = 0;
        while windows.len() < batches * rows && totals.iter().any(|&t| (k + 1) * n <= t) {
            for (d, &t) in self.dirs.iter().zip(&totals) {
                if (k + 1) * n <= t && windows.len() < batches * rows {
                    windows.push(d.read(Split::Val, k * n, n));
                }
            }
            k += 1;
        }
        windows
            .chunks(rows)
            .map(|c| Tensor::from_vec(c.concat(), (c.len(), n), device))
            .collect()
    }
}

/// The dropout seed of micro-batch `micro` of `step` in stage `stage`, derived like its rows, so
/// dropout masks too are the same in two runs and after a resume.
pub fn dropout_seed(seed: u64, stage: usize, step: usize, micro: usize) -> u64 {
    let key = blake3::hash(format!("dropout/{seed}/{stage}/{step}/{micro}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&key.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

//! The phi model family in candle: one config-driven decoder for phi-1 / 1.5 / 2 (`PhiForCausalLM`),
//! phi-3 (`Phi3ForCausalLM`) and llama-layout checkpoints (`LlamaForCausalLM`), with causal-LM,
//! sequence- and token-classification heads, Hugging Face checkpoints, tokenizers and sampling.
//! Shared by the trainer, the classifier's embedder and the in-process teacher.

pub mod attention;
pub mod cache;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod gemv;
pub mod gguf;
pub mod hub;
pub mod int8;
pub mod names;
pub mod ops;
pub mod rope;
pub mod sample;
pub mod tokenizer;

use std::path::PathBuf;

pub use cache::KvCache;
pub use config::{HeadKind, ModelType, PhiConfig, Preset};
pub use decoder::{Decoder, TrainingPass, Weights};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config.json key (or a preset/recipe setting that becomes one) holds a value the
    /// decoder cannot be built from.
    #[error("model config `{key}`: expected {expected}, found {found}; fix config.json (or the recipe's [model] that builds it)")]
    InvalidConfig {
        key: &'static str,
        expected: String,
        found: String,
    },
    #[error("model config `architectures`: `{found}` is not supported; phigen runs *ForCausalLM and *ForSequenceClassification heads; pick a checkpoint with one of those")]
    UnsupportedArchitecture { found: String },
    #[error("model config `rope_scaling`: rope type `{found}` is not supported; phigen implements default, linear and longrope (su); pick a checkpoint with one of those")]
    UnsupportedRope { found: String },
    #[error("model config: cannot be written as JSON ({source}); this is a bug in phigen, please report it")]
    ConfigJson { source: serde_json::Error },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` is missing, and a `{model_type}` model with this config.json needs it; is the checkpoint for another architecture, or incomplete?")]
    MissingTensor {
        path: PathBuf,
        name: String,
        model_type: String,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}, but config.json implies {expected:?}; the config and weights do not belong together")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("parameter `{0}` was not supplied to the decoder")]
    MissingParameter(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    TokenizerFile(#[from] tokenizer::TokenizerError),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

#[cfg(test)]
pub(crate) mod tests;

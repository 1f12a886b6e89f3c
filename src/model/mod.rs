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
pub use decoder::{Decoder, Weights};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model config: {0}")]
    Config(String),
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
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

#[cfg(test)]
pub(crate) mod tests;

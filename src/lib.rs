//! phigen: reproduce the Phi / TinyStories recipe end to end.
//!
//! Stages read and write artifacts on disk (README.md describes each command and its files):
//! - `generate` writes synthetic corpora (stories, textbooks, exercises) with a `teacher` (an
//!   OpenAI-compatible HTTP server, a mock one, or a local model);
//! - `classify` is the educational-value filter (embeddings and a random forest);
//! - `dedup` removes exact and near duplicates and decontaminates against benchmarks;
//! - `tokenize` turns corpora into token shards;
//! - `model` is the phi decoder family (checkpoints, tokenizers, sampling), `train` its trainer;
//! - `eval` scores checkpoints (HumanEval / MBPP pass@k, validation loss, graded stories), running
//!   generated code in the `sandbox`;
//! - `artifact` is the record layer every stage shares (atomic writes, Parquet, output dirs);
//! - `pipeline` runs a whole recipe (data steps → training → evals) with one manifest and one
//!   done / stale / to-do rule for every step;
//! - `report` renders corpora, runs and scores as one self-contained HTML page.
//!
//! `cli` is the command-line front door; `main.rs` only calls it.

pub mod artifact;
pub mod classify;
pub mod cli;
pub mod dedup;
pub mod eval;
pub mod generate;
pub mod model;
pub mod pipeline;
pub mod range;
pub mod report;
pub mod sandbox;
pub mod teacher;
pub mod tokenize;
pub mod train;

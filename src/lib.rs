//! phigen: reproduce the Phi / TinyStories recipe end to end.
//!
//! Stages read and write artifacts on disk (see `../shared/design.md`): `generate` writes
//! synthetic corpora with a `teacher`; `classify` is the educational-value filter; `model` is the phi decoder family (checkpoints, sampling);
//! `artifact` is the record layer every stage shares.
//! `cli` is the command-line front door; `main.rs` only calls it.

pub mod artifact;
pub mod classify;
pub mod cli;
pub mod dedup;
pub mod eval;
pub mod generate;
pub mod model;
pub mod range;
pub mod sandbox;
pub mod teacher;
pub mod tokenize;
pub mod train;

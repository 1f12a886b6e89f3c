//! phigen: reproduce the Phi / TinyStories recipe end to end.
//!
//! Stages read and write artifacts on disk (see `../shared/design.md`): `generate` writes
//! synthetic corpora with a `teacher`; `artifact` is the record layer every stage shares.
//! `cli` is the command-line front door; `main.rs` only calls it.

pub mod artifact;
pub mod cli;
pub mod generate;
pub mod sandbox;
pub mod teacher;

//! The recipe runner: `phigen train --recipe R` runs a whole recipe (generate → clean →
//! tokenize → train → evals) as a graph of named steps.
//!
//! Reads: a whole-run recipe ([`recipe`]). Writes, under the run directory (`out`, default
//! `runs/NAME`): `steps/NAME.json` (one [`manifest::StepManifest`] per finished step),
//! `data/NAME-ID/` (each data step's output), `train-ID/` (checkpoints, metrics),
//! `eval/NAME-ID/` (reports), `lineage.json` in each of those, `recipe.toml` and
//! `scoreboard.md`. A step's directory is named by its id, so a changed setting writes a new
//! directory next to the old one and nothing finished is overwritten.

pub mod cluster;
pub mod lineage;
pub mod manifest;
pub mod merge;
pub mod plan;
pub mod recipe;
pub mod run;

pub use plan::{plan, Plan};
pub use recipe::Pipeline;
pub use run::{run, Event, RunOptions, RunOutcome};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Recipe(#[from] recipe::PipelineRecipeError),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error("{0}")]
    Usage(String),
    #[error("paid teacher steps without a budget: {}; add `max_cost = USD` to their teacher in the recipe, or pass --max-cost USD for the whole run", .0.join(", "))]
    NoBudget(Vec<String>),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    OutDir(#[from] crate::artifact::outdir::OutDirError),
    #[error(transparent)]
    Teacher(#[from] crate::teacher::TeacherError),
    #[error(transparent)]
    Generate(#[from] crate::generate::engine::GenerateError),
    #[error(transparent)]
    Filter(#[from] crate::classify::pipeline::PipelineError),
    #[error(transparent)]
    Dedup(#[from] crate::dedup::DedupError),
    #[error(transparent)]
    Array(#[from] crate::artifact::task::ArrayError),
    #[error(transparent)]
    Merge(#[from] crate::generate::merge::MergeError),
    #[error(transparent)]
    Tokenize(#[from] crate::tokenize::TokenizeError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Prefs(#[from] crate::generate::prefs::PrefsError),
}

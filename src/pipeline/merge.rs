//! `phigen merge DIR`: finishes a stage that ran as an array job ([`crate::artifact::task`]), by
//! what its tasks wrote: a tokenize array (its markers say so) gets its shards, a decontamination
//! array (task 0 wrote a contamination report) its combined report, and a generation array its
//! combined `stats.json`.

use std::path::Path;

use serde_json::Value;

use super::PipelineError;
use crate::artifact::task::Task;
use crate::dedup::decontaminate::{self, Report};
use crate::tokenize::{self, Meta};

/// What a merge wrote.
pub enum Merged {
    /// The tasks' shares of a generation: the combined `stats.json`.
    Generation { tasks: usize, stats: Value },
    /// `contamination.json` of the whole input.
    Decontamination(Report),
    /// The token shards' `meta.json` (written now, or already there).
    Tokenize(Meta),
}

/// Merges the array whose output directory is `dir`.
pub fn merge(dir: &Path) -> Result<Merged, PipelineError> {
    if tokenize::array::is_tokenize_array(dir) {
        let meta = match tokenize::array::merge(dir)? {
            tokenize::Outcome::Written(m) | tokenize::Outcome::UpToDate(m) => m,
        };
        return Ok(Merged::Tokenize(meta));
    }
    let first = Task { k: 0, n: 1 }.dir(dir);
    if first.join(decontaminate::REPORT_FILE).exists() {
        return Ok(Merged::Decontamination(decontaminate::merge(dir)?));
    }
    let merged = crate::generate::merge::merge(dir)?;
    Ok(Merged::Generation {
        tasks: merged.tasks,
        stats: merged.stats,
    })
}

//! Lineage: the chain of steps behind an artifact. Every step of a recipe run writes
//! `lineage.json` into its directory (a checkpoint's is in the training run directory above it):
//! the step's settings, the files it read with their content hashes, its numbers, and the same for
//! every step upstream of it, down to the seeds. `phigen lineage DIR` prints it as a tree.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::manifest::{FileFingerprint, StepManifest};
use super::plan::Plan;
use super::PipelineError;

pub const FILE: &str = "lineage.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    pub step: String,
    pub kind: String,
    pub id: String,
    pub dir: PathBuf,
    pub settings: Value,
    pub inputs: Vec<FileFingerprint>,
    pub summary: Value,
    pub upstream: Vec<Lineage>,
}

fn of_manifest(plan: &Plan, m: StepManifest) -> Result<Lineage, PipelineError> {
    let upstream = m
        .upstream
        .keys()
        .map(|name| upstream(plan, name))
        .collect::<Result<_, _>>()?;
    Ok(Lineage {
        step: m.step,
        kind: m.kind,
        id: m.id,
        dir: m.dir,
        settings: m.settings,
        inputs: m.inputs,
        summary: m.summary,
        upstream,
    })
}

/// The lineage of a finished upstream step, from its manifest.
fn upstream(plan: &Plan, name: &str) -> Result<Lineage, PipelineError> {
    let m = StepManifest::read(&plan.run_dir, name)?.ok_or_else(|| {
        PipelineError::Usage(format!(
            "step `{name}` has no manifest in {}: it must finish before the steps that read it",
            plan.run_dir.display()
        ))
    })?;
    of_manifest(plan, m)
}

/// Writes the lineage of a step that has just finished (its manifest `m`) into its directory.
pub fn write(plan: &Plan, m: &StepManifest) -> Result<(), PipelineError> {
    let path = m.dir.join(FILE);
    let lineage = of_manifest(plan, m.clone())?;
    crate::artifact::atomic::write_json(&path, &lineage)
        .map_err(|source| PipelineError::Io { path, source })
}

/// The lineage recorded for `dir`: its own `lineage.json` or the nearest one above it (a
/// checkpoint inside a training run).
pub fn find(dir: &Path) -> Result<(PathBuf, Lineage), PipelineError> {
    let start = dir.canonicalize().map_err(|source| PipelineError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for d in start.ancestors() {
        let path = d.join(FILE);
        if let Ok(bytes) = std::fs::read(&path) {
            let l = serde_json::from_slice(&bytes).map_err(|e| {
                PipelineError::Usage(format!(
                    "{}: not a phigen lineage file ({e})",
                    path.display()
                ))
            })?;
            return Ok((path, l));
        }
    }
    Err(PipelineError::Usage(format!(
        "{}: no {FILE} here or above; lineage is recorded by `phigen train --recipe` runs with data steps",
        dir.display()
    )))
}

/// The lineage as an indented tree: each step with its kind, id, directory, key numbers and
/// outside inputs.
pub fn render(l: &Lineage) -> String {
    let mut out = String::new();
    render_into(l, "", true, true, &mut out);
    out
}

fn render_into(l: &Lineage, prefix: &str, last: bool, root: bool, out: &mut String) {
    let (branch, child) = match (root, last) {
        (true, _) => ("", ""),
        (false, true) => ("└─ ", "   "),
        (false, false) => ("├─ ", "│  "),
    };
    let numbers: Vec<String> = l
        .summary
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.is_number() || v.is_string())
        .map(|(k, v)| {
            format!(
                "{k} {}",
                v.as_str().map_or_else(|| v.to_string(), str::to_string)
            )
        })
        .collect();
    out.push_str(&format!(
        "{prefix}{branch}{} ({}, id {}) {}\n",
        l.step,
        l.kind,
        l.id,
        l.dir.display()
    ));
    let inner = format!("{prefix}{child}");
    if !numbers.is_empty() {
        out.push_str(&format!("{inner}   {}\n", numbers.join(", ")));
    }
    for f in &l.inputs {
        out.push_str(&format!(
            "{inner}   reads {} ({} bytes, blake3 {})\n",
            f.path.display(),
            f.bytes,
            &f.blake3[..16.min(f.blake3.len())]
        ));
    }
    for (i, u) in l.upstream.iter().enumerate() {
        render_into(u, &inner, i + 1 == l.upstream.len(), false, out);
    }
}

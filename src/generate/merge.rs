//! `phigen merge DIR`: the N tasks of a sharded generation (`--shard K/N`, or a Slurm / Kubernetes
//! array) as one corpus.
//!
//! Each task wrote its records below `DIR/tasks/NNNNN` and, last, its marker
//! `DIR/completions/NNNNN` with its stats ([`crate::artifact::task`]). The merge checks that all N
//! markers are there (naming the missing task ids otherwise), that every task ran with the same
//! manifest (template, model, sampling, seed), and writes `DIR/stats.json`: the tasks' counts
//! summed, the keep and drop rates over all of them, and one line per task. The records stay
//! where the tasks wrote them; every later stage reads `DIR` as a tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::artifact::atomic;
use crate::artifact::outdir::{DirLock, OutDirError};
use crate::artifact::task::{self, ArrayError, Marker, Task};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Array(#[from] ArrayError),
    #[error("{}: `{field}` is {found} there but {expected} in task 0's manifest: the tasks ran with different settings, so their records are not one corpus; rerun that task with task 0's flags", path.display())]
    Differs {
        path: PathBuf,
        field: String,
        found: String,
        expected: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not JSON ({reason}); was it written by phigen?", path.display())]
    Json { path: PathBuf, reason: String },
    #[error(transparent)]
    OutDir(#[from] OutDirError),
}

/// What [`merge`] wrote.
#[derive(Debug)]
pub struct Merged {
    pub tasks: usize,
    pub stats: Value,
}

/// Checks the tasks of the sharded output `dir` and writes its combined `stats.json`.
pub fn merge(dir: &Path) -> Result<Merged, MergeError> {
    let markers = task::all_finished(dir)?;
    let n = markers.len();
    same_manifests(dir, n)?;
    let _lock = DirLock::exclusive(dir)?;
    let stats = combine(&markers);
    let path = dir.join("stats.json");
    atomic::write_json(&path, &stats).map_err(|source| MergeError::Io { path, source })?;
    Ok(Merged { tasks: n, stats })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, MergeError> {
    let bytes = std::fs::read(path).map_err(|source| MergeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| MergeError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Every task's manifest equals task 0's, field by field.
fn same_manifests(dir: &Path, n: usize) -> Result<(), MergeError> {
    let manifest = |k| Task { k, n }.dir(dir).join("manifest.json");
    let first: Map<String, Value> = read_json(&manifest(0))?;
    for k in 1..n {
        let path = manifest(k);
        let other: Map<String, Value> = read_json(&path)?;
        let fields = first.keys().chain(other.keys());
        if let Some(field) = fields.into_iter().find(|f| first.get(*f) != other.get(*f)) {
            let show =
                |m: &Map<String, Value>| m.get(field).map_or("absent".into(), |v| v.to_string());
            return Err(MergeError::Differs {
                field: field.clone(),
                found: show(&other),
                expected: show(&first),
                path,
            });
        }
    }
    Ok(())
}

/// The tasks' stats as one run's: counts summed, wall time the longest task's, rates recomputed.
fn combine(markers: &[Marker]) -> Value {
    let stats: Vec<&Value> = markers.iter().map(|m| &m.stats).collect();
    let sum = |get: &dyn Fn(&Value) -> &Value| -> u64 {
        stats.iter().map(|s| get(s).as_u64().unwrap_or(0)).sum()
    };
    let records = sum(&|s| &s["records"]);
    let checked = sum(&|s| &s["answers_checked"]);
    let mut rejects: BTreeMap<String, u64> = BTreeMap::new();
    for s in &stats {
        for (reason, count) in s["rejects_total"].as_object().into_iter().flatten() {
            *rejects.entry(reason.clone()).or_default() += count.as_u64().unwrap_or(0);
        }
    }
    let share = |c: u64| {
        if checked == 0 {
            0.0
        } else {
            c as f64 / checked as f64
        }
    };
    let drop_rates: BTreeMap<&String, f64> = rejects
        .iter()
        .filter(|(r, _)| r.as_str() != "request_failed")
        .map(|(r, &c)| (r, share(c)))
        .collect();
    let costs: Vec<f64> = stats
        .iter()
        .filter_map(|s| s["run"]["cost_usd"].as_f64())
        .collect();
    let wall = stats
        .iter()
        .filter_map(|s| s["run"]["wall_seconds"].as_f64())
        .fold(0.0, f64::max);
    let per_task: Vec<Value> = markers
        .iter()
        .map(|m| {
            json!({"task": m.task.k, "records": m.stats["records"],
                "keep_rate": m.stats["keep_rate"], "wall_seconds": m.stats["run"]["wall_seconds"]})
        })
        .collect();
    json!({
        "kind": stats[0]["kind"],
        "model": stats[0]["model"],
        "tasks": markers.len(),
        "requested": sum(&|s| &s["requested"]),
        "records": records,
        "complete": stats.iter().all(|s| s["complete"] == true),
        "answers_checked": checked,
        "keep_rate": share(records),
        "drop_rates": drop_rates,
        "rejects_total": rejects,
        "run": {
            "wall_seconds": wall,
            "written": sum(&|s| &s["run"]["written"]),
            "prompt_tokens": sum(&|s| &s["run"]["prompt_tokens"]),
            "completion_tokens": sum(&|s| &s["run"]["completion_tokens"]),
            "given_up_slots": sum(&|s| &s["run"]["given_up_slots"]),
            "cost_usd": (!costs.is_empty()).then(|| costs.iter().sum::<f64>()),
        },
        "per_task": per_task,
        "corpus": format!("per task, in {}/NNNNN/stats.json", "tasks"),
    })
}

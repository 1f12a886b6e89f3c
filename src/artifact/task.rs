//! One task of an array job, the contract every data stage shares for running on a cluster.
//!
//! A stage run as N tasks (a Slurm job array, a Kubernetes Indexed Job, or N processes by hand)
//! learns which task it is from `--shard K/N`, or from the environment the scheduler sets:
//! `SLURM_ARRAY_TASK_ID` (less `SLURM_ARRAY_TASK_MIN`) with `SLURM_ARRAY_TASK_COUNT` or
//! `--shards N`, or Kubernetes' `JOB_COMPLETION_INDEX` with `--shards N`. Task K takes the units of
//! work (input files, generation slots…) whose index i has i mod N = K, so the N tasks together
//! do exactly what one run does.
//!
//! Each task writes its outputs, then, last, its completion marker `completions/NNNNN` (the
//! layout datatrove uses), holding the task's stats. A relaunched array skips the tasks whose
//! marker exists; the merge checks that all N markers are there and names the missing ones.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::atomic;

/// Where the markers of a sharded output live, below its directory.
pub const COMPLETIONS: &str = "completions";
/// The most tasks one array may have (Slurm's default MaxArraySize is 1001; Kubernetes' limit
/// on completions is 100,000).
pub const MAX_TASKS: usize = 100_000;

/// Task `k` of `n` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Task {
    pub k: usize,
    pub n: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskError {
    #[error("{flag}: expected K/N with 0 <= K < N <= {MAX_TASKS} (e.g. 3/8), found `{found}`")]
    Shard { flag: &'static str, found: String },
    #[error("{var}={found}: expected a whole number (set by the scheduler; unset it, or pass --shard K/N)")]
    Env { var: &'static str, found: String },
    #[error("{var}={index} is task {k}, but the array has {n} tasks (--shards or SLURM_ARRAY_TASK_COUNT): make them agree")]
    OutOfRange {
        var: &'static str,
        index: usize,
        k: usize,
        n: usize,
    },
    #[error("{var} is set, but the number of tasks is not known: pass --shards N (the size of the array)")]
    NoCount { var: &'static str },
    #[error("--shards {n}: expected 1 to {MAX_TASKS} tasks")]
    Count { n: usize },
}

impl std::str::FromStr for Task {
    type Err = TaskError;
    fn from_str(s: &str) -> Result<Task, TaskError> {
        let bad = || TaskError::Shard {
            flag: "--shard",
            found: s.to_string(),
        };
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        match (k.trim().parse(), n.trim().parse()) {
            (Ok(k), Ok(n)) if k < n && n <= MAX_TASKS => Ok(Task { k, n }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

impl Task {
    /// The task this process is: `--shard` where given, else the scheduler's environment (read
    /// through `env`, so tests need not set process variables); `None` for a whole, unsharded run.
    pub fn resolve(
        shard: Option<Task>,
        shards: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Task>, TaskError> {
        if let Some(n) = shards {
            if n == 0 || n > MAX_TASKS {
                return Err(TaskError::Count { n });
            }
        }
        if shard.is_some() {
            return Ok(shard);
        }
        let number = |var: &'static str| -> Result<Option<usize>, TaskError> {
            env(var)
                .map(|v| {
                    v.trim().parse().map_err(|_| TaskError::Env {
                        var,
                        found: v.clone(),
                    })
                })
                .transpose()
        };
        let (var, index, count) = if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let count = shards.or(number("SLURM_ARRAY_TASK_COUNT")?);
            ("SLURM_ARRAY_TASK_ID", id.saturating_sub(min), count)
        } else if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            ("JOB_COMPLETION_INDEX", index, shards)
        } else {
            return Ok(None);
        };
        let n = count.ok_or(TaskError::NoCount { var })?;
        if index >= n {
            return Err(TaskError::OutOfRange {
                var,
                index,
                k: index,
                n,
            });
        }
        Ok(Some(Task { k: index, n }))
    }

    /// [`Task::resolve`] from the process environment.
    pub fn from_env(shard: Option<Task>, shards: Option<usize>) -> Result<Option<Task>, TaskError> {
        Task::resolve(shard, shards, |v| std::env::var(v).ok())
    }

    /// Whether unit of work `i` is this task's.
    pub fn owns(&self, i: usize) -> bool {
        i % self.n == self.k
    }

    /// The directory task output goes to below a sharded output `dir`: `tasks/NNNNN`.
    pub fn dir(&self, dir: &Path) -> PathBuf {
        dir.join("tasks").join(format!("{:05}", self.k))
    }

    /// This task's completion marker below `dir`.
    pub fn marker(&self, dir: &Path) -> PathBuf {
        dir.join(COMPLETIONS).join(format!("{:05}", self.k))
    }

    /// Whether this task finished (its marker exists, and was written for an array of this size).
    pub fn is_done(&self, dir: &Path) -> bool {
        read_marker(&self.marker(dir)).is_some_and(|m| m.task == *self)
    }

    /// Writes the marker, last, after every output of the task is in place.
    pub fn mark_done(&self, dir: &Path, stats: Value) -> std::io::Result<()> {
        let path = self.marker(dir);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let marker = Marker { task: *self, stats };
        let bytes = serde_json::to_vec_pretty(&marker).expect("markers serialize");
        atomic::write_bytes(&path, &bytes)
    }
}

/// What a completion marker holds: which task of how many, and its stats.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    pub task: Task,
    pub stats: Value,
}

fn read_marker(path: &Path) -> Option<Marker> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The markers of all `n` tasks below `dir`, in task order, or the ids of the tasks that have
/// none (or one from an array of another size).
pub fn markers(dir: &Path, n: usize) -> Result<Vec<Marker>, Vec<usize>> {
    let mut found = Vec::with_capacity(n);
    let mut missing = Vec::new();
    for k in 0..n {
        match read_marker(&Task { k, n }.marker(dir)) {
            Some(m) if m.task == (Task { k, n }) => found.push(m),
            _ => missing.push(k),
        }
    }
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(missing)
    }
}

/// Why the tasks of an array cannot be merged yet.
#[derive(Debug, thiserror::Error)]
pub enum ArrayError {
    #[error("{}: no task markers in {COMPLETIONS}/: is this the --out of a sharded run (--shard K/N or an array job)? A whole run needs no merge", dir.display())]
    NoTasks { dir: PathBuf },
    #[error("{}: markers of arrays of different sizes ({sizes:?} tasks) in {COMPLETIONS}/: an array was relaunched with another --shards; finish it with the size the outputs were made with, or start again in a new directory", dir.display())]
    MixedSizes { dir: PathBuf, sizes: Vec<usize> },
    #[error("{}: {missing_count} of {n} tasks have not finished (no marker): tasks {missing}; relaunch them (e.g. `sbatch --array={missing} …`, or `--shard K/{n}`), then merge again", dir.display())]
    Missing {
        dir: PathBuf,
        n: usize,
        missing_count: usize,
        missing: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a completion marker ({reason}); was it written by phigen?", path.display())]
    BadMarker { path: PathBuf, reason: String },
}

/// The markers of every task of the array whose output is `dir`, in task order: N is read off the
/// markers present (all must agree), and every task of 0..N must have one.
pub fn all_finished(dir: &Path) -> Result<Vec<Marker>, ArrayError> {
    let completions = dir.join(COMPLETIONS);
    let io = |source| ArrayError::Io {
        path: completions.clone(),
        source,
    };
    let entries = match std::fs::read_dir(&completions) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ArrayError::NoTasks {
                dir: dir.to_path_buf(),
            })
        }
        other => other.map_err(io)?,
    };
    let mut sizes = Vec::new();
    for entry in entries {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some() {
            continue; // the temp file of a marker being written
        }
        let bytes = std::fs::read(&path).map_err(|source| ArrayError::Io {
            path: path.clone(),
            source,
        })?;
        let marker: Marker = serde_json::from_slice(&bytes).map_err(|e| ArrayError::BadMarker {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if !sizes.contains(&marker.task.n) {
            sizes.push(marker.task.n);
        }
    }
    sizes.sort_unstable();
    let n = match sizes[..] {
        [] => {
            return Err(ArrayError::NoTasks {
                dir: dir.to_path_buf(),
            })
        }
        [n] => n,
        _ => {
            return Err(ArrayError::MixedSizes {
                dir: dir.to_path_buf(),
                sizes,
            })
        }
    };
    markers(dir, n).map_err(|missing| ArrayError::Missing {
        dir: dir.to_path_buf(),
        n,
        missing_count: missing.len(),
        missing: id_list(&missing),
    })
}

/// Task ids as a short list for an error: `0, 3, 5-9`.
pub fn id_list(ids: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", ids[i], ids[j])
        } else {
            ids[i].to_string()
        });
        i = j + 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// The flag wins; then Slurm (id less min, count from the array or --shards); then
    /// Kubernetes (index with --shards); nothing set is an unsharded run. The values are what
    /// `sbatch --array=4-7` and an Indexed Job with completions 5 set.
    #[test]
    fn the_task_comes_from_the_flag_or_the_scheduler() {
        let t = |k, n| Some(Task { k, n });
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "6"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(Task::resolve("1/3".parse().ok(), None, &slurm), Ok(t(1, 3)));
        assert_eq!(Task::resolve(None, None, &slurm), Ok(t(2, 4)));
        let k8s = env(&[("JOB_COMPLETION_INDEX", "4")]);
        assert_eq!(Task::resolve(None, Some(5), &k8s), Ok(t(4, 5)));
        assert_eq!(
            Task::resolve(None, None, &k8s),
            Err(TaskError::NoCount {
                var: "JOB_COMPLETION_INDEX"
            })
        );
        assert!(matches!(
            Task::resolve(None, Some(4), &k8s),
            Err(TaskError::OutOfRange { index: 4, n: 4, .. })
        ));
        assert_eq!(Task::resolve(None, None, env(&[])), Ok(None));
        assert!(matches!(
            Task::resolve(None, None, env(&[("SLURM_ARRAY_TASK_ID", "x")])),
            Err(TaskError::Env { .. })
        ));
        for bad in ["3/3", "1", "a/2", "0/0", "0/100001"] {
            assert!(bad.parse::<Task>().is_err(), "{bad}");
        }
    }

    /// Tasks split units round-robin: every unit is owned by exactly one of the N.
    #[test]
    fn tasks_partition_the_units() {
        for n in [1, 3, 7] {
            for i in 0..50 {
                let owners = (0..n).filter(|&k| Task { k, n }.owns(i)).count();
                assert_eq!(owners, 1);
            }
        }
    }

    /// Markers are written last and read back; missing ones (and one from an array of another
    /// size) are named.
    #[test]
    fn markers_name_the_missing_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let n = 7;
        for k in [0, 1, 2, 5] {
            Task { k, n }
                .mark_done(dir.path(), serde_json::json!({"records": k}))
                .unwrap();
        }
        // Task 6 finished in an earlier array of 8: not this array's.
        Task { k: 6, n: 8 }
            .mark_done(dir.path(), Value::Null)
            .unwrap();
        assert!(Task { k: 5, n }.is_done(dir.path()));
        assert!(!Task { k: 6, n }.is_done(dir.path()));
        let missing = markers(dir.path(), n).unwrap_err();
        assert_eq!(missing, [3, 4, 6]);
        assert_eq!(id_list(&missing), "3-4, 6");
        for k in [3, 4, 6] {
            Task { k, n }.mark_done(dir.path(), Value::Null).unwrap();
        }
        let all = markers(dir.path(), n).unwrap();
        assert_eq!(all[2].stats, serde_json::json!({"records": 2}));
    }
}

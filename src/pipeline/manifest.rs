//! One manifest format and one "done / stale / to do" rule for every step of a recipe run.
//!
//! A step's id is the hash of what decides its output: its kind, its settings, the content
//! hashes of the files it reads from outside the run and the ids of the steps it reads. The
//! runner writes `RUN/steps/NAME.json` (a [`StepManifest`]) when, and only when, the step has
//! finished; the step is done when that manifest's id equals the id computed now. Content hashes
//! are reused from the last manifest when a file's size and modification time are unchanged, so
//! checking a done step reads no data; a changed file is hashed again and decides.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::artifact::atomic;
use crate::artifact::outdir::is_control_file;

const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a phigen step manifest ({reason}); remove it to run the step again")]
    Bad { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file a step read from outside the run, as it was when the step ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFingerprint {
    pub path: PathBuf,
    pub bytes: u64,
    pub modified_unix_ns: u128,
    pub blake3: String,
}

/// `RUN/steps/NAME.json`: what a finished step was made from and what it made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepManifest {
    pub format: u32,
    pub step: String,
    pub kind: String,
    pub id: String,
    /// Where its output is.
    pub dir: PathBuf,
    pub settings: Value,
    pub inputs: Vec<FileFingerprint>,
    /// Upstream step name → its id when this step ran.
    pub upstream: BTreeMap<String, String>,
    pub phigen_version: String,
    pub finished_unix: u64,
    /// The step's own numbers (records, tokens, cost, …) for plans and lineage.
    pub summary: Value,
}

impl StepManifest {
    pub fn path(run: &Path, step: &str) -> PathBuf {
        run.join("steps").join(format!("{step}.json"))
    }

    pub fn read(run: &Path, step: &str) -> Result<Option<StepManifest>, ManifestError> {
        let path = Self::path(run, step);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ManifestError::Bad {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub fn write(&self, run: &Path) -> Result<(), ManifestError> {
        let path = Self::path(run, &self.step);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        atomic::write_json(&path, self).map_err(io_err(&path))
    }

    pub fn new(
        step: &str,
        kind: &str,
        identity: &Identity,
        dir: &Path,
        summary: Value,
    ) -> StepManifest {
        StepManifest {
            format: FORMAT,
            step: step.into(),
            kind: kind.into(),
            id: identity.id.clone(),
            dir: dir.to_path_buf(),
            settings: identity.settings.clone(),
            inputs: identity.inputs.clone(),
            upstream: identity.upstream.clone(),
            phigen_version: env!("CARGO_PKG_VERSION").into(),
            finished_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            summary,
        }
    }
}

/// What decides a step's output, and its id.
#[derive(Debug, Clone)]
pub struct Identity {
    pub settings: Value,
    pub inputs: Vec<FileFingerprint>,
    pub upstream: BTreeMap<String, String>,
    pub id: String,
}

impl Identity {
    pub fn new(
        kind: &str,
        settings: Value,
        inputs: Vec<FileFingerprint>,
        upstream: BTreeMap<String, String>,
    ) -> Identity {
        let id = hash_id(&serde_json::json!({
            "kind": kind,
            "settings": &settings,
            "inputs": inputs.iter().map(|f| (&f.path, &f.blake3)).collect::<Vec<_>>(),
            "upstream": &upstream,
        }));
        Identity {
            settings,
            inputs,
            upstream,
            id,
        }
    }
}

/// 16 hex digits of the blake3 of `v`'s JSON (serde_json writes maps with sorted keys).
pub fn hash_id(v: &Value) -> String {
    blake3::hash(v.to_string().as_bytes()).to_hex()[..16].to_string()
}

/// Fingerprints of every regular file under `paths` (files, or directories walked in name order;
/// phigen's control files skipped), their hashes reused from `known` when size and modification
/// time match.
pub fn fingerprint(
    paths: &[PathBuf],
    known: &[FileFingerprint],
) -> Result<Vec<FileFingerprint>, ManifestError> {
    let known: BTreeMap<&Path, &FileFingerprint> =
        known.iter().map(|f| (f.path.as_path(), f)).collect();
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    files
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
            let modified_unix_ns = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let bytes = meta.len();
            if let Some(k) = known
                .get(path.as_path())
                .filter(|k| k.bytes == bytes && k.modified_unix_ns == modified_unix_ns)
            {
                return Ok((*k).clone());
            }
            let mut hasher = blake3::Hasher::new();
            let file = std::fs::File::open(&path).map_err(io_err(&path))?;
            hasher.update_reader(file).map_err(io_err(&path))?;
            Ok(FileFingerprint {
                blake3: hasher.finalize().to_hex().to_string(),
                path,
                bytes,
                modified_unix_ns,
            })
        })
        .collect()
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    if !meta.is_dir() {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io_err(path))?
        .map(|e| e.map(|e| e.path()).map_err(io_err(path)))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for e in entries {
        let name = e.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if is_control_file(name) {
            continue;
        }
        // Links are followed only at the top: a tree's links could lead anywhere, or in a loop.
        if std::fs::symlink_metadata(&e).is_ok_and(|m| m.file_type().is_symlink()) {
            continue;
        }
        collect_files(&e, out)?;
    }
    Ok(())
}

/// Where a step stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Finished with these settings and inputs: skipped.
    Done,
    /// Finished before with other settings or inputs: runs again (into a new directory).
    Stale,
    /// Started and not finished (killed, stopped, over budget): continues where it stopped.
    Partial,
    /// Never run.
    ToDo,
}

impl Status {
    pub fn of(manifest: Option<&StepManifest>, id: &str, dir: &Path) -> Status {
        match manifest {
            Some(m) if m.id == id => Status::Done,
            _ if dir.exists() => Status::Partial,
            Some(_) => Status::Stale,
            None => Status::ToDo,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Stale => "stale",
            Status::Partial => "partial",
            Status::ToDo => "to do",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id changes with settings, inputs and upstream ids, and with nothing else.
    #[test]
    fn the_id_follows_settings_inputs_and_upstream() {
        let f = |b: &str| FileFingerprint {
            path: "a.txt".into(),
            bytes: 1,
            modified_unix_ns: 7,
            blake3: b.into(),
        };
        let up = |id: &str| BTreeMap::from([("s".to_string(), id.to_string())]);
        let base = Identity::new(
            "dedup",
            serde_json::json!({"bands": 14}),
            vec![f("x")],
            up("1"),
        );
        let same = Identity::new(
            "dedup",
            serde_json::json!({"bands": 14}),
            vec![f("x")],
            up("1"),
        );
        assert_eq!(base.id, same.id);
        let mut touched = f("x");
        touched.modified_unix_ns = 8; // a touch without a change of content keeps the id
        assert_eq!(
            base.id,
            Identity::new(
                "dedup",
                serde_json::json!({"bands": 14}),
                vec![touched],
                up("1")
            )
            .id
        );
        for other in [
            Identity::new(
                "dedup",
                serde_json::json!({"bands": 15}),
                vec![f("x")],
                up("1"),
            ),
            Identity::new(
                "dedup",
                serde_json::json!({"bands": 14}),
                vec![f("y")],
                up("1"),
            ),
            Identity::new(
                "dedup",
                serde_json::json!({"bands": 14}),
                vec![f("x")],
                up("2"),
            ),
            Identity::new(
                "tokenize",
                serde_json::json!({"bands": 14}),
                vec![f("x")],
                up("1"),
            ),
        ] {
            assert_ne!(base.id, other.id);
        }
    }

    /// A file's hash is reused while its size and time are unchanged, and recomputed otherwise:
    /// the recorded hash is deliberately wrong, so reuse is visible.
    #[test]
    fn fingerprints_reuse_hashes_only_for_unchanged_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        std::fs::write(&a, "hello").unwrap();
        std::fs::write(dir.path().join(".phigen.lock"), "").unwrap();
        let first = fingerprint(&[dir.path().to_path_buf()], &[]).unwrap();
        assert_eq!(first.len(), 1, "control files are not inputs");
        assert_eq!(first[0].blake3, blake3::hash(b"hello").to_hex().to_string());
        let mut recorded = first.clone();
        recorded[0].blake3 = "recorded".into();
        let again = fingerprint(&[dir.path().to_path_buf()], &recorded).unwrap();
        assert_eq!(again[0].blake3, "recorded");
        std::fs::write(&a, "hello, world").unwrap();
        let changed = fingerprint(&[dir.path().to_path_buf()], &recorded).unwrap();
        assert_eq!(
            changed[0].blake3,
            blake3::hash(b"hello, world").to_hex().to_string()
        );
    }
}

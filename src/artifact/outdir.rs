//! An output directory as a stage owns it: one run at a time ([`DirLock`]), never inside, equal to
//! or above one of its inputs ([`check_apart`]), and only files phigen wrote there are replaced
//! ([`Written`]).
//!
//! The control files live in the directory itself and start with `.phigen`; no stage reads them
//! as data ([`is_control_file`]).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};

/// The lock of a whole run; it holds the PID of the (last) holder.
pub const LOCK_FILE: &str = ".phigen.lock";
/// The files phigen wrote into the directory, one JSON string (a relative path) a line.
pub const WRITTEN_FILE: &str = ".phigen.written";

#[derive(Debug, thiserror::Error)]
pub enum OutDirError {
    #[error("another phigen run ({}) is writing {dir}; wait for it or use another --out", holder(*.pid))]
    Busy { dir: PathBuf, pid: Option<u32> },
    #[error("--out {out} is {relation} --input {input}: the run would read its own output or overwrite its input; choose an --out that is neither an input nor inside or above one")]
    Overlap {
        out: PathBuf,
        input: PathBuf,
        relation: &'static str,
    },
    #[error("{path} is already there and was not written by phigen ({ledger} does not list it); move it away or use another --out")]
    NotOurs { path: PathBuf, ledger: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn holder(pid: Option<u32>) -> String {
    pid.map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutDirError + '_ {
    move |source| OutDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// True for the files this module keeps in an output directory: they are never data.
pub fn is_control_file(name: &str) -> bool {
    name.starts_with(".phigen")
}

/// An exclusive right to write an output directory, held until dropped or the process dies
/// (`flock` locks die with their file descriptions; std opens files close-on-exec, so programs a
/// stage starts do not inherit it).
#[derive(Debug)]
pub struct DirLock {
    _run: File,
    _slice: Option<File>,
}

impl DirLock {
    /// Creates `dir` if needed and locks it for this run alone; a second run fails at once.
    pub fn exclusive(dir: &Path) -> Result<DirLock, OutDirError> {
        Ok(DirLock {
            _run: lock(dir, LOCK_FILE, libc::LOCK_EX)?,
            _slice: None,
        })
    }

    /// For `--shard K/N` array tasks that write disjoint parts of one directory side by side: a
    /// shared lock on the directory (so a whole run excludes them all) and an exclusive one on
    /// slice K of N (so the same task cannot run twice).
    pub fn slice(dir: &Path, k: usize, n: usize) -> Result<DirLock, OutDirError> {
        let run = lock(dir, LOCK_FILE, libc::LOCK_SH)?;
        let slice = lock(dir, &format!(".phigen-{k}-of-{n}.lock"), libc::LOCK_EX)?;
        Ok(DirLock {
            _run: run,
            _slice: Some(slice),
        })
    }
}

fn lock(dir: &Path, name: &str, op: libc::c_int) -> Result<File, OutDirError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    // A lock just released can look held for a moment: a child another thread is starting holds
    // copies of this process's descriptors between its fork and its exec. A real holder is
    // reported after this grace period, which is short next to any run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(250);
    loop {
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_err(&path)(err));
        }
        if std::time::Instant::now() >= deadline {
            return Err(OutDirError::Busy {
                dir: dir.to_path_buf(),
                pid: read_pid(&path),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Written over the old PID, then cut to length: a reader never sees an empty file.
    let pid = format!("{}\n", std::process::id());
    file.write_all_at(pid.as_bytes(), 0)
        .and_then(|()| file.set_len(pid.len() as u64))
        .map_err(io_err(&path))?;
    Ok(file)
}

/// The first line of a lock file, as a PID; a holder that has not written it yet gets a moment.
fn read_pid(path: &Path) -> Option<u32> {
    for _ in 0..5 {
        let mut text = String::new();
        if let Ok(mut f) = File::open(path) {
            let _ = f.read_to_string(&mut text);
        }
        if let Some(pid) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
            return Some(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

/// `path` with symlinks resolved, for a path that may not exist yet: its deepest existing ancestor
/// canonicalized, then the rest of it.
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let parts: Vec<Component> = absolute.components().collect();
    let mut n = parts.len();
    while n > 1 && !parts[..n].iter().collect::<PathBuf>().exists() {
        n -= 1;
    }
    let mut out = parts[..n].iter().collect::<PathBuf>().canonicalize()?;
    for part in &parts[n..] {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            _ => {}
        }
    }
    Ok(out)
}

/// Refuses an output directory that is an input, lies inside one, or holds one: the run would read
/// back what it writes or write over what it reads. Paths are compared with symlinks resolved.
pub fn check_apart(out: &Path, inputs: &[PathBuf]) -> Result<(), OutDirError> {
    let resolved_out = resolve(out).map_err(io_err(out))?;
    for input in inputs {
        let Ok(resolved_in) = resolve(input) else {
            continue; // a missing input is reported by the reader, naming it
        };
        let relation = if resolved_out == resolved_in {
            "the same directory as"
        } else if resolved_out.starts_with(&resolved_in) {
            "inside"
        } else if resolved_in.starts_with(&resolved_out) {
            "above (a parent of)"
        } else {
            continue;
        };
        return Err(OutDirError::Overlap {
            out: out.to_path_buf(),
            input: input.clone(),
            relation,
        });
    }
    Ok(())
}

/// The files phigen wrote into an output directory (paths relative to it), as
/// [`WRITTEN_FILE`] lists them. A stage claims a path before it creates the file, so even a run
/// killed mid-way leaves its files listed; a path that is there but not listed belongs to someone
/// else and is never replaced or removed.
pub struct Written {
    dir: PathBuf,
    ledger: PathBuf,
    listed: BTreeSet<PathBuf>,
    file: File,
}

impl Written {
    /// Opens the list of `dir` (which the caller has locked).
    pub fn open(dir: &Path, _lock: &DirLock) -> Result<Written, OutDirError> {
        let ledger = dir.join(WRITTEN_FILE);
        let mut listed = BTreeSet::new();
        if let Ok(f) = File::open(&ledger) {
            for line in BufReader::new(f).lines() {
                let line = line.map_err(io_err(&ledger))?;
                // A torn last line (a crash mid-append) names nothing that was created.
                if let Ok(rel) = serde_json::from_str::<PathBuf>(&line) {
                    listed.insert(rel);
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&ledger)
            .map_err(io_err(&ledger))?;
        Ok(Written {
            dir: dir.to_path_buf(),
            ledger,
            listed,
            file,
        })
    }

    pub fn contains(&self, rel: &Path) -> bool {
        self.listed.contains(rel)
    }

    /// Every listed path.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.listed.iter().map(PathBuf::as_path)
    }

    /// Makes `rel` (relative to the directory) this stage's to write: fails if a file is there
    /// that phigen did not write, else lists it (durably) before the caller creates it.
    pub fn claim(&mut self, rel: &Path) -> Result<(), OutDirError> {
        if self.listed.contains(rel) {
            return Ok(());
        }
        let path = self.dir.join(rel);
        if fs::symlink_metadata(&path).is_ok() {
            return Err(OutDirError::NotOurs {
                path,
                ledger: self.ledger.clone(),
            });
        }
        self.adopt(rel)
    }

    /// Lists `rel` as phigen's without checking: for files a stage's own manifest proves it wrote
    /// (directories made before this list existed).
    pub fn adopt(&mut self, rel: &Path) -> Result<(), OutDirError> {
        let mut line = serde_json::to_string(rel).map_err(|e| {
            io_err(&self.ledger)(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(io_err(&self.ledger))?;
        self.listed.insert(rel.to_path_buf());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flock locks belong to open file descriptions, so a second open in this same process
    /// conflicts exactly as a second process would; the error names the directory and this PID
    /// (the holder wrote it), and dropping the guard frees the directory.
    #[test]
    fn a_second_lock_fails_at_once_naming_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let first = DirLock::exclusive(&out).unwrap();
        let started = std::time::Instant::now();
        let err = DirLock::exclusive(&out).unwrap_err().to_string();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let me = std::process::id();
        assert!(err.contains(&format!("pid {me}")), "{err}");
        assert!(err.contains(&out.display().to_string()), "{err}");
        assert!(err.contains("another --out"), "{err}");
        // Array tasks: slices share the directory, but not with a whole run nor with themselves.
        assert!(DirLock::slice(&out, 0, 2).is_err());
        drop(first);
        let a = DirLock::slice(&out, 0, 2).unwrap();
        let _b = DirLock::slice(&out, 1, 2).unwrap();
        assert!(DirLock::slice(&out, 0, 2).is_err());
        assert!(DirLock::exclusive(&out).is_err());
        drop((a, _b));
        DirLock::exclusive(&out).unwrap();
    }

    #[test]
    fn outputs_equal_to_inside_or_above_an_input_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p");
        let corpus = p.join("corpus");
        std::fs::create_dir_all(&corpus).unwrap();
        let inputs = [corpus.clone()];
        for (out, relation) in [
            (corpus.clone(), "the same directory as"),
            (corpus.join("sub/new"), "inside"),
            (p.clone(), "above"),
            (p.join("x/../corpus"), "the same directory as"),
        ] {
            let err = check_apart(&out, &inputs).unwrap_err().to_string();
            assert!(err.contains(relation), "{out:?}: {err}");
        }
        // Through a symlink: the same directory under another name.
        std::os::unix::fs::symlink(&corpus, dir.path().join("alias")).unwrap();
        assert!(check_apart(&dir.path().join("alias"), &inputs).is_err());
        // Siblings and names that merely share a prefix are fine.
        check_apart(&p.join("clean"), &inputs).unwrap();
        check_apart(&p.join("corpus2"), &inputs).unwrap();
    }

    #[test]
    fn only_listed_paths_can_be_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::exclusive(dir.path()).unwrap();
        std::fs::write(dir.path().join("theirs.bin"), "x").unwrap();
        let mut w = Written::open(dir.path(), &lock).unwrap();
        let err = w.claim(Path::new("theirs.bin")).unwrap_err().to_string();
        assert!(
            err.contains("theirs.bin") && err.contains("not written by phigen"),
            "{err}"
        );
        w.claim(Path::new("ours.bin")).unwrap();
        std::fs::write(dir.path().join("ours.bin"), "y").unwrap();
        drop(w);
        let mut again = Written::open(dir.path(), &lock).unwrap();
        again.claim(Path::new("ours.bin")).unwrap();
        assert!(again.contains(Path::new("ours.bin")));
        assert!(!again.contains(Path::new("theirs.bin")));
    }
}

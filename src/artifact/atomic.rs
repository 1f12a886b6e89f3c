//! Whole-file writes that are either complete or absent: write a temp file in the same directory,
//! fsync it, rename it over the target, fsync the directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The temp name used while `path` is being written; a leftover one is garbage from a crash.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `path` atomically with whatever `fill` writes into the file.
pub fn write_with<T>(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<T>) -> io::Result<T> {
    let (staged, out) = stage_with(path, fill)?;
    staged.commit()?;
    Ok(out)
}

/// A complete, fsynced file under `path`'s temp name, not yet in place: [`Staged::commit`] renames
/// it over `path`; dropping it uncommitted removes it. For work done before it is known to be
/// wanted (a copy that a scan running meanwhile may turn out not to need).
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

/// Writes `path`'s temp file with whatever `fill` writes and fsyncs it.
pub fn stage_with<T>(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<T>,
) -> io::Result<(Staged, T)> {
    let staged = Staged {
        tmp: temp_path(path),
        path: path.to_path_buf(),
        committed: false,
    };
    let mut file = File::create(&staged.tmp)?;
    let out = fill(&mut file)?;
    file.flush()?;
    file.sync_all()?;
    Ok((staged, out))
}

impl Staged {
    pub fn commit(mut self) -> io::Result<()> {
        fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Makes the rename itself durable; not supported on every platform, hence best effort.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

pub fn write_bytes(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(path, |f| f.write_all(bytes))
}

pub fn write_json(path: &Path, value: &impl serde::Serialize) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_bytes(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_the_old_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stats.json");
        write_bytes(&p, b"old").unwrap();
        let err = write_with(&p, |f| {
            f.write_all(b"half")?;
            Err::<(), _>(io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }
}

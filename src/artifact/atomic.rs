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
    let tmp = temp_path(path);
    let mut file = File::create(&tmp)?;
    let out = fill(&mut file)?;
    file.flush()?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Makes the rename itself durable; not supported on every platform, hence best effort.
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(out)
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

//! The files of the input trees a stage reads: regular files only.
//!
//! A named input is followed wherever it points. Below it, a symlink is followed only while it
//! stays inside the input's tree (or with `--follow-symlinks`); FIFOs, devices and sockets are
//! never opened (reading one blocks or never ends). Each file passed over is counted by reason.
//! phigen's own control files ([`outdir::is_control_file`]) are not inputs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::outdir;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkOptions {
    /// Follow symlinks that lead out of the input tree (`--follow-symlinks`).
    pub follow_symlinks: bool,
}

/// Why an entry of an input tree is not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputSkip {
    /// A symlink to something outside the input tree (pass --follow-symlinks to read it).
    SymlinkOutside,
    /// A FIFO, socket or device, or a symlink to one.
    SpecialFile,
    /// A symlink to nothing.
    BrokenSymlink,
    /// A symlink to a directory that contains it.
    SymlinkCycle,
}

impl InputSkip {
    pub fn as_str(self) -> &'static str {
        match self {
            InputSkip::SymlinkOutside => "symlink_outside",
            InputSkip::SpecialFile => "special_file",
            InputSkip::BrokenSymlink => "broken_symlink",
            InputSkip::SymlinkCycle => "symlink_cycle",
        }
    }
}

/// A regular file of an input and its path below the input's parent directory (the input's own
/// name first; a named file: its name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    pub path: PathBuf,
    pub rel: PathBuf,
    /// Which of the inputs it was found under.
    pub input: usize,
}

#[derive(Debug, Default)]
pub struct Walk {
    /// In input order, each input's files in sorted path order.
    pub files: Vec<Found>,
    pub skipped: BTreeMap<InputSkip, u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct WalkError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalkError + '_ {
    move |source| WalkError {
        path: path.to_path_buf(),
        source,
    }
}

/// Every regular file under `inputs`; what is passed over is counted and logged.
pub fn walk(inputs: &[PathBuf], opts: WalkOptions) -> Result<Walk, WalkError> {
    let mut out = Walk::default();
    for (index, input) in inputs.iter().enumerate() {
        let root = input.canonicalize().map_err(io_err(input))?;
        let base = root
            .file_name()
            .map_or_else(|| PathBuf::from("input"), PathBuf::from);
        let meta = fs::metadata(input).map_err(io_err(input))?;
        let mut walker = Walker {
            root: root.clone(),
            input: index,
            opts,
            ancestors: Vec::new(),
            out: &mut out,
        };
        walker.visit(input, base, &meta, root)?;
    }
    if !out.skipped.is_empty() {
        let counts: Vec<String> = out
            .skipped
            .iter()
            .map(|(r, n)| format!("{n} {}", r.as_str()))
            .collect();
        tracing::warn!(
            "input entries not read: {} (only regular files are read; --follow-symlinks reads symlinks that leave the input tree)",
            counts.join(", ")
        );
    }
    Ok(out)
}

/// One input tree being walked.
struct Walker<'a> {
    root: PathBuf,
    input: usize,
    opts: WalkOptions,
    /// Resolved paths of the directories being visited, to stop at a symlink loop.
    ancestors: Vec<PathBuf>,
    out: &'a mut Walk,
}

impl Walker<'_> {
    fn skip(&mut self, path: &Path, reason: InputSkip) {
        tracing::debug!(path = %path.display(), reason = reason.as_str(), "input entry skipped");
        *self.out.skipped.entry(reason).or_default() += 1;
    }

    /// `path`, whose metadata (symlinks followed) is `meta` and whose resolved path is `canon`.
    fn visit(
        &mut self,
        path: &Path,
        rel: PathBuf,
        meta: &fs::Metadata,
        canon: PathBuf,
    ) -> Result<(), WalkError> {
        if meta.is_file() {
            self.out.files.push(Found {
                path: path.to_path_buf(),
                rel,
                input: self.input,
            });
            return Ok(());
        }
        if !meta.is_dir() {
            self.skip(path, InputSkip::SpecialFile);
            return Ok(());
        }
        let mut entries = Vec::new();
        for entry in fs::read_dir(path).map_err(io_err(path))? {
            let entry = entry.map_err(io_err(path))?;
            entries.push((entry.file_name(), entry.path()));
        }
        entries.sort();
        self.ancestors.push(canon.clone());
        for (name, child) in entries {
            if name.to_str().is_some_and(outdir::is_control_file) {
                continue;
            }
            let own = fs::symlink_metadata(&child).map_err(io_err(&child))?;
            if !own.file_type().is_symlink() {
                self.visit(&child, rel.join(&name), &own, canon.join(&name))?;
                continue;
            }
            let (Ok(target), Ok(target_canon)) = (fs::metadata(&child), child.canonicalize())
            else {
                self.skip(&child, InputSkip::BrokenSymlink);
                continue;
            };
            if !target.is_file() && !target.is_dir() {
                self.skip(&child, InputSkip::SpecialFile);
            } else if !self.opts.follow_symlinks && !target_canon.starts_with(&self.root) {
                self.skip(&child, InputSkip::SymlinkOutside);
            } else if target.is_dir() && self.ancestors.contains(&target_canon) {
                self.skip(&child, InputSkip::SymlinkCycle);
            } else {
                self.visit(&child, rel.join(&name), &target, target_canon)?;
            }
        }
        self.ancestors.pop();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Counts of what is passed over, and what is read: the cases (a symlink to a file
    /// outside the tree, to /dev/zero, a FIFO) plus a symlink inside the tree, which is read,
    /// and a loop, which ends.
    #[test]
    fn only_regular_files_inside_the_tree_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("a.txt"), "a").unwrap();
        std::fs::write(tree.join("sub/b.txt"), "b").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "outside").unwrap();
        symlink(dir.path().join("secret.txt"), tree.join("leak.txt")).unwrap();
        symlink("/dev/zero", tree.join("zero.txt")).unwrap();
        symlink(tree.join("sub/b.txt"), tree.join("inside.txt")).unwrap();
        symlink(&tree, tree.join("sub/loop")).unwrap();
        symlink(dir.path().join("missing"), tree.join("dangling.txt")).unwrap();
        std::fs::write(tree.join(".phigen.lock"), "1\n").unwrap();
        let fifo = std::ffi::CString::new(tree.join("pipe.txt").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        let w = walk(std::slice::from_ref(&tree), WalkOptions::default()).unwrap();
        let rels: Vec<&Path> = w.files.iter().map(|f| f.rel.as_path()).collect();
        assert_eq!(
            rels,
            [
                Path::new("tree/a.txt"),
                Path::new("tree/inside.txt"),
                Path::new("tree/sub/b.txt")
            ]
        );
        assert_eq!(
            w.skipped,
            BTreeMap::from([
                (InputSkip::SymlinkOutside, 1),
                (InputSkip::SpecialFile, 2),
                (InputSkip::BrokenSymlink, 1),
                (InputSkip::SymlinkCycle, 1),
            ])
        );
        // With --follow-symlinks the outside file is read; special files still are not.
        let w = walk(
            std::slice::from_ref(&tree),
            WalkOptions {
                follow_symlinks: true,
            },
        )
        .unwrap();
        assert!(w.files.iter().any(|f| f.rel == Path::new("tree/leak.txt")));
        assert_eq!(w.skipped[&InputSkip::SpecialFile], 2);
        // A named input is followed wherever it points.
        let w = walk(&[tree.join("leak.txt")], WalkOptions::default()).unwrap();
        assert_eq!(w.files[0].rel, Path::new("secret.txt"));
    }
}

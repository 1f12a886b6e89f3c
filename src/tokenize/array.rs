//! `phigen tokenize` as an array job: the encoding (the costly part) is split over N tasks, and the
//! merge writes the shards, so they are byte-identical to one run's whatever N is.
//!
//! Task K encodes the input files i with i mod N = K (in sorted path order, as a whole run reads
//! them) into `OUT/tasks/K/docs-IIIIII.bin`, one file per input file, written atomically, so a
//! killed task resumes at its first missing file. Each holds the file's documents in row order:
//! split (1 byte), id length (u32) and id, token count (u32) and the tokens (u32), little-endian.
//! The task's marker holds its settings (the tokenizer with its file's hash: each task loads the
//! file itself) and the [`Source`] of each file it read. The merge checks
//! every marker and that all tasks ran with the same settings, then feeds the documents, file by
//! file, to the same writer a whole run uses, and writes `OUT/meta.json` last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    describe, io_err, previous_run, split_of, Meta, Order, Outcome, Sink, Source, Split,
    TokenizeError, TokenizeOptions,
};
use crate::artifact::atomic;
use crate::artifact::docs;
use crate::artifact::outdir::{self, DirLock, Written};
use crate::artifact::task::{self, Task};
use crate::artifact::walk::{InputSkip, WalkOptions};
use crate::model::tokenizer::{TokenizerError, TokenizerSpec};

/// What every task of one array must share, and the merge checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Settings {
    tokenizer: TokenizerSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eos_token: Option<String>,
    val_fraction: f64,
    order: Order,
    shard_tokens: u64,
    /// Input files of the whole run.
    files: usize,
}

/// A task's marker: its settings, and the files it encoded (index in the whole run, source).
#[derive(Debug, Serialize, Deserialize)]
struct TaskReport {
    stage: String,
    settings: Settings,
    sources: Vec<(usize, Source)>,
    skipped_inputs: BTreeMap<InputSkip, u64>,
    documents: u64,
    tokens: u64,
}

const STAGE: &str = "tokenize";

fn docs_file(task_dir: &Path, index: usize) -> PathBuf {
    task_dir.join(format!("docs-{index:06}.bin"))
}

fn settings(opts: &TokenizeOptions, files: usize) -> Settings {
    Settings {
        tokenizer: opts.tokenizer.clone(),
        eos_token: opts.eos_token.clone(),
        val_fraction: opts.val_fraction,
        order: opts.order,
        shard_tokens: opts.shard_tokens,
        files,
    }
}

/// Runs task `task` of a sharded tokenize into `opts.out`; a task whose marker exists does nothing.
pub fn run_task(
    opts: &TokenizeOptions,
    task: Task,
    mut progress: impl FnMut(u64),
) -> Result<bool, TokenizeError> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(TokenizeError::ValFraction(opts.val_fraction));
    }
    outdir::check_apart(&opts.out, &opts.inputs)?;
    if task.is_done(&opts.out) {
        return Ok(false);
    }
    let dir = task.dir(&opts.out);
    let lock = DirLock::exclusive(&dir)?;
    let mut written = Written::open(&dir, &lock)?;
    let walk = WalkOptions {
        follow_symlinks: opts.follow_symlinks,
    };
    let inputs = docs::input_files(&opts.inputs, walk)?;
    let tokenizer = opts.tokenizer.load(opts.eos_token.as_deref())?;
    let (mut sources, mut documents, mut tokens) = (Vec::new(), 0u64, 0u64);
    for (i, file) in inputs.files.iter().enumerate() {
        if !task.owns(i) {
            continue;
        }
        sources.push((i, describe(&file.path)?));
        let path = docs_file(&dir, i);
        let rel = path.strip_prefix(&dir).expect("below the task directory");
        written.claim(rel)?;
        if path.exists() {
            // Written whole by an earlier attempt of this task (files appear by rename).
            read_docs(&path, |_, _, ids| {
                documents += 1;
                tokens += ids.len() as u64;
            })?;
            continue;
        }
        let mut buf = Vec::new();
        docs::read_documents(&file.path, |batch| {
            let encoded: Vec<Vec<u32>> = batch
                .par_iter()
                .map(|d| tokenizer.encode_document(&d.text))
                .collect::<Result<_, TokenizerError>>()?;
            for (d, ids) in batch.iter().zip(encoded) {
                progress(ids.len() as u64);
                documents += 1;
                tokens += ids.len() as u64;
                let split = split_of(&d.id, opts.val_fraction);
                buf.push(u8::from(split == Split::Val));
                buf.extend((d.id.len() as u32).to_le_bytes());
                buf.extend(d.id.as_bytes());
                buf.extend((ids.len() as u32).to_le_bytes());
                buf.extend(ids.iter().flat_map(|t| t.to_le_bytes()));
            }
            Ok::<(), TokenizeError>(())
        })?;
        atomic::write_bytes(&path, &buf).map_err(io_err(&path))?;
    }
    let report = TaskReport {
        stage: STAGE.into(),
        settings: settings(opts, inputs.files.len()),
        sources,
        skipped_inputs: inputs.skipped,
        documents,
        tokens,
    };
    let value = serde_json::to_value(&report).expect("task reports serialize");
    task.mark_done(&opts.out, value)
        .map_err(io_err(&task.marker(&opts.out)))?;
    Ok(true)
}

/// Calls `each(id, split, tokens)` for every document of a task's docs file, in order.
fn read_docs(path: &Path, mut each: impl FnMut(&str, Split, &[u32])) -> Result<(), TokenizeError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let bad = |at: usize| TokenizeError::BadMeta {
        path: path.to_path_buf(),
        reason: format!("damaged at byte {at}; delete it and relaunch its task"),
    };
    let (mut at, mut ids) = (0, Vec::new());
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    while at < bytes.len() {
        let split = if bytes[at] == 1 {
            Split::Val
        } else {
            Split::Train
        };
        let id_len = u32_at(at + 1).ok_or_else(|| bad(at))?;
        let id = bytes
            .get(at + 5..at + 5 + id_len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| bad(at))?;
        let n = u32_at(at + 5 + id_len).ok_or_else(|| bad(at))?;
        let start = at + 9 + id_len;
        let raw = bytes.get(start..start + 4 * n).ok_or_else(|| bad(at))?;
        ids.clear();
        ids.extend(
            raw.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        each(id, split, &ids);
        at = start + 4 * n;
    }
    Ok(())
}

/// Writes the shards and `meta.json` of the sharded tokenize in `dir` from its N tasks' files:
/// the same bytes one run over the same inputs writes.
pub fn merge(dir: &Path) -> Result<Outcome, TokenizeError> {
    let markers = task::all_finished(dir)?;
    let n = markers.len();
    let mut reports = Vec::with_capacity(n);
    for m in markers {
        let path = m.task.marker(dir);
        let r: TaskReport =
            serde_json::from_value(m.stats).map_err(|e| TokenizeError::BadMeta {
                path,
                reason: format!("not a tokenize task's marker: {e}"),
            })?;
        reports.push(r);
    }
    let first = reports[0].settings.clone();
    if let Some((k, r)) = reports
        .iter()
        .enumerate()
        .find(|(_, r)| r.settings != first)
    {
        return Err(TokenizeError::OtherRun {
            path: Task { k, n }.marker(dir),
            reason: format!(
                "task {k} ran with {:?}, task 0 with {first:?}; relaunch it with task 0's flags",
                r.settings
            ),
        });
    }
    let mut sources: Vec<(usize, Source)> = reports
        .iter()
        .flat_map(|r| r.sources.iter().cloned())
        .collect();
    sources.sort_by_key(|(i, _)| *i);
    let sources: Vec<Source> = sources.into_iter().map(|(_, s)| s).collect();
    let opts = TokenizeOptions {
        inputs: Vec::new(),
        out: dir.to_path_buf(),
        tokenizer: first.tokenizer.clone(),
        eos_token: first.eos_token.clone(),
        val_fraction: first.val_fraction,
        shard_tokens: first.shard_tokens,
        force: false,
        follow_symlinks: false,
        order: first.order,
    };
    let lock = DirLock::exclusive(dir)?;
    let mut written = Written::open(dir, &lock)?;
    // The tasks' tokenizer, for its ids (a file that changed since is an error).
    let ids = opts.tokenizer.load(opts.eos_token.as_deref())?.ids;
    if let Some(done) = previous_run(&opts, &ids, &sources, &mut written)? {
        return Ok(Outcome::UpToDate(done));
    }
    let total = sources.iter().map(|s| s.bytes).sum();
    let mut sink = Sink::new(&opts, dir, total, ids)?;
    for i in 0..first.files {
        let path = docs_file(&Task { k: i % n, n }.dir(dir), i);
        let mut result = Ok(());
        read_docs(&path, |id, split, ids| {
            if result.is_ok() {
                result = sink.push(id, split, ids, &mut written);
            }
        })?;
        result?;
    }
    let skipped = reports.swap_remove(0).skipped_inputs;
    let meta: Meta = sink.finish(&opts, sources, skipped, &mut written)?;
    Ok(Outcome::Written(meta))
}

/// Whether the task markers in `dir` are a tokenize array's.
pub fn is_tokenize_array(dir: &Path) -> bool {
    let marker = Task { k: 0, n: 1 }.marker(dir);
    std::fs::read(&marker)
        .ok()
        .and_then(|b| serde_json::from_slice::<task::Marker>(&b).ok())
        .is_some_and(|m| m.stats["stage"] == STAGE)
}

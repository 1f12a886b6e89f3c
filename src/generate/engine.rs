//! The generation engine shared by every corpus.
//!
//! Reads: a corpus (constraints, template, checks), a teacher, the output directory as a previous
//! run left it. Writes into `OUT/`: `part-NNNNN.parquet` (kept records), `rejects.parquet` (every
//! drop with its reason), `manifest.json` (the settings that define the ids), `stats.json`.
//!
//! Slot `i` of `--n N` is filled by attempt 0, 1, … of prompt `i`: each attempt draws its
//! constraints from an rng seeded by (seed, slot, attempt) alone, so the prompts do not depend on
//! thread count, timing or what ran before. A slot is done once one of its records is written; a
//! re-run sends nothing for done slots and resumes a slot's attempts after those already dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::{common_checks, normalized_text_hash, Corpus, Drop, DropReason};
use crate::artifact::atomic;
use crate::artifact::shards::{self, Layout, ShardError, ShardWriter};
use crate::artifact::table::{self, row, Row, Schema};
use crate::artifact::task::Task;
use crate::report::diversity::{self, Sampler, TextDiversity};
use crate::teacher::pricing::{Ledger, Price, Reservation};
use crate::teacher::retry::RequestCountsSnapshot;
use crate::teacher::{request_seed, Answer, Sampling, Teacher, TeacherError};

const RECORDS: Layout = Layout::Parts { prefix: "part" };
const REJECTS: Layout = Layout::Single {
    file: "rejects.parquet",
};
const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub out: PathBuf,
    /// Good records wanted in `out` (records of earlier runs count).
    pub n: u64,
    pub seed: u64,
    /// Attempts per slot before it is given up (each dropped answer costs one).
    pub max_attempts: u32,
    /// Records per Parquet shard.
    pub shard_size: usize,
    /// Prompts worked on at once (the teacher bounds the requests actually in flight).
    pub concurrency: usize,
    /// One task of an array job: only the slots it owns (slot i with i mod N = K) are filled, so
    /// the N tasks together fill the slots of one run (see [`crate::artifact::task`]).
    pub task: Option<Task>,
}

impl GenerateOptions {
    /// Whether this run fills slot `s`.
    pub fn owns(&self, s: u64) -> bool {
        self.task.is_none_or(|t| t.owns(s as usize))
    }

    /// The slots of 0..n this run fills: all n, or a task's share.
    pub fn slots(&self) -> u64 {
        match self.task {
            None => self.n,
            Some(t) => (self.n + (t.n - t.k) as u64 - 1) / t.n as u64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Shards(#[from] ShardError),
    #[error(transparent)]
    Table(#[from] table::TableError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: this directory holds `{field}` = {found}, but this run has {expected}; its ids would not match — repeat the original flags or choose a new --out")]
    ManifestMismatch {
        path: PathBuf,
        field: &'static str,
        found: String,
        expected: String,
    },
    #[error(
        "{path}: not a phigen manifest ({message}); is --out pointing at the right directory?"
    )]
    BadManifest { path: PathBuf, message: String },
    #[error("stopped: {0}")]
    Teacher(#[from] TeacherError),
    #[error("{0}")]
    Template(#[from] super::prompt::TemplateError),
    #[error(transparent)]
    OutDir(#[from] crate::artifact::outdir::OutDirError),
    #[error("{path}: {source}; expected one of the names phigen writes (`too_short`, `duplicate`, …) — was this file written by another tool or a newer phigen? Move it away to start the rejects afresh")]
    BadReject {
        path: PathBuf,
        source: super::UnknownDropReason,
    },
    #[error("{path}: could not summarise the {kind} records for stats.json: {source}; the records themselves are written — this is a bug in phigen, please report it")]
    Summary {
        path: PathBuf,
        kind: &'static str,
        source: polars::prelude::PolarsError,
    },
    #[error(transparent)]
    Setup(#[from] super::run::SetupError),
}

/// Why a run ended before every slot was filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `--max-cost` would have been exceeded by the next request.
    Budget,
    /// Ctrl-C.
    Interrupted,
    /// An error after which nothing can succeed (bad key).
    Fatal,
}

/// Live counters of a run, read by the progress bar while it runs.
#[derive(Debug, Default)]
pub struct RunState {
    pub total: AtomicU64,
    pub done_before: AtomicU64,
    pub written: AtomicU64,
    pub failed: AtomicU64,
    pub exhausted: AtomicU64,
    dropped: Mutex<BTreeMap<DropReason, u64>>,
    stop: Mutex<Option<StopReason>>,
    fatal: Mutex<Option<TeacherError>>,
    /// The model the run asks, as the teacher names it once loaded (a local teacher: the file).
    teacher: OnceLock<String>,
    /// Set once, the first time this run's keep rate is found low.
    low_keep: OnceLock<LowKeep>,
}

impl RunState {
    pub fn stop(&self, reason: StopReason) {
        let mut s = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        s.get_or_insert(reason);
    }

    pub fn stopped(&self) -> Option<StopReason> {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }

    /// The teacher's model name, once the run has started: what really answers, e.g.
    /// `local:…/SmolLM2-135M-Instruct.Q4_1.gguf` where the settings said a Hub id.
    pub fn teacher(&self) -> Option<&str> {
        self.teacher.get().map(String::as_str)
    }

    /// The one-time report that this run keeps too few answers (see [`LowKeep`]), once made.
    pub fn low_keep(&self) -> Option<&LowKeep> {
        self.low_keep.get()
    }

    fn count_drop(&self, reason: DropReason) {
        *self
            .dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }
}

/// Answers a run checks before its keep rate is judged: fewer would be noise.
pub const LOW_KEEP_AFTER: u64 = 50;
/// A keep rate below this after [`LOW_KEEP_AFTER`] answers is reported (once): most requests
/// are being paid for, or waited for, and thrown away.
pub const LOW_KEEP_RATE: f64 = 0.2;

/// What most likely makes a run keep too few answers, judged from its drop reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LikelyCause {
    /// Most drops are `truncated`: answers run into the output limit (`--max-tokens`).
    MaxTokens,
    /// Most drops are the content checks' (too short, no code, syntax, tests, format) and the
    /// teacher is a small local model: it cannot write what the corpus asks for.
    SmallTeacher,
    /// Neither: the reasons themselves say what to change.
    Unclear,
}

/// The one-time report of a low keep rate: after [`LOW_KEEP_AFTER`] answers this run kept fewer
/// than [`LOW_KEEP_RATE`] of them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LowKeep {
    /// Answers this run had checked when the rate was judged (failed requests excluded).
    pub answers: u64,
    pub kept: u64,
    /// The most frequent drop reasons then, most frequent first (at most three).
    pub top_reasons: Vec<(DropReason, u64)>,
    pub cause: LikelyCause,
}

impl LowKeep {
    /// The report for `kept` answers kept and `dropped` dropped (by reason) so far, if the rate
    /// is low; `small_teacher`: the teacher is a small local model.
    pub fn judge(
        kept: u64,
        dropped: &BTreeMap<DropReason, u64>,
        small_teacher: bool,
    ) -> Option<LowKeep> {
        let answers = kept
            + dropped
                .iter()
                .filter(|&(&r, _)| r != DropReason::RequestFailed)
                .map(|(_, &c)| c)
                .sum::<u64>();
        if answers < LOW_KEEP_AFTER || kept as f64 >= LOW_KEEP_RATE * answers as f64 {
            return None;
        }
        let top_reasons = top_reasons(dropped, 3);
        let cause = match top_reasons.first() {
            Some((DropReason::Truncated, _)) => LikelyCause::MaxTokens,
            Some(_) if small_teacher => LikelyCause::SmallTeacher,
            _ => LikelyCause::Unclear,
        };
        Some(LowKeep {
            answers,
            kept,
            top_reasons,
            cause,
        })
    }
}

/// The `n` most frequent reasons of `counts`, most frequent first (ties by name), failed requests
/// excluded (they are not answers).
pub fn top_reasons(counts: &BTreeMap<DropReason, u64>, n: usize) -> Vec<(DropReason, u64)> {
    let mut v: Vec<(DropReason, u64)> = counts
        .iter()
        .filter(|&(&r, &c)| r != DropReason::RequestFailed && c > 0)
        .map(|(&r, &c)| (r, c))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.as_str().cmp(b.0.as_str())));
    v.truncate(n);
    v
}

/// The settings that define record ids; a directory is only ever continued with the same ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    kind: String,
    template_id: String,
    template_version: u32,
    template_hash: String,
    model: String,
    sampling: Sampling,
    seed: u64,
    /// [`Corpus::check_setting`]. Absent in manifests written before it was recorded: those
    /// directories were written with either setting (`--run-code` and `--verify parse` are
    /// older), so an absent value is unknown and not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checks: Option<String>,
}

impl Manifest {
    /// Checks `dir/manifest.json` against `self` (if present); `write` creates it when absent.
    fn reconcile(&self, dir: &Path, write: bool) -> Result<(), GenerateError> {
        let path = dir.join("manifest.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let found: Manifest =
                    serde_json::from_slice(&bytes).map_err(|e| GenerateError::BadManifest {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                let mismatch =
                    |field, found: String, expected: String| GenerateError::ManifestMismatch {
                        path: path.clone(),
                        field,
                        found,
                        expected,
                    };
                let checks = |c: &str| match c {
                    "" => "the default checks".to_string(),
                    c => c.to_string(),
                };
                // Unknown in an older manifest: compared as this run's.
                let found_checks = found.checks.as_deref().or(self.checks.as_deref());
                let pairs: [(&'static str, String, String); 7] = [
                    ("kind", found.kind.clone(), self.kind.clone()),
                    ("model", found.model.clone(), self.model.clone()),
                    ("seed", found.seed.to_string(), self.seed.to_string()),
                    (
                        "template",
                        format!(
                            "{} v{} ({})",
                            found.template_id, found.template_version, found.template_hash
                        ),
                        format!(
                            "{} v{} ({})",
                            self.template_id, self.template_version, self.template_hash
                        ),
                    ),
                    (
                        "sampling",
                        format!("{:?}", found.sampling),
                        format!("{:?}", self.sampling),
                    ),
                    ("format", found.format.to_string(), self.format.to_string()),
                    (
                        "checks",
                        checks(found_checks.unwrap_or_default()),
                        checks(self.checks.as_deref().unwrap_or_default()),
                    ),
                ];
                match pairs.into_iter().find(|(_, f, e)| f != e) {
                    Some((field, f, e)) => Err(mismatch(field, f, e)),
                    None => Ok(()),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if write {
                    atomic::write_json(&path, self)
                        .map_err(|source| GenerateError::Io { path, source })?;
                }
                Ok(())
            }
            Err(source) => Err(GenerateError::Io { path, source }),
        }
    }
}

/// What earlier runs left in the output directory.
#[derive(Debug, Default)]
struct Resume {
    done_slots: HashSet<u64>,
    next_attempt: HashMap<u64, u32>,
    text_hashes: HashSet<[u8; 32]>,
    records: u64,
    rejects_by_reason: BTreeMap<DropReason, u64>,
}

impl Resume {
    /// Reads records and rejects, both Parquet and what is still in the journals.
    fn scan(out: &Path) -> Result<Resume, GenerateError> {
        let mut r = Resume::default();
        let mut seen_ids = HashSet::new();
        for (id, slot, text) in record_rows(out)? {
            if !seen_ids.insert(id) {
                continue;
            }
            r.records += 1;
            r.done_slots.insert(slot as u64);
            r.text_hashes.insert(normalized_text_hash(&text));
        }
        let mut seen_rejects = HashSet::new();
        for path in shards::list_files(out, &REJECTS)? {
            let df = table::read_columns(&path, &["id", "slot", "attempt", "reason"])?;
            let ids = table::text_column(&df, &path, "id")?;
            let slots = table::int_column(&df, &path, "slot")?;
            let attempts = table::int_column(&df, &path, "attempt")?;
            let reasons = table::text_column(&df, &path, "reason")?;
            for i in 0..df.height() {
                let (Some(id), Some(slot), Some(attempt), Some(reason)) =
                    (&ids[i], slots[i], attempts[i], &reasons[i])
                else {
                    continue;
                };
                if seen_rejects.insert(id.clone()) {
                    r.note_reject(slot as u64, attempt as u32, parse_reason(reason, &path)?);
                }
            }
        }
        let journal = out.join("rejects.journal.jsonl");
        for row in shards::read_journal_rows(&journal)? {
            let id = row
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let (Some(slot), Some(attempt), Some(reason)) = (
                row.get("slot").and_then(Value::as_u64),
                row.get("attempt").and_then(Value::as_u64),
                row.get("reason").and_then(Value::as_str),
            ) else {
                continue;
            };
            if seen_rejects.insert(id) {
                r.note_reject(slot, attempt as u32, parse_reason(reason, &journal)?);
            }
        }
        Ok(r)
    }

    fn note_reject(&mut self, slot: u64, attempt: u32, reason: DropReason) {
        *self.rejects_by_reason.entry(reason).or_default() += 1;
        // A failed request did not see an answer: the same attempt is sent again later.
        if reason != DropReason::RequestFailed {
            let next = self.next_attempt.entry(slot).or_default();
            *next = (*next).max(attempt + 1);
        }
    }
}

/// The `reason` cell of a reject read from `path`.
fn parse_reason(reason: &str, path: &Path) -> Result<DropReason, GenerateError> {
    reason.parse().map_err(|source| GenerateError::BadReject {
        path: path.to_path_buf(),
        source,
    })
}

/// (id, slot, text) of every record in Parquet and in the journal.
fn record_rows(out: &Path) -> Result<Vec<(String, i64, String)>, GenerateError> {
    let mut rows = Vec::new();
    for path in shards::list_files(out, &RECORDS)? {
        let df = table::read_columns(&path, &["id", "slot", "text"])?;
        let ids = table::text_column(&df, &path, "id")?;
        let slots = table::int_column(&df, &path, "slot")?;
        let texts = table::text_column(&df, &path, "text")?;
        for ((id, slot), text) in ids.into_iter().zip(slots).zip(texts) {
            if let (Some(id), Some(slot), Some(text)) = (id, slot, text) {
                rows.push((id, slot, text));
            }
        }
    }
    for row in shards::read_journal_rows(&out.join("records.journal.jsonl"))? {
        let get = |k: &str| row.get(k).cloned().unwrap_or(Value::Null);
        if let (Some(id), Some(slot), Some(text)) = (
            get("id").as_str(),
            get("slot").as_i64(),
            get("text").as_str(),
        ) {
            rows.push((id.to_string(), slot, text.to_string()));
        }
    }
    Ok(rows)
}

/// One prompt to send: slot, attempt and everything derived from them.
struct Job<C: Corpus> {
    slot: u64,
    attempt: u32,
    id: String,
    prompt: String,
    constraints: C::Constraints,
}

/// What is the same for every job of a run.
struct Plan<C: Corpus> {
    corpus: Arc<C>,
    model: String,
    sampling: Sampling,
    /// `sampling` as JSON fields, for the ids.
    sampling_fields: Map<String, Value>,
    seed: u64,
}

impl<C: Corpus> Plan<C> {
    fn new(corpus: Arc<C>, model: &str, sampling: Sampling, seed: u64) -> Plan<C> {
        Plan {
            corpus,
            model: model.to_string(),
            sampling,
            sampling_fields: fields(&sampling),
            seed,
        }
    }

    fn job(&self, slot: u64, attempt: u32) -> Result<Job<C>, GenerateError> {
        let mut seed = [0u8; 32];
        let mut h = blake3::Hasher::new();
        h.update(b"phigen/constraints");
        for part in [self.seed, slot, attempt as u64] {
            h.update(&part.to_le_bytes());
        }
        seed.copy_from_slice(h.finalize().as_bytes());
        let mut rng = ChaCha8Rng::from_seed(seed);
        let constraints = self.corpus.sample(slot, &mut rng);
        let vars = self.corpus.prompt_vars(&constraints);
        let values: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let template = self.corpus.template();
        let prompt = template.render(&values)?;
        let value = serde_json::to_value(&constraints).expect("constraints always serialize");
        // The JSON array [template id, version, constraints, slot, attempt, seed, model,
        // sampling], structs as objects with sorted keys (as `serde_json::Value` writes them).
        let identity = serde_json::to_vec(&(
            &template.id,
            template.version,
            &value,
            slot,
            attempt,
            self.seed,
            &self.model,
            &self.sampling_fields,
        ))
        .expect("JSON values always serialize");
        let id = blake3::hash(&identity).to_hex()[..32].to_string();
        Ok(Job {
            slot,
            attempt,
            id,
            prompt,
            constraints,
        })
    }

    /// Prompt, teacher, sampling and usage of one answer (or of a failed request: `None`).
    fn provenance(&self, prompt: String, answer: Option<&Answer>) -> Provenance {
        let t = self.corpus.template();
        Provenance {
            template_id: t.id.clone(),
            template_version: t.version,
            template_hash: t.hash.clone(),
            prompt,
            model: self.model.clone(),
            temperature: self.sampling.temperature,
            top_p: self.sampling.top_p,
            max_tokens: self.sampling.max_tokens,
            prompt_tokens: answer.map(|a| a.usage.prompt_tokens),
            completion_tokens: answer.map(|a| a.usage.completion_tokens),
            finish_reason: answer.map(|a| a.finish_reason.as_str()),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }
}

row! {
    /// The columns every record starts with; the corpus's constraint and check columns follow.
    struct RecordHead {
        id: String,
        kind: &'static str,
        slot: u64,
        attempt: u32,
        seed: u64,
        text: String,
    }
}

row! {
    /// The columns every reject starts with (`text` is null for a failed request).
    struct RejectHead {
        id: String,
        slot: u64,
        attempt: u32,
        reason: DropReason,
        detail: String,
        text: Option<String>,
    }
}

row! {
    /// The columns every record and reject ends with.
    struct Provenance {
        template_id: String,
        template_version: u32,
        template_hash: String,
        prompt: String,
        model: String,
        temperature: f32,
        top_p: f32,
        max_tokens: u32,
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        finish_reason: Option<&'static str>,
        created_at: String,
    }
}

/// The columns of `part-*.parquet` for corpus `C`, in the order [`record_cells`] fills them.
fn record_schema<C: Corpus>() -> Schema {
    [
        RecordHead::COLUMNS,
        C::Constraints::COLUMNS,
        C::Checks::COLUMNS,
        Provenance::COLUMNS,
    ]
    .concat()
}

/// The cells of one record, in the order of [`record_schema`]: each part fills its own columns.
fn record_cells<C: Corpus>(
    head: RecordHead,
    constraints: C::Constraints,
    checks: C::Checks,
    provenance: Provenance,
) -> Vec<Value> {
    let mut row = Vec::with_capacity(
        RecordHead::COLUMNS.len()
            + C::Constraints::COLUMNS.len()
            + C::Checks::COLUMNS.len()
            + Provenance::COLUMNS.len(),
    );
    head.push_cells(&mut row);
    constraints.push_cells(&mut row);
    checks.push_cells(&mut row);
    provenance.push_cells(&mut row);
    row
}

/// The columns of `rejects.parquet`, in the order [`Worker::reject`] fills them.
fn reject_schema() -> Schema {
    [RejectHead::COLUMNS, Provenance::COLUMNS].concat()
}

/// The sampling settings' fields by name (part of every id).
fn fields(sampling: &Sampling) -> Map<String, Value> {
    match serde_json::to_value(sampling).expect("sampling always serializes") {
        Value::Object(fields) => fields,
        _ => Map::new(),
    }
}

/// Estimates prompt tokens with the model's tiktoken encoding (cl100k_base for unknown models).
fn prompt_tokens(model: &str, prompt: &str) -> u64 {
    let name = model.rsplit('/').next().unwrap_or(model);
    let bpe =
        tiktoken_rs::bpe_for_model(name).unwrap_or_else(|_| tiktoken_rs::cl100k_base_singleton());
    bpe.encode_ordinary(prompt).len() as u64
}

/// What `--dry-run` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    pub requested: u64,
    pub already_done: u64,
    pub given_up: u64,
    pub prompts: u64,
    pub prompt_tokens: u64,
    pub expected_completion_tokens: u64,
    pub max_completion_tokens: u64,
    pub expected_cost_usd: Option<f64>,
    pub max_cost_usd: Option<f64>,
}

/// The first attempt of each slot that still needs one.
fn pending_slots(resume: &Resume, opts: &GenerateOptions) -> (Vec<(u64, u32)>, u64) {
    let mut given_up = 0;
    let pending = (0..opts.n)
        .filter(|s| opts.owns(*s) && !resume.done_slots.contains(s))
        .filter_map(|s| {
            let next = resume.next_attempt.get(&s).copied().unwrap_or(0);
            if next >= opts.max_attempts {
                given_up += 1;
                None
            } else {
                Some((s, next))
            }
        })
        .collect();
    (pending, given_up)
}

/// Counts what a run would send, without sending or writing anything.
pub fn dry_run<C: Corpus>(
    corpus: Arc<C>,
    model: &str,
    sampling: Sampling,
    price: Option<Price>,
    opts: &GenerateOptions,
) -> Result<DryRun, GenerateError> {
    let plan = Plan::new(corpus.clone(), model, sampling, opts.seed);
    let resume = if opts.out.exists() {
        manifest(&plan).reconcile(&opts.out, false)?;
        Resume::scan(&opts.out)?
    } else {
        Resume::default()
    };
    let (pending, given_up) = pending_slots(&resume, opts);
    let mut tokens = 0;
    for &(slot, attempt) in &pending {
        tokens += prompt_tokens(model, &plan.job(slot, attempt)?.prompt);
    }
    let prompts = pending.len() as u64;
    let expected = prompts
        * corpus
            .typical_completion_tokens()
            .min(sampling.max_tokens as u64);
    let max = prompts * sampling.max_tokens as u64;
    Ok(DryRun {
        requested: opts.slots(),
        already_done: resume.done_slots.iter().filter(|&&s| opts.owns(s)).count() as u64,
        given_up,
        prompts,
        prompt_tokens: tokens,
        expected_completion_tokens: expected,
        max_completion_tokens: max,
        expected_cost_usd: price.map(|p| p.cost(tokens, expected)),
        max_cost_usd: price.map(|p| p.cost(tokens, max)),
    })
}

fn manifest<C: Corpus>(plan: &Plan<C>) -> Manifest {
    let t = plan.corpus.template();
    Manifest {
        format: MANIFEST_FORMAT,
        kind: plan.corpus.kind().to_string(),
        template_id: t.id.clone(),
        template_version: t.version,
        template_hash: t.hash.clone(),
        model: plan.model.clone(),
        sampling: plan.sampling,
        seed: plan.seed,
        checks: Some(plan.corpus.check_setting().to_string()),
    }
}

/// `stats.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub kind: String,
    pub model: String,
    /// What the reader of this corpus should know about the teacher (e.g. that a tiny local
    /// model wrote it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_note: Option<String>,
    pub requested: u64,
    /// Records in the output directory, earlier runs included.
    pub records: u64,
    pub complete: bool,
    pub stopped: Option<StopReason>,
    pub run: RunStats,
    /// Drops by reason over every run into this directory.
    pub rejects_total: BTreeMap<DropReason, u64>,
    /// Answers that reached the checks (kept + dropped, failed requests excluded), all runs.
    pub answers_checked: u64,
    /// Share of checked answers kept (e.g. the pass rate of exercises).
    pub keep_rate: f64,
    /// Share of checked answers dropped, by reason (e.g. `syntax_error` = 1 − the parse rate).
    pub drop_rates: BTreeMap<DropReason, f64>,
    /// Set when this run kept too few answers (reported once while it ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_keep: Option<LowKeep>,
    pub corpus: Value,
    /// distinct-n and compression ratio of a sample of the records, as `phigen report` measures
    /// them (it draws these rather than reading the texts again); absent with no records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diversity: Option<TextDiversity>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunStats {
    pub wall_seconds: f64,
    pub requests_per_second: f64,
    pub written: u64,
    pub skipped_done: u64,
    pub dropped: BTreeMap<DropReason, u64>,
    pub failed_requests: u64,
    pub given_up_slots: u64,
    pub requests: RequestCountsSnapshot,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: Option<f64>,
    pub price: Option<Price>,
}

impl Stats {
    /// Adds another engine run's requests, tokens, cost, time and drops (a second run into the
    /// same output, such as the summaries of instruct stories or the leaves of topics).
    pub fn add_run(&mut self, other: &Stats) {
        let (r, t) = (&mut self.run, &other.run);
        r.wall_seconds += t.wall_seconds;
        r.failed_requests += t.failed_requests;
        r.given_up_slots += t.given_up_slots;
        r.prompt_tokens += t.prompt_tokens;
        r.completion_tokens += t.completion_tokens;
        r.cost_usd = match (r.cost_usd, t.cost_usd) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        let (q, u) = (&mut r.requests, &t.requests);
        q.sent += u.sent;
        q.retries += u.retries;
        q.throttled += u.throttled;
        q.server_errors += u.server_errors;
        q.timeouts += u.timeouts;
        q.connection_errors += u.connection_errors;
        q.malformed += u.malformed;
        for (&reason, &count) in &t.dropped {
            *r.dropped.entry(reason).or_default() += count;
        }
        self.stopped = self.stopped.or(other.stopped);
    }
}

/// A row for the shard writer: cells in the order of `record_schema` / `reject_schema`.
enum Output {
    Record(Vec<Value>),
    Reject(Vec<Value>),
}

struct Worker<C: Corpus, T: Teacher> {
    plan: Plan<C>,
    teacher: Arc<T>,
    ledger: Arc<Ledger>,
    state: Arc<RunState>,
    texts: Mutex<HashSet<[u8; 32]>>,
    tx: mpsc::UnboundedSender<Output>,
    max_attempts: u32,
    count_prompt_tokens: bool,
    /// The teacher is a small local model (it has a note), for [`LowKeep`]'s cause.
    small_teacher: bool,
}

impl<C: Corpus, T: Teacher> Worker<C, T> {
    /// Fills one slot: attempts until an answer is kept, the attempts run out, or the run stops.
    async fn fill(&self, slot: u64, first_attempt: u32) -> Result<(), GenerateError> {
        for attempt in first_attempt..self.max_attempts {
            if self.state.stopped().is_some() {
                return Ok(());
            }
            let job = self.plan.job(slot, attempt)?;
            let estimate = if self.count_prompt_tokens {
                prompt_tokens(&self.plan.model, &job.prompt)
            } else {
                0
            };
            let Some(reservation) = self.reserve(estimate).await else {
                self.state.stop(StopReason::Budget);
                return Ok(());
            };
            let seed = request_seed(&job.id);
            let answer = match self.teacher.chat(&job.prompt, seed).await {
                Ok(a) => a,
                Err(e) => {
                    self.ledger.release(reservation);
                    if e.is_fatal() {
                        self.state.stop(StopReason::Fatal);
                        self.state
                            .fatal
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        return Ok(());
                    }
                    self.state.failed.fetch_add(1, Ordering::Relaxed);
                    self.reject(
                        job,
                        None,
                        Drop::new(DropReason::RequestFailed, e.to_string()),
                    );
                    return Ok(());
                }
            };
            self.ledger.settle(
                reservation,
                answer.usage.prompt_tokens,
                answer.usage.completion_tokens,
            );
            match self.check(&job, &answer).await {
                Ok(checks) => {
                    self.state.written.fetch_add(1, Ordering::Relaxed);
                    let _ = self
                        .tx
                        .send(Output::Record(self.record(job, answer, checks)));
                    self.judge_keep_rate();
                    return Ok(());
                }
                Err(drop) => {
                    self.reject(job, Some(&answer), drop);
                    self.judge_keep_rate();
                }
            }
        }
        self.state.exhausted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the run's one [`LowKeep`] report when the answers so far call for it.
    fn judge_keep_rate(&self) {
        if self.state.low_keep.get().is_some() {
            return;
        }
        let kept = self.state.written.load(Ordering::Relaxed);
        let dropped = self
            .state
            .dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(report) = LowKeep::judge(kept, &dropped, self.small_teacher) {
            tracing::warn!(answers = report.answers, kept = report.kept, cause = ?report.cause, "low keep rate");
            let _ = self.state.low_keep.set(report);
        }
    }

    /// Reserves the worst case of one request. While other requests are in flight their real cost
    /// may free room, so this waits for them; it gives up only when nothing else is reserved.
    async fn reserve(&self, prompt_tokens: u64) -> Option<Reservation> {
        loop {
            if let Some(r) = self
                .ledger
                .reserve(prompt_tokens, self.plan.sampling.max_tokens as u64)
            {
                return Some(r);
            }
            if self.ledger.snapshot().in_flight == 0 || self.state.stopped().is_some() {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn check(&self, job: &Job<C>, answer: &Answer) -> Result<C::Checks, Drop> {
        let corpus = &self.plan.corpus;
        common_checks(&answer.text, answer.finish_reason, corpus.word_bounds())?;
        let checks = corpus.check(&job.constraints, &answer.text).await?;
        let fresh = !corpus.unique_answers()
            || self
                .texts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(normalized_text_hash(&answer.text));
        if !fresh {
            return Err(Drop::new(
                DropReason::Duplicate,
                "the same text was already kept",
            ));
        }
        Ok(checks)
    }

    /// The row of a kept answer, in the order of [`record_schema`].
    fn record(&self, job: Job<C>, mut answer: Answer, checks: C::Checks) -> Vec<Value> {
        let head = RecordHead {
            id: job.id,
            kind: self.plan.corpus.kind(),
            slot: job.slot,
            attempt: job.attempt,
            seed: self.plan.seed,
            text: std::mem::take(&mut answer.text),
        };
        let provenance = self.plan.provenance(job.prompt, Some(&answer));
        record_cells::<C>(head, job.constraints, checks, provenance)
    }

    fn reject(&self, job: Job<C>, answer: Option<&Answer>, drop: Drop) {
        tracing::debug!(slot = job.slot, attempt = job.attempt, reason = %drop.reason, detail = %drop.detail, "dropped");
        if drop.reason != DropReason::RequestFailed {
            self.state.count_drop(drop.reason);
        }
        let mut row = Vec::with_capacity(RejectHead::COLUMNS.len() + Provenance::COLUMNS.len());
        RejectHead {
            id: job.id,
            slot: job.slot,
            attempt: job.attempt,
            reason: drop.reason,
            detail: drop.detail,
            text: answer.map(|a| a.text.clone()),
        }
        .push_cells(&mut row);
        self.plan
            .provenance(job.prompt, answer)
            .push_cells(&mut row);
        let _ = self.tx.send(Output::Reject(row));
    }
}

/// Generates until `opts.n` records are in `opts.out` (or the run stops), then writes `stats.json`.
pub async fn generate<C: Corpus, T: Teacher>(
    corpus: Arc<C>,
    teacher: Arc<T>,
    ledger: Arc<Ledger>,
    state: Arc<RunState>,
    opts: &GenerateOptions,
) -> Result<Stats, GenerateError> {
    let started = Instant::now();
    let _ = state.teacher.set(teacher.model().to_string());
    let plan = Plan::new(
        corpus.clone(),
        teacher.model(),
        teacher.sampling(),
        opts.seed,
    );
    std::fs::create_dir_all(&opts.out).map_err(|source| GenerateError::Io {
        path: opts.out.clone(),
        source,
    })?;
    // One run per directory: two would write the same slots twice.
    let _lock = crate::artifact::outdir::DirLock::exclusive(&opts.out)?;
    manifest(&plan).reconcile(&opts.out, true)?;
    let records = ShardWriter::open(
        &opts.out,
        "records",
        RECORDS,
        record_schema::<C>(),
        opts.shard_size,
    )?;
    let rejects = ShardWriter::open(&opts.out, "rejects", REJECTS, reject_schema(), usize::MAX)?;
    let mut resume = Resume::scan(&opts.out)?;
    let (pending, given_up_before) = pending_slots(&resume, opts);
    state.total.store(opts.slots(), Ordering::Relaxed);
    // Slots of 0..n already filled (an earlier run with a larger --n may have filled more).
    let done_before = resume
        .done_slots
        .iter()
        .filter(|&&s| s < opts.n && opts.owns(s))
        .count();
    state
        .done_before
        .store(done_before as u64, Ordering::Relaxed);
    tracing::info!(
        pending = pending.len(),
        done = resume.done_slots.len(),
        given_up = given_up_before,
        "starting"
    );

    let (tx, rx) = mpsc::unbounded_channel::<Output>();
    let writer = spawn_writer(records, rejects, rx, state.clone());

    let worker = Arc::new(Worker {
        count_prompt_tokens: ledger.price().is_some(),
        small_teacher: teacher.note().is_some(),
        plan,
        teacher: teacher.clone(),
        ledger: ledger.clone(),
        state: state.clone(),
        texts: Mutex::new(std::mem::take(&mut resume.text_hashes)),
        tx,
        max_attempts: opts.max_attempts,
    });
    // `concurrency` long-lived tasks, each taking the next pending slot when it is done with one:
    // no task per slot, and this thread is not woken per slot.
    let queue = Arc::new(Mutex::new(pending.into_iter()));
    let tasks: Vec<_> = (0..opts.concurrency.max(1))
        .map(|_| {
            let (worker, queue) = (worker.clone(), queue.clone());
            tokio::spawn(async move {
                while worker.state.stopped().is_none() {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let Some((slot, attempt)) = next else { break };
                    if let Err(e) = worker.fill(slot, attempt).await {
                        worker.state.stop(StopReason::Fatal);
                        return Err(e);
                    }
                }
                Ok(())
            })
        })
        .collect();
    let mut first_error = None;
    for task in tasks {
        let outcome = task
            .await
            .unwrap_or_else(|e| panic!("a generation task panicked: {e}"));
        if let Err(e) = outcome {
            first_error.get_or_insert(e);
        }
    }
    drop(worker); // closes the channel: the writer drains it and packs the last shard
    writer
        .join()
        .unwrap_or_else(|_| panic!("the shard writer panicked"))?;
    if let Some(e) = first_error {
        return Err(e);
    }
    if let Some(e) = state.fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e.into());
    }

    let stats = finish_stats(
        corpus.as_ref(),
        teacher.as_ref(),
        &ledger,
        &state,
        opts,
        started,
        resume,
    )?;
    atomic::write_json(&opts.out.join("stats.json"), &stats).map_err(|source| {
        GenerateError::Io {
            path: opts.out.join("stats.json"),
            source,
        }
    })?;
    Ok(stats)
}

/// The thread that appends what the workers send to the records and rejects journals, and packs
/// them into shards at the end (also after an error: whatever reached the journals is kept).
fn spawn_writer(
    mut records: ShardWriter,
    mut rejects: ShardWriter,
    mut rx: mpsc::UnboundedReceiver<Output>,
    writer_state: Arc<RunState>,
) -> std::thread::JoinHandle<Result<(), ShardError>> {
    std::thread::spawn(move || -> Result<(), ShardError> {
        let result = (|| {
            // Everything already waiting is written in one go: one syscall, not one per record.
            let mut batch = Vec::new();
            while rx.blocking_recv_many(&mut batch, 1024) > 0 {
                let (mut kept, mut dropped) = (Vec::new(), Vec::new());
                for out in batch.drain(..) {
                    match out {
                        Output::Record(row) => kept.push(row),
                        Output::Reject(row) => dropped.push(row),
                    }
                }
                records.append(kept)?;
                rejects.append(dropped)?;
            }
            Ok(())
        })();
        if result.is_err() {
            writer_state.stop(StopReason::Fatal);
        }
        // Whatever happened, pack what reached the journals.
        match result {
            Ok(()) => records.close().and(rejects.close()),
            Err(e) => {
                let _ = records.flush().and(rejects.flush());
                Err(e)
            }
        }
    })
}

fn finish_stats<C: Corpus, T: Teacher>(
    corpus: &C,
    teacher: &T,
    ledger: &Ledger,
    state: &RunState,
    opts: &GenerateOptions,
    started: Instant,
    before: Resume,
) -> Result<Stats, GenerateError> {
    // The directory now holds what the scan before the run found plus this run's rows: each
    // written record filled a slot that was pending, each drop and failed request is one reject.
    let written = state.written.load(Ordering::Relaxed);
    let records = before.records + written;
    let done = state.done_before.load(Ordering::Relaxed) + written;
    let dropped = state
        .dropped
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let failed = state.failed.load(Ordering::Relaxed);
    let mut rejects_by_reason = before.rejects_by_reason;
    let this_run = dropped
        .iter()
        .map(|(&reason, &count)| (reason, count))
        .chain([(DropReason::RequestFailed, failed)]);
    for (reason, count) in this_run.filter(|&(_, count)| count > 0) {
        *rejects_by_reason.entry(reason).or_default() += count;
    }
    let wall = started.elapsed().as_secs_f64();
    let requests = teacher.counters().snapshot();
    let spend = ledger.snapshot();
    let mut wanted: Vec<&str> = vec!["slot"];
    wanted.extend(corpus.summary_columns());
    let mut frames = Vec::new();
    for path in shards::list_files(&opts.out, &RECORDS)? {
        frames.push(table::read_columns(&path, &wanted)?);
    }
    let frame = frames.into_iter().reduce(|a, b| {
        a.vstack(&b)
            .expect("shards of one directory share a schema")
    });
    let corpus_summary = match frame {
        None => Value::Null,
        Some(f) => corpus
            .summarize(&f)
            .map_err(|source| GenerateError::Summary {
                path: opts.out.clone(),
                kind: corpus.kind(),
                source,
            })?,
    };
    let failed_requests = rejects_by_reason
        .get(&DropReason::RequestFailed)
        .copied()
        .unwrap_or(0);
    let checked = records + rejects_by_reason.values().sum::<u64>() - failed_requests;
    let share = |count: u64| {
        if checked == 0 {
            0.0
        } else {
            count as f64 / checked as f64
        }
    };
    Ok(Stats {
        kind: corpus.kind().to_string(),
        model: teacher.model().to_string(),
        teacher_note: teacher.note().map(str::to_string),
        requested: opts.slots(),
        records,
        complete: done == opts.slots(),
        stopped: state.stopped(),
        run: RunStats {
            wall_seconds: wall,
            requests_per_second: if wall > 0.0 {
                requests.sent as f64 / wall
            } else {
                0.0
            },
            written,
            skipped_done: state.done_before.load(Ordering::Relaxed),
            dropped,
            failed_requests: failed,
            given_up_slots: state.exhausted.load(Ordering::Relaxed),
            requests,
            prompt_tokens: spend.prompt_tokens,
            completion_tokens: spend.completion_tokens,
            cost_usd: ledger.price().map(|_| spend.spent),
            price: ledger.price(),
        },
        answers_checked: checked,
        keep_rate: share(records),
        drop_rates: rejects_by_reason
            .iter()
            .filter(|&(&r, _)| r != DropReason::RequestFailed)
            .map(|(&r, &c)| (r, share(c)))
            .collect(),
        rejects_total: rejects_by_reason,
        low_keep: state.low_keep().cloned(),
        corpus: corpus_summary,
        diversity: sampled_diversity(&opts.out)?,
    })
}

/// The cheap diversity measures over the sample `phigen report` reads (the records whose ids hash
/// lowest), one shard's texts in memory at a time.
fn sampled_diversity(out: &Path) -> Result<Option<TextDiversity>, GenerateError> {
    let mut sample = Sampler::new(diversity::DEFAULT_SAMPLE);
    for path in shards::list_files(out, &RECORDS)? {
        let df = table::read_columns(&path, &["id", "text"])?;
        let ids = table::text_column(&df, &path, "id")?;
        let texts = table::text_column(&df, &path, "text")?;
        for (id, text) in ids.iter().zip(&texts) {
            if let (Some(id), Some(text)) = (id, text) {
                sample.offer(id, text, || ());
            }
        }
    }
    let sample = sample.into_sorted();
    let texts: Vec<&str> = sample.iter().map(|(t, _)| t.as_str()).collect();
    Ok((!texts.is_empty()).then(|| diversity::text_diversity(&texts)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::table::{cell_fits, Kind};
    use crate::classify::annotate::{self, Annotate, Rating, Sampled};
    use crate::eval::stories::{self as grading, Continuation, Grade, Grades};
    use crate::generate::exercises::Outcome;
    use crate::generate::exercises::{ExerciseChecks, ExerciseConstraints, Exercises};
    use crate::generate::prompt::Template;
    use crate::generate::stories::{self, Stories, StoryChecks, StoryConstraints, Vocabulary};
    use crate::generate::textbooks::{self, TextbookChecks, TextbookConstraints, Textbooks};
    use serde_json::json;

    /// The corpus columns each `Corpus::columns()` listed before rows were typed (commit
    /// 3f8779c): the Parquet schema of existing directories, which new shards must match.
    fn corpus_columns_of_earlier_versions(kind: &str) -> Schema {
        use Kind::*;
        match kind {
            "tinystories" => vec![
                ("verb", Text),
                ("noun", Text),
                ("adjective", Text),
                ("features", TextList),
                ("words_used", Bool),
                ("missing_words", TextList),
                ("dialogue_requested", Bool),
                ("has_dialogue", Bool),
                ("oov_share", Float),
                ("word_count", Int),
                ("opening", Text),
            ],
            "textbook" => vec![
                ("topic", Text),
                ("subtopic", Text),
                ("audience", Text),
                ("style", Text),
                ("code_blocks", Int),
                ("code_lines", Int),
                ("word_count", Int),
            ],
            "exercise" => vec![
                ("function_name", Text),
                ("topic", Text),
                ("difficulty", Text),
                ("code", Text),
                ("asserts", Int),
                ("outcome", Text),
                ("exec_seconds", Float),
            ],
            // Since issue 25: what of the file the prompt held (older parts lack these three;
            // readers of labels take only `file_id` and `score`).
            "educational_value" => vec![
                ("file_id", Text),
                ("content_hash", Text),
                ("kept_chars", Int),
                ("truncated_chars", Int),
                ("kept_tokens", Int),
                ("score", Int),
                ("reason", Text),
            ],
            "story_grade" => vec![
                ("index", Int),
                ("story_hash", Text),
                ("grammar", Int),
                ("creativity", Int),
                ("consistency", Int),
                ("plot", Int),
                ("age_group", Text),
            ],
            _ => panic!("no pinned schema for {kind}"),
        }
    }

    /// The record schema of commit 3f8779c: its fixed head, the corpus columns, its provenance.
    fn record_schema_of_earlier_versions(kind: &str) -> Schema {
        use Kind::*;
        let mut schema = vec![
            ("id", Text),
            ("kind", Text),
            ("slot", Int),
            ("attempt", Int),
            ("seed", Int),
            ("text", Text),
        ];
        schema.extend(corpus_columns_of_earlier_versions(kind));
        schema.extend(provenance_of_earlier_versions());
        schema
    }

    fn provenance_of_earlier_versions() -> Schema {
        use Kind::*;
        vec![
            ("template_id", Text),
            ("template_version", Int),
            ("template_hash", Text),
            ("prompt", Text),
            ("model", Text),
            ("temperature", Float),
            ("top_p", Float),
            ("max_tokens", Int),
            ("prompt_tokens", Int),
            ("completion_tokens", Int),
            ("finish_reason", Text),
            ("created_at", Text),
        ]
    }

    #[test]
    fn record_and_reject_schemas_are_those_earlier_versions_wrote() {
        for (kind, schema) in [
            ("tinystories", record_schema::<Stories>()),
            ("textbook", record_schema::<Textbooks>()),
            ("exercise", record_schema::<Exercises>()),
            ("educational_value", record_schema::<Annotate>()),
            ("story_grade", record_schema::<Grade>()),
        ] {
            assert_eq!(schema, record_schema_of_earlier_versions(kind), "{kind}");
        }
        let mut rejects = vec![
            ("id", Kind::Text),
            ("slot", Kind::Int),
            ("attempt", Kind::Int),
            ("reason", Kind::Text),
            ("detail", Kind::Text),
            ("text", Kind::Text),
        ];
        rejects.extend(provenance_of_earlier_versions());
        assert_eq!(reject_schema(), rejects);
    }

    fn provenance(answered: bool) -> Provenance {
        Provenance {
            template_id: "t".into(),
            template_version: 2,
            template_hash: "h".into(),
            prompt: "p".into(),
            model: "m".into(),
            temperature: 0.7,
            top_p: 0.9,
            max_tokens: 100,
            prompt_tokens: answered.then_some(11),
            completion_tokens: answered.then_some(22),
            finish_reason: answered.then_some("stop"),
            created_at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    /// One record of corpus `C` as `part-*.parquet` holds it, by column name, after checking that
    /// there is one cell per column and each cell is of its column's type (a cell of another type
    /// would be stored as null).
    fn record<C: Corpus>(constraints: C::Constraints, checks: C::Checks) -> Map<String, Value> {
        let head = RecordHead {
            id: "0123".into(),
            kind: "k",
            slot: 4,
            attempt: 1,
            seed: 7,
            text: "the answer".into(),
        };
        let cells = record_cells::<C>(head, constraints, checks, provenance(true));
        let schema = record_schema::<C>();
        assert_eq!(cells.len(), schema.len());
        for ((name, kind), cell) in schema.iter().zip(&cells) {
            assert!(
                cell_fits(*kind, cell),
                "{name} is {kind:?} but holds {cell}"
            );
            assert!(!cell.is_null(), "{name} is null in a record that sets it");
        }
        schema
            .iter()
            .map(|(n, _)| n.to_string())
            .zip(cells)
            .collect()
    }

    /// Summarises one record with the corpus's own `summarize`, over the columns it asks for.
    fn summary<C: Corpus>(corpus: &C, record: &Map<String, Value>) -> Value {
        let schema = record_schema::<C>();
        let df = table::frame(&schema, std::slice::from_ref(record)).unwrap();
        let df = df.select(corpus.summary_columns()).unwrap();
        corpus.summarize(&df).unwrap()
    }

    fn template(name: &str, text: &str) -> Template {
        Template::parse(name, text).unwrap()
    }

    /// Each corpus's values land under their own column names: the fields given here come back
    /// by name, and the corpus's summary (which reads its columns by name) sees them.
    #[test]
    fn record_cells_line_up_with_their_columns() {
        let r = record::<Stories>(
            StoryConstraints {
                verb: "jump".into(),
                noun: "ball".into(),
                adjective: "red".into(),
                features: vec!["Dialogue".into()],
            },
            StoryChecks {
                words_used: false,
                missing_words: vec!["ball".into()],
                dialogue_requested: true,
                has_dialogue: true,
                oov_share: 0.25,
                word_count: 120,
                opening: "once upon a".into(),
            },
        );
        assert_eq!(
            (&r["id"], &r["slot"], &r["seed"], &r["text"]),
            (&json!("0123"), &json!(4), &json!(7), &json!("the answer"))
        );
        assert_eq!(
            (&r["noun"], &r["features"], &r["missing_words"]),
            (&json!("ball"), &json!(["Dialogue"]), &json!(["ball"]))
        );
        assert_eq!(
            (&r["oov_share"], &r["word_count"], &r["opening"]),
            (&json!(0.25), &json!(120), &json!("once upon a"))
        );
        assert_eq!(
            (&r["temperature"], &r["prompt_tokens"], &r["finish_reason"]),
            (&json!(0.7f32), &json!(11), &json!("stop"))
        );
        let corpus = Stories::new(
            template("tinystories.txt", stories::BUILTIN_TEMPLATE),
            Vocabulary::load(None).unwrap(),
            3,
            false,
        );
        let s = summary(&corpus, &r);
        assert_eq!(
            (&s["stories"], &s["words_used_share"], &s["mean_word_count"]),
            (&json!(1), &json!(0.0), &json!(120.0))
        );

        let r = record::<Textbooks>(
            TextbookConstraints {
                topic: "loops".into(),
                subtopic: Some("while".into()),
                audience: "beginners".into(),
                style: "terse".into(),
            },
            TextbookChecks {
                code_blocks: 2,
                code_lines: 9,
                word_count: 300,
            },
        );
        assert_eq!(
            (&r["subtopic"], &r["style"], &r["code_lines"]),
            (&json!("while"), &json!("terse"), &json!(9))
        );
        let corpus = Textbooks::new(
            template("textbook.txt", textbooks::BUILTIN_TEMPLATE),
            vec![],
            vec![],
            vec![],
            None,
        );
        let s = summary(&corpus, &r);
        assert_eq!(
            (&s["mean_code_blocks"], &s["per_audience"]),
            (&json!(2.0), &json!({"beginners": 1}))
        );

        let r = record::<Exercises>(
            ExerciseConstraints {
                function_name: "add_pairs".into(),
                topic: "lists".into(),
                difficulty: "easy".into(),
            },
            ExerciseChecks {
                code: "assert True".into(),
                asserts: 1,
                outcome: Outcome::Passed,
                exec_seconds: 0.5,
            },
        );
        assert_eq!(
            (&r["function_name"], &r["outcome"], &r["exec_seconds"]),
            (&json!("add_pairs"), &json!("passed"), &json!(0.5))
        );

        let r = record::<Annotate>(
            Sampled {
                file_id: "src/a.py".into(),
                content_hash: "abcd".into(),
                kept_chars: 8,
                truncated_chars: 120,
                kept_tokens: 3,
                head: "print(1)".into(),
            },
            Rating {
                score: 4,
                reason: "clear".into(),
            },
        );
        assert!(!r.contains_key("head"), "the head is in the prompt only");
        assert_eq!(
            (&r["file_id"], &r["score"], &r["reason"]),
            (&json!("src/a.py"), &json!(4), &json!("clear"))
        );
        assert_eq!(
            (&r["kept_chars"], &r["truncated_chars"], &r["kept_tokens"]),
            (&json!(8), &json!(120), &json!(3))
        );
        let corpus = Annotate::new(
            template("educational-value.txt", annotate::BUILTIN_TEMPLATE),
            vec![],
        )
        .with_rater_note("a small rater");
        let s = summary(&corpus, &r);
        assert_eq!(s["score_histogram"], json!([0, 0, 0, 0, 1, 0]));
        assert_eq!(s["rater_note"], "a small rater");

        let story = grading::Story::new(&Continuation {
            index: 3,
            beginning: "Once".into(),
            completion: " upon a time.".into(),
        });
        let hash = story.story_hash.clone();
        let r = record::<Grade>(
            story,
            Grades {
                grammar: 8,
                creativity: 6,
                consistency: 9,
                plot: 7,
                age_group: "B".into(),
            },
        );
        assert_eq!(
            (&r["index"], &r["story_hash"], &r["plot"], &r["age_group"]),
            (&json!(3), &json!(hash), &json!(7), &json!("B"))
        );
        assert!(!r.contains_key("beginning") && !r.contains_key("completion"));
    }

    /// A reject of a failed request has nulls where there was no answer; every other cell is of
    /// its column's type, and the reason is stored under its name.
    #[test]
    fn reject_cells_line_up_with_their_columns() {
        let mut cells = Vec::new();
        RejectHead {
            id: "0123".into(),
            slot: 2,
            attempt: 0,
            reason: DropReason::RequestFailed,
            detail: "HTTP 500".into(),
            text: None,
        }
        .push_cells(&mut cells);
        provenance(false).push_cells(&mut cells);
        let schema = reject_schema();
        assert_eq!(cells.len(), schema.len());
        let r: Map<String, Value> = schema
            .iter()
            .zip(cells)
            .map(|((name, kind), cell)| {
                assert!(cell_fits(*kind, &cell), "{name}: {cell}");
                (name.to_string(), cell)
            })
            .collect();
        assert_eq!(r["reason"], json!("request_failed"));
        assert!(r["text"].is_null() && r["finish_reason"].is_null());
    }

    /// A summary that cannot read its columns is an error, not an `{"error": …}` inside stats.json.
    #[test]
    fn a_summary_that_fails_is_an_error() {
        let corpus = Textbooks::new(
            template("textbook.txt", textbooks::BUILTIN_TEMPLATE),
            vec![],
            vec![],
            vec![],
            None,
        );
        let only_topic: Schema = vec![("topic", Kind::Text)];
        let df = table::frame(&only_topic, &Vec::<Vec<Value>>::new()).unwrap();
        assert!(corpus.summarize(&df).is_err());
    }

    /// Reasons read back from the rejects are typed; one phigen never writes stops the scan with
    /// the file's path instead of being counted under an unknown name.
    #[test]
    fn rejects_are_read_back_as_typed_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("rejects.journal.jsonl");
        let line = |id: &str, attempt: u32, reason: &str| {
            json!({"id": id, "slot": 5, "attempt": attempt, "reason": reason}).to_string() + "\n"
        };
        std::fs::write(
            &journal,
            line("a", 0, "too_short") + &line("b", 1, "request_failed"),
        )
        .unwrap();
        let r = Resume::scan(dir.path()).unwrap();
        assert_eq!(
            r.rejects_by_reason,
            BTreeMap::from([(DropReason::TooShort, 1), (DropReason::RequestFailed, 1)])
        );
        // The failed request's attempt is sent again; the dropped answer's is not.
        assert_eq!(r.next_attempt[&5], 1);
        std::fs::write(&journal, line("c", 0, "too-short")).unwrap();
        let e = Resume::scan(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("rejects.journal.jsonl") && e.contains("`too-short`"),
            "{e}"
        );
    }

    /// The low-keep report: not before 50 answers, not at 20% kept or more, and its cause read
    /// from the reasons as issue 25 item 3 asks (mostly `truncated`: the output limit; mostly
    /// content checks with a small local teacher: the teacher). Counts are made up to sit on
    /// either side of the thresholds.
    #[test]
    fn a_low_keep_rate_is_judged_after_50_answers_with_its_likely_cause() {
        use DropReason::*;
        let truncated = BTreeMap::from([(Truncated, 40), (TooShort, 5), (RequestFailed, 99)]);
        assert_eq!(LowKeep::judge(4, &truncated, true), None, "49 answers");
        let r = LowKeep::judge(5, &truncated, true).unwrap();
        assert_eq!(
            (r.answers, r.kept, r.cause),
            (50, 5, LikelyCause::MaxTokens)
        );
        assert_eq!(r.top_reasons, vec![(Truncated, 40), (TooShort, 5)]);
        // 10 of 50 is 20%: not low.
        let short = BTreeMap::from([(TooShort, 25), (SyntaxError, 10), (NoCode, 3), (Empty, 2)]);
        assert_eq!(LowKeep::judge(10, &short, true), None);
        // One more drop: 10 of 51.
        let short = BTreeMap::from([(TooShort, 26), (SyntaxError, 10), (NoCode, 3), (Empty, 2)]);
        let r = LowKeep::judge(10, &short, true).unwrap();
        assert_eq!(r.cause, LikelyCause::SmallTeacher);
        assert_eq!(
            r.top_reasons,
            vec![(TooShort, 26), (SyntaxError, 10), (NoCode, 3)]
        );
        assert_eq!(
            LowKeep::judge(10, &short, false).unwrap().cause,
            LikelyCause::Unclear
        );
    }
}

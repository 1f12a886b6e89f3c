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
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::{common_checks, normalized_text_hash, Corpus, Drop, DropReason};
use crate::artifact::atomic;
use crate::artifact::shards::{self, Layout, ShardError, ShardWriter};
use crate::artifact::table::{self, Kind, Schema};
use crate::teacher::pricing::{Ledger, Price, Reservation};
use crate::teacher::retry::RequestCountsSnapshot;
use crate::teacher::{Answer, Sampling, Teacher, TeacherError};

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

    fn count_drop(&self, reason: DropReason) {
        *self
            .dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }
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
                let pairs: [(&'static str, String, String); 6] = [
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
    rejects_by_reason: BTreeMap<String, u64>,
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
                    r.note_reject(slot as u64, attempt as u32, reason);
                }
            }
        }
        for row in shards::read_journal_rows(&out.join("rejects.journal.jsonl"))? {
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
                r.note_reject(slot, attempt as u32, reason);
            }
        }
        Ok(r)
    }

    fn note_reject(&mut self, slot: u64, attempt: u32, reason: &str) {
        *self
            .rejects_by_reason
            .entry(reason.to_string())
            .or_default() += 1;
        // A failed request did not see an answer: the same attempt is sent again later.
        if DropReason::parse(reason) != Some(DropReason::RequestFailed) {
            let next = self.next_attempt.entry(slot).or_default();
            *next = (*next).max(attempt + 1);
        }
    }
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
    /// The constraints as JSON fields (serialized once: for the id and for the record's columns).
    fields: Map<String, Value>,
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
        let fields = match value {
            Value::Object(fields) => fields,
            _ => Map::new(),
        };
        Ok(Job {
            slot,
            attempt,
            id,
            prompt,
            constraints,
            fields,
        })
    }

    fn record_schema(&self) -> Schema {
        let mut schema: Schema = vec![
            ("id", Kind::Text),
            ("kind", Kind::Text),
            ("slot", Kind::Int),
            ("attempt", Kind::Int),
            ("seed", Kind::Int),
            ("text", Kind::Text),
        ];
        schema.extend(self.corpus.columns());
        schema.extend(provenance_schema());
        schema
    }

    /// The cells of [`provenance_schema`], in its order: prompt, teacher, sampling, usage.
    fn provenance(&self, prompt: String, answer: Option<&Answer>) -> [Value; 12] {
        let t = self.corpus.template();
        [
            json!(t.id),
            json!(t.version),
            json!(t.hash),
            Value::String(prompt),
            json!(self.model),
            json!(self.sampling.temperature),
            json!(self.sampling.top_p),
            json!(self.sampling.max_tokens),
            json!(answer.map(|a| a.usage.prompt_tokens)),
            json!(answer.map(|a| a.usage.completion_tokens)),
            json!(answer.map(|a| a.finish_reason.as_str())),
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        ]
    }
}

/// The columns every record and reject shares, in the order [`Plan::provenance`] fills them.
fn provenance_schema() -> Schema {
    vec![
        ("template_id", Kind::Text),
        ("template_version", Kind::Int),
        ("template_hash", Kind::Text),
        ("prompt", Kind::Text),
        ("model", Kind::Text),
        ("temperature", Kind::Float),
        ("top_p", Kind::Float),
        ("max_tokens", Kind::Int),
        ("prompt_tokens", Kind::Int),
        ("completion_tokens", Kind::Int),
        ("finish_reason", Kind::Text),
        ("created_at", Kind::Text),
    ]
}

fn reject_schema() -> Schema {
    let mut schema: Schema = vec![
        ("id", Kind::Text),
        ("slot", Kind::Int),
        ("attempt", Kind::Int),
        ("reason", Kind::Text),
        ("detail", Kind::Text),
        ("text", Kind::Text),
    ];
    schema.extend(provenance_schema());
    schema
}

/// A serde struct's fields by name.
fn fields(value: &impl Serialize) -> Map<String, Value> {
    match serde_json::to_value(value).expect("checks and sampling always serialize") {
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
        .filter(|s| !resume.done_slots.contains(s))
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
        requested: opts.n,
        already_done: resume.done_slots.len() as u64,
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
    pub rejects_total: BTreeMap<String, u64>,
    /// Answers that reached the checks (kept + dropped, failed requests excluded), all runs.
    pub answers_checked: u64,
    /// Share of checked answers kept (e.g. the pass rate of exercises).
    pub keep_rate: f64,
    /// Share of checked answers dropped, by reason (e.g. `syntax_error` = 1 − the parse rate).
    pub drop_rates: BTreeMap<String, f64>,
    pub corpus: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunStats {
    pub wall_seconds: f64,
    pub requests_per_second: f64,
    pub written: u64,
    pub skipped_done: u64,
    pub dropped: BTreeMap<String, u64>,
    pub failed_requests: u64,
    pub given_up_slots: u64,
    pub requests: RequestCountsSnapshot,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: Option<f64>,
    pub price: Option<Price>,
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
    /// `corpus.columns()`, asked once.
    corpus_columns: Schema,
    max_attempts: u32,
    count_prompt_tokens: bool,
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
            let answer = match self.teacher.chat(&job.prompt).await {
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
                        .send(Output::Record(self.record(job, answer, &checks)));
                    return Ok(());
                }
                Err(drop) => self.reject(job, Some(&answer), drop),
            }
        }
        self.state.exhausted.fetch_add(1, Ordering::Relaxed);
        Ok(())
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

    /// The row of a kept answer, in the order of `record_schema`.
    fn record(&self, job: Job<C>, mut answer: Answer, checks: &C::Checks) -> Vec<Value> {
        let mut row = vec![
            Value::String(job.id),
            json!(self.plan.corpus.kind()),
            json!(job.slot),
            json!(job.attempt),
            json!(self.plan.seed),
            Value::String(std::mem::take(&mut answer.text)),
        ];
        let mut named = job.fields;
        named.extend(fields(checks));
        let mut cell = |name: &str| named.remove(name).unwrap_or(Value::Null);
        row.extend(self.corpus_columns.iter().map(|(name, _)| cell(name)));
        row.extend(self.plan.provenance(job.prompt, Some(&answer)));
        row
    }

    fn reject(&self, job: Job<C>, answer: Option<&Answer>, drop: Drop) {
        tracing::debug!(slot = job.slot, attempt = job.attempt, reason = drop.reason.as_str(), detail = %drop.detail, "dropped");
        if drop.reason != DropReason::RequestFailed {
            self.state.count_drop(drop.reason);
        }
        let mut row = vec![
            Value::String(job.id),
            json!(job.slot),
            json!(job.attempt),
            json!(drop.reason.as_str()),
            json!(drop.detail),
            json!(answer.map(|a| a.text.as_str())),
        ];
        row.extend(self.plan.provenance(job.prompt, answer));
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
    let mut records = ShardWriter::open(
        &opts.out,
        "records",
        RECORDS,
        plan.record_schema(),
        opts.shard_size,
    )?;
    let mut rejects =
        ShardWriter::open(&opts.out, "rejects", REJECTS, reject_schema(), usize::MAX)?;
    let mut resume = Resume::scan(&opts.out)?;
    let (pending, given_up_before) = pending_slots(&resume, opts);
    state.total.store(opts.n, Ordering::Relaxed);
    // Slots of 0..n already filled (an earlier run with a larger --n may have filled more).
    let done_before = resume.done_slots.iter().filter(|&&s| s < opts.n).count();
    state
        .done_before
        .store(done_before as u64, Ordering::Relaxed);
    tracing::info!(
        pending = pending.len(),
        done = resume.done_slots.len(),
        given_up = given_up_before,
        "starting"
    );

    let (tx, mut rx) = mpsc::unbounded_channel::<Output>();
    let writer_state = state.clone();
    let writer = std::thread::spawn(move || -> Result<(), ShardError> {
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
    });

    let worker = Arc::new(Worker {
        count_prompt_tokens: ledger.price().is_some(),
        corpus_columns: corpus.columns(),
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
    let dropped: BTreeMap<String, u64> = state
        .dropped
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(reason, &count)| (reason.as_str().to_string(), count))
        .collect();
    let failed = state.failed.load(Ordering::Relaxed);
    let mut rejects_by_reason = before.rejects_by_reason;
    let this_run = dropped
        .iter()
        .map(|(reason, &count)| (reason.as_str(), count))
        .chain([(DropReason::RequestFailed.as_str(), failed)]);
    for (reason, count) in this_run.filter(|&(_, count)| count > 0) {
        *rejects_by_reason.entry(reason.to_string()).or_default() += count;
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
    let corpus_summary = frame.map_or(Value::Null, |f| corpus.summarize(&f));
    let failed_requests = rejects_by_reason
        .get(DropReason::RequestFailed.as_str())
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
        requested: opts.n,
        records,
        complete: done == opts.n,
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
            .filter(|(r, _)| r.as_str() != DropReason::RequestFailed.as_str())
            .map(|(r, &c)| (r.clone(), share(c)))
            .collect(),
        rejects_total: rejects_by_reason,
        corpus: corpus_summary,
    })
}

//! Preference pairs for DPO (`phigen prefs`), as phi-3's post-training makes them: a student
//! model samples several responses to each prompt, a teacher judges them, and the best and the
//! worst become a `{prompt, chosen, rejected}` pair.
//!
//! Reads: prompts (jsonl or Parquet with `prompt` — a string or a messages list — or `messages`,
//! whose turns before the first assistant turn are the prompt; a directory of such files, e.g. a
//! chat-data output; or a text file, one prompt a line) and the student (a checkpoint directory or
//! a .gguf file, run by the local engine with its own chat template). Writes into `OUT/`:
//! - `pairs.jsonl`: the pairs, each with the judge's scores (in sample order), the order the
//!   responses were shown in, the judge model, the rubric's id, version and hash, the student and
//!   its checkpoint hash, and the seed. A DPO stage reads the directory as it is: pairs are the
//!   only jsonl or Parquet file at its top (the DPO reader takes every such file of a directory,
//!   so a Parquet copy would be read twice);
//! - `prefs.json`: counts, and every dropped prompt by reason;
//! - `work/`: the student's samples (a journal, resumed), the judge's records (the generation
//!   engine's output, resumed: a killed run sends no judged prompt again) and rejects.
//!
//! **Determinism.** Sample k of prompt p is drawn with a seed derived from (seed, p's id, k), so
//! the responses do not depend on how many are generated at once. The order the judge sees them in
//! is drawn from (seed, p's id) and recorded; the scores are mapped back to sample order before
//! anything else reads them, which cancels a judge's position bias on average.
//!
//! **Import.** `--input FILE…` validates existing `{prompt, chosen, rejected}` jsonl or Parquet
//! into the same `pairs.jsonl`; a bad row is dropped with its file, line and reason.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use polars::prelude::{DataFrame, PolarsResult};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::engine::{GenerateError, GenerateOptions, RunState, Stats};
use super::prompt::{Template, TemplateError};
use super::run::{run_corpus, Progress};
use super::{Corpus, Drop, DropReason};
use crate::artifact::atomic;
use crate::artifact::outdir::{DirLock, OutDirError};
use crate::artifact::records::{self, RecordsError};
use crate::artifact::shards::{self, Layout};
use crate::artifact::table::{self, row};
use crate::model::chat::Message;
use crate::teacher::engine::{Engine, EngineError, Request};
use crate::teacher::factory::{local_engine, TeacherConfig};
use crate::teacher::{FinishReason, Sampling, TeacherError};

pub const BUILTIN_RUBRIC: &str = include_str!("../../prompts/prefs-judge.txt");
/// The pairs, the only table at the top of the output directory.
pub const PAIRS_FILE: &str = "pairs.jsonl";
pub const STATS_FILE: &str = "prefs.json";
/// Samples, judge records and rejects: below the top, where a DPO stage does not look.
pub const WORK_DIR: &str = "work";
const RECORDS: Layout = Layout::Parts { prefix: "part" };
/// Output tokens of one verdict: a short explanation and a line per response.
const VERDICT_MAX_TOKENS: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PrefsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}; expected a `prompt` (a string or a messages list) or `messages` with a user turn before the first assistant turn")]
    BadPrompt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("--prompts {path}: no prompt found (empty lines are skipped); give a file with at least one prompt")]
    NoPrompts { path: PathBuf },
    #[error("--samples {found}: a pair needs two responses to compare; pass 2 or more")]
    TooFewSamples { found: usize },
    #[error("--input {path}: no jsonl or Parquet file there; give `{{prompt, chosen, rejected}}` jsonl or Parquet files")]
    NoInput { path: PathBuf },
    #[error("{path}: {reason}")]
    Table { path: PathBuf, reason: String },
    #[error(transparent)]
    Records(#[from] RecordsError),
    #[error("the student {student}: {source}")]
    Student {
        student: String,
        source: TeacherError,
    },
    #[error("the student {student} failed while sampling: {reason}")]
    Sampling { student: String, reason: String },
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    OutDir(#[from] OutDirError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PrefsError + '_ {
    move |source| PrefsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A prompt or an answer: a plain string (the user's message, the assistant's answer) or a list
/// of chat messages, as the DPO reader takes them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

impl Turns {
    /// The conversation the student continues.
    fn messages(&self) -> Vec<Message> {
        match self {
            Turns::Text(t) => vec![Message::user(t)],
            Turns::Messages(m) => m.clone(),
        }
    }

    /// How the judge reads it: the text, or each message as `role: content`.
    fn shown(&self) -> String {
        match self {
            Turns::Text(t) => t.clone(),
            Turns::Messages(m) => m
                .iter()
                .map(|m| format!("{}: {}", m.role, m.content))
                .collect::<Vec<_>>()
                .join("\n\n"),
        }
    }

    fn is_blank(&self) -> bool {
        match self {
            Turns::Text(t) => t.trim().is_empty(),
            Turns::Messages(m) => m.iter().all(|m| m.content.trim().is_empty()),
        }
    }

    /// A single user message is written as its text, as most preference data sets do.
    fn simplified(messages: Vec<Message>) -> Turns {
        match messages.as_slice() {
            [one] if one.role == "user" => Turns::Text(one.content.clone()),
            _ => Turns::Messages(messages),
        }
    }
}

/// One prompt to make a pair for; `id` hashes the prompt, so the same prompt keeps its samples,
/// order and verdict across runs (and across files that list it).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptItem {
    pub id: String,
    pub prompt: Turns,
}

fn prompt_id(prompt: &Turns) -> String {
    let bytes = serde_json::to_vec(prompt).expect("turns serialize");
    blake3::hash(&bytes).to_hex()[..16].to_string()
}

/// The prompt of one table record: `prompt`, else the turns of `messages` before its first
/// assistant turn (a chat-data conversation's first user turn, with any system turn before it).
fn record_prompt(v: Value) -> Result<Turns, String> {
    #[derive(Deserialize)]
    struct Record {
        #[serde(default)]
        prompt: Option<Turns>,
        #[serde(default)]
        messages: Option<Vec<Message>>,
    }
    let r: Record = serde_json::from_value(v).map_err(|e| e.to_string())?;
    let turns = match (r.prompt, r.messages) {
        (Some(p), _) => p,
        (None, Some(m)) => {
            let head: Vec<Message> = m
                .into_iter()
                .take_while(|m| m.role != "assistant")
                .collect();
            if !head.iter().any(|m| m.role == "user") {
                return Err("`messages` has no user turn before its first assistant turn".into());
            }
            Turns::simplified(head)
        }
        (None, None) => return Err("the record has neither `prompt` nor `messages`".into()),
    };
    if turns.is_blank() {
        return Err("the prompt is empty".into());
    }
    Ok(turns)
}

/// Whether a file of a directory holds records to read: not the rejects or journals of a
/// generation engine's output.
fn is_record_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with("rejects") && !name.contains(".journal.")
}

/// The table files `path` names: itself, or a directory's jsonl and Parquet files (sorted).
fn table_files(path: &Path) -> Result<Vec<PathBuf>, PrefsError> {
    let files = records::table_files(&[path.to_path_buf()])?;
    Ok(files.into_iter().filter(|f| is_record_file(f)).collect())
}

/// The prompts of `path` (see the module documentation), duplicates dropped (first kept).
pub fn read_prompts(path: &Path) -> Result<Vec<PromptItem>, PrefsError> {
    let tables = path.is_dir() || records::is_table_file(path);
    let mut prompts = Vec::new();
    if tables {
        for file in table_files(path)? {
            for record in records::read(&file)? {
                let line = record.number();
                let turns = record.value.and_then(record_prompt).map_err(|reason| {
                    PrefsError::BadPrompt {
                        path: file.clone(),
                        line,
                        reason,
                    }
                })?;
                prompts.push(turns);
            }
        }
    } else {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| Turns::Text(l.to_string())),
        );
    }
    let mut seen = HashSet::new();
    let items: Vec<PromptItem> = prompts
        .into_iter()
        .map(|prompt| PromptItem {
            id: prompt_id(&prompt),
            prompt,
        })
        .filter(|p| seen.insert(p.id.clone()))
        .collect();
    if items.is_empty() {
        return Err(PrefsError::NoPrompts {
            path: path.to_path_buf(),
        });
    }
    Ok(items)
}

/// 64 bits of blake3 over a purpose tag and the parts, for the seeds this module derives.
fn derive(tag: &str, seed: u64, id: &str, k: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(tag.as_bytes());
    h.update(&seed.to_le_bytes());
    h.update(id.as_bytes());
    h.update(&k.to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The sampling seed of sample `k` of prompt `id`.
pub fn sample_seed(seed: u64, id: &str, k: usize) -> u64 {
    derive("phigen/prefs-sample", seed, id, k as u64)
}

/// The order the judge sees `m` responses of prompt `id` in: `order[shown] = sample index`.
pub fn shown_order(seed: u64, id: &str, m: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..m).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(derive("phigen/prefs-order", seed, id, m as u64));
    order.shuffle(&mut rng);
    order
}

/// Scores in shown order → scores in sample order (undoes [`shown_order`]).
pub fn unshuffle(order: &[usize], shown_scores: &[i64]) -> Vec<i64> {
    let mut scores = vec![0; order.len()];
    for (shown, &sample) in order.iter().enumerate() {
        scores[sample] = shown_scores[shown];
    }
    scores
}

/// The judge's `Response K: N/10` lines (the last of each K counts), in shown order.
pub fn parse_verdict(text: &str, count: usize) -> Result<Vec<i64>, Drop> {
    let mut found: BTreeMap<usize, String> = BTreeMap::new();
    for line in text.lines() {
        let clean = line.replace(['*', '#', '`'], "");
        let Some((label, value)) = clean.split_once(':') else {
            continue;
        };
        let label = label.trim().to_ascii_lowercase();
        let Some(k) = label
            .strip_prefix("response")
            .and_then(|k| k.trim().parse::<usize>().ok())
        else {
            continue;
        };
        if (1..=count).contains(&k) {
            found.insert(k, value.trim().to_string());
        }
    }
    (1..=count)
        .map(|k| {
            let v = found.get(&k).ok_or_else(|| {
                Drop::new(DropReason::Unparseable, format!("no `Response {k}:` line"))
            })?;
            let n: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
            match n.parse::<i64>() {
                Ok(n) if (1..=10).contains(&n) => Ok(n),
                _ => Err(Drop::new(
                    DropReason::Unparseable,
                    format!("`Response {k}: {v}` is not a score from 1 to 10"),
                )),
            }
        })
        .collect()
}

/// The responses block of the rubric, in shown order.
fn responses_block(responses: &[&str]) -> String {
    responses
        .iter()
        .enumerate()
        .map(|(i, r)| format!("### Response {}\n{}", i + 1, r.trim()))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// One sampled response (a line of the samples journal).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub id: String,
    pub k: usize,
    pub seed: u64,
    /// `None`: the student could not answer (the prompt does not fit its context).
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish: Option<FinishReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The student's settings: what it is and how it samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSampling {
    /// Responses per prompt (at least 2).
    pub samples: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Sequences the local engine batches; the responses do not depend on it.
    pub batch: usize,
}

impl StudentSampling {
    fn wire(&self) -> Sampling {
        Sampling {
            temperature: self.temperature as f32,
            top_p: self.top_p as f32,
            max_tokens: self.max_new_tokens.min(u32::MAX as usize) as u32,
            top_k: None,
            min_p: None,
            repetition_penalty: None,
            min_tokens: None,
        }
    }
}

/// blake3 of a student's weights and the files that decide how it reads and writes text:
/// a .gguf file whole; of a checkpoint directory `config.json`, its `model*.safetensors` weights
/// and index, the tokenizer and chat template files (`phigen.json` names a tiktoken tokenizer),
/// each with its name. Optimizer state and trainer files are left out: they do not change a
/// sample.
pub fn student_hash(path: &Path) -> Result<String, PrefsError> {
    let mut h = blake3::Hasher::new();
    if path.is_file() {
        let f = std::fs::File::open(path).map_err(io_err(path))?;
        h.update_reader(f).map_err(io_err(path))?;
        return Ok(h.finalize().to_hex()[..16].to_string());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io_err(path))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            matches!(
                name,
                "config.json"
                    | "model.safetensors.index.json"
                    | "tokenizer.json"
                    | "tokenizer_config.json"
                    | "generation_config.json"
                    | "phigen.json"
            ) || (name.starts_with("model") && name.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    for f in files {
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update(&[0]);
        let file = std::fs::File::open(&f).map_err(io_err(&f))?;
        h.update_reader(file).map_err(io_err(&f))?;
    }
    Ok(h.finalize().to_hex()[..16].to_string())
}

/// Samples `settings.samples` responses of every prompt with `engine`, appending each to the
/// journal at `path` as it arrives; samples already there are kept. Returns them by prompt id,
/// each prompt's in sample order.
pub async fn sample_all(
    engine: Arc<Engine>,
    prompts: &[PromptItem],
    settings: &StudentSampling,
    path: &Path,
    state: &RunState,
) -> Result<HashMap<String, Vec<Sample>>, PrefsError> {
    let mut have: HashMap<(String, usize), Sample> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(path) {
        // A line cut by a kill is skipped: that sample is drawn again.
        for s in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Sample>(l).ok())
        {
            have.insert((s.id.clone(), s.k), s);
        }
    }
    let pending: Vec<(&PromptItem, usize)> = prompts
        .iter()
        .flat_map(|p| (0..settings.samples).map(move |k| (p, k)))
        .filter(|(p, k)| !have.contains_key(&(p.id.clone(), *k)))
        .collect();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    let wire = settings.wire();
    let student = engine.model().name.clone();
    let mut answers = futures::stream::iter(pending)
        .map(|(p, k)| {
            let engine = engine.clone();
            let seed = sample_seed(settings.seed, &p.id, k);
            let student = student.clone();
            async move {
                let ids = engine
                    .model()
                    .prompt_ids(&p.prompt.messages())
                    .map_err(|e| PrefsError::Sampling {
                        student: student.clone(),
                        reason: e.to_string(),
                    })?;
                let (text, finish, error) = match engine
                    .complete(Request::new(ids, &wire, seed))
                    .await
                {
                    Ok(c) => (Some(c.text), Some(c.finish), None),
                    Err(e @ EngineError::PromptTooLong { .. }) => (None, None, Some(e.to_string())),
                    Err(e) => {
                        return Err(PrefsError::Sampling {
                            student,
                            reason: e.to_string(),
                        })
                    }
                };
                Ok(Sample {
                    id: p.id.clone(),
                    k,
                    seed,
                    text,
                    finish,
                    error,
                })
            }
        })
        .buffer_unordered(settings.batch.max(1));
    while let Some(sample) = answers.next().await {
        let sample = sample?;
        writeln!(
            file,
            "{}",
            serde_json::to_string(&sample).expect("a sample serializes")
        )
        .map_err(io_err(path))?;
        have.insert((sample.id.clone(), sample.k), sample);
        if state.stopped().is_some() {
            break;
        }
    }
    let mut out: HashMap<String, Vec<Sample>> = HashMap::new();
    for p in prompts {
        let samples: Vec<Sample> = (0..settings.samples)
            .filter_map(|k| have.remove(&(p.id.clone(), k)))
            .collect();
        out.insert(p.id.clone(), samples);
    }
    Ok(out)
}

row! {
    /// One prompt to judge: its responses (distinct, in shown order) are in the prompt; the
    /// columns say which samples they are.
    #[derive(Clone, Debug, Serialize)]
    pub struct Shown {
        pub record_id: String,
        /// The sample index of each shown response, comma-separated: `order[shown] = sample`.
        pub order: String,
        /// blake3 of the responses, so a verdict is reused only for the same texts.
        pub responses_hash: String,
    } not columns {
        #[serde(skip)]
        prompt: String,
        #[serde(skip)]
        responses: Vec<String>,
        #[serde(skip)]
        order_list: Vec<usize>,
    }
}

row! {
    /// The judge's scores mapped back to sample order, comma-separated.
    #[derive(Clone, Debug, Serialize, PartialEq)]
    pub struct Scores {
        pub scores: String,
    }
}

/// The judging corpus of the generation engine: slot `i` judges the responses of item `i`.
pub struct Judge {
    template: Template,
    items: Vec<Shown>,
}

impl Corpus for Judge {
    type Constraints = Shown;
    type Checks = Scores;

    fn kind(&self) -> &'static str {
        "prefs_judge"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, slot: u64, _rng: &mut ChaCha8Rng) -> Shown {
        self.items[slot as usize].clone()
    }

    fn prompt_vars(&self, s: &Shown) -> Vec<(&'static str, String)> {
        let responses: Vec<&str> = s.responses.iter().map(String::as_str).collect();
        vec![
            ("prompt", s.prompt.clone()),
            ("responses", responses_block(&responses)),
            ("count", s.responses.len().to_string()),
        ]
    }

    fn check(&self, s: &Shown, text: &str) -> impl Future<Output = Result<Scores, Drop>> + Send {
        let scores = parse_verdict(text, s.responses.len()).map(|shown| Scores {
            scores: join(&unshuffle(&s.order_list, &shown)),
        });
        std::future::ready(scores)
    }

    fn unique_answers(&self) -> bool {
        false
    }

    fn word_bounds(&self) -> (usize, usize) {
        (2, 2000)
    }

    fn typical_completion_tokens(&self) -> u64 {
        200
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec!["scores"]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        Ok(json!({ "judged": df.height() }))
    }
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

/// One line of `pairs.jsonl`. `prompt`, `chosen` and `rejected` are what a DPO stage reads; the
/// rest says where the pair comes from (absent for imported pairs, which carry `source`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub id: String,
    pub prompt: Turns,
    pub chosen: Turns,
    pub rejected: Turns,
    /// The judge's scores, in sample order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_sample: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_sample: Option<usize>,
    /// The sample shown first, second, … to the judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
    /// `id vVERSION (hash)` of the rubric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rubric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `FILE:LINE` of an imported pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Why a prompt (or an imported row) made no pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairDrop {
    /// Every response the same text, or (import) chosen equals rejected.
    Identical,
    /// The best and the worst response got the same score.
    Tie,
    /// No verdict: the judge's answers did not parse within the attempts, or its requests failed.
    Unjudged,
    /// The student could not answer (the prompt does not fit its context).
    StudentFailed,
    /// An imported row that is not a `{prompt, chosen, rejected}` record.
    Invalid,
}

/// A dropped prompt or row, written to `work/rejects.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct Rejected {
    pub reason: PairDrop,
    /// The prompt id, or `FILE:LINE` of an imported row.
    pub what: String,
    pub detail: String,
}

/// `prefs.json`.
#[derive(Clone, Debug, Serialize)]
pub struct PrefsStats {
    /// `sample` (student and judge) or `import`.
    pub mode: &'static str,
    /// Prompts read, or rows imported.
    pub inputs: usize,
    pub pairs: usize,
    pub dropped: BTreeMap<PairDrop, usize>,
    /// Whether every prompt was sampled and judged (false: the run stopped; the same command goes on).
    pub complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rubric: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub student: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub student_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples_per_prompt: Option<usize>,
    /// The judging run's `stats.json` (requests, tokens, cost, drops by reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judging: Option<Value>,
    pub pairs_path: PathBuf,
    pub rejects_path: PathBuf,
}

/// `phigen prefs --prompts … --student …`: where the prompts and the student are, how the student
/// samples, and the rubric (the teacher, the judge, comes separately).
#[derive(Clone, Debug, PartialEq)]
pub struct PrefsSettings {
    pub prompts: PathBuf,
    /// A checkpoint directory or a .gguf file.
    pub student: PathBuf,
    pub out: PathBuf,
    pub sampling: StudentSampling,
    /// Default: the built-in prompts/prefs-judge.txt.
    pub rubric: Option<PathBuf>,
    /// Judge requests per prompt before it is given up (each unparseable verdict costs one).
    pub max_attempts: u32,
}

/// The engine output directory of one judge, rubric version and list of items. The engine knows
/// a slot by its number, so another list (prompts added, removed or re-sampled) is judged in a
/// directory of its own rather than reading another item's verdict; the same list — a run that
/// was killed, run again — resumes in the same one.
fn judge_dir(work: &Path, judge: &str, template: &Template, items: &[Shown]) -> PathBuf {
    let mut h = blake3::Hasher::new();
    for i in items {
        for part in [&i.record_id, &i.order, &i.responses_hash] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
    }
    let judge: String = judge
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    work.join("judge").join(format!(
        "{judge}-v{}-{}",
        template.version,
        &h.finalize().to_hex()[..8]
    ))
}

/// (record id, scores in sample order) of every judged record in `dir`, Parquet and journal.
fn read_scores(dir: &Path) -> Result<HashMap<String, Vec<i64>>, PrefsError> {
    let bad = |path: &Path, e: String| PrefsError::Table {
        path: path.to_path_buf(),
        reason: e,
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    let files = shards::list_files(dir, &RECORDS).map_err(|e| bad(dir, e.to_string()))?;
    for path in files {
        let df = table::read_columns(&path, &["record_id", "scores"])
            .map_err(|e| bad(&path, e.to_string()))?;
        let ids =
            table::text_column(&df, &path, "record_id").map_err(|e| bad(&path, e.to_string()))?;
        let scores =
            table::text_column(&df, &path, "scores").map_err(|e| bad(&path, e.to_string()))?;
        rows.extend(
            ids.into_iter()
                .zip(scores)
                .filter_map(|(i, s)| Some((i?, s?))),
        );
    }
    let journal = dir.join("records.journal.jsonl");
    for row in shards::read_journal_rows(&journal).map_err(|e| bad(&journal, e.to_string()))? {
        if let (Some(i), Some(s)) = (
            row.get("record_id").and_then(Value::as_str),
            row.get("scores").and_then(Value::as_str),
        ) {
            rows.push((i.to_string(), s.to_string()));
        }
    }
    let mut out = HashMap::new();
    for (id, scores) in rows {
        let parsed: Option<Vec<i64>> = scores.split(',').map(|s| s.parse().ok()).collect();
        if let Some(p) = parsed {
            out.entry(id).or_insert(p);
        }
    }
    Ok(out)
}

/// The distinct responses of a prompt's samples (the first sample of each text, up to
/// whitespace) as (sample index, text), and for each sample the index of its text among them.
fn distinct(samples: &[Sample]) -> (Vec<(usize, String)>, Vec<usize>) {
    let mut first: HashMap<[u8; 32], usize> = HashMap::new();
    let mut responses = Vec::new();
    let mut of_sample = Vec::new();
    for s in samples {
        let text = s.text.clone().unwrap_or_default();
        let at = *first
            .entry(super::normalized_text_hash(&text))
            .or_insert_with(|| {
                responses.push((s.k, text));
                responses.len() - 1
            });
        of_sample.push(at);
    }
    (responses, of_sample)
}

/// The pair a judged prompt makes: the best-scored response chosen, the worst rejected (the
/// first among equals), or a tie: indices into `scores`.
pub fn pick(scores: &[i64]) -> Result<(usize, usize), PairDrop> {
    let best = (0..scores.len()).max_by_key(|&i| (scores[i], std::cmp::Reverse(i)));
    let worst = (0..scores.len()).min_by_key(|&i| (scores[i], i));
    match (best, worst) {
        (Some(b), Some(w)) if scores[b] > scores[w] => Ok((b, w)),
        _ => Err(PairDrop::Tie),
    }
}

/// Writes `pairs.jsonl` (atomically) and `work/rejects.jsonl`.
fn write_outputs(out: &Path, pairs: &[Pair], rejects: &[Rejected]) -> Result<(), PrefsError> {
    let mut text = String::new();
    for p in pairs {
        text.push_str(&serde_json::to_string(p).expect("a pair serializes"));
        text.push('\n');
    }
    let path = out.join(PAIRS_FILE);
    atomic::write_bytes(&path, text.as_bytes()).map_err(io_err(&path))?;
    let mut text = String::new();
    for r in rejects {
        text.push_str(&serde_json::to_string(r).expect("a reject serializes"));
        text.push('\n');
    }
    let path = out.join(WORK_DIR).join("rejects.jsonl");
    atomic::write_bytes(&path, text.as_bytes()).map_err(io_err(&path))?;
    Ok(())
}

fn count(rejects: &[Rejected]) -> BTreeMap<PairDrop, usize> {
    let mut m = BTreeMap::new();
    for r in rejects {
        *m.entry(r.reason).or_default() += 1;
    }
    m
}

/// Samples every prompt with the student, has `teacher` judge each prompt's responses and
/// writes the pairs (see the module documentation). `state` stops the run (Ctrl-C); `progress`
/// follows the judging.
pub async fn run(
    s: &PrefsSettings,
    teacher: &TeacherConfig,
    state: Arc<RunState>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<PrefsStats, PrefsError> {
    if s.sampling.samples < 2 {
        return Err(PrefsError::TooFewSamples {
            found: s.sampling.samples,
        });
    }
    let template =
        Template::load_or_builtin(s.rubric.as_deref(), "prefs-judge.txt", BUILTIN_RUBRIC)?;
    let prompts = read_prompts(&s.prompts)?;
    let work = s.out.join(WORK_DIR);
    std::fs::create_dir_all(&work).map_err(io_err(&work))?;
    let _lock = DirLock::exclusive(&s.out)?;
    let hash = student_hash(&s.student)?;
    let spec = s.student.display().to_string();
    let engine = local_engine(&spec, true, s.sampling.batch.max(1), s.sampling.seed)
        .await
        .map_err(|source| PrefsError::Student {
            student: spec.clone(),
            source,
        })?;
    let student = engine.model().name.clone();
    // One journal per (student, sampling): another checkpoint or setting samples afresh.
    let key = blake3::hash(
        serde_json::to_string(&(
            &hash,
            &s.sampling.samples,
            &s.sampling.max_new_tokens,
            &s.sampling.temperature,
            &s.sampling.top_p,
            &s.sampling.seed,
        ))
        .expect("serializes")
        .as_bytes(),
    )
    .to_hex()[..16]
        .to_string();
    let journal = work.join(format!("samples-{key}.jsonl"));
    let samples = sample_all(engine.clone(), &prompts, &s.sampling, &journal, &state).await?;
    drop(engine);
    let mut rejects = Vec::new();
    let mut items = Vec::new();
    let mut judged_prompts = Vec::new();
    let mut sampled_all = true;
    for p in &prompts {
        let mine = &samples[&p.id];
        if mine.len() < s.sampling.samples {
            sampled_all = false;
            continue;
        }
        if let Some(e) = mine.iter().find_map(|x| x.error.as_ref()) {
            rejects.push(Rejected {
                reason: PairDrop::StudentFailed,
                what: p.id.clone(),
                detail: e.clone(),
            });
            continue;
        }
        let (responses, of_sample) = distinct(mine);
        if responses.len() < 2 {
            rejects.push(Rejected {
                reason: PairDrop::Identical,
                what: p.id.clone(),
                detail: format!("all {} responses are the same text", mine.len()),
            });
            continue;
        }
        let order = shown_order(s.sampling.seed, &p.id, responses.len());
        let shown: Vec<String> = order.iter().map(|&i| responses[i].1.clone()).collect();
        let hash = blake3::hash(
            serde_json::to_string(&shown)
                .expect("serializes")
                .as_bytes(),
        );
        items.push(Shown {
            record_id: p.id.clone(),
            order: join(&order),
            responses_hash: hash.to_hex()[..16].to_string(),
            prompt: p.prompt.shown(),
            responses: shown,
            order_list: order.clone(),
        });
        judged_prompts.push((p, responses, order, of_sample));
    }
    let judges = judge_dir(&work, &teacher.model, &template, &items);
    let judging: Option<Stats> = if items.is_empty() || state.stopped().is_some() {
        None
    } else {
        let opts = GenerateOptions {
            out: judges.clone(),
            n: items.len() as u64,
            seed: 0,
            max_attempts: s.max_attempts,
            shard_size: 1000,
            concurrency: teacher.concurrency,
            task: None,
        };
        let corpus = Arc::new(Judge {
            template: template.clone(),
            items,
        });
        Some(
            run_corpus(
                corpus,
                teacher,
                &opts,
                VERDICT_MAX_TOKENS,
                state.clone(),
                progress,
            )
            .await?,
        )
    };
    let judge_model = judging
        .as_ref()
        .map_or_else(|| teacher.model.clone(), |j| j.model.clone());
    let rubric = format!("{} v{} ({})", template.id, template.version, template.hash);
    let scores = if judges.exists() {
        read_scores(&judges)?
    } else {
        HashMap::new()
    };
    let mut pairs = Vec::new();
    for (p, responses, order, of_sample) in judged_prompts {
        let Some(sc) = scores.get(&p.id).filter(|sc| sc.len() == responses.len()) else {
            rejects.push(Rejected {
                reason: PairDrop::Unjudged,
                what: p.id.clone(),
                detail: "no parseable verdict (see the judge's rejects in work/judge/)".into(),
            });
            continue;
        };
        match pick(sc) {
            Ok((b, w)) => pairs.push(Pair {
                id: p.id.clone(),
                prompt: p.prompt.clone(),
                chosen: Turns::Text(responses[b].1.clone()),
                rejected: Turns::Text(responses[w].1.clone()),
                // A sample repeating an earlier one's text has that text's score.
                scores: Some(of_sample.iter().map(|&i| sc[i]).collect()),
                chosen_sample: Some(responses[b].0),
                rejected_sample: Some(responses[w].0),
                order: Some(order.iter().map(|&i| responses[i].0).collect()),
                judge: Some(judge_model.clone()),
                rubric: Some(rubric.clone()),
                student: Some(student.clone()),
                student_hash: Some(hash.clone()),
                seed: Some(s.sampling.seed),
                source: None,
            }),
            Err(reason) => rejects.push(Rejected {
                reason,
                what: p.id.clone(),
                detail: format!("scores {}", join(sc)),
            }),
        }
    }
    write_outputs(&s.out, &pairs, &rejects)?;
    let complete = sampled_all
        && judging
            .as_ref()
            .is_none_or(|j| j.stopped.is_none() && j.run.failed_requests == 0);
    let stats = PrefsStats {
        mode: "sample",
        inputs: prompts.len(),
        pairs: pairs.len(),
        dropped: count(&rejects),
        complete,
        judge: Some(judge_model),
        rubric: Some(rubric),
        student: Some(student),
        student_hash: Some(hash),
        samples_per_prompt: Some(s.sampling.samples),
        judging: judging.map(|j| serde_json::to_value(j).expect("stats serialize")),
        pairs_path: s.out.join(PAIRS_FILE),
        rejects_path: work.join("rejects.jsonl"),
    };
    let path = s.out.join(STATS_FILE);
    atomic::write_json(&path, &stats).map_err(io_err(&path))?;
    Ok(stats)
}

/// An imported row's pair, or why it is not one.
fn import_row(v: Value, source: String) -> Result<Pair, (PairDrop, String)> {
    #[derive(Deserialize)]
    struct Row {
        prompt: Option<Turns>,
        chosen: Option<Turns>,
        rejected: Option<Turns>,
    }
    let invalid = |m: String| (PairDrop::Invalid, m);
    let r: Row = serde_json::from_value(v).map_err(|e| {
        invalid(format!(
            "expected {{prompt, chosen, rejected}}, each a string or a messages list: {e}"
        ))
    })?;
    let field = |v: Option<Turns>, name: &str| -> Result<Turns, (PairDrop, String)> {
        match v {
            None => Err(invalid(format!("no `{name}`"))),
            Some(t) if t.is_blank() => Err(invalid(format!("`{name}` is empty"))),
            Some(t) => Ok(t),
        }
    };
    let (prompt, chosen, rejected) = (
        field(r.prompt, "prompt")?,
        field(r.chosen, "chosen")?,
        field(r.rejected, "rejected")?,
    );
    if chosen == rejected {
        return Err((PairDrop::Identical, "`chosen` equals `rejected`".into()));
    }
    let id = blake3::hash(
        serde_json::to_string(&(&prompt, &chosen, &rejected))
            .expect("serializes")
            .as_bytes(),
    )
    .to_hex()[..16]
        .to_string();
    Ok(Pair {
        id,
        prompt,
        chosen,
        rejected,
        scores: None,
        chosen_sample: None,
        rejected_sample: None,
        order: None,
        judge: None,
        rubric: None,
        student: None,
        student_hash: None,
        seed: None,
        source: Some(source),
    })
}

/// `phigen prefs --input FILE…`: validates existing pairs into `out` (see the module
/// documentation).
pub fn import(inputs: &[PathBuf], out: &Path) -> Result<PrefsStats, PrefsError> {
    let work = out.join(WORK_DIR);
    std::fs::create_dir_all(&work).map_err(io_err(&work))?;
    let _lock = DirLock::exclusive(out)?;
    let (mut pairs, mut rejects) = (Vec::new(), Vec::new());
    let mut rows = 0;
    for input in inputs {
        let files = table_files(input)?;
        if files.is_empty() {
            return Err(PrefsError::NoInput {
                path: input.clone(),
            });
        }
        for file in files {
            for record in records::read(&file)? {
                rows += 1;
                let at = format!("{}:{}", file.display(), record.number());
                let pair = record
                    .value
                    .map_err(|e| (PairDrop::Invalid, e))
                    .and_then(|v| import_row(v, at.clone()));
                match pair {
                    Ok(p) => pairs.push(p),
                    Err((reason, detail)) => {
                        tracing::warn!("{at}: dropped ({reason:?}): {detail}");
                        rejects.push(Rejected {
                            reason,
                            what: at,
                            detail,
                        })
                    }
                }
            }
        }
    }
    write_outputs(out, &pairs, &rejects)?;
    let stats = PrefsStats {
        mode: "import",
        inputs: rows,
        pairs: pairs.len(),
        dropped: count(&rejects),
        complete: true,
        judge: None,
        rubric: None,
        student: None,
        student_hash: None,
        samples_per_prompt: None,
        judging: None,
        pairs_path: out.join(PAIRS_FILE),
        rejects_path: work.join("rejects.jsonl"),
    };
    let path = out.join(STATS_FILE);
    atomic::write_json(&path, &stats).map_err(io_err(&path))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-written judge answers: labels in markdown, scores with or without `/10`, the last line
    /// of a response counting; a missing line or a score outside 1–10 is unparseable.
    #[test]
    fn verdicts_parse_the_response_lines() {
        let text =
            "Response 1 is vague.\n**Response 1:** 4/10\nResponse 2: 9\n\nResponse 3: 7/10 (clear)";
        assert_eq!(parse_verdict(text, 3).unwrap(), vec![4, 9, 7]);
        assert_eq!(
            parse_verdict("Response 1: 2/10\nResponse 2: 5/10\nResponse 1: 6/10", 2).unwrap(),
            vec![6, 5]
        );
        let reason = |t: &str, n| parse_verdict(t, n).unwrap_err();
        let d = reason("Response 1: 8/10", 2);
        assert_eq!(d.reason, DropReason::Unparseable);
        assert!(d.detail.contains("Response 2"), "{}", d.detail);
        assert!(reason("Response 1: 11/10\nResponse 2: 3/10", 2)
            .detail
            .contains("1 to 10"));
        assert!(reason("Response 1: good\nResponse 2: 3/10", 2)
            .detail
            .contains("Response 1: good"));
        // A response number beyond those shown is not a verdict on anything shown.
        assert!(parse_verdict("Response 1: 3\nResponse 3: 9", 2).is_err());
    }

    /// The order is a permutation drawn from (seed, id) alone; scores given in shown order come
    /// back in sample order. By hand: shown [sample 2, sample 0, sample 1] scored [9, 1, 5] means
    /// sample 0 scored 1, sample 1 scored 5, sample 2 scored 9.
    #[test]
    fn position_order_is_recorded_and_undone() {
        let o = shown_order(7, "abc", 5);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        assert_eq!(o, shown_order(7, "abc", 5));
        // Over many ids, the first response is not always shown first.
        let firsts: HashSet<usize> = (0..32)
            .map(|i| shown_order(7, &i.to_string(), 2)[0])
            .collect();
        assert_eq!(firsts.len(), 2);
        assert_eq!(unshuffle(&[2, 0, 1], &[9, 1, 5]), vec![1, 5, 9]);
        // The corpus's check parses in shown order and stores sample order.
        let judge = Judge {
            template: Template::parse("prefs-judge.txt", BUILTIN_RUBRIC).unwrap(),
            items: Vec::new(),
        };
        let shown = Shown {
            record_id: "x".into(),
            order: "2,0,1".into(),
            responses_hash: String::new(),
            prompt: "p".into(),
            responses: vec!["c".into(), "a".into(), "b".into()],
            order_list: vec![2, 0, 1],
        };
        let checked = futures::executor::block_on(judge.check(
            &shown,
            "Response 1: 9/10\nResponse 2: 1/10\nResponse 3: 5/10",
        ))
        .unwrap();
        assert_eq!(checked.scores, "1,5,9");
    }

    /// Best chosen, worst rejected, the first among equals; equal best and worst is a tie.
    #[test]
    fn the_best_and_the_worst_make_the_pair() {
        assert_eq!(pick(&[3, 8]), Ok((1, 0)));
        assert_eq!(pick(&[8, 3, 8, 3]), Ok((0, 1)));
        assert_eq!(pick(&[5, 5]), Err(PairDrop::Tie));
    }

    /// The shipped rubric loads, declares its variables, and renders with every response under
    /// the `### Response K` heading the verdict lines refer to.
    #[test]
    fn the_shipped_rubric_renders_the_responses() {
        let t = Template::parse("prefs-judge.txt", BUILTIN_RUBRIC).unwrap();
        assert_eq!((t.id.as_str(), t.version), ("prefs-judge", 1));
        let text = t
            .render(&[
                ("prompt", "Say hi."),
                ("responses", &responses_block(&["Hi!", "Hello."])),
                ("count", "2"),
            ])
            .unwrap();
        assert!(text.contains("### Response 1\nHi!\n\n### Response 2\nHello."));
        assert!(text.contains("exactly 2 lines"));
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    /// Prompts come from `prompt` strings or messages, from `messages` (the turns before the
    /// first assistant turn), or from text lines; repeats are read once; a record with neither
    /// field is an error naming the file and line.
    #[test]
    fn prompts_read_from_tables_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("p.jsonl");
        write(
            &jsonl,
            concat!(
                "{\"prompt\": \"Say hi.\"}\n",
                "\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"Add 2 and 2.\"}, {\"role\": \"assistant\", \"content\": \"4\"}, {\"role\": \"user\", \"content\": \"Now 3?\"}]}\n",
                "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Why?\"}]}\n",
                "{\"prompt\": \"Say hi.\"}\n",
            ),
        );
        let p = read_prompts(&jsonl).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].prompt, Turns::Text("Say hi.".into()));
        assert_eq!(p[1].prompt, Turns::Text("Add 2 and 2.".into()));
        let Turns::Messages(m) = &p[2].prompt else {
            panic!("a system turn keeps the messages")
        };
        assert_eq!((m.len(), m[0].role.as_str()), (2, "system"));
        let txt = dir.path().join("p.txt");
        write(&txt, "one\n\n  two  \n");
        let p = read_prompts(&txt).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].prompt, Turns::Text("two".into()));
        let bad = dir.path().join("bad.jsonl");
        write(&bad, "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt\"}\n");
        let e = read_prompts(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2") && e.contains("neither"), "{e}");
    }

    /// Import keeps good rows and drops the bad ones with file:line and a reason; the pairs file
    /// is what the DPO stage reads: its two conversations per pair come out of the SFT/DPO reader
    /// (`train::sft`, the phi-3 template) with the prompt and each answer.
    #[test]
    fn import_drops_bad_rows_and_writes_what_dpo_reads() {
        use crate::model::tokenizer::{Encoding, Tokenizer};
        use crate::train::sft::{Builtin, Source};
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        write(
            &input,
            concat!(
                "{\"prompt\": \"Name a color.\", \"chosen\": \"Blue.\", \"rejected\": \"Dog.\"}\n",
                "{\"prompt\": \"Name a fruit.\", \"chosen\": \"Apple.\"}\n",
                "{\"prompt\": \"Same?\", \"chosen\": \"Yes.\", \"rejected\": \"Yes.\"}\n",
                "not json\n",
                "{\"prompt\": \"  \", \"chosen\": \"a\", \"rejected\": \"b\"}\n",
                "{\"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"chosen\": [{\"role\": \"assistant\", \"content\": \"Hello!\"}], \"rejected\": \"Go away.\"}\n",
            ),
        );
        let out = dir.path().join("out");
        let stats = import(std::slice::from_ref(&input), &out).unwrap();
        assert_eq!((stats.inputs, stats.pairs), (6, 2));
        assert_eq!(stats.dropped[&PairDrop::Invalid], 3);
        assert_eq!(stats.dropped[&PairDrop::Identical], 1);
        let rejects = std::fs::read_to_string(&stats.rejects_path).unwrap();
        for (line, what) in [
            (2, "no `rejected`"),
            (3, "equals"),
            (4, "not JSON"),
            (5, "empty"),
        ] {
            let at = format!("in.jsonl:{line}");
            assert!(
                rejects.lines().any(|l| l.contains(&at) && l.contains(what)),
                "{at} {what}: {rejects}"
            );
        }
        // The directory holds one table, so a DPO stage reading it reads each pair once.
        let files = records::table_files(std::slice::from_ref(&out)).unwrap();
        assert_eq!(files, vec![out.join(PAIRS_FILE)]);
        let template = Builtin::parse("phi-3").unwrap().template();
        let tokenizer = Tokenizer::Tiktoken(Encoding::Gpt2);
        let examples = Source {
            stage: "dpo",
            files: &files,
            pairs: true,
            template: &template,
            tokenizer_id: "gpt2",
            tokenizer: &tokenizer,
            seq_len: 64,
            vocab: 50304,
        }
        .examples(dir.path(), false)
        .unwrap();
        assert_eq!(examples.len(), 4);
        let text = |i: usize| tokenizer.decode(examples.get(i).0).unwrap();
        assert!(text(0).contains("Name a color.") && text(0).contains("Blue."));
        assert!(text(1).contains("Dog."));
        assert!(text(2).contains("Hello!") && text(3).contains("Go away."));
    }

    /// The student's responses are a function of (seed, prompt id, sample index): sampling with
    /// one sequence at a time or eight at once gives the same texts. The tiny random model samples
    /// the whole distribution at temperature 1, so a batching effect would show.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn samples_do_not_depend_on_the_batch() {
        use crate::model::tokenizer::Encoding;
        use crate::model::{checkpoint, PhiConfig, Preset};
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("tiny");
        let cfg = PhiConfig {
            vocab_size: 50304,
            ..PhiConfig::preset(Preset::TinyPhi)
        };
        checkpoint::save_random(&ckpt, &cfg, 3, candle_core::DType::F32, Encoding::Gpt2).unwrap();
        let prompts: Vec<PromptItem> = ["Say hi.", "Count to three.", "Name a color."]
            .iter()
            .map(|t| {
                let prompt = Turns::Text(t.to_string());
                PromptItem {
                    id: prompt_id(&prompt),
                    prompt,
                }
            })
            .collect();
        let mut runs = Vec::new();
        for batch in [1, 8] {
            let settings = StudentSampling {
                samples: 3,
                max_new_tokens: 12,
                temperature: 1.0,
                top_p: 1.0,
                seed: 5,
                batch,
            };
            let engine = local_engine(ckpt.to_str().unwrap(), true, batch, 0)
                .await
                .unwrap();
            let journal = dir.path().join(format!("samples-{batch}.jsonl"));
            let got = sample_all(engine, &prompts, &settings, &journal, &RunState::default())
                .await
                .unwrap();
            let texts: Vec<Vec<Option<String>>> = prompts
                .iter()
                .map(|p| got[&p.id].iter().map(|s| s.text.clone()).collect())
                .collect();
            runs.push(texts);
        }
        assert_eq!(runs[0], runs[1]);
        // Different samples of one prompt differ (the seeds differ), so pairs can be made.
        assert_ne!(runs[0][0][0], runs[0][0][1]);
    }
}

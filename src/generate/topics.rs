//! `phigen topics`: expands a seed list of subjects into a large, diverse list of topics with the
//! teacher, as phi-1.5 generated its textbooks from 20K topics (Li et al. 2023, §2.1).
//!
//! Two levels, each a run of the generation engine (exactly-once and resumable on its own), under
//! `OUT/.phigen.topics/`:
//! - `subtopics/`: slot s asks for `--subtopics` subtopics of seed subject s mod S (S subjects;
//!   round s div S > 0 asks for less obvious ones). Enough slots to give the leaves level about
//!   [`OVERSHOOT`] × `--n` leaves.
//! - `leaves/`: once every subtopics slot is answered (or given up), the subtopics are read back
//!   in a fixed order (round, position in the answer, subject), near duplicates within a subject
//!   dropped, and slot s asks for `--leaves` topics within subtopic s mod P (round s div P). Each
//!   prompt may quote a web snippet (`--web`), drawn from the slot's seeded rng.
//!
//! Then the leaves are read in the order (round, position in the answer, subtopic), which
//! spreads a truncated list evenly over subjects and subtopics, and kept unless nearly the same
//! as a kept one, until `--n` are kept. If fewer come out, the leaves level gets another round of
//! slots (at most `--max-rounds`). Every level is a function of the records of the level before
//! and the selection sorts by slot and position, so neither `--concurrency` nor a kill and a
//! re-run changes the list.
//!
//! Near duplicates: two topics whose word 2-gram sets (words as [`crate::dedup::minhash`] cuts
//! them) have exact Jaccard similarity ≥ `--max-similarity` (default
//! [`DEFAULT_MAX_SIMILARITY`]). MinHash-LSH finds the candidates; their exact Jaccard decides,
//! since a topic is a handful of shingles, where a signature's estimate is too coarse.
//!
//! Writes `OUT/topics.txt` (one `subject > subtopic > leaf` a line, the format
//! `phigen textbooks --topics` reads), `OUT/topics.jsonl` (each topic with its path, ids of the
//! records it came from and its snippet id) and `OUT/stats.json` (coverage per seed subject, the
//! share of near duplicates removed). Both lists are written only once every slot asked for is
//! settled, so what is there is always the list of a whole run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use polars::prelude::{DataFrame, PolarsResult};
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::engine::{GenerateError, GenerateOptions, RunState, Stats};
use super::prompt::Template;
use super::run::{dry_run_corpus, run_corpus_on, LoadedTeacher, Progress, SetupError};
use super::textbooks::{self, counts, SeedListError, Snippet};
use super::{Corpus, Drop, DropReason};
use crate::artifact::outdir::DirLock;
use crate::artifact::shards::{self, Layout};
use crate::artifact::table::{self, row};
use crate::dedup::minhash::{MinHasher, Params, Shingles};
use crate::range::{above, Ints, Range};
use crate::teacher::factory::TeacherConfig;

pub const BUILTIN_SUBTOPICS_TEMPLATE: &str = include_str!("../../prompts/topics-subtopics.txt");
pub const BUILTIN_LEAVES_TEMPLATE: &str = include_str!("../../prompts/topics-leaves.txt");
/// Where the two engine runs live, below `OUT` (a `.phigen…` name no stage reads as input).
pub const WORK_DIR: &str = ".phigen.topics";
/// The topics, one `subject > subtopic > leaf` a line.
pub const TOPICS_FILE: &str = "topics.txt";
/// The topics as JSON lines, with their paths and the ids of the records they came from.
pub const RECORDS_FILE: &str = "topics.jsonl";
/// Two topics at least this similar (exact Jaccard of word 2-grams) are near duplicates: e.g.
/// "Newton's laws of motion" and "Newton's three laws of motion" (0.5), but not "history of the
/// Roman empire" and "history of the Ottoman empire" (0.33).
pub const DEFAULT_MAX_SIMILARITY: f64 = 0.5;
/// The range of `--max-similarity`: above 0 (everything sharing nothing would be a duplicate),
/// at most 1 (only equal shingle sets).
pub const SIMILARITY: Range = above(0.0, 1.0);
/// The range of `--subtopics` and `--leaves` (items asked for in one answer).
pub const LIST_LENGTH: Ints<u64> = Ints { min: 1, max: 200 };
/// The range of `--max-rounds`.
pub const ROUNDS: Ints<u64> = Ints { min: 1, max: 100 };
/// Leaves asked for beyond `--n`, for the near duplicates and lines that are not topics.
pub const OVERSHOOT: f64 = 1.25;
/// Words of a list item beyond which it is a sentence, not a topic.
const MAX_TOPIC_WORDS: usize = 12;
const RECORDS: Layout = Layout::Parts { prefix: "part" };

fn default_list_length() -> u64 {
    20
}
fn default_max_similarity() -> f64 {
    DEFAULT_MAX_SIMILARITY
}
fn default_max_rounds() -> u64 {
    4
}

/// The settings of `phigen topics` (its flags, or a recipe's `kind = "topics"` step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsSettings {
    /// Seed subjects: a topics file (`subject`, or a `subject > area` path, a line).
    pub seeds: PathBuf,
    /// Subtopics asked for in one answer.
    #[serde(default = "default_list_length")]
    pub subtopics: u64,
    /// Leaf topics asked for in one answer.
    #[serde(default = "default_list_length")]
    pub leaves: u64,
    /// Near-duplicate threshold: exact Jaccard of word 2-grams.
    #[serde(default = "default_max_similarity")]
    pub max_similarity: f64,
    /// Rounds of leaf lists at most, when one round leaves fewer than `n` topics.
    #[serde(default = "default_max_rounds")]
    pub max_rounds: u64,
    /// Web texts (jsonl or Parquet with `text`) of which each leaves prompt quotes an excerpt.
    #[serde(default)]
    pub web: Option<PathBuf>,
    /// [default: the built-in prompts/topics-subtopics.txt]
    #[serde(default)]
    pub subtopics_prompt: Option<PathBuf>,
    /// [default: the built-in prompts/topics-leaves.txt]
    #[serde(default)]
    pub leaves_prompt: Option<PathBuf>,
}

impl TopicsSettings {
    /// The settings with defaults for everything but the seed file.
    pub fn new(seeds: PathBuf) -> TopicsSettings {
        TopicsSettings {
            seeds,
            subtopics: default_list_length(),
            leaves: default_list_length(),
            max_similarity: DEFAULT_MAX_SIMILARITY,
            max_rounds: default_max_rounds(),
            web: None,
            subtopics_prompt: None,
            leaves_prompt: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    #[error("{dir}: leaves slot {slot} asked about subtopic `{found}`, but this run's slot {slot} is `{expected}` (the subtopics changed after their leaves were asked for, e.g. by a larger --n); choose a new --out or move {dir} away")]
    SubtopicsChanged {
        dir: PathBuf,
        slot: u64,
        found: String,
        expected: String,
    },
    #[error("topics writes one directory in one task: drop --shard/--shards (a topic expansion cannot be split into array tasks)")]
    ArrayTask,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<TopicsError> for GenerateError {
    fn from(e: TopicsError) -> GenerateError {
        SetupError::Topics(e).into()
    }
}

/// The topics of a list answer: one a line, without numbering, bullets, `**`, quotes, a trailing
/// description (after `: ` or ` - `) or final punctuation. Headings (lines ending with `:`) and
/// sentences (more than [`MAX_TOPIC_WORDS`] words) are skipped; when some lines are numbered or
/// bulleted, only those count (so "Sure, here are …" is not a topic). `>` and `#` (the path
/// separator and comment of a topics file) do not survive: `C#` becomes `C sharp`.
pub fn list_items(answer: &str) -> Vec<String> {
    let lines: Vec<(bool, String)> = answer.lines().filter_map(list_item).collect();
    let any_marked = lines.iter().any(|(marked, _)| *marked);
    lines
        .into_iter()
        .filter(|(marked, _)| *marked || !any_marked)
        .map(|(_, item)| item)
        .collect()
}

/// One line of a list answer: whether it had a list marker, and its topic.
fn list_item(line: &str) -> Option<(bool, String)> {
    let s = line.trim();
    let (mut marked, mut s) = match s.strip_prefix(['-', '*', '•', '–']) {
        Some(rest) => (true, rest.trim_start()),
        None => (false, s),
    };
    let digits = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits > 0 && s[digits..].starts_with(['.', ')']) {
        (marked, s) = (true, s[digits + 1..].trim_start());
    }
    if s.ends_with(':') {
        return None;
    }
    let s = s.replace("**", "").replace('`', "");
    let head = [": ", " - ", " – ", " — "]
        .iter()
        .filter_map(|sep| s.find(sep))
        .min()
        .map_or(s.as_str(), |i| &s[..i]);
    let head = head
        .trim()
        .trim_matches(['"', '“', '”', '\''])
        .trim_end_matches(['.', ';', ','])
        .replace('#', " sharp")
        .replace('>', " ");
    let words: Vec<&str> = head.split_whitespace().collect();
    let has_word = head.chars().any(char::is_alphanumeric);
    (has_word && words.len() <= MAX_TOPIC_WORDS).then(|| (marked, words.join(" ")))
}

/// The topics kept so far, to find near duplicates of a new one: MinHash-LSH (64 bands of 2 rows,
/// which make a pair at Jaccard 0.5 a candidate with probability 1 − 0.75⁶⁴ ≈ 1 − 10⁻⁸) finds
/// the candidates, the exact Jaccard of their shingle sets decides.
pub struct NearDuplicates {
    hasher: MinHasher,
    threshold: f64,
    sets: Vec<Vec<u64>>,
    buckets: HashMap<(usize, u64), Vec<usize>>,
}

impl NearDuplicates {
    pub fn new(threshold: f64) -> NearDuplicates {
        NearDuplicates {
            hasher: MinHasher::new(Params {
                shingles: Shingles::Words(2),
                bands: 64,
                rows: 2,
                seed: 1,
            }),
            threshold,
            sets: Vec::new(),
            buckets: HashMap::new(),
        }
    }

    /// The similarity of the kept topic `topic` nearly repeats, if any; otherwise `topic` is kept
    /// (from now on others are compared with it).
    pub fn check_and_keep(&mut self, topic: &str) -> Option<f64> {
        let set = self.hasher.shingle_set(topic);
        let sig = self.hasher.signature(topic);
        let keys: Vec<(usize, u64)> = (0..self.hasher.params().bands)
            .map(|j| (j, self.hasher.band_key(&sig, j)))
            .collect();
        let mut seen = HashSet::new();
        for key in &keys {
            for &i in self.buckets.get(key).into_iter().flatten() {
                if seen.insert(i) {
                    let sim = jaccard(&set, &self.sets[i]);
                    if sim >= self.threshold {
                        return Some(sim);
                    }
                }
            }
        }
        let i = self.sets.len();
        self.sets.push(set);
        for key in keys {
            self.buckets.entry(key).or_default().push(i);
        }
        None
    }
}

/// The Jaccard similarity of two sorted, distinct sets.
fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut common) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - common;
    if union == 0 {
        1.0
    } else {
        common as f64 / union as f64
    }
}

/// The `round` prompt variable: empty for the first list of a parent, else a request for less
/// obvious items (the same parent asked again for more).
fn round_hint(round: u64, what: &str) -> String {
    if round == 0 {
        String::new()
    } else {
        format!(
            " This is list {} for it: leave out the most obvious {what} and name less common ones.",
            round + 1
        )
    }
}

row! {
    /// One subtopics prompt: a seed subject, and which of its lists.
    #[derive(Debug, Clone, Serialize)]
    pub struct SubtopicRequest {
        pub subject: String,
        pub round: u64,
        pub count: u64,
    }
}

row! {
    #[derive(Debug, Clone)]
    pub struct ListChecks {
        /// List items read from the answer.
        pub items: u64,
    }
}

/// The checks of a list answer: at least one item.
fn check_list(text: &str) -> Result<ListChecks, Drop> {
    let items = list_items(text).len() as u64;
    if items == 0 {
        return Err(Drop::new(
            DropReason::Unparseable,
            "no list item: expected one topic a line",
        ));
    }
    Ok(ListChecks { items })
}

/// Level 1: slot s asks for the subtopics of subject s mod S.
pub struct Subtopics {
    template: Template,
    subjects: Vec<String>,
    count: u64,
}

impl Corpus for Subtopics {
    type Constraints = SubtopicRequest;
    type Checks = ListChecks;

    fn kind(&self) -> &'static str {
        "topics_subtopics"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, slot: u64, _rng: &mut ChaCha8Rng) -> SubtopicRequest {
        let s = self.subjects.len() as u64;
        SubtopicRequest {
            subject: self.subjects[(slot % s) as usize].clone(),
            round: slot / s,
            count: self.count,
        }
    }

    fn prompt_vars(&self, c: &SubtopicRequest) -> Vec<(&'static str, String)> {
        vec![
            ("subject", c.subject.clone()),
            ("count", c.count.to_string()),
            ("round", round_hint(c.round, "subtopics")),
        ]
    }

    fn check(
        &self,
        _: &SubtopicRequest,
        text: &str,
    ) -> impl std::future::Future<Output = Result<ListChecks, Drop>> + Send {
        std::future::ready(check_list(text))
    }

    /// Equal lists are possible and harmless; keeping the first of two would make the list
    /// depend on which answer arrived first.
    fn unique_answers(&self) -> bool {
        false
    }

    fn word_bounds(&self) -> (usize, usize) {
        (1, 5000)
    }

    fn typical_completion_tokens(&self) -> u64 {
        8 * self.count
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec!["subject", "items"]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        summarize_lists(df, "subject")
    }
}

/// `stats.json`'s corpus section of a level: lists, items, lists per parent.
fn summarize_lists(df: &DataFrame, parent: &str) -> PolarsResult<Value> {
    let items: i64 = df.column("items")?.i64()?.iter().flatten().sum();
    Ok(json!({
        "lists": df.height(),
        "items": items,
        format!("per_{parent}"): counts(df, parent)?,
    }))
}

/// A subtopic the leaves level expands.
#[derive(Debug, Clone, PartialEq)]
pub struct Parent {
    pub subject: String,
    pub subtopic: String,
    /// The id of the subtopics record that named it.
    pub record: String,
}

row! {
    /// One leaves prompt: a subtopic, which of its lists, and the web snippet it quotes.
    #[derive(Debug, Clone, Serialize)]
    pub struct LeafRequest {
        pub subject: String,
        pub subtopic: String,
        /// The id of the subtopics record that named `subtopic`.
        pub parent_id: String,
        pub round: u64,
        pub count: u64,
        /// The id of the web snippet the prompt quotes (its `id`, else `FILE:ROW`).
        pub snippet_id: Option<String>,
    } not columns {
        #[serde(skip)]
        snippet: Option<String>,
    }
}

/// Level 2: slot s asks for the leaves of subtopic s mod P.
pub struct Leaves {
    template: Template,
    parents: Vec<Parent>,
    count: u64,
    snippets: Vec<Snippet>,
}

impl Corpus for Leaves {
    type Constraints = LeafRequest;
    type Checks = ListChecks;

    fn kind(&self) -> &'static str {
        "topics_leaves"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, slot: u64, rng: &mut ChaCha8Rng) -> LeafRequest {
        let p = self.parents.len() as u64;
        let parent = &self.parents[(slot % p) as usize];
        let snippet = self.snippets.choose(rng);
        LeafRequest {
            subject: parent.subject.clone(),
            subtopic: parent.subtopic.clone(),
            parent_id: parent.record.clone(),
            round: slot / p,
            count: self.count,
            snippet_id: snippet.map(|s| s.id.clone()),
            snippet: snippet.map(|s| textbooks::excerpt(&s.text)),
        }
    }

    fn prompt_vars(&self, c: &LeafRequest) -> Vec<(&'static str, String)> {
        vec![
            ("subject", c.subject.clone()),
            ("subtopic", c.subtopic.clone()),
            ("count", c.count.to_string()),
            ("round", round_hint(c.round, "topics")),
            (
                "snippet",
                c.snippet.as_ref().map_or(String::new(), |s| {
                    format!("\n\nFor ideas, you may draw on this excerpt of a web page (do not mention it):\n{s}")
                }),
            ),
        ]
    }

    fn check(
        &self,
        _: &LeafRequest,
        text: &str,
    ) -> impl std::future::Future<Output = Result<ListChecks, Drop>> + Send {
        std::future::ready(check_list(text))
    }

    /// As for [`Subtopics`]: near duplicates are removed later, in a fixed order.
    fn unique_answers(&self) -> bool {
        false
    }

    fn word_bounds(&self) -> (usize, usize) {
        (1, 5000)
    }

    fn typical_completion_tokens(&self) -> u64 {
        8 * self.count
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec!["subtopic", "items"]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        summarize_lists(df, "subtopic")
    }
}

/// A kept list answer of one level.
#[derive(Debug, Clone)]
struct ListRecord {
    id: String,
    text: String,
    /// The leaves level's constraints (`None` on the subtopics level).
    subtopic: Option<String>,
    parent_id: Option<String>,
    snippet_id: Option<String>,
}

/// The records of an engine directory by slot, for slots below `n` (an earlier run with a larger
/// `--n` may have filled more); of two records of one slot (which the engine never writes) the
/// least id.
fn read_lists(
    dir: &Path,
    n: u64,
    leaves: bool,
) -> Result<BTreeMap<u64, ListRecord>, GenerateError> {
    let mut rows: Vec<(u64, ListRecord)> = Vec::new();
    let mut cols = vec!["id", "slot", "text"];
    if leaves {
        cols.extend(["subtopic", "parent_id", "snippet_id"]);
    }
    for path in shards::list_files(dir, &RECORDS)? {
        let df = table::read_columns(&path, &cols)?;
        let text = |name| table::text_column(&df, &path, name);
        let (ids, texts) = (text("id")?, text("text")?);
        let extra = |name| -> Result<Vec<Option<String>>, GenerateError> {
            Ok(if leaves {
                text(name)?
            } else {
                vec![None; df.height()]
            })
        };
        let (subtopics, parents, snippets) = (
            extra("subtopic")?,
            extra("parent_id")?,
            extra("snippet_id")?,
        );
        let slots = table::int_column(&df, &path, "slot")?;
        for i in 0..df.height() {
            if let (Some(id), Some(slot), Some(text)) = (&ids[i], slots[i], &texts[i]) {
                rows.push((
                    slot as u64,
                    ListRecord {
                        id: id.clone(),
                        text: text.clone(),
                        subtopic: subtopics[i].clone(),
                        parent_id: parents[i].clone(),
                        snippet_id: snippets[i].clone(),
                    },
                ));
            }
        }
    }
    for row in shards::read_journal_rows(&dir.join("records.journal.jsonl"))? {
        let s = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_string);
        if let (Some(id), Some(slot), Some(text)) =
            (s("id"), row.get("slot").and_then(Value::as_u64), s("text"))
        {
            rows.push((
                slot,
                ListRecord {
                    id,
                    text,
                    subtopic: s("subtopic"),
                    parent_id: s("parent_id"),
                    snippet_id: s("snippet_id"),
                },
            ));
        }
    }
    let mut out: BTreeMap<u64, ListRecord> = BTreeMap::new();
    for (slot, r) in rows.into_iter().filter(|(slot, _)| *slot < n) {
        match out.get(&slot) {
            Some(kept) if kept.id <= r.id => {}
            _ => {
                out.insert(slot, r);
            }
        }
    }
    Ok(out)
}

/// An item of a list answer, where it stands: the order of selection is (round, position in
/// the answer, parent), so that a list cut at `--n` covers every parent evenly.
struct Item<'a> {
    round: u64,
    position: usize,
    parent: usize,
    text: String,
    record: &'a ListRecord,
}

/// The items of `lists` (slot s: parent s mod `parents`, round s div `parents`) in selection order.
fn items(lists: &BTreeMap<u64, ListRecord>, parents: usize) -> Vec<Item<'_>> {
    let p = parents as u64;
    let mut out: Vec<Item> = lists
        .iter()
        .flat_map(|(&slot, record)| {
            list_items(&record.text)
                .into_iter()
                .enumerate()
                .map(move |(position, text)| Item {
                    round: slot / p,
                    position,
                    parent: (slot % p) as usize,
                    text,
                    record,
                })
        })
        .collect();
    out.sort_by_key(|i| (i.round, i.position, i.parent));
    out
}

/// The subtopics to expand, in selection order: near duplicates of an earlier subtopic of the same
/// subject left out. Also returns how many were left out.
fn parents(
    subjects: &[String],
    lists: &BTreeMap<u64, ListRecord>,
    threshold: f64,
) -> (Vec<Parent>, u64) {
    let mut near: HashMap<usize, NearDuplicates> = HashMap::new();
    let (mut out, mut removed) = (Vec::new(), 0);
    for item in items(lists, subjects.len()) {
        let seen = near
            .entry(item.parent)
            .or_insert_with(|| NearDuplicates::new(threshold));
        if seen.check_and_keep(&item.text).is_some() {
            removed += 1;
            continue;
        }
        out.push(Parent {
            subject: subjects[item.parent].clone(),
            subtopic: item.text,
            record: item.record.id.clone(),
        });
    }
    (out, removed)
}

/// One topic of the list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopicRecord {
    /// blake3 of the leaves record's id and the topic's position in its answer (32 hex digits).
    pub id: String,
    /// The leaf: what a textbook section is about.
    pub topic: String,
    /// `subject > subtopic > leaf`, the line of `topics.txt`.
    pub path: String,
    pub subject: String,
    pub subtopic: String,
    pub round: u64,
    pub position: usize,
    /// The leaves record the topic was read from, and the subtopics record that named its parent.
    pub leaves_record: String,
    pub subtopics_record: String,
    pub snippet_id: Option<String>,
}

/// The list: the first `n` leaves in selection order that are not near duplicates of an earlier
/// one.
#[derive(Debug, Default)]
struct Selection {
    kept: Vec<TopicRecord>,
    considered: u64,
    removed: u64,
}

fn select(
    parents: &[Parent],
    lists: &BTreeMap<u64, ListRecord>,
    n: u64,
    threshold: f64,
) -> Selection {
    let mut near = NearDuplicates::new(threshold);
    let mut s = Selection::default();
    for item in items(lists, parents.len()) {
        if s.kept.len() as u64 >= n {
            break;
        }
        s.considered += 1;
        if near.check_and_keep(&item.text).is_some() {
            s.removed += 1;
            continue;
        }
        let parent = &parents[item.parent];
        let mut h = blake3::Hasher::new();
        h.update(item.record.id.as_bytes());
        h.update(&(item.position as u64).to_le_bytes());
        s.kept.push(TopicRecord {
            id: h.finalize().to_hex()[..32].to_string(),
            path: format!("{} > {} > {}", parent.subject, parent.subtopic, item.text),
            topic: item.text,
            subject: parent.subject.clone(),
            subtopic: parent.subtopic.clone(),
            round: item.round,
            position: item.position,
            leaves_record: item.record.id.clone(),
            subtopics_record: parent.record.clone(),
            snippet_id: item.record.snippet_id.clone(),
        });
    }
    s
}

/// Checks that the leaves records already in `dir` were asked about the subtopic this run plans
/// for their slot (`parents` are the subtopics in slot order).
fn check_leaves(
    dir: &Path,
    lists: &BTreeMap<u64, ListRecord>,
    parents: &[Parent],
) -> Result<(), TopicsError> {
    let p = parents.len() as u64;
    for (&slot, r) in lists {
        let expected = &parents[(slot % p) as usize];
        if r.parent_id.as_deref() != Some(expected.record.as_str())
            || r.subtopic.as_deref() != Some(expected.subtopic.as_str())
        {
            return Err(TopicsError::SubtopicsChanged {
                dir: dir.to_path_buf(),
                slot,
                found: r.subtopic.clone().unwrap_or_default(),
                expected: expected.subtopic.clone(),
            });
        }
    }
    Ok(())
}

/// What a topics run loads before it asks anything: templates, subjects, web snippets.
struct Loaded {
    subtopics: Template,
    leaves: Template,
    subjects: Vec<String>,
    snippets: Vec<Snippet>,
}

impl TopicsSettings {
    /// Checks the settings (a recipe's; the CLI's value parsers refuse bad flags earlier) and
    /// loads the templates, the seed subjects and the web snippets.
    fn load(&self) -> Result<Loaded, GenerateError> {
        let setting = |flag, found: String, expected| SetupError::Setting {
            flag,
            found,
            expected,
        };
        SIMILARITY
            .check(self.max_similarity)
            .map_err(|e| setting("--max-similarity", self.max_similarity.to_string(), e))?;
        for (flag, v, range) in [
            ("--subtopics", self.subtopics, LIST_LENGTH),
            ("--leaves", self.leaves, LIST_LENGTH),
            ("--max-rounds", self.max_rounds, ROUNDS),
        ] {
            range
                .check(v)
                .map_err(|e| setting(flag, v.to_string(), e))?;
        }
        let subtopics = Template::load_or_builtin(
            self.subtopics_prompt.as_deref(),
            "topics-subtopics.txt",
            BUILTIN_SUBTOPICS_TEMPLATE,
        )?;
        let leaves = Template::load_or_builtin(
            self.leaves_prompt.as_deref(),
            "topics-leaves.txt",
            BUILTIN_LEAVES_TEMPLATE,
        )?;
        let seeds = || -> Result<_, SeedListError> {
            let subjects: Vec<String> = textbooks::load_topics(Some(&self.seeds))?
                .into_iter()
                .map(|t| t.path())
                .collect();
            let snippets = match &self.web {
                Some(p) => textbooks::load_snippets(p)?,
                None => Vec::new(),
            };
            Ok((subjects, snippets))
        };
        let (mut subjects, snippets) = seeds().map_err(SetupError::from)?;
        // A subject listed twice would only be asked twice.
        let mut seen = HashSet::new();
        subjects.retain(|s| seen.insert(s.clone()));
        Ok(Loaded {
            subtopics,
            leaves,
            subjects,
            snippets,
        })
    }

    /// Subtopics wanted for `n` topics: enough lists of `--leaves` for [`OVERSHOOT`] × n, and at
    /// least one per subject.
    fn parents_wanted(&self, n: u64, subjects: usize) -> usize {
        let leaves = (n as f64 * OVERSHOOT / self.leaves as f64).ceil() as usize;
        leaves.max(subjects)
    }

    /// Subtopics slots for `n` topics: rounds of one list per subject.
    fn subtopic_slots(&self, n: u64, subjects: usize) -> u64 {
        let per_subject = self.parents_wanted(n, subjects).div_ceil(subjects) as u64;
        subjects as u64 * per_subject.div_ceil(self.subtopics)
    }

    /// What the first level would send (the leaves are asked for once the subtopics exist).
    pub fn dry_run(
        &self,
        cfg: &TeacherConfig,
        opts: &GenerateOptions,
        max_tokens: u32,
    ) -> Result<super::engine::DryRun, GenerateError> {
        let loaded = self.load()?;
        let n = self.subtopic_slots(opts.n, loaded.subjects.len());
        let corpus = Arc::new(Subtopics {
            template: loaded.subtopics,
            subjects: loaded.subjects,
            count: self.subtopics,
        });
        let opts = GenerateOptions {
            out: opts.out.join(WORK_DIR).join("subtopics"),
            n,
            ..opts.clone()
        };
        dry_run_corpus(corpus, cfg, &opts, max_tokens)
    }
}

/// Adds what the leaves directory holds (`leaves`: its last engine run's stats, which count every
/// run into it) to `stats`, the subtopics directory's: answers checked, the share kept (list
/// answers, of both levels) and the drops by reason. The diversity of list answers says nothing
/// about the topics, so it is left out.
fn add_directory(stats: &mut Stats, leaves: &Stats) {
    let lists = |s: &Stats| s.keep_rate * s.answers_checked as f64;
    let kept = lists(stats) + lists(leaves);
    stats.answers_checked += leaves.answers_checked;
    for (&reason, &count) in &leaves.rejects_total {
        *stats.rejects_total.entry(reason).or_default() += count;
    }
    let checked = stats.answers_checked.max(1) as f64;
    stats.keep_rate = kept / checked;
    stats.drop_rates = stats
        .rejects_total
        .iter()
        .filter(|&(&r, _)| r != DropReason::RequestFailed)
        .map(|(&r, &c)| (r, c as f64 / checked))
        .collect();
    stats.diversity = None;
}

/// Whether an engine run left nothing to send again: not stopped, no request failed.
fn settled(s: &Stats) -> bool {
    s.stopped.is_none() && s.run.failed_requests == 0
}

/// Writes `topics.txt` and `topics.jsonl` (atomically).
fn write_lists(out: &Path, kept: &[TopicRecord], header: &str) -> Result<(), TopicsError> {
    let io = |path: PathBuf| move |source| TopicsError::Io { path, source };
    let txt = out.join(TOPICS_FILE);
    crate::artifact::atomic::write_with(&txt, |f| {
        let mut w = std::io::BufWriter::new(f);
        writeln!(w, "{header}")?;
        for t in kept {
            writeln!(w, "{}", t.path)?;
        }
        w.flush()
    })
    .map_err(io(txt.clone()))?;
    let jsonl = out.join(RECORDS_FILE);
    crate::artifact::atomic::write_with(&jsonl, |f| {
        let mut w = std::io::BufWriter::new(f);
        for t in kept {
            serde_json::to_writer(&mut w, t)?;
            w.write_all(b"\n")?;
        }
        w.flush()
    })
    .map_err(io(jsonl.clone()))
}

/// Lines of an earlier `topics.jsonl` (0 when there is none).
fn topics_before(out: &Path) -> u64 {
    std::fs::read_to_string(out.join(RECORDS_FILE))
        .map(|t| t.lines().count() as u64)
        .unwrap_or(0)
}

/// `phigen topics` (see the module documentation). Returns the subtopics run's stats with the
/// leaves runs' requests, tokens and cost added, `records` = the topics in the list, and the
/// coverage and near-duplicate counts in `corpus`; the same goes to `OUT/stats.json`.
pub async fn run(
    settings: &TopicsSettings,
    cfg: &TeacherConfig,
    opts: &GenerateOptions,
    max_tokens: u32,
    state: Arc<RunState>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Stats, GenerateError> {
    if opts.task.is_some() {
        return Err(TopicsError::ArrayTask.into());
    }
    let loaded = settings.load()?;
    std::fs::create_dir_all(&opts.out).map_err(|source| GenerateError::Io {
        path: opts.out.clone(),
        source,
    })?;
    let _lock = DirLock::exclusive(&opts.out)?;
    let work = opts.out.join(WORK_DIR);
    let (subtopics_dir, leaves_dir) = (work.join("subtopics"), work.join("leaves"));
    let teacher = LoadedTeacher::load(cfg, opts.seed).await?;
    let threshold = settings.max_similarity;
    let subjects = loaded.subjects;

    let n1 = settings.subtopic_slots(opts.n, subjects.len());
    let level1 = Arc::new(Subtopics {
        template: loaded.subtopics,
        subjects: subjects.clone(),
        count: settings.subtopics,
    });
    let opts1 = GenerateOptions {
        out: subtopics_dir.clone(),
        n: n1,
        ..opts.clone()
    };
    let mut stats = run_corpus_on(
        level1,
        &teacher,
        cfg,
        &opts1,
        max_tokens,
        state.clone(),
        progress,
    )
    .await?;
    let mut all_settled = settled(&stats);
    let (mut all_parents, subtopics_removed) = parents(
        &subjects,
        &read_lists(&subtopics_dir, n1, false)?,
        threshold,
    );
    let wanted = settings.parents_wanted(opts.n, subjects.len());
    all_parents.truncate(wanted);
    let parents = all_parents;

    let mut selection = Selection::default();
    let (mut rounds, mut last_leaves) = (0, None);
    if all_settled && !parents.is_empty() {
        let level2 = Arc::new(Leaves {
            template: loaded.leaves,
            parents: parents.clone(),
            count: settings.leaves,
            snippets: loaded.snippets,
        });
        let p = parents.len() as u64;
        check_leaves(
            &leaves_dir,
            &read_lists(&leaves_dir, p * settings.max_rounds, true)?,
            &parents,
        )?;
        for round in 1..=settings.max_rounds {
            let opts2 = GenerateOptions {
                out: leaves_dir.clone(),
                n: p * round,
                ..opts.clone()
            };
            // `--max-cost` bounds the whole run: each level gets what the levels before left.
            let spent = stats.run.cost_usd.unwrap_or(0.0);
            let cfg2 = TeacherConfig {
                max_cost: cfg.max_cost.map(|m| (m - spent).max(0.0)),
                ..cfg.clone()
            };
            let level = level2.clone();
            let s = super::instruct::forwarding_stop(&state, |inner| {
                run_corpus_on(level, &teacher, &cfg2, &opts2, max_tokens, inner, progress)
            })
            .await?;
            stats.add_run(&s);
            rounds = round;
            all_settled = settled(&s);
            last_leaves = Some(s);
            if !all_settled {
                break;
            }
            selection = select(
                &parents,
                &read_lists(&leaves_dir, p * round, true)?,
                opts.n,
                threshold,
            );
            if selection.kept.len() as u64 >= opts.n {
                break;
            }
        }
    }

    let before = topics_before(&opts.out);
    if all_settled {
        let header = format!(
            "# phigen topics: {} topics (`subject > subtopic > leaf`), seed {}, --max-similarity {threshold} (exact Jaccard of word 2-grams); topics.jsonl has their ids",
            selection.kept.len(),
            opts.seed
        );
        write_lists(&opts.out, &selection.kept, &header)?;
    }
    let mut per_subject: BTreeMap<&str, u64> = subjects.iter().map(|s| (s.as_str(), 0)).collect();
    for t in &selection.kept {
        *per_subject.entry(t.subject.as_str()).or_default() += 1;
    }
    let kept = selection.kept.len() as u64;
    let subtopics_corpus = std::mem::take(&mut stats.corpus);
    if let Some(leaves) = &last_leaves {
        add_directory(&mut stats, leaves);
    }
    stats.kind = "topics".into();
    stats.requested = opts.n;
    stats.records = kept;
    stats.complete = all_settled && kept >= opts.n;
    stats.run.written = kept.saturating_sub(before);
    stats.run.requests_per_second = if stats.run.wall_seconds > 0.0 {
        stats.run.requests.sent as f64 / stats.run.wall_seconds
    } else {
        0.0
    };
    stats.corpus = json!({
        "topics": kept,
        "written": all_settled,
        "file": TOPICS_FILE,
        "records_file": RECORDS_FILE,
        "seed_subjects": subjects.len(),
        "per_subject": per_subject,
        "subtopics_expanded": parents.len(),
        "subtopic_near_duplicates_removed": subtopics_removed,
        "leaf_rounds": rounds,
        "near_duplicates": {
            "max_similarity": threshold,
            "measure": "exact Jaccard of word 2-grams (candidates from MinHash-LSH, 64 bands x 2 rows)",
            "considered": selection.considered,
            "removed": selection.removed,
            "share_removed": if selection.considered == 0 { 0.0 } else { selection.removed as f64 / selection.considered as f64 },
        },
        "subtopics": subtopics_corpus,
        "leaves": last_leaves.map_or(Value::Null, |s| s.corpus),
    });
    let path = opts.out.join("stats.json");
    crate::artifact::atomic::write_json(&path, &stats)
        .map_err(|source| GenerateError::Io { path, source })?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbering, bullets, bold, descriptions and final dots go; a preface and a heading are not
    /// topics once other lines are numbered; `>` and `#` cannot break a topics file line.
    #[test]
    fn list_items_read_numbered_and_bulleted_answers() {
        let answer = "Sure! Here are some subtopics of biology\n\n1. **Cell biology**: how cells work\n2) Genetics - heredity and DNA.\n- Ecology\n* \"Evolution\"\nAdvanced:\n10. C# > Java for biologists\n";
        assert_eq!(
            list_items(answer),
            vec![
                "Cell biology",
                "Genetics",
                "Ecology",
                "Evolution",
                "C sharp Java for biologists"
            ]
        );
        // An unnumbered answer counts every line; a sentence is not a topic.
        let plain = "Photosynthesis\n3D printing\nThis line is a long sentence that goes on far too long to be a topic name at all\n";
        assert_eq!(list_items(plain), vec!["Photosynthesis", "3D printing"]);
        assert!(check_list("Here they are:\n").is_err());
    }

    /// Thresholds from hand-counted word 2-gram sets: "newton s laws of motion" shares 3 of the 6
    /// distinct 2-grams of the pair with "newton s three laws of motion" (0.5); the Roman and
    /// Ottoman empires share 2 of 6 (0.33).
    #[test]
    fn near_duplicates_are_decided_by_exact_jaccard() {
        let mut near = NearDuplicates::new(0.5);
        assert_eq!(near.check_and_keep("Newton's laws of motion"), None);
        assert_eq!(
            near.check_and_keep("Newton's three laws of motion"),
            Some(0.5)
        );
        assert_eq!(near.check_and_keep("History of the Roman empire"), None);
        assert_eq!(near.check_and_keep("History of the Ottoman empire"), None);
        assert_eq!(
            near.check_and_keep("history of the roman EMPIRE"),
            Some(1.0)
        );
        let mut strict = NearDuplicates::new(0.3);
        strict.check_and_keep("History of the Roman empire");
        assert!(strict
            .check_and_keep("History of the Ottoman empire")
            .is_some());
    }

    fn record(id: &str, text: &str) -> ListRecord {
        ListRecord {
            id: id.into(),
            text: text.into(),
            subtopic: None,
            parent_id: None,
            snippet_id: None,
        }
    }

    /// Selection order is (round, position, parent): a list cut at n takes the first item of
    /// every parent before any second item, whatever order the slots were answered in.
    #[test]
    fn selection_interleaves_parents_and_cuts_at_n() {
        let parents: Vec<Parent> = ["a", "b"]
            .iter()
            .map(|s| Parent {
                subject: format!("subject {s}"),
                subtopic: format!("sub {s}"),
                record: format!("r{s}"),
            })
            .collect();
        let lists: BTreeMap<u64, ListRecord> = [
            (
                0,
                record("l0", "1. alpha one\n2. alpha two\n3. alpha three"),
            ),
            (1, record("l1", "1. beta one\n2. alpha one\n3. beta three")),
            (2, record("l2", "1. gamma one")),
        ]
        .into();
        let s = select(&parents, &lists, 5, 0.5);
        let got: Vec<&str> = s.kept.iter().map(|t| t.topic.as_str()).collect();
        assert_eq!(
            got,
            vec![
                "alpha one",
                "beta one",
                "alpha two",
                "alpha three",
                "beta three"
            ]
        );
        assert_eq!((s.considered, s.removed), (6, 1), "`alpha one` again");
        assert_eq!(s.kept[1].path, "subject b > sub b > beta one");
        assert_eq!(s.kept[1].subtopics_record, "rb");
        let all = select(&parents, &lists, 100, 0.5);
        assert_eq!(all.kept.last().unwrap().topic, "gamma one");
        assert_eq!(all.kept.last().unwrap().round, 1);
    }

    /// Subtopics are deduplicated within their subject only.
    #[test]
    fn subtopics_are_deduplicated_per_subject() {
        let subjects = vec!["physics".to_string(), "history".to_string()];
        let lists: BTreeMap<u64, ListRecord> = [
            (0, record("p", "1. energy\n2. Energy\n3. waves")),
            (1, record("h", "1. energy")),
        ]
        .into();
        let (parents, removed) = parents(&subjects, &lists, 0.5);
        let got: Vec<(&str, &str)> = parents
            .iter()
            .map(|p| (p.subject.as_str(), p.subtopic.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("physics", "energy"),
                ("history", "energy"),
                ("physics", "waves")
            ]
        );
        assert_eq!(removed, 1);
    }

    /// 20000 topics from 25 subjects in lists of 20: 1250 subtopics (50 a subject), asked for in
    /// 3 rounds of 20.
    #[test]
    fn enough_subtopics_are_asked_for_the_target() {
        let s = TopicsSettings::new(PathBuf::from("seeds.txt"));
        assert_eq!(s.parents_wanted(20_000, 25), 1250);
        assert_eq!(s.subtopic_slots(20_000, 25), 75);
        assert_eq!(s.subtopic_slots(1, 25), 25, "one list a subject at least");
    }

    /// A recipe table with only `seeds` gets the flags' defaults; a misspelt key is an error.
    #[test]
    fn settings_read_from_a_recipe_table() {
        let s: TopicsSettings = toml::from_str("seeds = \"s.txt\"\n").unwrap();
        assert_eq!(s, TopicsSettings::new(PathBuf::from("s.txt")));
        assert!(toml::from_str::<TopicsSettings>("seeds = \"s.txt\"\nleaf = 3\n").is_err());
    }
}

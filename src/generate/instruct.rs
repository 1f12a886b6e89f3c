//! TinyStories-Instruct (Eldan & Li 2023): every story is preceded by a random subset of four
//! instructions, so that a small model learns to follow them:
//!
//! ```text
//! Summary: Tom and his dog find a lost ball and share it with a friend.
//! Features: Dialogue, BadEnding
//! Sentence: Then they played with a red ball.
//! Words: share, ball, red
//! Story: Once upon a time, …
//! ```
//! The fields keep this order (the paper's example; see [`Field::ORDER`]). Which of them a story
//! gets, and which of its sentences `Sentence:` quotes, is drawn from (seed, story id) alone.
//! `Words:` and `Features:` are the story prompt's sampled words and features, `Summary:` is a
//! second teacher call per story.
//!
//! Reads and writes, under `OUT/.phigen.instruct/` (two runs of the generation engine, each
//! exactly-once and resumable on its own): `stories/`, a plain `phigen stories` directory (the
//! same prompts and ids; required words are enforced, since `Words:` must hold), and
//! `summaries/`, where slot k asks for the summary of the k-th story (by slot) whose prefix has
//! `Summary:`. A summary request that failed is sent again by the next run, and the story it
//! summarises is not. Writes `OUT/part-*.parquet`: each story whose prefix is complete, with
//! `text` = prefix + story (the column `phigen tokenize` packs as one document), and
//! `OUT/stats.json`. Work directories are named `.phigen…`, which no stage reads as input.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use polars::prelude::{ChunkAgg, DataFrame, DataType, PolarsResult};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use super::engine::{GenerateError, GenerateOptions, RunState, Stats};
use super::prompt::Template;
use super::run::{run_corpus_on, LoadedTeacher, Progress};
use super::stories::Stories;
use super::{Corpus, Drop, DropReason};
use crate::artifact::outdir::DirLock;
use crate::artifact::shards::{self, Layout};
use crate::artifact::table::{self, row, Row};
use crate::teacher::factory::TeacherConfig;

pub const BUILTIN_SUMMARY_TEMPLATE: &str = include_str!("../../prompts/story-summary.txt");
/// The line the story follows; a prompt for an instruct model ends with it.
pub const STORY_LABEL: &str = "Story:";
/// Where the two engine runs live, below `OUT`.
pub const WORK_DIR: &str = ".phigen.instruct";
const RECORDS: Layout = Layout::Parts { prefix: "part" };
/// Output tokens of one summary: a sentence or two.
const SUMMARY_MAX_TOKENS: u32 = 256;

/// One instruction of the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Field {
    Summary,
    Features,
    Sentence,
    Words,
}

impl Field {
    /// The order of the lines in a prefix (as in the paper's example; `Ord` follows it).
    pub const ORDER: [Field; 4] = [
        Field::Summary,
        Field::Features,
        Field::Sentence,
        Field::Words,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Field::Summary => "Summary",
            Field::Features => "Features",
            Field::Sentence => "Sentence",
            Field::Words => "Words",
        }
    }
}

/// The fields of one story's prefix, in prefix order (at least one; `Features:` only for a story
/// that was asked for some), and a number that picks the sentence `Sentence:` quotes.
pub fn draw(seed: u64, story_id: &str, has_features: bool) -> (Vec<Field>, u64) {
    let mut h = blake3::Hasher::new();
    h.update(b"phigen/instruct");
    h.update(&seed.to_le_bytes());
    h.update(story_id.as_bytes());
    let mut rng = ChaCha8Rng::from_seed(*h.finalize().as_bytes());
    let available: Vec<Field> = Field::ORDER
        .into_iter()
        .filter(|&f| has_features || f != Field::Features)
        .collect();
    let k = rng.random_range(1..=available.len());
    let mut fields: Vec<Field> = available.choose_multiple(&mut rng, k).copied().collect();
    fields.sort();
    (fields, rng.random())
}

/// The sentences of a story, trimmed: a sentence ends at `.`, `!` or `?` (and the closing quotes
/// after it) when the next word starts with a capital or an opening quote, so `"Look!" said Tom.`
/// stays one sentence.
pub fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !matches!(c, '.' | '!' | '?') {
            continue;
        }
        let mut end = i + c.len_utf8();
        while let Some(&(j, n)) = chars.peek() {
            if !matches!(n, '.' | '!' | '?' | '"' | '”' | '\'' | '’') {
                break;
            }
            end = j + n.len_utf8();
            chars.next();
        }
        let rest = &text[end..];
        let next = rest.trim_start().chars().next();
        let ends = rest.starts_with(char::is_whitespace)
            && next.is_none_or(|n| n.is_uppercase() || n == '"' || n == '“');
        if ends || next.is_none() {
            let s = text[start..end].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = end;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// `bad_ending` → `BadEnding`: a feature as the prefix names it.
pub fn feature_label(name: &str) -> String {
    name.split(['_', '-', ' '])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut cs = p.chars();
            cs.next()
                .map(|c| c.to_uppercase().chain(cs).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

/// The prefix lines, then `Story: ` and the story.
pub fn document(lines: &[(Field, String)], story: &str) -> String {
    let mut s = String::new();
    for (field, value) in lines {
        s.push_str(field.label());
        s.push_str(": ");
        s.push_str(value);
        s.push('\n');
    }
    s.push_str(STORY_LABEL);
    s.push(' ');
    s.push_str(story.trim());
    s
}

/// A teacher's summary as one line: without a leading `Summary:` label, its lines joined.
pub fn clean_summary(answer: &str) -> String {
    let t = answer.trim();
    let t = match t.get(..8) {
        Some(head) if head.eq_ignore_ascii_case("summary:") => &t[8..],
        _ => t,
    };
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

row! {
    /// One story to summarise; its text is in the prompt, its id in the record.
    #[derive(Debug, Clone, Serialize)]
    pub struct StoryToSummarize {
        pub story_id: String,
        pub story_slot: u64,
    } not columns {
        #[serde(skip)]
        story: String,
    }
}

row! {
    #[derive(Debug, Clone)]
    pub struct SummaryChecks {
        pub word_count: u64,
    }
}

/// The summary corpus of the generation engine: slot k summarises story k of the list.
pub struct Summaries {
    template: Template,
    stories: Vec<StoryToSummarize>,
}

impl Corpus for Summaries {
    type Constraints = StoryToSummarize;
    type Checks = SummaryChecks;

    fn kind(&self) -> &'static str {
        "story_summary"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, slot: u64, _rng: &mut ChaCha8Rng) -> StoryToSummarize {
        self.stories[slot as usize].clone()
    }

    fn prompt_vars(&self, s: &StoryToSummarize) -> Vec<(&'static str, String)> {
        vec![("story", s.story.clone())]
    }

    fn check(
        &self,
        _: &StoryToSummarize,
        text: &str,
    ) -> impl std::future::Future<Output = Result<SummaryChecks, Drop>> + Send {
        let summary = clean_summary(text);
        std::future::ready(if summary.is_empty() {
            Err(Drop::new(DropReason::Empty, "only a `Summary:` label"))
        } else {
            Ok(SummaryChecks {
                word_count: summary.split_whitespace().count() as u64,
            })
        })
    }

    /// Two stories may well have the same one-line summary.
    fn unique_answers(&self) -> bool {
        false
    }

    fn word_bounds(&self) -> (usize, usize) {
        (3, 200)
    }

    fn typical_completion_tokens(&self) -> u64 {
        50
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec!["word_count"]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        Ok(json!({
            "summaries": df.height(),
            "mean_word_count": df.column("word_count")?.i64()?.mean(),
        }))
    }
}

row! {
    /// One TinyStories-Instruct record of `OUT/part-*.parquet`.
    #[derive(Debug, Clone)]
    pub struct InstructRecord {
        /// The story's id (its record in `.phigen.instruct/stories`).
        pub id: String,
        pub kind: &'static str,
        pub slot: u64,
        pub seed: u64,
        /// The prefix, then `Story: ` and the story: the document `phigen tokenize` packs.
        pub text: String,
        pub story: String,
        /// The prefix's fields, in its order (`Summary`, `Features`, `Sentence`, `Words`).
        pub fields: Vec<String>,
        pub summary: Option<String>,
        pub sentence: Option<String>,
        pub verb: String,
        pub noun: String,
        pub adjective: String,
        pub features: Vec<String>,
        pub model: String,
        /// The prompts behind the record, as `id vVERSION (hash)`: the story's, and the summary's
        /// when the prefix has one.
        pub story_template: String,
        pub summary_template: Option<String>,
    }
}

/// `id vVERSION (hash)`: a template as records name it.
fn template_name(t: &Template) -> String {
    format!("{} v{} ({})", t.id, t.version, t.hash)
}

/// What every record of a run shares.
struct Shared {
    seed: u64,
    story_template: String,
    summary_template: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InstructError {
    #[error("{dir}: summary slot {slot} was made for story {found}, but that slot's story is now {expected} (the stories changed after their summaries were asked for, e.g. by a larger --max-attempts); move {dir} away to ask for the summaries again")]
    StoriesChanged {
        dir: PathBuf,
        slot: u64,
        found: String,
        expected: String,
    },
    #[error("--instruct writes one directory in one task: drop --shard/--shards (a TinyStories-Instruct run cannot be split into array tasks)")]
    ArrayTask,
}

/// A kept story, as the instruct prefix needs it.
#[derive(Debug, Clone)]
struct StoryRow {
    id: String,
    slot: u64,
    text: String,
    verb: String,
    noun: String,
    adjective: String,
    features: Vec<String>,
    model: String,
}

/// A text-list column per row (an empty list for a null).
pub fn lists(df: &DataFrame, name: &str) -> PolarsResult<Vec<Vec<String>>> {
    let c = df.column(name)?;
    if !matches!(c.dtype(), DataType::List(_)) {
        return Err(polars::prelude::PolarsError::SchemaMismatch(
            format!("`{name}` is not a list column").into(),
        ));
    }
    let mut rows = Vec::with_capacity(c.len());
    for cell in c.list()?.series_iter() {
        rows.push(match cell {
            Some(s) => s.str()?.iter().flatten().map(str::to_string).collect(),
            None => Vec::new(),
        });
    }
    Ok(rows)
}

/// Every kept story of the stories directory, by slot.
fn read_stories(dir: &Path) -> Result<Vec<StoryRow>, GenerateError> {
    let cols = [
        "id",
        "slot",
        "text",
        "verb",
        "noun",
        "adjective",
        "features",
        "model",
    ];
    let mut out: BTreeMap<u64, StoryRow> = BTreeMap::new();
    for path in shards::list_files(dir, &RECORDS)? {
        let df = table::read_columns(&path, &cols)?;
        let text = |name| table::text_column(&df, &path, name);
        let (ids, texts, verbs, nouns, adjectives, models) = (
            text("id")?,
            text("text")?,
            text("verb")?,
            text("noun")?,
            text("adjective")?,
            text("model")?,
        );
        let slots = table::int_column(&df, &path, "slot")?;
        let features = lists(&df, "features").map_err(|source| table::TableError::Column {
            path: path.clone(),
            column: "features".into(),
            expected: table::Kind::TextList,
            source,
        })?;
        for i in 0..df.height() {
            let (Some(id), Some(slot), Some(text)) = (&ids[i], slots[i], &texts[i]) else {
                continue;
            };
            out.entry(slot as u64).or_insert_with(|| StoryRow {
                id: id.clone(),
                slot: slot as u64,
                text: text.clone(),
                verb: verbs[i].clone().unwrap_or_default(),
                noun: nouns[i].clone().unwrap_or_default(),
                adjective: adjectives[i].clone().unwrap_or_default(),
                features: features[i].clone(),
                model: models[i].clone().unwrap_or_default(),
            });
        }
    }
    Ok(out.into_values().collect())
}

/// (slot, story id, answer) of every summary in the summaries directory, Parquet and journal.
fn read_summaries(dir: &Path) -> Result<Vec<(u64, String, String)>, GenerateError> {
    let mut out = Vec::new();
    for path in shards::list_files(dir, &RECORDS)? {
        let df = table::read_columns(&path, &["slot", "story_id", "text"])?;
        let slots = table::int_column(&df, &path, "slot")?;
        let ids = table::text_column(&df, &path, "story_id")?;
        let texts = table::text_column(&df, &path, "text")?;
        for i in 0..df.height() {
            if let (Some(slot), Some(id), Some(text)) = (slots[i], &ids[i], &texts[i]) {
                out.push((slot as u64, id.clone(), text.clone()));
            }
        }
    }
    for row in shards::read_journal_rows(&dir.join("records.journal.jsonl"))? {
        if let (Some(slot), Some(id), Some(text)) = (
            row.get("slot").and_then(Value::as_u64),
            row.get("story_id").and_then(Value::as_str),
            row.get("text").and_then(Value::as_str),
        ) {
            out.push((slot, id.to_string(), text.to_string()));
        }
    }
    Ok(out)
}

/// A story with its drawn prefix fields.
struct Planned {
    story: StoryRow,
    fields: Vec<Field>,
    sentence: Option<String>,
}

fn plan(seed: u64, stories: Vec<StoryRow>) -> Vec<Planned> {
    stories
        .into_iter()
        .map(|story| {
            let (fields, pick) = draw(seed, &story.id, !story.features.is_empty());
            let sentences = sentences(&story.text);
            let sentence = (!sentences.is_empty())
                .then(|| sentences[(pick % sentences.len() as u64) as usize].to_string());
            Planned {
                story,
                fields,
                sentence,
            }
        })
        .collect()
}

/// The record of a planned story, once its summary (if its prefix has one) is known.
fn record(p: &Planned, summary: Option<&str>, shared: &Shared) -> Option<InstructRecord> {
    let s = &p.story;
    let mut lines = Vec::new();
    for &field in &p.fields {
        let value = match field {
            Field::Summary => clean_summary(summary?),
            Field::Features => s
                .features
                .iter()
                .map(|f| feature_label(f))
                .collect::<Vec<_>>()
                .join(", "),
            Field::Sentence => p.sentence.clone()?,
            Field::Words => [&s.verb, &s.noun, &s.adjective]
                .map(String::as_str)
                .join(", "),
        };
        lines.push((field, value));
    }
    Some(InstructRecord {
        id: s.id.clone(),
        kind: "tinystories_instruct",
        slot: s.slot,
        seed: shared.seed,
        text: document(&lines, &s.text),
        story: s.text.clone(),
        fields: p.fields.iter().map(|f| f.label().to_string()).collect(),
        summary: summary
            .filter(|_| p.fields.contains(&Field::Summary))
            .map(clean_summary),
        sentence: p
            .sentence
            .clone()
            .filter(|_| p.fields.contains(&Field::Sentence)),
        verb: s.verb.clone(),
        noun: s.noun.clone(),
        adjective: s.adjective.clone(),
        features: s.features.clone(),
        model: s.model.clone(),
        story_template: shared.story_template.clone(),
        summary_template: p
            .fields
            .contains(&Field::Summary)
            .then(|| shared.summary_template.clone()),
    })
}

/// Writes `records` as `OUT/part-*.parquet` (`shard_size` a file) and removes part files of an
/// earlier join beyond them; the join is recomputed from the two engine directories every run.
fn write_records(
    out: &Path,
    records: Vec<InstructRecord>,
    shard_size: usize,
) -> Result<(), GenerateError> {
    let schema: table::Schema = InstructRecord::COLUMNS.to_vec();
    let mut written = std::collections::HashSet::new();
    for (i, chunk) in records.chunks(shard_size.max(1)).enumerate() {
        let rows: Vec<Vec<Value>> = chunk
            .iter()
            .map(|r| {
                let mut cells = Vec::with_capacity(schema.len());
                r.clone().push_cells(&mut cells);
                cells
            })
            .collect();
        let path = out.join(format!("part-{i:05}.parquet"));
        table::write_parquet(&path, &schema, &rows)?;
        written.insert(path);
    }
    for stale in shards::list_files(out, &RECORDS)? {
        if !written.contains(&stale) {
            std::fs::remove_file(&stale).map_err(|source| GenerateError::Io {
                path: stale.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Runs `run` with a fresh [`RunState`] that stops when `outer` does (Ctrl-C reaches the second
/// engine run, whose counters must start at zero).
pub(crate) async fn forwarding_stop<F, Fut>(
    outer: &Arc<RunState>,
    run: F,
) -> Result<Stats, GenerateError>
where
    F: FnOnce(Arc<RunState>) -> Fut,
    Fut: std::future::Future<Output = Result<Stats, GenerateError>>,
{
    let inner = Arc::new(RunState::default());
    let fut = run(inner.clone());
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tick.tick() => {
                if let Some(reason) = outer.stopped() {
                    inner.stop(reason);
                }
            }
        }
    }
}

/// `phigen stories --instruct`: stories, then the summaries their prefixes need, then the joined
/// records (see the module documentation). Returns the stories run's stats with the summaries
/// run's requests, tokens and cost added, `records` = the instruct records in `OUT`,
/// `run.written` = those new since the last join, and the prefix counts in `corpus.instruct`;
/// the same goes to `OUT/stats.json`.
pub async fn run(
    stories: Arc<Stories>,
    summary_template: Template,
    cfg: &TeacherConfig,
    opts: &GenerateOptions,
    story_max_tokens: u32,
    state: Arc<RunState>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Stats, GenerateError> {
    if opts.task.is_some() {
        return Err(super::run::SetupError::Instruct(InstructError::ArrayTask).into());
    }
    std::fs::create_dir_all(&opts.out).map_err(|source| GenerateError::Io {
        path: opts.out.clone(),
        source,
    })?;
    let _lock = DirLock::exclusive(&opts.out)?;
    let work = opts.out.join(WORK_DIR);
    let (stories_dir, summaries_dir) = (work.join("stories"), work.join("summaries"));
    let shared = Shared {
        seed: opts.seed,
        story_template: template_name(stories.template()),
        summary_template: template_name(&summary_template),
    };
    let teacher = LoadedTeacher::load(cfg, opts.seed).await?;
    let story_opts = GenerateOptions {
        out: stories_dir.clone(),
        ..opts.clone()
    };
    let mut stats = run_corpus_on(
        stories,
        &teacher,
        cfg,
        &story_opts,
        story_max_tokens,
        state.clone(),
        progress,
    )
    .await?;
    // Summary slots follow the stories in slot order: ask for them only once no earlier slot can
    // still be filled (nothing stopped the run, no request is left to send again).
    let settled = stats.stopped.is_none() && stats.run.failed_requests == 0;
    let planned = plan(opts.seed, read_stories(&stories_dir)?);
    let to_summarize: Vec<StoryToSummarize> = planned
        .iter()
        .filter(|p| p.fields.contains(&Field::Summary))
        .map(|p| StoryToSummarize {
            story_id: p.story.id.clone(),
            story_slot: p.story.slot,
            story: p.story.text.clone(),
        })
        .collect();
    let existing = read_summaries(&summaries_dir)?;
    for (slot, found, _) in &existing {
        if let Some(s) = to_summarize.get(*slot as usize) {
            if &s.story_id != found {
                return Err(
                    super::run::SetupError::Instruct(InstructError::StoriesChanged {
                        dir: summaries_dir.clone(),
                        slot: *slot,
                        found: found.clone(),
                        expected: s.story_id.clone(),
                    })
                    .into(),
                );
            }
        }
    }
    let mut summaries: HashMap<String, String> = existing
        .into_iter()
        .map(|(_, id, text)| (id, text))
        .collect();
    let mut summary_stats = None;
    if settled && !to_summarize.is_empty() {
        let corpus = Arc::new(Summaries {
            template: summary_template,
            stories: to_summarize.clone(),
        });
        let summary_opts = GenerateOptions {
            out: summaries_dir.clone(),
            n: to_summarize.len() as u64,
            ..opts.clone()
        };
        // `--max-cost` bounds the whole run: the summaries get what the stories left.
        let spent = stats.run.cost_usd.unwrap_or(0.0);
        let summary_cfg = TeacherConfig {
            max_cost: cfg.max_cost.map(|m| (m - spent).max(0.0)),
            ..cfg.clone()
        };
        let s = forwarding_stop(&state, |inner| {
            run_corpus_on(
                corpus,
                &teacher,
                &summary_cfg,
                &summary_opts,
                SUMMARY_MAX_TOKENS,
                inner,
                progress,
            )
        })
        .await?;
        summaries = read_summaries(&summaries_dir)?
            .into_iter()
            .map(|(_, id, text)| (id, text))
            .collect();
        summary_stats = Some(s);
    }

    let records: Vec<InstructRecord> = planned
        .iter()
        .filter_map(|p| record(p, summaries.get(&p.story.id).map(String::as_str), &shared))
        .collect();
    let waiting = planned.len() - records.len();
    let mut per_field: BTreeMap<String, u64> = BTreeMap::new();
    for f in records.iter().flat_map(|r| &r.fields) {
        *per_field.entry(f.clone()).or_default() += 1;
    }
    let written = records.len() as u64;
    let mut before = 0;
    for path in shards::list_files(&opts.out, &RECORDS)? {
        before += table::read_columns(&path, &["id"])?.height() as u64;
    }
    write_records(&opts.out, records, opts.shard_size)?;

    let story_corpus = std::mem::take(&mut stats.corpus);
    stats.kind = "tinystories_instruct".into();
    stats.records = written;
    stats.run.written = written.saturating_sub(before);
    stats.complete = stats.complete && waiting == 0;
    stats.corpus = json!({
        "stories": story_corpus,
        "instruct": {
            "records": written,
            "stories_waiting_for_a_summary": waiting,
            "per_field": per_field,
            "summaries_asked": to_summarize.len(),
        },
        "summaries": summary_stats.as_ref().map(|s| &s.corpus),
    });
    if let Some(s) = &summary_stats {
        stats.add_run(s);
        for (&reason, &count) in &s.rejects_total {
            *stats.rejects_total.entry(reason).or_default() += count;
        }
    }
    let path = opts.out.join("stats.json");
    crate::artifact::atomic::write_json(&path, &stats)
        .map_err(|source| GenerateError::Io { path, source })?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The draw depends on (seed, story id) only, never yields an empty prefix, keeps the paper's
    /// order, leaves out `Features:` for a story asked for none, and over many stories gives
    /// every field and several subset sizes (a random subset, not a fixed one).
    #[test]
    fn the_prefix_fields_are_a_seeded_random_subset_in_prefix_order() {
        assert_eq!(draw(7, "abc", true), draw(7, "abc", true));
        let mut sizes = std::collections::BTreeSet::new();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let (fields, _) = draw(1, &format!("story-{i}"), true);
            assert!(!fields.is_empty());
            assert!(fields.windows(2).all(|w| w[0] < w[1]), "{fields:?}");
            sizes.insert(fields.len());
            seen.extend(fields);
            let (fields, _) = draw(1, &format!("story-{i}"), false);
            assert!(!fields.contains(&Field::Features));
        }
        assert_eq!(sizes.into_iter().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), Field::ORDER.to_vec());
        let differ =
            (0..50).any(|i| draw(1, &format!("s{i}"), true) != draw(2, &format!("s{i}"), true));
        assert!(differ, "the seed takes part in the draw");
    }

    /// Sentences split where a new one starts with a capital or a quote; quoted speech followed
    /// by "said Tom" stays in its sentence.
    #[test]
    fn sentences_keep_speech_with_its_speaker() {
        let text =
            "Once upon a time, Tim had a dog. \"Look at this!\" said Tom. They played.\n\nThe end";
        assert_eq!(
            sentences(text),
            vec![
                "Once upon a time, Tim had a dog.",
                "\"Look at this!\" said Tom.",
                "They played.",
                "The end"
            ]
        );
    }

    /// The document is the prefix lines in order, then `Story: ` and the story, as in the
    /// paper's example; a summary answer loses its label and line breaks.
    #[test]
    fn a_document_is_its_prefix_then_the_story() {
        assert_eq!(feature_label("bad_ending"), "BadEnding");
        assert_eq!(feature_label("dialogue"), "Dialogue");
        assert_eq!(
            clean_summary(" Summary: Tom finds\na ball. \n"),
            "Tom finds a ball."
        );
        let doc = document(
            &[
                (Field::Features, "Dialogue".into()),
                (Field::Words, "run, ball, red".into()),
            ],
            " Once upon a time.\n",
        );
        assert_eq!(
            doc,
            "Features: Dialogue\nWords: run, ball, red\nStory: Once upon a time."
        );
    }

    /// A record has exactly the drawn fields; one whose prefix needs a summary waits for it.
    #[test]
    fn a_record_carries_exactly_its_fields() {
        let story = StoryRow {
            id: "s1".into(),
            slot: 3,
            text: "Tom ran to the park. He saw a red ball.".into(),
            verb: "run".into(),
            noun: "ball".into(),
            adjective: "red".into(),
            features: vec!["dialogue".into(), "bad_ending".into()],
            model: "m".into(),
        };
        let p = Planned {
            story: story.clone(),
            fields: vec![Field::Summary, Field::Words],
            sentence: Some("He saw a red ball.".into()),
        };
        let shared = Shared {
            seed: 0,
            story_template: "tinystories v1 (h)".into(),
            summary_template: "story-summary v1 (h)".into(),
        };
        assert!(record(&p, None, &shared).is_none(), "waits for its summary");
        let r = record(&p, Some("Summary: Tom finds a ball."), &shared).unwrap();
        assert_eq!(
            r.text,
            "Summary: Tom finds a ball.\nWords: run, ball, red\nStory: Tom ran to the park. He saw a red ball."
        );
        assert_eq!(r.fields, vec!["Summary", "Words"]);
        assert_eq!(r.sentence, None);
        assert_eq!(r.summary_template.as_deref(), Some("story-summary v1 (h)"));
        let p = Planned {
            story,
            fields: vec![Field::Features, Field::Sentence],
            sentence: Some("He saw a red ball.".into()),
        };
        let r = record(&p, None, &shared).unwrap();
        assert_eq!(
            r.text.lines().take(2).collect::<Vec<_>>(),
            vec![
                "Features: Dialogue, BadEnding",
                "Sentence: He saw a red ball."
            ]
        );
        assert_eq!((r.summary, r.summary_template), (None, None));
    }
}

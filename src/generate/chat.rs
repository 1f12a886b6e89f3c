//! Chat SFT data (`phigen chat-data`): conversations for phi-3-style post-training, written by the
//! teacher or imported from existing OpenAI-style `messages` files.
//!
//! **Generated.** Each slot draws a topic (`seeds/chat-topics.txt` or `--topics`, the format
//! textbooks read), a [`Task`], a [`Difficulty`] and a number of exchanges (1 to `--max-turns`)
//! from the engine's (seed, slot, attempt) rng, and `prompts/chat.txt` asks the teacher for the
//! whole conversation as `### User` / `### Assistant` blocks. [`parse_conversation`] turns the
//! answer into `messages`; the answer is kept only if it is user/assistant turns starting with the
//! user and ending with the assistant ([`DropReason::Unparseable`] otherwise), with exactly the
//! exchanges asked for ([`DropReason::WrongTurns`]), no empty message ([`DropReason::EmptyTurn`]),
//! no assistant turn that opens with a refusal ([`DropReason::Refused`]), every ```` ```python ````
//! block of the assistant parsing as Python 3 ([`DropReason::SyntaxError`]; untagged blocks are
//! often output or shell and are not parsed; a user's code may be broken on purpose, as in a
//! debugging task), and no near duplicate of a kept conversation ([`DropReason::NearDuplicate`],
//! MinHash-LSH over word 5-grams of the messages, as prose textbooks). The engine adds its common
//! checks (empty, truncated, refusal, length, exact duplicates) and writes `part-*.parquet` with a
//! `messages` column (a list of `{role, content}` structs), which an `objective = "sft"` stage
//! reads as it is.
//!
//! **Imported** ([`import`]). jsonl (`.jsonl.gz` too) or Parquet rows with `messages` get the same
//! checks, but any number of exchanges and an optional leading `system` message; each record keeps
//! its source file and row, each drop names them. Writes the same `part-*.parquet` (with `text` the
//! conversation in the `### User` form generated records have), `rejects.parquet` and `stats.json`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use polars::prelude::{DataFrame, PolarsResult};
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::prompt::Template;
use super::textbooks::{counts, topic_vars, NearDuplicates, Topic, NEAR_DUPLICATE};
use super::{normalized_text_hash, python, refusal_opening, Corpus, Drop, DropReason};
use crate::artifact::docs;
use crate::artifact::records::{self, RecordsError};
use crate::artifact::shards::{self, Layout};
use crate::artifact::table::{self, row, Cell, Kind, Row};
use crate::model::chat::Message;
use crate::range::Ints;

pub const BUILTIN_TEMPLATE: &str = include_str!("../../prompts/chat.txt");
pub const BUILTIN_TOPICS: &str = include_str!("../../seeds/chat-topics.txt");
/// Exchanges (a user message and its answer) a conversation has at most, by default.
pub const DEFAULT_MAX_TURNS: u64 = 3;
/// The range of `--max-turns`.
pub const MAX_TURNS: Ints<u64> = Ints { min: 1, max: 20 };
const RECORDS: Layout = Layout::Parts { prefix: "part" };

/// What the user asks for (phi-3's SFT mix: math, coding, reasoning, conversation, identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Explain,
    HowTo,
    WriteCode,
    DebugCode,
    MathWordProblem,
    Reasoning,
    Compare,
    Rewrite,
    Conversation,
}

impl Task {
    pub const ALL: [Task; 9] = [
        Task::Explain,
        Task::HowTo,
        Task::WriteCode,
        Task::DebugCode,
        Task::MathWordProblem,
        Task::Reasoning,
        Task::Compare,
        Task::Rewrite,
        Task::Conversation,
    ];

    /// The name records and `stats.json` use.
    pub fn name(self) -> &'static str {
        match self {
            Task::Explain => "explain",
            Task::HowTo => "how_to",
            Task::WriteCode => "write_code",
            Task::DebugCode => "debug_code",
            Task::MathWordProblem => "math_word_problem",
            Task::Reasoning => "reasoning",
            Task::Compare => "compare",
            Task::Rewrite => "rewrite",
            Task::Conversation => "conversation",
        }
    }

    /// The task as the prompt states it. Only the code tasks name Python (so the mock teacher,
    /// which writes code for prompts that name it, answers them with code).
    pub fn instruction(self) -> &'static str {
        match self {
            Task::Explain => "the user asks the assistant to explain a concept of the topic clearly, with an example",
            Task::HowTo => "the user asks how to do something practical related to the topic; the assistant gives clear steps",
            Task::WriteCode => "the user asks for a Python program or function related to the topic; the assistant writes correct, commented Python code in a ```python block and explains it",
            Task::DebugCode => "the user shows short Python code related to the topic that has a bug and asks why it fails; the assistant finds the bug, explains it and gives the fixed Python code in a ```python block",
            Task::MathWordProblem => "the user poses a word problem related to the topic that needs arithmetic or algebra; the assistant solves it step by step and states the final answer",
            Task::Reasoning => "the user asks a question related to the topic that needs careful logical reasoning; the assistant reasons step by step before answering",
            Task::Compare => "the user asks the assistant to compare two ideas, methods or options related to the topic, with their trade-offs",
            Task::Rewrite => "the user gives a short text related to the topic and asks the assistant to rewrite, shorten or improve it",
            Task::Conversation => "a friendly everyday conversation touching on the topic; if the user asks about the assistant itself, it answers truthfully that it is an AI assistant, says what it can and cannot do, and admits uncertainty",
        }
    }
}

/// How hard the request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difficulty {
    Easy,
    Medium,
    Hard,
}

impl Difficulty {
    pub const ALL: [Difficulty; 3] = [Difficulty::Easy, Difficulty::Medium, Difficulty::Hard];

    pub fn name(self) -> &'static str {
        match self {
            Difficulty::Easy => "easy",
            Difficulty::Medium => "medium",
            Difficulty::Hard => "hard",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Difficulty::Easy => "easy (a beginner's question with a short answer)",
            Difficulty::Medium => "medium (needs some knowledge and a few steps)",
            Difficulty::Hard => "hard (an expert's question that needs several careful steps)",
        }
    }
}

/// A conversation is one `messages` cell: a list of `{role, content}` structs.
impl Cell for Vec<Message> {
    const KIND: Kind = Kind::Messages;
    fn into_cell(self) -> Value {
        serde_json::to_value(self).expect("messages serialize")
    }
}

row! {
    #[derive(Debug, Clone, Serialize)]
    pub struct ChatConstraints {
        /// `topic > subtopic`, as the topics file has it.
        pub topic_path: String,
        pub topic: String,
        pub subtopic: Option<String>,
        /// A [`Task`]'s name.
        pub task: String,
        /// A [`Difficulty`]'s name.
        pub difficulty: String,
        /// Exchanges asked for: user messages, each answered by the assistant.
        pub turns: u64,
    } not columns {
        #[serde(skip)]
        task_instruction: &'static str,
        #[serde(skip)]
        difficulty_description: &'static str,
    }
}

row! {
    #[derive(Debug, Clone)]
    pub struct ChatChecks {
        /// The conversation, OpenAI style: what an `objective = "sft"` stage reads.
        pub messages: Vec<Message>,
        /// Fenced code blocks in the assistant's messages.
        pub code_blocks: u64,
        pub word_count: u64,
    }
}

/// The role a header line opens: `### User` or `### Assistant` (any number of `#` from two, any
/// case, a trailing colon allowed); `### System` only where `system` is allowed (imports).
fn header(line: &str) -> Option<&'static str> {
    let t = line.trim();
    let rest = t.trim_start_matches('#');
    if t.len() - rest.len() < 2 {
        return None;
    }
    match rest
        .trim()
        .trim_end_matches(':')
        .trim()
        .to_lowercase()
        .as_str()
    {
        "user" => Some("user"),
        "assistant" => Some("assistant"),
        _ => None,
    }
}

/// The messages of an answer written as `### User` / `### Assistant` blocks (see the module
/// documentation); header lines inside ``` fences are content. Checks the shape: user first,
/// alternating, assistant last, nothing before the first header, no empty message, no fence left
/// open.
pub fn parse_conversation(text: &str) -> Result<Vec<Message>, Drop> {
    let unparseable = |d: String| Drop::new(DropReason::Unparseable, d);
    // (role, first line, lines)
    let mut blocks: Vec<(&'static str, usize, Vec<&str>)> = Vec::new();
    let mut in_fence = false;
    for (i, line) in text.lines().enumerate() {
        if !in_fence {
            if let Some(role) = header(line) {
                blocks.push((role, i + 1, Vec::new()));
                continue;
            }
        }
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        }
        match blocks.last_mut() {
            Some((_, _, lines)) => lines.push(line),
            None if line.trim().is_empty() => {}
            None => {
                return Err(unparseable(format!(
                    "line {}: text before the first `### User` header",
                    i + 1
                )))
            }
        }
    }
    if blocks.is_empty() {
        return Err(unparseable(
            "no `### User` / `### Assistant` headers".into(),
        ));
    }
    if in_fence {
        return Err(unparseable("a ``` code fence is never closed".into()));
    }
    let messages: Vec<Message> = blocks
        .iter()
        .map(|(role, _, lines)| Message {
            role: role.to_string(),
            content: lines.join("\n").trim().to_string(),
        })
        .collect();
    let lines: Vec<usize> = blocks.iter().map(|b| b.1).collect();
    check_turns(&messages, Some(&lines))?;
    Ok(messages)
}

/// The shape of a conversation: an optional leading `system` message, then user and assistant
/// alternating, starting with the user, ending with the assistant, no message empty. `lines`:
/// where each message starts in the answer, for the details.
fn check_turns(messages: &[Message], lines: Option<&[usize]>) -> Result<(), Drop> {
    let at = |i: usize| match lines {
        Some(l) => format!("message {} (line {})", i + 1, l[i]),
        None => format!("message {}", i + 1),
    };
    let unparseable = |d: String| Drop::new(DropReason::Unparseable, d);
    let start = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    if messages.len() <= start {
        return Err(unparseable("no user message".into()));
    }
    for (i, m) in messages.iter().enumerate() {
        let due = if i < start {
            "system"
        } else if (i - start).is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        };
        if m.role != due {
            return Err(unparseable(format!(
                "{} is `{}` where the {due}'s turn was due (expected {}user and assistant alternating, the user first)",
                at(i),
                m.role,
                if start == 1 { "a system message, then " } else { "" }
            )));
        }
        if m.content.trim().is_empty() {
            return Err(Drop::new(
                DropReason::EmptyTurn,
                format!("{} ({}) is empty", at(i), m.role),
            ));
        }
    }
    if messages.last().is_some_and(|m| m.role != "assistant") {
        return Err(unparseable(format!(
            "ends with {}, a user message the assistant never answers",
            at(messages.len() - 1)
        )));
    }
    Ok(())
}

/// The content checks of a well-formed conversation: no assistant message opens with a refusal,
/// every ```` ```python ```` block of the assistant parses. Returns the assistant's code blocks.
fn check_assistant(messages: &[Message]) -> Result<u64, Drop> {
    let mut blocks = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        if let Some(opening) = refusal_opening(m.content.trim()) {
            return Err(Drop::new(
                DropReason::Refused,
                format!("message {} (assistant) opens with \"{opening}\"", i + 1),
            ));
        }
        blocks += m.content.matches("```").count() as u64 / 2;
        let python = python::python_blocks(&m.content);
        for (k, b) in python.iter().filter(|b| !b.lang.is_empty()).enumerate() {
            if let Err(e) = python::parse(&b.code) {
                return Err(Drop::new(
                    DropReason::SyntaxError,
                    format!(
                        "message {} (assistant), python block {} (line {} of the message): {}",
                        i + 1,
                        k + 1,
                        b.line + e.line - 1,
                        e.message
                    ),
                ));
            }
        }
    }
    Ok(blocks)
}

/// A conversation in the `### User` / `### Assistant` form the teacher writes (`### System` for a
/// system message): the `text` of a record.
pub fn render_conversation(messages: &[Message]) -> String {
    messages
        .iter()
        .map(|m| {
            let mut role = m.role.clone();
            if let Some(c) = role.get_mut(..1) {
                c.make_ascii_uppercase();
            }
            format!("### {role}\n{}", m.content.trim())
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The messages' words, for near duplicates (the headers every conversation shares left out).
fn contents(messages: &[Message]) -> String {
    messages
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The generated chat corpus (see the module documentation).
pub struct Chat {
    template: Template,
    topics: Vec<Topic>,
    max_turns: u64,
    near: Mutex<NearDuplicates>,
}

impl Chat {
    /// `kept`: the `text` of conversations already in the output directory, which new ones must
    /// not nearly repeat.
    pub fn new(template: Template, topics: Vec<Topic>, max_turns: u64, kept: &[String]) -> Chat {
        let mut near = NearDuplicates::new();
        for text in kept {
            if let Ok(m) = parse_conversation(text) {
                near.check_and_keep(&contents(&m));
            }
        }
        Chat {
            template,
            topics,
            max_turns: max_turns.max(1),
            near: Mutex::new(near),
        }
    }

    /// The checks of one answer (see [`Corpus::check`]).
    pub fn verify(&self, c: &ChatConstraints, text: &str) -> Result<ChatChecks, Drop> {
        let messages = parse_conversation(text)?;
        let exchanges = messages.len() as u64 / 2;
        if exchanges != c.turns {
            return Err(Drop::new(
                DropReason::WrongTurns,
                format!(
                    "{exchanges} exchanges (user message and answer), the prompt asked for {}",
                    c.turns
                ),
            ));
        }
        let code_blocks = check_assistant(&messages)?;
        let near = self
            .near
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check_and_keep(&contents(&messages));
        if let Some(sim) = near {
            return Err(Drop::new(
                DropReason::NearDuplicate,
                format!("estimated Jaccard {sim:.2} ≥ {NEAR_DUPLICATE} with a kept conversation"),
            ));
        }
        Ok(ChatChecks {
            word_count: contents(&messages).split_whitespace().count() as u64,
            messages,
            code_blocks,
        })
    }
}

impl Corpus for Chat {
    type Constraints = ChatConstraints;
    type Checks = ChatChecks;

    fn kind(&self) -> &'static str {
        "chat"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, _slot: u64, rng: &mut ChaCha8Rng) -> ChatConstraints {
        let t = self
            .topics
            .choose(rng)
            .expect("topic lists are never empty");
        let task = *Task::ALL.choose(rng).expect("tasks");
        let difficulty = *Difficulty::ALL.choose(rng).expect("difficulties");
        ChatConstraints {
            topic_path: t.path(),
            topic: t.topic.clone(),
            subtopic: t.subtopic.clone(),
            task: task.name().into(),
            difficulty: difficulty.name().into(),
            turns: rng.random_range(1..=self.max_turns),
            task_instruction: task.instruction(),
            difficulty_description: difficulty.description(),
        }
    }

    fn prompt_vars(&self, c: &ChatConstraints) -> Vec<(&'static str, String)> {
        let (topic, subtopic) = topic_vars(&c.topic, c.subtopic.as_deref());
        vec![
            ("topic", topic),
            ("subtopic", subtopic),
            ("task", c.task_instruction.to_string()),
            ("difficulty", c.difficulty_description.to_string()),
            ("turns", c.turns.to_string()),
        ]
    }

    fn check(
        &self,
        c: &ChatConstraints,
        text: &str,
    ) -> impl std::future::Future<Output = Result<ChatChecks, Drop>> + Send {
        std::future::ready(self.verify(c, text))
    }

    fn word_bounds(&self) -> (usize, usize) {
        (20, 8000)
    }

    fn typical_completion_tokens(&self) -> u64 {
        // A few exchanges of a few hundred tokens each.
        700
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec![
            "topic",
            "task",
            "difficulty",
            "turns",
            "code_blocks",
            "word_count",
        ]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        use polars::prelude::ChunkAgg;
        let mut per_turns: BTreeMap<String, u64> = BTreeMap::new();
        for t in df.column("turns")?.i64()?.iter().flatten() {
            *per_turns.entry(t.to_string()).or_default() += 1;
        }
        let with_code = df
            .column("code_blocks")?
            .i64()?
            .iter()
            .filter(|v| v.is_some_and(|v| v > 0))
            .count();
        Ok(json!({
            "conversations": df.height(),
            "mean_word_count": df.column("word_count")?.i64()?.mean(),
            "conversations_with_code": with_code,
            "per_turns": per_turns,
            "per_task": counts(df, "task")?,
            "per_difficulty": counts(df, "difficulty")?,
            "per_topic": counts(df, "topic")?,
        }))
    }
}

/// The `text` of every record in a chat directory (shards and journal), for [`Chat::new`].
pub fn kept_texts(dir: &Path) -> Result<Vec<String>, super::engine::GenerateError> {
    let mut texts = Vec::new();
    for path in shards::list_files(dir, &RECORDS)? {
        let df = table::read_columns(&path, &["text"])?;
        texts.extend(
            table::text_column(&df, &path, "text")?
                .into_iter()
                .flatten(),
        );
    }
    for row in shards::read_journal_rows(&dir.join("records.journal.jsonl"))? {
        if let Some(t) = row.get("text").and_then(Value::as_str) {
            texts.push(t.to_string());
        }
    }
    Ok(texts)
}

// ---------------------------------------------------------------------------------------------
// Importing existing chat data.

#[derive(Debug, thiserror::Error)]
pub enum ChatImportError {
    /// Not wrapped as a source: the message says it whole (the CLI prints sources after it).
    #[error(
        "--input {0} (conversations: rows with OpenAI-style `messages` [{{role, content}}, …])"
    )]
    Input(RecordsError),
    #[error("--input: no input given — pass one or more files or directories of conversations")]
    NoInput,
    #[error("--out {path}: {source}")]
    Out {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Table(#[from] table::TableError),
    #[error(transparent)]
    Shards(#[from] shards::ShardError),
    #[error(transparent)]
    OutDir(#[from] crate::artifact::outdir::OutDirError),
}

/// Settings of an import (`phigen chat-data --input`, or a recipe's `kind = "chat-data"` step with
/// `paths`/`from`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatImportSettings {
    /// Records per Parquet shard.
    #[serde(default = "default_shard_size")]
    pub shard_size: usize,
}

fn default_shard_size() -> usize {
    1000
}

impl Default for ChatImportSettings {
    fn default() -> Self {
        ChatImportSettings {
            shard_size: default_shard_size(),
        }
    }
}

row! {
    /// One imported conversation of `part-*.parquet`.
    #[derive(Debug, Clone)]
    pub struct ImportedRecord {
        /// The row's own `id`, else `FILE:ROW`.
        pub id: String,
        pub kind: &'static str,
        /// The conversation in the `### User` / `### Assistant` form of generated records.
        pub text: String,
        pub messages: Vec<Message>,
        /// Exchanges: user messages, each answered.
        pub turns: u64,
        pub code_blocks: u64,
        pub word_count: u64,
        pub source_file: String,
        /// The row's index in its file (0-based, as in `FILE:ROW` ids).
        pub source_row: u64,
        /// The jsonl line (1-based, as editors show it); null for Parquet.
        pub source_line: Option<u64>,
    }
}

row! {
    /// One dropped row of `rejects.parquet`.
    #[derive(Debug, Clone)]
    pub struct ImportReject {
        pub id: String,
        pub reason: DropReason,
        pub detail: String,
        pub source_file: String,
        pub source_row: u64,
        pub source_line: Option<u64>,
        /// The row as read (its JSON), for the audit.
        pub row: String,
    }
}

/// Rows read and kept of one input file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FileCounts {
    pub rows: u64,
    pub kept: u64,
}

/// `stats.json` of an import.
#[derive(Debug, Clone, Serialize)]
pub struct ImportStats {
    pub kind: &'static str,
    pub rows: u64,
    pub records: u64,
    pub keep_rate: f64,
    pub rejects_total: BTreeMap<DropReason, u64>,
    pub per_file: BTreeMap<String, FileCounts>,
    pub per_turns: BTreeMap<u64, u64>,
    pub conversations_with_code: u64,
}

/// The conversation files of `inputs`: files as given, directories' `.jsonl(.gz)` and `.parquet`
/// files sorted (stage reports such as `rejects.parquet` passed over).
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, ChatImportError> {
    if inputs.is_empty() {
        return Err(ChatImportError::NoInput);
    }
    records::table_files(inputs).map_err(ChatImportError::Input)
}

/// The conversation of one row, or why it is dropped.
fn row_messages(value: &Result<Value, String>) -> Result<Vec<Message>, Drop> {
    let value = value
        .as_ref()
        .map_err(|e| Drop::new(DropReason::Unparseable, e.clone()))?;
    let messages = value
        .get("messages")
        .filter(|m| !m.is_null())
        .ok_or_else(|| {
            Drop::new(
                DropReason::Unparseable,
                "no `messages` field: expected {\"messages\": [{\"role\": …, \"content\": …}, …]}",
            )
        })?;
    let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
        Drop::new(
            DropReason::Unparseable,
            format!("`messages` is not a list of {{role, content}} strings: {e}"),
        )
    })?;
    check_turns(&messages, None)?;
    Ok(messages)
}

/// Imports the conversations of `inputs` into `out` (see the module documentation). The output
/// is a function of the inputs alone: a re-run rewrites it whole.
pub fn import(
    inputs: &[PathBuf],
    out: &Path,
    settings: &ChatImportSettings,
) -> Result<ImportStats, ChatImportError> {
    let files = input_files(inputs)?;
    std::fs::create_dir_all(out).map_err(|source| ChatImportError::Out {
        path: out.to_path_buf(),
        source,
    })?;
    let _lock = crate::artifact::outdir::DirLock::exclusive(out)?;
    let mut near = NearDuplicates::new();
    let mut exact: HashSet<[u8; 32]> = HashSet::new();
    let mut records: Vec<ImportedRecord> = Vec::new();
    let mut rejects: Vec<ImportReject> = Vec::new();
    let mut stats = ImportStats {
        kind: "chat_import",
        rows: 0,
        records: 0,
        keep_rate: 0.0,
        rejects_total: BTreeMap::new(),
        per_file: BTreeMap::new(),
        per_turns: BTreeMap::new(),
        conversations_with_code: 0,
    };
    for path in &files {
        let name = path.display().to_string();
        let counts = stats.per_file.entry(name.clone()).or_default();
        for r in records::read(path).map_err(ChatImportError::Input)? {
            counts.rows += 1;
            let id = docs::row_id(
                path,
                r.row,
                r.value
                    .as_ref()
                    .ok()
                    .and_then(|v| docs::json_id(v.get("id"))),
            );
            let checked = row_messages(&r.value).and_then(|m| {
                let code_blocks = check_assistant(&m)?;
                let text = render_conversation(&m);
                if !exact.insert(normalized_text_hash(&text)) {
                    return Err(Drop::new(
                        DropReason::Duplicate,
                        "the same conversation was already kept",
                    ));
                }
                if let Some(sim) = near.check_and_keep(&contents(&m)) {
                    return Err(Drop::new(
                        DropReason::NearDuplicate,
                        format!("estimated Jaccard {sim:.2} ≥ {NEAR_DUPLICATE} with a kept conversation"),
                    ));
                }
                Ok((m, text, code_blocks))
            });
            let where_ = match r.line {
                Some(l) => format!("{name}:{l}"),
                None => format!("{name}: row {}", r.row),
            };
            match checked {
                Ok((messages, text, code_blocks)) => {
                    counts.kept += 1;
                    let turns = messages.iter().filter(|m| m.role == "user").count() as u64;
                    *stats.per_turns.entry(turns).or_default() += 1;
                    stats.conversations_with_code += u64::from(code_blocks > 0);
                    records.push(ImportedRecord {
                        id,
                        kind: "chat_import",
                        word_count: contents(&messages).split_whitespace().count() as u64,
                        text,
                        messages,
                        turns,
                        code_blocks,
                        source_file: name.clone(),
                        source_row: r.row as u64,
                        source_line: r.line.map(|l| l as u64),
                    });
                }
                Err(drop) => {
                    tracing::debug!(at = %where_, reason = %drop.reason, detail = %drop.detail, "dropped");
                    *stats.rejects_total.entry(drop.reason).or_default() += 1;
                    rejects.push(ImportReject {
                        id,
                        reason: drop.reason,
                        detail: format!("{where_}: {}", drop.detail),
                        source_file: name.clone(),
                        source_row: r.row as u64,
                        source_line: r.line.map(|l| l as u64),
                        row: r.raw().into_owned(),
                    });
                }
            }
        }
    }
    stats.rows = stats.per_file.values().map(|c| c.rows).sum();
    stats.records = records.len() as u64;
    stats.keep_rate = stats.records as f64 / stats.rows.max(1) as f64;
    write_rows(out, records, settings.shard_size)?;
    let rejects_path = out.join("rejects.parquet");
    let schema: table::Schema = ImportReject::COLUMNS.to_vec();
    table::write_parquet(&rejects_path, &schema, &cells(rejects))?;
    let stats_path = out.join("stats.json");
    crate::artifact::atomic::write_json(&stats_path, &stats).map_err(|source| {
        ChatImportError::Out {
            path: stats_path,
            source,
        }
    })?;
    Ok(stats)
}

fn cells<R: Row>(rows: Vec<R>) -> Vec<Vec<Value>> {
    rows.into_iter()
        .map(|r| {
            let mut c = Vec::new();
            r.push_cells(&mut c);
            c
        })
        .collect()
}

/// Writes `records` as `OUT/part-*.parquet` (`shard_size` a file) and removes part files of an
/// earlier import beyond them.
fn write_rows(
    out: &Path,
    records: Vec<ImportedRecord>,
    shard_size: usize,
) -> Result<(), ChatImportError> {
    let schema: table::Schema = ImportedRecord::COLUMNS.to_vec();
    let mut written = HashSet::new();
    let mut rows = cells(records);
    let mut i = 0;
    while !rows.is_empty() || i == 0 {
        let rest = rows.split_off(rows.len().min(shard_size.max(1)));
        let path = out.join(format!("part-{i:05}.parquet"));
        table::write_parquet(&path, &schema, &rows)?;
        written.insert(path);
        rows = rest;
        i += 1;
    }
    for stale in shards::list_files(out, &RECORDS)? {
        if !written.contains(&stale) {
            std::fs::remove_file(&stale).map_err(|source| ChatImportError::Out {
                path: stale.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::textbooks::parse_topics;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    fn corpus() -> Chat {
        Chat::new(
            Template::parse("chat.txt", BUILTIN_TEMPLATE).unwrap(),
            parse_topics("t.txt", BUILTIN_TOPICS).unwrap(),
            3,
            &[],
        )
    }

    fn asked(turns: u64) -> ChatConstraints {
        ChatConstraints {
            topic_path: "algebra > linear equations".into(),
            topic: "algebra".into(),
            subtopic: Some("linear equations".into()),
            task: "explain".into(),
            difficulty: "easy".into(),
            turns,
            task_instruction: Task::Explain.instruction(),
            difficulty_description: Difficulty::Easy.description(),
        }
    }

    /// A `messages` column ([`Kind::Messages`]) round-trips through Parquet as the SFT reader
    /// reads it: a list of `{role, content}` objects, a null cell null; a shard whose cells are all
    /// null keeps the list-of-struct type (so shards of one directory agree).
    #[test]
    fn messages_cells_round_trip_through_parquet() {
        let dir = tempfile::tempdir().unwrap();
        let schema: table::Schema = vec![("messages", Kind::Messages)];
        let m = vec![msg("user", "Hi"), msg("assistant", "Hello")];
        let a = dir.path().join("a.parquet");
        table::write_parquet(
            &a,
            &schema,
            &[vec![m.clone().into_cell()], vec![Value::Null]],
        )
        .unwrap();
        let rows = records::read(&a).unwrap();
        let messages = |i: usize| rows[i].value.as_ref().unwrap()["messages"].clone();
        assert_eq!(messages(0), serde_json::to_value(&m).unwrap());
        assert!(messages(1).is_null());
        let b = dir.path().join("b.parquet");
        table::write_parquet(&b, &schema, &[vec![Value::Null]]).unwrap();
        let dtype = |p: &Path| {
            table::read_frame(p, None)
                .unwrap()
                .column("messages")
                .unwrap()
                .dtype()
                .clone()
        };
        assert_eq!(dtype(&a), dtype(&b));
    }

    /// Hand-written answers in the format prompts/chat.txt asks for.
    const ONE: &str =
        "### User\nWhat is 2x = 6?\n\n### Assistant\nDivide both sides by 2: x = 3.\n";
    const TWO: &str = "### User\nHow do I reverse a list in Python?\n\n### Assistant\nUse slicing:\n\n```python\nxs = [1, 2, 3]\nprint(xs[::-1])\n```\n\n### User\nAnd in place?\n\n### Assistant\nCall `xs.reverse()`; it returns None.\n";

    /// A single- and a two-exchange answer parse into alternating messages (the expected values
    /// are the answers' blocks, trimmed), headers in any case and with a colon count, and a
    /// header inside a code fence is content.
    #[test]
    fn good_answers_parse_into_messages() {
        assert_eq!(
            parse_conversation(ONE).unwrap(),
            vec![
                msg("user", "What is 2x = 6?"),
                msg("assistant", "Divide both sides by 2: x = 3.")
            ]
        );
        let m = parse_conversation(TWO).unwrap();
        assert_eq!(
            m.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(),
            ["user", "assistant", "user", "assistant"]
        );
        assert_eq!(
            m[1].content,
            "Use slicing:\n\n```python\nxs = [1, 2, 3]\nprint(xs[::-1])\n```"
        );
        let loose = "## user:\nHi\n#### ASSISTANT\nIn Markdown:\n```\n### User\n```\n";
        let m = parse_conversation(loose).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].content, "In Markdown:\n```\n### User\n```");
        // Rendering gives the same form back, so records' `text` re-parses.
        assert_eq!(parse_conversation(&render_conversation(&m)).unwrap(), m);
        let c = corpus();
        let checks = c.verify(&asked(2), TWO).unwrap();
        assert_eq!((checks.code_blocks, checks.messages.len()), (1, 4));
        assert!(c.verify(&asked(1), ONE).is_ok());
    }

    /// Each malformed answer is dropped with its own reason, and the detail says where.
    #[test]
    fn malformed_answers_are_dropped_by_reason() {
        let c = corpus();
        let reason = |turns, text: &str| c.verify(&asked(turns), text).unwrap_err();
        // Two exchanges where one was asked for.
        let d = reason(1, TWO);
        assert_eq!(d.reason, DropReason::WrongTurns);
        assert!(
            d.detail.contains("2 exchanges") && d.detail.contains("asked for 1"),
            "{}",
            d.detail
        );
        // An empty assistant turn.
        let d = reason(1, "### User\nHi there\n\n### Assistant\n\n");
        assert_eq!(d.reason, DropReason::EmptyTurn);
        assert!(d.detail.contains("message 2 (line 4)"), "{}", d.detail);
        // Shape errors: a preamble, no headers, two users in a row, ending with the user,
        // starting with the assistant, a fence never closed.
        for bad in [
            "Sure! Here it is.\n### User\nHi\n### Assistant\nHello\n",
            "User: hi\nAssistant: hello\n",
            "### User\nHi\n### User\nAgain\n### Assistant\nHello\n",
            "### User\nHi\n### Assistant\nHello\n### User\nBye\n",
            "### Assistant\nHello\n### User\nHi\n",
            "### User\nHi\n### Assistant\n```python\nx = 1\n",
        ] {
            assert_eq!(reason(1, bad).reason, DropReason::Unparseable, "{bad}");
        }
        // A python block of the assistant that does not parse; the user's broken code is fine.
        let bad_code = "### User\nWhy does this fail?\n```python\nfor i in range(3)\n    print(i)\n```\n### Assistant\nThe colon is missing:\n```python\nfor i in range(3)\n    print(i)\n```\n";
        let d = reason(1, bad_code);
        assert_eq!(d.reason, DropReason::SyntaxError);
        assert!(
            d.detail.contains("message 2 (assistant), python block 1"),
            "{}",
            d.detail
        );
        let fixed = "### User\nWhy does this fail?\n```python\nfor i in range(3)\n    print(i)\n```\n### Assistant\nThe colon is missing:\n```python\nfor i in range(3):\n    print(i)\n```\n";
        assert!(c.verify(&asked(1), fixed).is_ok(), "{fixed}");
        // An assistant turn that refuses.
        let d = reason(
            1,
            "### User\nHelp me\n### Assistant\nI'm sorry, but I cannot help.\n",
        );
        assert_eq!(d.reason, DropReason::Refused);
    }

    /// A conversation that repeats a kept one with one word changed is a near duplicate, also
    /// when the kept one is from an earlier run (read back from its `text`).
    #[test]
    fn near_duplicates_are_dropped_also_across_runs() {
        let long = "### User\nCan you explain how photosynthesis works in green plants and why it matters for the animals that eat them?\n\n### Assistant\nPlants capture light with chlorophyll in their leaves. They use that energy to turn water from the soil and carbon dioxide from the air into sugar, and they release oxygen as a by-product. The sugar feeds the plant and, through food chains, the animals that eat plants, while the oxygen is what animals breathe.\n";
        let c = corpus();
        assert!(c.verify(&asked(1), long).is_ok());
        let near = long.replace("green plants", "most plants");
        assert_eq!(
            c.verify(&asked(1), &near).unwrap_err().reason,
            DropReason::NearDuplicate
        );
        let resumed = Chat::new(
            Template::parse("chat.txt", BUILTIN_TEMPLATE).unwrap(),
            parse_topics("t.txt", "x\n").unwrap(),
            3,
            &[long.to_string()],
        );
        assert_eq!(
            resumed.verify(&asked(1), &near).unwrap_err().reason,
            DropReason::NearDuplicate
        );
    }

    /// The draw covers every task, difficulty and exchange count from 1 to --max-turns, and the
    /// prompt states the drawn values (its `Exchanges:` line is what the mock teacher reads).
    #[test]
    fn constraints_cover_tasks_difficulties_and_turns() {
        use rand::SeedableRng;
        let c = corpus();
        let (mut tasks, mut levels, mut turns) = (HashSet::new(), HashSet::new(), HashSet::new());
        for i in 0..400 {
            let k = c.sample(i, &mut ChaCha8Rng::seed_from_u64(i));
            tasks.insert(k.task.clone());
            levels.insert(k.difficulty.clone());
            turns.insert(k.turns);
        }
        assert_eq!(tasks.len(), Task::ALL.len());
        assert_eq!(levels.len(), 3);
        assert_eq!(turns, HashSet::from([1, 2, 3]));
        let k = asked(2);
        let vars = c.prompt_vars(&k);
        let values: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let prompt = c.template().render(&values).unwrap();
        assert!(prompt.contains("Exchanges: 2 "), "{prompt}");
        assert!(
            prompt.contains("Topic: algebra (focus: linear equations)"),
            "{prompt}"
        );
        assert!(
            !prompt.contains("Python"),
            "only code tasks name Python: {prompt}"
        );
    }

    /// Imported rows: good ones (a system message allowed, any number of exchanges) are kept with
    /// their source; bad ones are dropped with a reason whose detail names file and line.
    #[test]
    fn import_keeps_good_rows_and_names_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("chat.jsonl");
        let good = |q: &str, a: &str| {
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                .to_string()
        };
        let lines = [
            good("What is the capital of France?", "Paris is the capital of France."),
            "{not json".to_string(),
            json!({"text": "no messages"}).to_string(),
            json!({"id": "sys", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}).to_string(),
            json!({"messages": [{"role": "user", "content": "Hi"}]}).to_string(),
            good("What is the capital of France?", "Paris is the capital of France."),
            good("Write code", "```python\ndef f(:\n```"),
        ];
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
        let out = dir.path().join("out");
        let stats = import(
            std::slice::from_ref(&f),
            &out,
            &ChatImportSettings::default(),
        )
        .unwrap();
        assert_eq!((stats.rows, stats.records), (7, 2));
        assert_eq!(
            stats.rejects_total,
            BTreeMap::from([
                (DropReason::Unparseable, 3),
                (DropReason::Duplicate, 1),
                (DropReason::SyntaxError, 1)
            ])
        );
        assert_eq!(stats.per_turns, BTreeMap::from([(1, 1), (2, 1)]));
        let df = table::read_frame(&out.join("part-00000.parquet"), None).unwrap();
        let ids = table::text_column(&df, &out, "id").unwrap();
        assert_eq!(
            ids[0].as_deref(),
            Some(format!("{}:0", f.display()).as_str())
        );
        assert_eq!(ids[1].as_deref(), Some("sys"));
        let rejects = table::read_frame(&out.join("rejects.parquet"), None).unwrap();
        let details = table::text_column(&rejects, &out, "detail").unwrap();
        assert!(
            details[0]
                .as_deref()
                .unwrap()
                .contains("chat.jsonl:2: not JSON"),
            "{details:?}"
        );
        assert!(
            details[1]
                .as_deref()
                .unwrap()
                .contains("chat.jsonl:3: no `messages`"),
            "{details:?}"
        );
        // A file that is not conversation data is an error naming it.
        let e = import(
            &[dir.path().join("x.csv")],
            &out,
            &ChatImportSettings::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.csv"), "{e}");
    }
}

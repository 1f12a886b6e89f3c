//! CodeTextbook (phi-1 §2.2): textbook sections that mix clear explanation with short, correct
//! Python, written for a sampled topic × audience × style.
//!
//! Reads `seeds/topics.txt` (`topic` or `topic > subtopic` a line, or a deeper path such as the
//! `subject > subtopic > leaf` lines `phigen topics` writes), `seeds/audiences.txt`,
//! `seeds/styles.txt` and `prompts/textbook.txt`. An answer is kept only if it has at least one
//! Python code block and every block parses as Python 3; with `--run-code` also only if its blocks,
//! run in order as one program in the sandbox, run to the end. `stats.json` shows code-block
//! counts and the records per topic and per audience, so coverage is visible.
//!
//! With [`SectionStyle::Prose`], phi-1.5's natural-language textbooks instead ([`ProseTextbooks`]):
//! `prompts/textbook-prose.txt`, `seeds/prose-audiences.txt` and `seeds/prose-styles.txt` by
//! default, and optionally an excerpt of web text in each prompt (phi-1.5 put web samples into its
//! prompts for diversity). The checks suit prose: besides the common ones (length, refusal,
//! truncation, exact duplicates) the English share of the words and near duplicates
//! (MinHash-LSH); code is counted but neither required nor parsed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use polars::prelude::{DataFrame, PolarsResult};
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use super::prompt::Template;
use super::python;
use super::words;
use super::{Corpus, Drop, DropReason};
use crate::artifact::table::row;
use crate::dedup::minhash::{estimated_similarity, MinHasher, Params};
use crate::sandbox::Sandbox;

pub const BUILTIN_TEMPLATE: &str = include_str!("../../prompts/textbook.txt");
pub const BUILTIN_PROSE_TEMPLATE: &str = include_str!("../../prompts/textbook-prose.txt");
pub const BUILTIN_PROSE_AUDIENCES: &str = include_str!("../../seeds/prose-audiences.txt");
pub const BUILTIN_PROSE_STYLES: &str = include_str!("../../seeds/prose-styles.txt");
/// English function words (articles, pronouns, prepositions, …), for the English share.
const FUNCTION_WORDS: &str = include_str!("../../seeds/tinystories/function_words.txt");
/// The prompt a local teacher gets unless another is given: see the file's header.
pub const BUILTIN_SMALL_TEMPLATE: &str = include_str!("../../prompts/textbook-small.txt");
pub const BUILTIN_AUDIENCES: &str = include_str!("../../seeds/audiences.txt");
pub const BUILTIN_STYLES: &str = include_str!("../../seeds/styles.txt");
pub const BUILTIN_TOPICS: &str = include_str!("../../seeds/topics.txt");

#[derive(Debug, thiserror::Error)]
pub enum SeedListError {
    #[error("{path}: could not read: {source} — expected a text file with one entry a line")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no entries (only blank lines and `#` comments) — add at least one line")]
    Empty { path: String },
    #[error("{path}:{line}: `{text}` is not `topic`, `topic > subtopic` or a deeper path such as `subject > subtopic > leaf` (no part may be empty)")]
    BadTopic {
        path: String,
        line: usize,
        text: String,
    },
    #[error("--web {path}: {source} — expected jsonl (one object with a string `text` a line, `id` optional) or Parquet with a `text` column")]
    Web {
        path: String,
        source: Box<crate::artifact::docs::DocsError>,
    },
}

/// Non-blank, non-comment lines of a seed list, with their line numbers.
fn entries(path: &str, text: &str) -> Result<Vec<(usize, String)>, SeedListError> {
    let lines: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim().to_string()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(SeedListError::Empty { path: path.into() });
    }
    Ok(lines)
}

/// Reads a seed list from `path`, or the built-in copy when `path` is `None`.
fn read_list(
    path: Option<&Path>,
    builtin: &'static str,
    name: &str,
) -> Result<(String, String), SeedListError> {
    match path {
        None => Ok((format!("<built-in seeds/{name}>"), builtin.to_string())),
        Some(p) => std::fs::read_to_string(p)
            .map(|t| (p.display().to_string(), t))
            .map_err(|source| SeedListError::Io {
                path: p.display().to_string(),
                source,
            }),
    }
}

/// A line of a topics file: `topic`, `topic > subtopic`, or a deeper path (`phigen topics` writes
/// `subject > subtopic > leaf`), whose parts after the first are `subtopic`, joined by ` > `.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Topic {
    pub topic: String,
    pub subtopic: Option<String>,
}

impl Topic {
    /// The whole path, `topic > subtopic`, as the topics file has it.
    pub fn path(&self) -> String {
        match &self.subtopic {
            Some(s) => format!("{} > {s}", self.topic),
            None => self.topic.clone(),
        }
    }
}

/// The `topic` and `subtopic` prompt variables of a topic. `recursion > memoization` gives
/// `recursion` and ` (focus: memoization)`, as ever; a deeper path is about its leaf, with the
/// path above it as context: `algorithms > recursion > memoization` gives `memoization` and
/// ` (part of algorithms > recursion)`.
pub fn topic_vars(topic: &str, subtopic: Option<&str>) -> (String, String) {
    match subtopic {
        None => (topic.to_string(), String::new()),
        Some(s) => match s.rsplit_once(" > ") {
            None => (topic.to_string(), format!(" (focus: {s})")),
            Some((middle, leaf)) => (leaf.to_string(), format!(" (part of {topic} > {middle})")),
        },
    }
}

pub fn parse_topics(path: &str, text: &str) -> Result<Vec<Topic>, SeedListError> {
    entries(path, text)?
        .into_iter()
        .map(|(line, l)| {
            let parts: Vec<&str> = l.split('>').map(str::trim).collect();
            if parts.iter().any(|p| p.is_empty()) {
                return Err(SeedListError::BadTopic {
                    path: path.into(),
                    line,
                    text: l,
                });
            }
            Ok(Topic {
                topic: parts[0].to_string(),
                subtopic: (parts.len() > 1).then(|| parts[1..].join(" > ")),
            })
        })
        .collect()
}

pub fn parse_plain(path: &str, text: &str) -> Result<Vec<String>, SeedListError> {
    Ok(entries(path, text)?.into_iter().map(|(_, l)| l).collect())
}

/// Reads and parses a topics file (`path`, or the built-in `seeds/topics.txt`).
pub fn load_topics(path: Option<&Path>) -> Result<Vec<Topic>, SeedListError> {
    let (name, text) = read_list(path, BUILTIN_TOPICS, "topics.txt")?;
    parse_topics(&name, &text)
}

/// Reads and parses a one-entry-a-line list (`path`, or the built-in `seeds/{name}`).
pub fn load_plain(
    path: Option<&Path>,
    builtin: &'static str,
    name: &str,
) -> Result<Vec<String>, SeedListError> {
    let (name, text) = read_list(path, builtin, name)?;
    parse_plain(&name, &text)
}

/// The documents of a `--web` file (jsonl or Parquet with `text`), as snippets a prompt may quote.
pub fn load_snippets(path: &Path) -> Result<Vec<Snippet>, SeedListError> {
    let mut out = Vec::new();
    crate::artifact::docs::read_documents(path, |batch| {
        out.extend(
            batch
                .into_iter()
                .filter(|d| !d.text.trim().is_empty())
                .map(|d| Snippet {
                    id: d.id,
                    text: d.text,
                }),
        );
        Ok::<(), crate::artifact::docs::DocsError>(())
    })
    .map_err(|source| SeedListError::Web {
        path: path.display().to_string(),
        source: Box::new(source),
    })?;
    if out.is_empty() {
        return Err(SeedListError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(out)
}

pub struct Textbooks {
    template: Template,
    topics: Vec<Topic>,
    audiences: Vec<String>,
    styles: Vec<String>,
    /// Where a section's program runs (`--run-code`); `None`: its code only has to parse.
    sandbox: Option<Arc<Sandbox>>,
}

impl Textbooks {
    pub fn new(
        template: Template,
        topics: Vec<Topic>,
        audiences: Vec<String>,
        styles: Vec<String>,
        sandbox: Option<Arc<Sandbox>>,
    ) -> Textbooks {
        Textbooks {
            template,
            topics,
            audiences,
            styles,
            sandbox,
        }
    }
}

row! {
    #[derive(Debug, Clone, Serialize)]
    pub struct TextbookConstraints {
        pub topic: String,
        pub subtopic: Option<String>,
        pub audience: String,
        pub style: String,
    }
}

row! {
    #[derive(Debug, Clone)]
    pub struct TextbookChecks {
        pub code_blocks: u64,
        pub code_lines: u64,
        pub word_count: u64,
    }
}

impl Textbooks {
    /// The checks of one answer (see [`Corpus::check`]).
    pub fn verify(&self, _: &TextbookConstraints, text: &str) -> Result<TextbookChecks, Drop> {
        Self::read(text).map(|(_, checks)| checks)
    }

    /// The Python blocks of an answer whose blocks all parse, with its checks.
    fn read(text: &str) -> Result<(Vec<python::CodeBlock>, TextbookChecks), Drop> {
        let blocks = python::python_blocks(text);
        if blocks.is_empty() {
            return Err(Drop::new(DropReason::NoCode, "no ```python code block"));
        }
        for (i, b) in blocks.iter().enumerate() {
            if let Err(e) = python::parse(&b.code) {
                let line = b.line + e.line - 1;
                return Err(Drop::new(
                    DropReason::SyntaxError,
                    format!("code block {} (answer line {line}): {}", i + 1, e.message),
                ));
            }
        }
        let checks = TextbookChecks {
            code_blocks: blocks.len() as u64,
            code_lines: blocks.iter().map(|b| b.code.lines().count() as u64).sum(),
            word_count: text.split_whitespace().count() as u64,
        };
        Ok((blocks, checks))
    }
}

impl Corpus for Textbooks {
    type Constraints = TextbookConstraints;
    type Checks = TextbookChecks;

    fn kind(&self) -> &'static str {
        "textbook"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, _slot: u64, rng: &mut ChaCha8Rng) -> TextbookConstraints {
        let t = self
            .topics
            .choose(rng)
            .expect("topic lists are never empty");
        TextbookConstraints {
            topic: t.topic.clone(),
            subtopic: t.subtopic.clone(),
            audience: self
                .audiences
                .choose(rng)
                .expect("audience lists are never empty")
                .clone(),
            style: self
                .styles
                .choose(rng)
                .expect("style lists are never empty")
                .clone(),
        }
    }

    fn prompt_vars(&self, c: &TextbookConstraints) -> Vec<(&'static str, String)> {
        let (topic, subtopic) = topic_vars(&c.topic, c.subtopic.as_deref());
        // The last part of the path alone (the subtopic or leaf, else the topic): what a small
        // model's plain question names.
        let subject = c
            .subtopic
            .as_deref()
            .and_then(|s| s.rsplit(" > ").next())
            .unwrap_or(&c.topic)
            .to_string();
        vec![
            ("topic", topic),
            ("subtopic", subtopic),
            ("audience", c.audience.clone()),
            ("style", c.style.clone()),
            ("subject", subject),
        ]
    }

    /// [`Textbooks::verify`], then with a sandbox the section's program: its Python blocks in
    /// order, as the reader would run them one after the other.
    fn check(
        &self,
        _: &TextbookConstraints,
        text: &str,
    ) -> impl std::future::Future<Output = Result<TextbookChecks, Drop>> + Send {
        let read = Self::read(text);
        async move {
            let (blocks, checks) = read?;
            if let Some(sandbox) = &self.sandbox {
                let program: String = blocks.into_iter().map(|b| b.code).collect();
                super::run_in_sandbox(sandbox, &program, DropReason::CodeFailed, true).await?;
            }
            Ok(checks)
        }
    }

    fn check_setting(&self) -> &'static str {
        if self.sandbox.is_some() {
            "run_code"
        } else {
            ""
        }
    }

    fn word_bounds(&self) -> (usize, usize) {
        (150, 4000)
    }

    fn typical_completion_tokens(&self) -> u64 {
        // phi-1's CodeTextbook: ~1B tokens over ~1M sections ≈ 1,000 tokens a section.
        1000
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec!["topic", "audience", "style", "code_blocks", "word_count"]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        use polars::prelude::ChunkAgg;
        Ok(json!({
            "sections": df.height(),
            "mean_code_blocks": df.column("code_blocks")?.i64()?.mean(),
            "mean_word_count": df.column("word_count")?.i64()?.mean(),
            "per_topic": counts(df, "topic")?,
            "per_audience": counts(df, "audience")?,
            "per_style": counts(df, "style")?,
            // Whether every kept section's program ran in the sandbox (`--run-code`), and how
            // isolated it was.
            "run_code": self.sandbox.is_some(),
            "sandbox_isolation": self.sandbox.as_ref().map(|s| s.isolation()),
        }))
    }
}

/// How a textbook section is written: phi-1's Python textbooks, or phi-1.5's natural language.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum SectionStyle {
    /// Explanation with Python code that must parse (phi-1's CodeTextbook).
    #[default]
    Code,
    /// Natural-language sections; code is allowed, not required (phi-1.5).
    Prose,
}

impl SectionStyle {
    pub fn is_code(&self) -> bool {
        *self == SectionStyle::Code
    }
}

/// A web text a prose prompt may quote, by its id in the `--web` file.
#[derive(Debug, Clone, PartialEq)]
pub struct Snippet {
    pub id: String,
    pub text: String,
}

/// Words of a web snippet a prompt quotes at most.
const SNIPPET_WORDS: usize = 150;

/// The excerpt of a web snippet a prompt quotes: its first [`SNIPPET_WORDS`] words.
pub fn excerpt(text: &str) -> String {
    text.split_whitespace()
        .take(SNIPPET_WORDS)
        .collect::<Vec<_>>()
        .join(" ")
}
/// Below this share of English function words among its words (code blocks left out) a section
/// is not English prose: English text runs at 40–50% (the, of, and, to, …), other languages
/// match few of these words.
pub const MIN_ENGLISH_SHARE: f64 = 0.15;
/// A section this similar (estimated Jaccard of word 5-grams) to a kept one is a near duplicate.
pub const NEAR_DUPLICATE: f64 = 0.8;

/// The share of `text`'s words, outside fenced code blocks, that are English function words.
pub fn english_share(english: &HashSet<String>, text: &str) -> f64 {
    let (mut words, mut hits) = (0usize, 0usize);
    for (i, part) in text.split("```").enumerate() {
        if i % 2 == 1 {
            continue; // inside a fence
        }
        for t in words::tokens(part) {
            words += 1;
            hits += usize::from(english.contains(t.as_ref()));
        }
    }
    if words == 0 {
        0.0
    } else {
        hits as f64 / words as f64
    }
}

/// The sections (or conversations, [`super::chat`]) kept so far as MinHash-LSH buckets (datatrove's 14 bands × 8 rows of word
/// 5-grams), to find near duplicates as they are written.
pub(crate) struct NearDuplicates {
    hasher: MinHasher,
    signatures: Vec<Vec<u64>>,
    buckets: HashMap<(usize, u64), Vec<usize>>,
}

impl NearDuplicates {
    pub(crate) fn new() -> NearDuplicates {
        NearDuplicates {
            hasher: MinHasher::new(Params::default()),
            signatures: Vec::new(),
            buckets: HashMap::new(),
        }
    }

    /// The similarity of the kept section `text` nearly repeats, if any; otherwise `text` is
    /// kept (from now on others are compared with it).
    pub(crate) fn check_and_keep(&mut self, text: &str) -> Option<f64> {
        let sig = self.hasher.signature(text);
        let bands = self.hasher.params().bands;
        let keys: Vec<(usize, u64)> = (0..bands)
            .map(|j| (j, self.hasher.band_key(&sig, j)))
            .collect();
        let mut seen = HashSet::new();
        for key in &keys {
            for &i in self.buckets.get(key).into_iter().flatten() {
                if seen.insert(i) {
                    let sim = estimated_similarity(&sig, &self.signatures[i]);
                    if sim >= NEAR_DUPLICATE {
                        return Some(sim);
                    }
                }
            }
        }
        let i = self.signatures.len();
        self.signatures.push(sig);
        for key in keys {
            self.buckets.entry(key).or_default().push(i);
        }
        None
    }
}

/// phi-1.5's natural-language textbook sections (see the module documentation).
pub struct ProseTextbooks {
    template: Template,
    topics: Vec<Topic>,
    audiences: Vec<String>,
    styles: Vec<String>,
    snippets: Vec<Snippet>,
    english: HashSet<String>,
    near: Mutex<NearDuplicates>,
}

impl ProseTextbooks {
    /// `kept`: the texts already in the output directory, which new sections must not repeat.
    pub fn new(
        template: Template,
        topics: Vec<Topic>,
        audiences: Vec<String>,
        styles: Vec<String>,
        snippets: Vec<Snippet>,
        kept: &[String],
    ) -> ProseTextbooks {
        let english = FUNCTION_WORDS
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(|l| l.split(':').next().unwrap_or(l).trim().to_string())
            .collect();
        let mut near = NearDuplicates::new();
        for text in kept {
            near.check_and_keep(text);
        }
        ProseTextbooks {
            template,
            topics,
            audiences,
            styles,
            snippets,
            english,
            near: Mutex::new(near),
        }
    }
}

row! {
    #[derive(Debug, Clone, Serialize)]
    pub struct ProseConstraints {
        /// `topic > subtopic`, as the topics file has it.
        pub topic_path: String,
        pub topic: String,
        pub subtopic: Option<String>,
        pub audience: String,
        pub style: String,
        /// The id of the web snippet the prompt quotes (its `id`, else `FILE:ROW`).
        pub snippet_id: Option<String>,
    } not columns {
        #[serde(skip)]
        snippet: Option<String>,
    }
}

row! {
    #[derive(Debug, Clone)]
    pub struct ProseChecks {
        pub word_count: u64,
        pub english_share: f64,
        /// Fenced code blocks (allowed, not required).
        pub code_blocks: u64,
    }
}

impl ProseTextbooks {
    /// The checks of one answer (see [`Corpus::check`]).
    pub fn verify(&self, _: &ProseConstraints, text: &str) -> Result<ProseChecks, Drop> {
        let english_share = english_share(&self.english, text);
        if english_share < MIN_ENGLISH_SHARE {
            return Err(Drop::new(
                DropReason::NotEnglish,
                format!(
                    "{:.0}% English function words < {:.0}%",
                    100.0 * english_share,
                    100.0 * MIN_ENGLISH_SHARE
                ),
            ));
        }
        let near = self
            .near
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check_and_keep(text);
        if let Some(sim) = near {
            return Err(Drop::new(
                DropReason::NearDuplicate,
                format!("estimated Jaccard {sim:.2} ≥ {NEAR_DUPLICATE} with a kept section"),
            ));
        }
        Ok(ProseChecks {
            word_count: text.split_whitespace().count() as u64,
            english_share,
            code_blocks: (text.matches("```").count() / 2) as u64,
        })
    }
}

impl Corpus for ProseTextbooks {
    type Constraints = ProseConstraints;
    type Checks = ProseChecks;

    fn kind(&self) -> &'static str {
        "textbook_prose"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, _slot: u64, rng: &mut ChaCha8Rng) -> ProseConstraints {
        let t = self
            .topics
            .choose(rng)
            .expect("topic lists are never empty");
        let audience = self
            .audiences
            .choose(rng)
            .expect("seed lists are never empty")
            .clone();
        let style = self
            .styles
            .choose(rng)
            .expect("seed lists are never empty")
            .clone();
        let snippet = self.snippets.choose(rng);
        ProseConstraints {
            topic_path: t.path(),
            topic: t.topic.clone(),
            subtopic: t.subtopic.clone(),
            audience,
            style,
            snippet_id: snippet.map(|s| s.id.clone()),
            snippet: snippet.map(|s| excerpt(&s.text)),
        }
    }

    fn prompt_vars(&self, c: &ProseConstraints) -> Vec<(&'static str, String)> {
        let (topic, subtopic) = topic_vars(&c.topic, c.subtopic.as_deref());
        vec![
            ("topic", topic),
            ("subtopic", subtopic),
            ("audience", c.audience.clone()),
            ("style", c.style.clone()),
            (
                "snippet",
                c.snippet.as_ref().map_or(String::new(), |s| {
                    format!("\n\nFor variety, you may draw on this excerpt of a web page (do not copy it or mention it):\n{s}")
                }),
            ),
        ]
    }

    fn check(
        &self,
        c: &ProseConstraints,
        text: &str,
    ) -> impl std::future::Future<Output = Result<ProseChecks, Drop>> + Send {
        std::future::ready(self.verify(c, text))
    }

    fn word_bounds(&self) -> (usize, usize) {
        (150, 4000)
    }

    fn typical_completion_tokens(&self) -> u64 {
        // phi-1.5: ~20B tokens of synthetic textbooks; sections of about a thousand tokens.
        1000
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec![
            "topic",
            "audience",
            "style",
            "word_count",
            "english_share",
            "code_blocks",
            "snippet_id",
        ]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        use polars::prelude::ChunkAgg;
        let with_code = df
            .column("code_blocks")?
            .i64()?
            .iter()
            .filter(|v| v.is_some_and(|v| v > 0))
            .count();
        let with_snippet = df.column("snippet_id")?.str()?.iter().flatten().count();
        Ok(json!({
            "sections": df.height(),
            "mean_word_count": df.column("word_count")?.i64()?.mean(),
            "mean_english_share": df.column("english_share")?.f64()?.mean(),
            "sections_with_code": with_code,
            "sections_with_web_snippet": with_snippet,
            "per_topic": counts(df, "topic")?,
            "per_audience": counts(df, "audience")?,
            "per_style": counts(df, "style")?,
        }))
    }
}

/// Records per value of a text column.
pub(crate) fn counts(df: &DataFrame, column: &str) -> PolarsResult<BTreeMap<String, u64>> {
    let mut m = BTreeMap::new();
    for v in df.column(column)?.str()?.iter().flatten() {
        *m.entry(v.to_string()).or_default() += 1;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Textbooks {
        Textbooks::new(
            Template::parse("textbook.txt", BUILTIN_TEMPLATE).unwrap(),
            parse_topics("topics.txt", "recursion\nrecursion > memoization\n").unwrap(),
            parse_plain("a.txt", BUILTIN_AUDIENCES).unwrap(),
            parse_plain("s.txt", BUILTIN_STYLES).unwrap(),
            None,
        )
    }

    #[test]
    fn topic_lines_and_errors() {
        let t = parse_topics("t.txt", "# c\nloops\nloops > while loops  # note\n").unwrap();
        assert_eq!(
            t[1],
            Topic {
                topic: "loops".into(),
                subtopic: Some("while loops".into())
            }
        );
        let e = parse_topics("t.txt", "loops\n > x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.txt:2"), "{e}");
        let e = parse_topics("t.txt", "# nothing\n\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.txt") && e.contains("no entries"), "{e}");
    }

    /// A deeper path (`phigen topics`'s `subject > subtopic > leaf`) keeps its first part as the
    /// topic and the rest as the subtopic; its prompts are about the leaf with the path above as
    /// context, in both styles, while one- and two-part lines render as they always did.
    #[test]
    fn deep_topic_paths_put_the_leaf_first_and_the_path_as_context() {
        let t = parse_topics(
            "t.txt",
            "science >biology>  cell division
",
        )
        .unwrap();
        assert_eq!(t[0].topic, "science");
        assert_eq!(t[0].subtopic.as_deref(), Some("biology > cell division"));
        assert_eq!(t[0].path(), "science > biology > cell division");
        let e = parse_topics(
            "t.txt", "a > > c
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t.txt:1") && e.contains("subject > subtopic > leaf"),
            "{e}"
        );
        assert_eq!(
            topic_vars("recursion", Some("memoization")),
            ("recursion".into(), " (focus: memoization)".into())
        );
        assert_eq!(
            topic_vars("recursion", None),
            ("recursion".into(), String::new())
        );
        let code = corpus();
        let k = TextbookConstraints {
            topic: t[0].topic.clone(),
            subtopic: t[0].subtopic.clone(),
            audience: "a".into(),
            style: "b".into(),
        };
        let vars = code.prompt_vars(&k);
        let values: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let prompt = code.template().render(&values).unwrap();
        assert!(
            prompt.contains("about cell division (part of science > biology)."),
            "{prompt}"
        );
        assert!(values.contains(&("subject", "cell division")));
        let p = ProseTextbooks::new(
            Template::parse("textbook-prose.txt", BUILTIN_PROSE_TEMPLATE).unwrap(),
            t,
            parse_plain("a.txt", BUILTIN_PROSE_AUDIENCES).unwrap(),
            parse_plain("s.txt", BUILTIN_PROSE_STYLES).unwrap(),
            Vec::new(),
            &[],
        );
        let c = p.sample(0, &mut rand::SeedableRng::seed_from_u64(1));
        assert_eq!(c.topic_path, "science > biology > cell division");
        let vars = p.prompt_vars(&c);
        let values: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let prompt = p.template().render(&values).unwrap();
        assert!(
            prompt.contains("about cell division (part of science > biology)."),
            "{prompt}"
        );
    }

    #[test]
    fn the_shipped_topics_cover_hundreds_of_lines() {
        let t = parse_topics("seeds/topics.txt", BUILTIN_TOPICS).unwrap();
        assert!(t.len() >= 300, "{}", t.len());
    }

    /// `--run-code`: a section's blocks run in order as one program (the second block calls the
    /// first's function), and one that raises, reads stdin or exits with an error is dropped
    /// with the sandbox's verdict; one that exits 0 early is kept. Expected outcomes: what CPython does with each program.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_code_keeps_sections_whose_blocks_run_in_order() {
        use crate::sandbox::{Isolation, Limits};
        let limits = Limits {
            wall: std::time::Duration::from_secs(5),
            cpu_secs: 3,
            ..Limits::default()
        };
        let sandbox = Sandbox::new(None, limits, 2, Isolation::Namespaces)
            .await
            .expect("the sandbox needs python3 and bubblewrap (.ci/run installs them)");
        let mut c = corpus();
        c.sandbox = Some(Arc::new(sandbox));
        let k = TextbookConstraints {
            topic: "recursion".into(),
            subtopic: None,
            audience: "x".into(),
            style: "y".into(),
        };
        let prose = "Recursion calls itself. ".repeat(10);
        let section = |blocks: &[&str]| {
            let mut text = prose.clone();
            for b in blocks {
                text.push_str(&format!(
                    "\n\n```python\n{b}\n```\nThe output:\n```\n6\n```\n"
                ));
            }
            text
        };
        let define = "def fact(n):\n    return 1 if n == 0 else n * fact(n - 1)";
        let kept = section(&[define, "assert fact(3) == 6\nprint(fact(3))"]);
        assert_eq!(c.check(&k, &kept).await.unwrap().code_blocks, 2);
        for (blocks, error) in [
            (vec![define, "print(fact(3) / 0)"], "ZeroDivisionError"),
            (vec!["print(fact(3))", define], "NameError"),
            (vec![define, "n = int(input())"], "EOFError"),
            (vec![define, "raise SystemExit('bad input')"], "bad input"),
        ] {
            let drop = c.check(&k, &section(&blocks)).await.unwrap_err();
            assert_eq!(drop.reason, DropReason::CodeFailed, "{blocks:?}");
            assert!(drop.detail.starts_with("failed: "), "{}", drop.detail);
            assert!(drop.detail.contains(error), "{blocks:?}: {}", drop.detail);
        }
        // A program that ends early with status 0 ran fine (`unittest.main()` exits so).
        let tests = "import unittest\nclass T(unittest.TestCase):\n    def test_fact(self):\n        self.assertEqual(fact(3), 6)\nunittest.main()";
        assert_eq!(
            c.check(&k, &section(&[define, tests]))
                .await
                .unwrap()
                .code_blocks,
            2
        );
        // Parsing still comes first: a block that does not parse never runs.
        let broken = c.check(&k, &section(&[define, "print(fact(3)"])).await;
        assert_eq!(broken.unwrap_err().reason, DropReason::SyntaxError);
    }

    #[test]
    fn sections_need_code_and_every_block_must_parse() {
        let c = corpus();
        let k = TextbookConstraints {
            topic: "recursion".into(),
            subtopic: None,
            audience: "x".into(),
            style: "y".into(),
        };
        let good = "Recursion calls itself.\n\n```python\ndef fact(n):\n    return 1 if n == 0 else n * fact(n - 1)\n```\n";
        assert_eq!(c.verify(&k, good).unwrap().code_blocks, 1);
        assert_eq!(
            c.verify(&k, "Only prose, no code.").unwrap_err().reason,
            DropReason::NoCode
        );
        let bad =
            "Text\n```python\nx = 1\n```\nMore\n```python\nfor i in range(3)\n    print(i)\n```\n";
        let d = c.verify(&k, bad).unwrap_err();
        assert_eq!(d.reason, DropReason::SyntaxError);
        assert!(
            d.detail.contains("code block 2") && d.detail.contains("answer line 7"),
            "{}",
            d.detail
        );
    }

    fn prose(kept: &[String]) -> ProseTextbooks {
        ProseTextbooks::new(
            Template::parse("textbook-prose.txt", BUILTIN_PROSE_TEMPLATE).unwrap(),
            parse_topics("t.txt", "science > the water cycle\n").unwrap(),
            parse_plain("a.txt", BUILTIN_PROSE_AUDIENCES).unwrap(),
            parse_plain("s.txt", BUILTIN_PROSE_STYLES).unwrap(),
            vec![Snippet {
                id: "web-7".into(),
                text: "Rain falls when clouds get heavy.".into(),
            }],
            kept,
        )
    }

    /// A paragraph about the water cycle, written for these tests.
    const WATER: &str = "Water moves in a cycle. The sun warms the sea and some of the water turns into vapour that rises into the air. High in the sky the vapour cools and becomes tiny drops, and the drops gather into clouds. When the drops grow heavy they fall back to the ground as rain or snow. The rain runs into rivers, and the rivers carry it back to the sea, where the journey starts again.";

    /// English prose is well above the threshold, French and German below it (the same
    /// paragraph translated by hand), and code blocks do not count either way.
    #[test]
    fn the_english_share_tells_english_prose_from_other_languages() {
        let p = prose(&[]);
        let en = english_share(&p.english, WATER);
        assert!(en > 0.3, "{en}");
        let fr = "L'eau se déplace en cycle. Le soleil réchauffe la mer et une partie de l'eau se transforme en vapeur qui monte dans l'air. Quand les gouttes deviennent lourdes, elles retombent sous forme de pluie.";
        let de = "Wasser bewegt sich in einem Kreislauf. Die Sonne erwärmt das Meer und ein Teil des Wassers wird zu Dampf, der in die Luft steigt. Wenn die Tropfen schwer werden, fallen sie als Regen zurück.";
        for other in [fr, de] {
            let share = english_share(&p.english, other);
            assert!(share < MIN_ENGLISH_SHARE, "{share}: {other}");
        }
        let with_code = format!("{WATER}\n```python\nx_1 = compute(y_2, z_3)\n```\n");
        assert_eq!(english_share(&p.english, &with_code), en);
    }

    /// Prose needs no code but keeps a section that has some; a foreign-language section and a
    /// near copy of a kept one (one word changed, or kept by an earlier run) are dropped by reason.
    #[test]
    fn prose_checks_accept_code_and_drop_foreign_and_near_duplicate_sections() {
        let p = prose(&[]);
        let c = p.sample(0, &mut rand::SeedableRng::seed_from_u64(1));
        assert_eq!(c.topic_path, "science > the water cycle");
        assert_eq!(c.snippet_id.as_deref(), Some("web-7"));
        let k = p.verify(&c, WATER).unwrap();
        assert_eq!(k.code_blocks, 0);
        let near = WATER.replace("tiny drops", "small drops");
        assert_eq!(
            p.verify(&c, &near).unwrap_err().reason,
            DropReason::NearDuplicate
        );
        let coded = "Computers can help us measure rain. A rain gauge collects the water that falls in a day, and we can write the amounts down and add them up to see how much rain fell in a week. The numbers show which days were wet and which were dry, and they help farmers plan when to water their fields.\n\n```python\nrain = [3, 0, 5]\nprint(sum(rain))\n```\n";
        assert_eq!(p.verify(&c, coded).unwrap().code_blocks, 1);
        let de = "Wasser bewegt sich in einem Kreislauf. Die Sonne erwärmt das Meer und ein Teil des Wassers wird zu Dampf.";
        assert_eq!(p.verify(&c, de).unwrap_err().reason, DropReason::NotEnglish);
        let resumed = prose(&[WATER.to_string()]);
        assert_eq!(
            resumed.verify(&c, &near).unwrap_err().reason,
            DropReason::NearDuplicate
        );
        let vars = p.prompt_vars(&c);
        let values: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let prompt = p.template().render(&values).unwrap();
        assert!(
            prompt.contains("Rain falls when clouds get heavy."),
            "{prompt}"
        );
        assert!(!prompt.contains("Python"), "{prompt}");
    }
}

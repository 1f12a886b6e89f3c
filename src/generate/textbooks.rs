//! CodeTextbook (phi-1 §2.2): textbook sections that mix clear explanation with short, correct
//! Python, written for a sampled topic × audience × style.
//!
//! Reads `seeds/topics.txt` (`topic` or `topic > subtopic` a line), `seeds/audiences.txt`,
//! `seeds/styles.txt` and `prompts/textbook.txt`. An answer is kept only if it has at least one
//! Python code block and every block parses as Python 3; `stats.json` shows code-block counts and
//! the records per topic and per audience, so coverage is visible.

use std::collections::BTreeMap;
use std::path::Path;

use polars::prelude::{DataFrame, PolarsResult};
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use super::prompt::Template;
use super::python;
use super::{Corpus, Drop, DropReason};
use crate::artifact::table::row;

pub const BUILTIN_TEMPLATE: &str = include_str!("../../prompts/textbook.txt");
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
    #[error("{path}:{line}: `{text}` is not `topic` or `topic > subtopic`")]
    BadTopic {
        path: String,
        line: usize,
        text: String,
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Topic {
    pub topic: String,
    pub subtopic: Option<String>,
}

pub fn parse_topics(path: &str, text: &str) -> Result<Vec<Topic>, SeedListError> {
    entries(path, text)?
        .into_iter()
        .map(|(line, l)| {
            let (topic, subtopic) = match l.split_once('>') {
                Some((t, s)) => (t.trim().to_string(), Some(s.trim().to_string())),
                None => (l.clone(), None),
            };
            if topic.is_empty() || subtopic.as_deref() == Some("") {
                return Err(SeedListError::BadTopic {
                    path: path.into(),
                    line,
                    text: l,
                });
            }
            Ok(Topic { topic, subtopic })
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

pub struct Textbooks {
    template: Template,
    topics: Vec<Topic>,
    audiences: Vec<String>,
    styles: Vec<String>,
}

impl Textbooks {
    pub fn new(
        template: Template,
        topics: Vec<Topic>,
        audiences: Vec<String>,
        styles: Vec<String>,
    ) -> Textbooks {
        Textbooks {
            template,
            topics,
            audiences,
            styles,
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
        Ok(TextbookChecks {
            code_blocks: blocks.len() as u64,
            code_lines: blocks.iter().map(|b| b.code.lines().count() as u64).sum(),
            word_count: text.split_whitespace().count() as u64,
        })
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
        vec![
            ("topic", c.topic.clone()),
            (
                "subtopic",
                c.subtopic
                    .as_ref()
                    .map_or(String::new(), |s| format!(" (focus: {s})")),
            ),
            ("audience", c.audience.clone()),
            ("style", c.style.clone()),
            // The subtopic alone, else the topic: what a small model's plain question names.
            (
                "subject",
                c.subtopic.clone().unwrap_or_else(|| c.topic.clone()),
            ),
        ]
    }

    fn check(
        &self,
        c: &TextbookConstraints,
        text: &str,
    ) -> impl std::future::Future<Output = Result<TextbookChecks, Drop>> + Send {
        std::future::ready(self.verify(c, text))
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

    #[test]
    fn the_shipped_topics_cover_hundreds_of_lines() {
        let t = parse_topics("seeds/topics.txt", BUILTIN_TOPICS).unwrap();
        assert!(t.len() >= 300, "{}", t.len());
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
}

//! Synthetic corpora: constraint samplers, prompt templates, output checks, and the engine that
//! turns them into shards with a teacher.
//!
//! A corpus ([`Corpus`]) says how to draw the constraints of one prompt, how to render it, and how
//! to check an answer; the engine ([`engine::generate`]) does the rest — ids, resume, retries of
//! dropped prompts, budget, shards, rejects and `stats.json` — the same way for every corpus.

pub mod chat;
pub mod engine;
pub mod exercises;
pub mod instruct;
pub mod merge;
pub mod prefs;
pub mod prompt;
pub mod python;
pub mod run;
pub mod stories;
pub mod textbooks;
pub mod topics;
pub mod words;

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::artifact::table::{Cell, Kind, Row};
use prompt::Template;

/// Why an answer was not kept. Every drop is counted and written to `rejects.parquet`; its name
/// ([`DropReason::as_str`], also its serde name and its `Display`) is what `rejects.parquet` and
/// `stats.json` hold. Ordered by name, so maps keyed by reason list them alphabetically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    Empty,
    /// `finish_reason = length`: cut off by `max_tokens`.
    Truncated,
    TooShort,
    TooLong,
    /// The same text (up to whitespace) was already kept.
    Duplicate,
    /// The teacher declined or its content filter stopped it.
    Refused,
    /// A story that does not use its required words (only with `--strict-words`).
    MissingWords,
    /// A section without any Python code block.
    NoCode,
    /// A Python code block that does not parse.
    SyntaxError,
    /// An exercise that does not define the function it was asked for.
    WrongName,
    /// An exercise without `assert` tests.
    NoTests,
    /// An exercise whose asserts failed, timed out or crashed in the sandbox.
    TestsFailed,
    /// A textbook section whose Python blocks, run in order as one program in the sandbox,
    /// raised, exited with an error, timed out or crashed (`textbooks --run-code`).
    CodeFailed,
    /// A rating without a score in the format the prompt asks for; a conversation that is not
    /// user/assistant turns in the format asked for (or, imported, not OpenAI `messages`).
    Unparseable,
    /// The request failed after all retries; the prompt is sent again by a later run.
    RequestFailed,
    /// An exercise whose function has no docstring, the statement of the exercise (checked with
    /// `--verify parse`, where no tests run).
    NoDocstring,
    /// An exercise whose function is a stub: only its docstring, `pass`, `...` or a bare
    /// `return` (checked with `--verify parse`).
    NoSolution,
    /// A prose section with too few English words (`textbooks --style prose`).
    NotEnglish,
    /// A prose section nearly the same as a kept one (MinHash, `textbooks --style prose`).
    NearDuplicate,
    /// A conversation with another number of exchanges than its prompt asked for.
    WrongTurns,
    /// A conversation with a message that has no text.
    EmptyTurn,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::Truncated => "truncated",
            DropReason::TooShort => "too_short",
            DropReason::TooLong => "too_long",
            DropReason::Duplicate => "duplicate",
            DropReason::Refused => "refused",
            DropReason::MissingWords => "missing_words",
            DropReason::NoCode => "no_code",
            DropReason::SyntaxError => "syntax_error",
            DropReason::WrongName => "wrong_name",
            DropReason::NoTests => "no_tests",
            DropReason::TestsFailed => "tests_failed",
            DropReason::CodeFailed => "code_failed",
            DropReason::Unparseable => "unparseable",
            DropReason::RequestFailed => "request_failed",
            DropReason::NoDocstring => "no_docstring",
            DropReason::NoSolution => "no_solution",
            DropReason::NotEnglish => "not_english",
            DropReason::NearDuplicate => "near_duplicate",
            DropReason::WrongTurns => "wrong_turns",
            DropReason::EmptyTurn => "empty_turn",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialOrd for DropReason {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DropReason {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

/// A `reason` cell that names no [`DropReason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a drop reason phigen writes")]
pub struct UnknownDropReason(pub String);

/// The reason named `s` (the name [`DropReason::as_str`] gives, which is also its serde name).
impl std::str::FromStr for DropReason {
    type Err = UnknownDropReason;
    fn from_str(s: &str) -> Result<DropReason, UnknownDropReason> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| UnknownDropReason(s.to_string()))
    }
}

/// A reason is one text column of the rejects table.
impl Cell for DropReason {
    const KIND: Kind = Kind::Text;
    fn into_cell(self) -> serde_json::Value {
        self.as_str().into_cell()
    }
}

/// A dropped answer with what explains it.
#[derive(Debug, Clone)]
pub struct Drop {
    pub reason: DropReason,
    pub detail: String,
}

impl Drop {
    pub fn new(reason: DropReason, detail: impl Into<String>) -> Drop {
        Drop {
            reason,
            detail: detail.into(),
        }
    }
}

/// One kind of synthetic corpus.
pub trait Corpus: Send + Sync + 'static {
    /// Constraints of one prompt: columns of the record, and (serialized) part of its id.
    type Constraints: Row + Serialize + Send + Sync + 'static;
    /// What the corpus-specific checks measured on a kept answer; the columns after the
    /// constraints'.
    type Checks: Row + Send + 'static;

    /// The `kind` column and the name in `stats.json`, e.g. `"tinystories"`.
    fn kind(&self) -> &'static str;
    fn template(&self) -> &Template;
    /// Draws the constraints of one attempt of `slot`. `rng` is derived from (seed, slot, attempt)
    /// only.
    fn sample(&self, slot: u64, rng: &mut ChaCha8Rng) -> Self::Constraints;
    /// The template's variables for these constraints.
    fn prompt_vars(&self, constraints: &Self::Constraints) -> Vec<(&'static str, String)>;
    /// Checks an answer beyond the common checks (empty, truncated, refused, length, duplicate).
    /// Async because some checks run code (CodeExercises executes its asserts in the sandbox).
    fn check(
        &self,
        constraints: &Self::Constraints,
        text: &str,
    ) -> impl std::future::Future<Output = Result<Self::Checks, Drop>> + Send;
    /// Whether an answer that repeats a kept one (up to whitespace) is dropped as a duplicate:
    /// yes for corpora, no for labels, where equal answers are expected.
    fn unique_answers(&self) -> bool {
        true
    }
    /// The checks this run applies where a corpus has a choice of them (textbooks' `--run-code`,
    /// exercises' `--verify parse`), for the manifest: a directory is only continued with the
    /// same ones, so that its records were all checked alike. Empty for the corpus's only (or
    /// default) checks.
    fn check_setting(&self) -> &'static str {
        ""
    }
    /// Word-count bounds of a good answer.
    fn word_bounds(&self) -> (usize, usize);
    /// Typical completion tokens of a good answer, for `--dry-run` estimates.
    fn typical_completion_tokens(&self) -> u64;
    /// The columns [`Corpus::summarize`] needs.
    fn summary_columns(&self) -> Vec<&'static str>;
    /// The corpus section of `stats.json`, computed over every record in the output. An error
    /// (a column missing or of another type) fails the run's statistics rather than hiding in them.
    fn summarize(
        &self,
        frame: &polars::prelude::DataFrame,
    ) -> polars::prelude::PolarsResult<serde_json::Value>;
}

/// Runs `program` in `sandbox`: its run when it passed, else a drop for `reason` whose detail is
/// the verdict and the error (`failed: NameError: …`, `timed_out: `). With `exit_0_passes`, a
/// program that exits 0 before its end passes too (`unittest.main()`, `sys.exit(main())`): right
/// for a section's example, not for tests that must all run.
pub(crate) async fn run_in_sandbox(
    sandbox: &crate::sandbox::Sandbox,
    program: &str,
    reason: DropReason,
    exit_0_passes: bool,
) -> Result<crate::sandbox::Execution, Drop> {
    let run = sandbox
        .run(program)
        .await
        .map_err(|e| Drop::new(reason, format!("sandbox: {e}")))?;
    let exited_0 = run.verdict == crate::sandbox::Verdict::Failed && run.exit_code == Some(0);
    if run.verdict != crate::sandbox::Verdict::Passed && !(exit_0_passes && exited_0) {
        let verdict = serde_json::to_value(run.verdict).expect("verdicts serialize");
        let detail = format!("{}: {}", verdict.as_str().unwrap_or("failed"), run.error);
        return Err(Drop::new(reason, detail));
    }
    Ok(run)
}

/// The checks every corpus shares, in the order they are applied.
pub fn common_checks(
    text: &str,
    finish: crate::teacher::FinishReason,
    (min_words, max_words): (usize, usize),
) -> Result<(), Drop> {
    use crate::teacher::FinishReason;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(Drop::new(DropReason::Empty, "empty answer"));
    }
    match finish {
        FinishReason::Length => {
            return Err(Drop::new(
                DropReason::Truncated,
                "finish_reason=length: raise --max-tokens",
            ))
        }
        FinishReason::ContentFilter => {
            return Err(Drop::new(
                DropReason::Refused,
                "finish_reason=content_filter",
            ))
        }
        FinishReason::Stop | FinishReason::Other => {}
    }
    if let Some(opening) = refusal_opening(trimmed) {
        return Err(Drop::new(
            DropReason::Refused,
            format!("answer opens with \"{opening}\""),
        ));
    }
    let words = trimmed.split_whitespace().count();
    if words < min_words {
        return Err(Drop::new(
            DropReason::TooShort,
            format!("{words} words < {min_words}"),
        ));
    }
    if words > max_words {
        return Err(Drop::new(
            DropReason::TooLong,
            format!("{words} words > {max_words}"),
        ));
    }
    Ok(())
}

/// Refusals open with one of these; only the opening is checked, since a story may well contain
/// "I'm sorry" in its dialogue.
pub(crate) fn refusal_opening(text: &str) -> Option<&'static str> {
    const OPENINGS: &[&str] = &[
        "i'm sorry",
        "i’m sorry",
        "i am sorry",
        "sorry, but",
        "i cannot",
        "i can't",
        "i can’t",
        "as an ai",
        "i apologize",
        "i won't",
        "i will not",
    ];
    let head: String = text.chars().take(40).collect::<String>().to_lowercase();
    OPENINGS.iter().copied().find(|o| head.starts_with(o))
}

/// Whitespace-normalized text, for exact-duplicate detection.
pub fn normalized_text_hash(text: &str) -> [u8; 32] {
    let mut normalized = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !normalized.is_empty() {
            normalized.push(' ');
        }
        normalized.push_str(word);
    }
    *blake3::hash(normalized.as_bytes()).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teacher::FinishReason;

    #[test]
    fn common_checks_name_the_reason() {
        let ok = "one two three four five";
        let reason = |t: &str, f| common_checks(t, f, (3, 10)).err().map(|d| d.reason);
        assert_eq!(reason(ok, FinishReason::Stop), None);
        assert_eq!(reason("  \n", FinishReason::Stop), Some(DropReason::Empty));
        assert_eq!(
            reason(ok, FinishReason::Length),
            Some(DropReason::Truncated)
        );
        assert_eq!(
            reason(ok, FinishReason::ContentFilter),
            Some(DropReason::Refused)
        );
        assert_eq!(
            reason("I'm sorry, but I can't write that.", FinishReason::Stop),
            Some(DropReason::Refused)
        );
        assert_eq!(
            reason("one two", FinishReason::Stop),
            Some(DropReason::TooShort)
        );
        assert_eq!(
            reason(&"w ".repeat(11), FinishReason::Stop),
            Some(DropReason::TooLong)
        );
        // Dialogue inside a story is not a refusal.
        assert_eq!(
            reason(
                "Tom said, \"I'm sorry, Mom.\" She smiled.",
                FinishReason::Stop
            ),
            None
        );
    }

    #[test]
    fn duplicate_hash_ignores_whitespace_only() {
        assert_eq!(
            normalized_text_hash("a  b\nc"),
            normalized_text_hash(" a b c ")
        );
        assert_ne!(normalized_text_hash("a b c"), normalized_text_hash("a b C"));
    }

    /// Every reason, as `rejects.parquet` and `stats.json` name it (the names phigen has always
    /// written; a new reason needs a line here, or the match below stops compiling).
    const NAMES: [(DropReason, &str); 21] = [
        (DropReason::Empty, "empty"),
        (DropReason::Truncated, "truncated"),
        (DropReason::TooShort, "too_short"),
        (DropReason::TooLong, "too_long"),
        (DropReason::Duplicate, "duplicate"),
        (DropReason::Refused, "refused"),
        (DropReason::MissingWords, "missing_words"),
        (DropReason::NoCode, "no_code"),
        (DropReason::SyntaxError, "syntax_error"),
        (DropReason::WrongName, "wrong_name"),
        (DropReason::NoTests, "no_tests"),
        (DropReason::TestsFailed, "tests_failed"),
        (DropReason::Unparseable, "unparseable"),
        (DropReason::RequestFailed, "request_failed"),
        (DropReason::NoDocstring, "no_docstring"),
        (DropReason::NoSolution, "no_solution"),
        (DropReason::NotEnglish, "not_english"),
        (DropReason::NearDuplicate, "near_duplicate"),
        (DropReason::WrongTurns, "wrong_turns"),
        (DropReason::EmptyTurn, "empty_turn"),
        (DropReason::CodeFailed, "code_failed"),
    ];

    #[test]
    fn drop_reasons_round_trip_through_their_names() {
        for (i, (r, name)) in NAMES.into_iter().enumerate() {
            // Exhaustive: a variant missing from NAMES is a compile error here.
            let listed = match r {
                DropReason::Empty => 0,
                DropReason::Truncated => 1,
                DropReason::TooShort => 2,
                DropReason::TooLong => 3,
                DropReason::Duplicate => 4,
                DropReason::Refused => 5,
                DropReason::MissingWords => 6,
                DropReason::NoCode => 7,
                DropReason::SyntaxError => 8,
                DropReason::WrongName => 9,
                DropReason::NoTests => 10,
                DropReason::TestsFailed => 11,
                DropReason::Unparseable => 12,
                DropReason::RequestFailed => 13,
                DropReason::NoDocstring => 14,
                DropReason::NoSolution => 15,
                DropReason::NotEnglish => 16,
                DropReason::NearDuplicate => 17,
                DropReason::WrongTurns => 18,
                DropReason::EmptyTurn => 19,
                DropReason::CodeFailed => 20,
            };
            assert_eq!(listed, i);
            assert_eq!(r.to_string(), name);
            assert_eq!(name.parse::<DropReason>(), Ok(r));
            assert_eq!(serde_json::to_value(r).unwrap(), name);
            assert_eq!(r.into_cell(), name);
        }
        assert_eq!(
            "Empty".parse::<DropReason>(),
            Err(UnknownDropReason("Empty".into()))
        );
    }

    /// Maps keyed by reason serialize in name order, as the `BTreeMap<String, _>` of earlier
    /// versions did (stats.json keeps its key order).
    #[test]
    fn reasons_sort_by_name() {
        let mut by_enum: Vec<DropReason> = NAMES.iter().map(|(r, _)| *r).collect();
        by_enum.sort();
        let mut by_name: Vec<&str> = NAMES.iter().map(|(_, n)| *n).collect();
        by_name.sort();
        assert_eq!(
            by_enum.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            by_name
        );
        let map: std::collections::BTreeMap<DropReason, u64> =
            [(DropReason::TooShort, 1), (DropReason::Duplicate, 2)].into();
        assert_eq!(
            serde_json::to_string(&map).unwrap(),
            r#"{"duplicate":2,"too_short":1}"#
        );
    }
}

//! CodeExercises (phi-1 §2.2): a function signature with a docstring (the exercise), its solution and
//! `assert` tests. Diversity comes from constraining the function name — a verb × object pool from
//! `seeds/exercises/` — together with a topic and a difficulty.
//!
//! By default ([`Verify::Tests`]) an answer is kept only if its code parses, defines the required
//! function, has asserts that run (at top level, or in a test function called there), and passes
//! them when executed in the sandbox (`crate::sandbox`). [`Verify::Parse`] keeps a function that parses and states its exercise in a
//! docstring, without running anything: phi-1's CodeExercises were not executed either, and a
//! small local teacher rarely writes asserts that pass (SmolLM2-135M: 0 of 64).

use std::future::Future;
use std::sync::Arc;

use polars::prelude::{DataFrame, PolarsResult};
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::prompt::Template;
use super::python;
use super::textbooks::{counts, Topic};
use super::{Corpus, Drop, DropReason};
use crate::artifact::table::{row, Cell, Kind};
use crate::sandbox::Sandbox;

pub const BUILTIN_TEMPLATE: &str = include_str!("../../prompts/exercises.txt");
pub const BUILTIN_VERBS: &str = include_str!("../../seeds/exercises/verbs.txt");
pub const BUILTIN_OBJECTS: &str = include_str!("../../seeds/exercises/objects.txt");
const DIFFICULTIES: &[&str] = &["easy", "medium", "hard"];

/// How an exercise's code is checked before it is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// Its asserts run in the sandbox and pass.
    #[default]
    Tests,
    /// It parses and its function has a docstring; nothing runs.
    Parse,
}

impl Verify {
    pub fn is_tests(&self) -> bool {
        *self == Verify::Tests
    }
}

pub struct Exercises {
    template: Template,
    topics: Vec<Topic>,
    verbs: Vec<String>,
    objects: Vec<String>,
    /// The sandbox the asserts run in; `None` for [`Verify::Parse`].
    sandbox: Option<Arc<Sandbox>>,
}

impl Exercises {
    pub fn new(
        template: Template,
        topics: Vec<Topic>,
        verbs: Vec<String>,
        objects: Vec<String>,
        sandbox: Option<Arc<Sandbox>>,
    ) -> Exercises {
        Exercises {
            template,
            topics,
            verbs,
            objects,
            sandbox,
        }
    }
}

row! {
    #[derive(Debug, Clone, Serialize)]
    pub struct ExerciseConstraints {
        pub function_name: String,
        pub topic: String,
        pub difficulty: String,
    }
}

row! {
    #[derive(Debug, Clone)]
    pub struct ExerciseChecks {
        /// The Python block that was executed: signature, docstring, solution, asserts.
        pub code: String,
        pub asserts: u64,
        /// `passed` for every kept record checked by its tests, `not_run` with `--verify parse`;
        /// drops carry `failed` / `timed_out` / `crashed` in rejects.
        pub outcome: Outcome,
        pub exec_seconds: f64,
    }
}

/// What became of a kept exercise's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its asserts ran in the sandbox and passed.
    Passed,
    /// Nothing ran (`--verify parse`).
    NotRun,
}

/// An outcome is a text column holding its serde name (`passed`, `not_run`).
impl Cell for Outcome {
    const KIND: Kind = Kind::Text;
    fn into_cell(self) -> Value {
        serde_json::to_value(self).expect("outcomes serialize as their names")
    }
}

/// Static checks: the block that defines `name`, parsed, with its number of asserts that run
/// ([`python::asserts_that_run`]; at least one for [`Verify::Tests`]; a docstring on the function for [`Verify::Parse`]).
fn exercise_block(name: &str, text: &str, verify: Verify) -> Result<(String, u64), Drop> {
    let blocks = python::python_blocks(text);
    if blocks.is_empty() {
        return Err(Drop::new(DropReason::NoCode, "no ```python code block"));
    }
    let mut defined = Vec::new();
    for b in &blocks {
        let module = python::parse(&b.code).map_err(|e| {
            Drop::new(
                DropReason::SyntaxError,
                format!("answer line {}: {}", b.line + e.line - 1, e.message),
            )
        })?;
        let names = python::function_names(&module);
        if names.iter().any(|n| n == name) {
            let asserts = python::asserts_that_run(&module, name);
            return match verify {
                Verify::Tests if asserts == 0 => Err(Drop::new(
                    DropReason::NoTests,
                    "no assert that runs (at top level, or in a test function called there)",
                )),
                Verify::Parse => match python::function_body(&module, name) {
                    Some((false, _)) => Err(Drop::new(
                        DropReason::NoDocstring,
                        format!("`{name}` has no docstring stating the exercise"),
                    )),
                    Some((true, code)) if code.is_empty() => Err(Drop::new(
                        DropReason::NoSolution,
                        format!(
                            "`{name}` is a stub: only its docstring, `pass`, `...` or `return`"
                        ),
                    )),
                    _ => Ok((b.code.clone(), asserts)),
                },
                Verify::Tests => Ok((b.code.clone(), asserts)),
            };
        }
        defined.extend(names);
    }
    Err(Drop::new(
        DropReason::WrongName,
        format!("no function `{name}` (defines: {})", defined.join(", ")),
    ))
}

impl Corpus for Exercises {
    type Constraints = ExerciseConstraints;
    type Checks = ExerciseChecks;

    fn kind(&self) -> &'static str {
        "exercise"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, _slot: u64, rng: &mut ChaCha8Rng) -> ExerciseConstraints {
        let verb = self.verbs.choose(rng).expect("verb lists are never empty");
        let object = self
            .objects
            .choose(rng)
            .expect("object lists are never empty");
        let t = self
            .topics
            .choose(rng)
            .expect("topic lists are never empty");
        let topic = t
            .subtopic
            .as_ref()
            .map_or(t.topic.clone(), |s| format!("{} ({s})", t.topic));
        ExerciseConstraints {
            function_name: format!("{verb}_{object}"),
            topic,
            difficulty: DIFFICULTIES.choose(rng).expect("non-empty").to_string(),
        }
    }

    fn prompt_vars(&self, c: &ExerciseConstraints) -> Vec<(&'static str, String)> {
        vec![
            ("function_name", c.function_name.clone()),
            ("topic", c.topic.clone()),
            ("difficulty", c.difficulty.clone()),
        ]
    }

    fn check(
        &self,
        c: &ExerciseConstraints,
        text: &str,
    ) -> impl Future<Output = Result<ExerciseChecks, Drop>> + Send {
        let verify = match self.sandbox {
            Some(_) => Verify::Tests,
            None => Verify::Parse,
        };
        let block = exercise_block(&c.function_name, text, verify);
        async move {
            let (code, asserts) = block?;
            let Some(sandbox) = &self.sandbox else {
                return Ok(ExerciseChecks {
                    code,
                    asserts,
                    outcome: Outcome::NotRun,
                    exec_seconds: 0.0,
                });
            };
            let run = super::run_in_sandbox(sandbox, &code, DropReason::TestsFailed, false).await?;
            Ok(ExerciseChecks {
                code,
                asserts,
                outcome: Outcome::Passed,
                exec_seconds: run.wall_seconds,
            })
        }
    }

    fn check_setting(&self) -> &'static str {
        if self.sandbox.is_some() {
            ""
        } else {
            "verify parse"
        }
    }

    fn word_bounds(&self) -> (usize, usize) {
        (15, 3000)
    }

    fn typical_completion_tokens(&self) -> u64 {
        // phi-1's CodeExercises: ~180M tokens over ~1M exercises ≈ 200–300 tokens each.
        300
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec!["topic", "difficulty", "asserts", "exec_seconds"]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        use polars::prelude::ChunkAgg;
        Ok(json!({
            "exercises": df.height(),
            "mean_asserts": df.column("asserts")?.i64()?.mean(),
            "mean_exec_seconds": df.column("exec_seconds")?.f64()?.mean(),
            "per_difficulty": counts(df, "difficulty")?,
            "per_topic": counts(df, "topic")?,
            "verify": if self.sandbox.is_some() { Verify::Tests } else { Verify::Parse },
            "sandbox_isolation": self.sandbox.as_ref().map(|s| s.isolation()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_checks_name_the_reason() {
        let good = "```python\ndef add_pairs(a, b):\n    \"\"\"Add.\"\"\"\n    return a + b\n\nassert add_pairs(1, 2) == 3\n```";
        assert_eq!(
            exercise_block("add_pairs", good, Verify::Tests).unwrap().1,
            1
        );
        assert_eq!(
            exercise_block("add_pairs", good, Verify::Parse).unwrap().1,
            1
        );
        let reason = |text: &str| {
            exercise_block("add_pairs", text, Verify::Tests)
                .unwrap_err()
                .reason
        };
        assert_eq!(reason("no code"), DropReason::NoCode);
        assert_eq!(
            reason("```python\ndef add_pairs(a, b)\n    return a\n```"),
            DropReason::SyntaxError
        );
        assert_eq!(
            reason("```python\ndef other(a):\n    return a\nassert other(1) == 1\n```"),
            DropReason::WrongName
        );
        assert_eq!(
            reason("```python\ndef add_pairs(a, b):\n    return a + b\n```"),
            DropReason::NoTests
        );
    }

    /// `--verify parse` needs no assert but a docstring on the asked-for function (a docstring on
    /// another function, or a string that is not the body's first statement, does not count), and
    /// a body that does something besides it.
    #[test]
    fn parse_verification_needs_a_docstring_not_tests() {
        let parse = |text: &str| exercise_block("add_pairs", text, Verify::Parse);
        let code = "def add_pairs(a, b):\n    '''Add a and b.'''\n    return a + b\n";
        assert_eq!(
            parse(&format!("```python\n{code}```")).unwrap(),
            (code.to_string(), 0)
        );
        for bare in [
            "```python\ndef add_pairs(a, b):\n    return a + b\n```",
            "```python\ndef add_pairs(a, b):\n    x = 1\n    \"not first\"\n    return a + b\n```",
            "```python\ndef helper():\n    \"\"\"Help.\"\"\"\n\ndef add_pairs(a, b):\n    return a + b\n```",
        ] {
            assert_eq!(parse(bare).unwrap_err().reason, DropReason::NoDocstring, "{bare}");
        }
        for stub in [
            "pass",
            "...",
            "return",
            "# Your code here\n    pass\n    return",
        ] {
            let text =
                format!("```python\ndef add_pairs(a, b):\n    \"\"\"Add.\"\"\"\n    {stub}\n```");
            assert_eq!(
                parse(&text).unwrap_err().reason,
                DropReason::NoSolution,
                "{stub}"
            );
        }
        let returns =
            "```python\ndef add_pairs(a, b):\n    \"\"\"Add.\"\"\"\n    return a + b\n```";
        assert!(parse(returns).is_ok());
    }
}

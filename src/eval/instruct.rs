//! Instruction following of a TinyStories-Instruct model (`phigen eval stories --instruct DIR`).
//!
//! Reads held-out `phigen stories --instruct` records from `DIR`; the model continues each
//! record's prefix (its lines through `Story:`), and every completion is checked against the
//! instructions its prefix holds:
//! - `Words:` — each word used in some inflection (the TinyStories vocabulary's forms);
//! - `Features:` — `Dialogue` by rule (a quoted utterance, as generation checks it); every other
//!   feature (BadEnding, PlotTwist, Foreshadowing, MoralValue, Conflict, HappyEnding) has no
//!   reliable rule, so the judge answers yes or no for it;
//! - `Summary:` — the judge's 1–10 consistency of the story with the summary.
//!
//! The judge is a corpus of the generation engine ([`InstructGrade`], rubric
//! `prompts/instruct-grade.txt`, versioned), so it resumes and retries like generation; its
//! verdicts live in `OUT/instruct/grades/<judge>-v<rubric version>/`. Writes
//! `OUT/continuations.jsonl` (resumed) and `OUT/instruct.json`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use polars::prelude::{DataFrame, PolarsResult};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use super::stories::{continue_stories, grades_dir, mean_ci, Continuation, MeanCi, Story};
use super::{io_err, EvalError};
use crate::artifact::outdir::DirLock;
use crate::artifact::shards::{self, Layout};
use crate::artifact::table::{self, row};
use crate::generate::engine::{GenerateOptions, RunState, Stats};
use crate::generate::instruct::{feature_label, lists, STORY_LABEL};
use crate::generate::prompt::Template;
use crate::generate::run::{run_corpus, Progress};
use crate::generate::stories::{has_dialogue, Vocabulary};
use crate::generate::{Corpus, Drop, DropReason};
use crate::model::checkpoint;
use crate::model::tokenizer::Tokenizer;
use crate::teacher::factory::TeacherConfig;

pub const BUILTIN_RUBRIC: &str = include_str!("../../prompts/instruct-grade.txt");
const RECORDS: Layout = Layout::Parts { prefix: "part" };
/// The feature checked by rule rather than by the judge.
const DIALOGUE: &str = "dialogue";
/// Output tokens of one verdict: a short explanation and a few labelled lines.
const VERDICT_MAX_TOKENS: u32 = 512;

/// One instruct prompt and what following it means.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The prefix lines and `Story:`: what the model continues.
    pub prompt: String,
    /// The `Words:` of the prefix (empty when it has none).
    pub words: Vec<String>,
    /// The `Features:` of the prefix, by feature name (`bad_ending`).
    pub features: Vec<String>,
    pub summary: Option<String>,
}

impl Task {
    /// The task of an instruct record: its text up to and including `Story:`, and the
    /// instructions its `fields` name.
    pub fn of_record(
        text: &str,
        fields: &[String],
        words: [&str; 3],
        features: &[String],
        summary: Option<&str>,
    ) -> Option<Task> {
        let at = text
            .find(&format!("\n{STORY_LABEL}"))
            .map(|i| i + 1)
            .or_else(|| text.starts_with(STORY_LABEL).then_some(0))?;
        let has = |f: &str| fields.iter().any(|x| x == f);
        Some(Task {
            prompt: text[..at + STORY_LABEL.len()].to_string(),
            words: if has("Words") {
                words.iter().map(|w| w.to_string()).collect()
            } else {
                Vec::new()
            },
            features: if has("Features") {
                features.to_vec()
            } else {
                Vec::new()
            },
            summary: summary.filter(|_| has("Summary")).map(str::to_string),
        })
    }

    /// The features the judge decides (all but dialogue).
    fn judged_features(&self) -> Vec<String> {
        self.features
            .iter()
            .filter(|f| f.as_str() != DIALOGUE)
            .cloned()
            .collect()
    }

    fn needs_judge(&self) -> bool {
        self.summary.is_some() || !self.judged_features().is_empty()
    }

    /// The labelled lines the judge ends with, one per check.
    fn check_lines(&self) -> String {
        let mut lines = Vec::new();
        if self.summary.is_some() {
            lines.push(
                "Consistency: N/10 (how consistent the story is with the summary; 10 = fully)"
                    .to_string(),
            );
        }
        for f in self.judged_features() {
            lines.push(format!("{}: yes or no", feature_label(&f)));
        }
        lines.join("\n")
    }
}

/// What the rules measure on one completion.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleChecks {
    pub missing_words: Vec<String>,
    /// `Some(present)` when dialogue was asked for.
    pub dialogue: Option<bool>,
}

/// The checks phigen makes itself: required words, dialogue.
pub fn rule_checks(vocab: &Vocabulary, task: &Task, completion: &str) -> RuleChecks {
    RuleChecks {
        missing_words: task
            .words
            .iter()
            .filter(|w| !vocab.uses_word(completion, w))
            .cloned()
            .collect(),
        dialogue: task
            .features
            .iter()
            .any(|f| f == DIALOGUE)
            .then(|| has_dialogue(completion)),
    }
}

row! {
    /// One verdict's checks; the verdict's constraints, the story it judges.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Verdict {
        pub consistency: Option<i64>,
        /// Judged features the judge found, and those it did not (by feature name).
        pub features_present: Vec<String>,
        pub features_absent: Vec<String>,
    }
}

/// The labelled lines of a verdict (the last of each label counts): `Consistency: N/10` when the
/// task has a summary, `<Feature>: yes|no` for each judged feature.
pub fn parse_verdict(task_summary: bool, judged: &[String], text: &str) -> Result<Verdict, Drop> {
    let mut found: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let clean = line.replace('*', "");
        if let Some((label, value)) = clean.split_once(':') {
            found.insert(
                label.trim().to_ascii_lowercase(),
                value.trim().to_ascii_lowercase(),
            );
        }
    }
    let consistency = if task_summary {
        let v = found
            .get("consistency")
            .ok_or_else(|| Drop::new(DropReason::Unparseable, "no `Consistency:` line"))?;
        let n: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
        match n.parse::<i64>() {
            Ok(n) if (1..=10).contains(&n) => Some(n),
            _ => {
                return Err(Drop::new(
                    DropReason::Unparseable,
                    format!("`Consistency: {v}` is not a grade from 1 to 10"),
                ))
            }
        }
    } else {
        None
    };
    let (mut present, mut absent) = (Vec::new(), Vec::new());
    for f in judged {
        let label = feature_label(f);
        let v = found
            .get(&label.to_ascii_lowercase())
            .ok_or_else(|| Drop::new(DropReason::Unparseable, format!("no `{label}:` line")))?;
        if v.starts_with("yes") {
            present.push(f.clone());
        } else if v.starts_with("no") {
            absent.push(f.clone());
        } else {
            return Err(Drop::new(
                DropReason::Unparseable,
                format!("`{label}: {v}` is neither yes nor no"),
            ));
        }
    }
    Ok(Verdict {
        consistency,
        features_present: present,
        features_absent: absent,
    })
}

row! {
    /// One completion to judge; its instructions and text are in the prompt.
    #[derive(Clone, Debug, Serialize)]
    pub struct Judged {
        pub index: usize,
        pub story_hash: String,
    } not columns {
        #[serde(skip)]
        instructions: String,
        #[serde(skip)]
        story: String,
        #[serde(skip)]
        checks: String,
        #[serde(skip)]
        summary: bool,
        #[serde(skip)]
        judged: Vec<String>,
    }
}

/// The judging corpus: slot k judges the k-th completion whose task needs the judge.
pub struct InstructGrade {
    template: Template,
    items: Vec<Judged>,
}

impl Corpus for InstructGrade {
    type Constraints = Judged;
    type Checks = Verdict;

    fn kind(&self) -> &'static str {
        "instruct_grade"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, slot: u64, _rng: &mut ChaCha8Rng) -> Judged {
        self.items[slot as usize].clone()
    }

    fn prompt_vars(&self, j: &Judged) -> Vec<(&'static str, String)> {
        vec![
            ("instructions", j.instructions.clone()),
            ("story", j.story.clone()),
            ("checks", j.checks.clone()),
        ]
    }

    fn check(&self, j: &Judged, text: &str) -> impl Future<Output = Result<Verdict, Drop>> + Send {
        std::future::ready(parse_verdict(j.summary, &j.judged, text))
    }

    fn unique_answers(&self) -> bool {
        false
    }

    fn word_bounds(&self) -> (usize, usize) {
        (2, 2000)
    }

    fn typical_completion_tokens(&self) -> u64 {
        120
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec!["index"]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        Ok(json!({ "judged": df.height() }))
    }
}

/// Share of `hits` among `asked` (`None` when nothing was asked).
fn share(hits: usize, asked: usize) -> Option<f64> {
    (asked > 0).then(|| hits as f64 / asked as f64)
}

/// Instruction following over a set of completions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InstructSummary {
    pub completions: usize,
    /// Completions whose prefix had `Words:`, and the share that used all of them.
    pub words_asked: usize,
    pub all_words_used: Option<f64>,
    /// Per feature: (asked, share present). Dialogue by rule, the others by the judge (only the
    /// completions the judge answered count).
    pub features: BTreeMap<String, FeatureShare>,
    /// The judge's consistency with the summary, over completions whose prefix had `Summary:`.
    pub consistency: Option<MeanCi>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeatureShare {
    pub asked: usize,
    pub present: Option<f64>,
    /// `rule` (dialogue) or `judge`.
    pub by: &'static str,
}

/// The metrics of `tasks[i]` completed by `completions[i]`, with the judge's verdicts by index.
pub fn summarize(
    vocab: &Vocabulary,
    tasks: &[Task],
    completions: &[String],
    verdicts: &HashMap<usize, Verdict>,
) -> InstructSummary {
    let (mut words_asked, mut words_ok) = (0, 0);
    let mut features: BTreeMap<String, (usize, usize, &'static str)> = BTreeMap::new();
    let mut consistency = Vec::new();
    for (i, (task, completion)) in tasks.iter().zip(completions).enumerate() {
        let rules = rule_checks(vocab, task, completion);
        if !task.words.is_empty() {
            words_asked += 1;
            words_ok += usize::from(rules.missing_words.is_empty());
        }
        if let Some(present) = rules.dialogue {
            let e = features.entry(DIALOGUE.into()).or_insert((0, 0, "rule"));
            e.0 += 1;
            e.1 += usize::from(present);
        }
        let Some(v) = verdicts.get(&i) else { continue };
        for (list, present) in [(&v.features_present, 1), (&v.features_absent, 0)] {
            for f in list {
                let e = features.entry(f.clone()).or_insert((0, 0, "judge"));
                e.0 += 1;
                e.1 += present;
            }
        }
        consistency.extend(v.consistency.map(|c| c as f64));
    }
    InstructSummary {
        completions: completions.len(),
        words_asked,
        all_words_used: share(words_ok, words_asked),
        features: features
            .into_iter()
            .map(|(f, (asked, hits, by))| {
                (
                    f,
                    FeatureShare {
                        asked,
                        present: share(hits, asked),
                        by,
                    },
                )
            })
            .collect(),
        consistency: (!consistency.is_empty()).then(|| mean_ci(&consistency)),
    }
}

/// The instruct records of `dir` as tasks, in file and row order.
pub fn read_tasks(dir: &Path) -> Result<Vec<Task>, EvalError> {
    let bad = |e: table::TableError| EvalError::Usage(e.to_string());
    let mut tasks = Vec::new();
    for path in shards::list_files(dir, &RECORDS).map_err(|e| EvalError::Usage(e.to_string()))? {
        let cols = [
            "text",
            "fields",
            "verb",
            "noun",
            "adjective",
            "features",
            "summary",
        ];
        let df = table::read_columns(&path, &cols).map_err(bad)?;
        let text = |n| table::text_column(&df, &path, n).map_err(bad);
        let (texts, verbs, nouns, adjectives, summaries) = (
            text("text")?,
            text("verb")?,
            text("noun")?,
            text("adjective")?,
            text("summary")?,
        );
        let list = |n| {
            lists(&df, n)
                .map_err(|e| EvalError::Usage(format!("{}: column `{n}`: {e}", path.display())))
        };
        let (fields, features) = (list("fields")?, list("features")?);
        for i in 0..df.height() {
            let word = |c: &Vec<Option<String>>| c[i].clone().unwrap_or_default();
            let (v, n, a) = (word(&verbs), word(&nouns), word(&adjectives));
            let Some(t) = texts[i].as_deref() else {
                continue;
            };
            if let Some(task) = Task::of_record(
                t,
                &fields[i],
                [&v, &n, &a],
                &features[i],
                summaries[i].as_deref(),
            ) {
                tasks.push(task);
            }
        }
    }
    if tasks.is_empty() {
        return Err(EvalError::Usage(format!(
            "--instruct {}: no instruct records (part-*.parquet with `text` and `fields`); pass the --out of a `phigen stories --instruct` run the model was not trained on",
            dir.display()
        )));
    }
    Ok(tasks)
}

/// `phigen eval stories --instruct`: which model follows which instructions, judged with which
/// rubric, and where it all goes.
#[derive(Debug, Clone)]
pub struct InstructEvalSettings {
    pub checkpoint: PathBuf,
    /// A `phigen stories --instruct` output the model was not trained on.
    pub records: PathBuf,
    /// [default: the built-in prompts/instruct-grade.txt]
    pub rubric: Option<PathBuf>,
    pub out: PathBuf,
    pub max_new_tokens: usize,
    pub gen_temperature: f64,
    pub gen_top_p: f64,
    pub seed: u64,
}

/// A finished instruct evaluation: the judge's run, and the summary written to `instruct.json`.
#[derive(Debug, Clone)]
pub struct InstructEvaluation {
    pub judging: Option<Stats>,
    pub summary: InstructSummary,
    pub summary_path: PathBuf,
}

/// Continues every task's prompt with the checkpoint, has the teacher judge what the rules
/// cannot check, and writes `OUT/instruct.json`.
pub async fn run(
    s: &InstructEvalSettings,
    teacher: &TeacherConfig,
    state: Arc<RunState>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<InstructEvaluation, EvalError> {
    let tasks = read_tasks(&s.records)?;
    let template =
        Template::load_or_builtin(s.rubric.as_deref(), "instruct-grade.txt", BUILTIN_RUBRIC)?;
    std::fs::create_dir_all(&s.out).map_err(io_err(&s.out))?;
    let _lock = DirLock::exclusive(&s.out)?;
    let model = checkpoint::load(&s.checkpoint, candle_core::DType::F32, &Device::Cpu)?;
    let tokenizer = Tokenizer::for_checkpoint(&s.checkpoint)?;
    let params = super::sampling(s.max_new_tokens, s.gen_temperature, s.gen_top_p, s.seed);
    let prompts: Vec<String> = tasks.iter().map(|t| t.prompt.clone()).collect();
    let continued: Vec<Continuation> = continue_stories(
        &model,
        &tokenizer,
        &prompts,
        &params,
        &s.out.join("continuations.jsonl"),
    )?;
    let completions: Vec<String> = continued.iter().map(|c| c.completion.clone()).collect();
    let items: Vec<Judged> = tasks
        .iter()
        .zip(&continued)
        .filter(|(t, _)| t.needs_judge())
        .map(|(t, c)| Judged {
            index: c.index,
            // The hash story grading uses: a verdict is reused exactly for the same text.
            story_hash: Story::new(c).story_hash,
            instructions: t.prompt[..t.prompt.len() - STORY_LABEL.len()]
                .trim()
                .to_string(),
            story: c.completion.trim().to_string(),
            checks: t.check_lines(),
            summary: t.summary.is_some(),
            judged: t.judged_features(),
        })
        .collect();
    let grades = grades_dir(&s.out.join("instruct"), &teacher.model, &template);
    let judging = if items.is_empty() {
        None
    } else {
        let opts = GenerateOptions {
            out: grades.clone(),
            n: items.len() as u64,
            seed: 0,
            max_attempts: 3,
            shard_size: 1000,
            concurrency: teacher.concurrency,
            task: None,
        };
        let corpus = Arc::new(InstructGrade {
            template,
            items: items.clone(),
        });
        Some(run_corpus(corpus, teacher, &opts, VERDICT_MAX_TOKENS, state, progress).await?)
    };
    let verdicts = read_verdicts(&grades, &items)?;
    let vocab = Vocabulary::load(None).map_err(|e| EvalError::Usage(e.to_string()))?;
    let summary = summarize(&vocab, &tasks, &completions, &verdicts);
    let summary_path = s.out.join("instruct.json");
    crate::artifact::atomic::write_json(&summary_path, &summary).map_err(io_err(&summary_path))?;
    Ok(InstructEvaluation {
        judging,
        summary,
        summary_path,
    })
}

/// The verdicts of `dir` by task index, for the completions of `items` (matched by story hash).
fn read_verdicts(dir: &Path, items: &[Judged]) -> Result<HashMap<usize, Verdict>, EvalError> {
    let bad = |e: table::TableError| EvalError::Usage(e.to_string());
    let wanted: HashMap<&str, usize> = items
        .iter()
        .map(|j| (j.story_hash.as_str(), j.index))
        .collect();
    let mut out = HashMap::new();
    let files = shards::list_files(dir, &RECORDS).map_err(|e| EvalError::Usage(e.to_string()))?;
    for path in files {
        let cols = [
            "story_hash",
            "consistency",
            "features_present",
            "features_absent",
        ];
        let df = table::read_columns(&path, &cols).map_err(bad)?;
        let hashes = table::text_column(&df, &path, "story_hash").map_err(bad)?;
        let consistency = table::int_column(&df, &path, "consistency").map_err(bad)?;
        let list = |n| {
            lists(&df, n)
                .map_err(|e| EvalError::Usage(format!("{}: column `{n}`: {e}", path.display())))
        };
        let (present, absent) = (list("features_present")?, list("features_absent")?);
        for (i, h) in hashes.iter().enumerate() {
            let Some(&index) = h.as_deref().and_then(|h| wanted.get(h)) else {
                continue;
            };
            out.entry(index).or_insert_with(|| Verdict {
                consistency: consistency[i],
                features_present: present[i].clone(),
                features_absent: absent[i].clone(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(words: &[&str], features: &[&str], summary: Option<&str>) -> Task {
        Task {
            prompt: "Words: x\nStory:".into(),
            words: words.iter().map(|w| w.to_string()).collect(),
            features: features.iter().map(|f| f.to_string()).collect(),
            summary: summary.map(str::to_string),
        }
    }

    /// The prompt is the record's text through `Story:`; only the prefix's fields are checked.
    #[test]
    fn a_task_is_the_prefix_of_its_record() {
        let text = "Summary: Tom finds a ball.\nWords: run, ball, red\nStory: Once upon a time.";
        let fields = vec!["Summary".to_string(), "Words".to_string()];
        let t = Task::of_record(
            text,
            &fields,
            ["run", "ball", "red"],
            &["dialogue".to_string()],
            Some("Tom finds a ball."),
        )
        .unwrap();
        assert_eq!(
            t.prompt,
            "Summary: Tom finds a ball.\nWords: run, ball, red\nStory:"
        );
        assert_eq!(t.words, vec!["run", "ball", "red"]);
        assert!(t.features.is_empty(), "no Features: line, no feature check");
        assert_eq!(t.summary.as_deref(), Some("Tom finds a ball."));
        assert!(Task::of_record("no story label", &fields, ["a", "b", "c"], &[], None).is_none());
    }

    /// Hand-made completions, one passing and one failing each rule: the required words in some
    /// inflection ("ran" for run, via the vocabulary's irregular forms; "balls"), and dialogue as
    /// a quoted utterance.
    #[test]
    fn the_rules_pass_and_fail_on_hand_made_completions() {
        let vocab = Vocabulary::load(None).unwrap();
        let t = task(&["run", "ball", "red"], &["dialogue", "bad_ending"], None);
        let pass = "Tom ran after two red balls. \"Wait for me!\" said Sue.";
        let r = rule_checks(&vocab, &t, pass);
        assert_eq!(r.missing_words, Vec::<String>::new());
        assert_eq!(r.dialogue, Some(true));
        let fail = "Tom sat under a tree. He was sad all day.";
        let r = rule_checks(&vocab, &t, fail);
        assert_eq!(r.missing_words, vec!["run", "ball", "red"]);
        assert_eq!(r.dialogue, Some(false));
        let r = rule_checks(&vocab, &task(&[], &["bad_ending"], None), fail);
        assert_eq!(r.dialogue, None, "dialogue was not asked for");
    }

    /// The judge's lines: consistency 1–10 and yes/no per judged feature; a missing or
    /// malformed line is `unparseable`, never a silent default.
    #[test]
    fn verdicts_parse_their_labelled_lines() {
        let judged = vec!["bad_ending".to_string(), "plot_twist".to_string()];
        let v = parse_verdict(
            true,
            &judged,
            "The story follows the summary.\n**Consistency:** 8/10\nBadEnding: yes\nPlotTwist: No.",
        )
        .unwrap();
        assert_eq!(
            v,
            Verdict {
                consistency: Some(8),
                features_present: vec!["bad_ending".into()],
                features_absent: vec!["plot_twist".into()],
            }
        );
        let reason = |t: &str| parse_verdict(true, &judged, t).unwrap_err().detail;
        assert!(reason("BadEnding: yes\nPlotTwist: no").contains("Consistency"));
        assert!(reason("Consistency: 11/10\nBadEnding: yes\nPlotTwist: no").contains("1 to 10"));
        assert!(reason("Consistency: 5\nBadEnding: maybe\nPlotTwist: no").contains("BadEnding"));
        assert!(reason("Consistency: 5\nBadEnding: yes").contains("PlotTwist"));
        assert_eq!(parse_verdict(false, &[], "ok").unwrap().consistency, None);
    }

    /// The metrics over four hand-made completions, counted by hand: words asked of 3, used by
    /// 2; dialogue asked of 2, present in 1 (rule); bad ending judged for 2, present in 1;
    /// consistency from the two verdicts that have it, 8 and 4 → mean 6.
    #[test]
    fn metrics_count_what_was_asked_and_what_was_followed() {
        let vocab = Vocabulary::load(None).unwrap();
        let tasks = vec![
            task(&["run", "ball", "red"], &["dialogue"], None),
            task(
                &["run", "ball", "red"],
                &["dialogue", "bad_ending"],
                Some("s"),
            ),
            task(&["jump", "cat", "big"], &[], Some("s")),
            task(&[], &["bad_ending"], None),
        ];
        let completions = vec![
            "Tom ran with a red ball. \"Fun!\" he said.".to_string(),
            "Tom ran with a red ball and then it broke.".to_string(),
            "A dog sat.".to_string(),
            "Everyone was sad at the end.".to_string(),
        ];
        let verdict = |c: Option<i64>, present: &[&str], absent: &[&str]| Verdict {
            consistency: c,
            features_present: present.iter().map(|s| s.to_string()).collect(),
            features_absent: absent.iter().map(|s| s.to_string()).collect(),
        };
        let verdicts = HashMap::from([
            (1, verdict(Some(8), &[], &["bad_ending"])),
            (2, verdict(Some(4), &[], &[])),
            (3, verdict(None, &["bad_ending"], &[])),
        ]);
        let s = summarize(&vocab, &tasks, &completions, &verdicts);
        assert_eq!((s.completions, s.words_asked), (4, 3));
        assert_eq!(s.all_words_used, Some(2.0 / 3.0));
        assert_eq!(
            s.features["dialogue"],
            FeatureShare {
                asked: 2,
                present: Some(0.5),
                by: "rule"
            }
        );
        assert_eq!(
            s.features["bad_ending"],
            FeatureShare {
                asked: 2,
                present: Some(0.5),
                by: "judge"
            }
        );
        assert_eq!(s.consistency.unwrap().mean, 6.0);
    }

    #[test]
    fn the_shipped_rubric_loads_and_asks_only_what_the_rules_cannot_check() {
        let t = Template::parse("instruct-grade.txt", BUILTIN_RUBRIC).unwrap();
        assert_eq!((t.id.as_str(), t.version), ("instruct-grade", 1));
        let lines = task(&["a"], &["dialogue", "moral_value"], Some("s")).check_lines();
        assert_eq!(
            lines
                .lines()
                .map(|l| l.split(':').next().unwrap())
                .collect::<Vec<_>>(),
            vec!["Consistency", "MoralValue"]
        );
        assert!(!task(&["a"], &["dialogue"], None).needs_judge());
    }
}

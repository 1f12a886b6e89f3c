//! Story grading (TinyStories §4.1): a model continues story beginnings, a teacher grades each
//! continuation for grammar, creativity, consistency and plot (1–10) and names the age group it
//! reads as.
//!
//! Grading is a corpus of the generation engine ([`Grade`]), so it has resume, retries, the cost
//! cap and `--dry-run`. Grades live in `OUT/grades/<judge>-v<rubric version>/`, and each record's id
//! hashes the story, so a grade is reused exactly when (rubric version, story, judge model) match.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};

use polars::prelude::{DataFrame, PolarsResult};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{io_err, EvalError};
use crate::artifact::shards::{self, Layout};
use crate::artifact::table::{self, row};
use crate::generate::prompt::Template;
use crate::generate::{Corpus, Drop, DropReason};
use crate::model::sample::{context_room, generate, SamplingParams};
use crate::model::tokenizer::Tokenizer;
use crate::model::Decoder;

pub const BUILTIN_TEMPLATE: &str = include_str!("../../prompts/story-grade.txt");
pub const BUILTIN_BEGINNINGS: &str = include_str!("../../seeds/story-beginnings.txt");
pub const METRICS: [&str; 4] = ["grammar", "creativity", "consistency", "plot"];
const RECORDS: Layout = Layout::Parts { prefix: "part" };

/// Story beginnings, one a line, `#` comments.
pub fn parse_beginnings(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Continuation {
    pub index: usize,
    pub beginning: String,
    pub completion: String,
}

/// Continues every beginning once, appending to `path` as it goes; beginnings already continued
/// there (same index and text) are kept.
pub fn continue_stories(
    model: &Decoder,
    tokenizer: &Tokenizer,
    beginnings: &[String],
    params: &SamplingParams,
    path: &Path,
) -> Result<Vec<Continuation>, EvalError> {
    let mut have: BTreeMap<usize, Continuation> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            if let Ok(c) = serde_json::from_str::<Continuation>(line) {
                if beginnings.get(c.index) == Some(&c.beginning) {
                    have.insert(c.index, c);
                }
            }
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    let eos = model.config().eos_ids();
    for (index, beginning) in beginnings.iter().enumerate() {
        if have.contains_key(&index) {
            continue;
        }
        let ids = tokenizer.encode(beginning)?;
        let room = context_room(model, ids.len());
        let out = generate(
            model,
            &[ids],
            &SamplingParams {
                seed: params.seed ^ index as u64,
                max_new_tokens: params.max_new_tokens.min(room),
                ..params.clone()
            },
            &eos,
            |_, _| true,
        )?;
        let mut row = out.ids.into_iter().next().unwrap_or_default();
        row.retain(|t| !eos.contains(t));
        let completion = tokenizer.decode(&row)?;
        let c = Continuation {
            index,
            beginning: beginning.clone(),
            completion: completion
                .split("<|endoftext|>")
                .next()
                .unwrap_or("")
                .to_string(),
        };
        writeln!(file, "{}", serde_json::to_string(&c).expect("serializes"))
            .map_err(io_err(path))?;
        have.insert(index, c);
    }
    Ok(have.into_values().collect())
}

row! {
    /// One story to grade; the text is in the prompt, its hash in the record.
    #[derive(Clone, Debug, Serialize)]
    pub struct Story {
        pub index: usize,
        pub story_hash: String,
    } not columns {
        #[serde(skip)]
        beginning: String,
        #[serde(skip)]
        completion: String,
    }
}

impl Story {
    pub fn new(c: &Continuation) -> Story {
        let hash = blake3::hash(format!("{}\u{0}{}", c.beginning, c.completion).as_bytes());
        Story {
            index: c.index,
            story_hash: hash.to_hex()[..16].to_string(),
            beginning: c.beginning.clone(),
            completion: c.completion.clone(),
        }
    }
}

row! {
    #[derive(Clone, Debug, Serialize, PartialEq)]
    pub struct Grades {
        pub grammar: i64,
        pub creativity: i64,
        pub consistency: i64,
        pub plot: i64,
        /// A (3 or under) … F (13–16), as in the TinyStories rubric.
        pub age_group: String,
    }
}

/// The five labelled lines of a grading answer (the last occurrence of each counts).
pub fn parse_grades(text: &str) -> Result<Grades, Drop> {
    let mut found: BTreeMap<&str, String> = BTreeMap::new();
    for line in text.lines() {
        let clean = line.replace('*', "");
        let Some((label, value)) = clean.split_once(':') else {
            continue;
        };
        let label = label.trim().to_ascii_lowercase();
        for key in METRICS.iter().chain(&["age group"]) {
            if label == *key {
                found.insert(key, value.trim().to_string());
            }
        }
    }
    let score = |k: &str| -> Result<i64, Drop> {
        let v = found
            .get(k)
            .ok_or_else(|| Drop::new(DropReason::Unparseable, format!("no `{k}:` line")))?;
        let n: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
        match n.parse::<i64>() {
            Ok(n) if (1..=10).contains(&n) => Ok(n),
            _ => Err(Drop::new(
                DropReason::Unparseable,
                format!("`{k}: {v}` is not a grade from 1 to 10"),
            )),
        }
    };
    let age = found
        .get("age group")
        .and_then(|v| v.trim().chars().next())
        .map(|c| c.to_ascii_uppercase())
        .filter(|c| ('A'..='F').contains(c))
        .ok_or_else(|| Drop::new(DropReason::Unparseable, "no `Age group: A-F` line"))?;
    Ok(Grades {
        grammar: score("grammar")?,
        creativity: score("creativity")?,
        consistency: score("consistency")?,
        plot: score("plot")?,
        age_group: age.to_string(),
    })
}

/// The grading corpus of the generation engine: slot `i` grades story `i`.
pub struct Grade {
    template: Template,
    stories: Vec<Story>,
}

impl Grade {
    pub fn new(template: Template, continuations: &[Continuation]) -> Grade {
        Grade {
            template,
            stories: continuations.iter().map(Story::new).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.stories.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stories.is_empty()
    }
}

impl Corpus for Grade {
    type Constraints = Story;
    type Checks = Grades;

    fn kind(&self) -> &'static str {
        "story_grade"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, slot: u64, _rng: &mut ChaCha8Rng) -> Story {
        self.stories[slot as usize].clone()
    }

    fn prompt_vars(&self, s: &Story) -> Vec<(&'static str, String)> {
        vec![
            ("beginning", s.beginning.clone()),
            ("completion", s.completion.clone()),
        ]
    }

    fn check(&self, _: &Story, text: &str) -> impl Future<Output = Result<Grades, Drop>> + Send {
        std::future::ready(parse_grades(text))
    }

    fn unique_answers(&self) -> bool {
        false
    }

    fn word_bounds(&self) -> (usize, usize) {
        (5, 2000)
    }

    fn typical_completion_tokens(&self) -> u64 {
        150
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec!["grammar", "creativity", "consistency", "plot", "age_group"]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        Ok(json!({ "graded": df.height() }))
    }
}

/// Mean, standard deviation and the half-width of a normal 95% interval of the mean.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MeanCi {
    pub mean: f64,
    pub sd: f64,
    pub ci95: f64,
    pub n: usize,
}

pub fn mean_ci(values: &[f64]) -> MeanCi {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n.max(1) as f64;
    let var = if n > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    let sd = var.sqrt();
    MeanCi {
        mean,
        sd,
        ci95: 1.96 * sd / (n.max(1) as f64).sqrt(),
        n,
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StorySummary {
    pub judge: String,
    pub rubric: String,
    pub stories: usize,
    pub graded: usize,
    pub metrics: BTreeMap<String, MeanCi>,
    pub age_groups: BTreeMap<String, usize>,
}

/// Where the grades of one judge and rubric version live.
pub fn grades_dir(out: &Path, judge: &str, template: &Template) -> PathBuf {
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
    out.join("grades")
        .join(format!("{judge}-v{}", template.version))
}

/// Means with 95% intervals over the graded stories of `dir` whose hashes are in `stories`.
pub fn summarize_grades(
    dir: &Path,
    grade: &Grade,
    judge: &str,
    template: &Template,
) -> Result<StorySummary, EvalError> {
    let wanted: std::collections::HashSet<&str> = grade
        .stories
        .iter()
        .map(|s| s.story_hash.as_str())
        .collect();
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut ages: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    let files = shards::list_files(dir, &RECORDS).map_err(|e| EvalError::Usage(e.to_string()))?;
    for file in files {
        let mut cols = vec!["story_hash", "age_group"];
        cols.extend(METRICS);
        let df = table::read_columns(&file, &cols).map_err(|e| EvalError::Usage(e.to_string()))?;
        let hashes = table::text_column(&df, &file, "story_hash")
            .map_err(|e| EvalError::Usage(e.to_string()))?;
        let age = table::text_column(&df, &file, "age_group")
            .map_err(|e| EvalError::Usage(e.to_string()))?;
        let metric_cols: Vec<Vec<Option<i64>>> = METRICS
            .iter()
            .map(|m| table::int_column(&df, &file, m).map_err(|e| EvalError::Usage(e.to_string())))
            .collect::<Result<_, _>>()?;
        for (row, h) in hashes.iter().enumerate() {
            let Some(h) = h else { continue };
            if !wanted.contains(h.as_str()) || !seen.insert(h.clone()) {
                continue;
            }
            for (m, col) in METRICS.iter().zip(&metric_cols) {
                if let Some(v) = col[row] {
                    values.entry(m.to_string()).or_default().push(v as f64);
                }
            }
            if let Some(a) = &age[row] {
                *ages.entry(a.clone()).or_default() += 1;
            }
        }
    }
    Ok(StorySummary {
        judge: judge.to_string(),
        rubric: format!("{} v{} ({})", template.id, template.version, template.hash),
        stories: grade.len(),
        graded: seen.len(),
        metrics: values
            .iter()
            .map(|(k, v)| (k.clone(), mean_ci(v)))
            .collect(),
        age_groups: ages,
    })
}

pub fn write_summary(out: &Path, s: &StorySummary) -> Result<PathBuf, EvalError> {
    let path = out.join("stories.json");
    crate::artifact::atomic::write_json(&path, s).map_err(io_err(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_parse_the_labelled_lines() {
        let g = parse_grades("Good story.\nGrammar: 8/10\n**Creativity:** 6/10\nConsistency: 9/10\nPlot: 7/10\nAge group: B (4-5)").unwrap();
        assert_eq!(
            g,
            Grades {
                grammar: 8,
                creativity: 6,
                consistency: 9,
                plot: 7,
                age_group: "B".into()
            }
        );
        let reason = |t: &str| parse_grades(t).unwrap_err().detail;
        assert!(
            reason("Grammar: 8/10\nCreativity: 6\nConsistency: 9\nAge group: B").contains("plot")
        );
        assert!(
            reason("Grammar: 11/10\nCreativity: 6\nConsistency: 9\nPlot: 2\nAge group: B")
                .contains("grammar")
        );
        assert!(
            reason("Grammar: 1\nCreativity: 6\nConsistency: 9\nPlot: 2\nAge group: Z")
                .contains("Age group")
        );
    }

    /// Values by hand: 2, 4, 4, 4, 5, 5, 7, 9 → mean 5, sample sd √(32/7), 95% half-width 1.96·sd/√8.
    #[test]
    fn means_come_with_their_interval() {
        let m = mean_ci(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m.mean, 5.0);
        assert!((m.sd - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert!((m.ci95 - 1.96 * (32.0f64 / 7.0).sqrt() / 8f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn the_shipped_beginnings_and_rubric_load() {
        assert_eq!(parse_beginnings(BUILTIN_BEGINNINGS).len(), 20);
        let t = Template::parse("story-grade.txt", BUILTIN_TEMPLATE).unwrap();
        assert_eq!(t.id, "story-grade");
    }
}

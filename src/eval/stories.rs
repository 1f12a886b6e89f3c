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
use std::sync::Arc;

use candle_core::Device;
use polars::prelude::{DataFrame, PolarsResult};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{io_err, EvalError};
use crate::artifact::outdir::DirLock;
use crate::artifact::shards::{self, Layout};
use crate::artifact::table::{self, row};
use crate::generate::engine::{DryRun, GenerateOptions, RunState, Stats};
use crate::generate::prompt::Template;
use crate::generate::run::{dry_run_corpus, run_corpus, Progress};
use crate::generate::{Corpus, Drop, DropReason};
use crate::model::checkpoint;
use crate::model::sample::{context_room, generate, SamplingParams};
use crate::model::tokenizer::Tokenizer;
use crate::model::Decoder;
use crate::teacher::factory::TeacherConfig;

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
                sampling: params
                    .sampling
                    .with_seed(params.sampling.seed() ^ index as u64),
                max_new_tokens: params.max_new_tokens.min(room),
                ..*params
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

fn default_max_new_tokens() -> usize {
    200
}

fn default_gen_temperature() -> f64 {
    0.8
}

fn default_gen_top_p() -> f64 {
    0.95
}

/// `phigen eval stories`: which model continues which beginnings, graded with which rubric, and
/// where it all goes (field = flag name with `_`, defaults = the flags').
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorySettings {
    /// The model under evaluation (a checkpoint directory).
    pub checkpoint: PathBuf,
    /// Story beginnings, one a line [default: the built-in seeds/story-beginnings.txt].
    #[serde(default)]
    pub beginnings: Option<PathBuf>,
    /// Grading prompt [default: the built-in prompts/story-grade.txt].
    #[serde(default)]
    pub rubric: Option<PathBuf>,
    /// Output directory: continuations.jsonl, grades/<judge>-v<rubric>/, stories.json.
    pub out: PathBuf,
    /// Tokens the model writes after each beginning.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// The model's sampling temperature (0: greedy).
    #[serde(default = "default_gen_temperature")]
    pub gen_temperature: f64,
    /// The model's nucleus top-p (1: off).
    #[serde(default = "default_gen_top_p")]
    pub gen_top_p: f64,
    #[serde(default)]
    pub seed: u64,
}

/// A finished grading: the engine's stats of the grading run, where the grades are, and the
/// summary written to `stories.json` (over the stories graded so far when the run stopped early).
#[derive(Debug, Clone)]
pub struct StoryGrading {
    pub grading: Stats,
    pub grades: PathBuf,
    pub summary: StorySummary,
    pub summary_path: PathBuf,
}

/// Output tokens of one grade: four scores, an age group and a sentence or two.
const GRADE_MAX_TOKENS: u32 = 512;

/// The continued stories as a grading corpus, and where its grades go. The lock on `out` is held
/// as long as the returned guard lives.
fn prepare(
    s: &StorySettings,
    teacher: &TeacherConfig,
) -> Result<(Arc<Grade>, Template, GenerateOptions, DirLock), EvalError> {
    let (source_name, beginnings) = match &s.beginnings {
        Some(p) => (
            p.display().to_string(),
            parse_beginnings(&std::fs::read_to_string(p).map_err(io_err(p))?),
        ),
        None => (
            "<built-in seeds/story-beginnings.txt>".to_string(),
            parse_beginnings(BUILTIN_BEGINNINGS),
        ),
    };
    if beginnings.is_empty() {
        return Err(EvalError::NoBeginnings { source_name });
    }
    let template =
        Template::load_or_builtin(s.rubric.as_deref(), "story-grade.txt", BUILTIN_TEMPLATE)?;
    std::fs::create_dir_all(&s.out).map_err(io_err(&s.out))?;
    let lock = DirLock::exclusive(&s.out)?;
    let model = checkpoint::load(&s.checkpoint, candle_core::DType::F32, &Device::Cpu)?;
    let tokenizer = Tokenizer::for_checkpoint(&s.checkpoint)?;
    let params = super::sampling(s.max_new_tokens, s.gen_temperature, s.gen_top_p, s.seed);
    let continuations = continue_stories(
        &model,
        &tokenizer,
        &beginnings,
        &params,
        &s.out.join("continuations.jsonl"),
    )?;
    let grade = Arc::new(Grade::new(template.clone(), &continuations));
    let opts = GenerateOptions {
        out: grades_dir(&s.out, &teacher.model, &template),
        n: grade.len() as u64,
        seed: 0,
        max_attempts: 3,
        shard_size: 1000,
        concurrency: teacher.concurrency,
        task: None,
    };
    Ok((grade, template, opts, lock))
}

/// Continues every beginning with the checkpoint (resuming `continuations.jsonl`), has the
/// teacher grade each continuation (grades already in `OUT/grades/<judge>-v<rubric>/` are reused)
/// and writes the summary to `OUT/stories.json`. `state` stops the grading (Ctrl-C); `progress`
/// follows it.
pub async fn run(
    settings: &StorySettings,
    teacher: &TeacherConfig,
    state: Arc<RunState>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<StoryGrading, EvalError> {
    let (grade, template, opts, _lock) = prepare(settings, teacher)?;
    let grading = run_corpus(
        grade.clone(),
        teacher,
        &opts,
        GRADE_MAX_TOKENS,
        state,
        progress,
    )
    .await?;
    let summary = summarize_grades(&opts.out, &grade, &teacher.model, &template)?;
    let summary_path = write_summary(&settings.out, &summary)?;
    Ok(StoryGrading {
        grading,
        grades: opts.out,
        summary,
        summary_path,
    })
}

/// What [`run`] would send to the teacher. The continuations are written (they cost no teacher
/// tokens), as a run would.
pub fn dry_run(settings: &StorySettings, teacher: &TeacherConfig) -> Result<DryRun, EvalError> {
    let (grade, _, opts, _lock) = prepare(settings, teacher)?;
    Ok(dry_run_corpus(grade, teacher, &opts, GRADE_MAX_TOKENS)?)
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

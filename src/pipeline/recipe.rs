//! The whole-run recipe: the training recipe of `train::recipe` (`name`, `seed`, `[model]`,
//! `[[stage]]`) plus what makes its data and judges its model:
//!
//! ```toml
//! out = "runs/demo"                 # where every step writes (default runs/NAME, or --out)
//! [teacher]                         # the default teacher: the generating commands' flags
//! base_url = "http://127.0.0.1:8089/v1"
//! [teachers.judge]                  # more teachers, named
//! [[data]]                          # named data steps, run in dependency order
//! name = "textbooks"
//! kind = "textbooks"                # stories | textbooks | exercises | topics | chat-data | filter | dedup | decontaminate | tokenize
//! n = 200                           # or tokens = "5M"
//! topics = "seeds/topics.txt"      # or from = ["STEP"], a `kind = "topics"` step's list
//! [[data]]
//! name = "tok"
//! kind = "tokenize"
//! from = ["textbooks"]              # upstream steps by name; `paths` for files and directories
//! [[stage]]
//! data = [{ step = "tok", weight = 1.0 }]   # or { path = "data/tok/x" } as before
//! [[eval]]
//! name = "humaneval"
//! kind = "humaneval"                # loss | humaneval | mbpp | stories
//! ```
//!
//! Parse, then resolve: the TOML (after `--set`) becomes a validated [`Pipeline`] once. Unknown
//! keys, dangling references and cycles are errors naming the recipe file, the key and its line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::classify::pipeline::{ModelSettings, SampleSettings};
use crate::classify::preset::Preset;
use crate::dedup::decontaminate::Mode;
use crate::generate::run::{CorpusSettings, ExercisesSettings, StoriesSettings, TextbooksSettings};
use crate::generate::topics::TopicsSettings;
use crate::model::tokenizer::{TokenizerError, TokenizerSpec};
use crate::teacher::factory::TeacherConfig;
use crate::train::recipe::{Recipe, RecipeError};

/// Where in the recipe something is: the file and, when the key is in the file (not from
/// `--set`), its line.
#[derive(Debug, Clone)]
pub struct At {
    pub path: PathBuf,
    pub line: Option<usize>,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.path.display()),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineRecipeError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error("{at}: `{key}` {message}")]
    Invalid {
        at: At,
        key: String,
        message: String,
    },
}

/// What a data step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    Stories,
    Textbooks,
    Exercises,
    /// A topic list (`phigen topics`) that a textbooks step reads with `from`.
    Topics,
    /// Chat SFT conversations (`phigen chat-data`), written by the teacher, or imported from
    /// `paths` / `from`; an `objective = "sft"` stage reads them with `{ step = "NAME" }`.
    #[serde(rename = "chat-data")]
    ChatData,
    Filter,
    Dedup,
    Decontaminate,
    Tokenize,
    /// DPO pairs (`phigen prefs`): a student samples, a teacher judges; or pairs imported from
    /// `paths`. A dpo stage reads them (`data = [{ step = … }]`).
    Prefs,
}

impl DataKind {
    pub fn name(self) -> &'static str {
        match self {
            DataKind::Stories => "stories",
            DataKind::Textbooks => "textbooks",
            DataKind::Exercises => "exercises",
            DataKind::Topics => "topics",
            DataKind::ChatData => "chat-data",
            DataKind::Filter => "filter",
            DataKind::Dedup => "dedup",
            DataKind::Decontaminate => "decontaminate",
            DataKind::Tokenize => "tokenize",
            DataKind::Prefs => "prefs",
        }
    }

    fn generates(self) -> bool {
        matches!(
            self,
            DataKind::Stories | DataKind::Textbooks | DataKind::Exercises | DataKind::Topics
        )
    }
}

/// How much a generate step makes: records, or tokens turned into records by the planner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Records(u64),
    Tokens(u64),
}

/// `n`, `tokens`, `seed`, … of a generate step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateCommon {
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    tokens: Option<TokenCount>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default = "three")]
    max_attempts: u32,
    #[serde(default = "thousand")]
    shard_size: usize,
    #[serde(default)]
    teacher: Option<String>,
}

fn three() -> u32 {
    3
}
fn thousand() -> usize {
    1000
}

/// `1000`, `"5M"`, `"1.5B"`: a token count.
#[derive(Debug, Clone, Copy)]
struct TokenCount(u64);

impl<'de> Deserialize<'de> for TokenCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(TokenCount(n)),
            Raw::S(s) => parse_count(&s).map(TokenCount).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{s}` is not a token count; write e.g. 500000, \"500K\", \"5M\" or \"1.5B\""
                ))
            }),
        }
    }
}

/// `"5M"` → 5,000,000 (K, M, B, T; decimals allowed).
pub fn parse_count(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    let (digits, scale) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1e3),
        (i, 'M' | 'm') => (&s[..i], 1e6),
        (i, 'B' | 'b' | 'G' | 'g') => (&s[..i], 1e9),
        (i, 'T' | 't') => (&s[..i], 1e12),
        _ => (s.as_str(), 1.0),
    };
    let v: f64 = digits.trim().parse().ok()?;
    let n = v * scale;
    (n.is_finite() && (0.0..1.8e19).contains(&n)).then_some(n.round() as u64)
}

/// Options of a dedup step: `phigen dedup`'s flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupSettings {
    pub shingle: usize,
    pub char_ngrams: Option<usize>,
    pub bands: usize,
    pub rows: usize,
    pub seed: u64,
    pub exact_normalize: String,
    pub verify_jaccard: Option<f64>,
}

impl Default for DedupSettings {
    fn default() -> Self {
        DedupSettings {
            shingle: 5,
            char_ngrams: None,
            bands: 14,
            rows: 8,
            seed: 1,
            exact_normalize: "whitespace,case".into(),
            verify_jaccard: None,
        }
    }
}

impl DedupSettings {
    pub fn params(&self) -> Result<crate::dedup::minhash::Params, String> {
        use crate::dedup::minhash::{Params, Shingles};
        Ok(Params {
            shingles: match self.char_ngrams {
                Some(n) if n >= 3 => Shingles::Chars(n),
                Some(n) => {
                    return Err(format!("dedup `char_ngrams` must be at least 3, found {n}"))
                }
                None => Shingles::Words(self.shingle.max(1)),
            },
            bands: self.bands.max(1),
            rows: self.rows.max(1),
            seed: self.seed,
        })
    }

    pub fn normalize(&self) -> Result<crate::dedup::minhash::Normalize, String> {
        crate::dedup::minhash::Normalize::parse(&self.exact_normalize)
    }
}

/// Options of a decontaminate step: `phigen decontaminate`'s flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecontaminateSettings {
    /// HumanEval.jsonl(.gz) or MBPP jsonl files.
    pub benchmarks: Vec<PathBuf>,
    #[serde(default = "thirteen")]
    pub ngram: usize,
    #[serde(default = "ten")]
    pub identifier_ngram: usize,
    #[serde(default = "share")]
    pub identifier_share: f64,
    #[serde(default = "drop_mode")]
    pub mode: Mode,
}

fn thirteen() -> usize {
    13
}
fn ten() -> usize {
    10
}
fn share() -> f64 {
    0.8
}
fn drop_mode() -> Mode {
    Mode::Drop
}

/// Options of a tokenize step: `phigen tokenize`'s flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeSettings {
    /// A tiktoken encoding's name, a Hugging Face tokenizer.json or a checkpoint directory
    /// holding one. Default: the recipe's `model.tokenizer`.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// The token that ends documents, for a tokenizer.json whose own files name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<String>,
    #[serde(default = "val_fraction")]
    pub val_fraction: f64,
    #[serde(default = "shard_tokens")]
    pub shard_tokens: u64,
}

impl TokenizeSettings {
    /// The step's tokenizer: its own `tokenizer`, else the training recipe's.
    pub fn spec(&self, recipe: &TokenizerSpec) -> Result<TokenizerSpec, TokenizerError> {
        match &self.tokenizer {
            Some(t) => TokenizerSpec::parse(t),
            None => Ok(recipe.clone()),
        }
    }
}

fn val_fraction() -> f64 {
    0.02
}
fn shard_tokens() -> u64 {
    100_000_000
}

/// Options of a filter step: `phigen filter`'s flags (the teacher rates a sample, a forest over
/// embeddings scores every file, the kept files go on).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSettings {
    /// `preset = "web"`: web text in tables' `text` column, rated on FineWeb-Edu's additive scale.
    /// Code, the default, is left out of the step's identity, so recipes written before this
    /// setting keep their ids.
    #[serde(default, skip_serializing_if = "Preset::is_code")]
    pub preset: Preset,
    /// Extensions of loose source files read (see [`FilterSettings::extensions`]).
    #[serde(default = "py")]
    pub ext: Vec<String>,
    /// Larger files are skipped.
    #[serde(default = "mib")]
    pub max_bytes: u64,
    /// Files embedded and scored at once.
    #[serde(default = "batch")]
    pub batch: usize,
    /// What the teacher rates: `sample`, `seed`, `max_chars`, `max_attempts`, `prompt`.
    #[serde(default)]
    pub sample: SampleSettings,
    /// The classifier: `embedder`, `cache`, `forest`, `holdout`, `positive_at`, `threshold`.
    #[serde(default)]
    pub model: ModelSettings,
}

fn py() -> Vec<String> {
    vec!["py".into()]
}

impl FilterSettings {
    /// The loose files read: `ext`, except that a web step whose `ext` is left at the code
    /// default reads tables only (web text comes as Parquet or jsonl; `ext = ["txt"]` reads
    /// loose text files too).
    pub fn extensions(&self) -> Vec<String> {
        match self.preset {
            Preset::Web if self.ext == py() => self.preset.default_extensions(),
            _ => self.ext.clone(),
        }
    }
}
fn mib() -> u64 {
    1 << 20
}
fn batch() -> usize {
    64
}

/// Options of a prefs step: `phigen prefs`'s flags. `student` and `prompts` make pairs (the
/// judge is the step's `teacher`); `paths` alone imports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefsSettings {
    /// A training stage of this recipe (its final checkpoint samples, so the step runs after
    /// that stage) or a checkpoint directory or .gguf file.
    #[serde(default)]
    pub student: Option<String>,
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    #[serde(default = "two")]
    pub samples: usize,
    #[serde(default = "two_hundred_fifty_six")]
    pub max_new_tokens: usize,
    #[serde(default = "one")]
    pub gen_temperature: f64,
    #[serde(default = "one")]
    pub gen_top_p: f64,
    /// Default: the recipe's seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Sequences the student generates at once; the pairs do not depend on it.
    #[serde(default = "eight", skip_serializing)]
    pub student_batch: usize,
    #[serde(default)]
    pub rubric: Option<PathBuf>,
    #[serde(default = "three")]
    pub max_attempts: u32,
}

fn two_hundred_fifty_six() -> usize {
    256
}
fn one() -> f64 {
    1.0
}

/// The keys of a filter step that are [`SampleSettings`] and [`ModelSettings`] fields, written
/// flat in the step's table.
const SAMPLE_KEYS: [&str; 6] = [
    "sample",
    "seed",
    "max_chars",
    "max_file_tokens",
    "max_attempts",
    "prompt",
];
const MODEL_KEYS: [&str; 6] = [
    "embedder",
    "cache",
    "forest",
    "holdout",
    "positive_at",
    "threshold",
];

/// What one data step does, typed by its kind.
#[derive(Debug, Clone)]
pub enum Action {
    Generate {
        target: Target,
        seed: u64,
        max_attempts: u32,
        shard_size: usize,
        teacher: String,
        corpus: CorpusSettings,
    },
    Filter {
        teacher: String,
        settings: FilterSettings,
    },
    Dedup(DedupSettings),
    Decontaminate(DecontaminateSettings),
    Tokenize(TokenizeSettings),
    Prefs {
        /// The judge (unused by an import).
        teacher: String,
        settings: PrefsSettings,
    },
    /// A `kind = "chat-data"` step with inputs: their conversations checked and imported.
    ChatImport(crate::generate::chat::ChatImportSettings),
}

impl Action {
    /// The teacher the step asks, by name in the recipe.
    pub fn teacher(&self) -> Option<&str> {
        match self {
            Action::Generate { teacher, .. } | Action::Filter { teacher, .. } => Some(teacher),
            Action::Prefs { teacher, settings } if settings.student.is_some() => Some(teacher),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DataStep {
    pub name: String,
    pub kind: DataKind,
    /// Upstream data steps, by name.
    pub from: Vec<String>,
    /// Files and directories outside the recipe run.
    pub paths: Vec<PathBuf>,
    pub action: Action,
}

impl DataStep {
    /// Whether the step asks a teacher for new records (a chat-data step with inputs imports).
    fn generates(&self) -> bool {
        matches!(self.action, Action::Generate { .. })
    }
}

/// What an eval step measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalKind {
    Loss,
    Humaneval,
    Mbpp,
    Stories,
}

/// A validation-loss eval: the last checkpoint of `stage` on the validation split of `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSettings {
    /// A tokenize step (default: the first of the stage's data).
    #[serde(default)]
    pub data: Option<String>,
    /// Default: the stage's `seq_len`.
    #[serde(default)]
    pub seq_len: Option<usize>,
    #[serde(default = "sixteen")]
    pub batches: usize,
    #[serde(default = "eight")]
    pub rows: usize,
}

fn sixteen() -> usize {
    16
}
fn eight() -> usize {
    8
}

/// HumanEval / MBPP pass@k of the last checkpoint of `stage`: `phigen eval humaneval`'s flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeEvalToml {
    pub problems: PathBuf,
    #[serde(default = "one_usize")]
    pub samples_per_task: usize,
    #[serde(default = "k_one")]
    pub k: Vec<usize>,
    #[serde(default = "max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default = "top_p")]
    pub top_p: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "eight")]
    pub batch: usize,
    #[serde(default)]
    pub python: Option<PathBuf>,
    #[serde(default = "two")]
    pub workers: usize,
    #[serde(default = "three_f64")]
    pub timeout: f64,
    #[serde(default = "memory_mb")]
    pub memory_mb: u64,
    #[serde(default)]
    pub unsafe_sandbox: bool,
}

fn one_usize() -> usize {
    1
}
fn k_one() -> Vec<usize> {
    vec![1, 10, 100]
}
fn max_new_tokens() -> usize {
    384
}
fn top_p() -> f64 {
    0.95
}
fn two() -> usize {
    2
}
fn three_f64() -> f64 {
    3.0
}
fn memory_mb() -> u64 {
    1024
}

/// Teacher-graded story continuations of the last checkpoint of `stage`: `phigen eval
/// stories`'s flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoriesEvalToml {
    #[serde(default)]
    pub beginnings: Option<PathBuf>,
    #[serde(default)]
    pub rubric: Option<PathBuf>,
    #[serde(default = "two_hundred")]
    pub max_new_tokens: usize,
    #[serde(default = "gen_temperature")]
    pub gen_temperature: f64,
    #[serde(default = "top_p")]
    pub gen_top_p: f64,
    #[serde(default)]
    pub seed: u64,
}

fn two_hundred() -> usize {
    200
}
fn gen_temperature() -> f64 {
    0.8
}

#[derive(Debug, Clone)]
pub enum EvalAction {
    Loss(LossSettings),
    Code(EvalKind, CodeEvalToml),
    Stories {
        teacher: String,
        settings: StoriesEvalToml,
    },
}

#[derive(Debug, Clone)]
pub struct EvalStep {
    pub name: String,
    pub kind: EvalKind,
    /// The training stage whose last checkpoint is judged.
    pub stage: String,
    pub action: EvalAction,
}

/// A validated whole-run recipe.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub path: PathBuf,
    pub name: String,
    pub seed: u64,
    /// The run directory every step writes under.
    pub out: PathBuf,
    pub teachers: BTreeMap<String, TeacherConfig>,
    /// In the file's order; [`Pipeline::order`] gives the execution order.
    pub data: Vec<DataStep>,
    /// The training part. Its stages' data naming a step hold the placeholder path
    /// `<step:NAME>` until the runner knows the step's directory ([`Pipeline::stage_refs`]).
    pub train: Recipe,
    /// Per stage, per data entry: the data step it reads (`None`: a path).
    pub stage_refs: Vec<Vec<Option<String>>>,
    pub evals: Vec<EvalStep>,
    /// The recipe as written (for the line of a key in errors).
    text: String,
    /// The recipe after `--set`, as TOML (written into the run directory).
    pub effective: String,
}

/// The default teacher's name: `[teacher]`.
pub const DEFAULT_TEACHER: &str = "default";

impl Pipeline {
    /// Whether `path` is a whole-run recipe (data or eval steps) rather than a training recipe.
    pub fn is_whole_run(path: &Path) -> Result<bool, RecipeError> {
        let text = read(path)?;
        let doc: toml::Table = toml::from_str(&text).map_err(|e| RecipeError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(["data", "eval", "teacher", "teachers", "out"]
            .iter()
            .any(|k| doc.contains_key(*k)))
    }

    pub fn load(
        path: &Path,
        sets: &[String],
        out: Option<&Path>,
    ) -> Result<Self, PipelineRecipeError> {
        let text = read(path)?;
        Self::parse(text, path, sets, out)
    }

    pub fn parse(
        text: String,
        path: &Path,
        sets: &[String],
        out: Option<&Path>,
    ) -> Result<Self, PipelineRecipeError> {
        let mut doc: toml::Table = toml::from_str(&text).map_err(|e| RecipeError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for s in sets {
            crate::train::recipe::apply_set(&mut doc, s)?;
        }
        let effective = toml::to_string(&doc).unwrap_or_default();
        let mut p = Parser {
            path: path.to_path_buf(),
            text: &text,
        };
        let out_key = doc.remove("out");
        let teacher = doc.remove("teacher");
        let teachers = doc.remove("teachers");
        let data = doc.remove("data");
        let evals = doc.remove("eval");
        let stage_refs = p.stage_refs(&mut doc)?;
        let train = Recipe::from_table(doc, path)?;
        let out = match (out, out_key) {
            (Some(o), _) => o.to_path_buf(),
            (None, Some(toml::Value::String(s))) => PathBuf::from(s),
            (None, Some(v)) => {
                return Err(p.invalid(
                    &[Key::Name("out")],
                    format!("must be a directory path (a string), found {v}"),
                ))
            }
            (None, None) => PathBuf::from("runs").join(&train.raw.name),
        };
        let teachers = p.teachers(teacher, teachers)?;
        let data = p.data_steps(data, &teachers, train.raw.seed)?;
        let stage_names: Vec<String> = train.stages.iter().map(|s| s.raw.name.clone()).collect();
        let evals = p.evals(evals, &stage_names, &teachers)?;
        let pipeline = Pipeline {
            path: path.to_path_buf(),
            name: train.raw.name.clone(),
            seed: train.raw.seed,
            out,
            teachers,
            data,
            train,
            stage_refs,
            evals,
            text: text.clone(),
            effective,
        };
        pipeline.check_references()?;
        Ok(pipeline)
    }

    pub fn step(&self, name: &str) -> Option<&DataStep> {
        self.data.iter().find(|s| s.name == name)
    }

    /// The stage a prefs step's `student` names (its index), if it names one.
    pub fn student_stage(&self, s: &DataStep) -> Option<usize> {
        let Action::Prefs { settings, .. } = &s.action else {
            return None;
        };
        let student = settings.student.as_deref()?;
        self.train
            .stages
            .iter()
            .position(|st| st.raw.name == student)
    }

    /// The data steps `s` must come after: those it reads (`from`), and for a prefs step whose
    /// student is a training stage, those that stage and the stages before it read.
    pub fn needs<'a>(&'a self, s: &'a DataStep) -> Vec<&'a str> {
        let mut needs: Vec<&str> = s.from.iter().map(String::as_str).collect();
        if let Some(stage) = self.student_stage(s) {
            needs.extend(
                self.stage_refs[..=stage]
                    .iter()
                    .flatten()
                    .flatten()
                    .map(String::as_str),
            );
        }
        needs
    }

    /// The data steps in an order where every step comes after those it needs ([`Pipeline::needs`];
    /// file order where free); [`Pipeline::parse`] has checked there is no cycle.
    pub fn order(&self) -> Vec<&DataStep> {
        let mut done: BTreeSet<&str> = BTreeSet::new();
        let mut order = Vec::new();
        while order.len() < self.data.len() {
            let next = self
                .data
                .iter()
                .find(|s| {
                    !done.contains(s.name.as_str())
                        && self.needs(s).iter().all(|f| done.contains(f))
                })
                .expect("checked acyclic");
            done.insert(&next.name);
            order.push(next);
        }
        order
    }

    fn invalid(&self, key: &[Key], message: String) -> PipelineRecipeError {
        Parser {
            path: self.path.clone(),
            text: &self.text,
        }
        .invalid(key, message)
    }

    /// Every name a step, stage or eval uses exists, is of the right kind, and the data steps
    /// have no cycle.
    fn check_references(&self) -> Result<(), PipelineRecipeError> {
        let names: Vec<&str> = self.data.iter().map(|s| s.name.as_str()).collect();
        let list = names.join(", ");
        // Data steps, the training step and evals share one namespace (plans, --until, --only).
        for (i, e) in self.evals.iter().enumerate() {
            if e.name == super::plan::TRAIN || names.contains(&e.name.as_str()) {
                return Err(self.invalid(
                    &[Key::Name("eval"), Key::Index(i), Key::Name("name")],
                    format!("`{}` is already the name of a data step or the training step; eval names must differ", e.name),
                ));
            }
        }
        if let Some(i) = names.iter().position(|n| *n == super::plan::TRAIN) {
            return Err(self.invalid(
                &[Key::Name("data"), Key::Index(i), Key::Name("name")],
                "`train` names the training step; pick another name".into(),
            ));
        }
        for (i, s) in self.data.iter().enumerate() {
            for (j, f) in s.from.iter().enumerate() {
                let key = [
                    Key::Name("data"),
                    Key::Index(i),
                    Key::Name("from"),
                    Key::Index(j),
                ];
                match self.step(f) {
                    None => {
                        return Err(self.invalid(
                            &key,
                            format!("names `{f}`, which is no data step of this recipe (they are: {list})"),
                        ))
                    }
                    Some(up) if up.kind == DataKind::Tokenize => {
                        return Err(self.invalid(
                            &key,
                            format!("names `{f}`, a tokenize step: its token shards are training input, not documents"),
                        ))
                    }
                    Some(up) if up.kind == DataKind::Prefs => {
                        return Err(self.invalid(
                            &key,
                            format!("names `{f}`, a prefs step: its pairs are read by a dpo stage (`data = [{{ step = \"{f}\" }}]`), not by data steps"),
                        ))
                    }
                    // A prefs step's prompts: a chat-data step's conversations, cut before their
                    // first answer.
                    Some(up) if s.kind == DataKind::Prefs && up.kind == DataKind::ChatData => {}
                    Some(up) if s.kind == DataKind::Prefs => {
                        return Err(self.invalid(
                            &key,
                            format!("names `{f}`, a {} step; a prefs step reads its prompts from a chat-data step", up.kind.name()),
                        ))
                    }
                    // Only a textbooks step reads `from` among the generating kinds.
                    Some(up) if s.generates() && up.kind != DataKind::Topics => {
                        return Err(self.invalid(
                            &key,
                            format!("names `{f}`, a {} step; a textbooks step reads the topic list of a `kind = \"topics\"` step", up.kind.name()),
                        ))
                    }
                    Some(up) if !s.generates() && up.kind == DataKind::Topics => {
                        return Err(self.invalid(
                            &key,
                            format!("names `{f}`, a topics step: its output is a topic list for a textbooks step (`from = [\"{f}\"]` there), not documents"),
                        ))
                    }
                    Some(_) => {}
                }
            }
            // A prefs step checked its own inputs when parsed.
            if !s.generates()
                && s.kind != DataKind::Prefs
                && s.from.is_empty()
                && s.paths.is_empty()
            {
                return Err(self.invalid(
                    &[Key::Name("data"), Key::Index(i)],
                    format!(
                        "step `{}` ({}) has no input: give `from = [\"STEP\", …]` and/or `paths = [\"DIR\", …]`",
                        s.name,
                        s.kind.name()
                    ),
                ));
            }
        }
        if let Some(cycle) = self.cycle() {
            let i = self
                .data
                .iter()
                .position(|s| s.name == cycle[0])
                .expect("a step");
            return Err(self.invalid(
                &[Key::Name("data"), Key::Index(i), Key::Name("from")],
                format!(
                    "makes a cycle: {}; a step cannot read its own output, even through others",
                    cycle.join(" → ")
                ),
            ));
        }
        for (i, refs) in self.stage_refs.iter().enumerate() {
            for (j, r) in refs.iter().enumerate() {
                let Some(name) = r else { continue };
                let key = [
                    Key::Name("stage"),
                    Key::Index(i),
                    Key::Name("data"),
                    Key::Index(j),
                    Key::Name("step"),
                ];
                let stage = &self.train.stages[i];
                let sft = matches!(stage.objective, crate::train::recipe::Objective::Sft { .. });
                match self.step(name) {
                    Some(s) if s.kind == DataKind::Tokenize => {}
                    // An SFT stage reads conversations: a chat-data step's records.
                    Some(s) if s.kind == DataKind::ChatData && sft => {}
                    Some(s) if s.kind == DataKind::ChatData => {
                        return Err(self.invalid(
                            &key,
                            format!("names `{name}`, a chat-data step: its conversations are read by a stage with objective = \"sft\"; set it, or name a tokenize step"),
                        ))
                    }
                    Some(s) if s.kind == DataKind::Prefs => {
                        if !matches!(stage.objective, crate::train::recipe::Objective::Dpo { .. }) {
                            return Err(self.invalid(
                                &key,
                                format!("names `{name}`, a prefs step, in stage `{}`, which is not a dpo stage; preference pairs train with objective = \"dpo\"", stage.raw.name),
                            ));
                        }
                        if let Some(student) = self.student_stage(s).filter(|&st| st >= i) {
                            return Err(self.invalid(
                                &key,
                                format!("names `{name}`, whose student is stage `{}`: stage `{}` cannot read pairs its own or a later stage's checkpoint makes; move it after `{}`", self.train.stages[student].raw.name, stage.raw.name, self.train.stages[student].raw.name),
                            ));
                        }
                    }
                    Some(s) => {
                        return Err(self.invalid(
                            &key,
                            format!("names `{name}`, a {} step; training reads token shards (a tokenize step), conversations (a chat-data step, in an sft stage) or DPO pairs (a prefs step, in a dpo stage)", s.kind.name()),
                        ))
                    }
                    None => {
                        return Err(self.invalid(
                            &key,
                            format!("names `{name}`, which is no data step of this recipe (they are: {list})"),
                        ))
                    }
                }
            }
        }
        for (i, e) in self.evals.iter().enumerate() {
            if let EvalAction::Loss(LossSettings { data: Some(d), .. }) = &e.action {
                if self.step(d).is_none_or(|s| s.kind != DataKind::Tokenize) {
                    return Err(self.invalid(
                        &[Key::Name("eval"), Key::Index(i), Key::Name("data")],
                        format!("names `{d}`, which is no tokenize step of this recipe"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A cycle among the data steps' `from`, as the names along it (first = last).
    fn cycle(&self) -> Option<Vec<String>> {
        // Depth-first search with the path kept: a step met again while on the path closes a cycle.
        fn visit<'a>(
            p: &'a Pipeline,
            s: &'a DataStep,
            path: &mut Vec<&'a str>,
            finished: &mut BTreeSet<&'a str>,
        ) -> Option<Vec<String>> {
            if let Some(start) = path.iter().position(|n| *n == s.name) {
                let mut cycle: Vec<String> = path[start..].iter().map(|n| n.to_string()).collect();
                cycle.push(s.name.clone());
                return Some(cycle);
            }
            if finished.contains(s.name.as_str()) {
                return None;
            }
            path.push(&s.name);
            for f in &s.from {
                if let Some(up) = p.step(f) {
                    if let Some(c) = visit(p, up, path, finished) {
                        return Some(c);
                    }
                }
            }
            path.pop();
            finished.insert(&s.name);
            None
        }
        let mut finished = BTreeSet::new();
        self.data
            .iter()
            .find_map(|s| visit(self, s, &mut Vec::new(), &mut finished))
    }
}

fn read(path: &Path) -> Result<String, RecipeError> {
    std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// One part of a dotted key: a table key or an array index.
#[derive(Debug, Clone, Copy)]
enum Key<'a> {
    Name(&'a str),
    Index(usize),
}

fn dotted(key: &[Key]) -> String {
    key.iter()
        .map(|k| match k {
            Key::Name(n) => n.to_string(),
            Key::Index(i) => i.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The 1-based line where `key` is written in `text`, if it is (keys from `--set` are not).
fn line_of(text: &str, key: &[Key]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut span = root.span();
    let mut value = DeValue::Table(root.into_inner());
    for k in key {
        let next = match (k, value) {
            (Key::Name(n), DeValue::Table(t)) => t
                .into_iter()
                .find(|(name, _)| name.get_ref() == n)
                .map(|(name, v)| {
                    span = name.span();
                    v.into_inner()
                }),
            (Key::Index(i), DeValue::Array(a)) => a.into_iter().nth(*i).map(|v| {
                span = v.span();
                v.into_inner()
            }),
            _ => None,
        };
        value = next?;
    }
    Some(text[..span.start.min(text.len())].matches('\n').count() + 1)
}

/// Parsing state: the file, for errors.
struct Parser<'t> {
    path: PathBuf,
    text: &'t str,
}

impl Parser<'_> {
    fn invalid(&self, key: &[Key], message: String) -> PipelineRecipeError {
        PipelineRecipeError::Invalid {
            at: At {
                path: self.path.clone(),
                line: line_of(self.text, key),
            },
            key: dotted(key),
            message,
        }
    }

    /// `T` from `value`, an unknown or mistyped key reported at `key` with the keys allowed.
    fn typed<T: DeserializeOwned>(
        &self,
        value: toml::Value,
        key: &[Key],
        also: &str,
    ) -> Result<T, PipelineRecipeError> {
        value.try_into::<T>().map_err(|e| {
            let message = e.message().trim().to_string();
            // Point at the unknown key itself when there is one.
            let unknown = message
                .strip_prefix("unknown field `")
                .and_then(|m| m.split('`').next())
                .map(str::to_string);
            let mut path = key.to_vec();
            if let Some(u) = &unknown {
                path.push(Key::Name(u));
            }
            let line = line_of(self.text, &path).or_else(|| line_of(self.text, key));
            PipelineRecipeError::Invalid {
                at: At {
                    path: self.path.clone(),
                    line,
                },
                key: dotted(&path),
                message: if also.is_empty() {
                    message
                } else {
                    format!("{message} (besides {also})")
                },
            }
        })
    }

    /// Replaces `{ step = "NAME" }` in the stages' data by a placeholder path, returning the names.
    fn stage_refs(
        &mut self,
        doc: &mut toml::Table,
    ) -> Result<Vec<Vec<Option<String>>>, PipelineRecipeError> {
        let mut refs = Vec::new();
        let Some(toml::Value::Array(stages)) = doc.get_mut("stage") else {
            return Ok(refs);
        };
        for (i, stage) in stages.iter_mut().enumerate() {
            let mut these = Vec::new();
            if let Some(toml::Value::Array(data)) = stage.get_mut("data") {
                for (j, d) in data.iter_mut().enumerate() {
                    let Some(t) = d.as_table_mut() else {
                        these.push(None);
                        continue;
                    };
                    let key = [
                        Key::Name("stage"),
                        Key::Index(i),
                        Key::Name("data"),
                        Key::Index(j),
                    ];
                    match (t.remove("step"), t.contains_key("path")) {
                        (Some(toml::Value::String(s)), false) => {
                            t.insert("path".into(), toml::Value::String(placeholder(&s)));
                            these.push(Some(s));
                        }
                        (Some(_), true) => {
                            return Err(self.invalid(
                                &key,
                                "gives both `step` and `path`: name a tokenize step or a token directory, not both".into(),
                            ))
                        }
                        (Some(v), false) => {
                            return Err(self.invalid(
                                &key,
                                format!("`step` must be a step name (a string), found {v}"),
                            ))
                        }
                        (None, _) => these.push(None),
                    }
                }
            }
            refs.push(these);
        }
        Ok(refs)
    }

    fn teachers(
        &self,
        default: Option<toml::Value>,
        named: Option<toml::Value>,
    ) -> Result<BTreeMap<String, TeacherConfig>, PipelineRecipeError> {
        let mut out = BTreeMap::new();
        let check =
            |cfg: TeacherConfig, key: &[Key]| -> Result<TeacherConfig, PipelineRecipeError> {
                cfg.validate()
                    .map_err(|e| self.invalid(key, e.to_string()))?;
                Ok(cfg)
            };
        let default = match default {
            Some(v) => self.typed::<TeacherConfig>(v, &[Key::Name("teacher")], "")?,
            None => TeacherConfig::default(),
        };
        out.insert(
            DEFAULT_TEACHER.to_string(),
            check(default, &[Key::Name("teacher")])?,
        );
        if let Some(named) = named {
            let toml::Value::Table(t) = named else {
                return Err(self.invalid(
                    &[Key::Name("teachers")],
                    "must be tables: [teachers.NAME]".into(),
                ));
            };
            for (name, v) in t {
                let key = [Key::Name("teachers"), Key::Name(&name)];
                if name == DEFAULT_TEACHER {
                    return Err(self.invalid(
                        &key,
                        "`default` is the [teacher] table's name; pick another".into(),
                    ));
                }
                let cfg = self.typed::<TeacherConfig>(v, &key, "")?;
                out.insert(name.clone(), check(cfg, &key)?);
            }
        }
        Ok(out)
    }

    fn data_steps(
        &self,
        data: Option<toml::Value>,
        teachers: &BTreeMap<String, TeacherConfig>,
        recipe_seed: u64,
    ) -> Result<Vec<DataStep>, PipelineRecipeError> {
        let Some(data) = data else {
            return Ok(Vec::new());
        };
        let toml::Value::Array(items) = data else {
            return Err(self.invalid(
                &[Key::Name("data")],
                "must be an array of tables: [[data]]".into(),
            ));
        };
        let mut steps: Vec<DataStep> = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let key = [Key::Name("data"), Key::Index(i)];
            let toml::Value::Table(mut t) = item else {
                return Err(self.invalid(&key, "must be a table: [[data]]".into()));
            };
            let name = self.name(&mut t, &key, "textbooks")?;
            if steps.iter().any(|s| s.name == name) {
                return Err(self.invalid(
                    &[key[0], key[1], Key::Name("name")],
                    format!("`{name}` names two data steps; step names must be unique"),
                ));
            }
            let kind: DataKind = match t.remove("kind") {
                Some(v) => self.typed(v, &[key[0], key[1], Key::Name("kind")], "")?,
                None => {
                    return Err(self.invalid(
                        &key,
                        "needs `kind`: stories, textbooks, exercises, topics, chat-data, filter, dedup, decontaminate, tokenize or prefs".into(),
                    ))
                }
            };
            let strings = |t: &mut toml::Table,
                           k: &'static str|
             -> Result<Vec<String>, PipelineRecipeError> {
                match t.remove(k) {
                    None => Ok(Vec::new()),
                    Some(v) => self.typed(v, &[key[0], key[1], Key::Name(k)], ""),
                }
            };
            let (from, paths) = if kind == DataKind::Textbooks && t.contains_key("from") {
                // The topics come from a topics step: its list is resolved once the run is
                // planned (TextbooksSettings::topics stays empty until then).
                let from = strings(&mut t, "from")?;
                let at = |k| [key[0], key[1], Key::Name(k)];
                if from.len() != 1 {
                    return Err(self.invalid(
                        &at("from"),
                        format!("names {} steps; a textbooks step reads the list of one `kind = \"topics\"` step", from.len()),
                    ));
                }
                if t.contains_key("topics") {
                    return Err(self.invalid(
                        &at("topics"),
                        "and `from` both name the topics: keep one (`from` reads a topics step's list)".into(),
                    ));
                }
                t.insert("topics".into(), toml::Value::String(String::new()));
                (from, Vec::new())
            } else if kind.generates()
                || (kind == DataKind::ChatData
                    && !t.contains_key("from")
                    && !t.contains_key("paths"))
            {
                (Vec::new(), Vec::new())
            } else {
                let from = strings(&mut t, "from")?;
                let paths = strings(&mut t, "paths")?
                    .into_iter()
                    .map(PathBuf::from)
                    .collect();
                (from, paths)
            };
            let rest = toml::Value::Table(t);
            let action = match kind {
                DataKind::Stories
                | DataKind::Textbooks
                | DataKind::Exercises
                | DataKind::Topics => self.generate(kind, rest, &key, teachers, recipe_seed)?,
                // Without inputs the teacher writes the conversations.
                DataKind::ChatData if from.is_empty() && paths.is_empty() => {
                    self.generate(kind, rest, &key, teachers, recipe_seed)?
                }
                DataKind::ChatData => {
                    Action::ChatImport(self.typed(rest, &key, "name, kind, from, paths")?)
                }
                DataKind::Dedup => {
                    Action::Dedup(self.typed(rest, &key, "name, kind, from, paths")?)
                }
                DataKind::Decontaminate => {
                    let s: DecontaminateSettings =
                        self.typed(rest, &key, "name, kind, from, paths")?;
                    if s.benchmarks.is_empty() {
                        return Err(self.invalid(
                            &[key[0], key[1], Key::Name("benchmarks")],
                            "is empty: give HumanEval.jsonl.gz and/or MBPP jsonl files".into(),
                        ));
                    }
                    Action::Decontaminate(s)
                }
                DataKind::Tokenize => {
                    let s: TokenizeSettings = self.typed(rest, &key, "name, kind, from, paths")?;
                    if !(0.0..1.0).contains(&s.val_fraction) {
                        return Err(self.invalid(
                            &[key[0], key[1], Key::Name("val_fraction")],
                            format!("must be in [0, 1), found {}", s.val_fraction),
                        ));
                    }
                    Action::Tokenize(s)
                }
                DataKind::Filter => self.filter(rest, &key, teachers)?,
                DataKind::Prefs => {
                    self.prefs(rest, &key, teachers, (&from, &paths), recipe_seed)?
                }
            };
            steps.push(DataStep {
                name,
                kind,
                from,
                paths,
                action,
            });
        }
        Ok(steps)
    }

    /// A prefs step: make pairs (`student`, and `prompts` or `from` one chat-data step) or import
    /// them (`paths`), not both.
    fn prefs(
        &self,
        rest: toml::Value,
        key: &[Key],
        teachers: &BTreeMap<String, TeacherConfig>,
        (from, paths): (&[String], &[PathBuf]),
        recipe_seed: u64,
    ) -> Result<Action, PipelineRecipeError> {
        let toml::Value::Table(mut t) = rest else {
            unreachable!("a table")
        };
        let at = |k: &'static str| {
            let mut p = key.to_vec();
            p.push(Key::Name(k));
            p
        };
        let teacher = match t.remove("teacher") {
            Some(v) => Some(self.typed::<String>(v, &at("teacher"), "")?),
            None => None,
        };
        let teacher = self.teacher_name(teacher, &at("teacher"), teachers)?;
        let mut settings: PrefsSettings =
            self.typed(toml::Value::Table(t), key, "name, kind, paths, teacher")?;
        settings.seed.get_or_insert(recipe_seed);
        if settings.prompts.is_some() && !from.is_empty() {
            return Err(self.invalid(
                &at("from"),
                "and `prompts` both name the prompts: keep one (`from` reads a chat-data step's conversations)".into(),
            ));
        }
        if from.len() > 1 {
            return Err(self.invalid(
                &at("from"),
                format!(
                    "names {} steps; a prefs step reads the prompts of one chat-data step",
                    from.len()
                ),
            ));
        }
        let prompts = settings.prompts.is_some() || !from.is_empty();
        match (&settings.student, prompts, paths.is_empty()) {
            (Some(_), true, true) | (None, false, false) => {}
            (_, _, false) => {
                return Err(self.invalid(
                    &at("paths"),
                    "imports pairs; `student` and `prompts` (or `from`) make them: give one or the other".into(),
                ))
            }
            _ => {
                return Err(self.invalid(
                    key,
                    "needs `student` (a training stage or a checkpoint) and `prompts` (or `from = [\"CHAT-DATA STEP\"]`) to make pairs, or `paths` to import them".into(),
                ))
            }
        }
        if settings.samples < 2 {
            return Err(self.invalid(
                &at("samples"),
                format!(
                    "must be at least 2 (a pair compares two responses), found {}",
                    settings.samples
                ),
            ));
        }
        if settings.max_attempts == 0 || settings.max_attempts > 1000 {
            return Err(self.invalid(
                &at("max_attempts"),
                format!("must be in [1, 1000], found {}", settings.max_attempts),
            ));
        }
        Ok(Action::Prefs { teacher, settings })
    }

    /// `name`, checked to be one plain path component.
    fn name(
        &self,
        t: &mut toml::Table,
        key: &[Key],
        example: &str,
    ) -> Result<String, PipelineRecipeError> {
        let mut k = key.to_vec();
        k.push(Key::Name("name"));
        let name: String = match t.remove("name") {
            Some(v) => self.typed(v, &k, "")?,
            None => {
                return Err(self.invalid(key, format!("needs `name`, e.g. name = \"{example}\"")))
            }
        };
        crate::train::recipe::plain_name(&name).map_err(|why| {
            self.invalid(
                &k,
                format!("`{name}` {why}: it names the step's directory in the run directory"),
            )
        })?;
        Ok(name)
    }

    fn generate(
        &self,
        kind: DataKind,
        rest: toml::Value,
        key: &[Key],
        teachers: &BTreeMap<String, TeacherConfig>,
        recipe_seed: u64,
    ) -> Result<Action, PipelineRecipeError> {
        let toml::Value::Table(mut t) = rest else {
            unreachable!("a table")
        };
        let mut common = toml::Table::new();
        for k in [
            "n",
            "tokens",
            "seed",
            "max_attempts",
            "shard_size",
            "teacher",
        ] {
            if let Some(v) = t.remove(k) {
                common.insert(k.into(), v);
            }
        }
        let c: GenerateCommon = self.typed(toml::Value::Table(common), key, "")?;
        let at = |k: &'static str| {
            let mut p = key.to_vec();
            p.push(Key::Name(k));
            p
        };
        let target = match (c.n, c.tokens) {
            (Some(n), None) if (1..=100_000_000).contains(&n) => Target::Records(n),
            (Some(n), None) => {
                return Err(self.invalid(&at("n"), format!("must be in [1, 100000000], found {n}")))
            }
            (None, Some(TokenCount(t))) if t > 0 => Target::Tokens(t),
            (None, Some(_)) => return Err(self.invalid(&at("tokens"), "must be at least 1".into())),
            _ => {
                return Err(self.invalid(
                    key,
                    "give exactly one of `n` (records) or `tokens` (e.g. \"5M\")".into(),
                ))
            }
        };
        if c.max_attempts == 0 || c.max_attempts > 1000 {
            return Err(self.invalid(
                &at("max_attempts"),
                format!("must be in [1, 1000], found {}", c.max_attempts),
            ));
        }
        if c.shard_size == 0 {
            return Err(self.invalid(&at("shard_size"), "must be at least 1".into()));
        }
        let teacher = self.teacher_name(c.teacher, &at("teacher"), teachers)?;
        let also = "name, kind, n, tokens, seed, max_attempts, shard_size, teacher";
        let settings = toml::Value::Table(t);
        let corpus = match kind {
            DataKind::Stories => {
                CorpusSettings::Stories(self.typed::<StoriesSettings>(settings, key, also)?)
            }
            DataKind::Textbooks => {
                CorpusSettings::Textbooks(self.typed::<TextbooksSettings>(settings, key, also)?)
            }
            DataKind::Exercises => {
                CorpusSettings::Exercises(self.typed::<ExercisesSettings>(settings, key, also)?)
            }
            DataKind::Topics => {
                if let Target::Tokens(_) = target {
                    return Err(self.invalid(
                        &at("tokens"),
                        "a topics step makes a list of `n` topics: give `n`, not `tokens`".into(),
                    ));
                }
                CorpusSettings::Topics(self.typed::<TopicsSettings>(settings, key, also)?)
            }
            DataKind::ChatData => CorpusSettings::Chat(self.typed(settings, key, also)?),
            _ => unreachable!("a generating kind"),
        };
        Ok(Action::Generate {
            target,
            seed: c.seed.unwrap_or(recipe_seed),
            max_attempts: c.max_attempts,
            shard_size: c.shard_size,
            teacher,
            corpus,
        })
    }

    /// The teacher named `name` (default: `[teacher]`), which must exist.
    fn teacher_name(
        &self,
        name: Option<String>,
        key: &[Key],
        teachers: &BTreeMap<String, TeacherConfig>,
    ) -> Result<String, PipelineRecipeError> {
        let name = name.unwrap_or_else(|| DEFAULT_TEACHER.into());
        if teachers.contains_key(&name) {
            return Ok(name);
        }
        let names: Vec<&str> = teachers.keys().map(String::as_str).collect();
        Err(self.invalid(
            key,
            format!(
                "names `{name}`, which is no teacher of this recipe (they are: {}; add [teachers.{name}])",
                names.join(", ")
            ),
        ))
    }

    /// An optional `teacher = "NAME"` key of `t`, resolved.
    fn take_teacher(
        &self,
        t: &mut toml::Table,
        key: &[Key],
        teachers: &BTreeMap<String, TeacherConfig>,
    ) -> Result<String, PipelineRecipeError> {
        let mut k = key.to_vec();
        k.push(Key::Name("teacher"));
        let name = match t.remove("teacher") {
            Some(v) => Some(self.typed::<String>(v, &k, "")?),
            None => None,
        };
        self.teacher_name(name, &k, teachers)
    }

    fn filter(
        &self,
        rest: toml::Value,
        key: &[Key],
        teachers: &BTreeMap<String, TeacherConfig>,
    ) -> Result<Action, PipelineRecipeError> {
        let toml::Value::Table(mut t) = rest else {
            unreachable!("a table")
        };
        let teacher = self.take_teacher(&mut t, key, teachers)?;
        let mut group = |keys: &[&str]| -> toml::Value {
            let mut g = toml::Table::new();
            for k in keys {
                if let Some(v) = t.remove(*k) {
                    g.insert(k.to_string(), v);
                }
            }
            toml::Value::Table(g)
        };
        let sample = group(&SAMPLE_KEYS);
        let model = group(&MODEL_KEYS);
        let mut settings: toml::Table = t;
        settings.insert("sample".into(), sample);
        settings.insert("model".into(), model);
        let settings: FilterSettings = self.typed(
            toml::Value::Table(settings),
            key,
            "name, kind, from, paths, teacher",
        )?;
        if settings.sample.sample == 0 {
            return Err(self.invalid(
                &[key[0], key[1], Key::Name("sample")],
                "must be at least 1: the teacher rates that many files to train the classifier on"
                    .into(),
            ));
        }
        Ok(Action::Filter { teacher, settings })
    }

    fn evals(
        &self,
        evals: Option<toml::Value>,
        stages: &[String],
        teachers: &BTreeMap<String, TeacherConfig>,
    ) -> Result<Vec<EvalStep>, PipelineRecipeError> {
        let Some(evals) = evals else {
            return Ok(Vec::new());
        };
        let toml::Value::Array(items) = evals else {
            return Err(self.invalid(
                &[Key::Name("eval")],
                "must be an array of tables: [[eval]]".into(),
            ));
        };
        let mut out: Vec<EvalStep> = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let key = [Key::Name("eval"), Key::Index(i)];
            let toml::Value::Table(mut t) = item else {
                return Err(self.invalid(&key, "must be a table: [[eval]]".into()));
            };
            let name = self.name(&mut t, &key, "humaneval")?;
            if out.iter().any(|e| e.name == name) {
                return Err(self.invalid(
                    &[key[0], key[1], Key::Name("name")],
                    format!("`{name}` names two evals; eval names must be unique"),
                ));
            }
            let kind: EvalKind = match t.remove("kind") {
                Some(v) => self.typed(v, &[key[0], key[1], Key::Name("kind")], "")?,
                None => {
                    return Err(self.invalid(&key, "needs `kind`: loss, humaneval or mbpp".into()))
                }
            };
            let stage = match t.remove("stage") {
                Some(v) => self.typed::<String>(v, &[key[0], key[1], Key::Name("stage")], "")?,
                None => stages.last().cloned().unwrap_or_default(),
            };
            if !stages.contains(&stage) {
                return Err(self.invalid(
                    &[key[0], key[1], Key::Name("stage")],
                    format!(
                        "names `{stage}`, which is no [[stage]] of this recipe (they are: {})",
                        stages.join(", ")
                    ),
                ));
            }
            let teacher = match kind {
                EvalKind::Stories => Some(self.take_teacher(&mut t, &key, teachers)?),
                _ => None,
            };
            let rest = toml::Value::Table(t);
            let action = match kind {
                EvalKind::Loss => EvalAction::Loss(self.typed(rest, &key, "name, kind, stage")?),
                EvalKind::Stories => EvalAction::Stories {
                    teacher: teacher.expect("taken above"),
                    settings: self.typed(rest, &key, "name, kind, stage, teacher")?,
                },
                EvalKind::Humaneval | EvalKind::Mbpp => {
                    let c: CodeEvalToml = self.typed(rest, &key, "name, kind, stage")?;
                    if c.k.contains(&0) {
                        return Err(self.invalid(
                            &[key[0], key[1], Key::Name("k")],
                            format!("each k must be at least 1, found {:?} (pass@k is reported for the k up to samples_per_task)", c.k),
                        ));
                    }
                    EvalAction::Code(kind, c)
                }
            };
            out.push(EvalStep {
                name,
                kind,
                stage,
                action,
            });
        }
        Ok(out)
    }
}

/// The path a stage's data holds until the step's directory is known.
pub fn placeholder(step: &str) -> String {
    format!("<step:{step}>")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = r#"name = "t"

[teacher]
model = "mock"

[[data]]
name = "stories"
kind = "stories"
n = 10

[[data]]
name = "clean"
kind = "dedup"
from = ["stories"]

[[data]]
name = "tok"
kind = "tokenize"
from = ["clean"]

[model]
preset = "tiny-phi"
vocab_size = 50304

[[stage]]
name = "pretrain"
data = [{ step = "tok" }]
seq_len = 32
micro_batch = 2
steps = 4
lr = 1e-3

[[eval]]
name = "loss"
kind = "loss"
"#;

    fn parse(text: &str, sets: &[&str]) -> Result<Pipeline, String> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Pipeline::parse(text.to_string(), Path::new("r.toml"), &sets, None)
            .map_err(|e| e.to_string())
    }

    /// A well-formed recipe resolves: steps in dependency order, the stage's data naming the
    /// tokenize step, the default run directory, defaults filled in.
    #[test]
    fn a_whole_run_recipe_resolves() {
        let p = parse(RECIPE, &[]).unwrap();
        let order: Vec<&str> = p.order().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["stories", "clean", "tok"]);
        assert_eq!(p.stage_refs, vec![vec![Some("tok".to_string())]]);
        assert_eq!(
            p.train.stages[0].data[0].0,
            PathBuf::from(placeholder("tok"))
        );
        assert_eq!(p.out, PathBuf::from("runs/t"));
        assert_eq!(p.teachers[DEFAULT_TEACHER].model, "mock");
        match &p.data[0].action {
            Action::Generate {
                target,
                seed,
                max_attempts,
                teacher,
                ..
            } => {
                assert_eq!((*target, *seed, *max_attempts), (Target::Records(10), 0, 3));
                assert_eq!(teacher, DEFAULT_TEACHER);
            }
            other => panic!("{other:?}"),
        }
        // Steps listed out of order still run in dependency order.
        let shuffled = RECIPE.replacen(
            "[[data]]\nname = \"stories\"\nkind = \"stories\"\nn = 10\n\n",
            "",
            1,
        ) + "\n[[data]]\nname = \"stories\"\nkind = \"stories\"\nn = 10\n";
        let p = parse(&shuffled, &[]).unwrap();
        let order: Vec<&str> = p.order().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["stories", "clean", "tok"]);
    }

    /// Each mistake names the file, the dotted key and the line it is on (counted by hand in
    /// RECIPE above), or the key `--set` gave.
    #[test]
    fn mistakes_name_the_file_key_and_line() {
        let cases: [(String, &[&str], &str); 9] = [
            (
                RECIPE.replace("n = 10", "n = 10\ntopicz = 3"),
                &[],
                "r.toml:10: `data.0.topicz` unknown field `topicz`",
            ),
            (
                RECIPE.replace("from = [\"clean\"]", "from = [\"cleaned\"]"),
                &[],
                "r.toml:19: `data.2.from.0` names `cleaned`, which is no data step",
            ),
            (
                RECIPE.replace("from = [\"stories\"]", "from = [\"clean\"]"),
                &[],
                "r.toml:14: `data.1.from` makes a cycle: clean → clean",
            ),
            (
                RECIPE.replace("{ step = \"tok\" }", "{ step = \"clean\" }"),
                &[],
                "r.toml:27: `stage.0.data.0.step` names `clean`, a dedup step",
            ),
            (
                RECIPE.replace("kind = \"dedup\"", "kind = \"dedupe\""),
                &[],
                "r.toml:13: `data.1.kind`",
            ),
            (
                RECIPE.replace("n = 10", "tokens = \"lots\""),
                &[],
                "is not a token count",
            ),
            (
                RECIPE.to_string(),
                &["data.0.n=0"],
                "`data.0.n` must be in [1, 100000000], found 0",
            ),
            (
                RECIPE.replace("name = \"clean\"", "name = \"stories\""),
                &[],
                "`data.1.name` `stories` names two data steps",
            ),
            (
                RECIPE.replace("kind = \"loss\"", "kind = \"loss\"\nstage = \"finetune\""),
                &[],
                "`eval.0.stage` names `finetune`, which is no [[stage]]",
            ),
        ];
        for (text, sets, expected) in cases {
            let err = parse(&text, sets).expect_err(expected);
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
    }

    /// Issue 30: a `kind = "topics"` step, and a textbooks step that reads its list with `from`
    /// (run after it); a textbooks step may read only a topics step, the document steps may not
    /// read one, and a topics step takes `n`.
    #[test]
    fn a_textbooks_step_reads_a_topics_step_with_from() {
        let topics =
            "[[data]]\nname = \"topics\"\nkind = \"topics\"\nn = 50\nseeds = \"s.txt\"\n\n";
        let books = "[[data]]\nname = \"books\"\nkind = \"textbooks\"\nn = 5\nfrom = [\"topics\"]\nstyle = \"prose\"\n\n";
        let text = RECIPE.replace(
            "[[data]]\nname = \"stories\"",
            &format!("{books}{topics}[[data]]\nname = \"stories\""),
        );
        let p = parse(&text, &[]).unwrap();
        let order: Vec<&str> = p.order().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["topics", "books", "stories", "clean", "tok"]);
        let books_step = p.step("books").unwrap();
        assert_eq!(books_step.from, ["topics"]);
        let Action::Generate { corpus, .. } = &books_step.action else {
            panic!("a generate step")
        };
        let dir = Path::new("run/data/topics-12345678");
        let CorpusSettings::Textbooks(t) =
            super::super::plan::with_upstream_topics(corpus, Some(dir))
        else {
            panic!("textbooks")
        };
        assert_eq!(t.topics, dir.join("topics.txt"));
        let topics_step = p.step("topics").unwrap();
        assert_eq!(topics_step.kind, DataKind::Topics);
        let wrong = [
            (
                text.replace("from = [\"topics\"]", "from = [\"stories\"]"),
                "a stories step; a textbooks step reads the topic list",
            ),
            (
                text.replace(
                    "from = [\"topics\"]",
                    "from = [\"topics\"]\ntopics = \"t.txt\"",
                ),
                "and `from` both name the topics",
            ),
            (
                text.replace("from = [\"stories\"]", "from = [\"topics\"]"),
                "a topics step: its output is a topic list",
            ),
            (
                text.replace("n = 50", "tokens = \"5M\""),
                "give `n`, not `tokens`",
            ),
        ];
        for (t, want) in wrong {
            let e = parse(&t, &[]).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn token_counts_take_suffixes() {
        assert_eq!(parse_count("5M"), Some(5_000_000));
        assert_eq!(parse_count("1.5B"), Some(1_500_000_000));
        assert_eq!(parse_count("500_000"), Some(500_000));
        assert_eq!(parse_count("2k"), Some(2_000));
        assert_eq!(parse_count("lots"), None);
        assert_eq!(parse_count("-1M"), None);
    }

    /// Every recipe in recipes/ parses as a whole run or a training recipe; phi-1's carry the
    /// paper's numbers (phi-1 model card and "Textbooks Are All You Need" §2: batch 1024 × 2048
    /// tokens, lr 1e-3, warmup 750, wd 0.1, 36k steps; finetune batch 256, lr 1e-4, warmup 50, wd
    /// 0.01, 6k steps; dropout 0.1).
    #[test]
    fn shipped_recipes_parse_with_the_papers_settings() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("recipes");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if Pipeline::is_whole_run(&path).unwrap() {
                Pipeline::load(&path, &[], None).unwrap_or_else(|e| panic!("{e}"));
            } else {
                Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            }
            seen += 1;
        }
        assert!(seen >= 6, "{seen} recipes");
        for name in ["phi-1.toml", "phi-1-small.toml"] {
            let r = Pipeline::load(&dir.join(name), &[], None).unwrap().train;
            let (pre, ft) = (&r.stages[0], &r.stages[1]);
            assert_eq!(pre.tokens_per_step(), 1024 * 2048);
            assert_eq!(
                (pre.steps, pre.raw.warmup, pre.raw.lr, pre.raw.weight_decay),
                (36_000, 750, 1e-3, 0.1)
            );
            assert_eq!(ft.tokens_per_step(), 256 * 2048);
            assert_eq!(
                (ft.steps, ft.raw.warmup, ft.raw.lr, ft.raw.weight_decay),
                (6_000, 50, 1e-4, 0.01)
            );
            assert_eq!(
                (pre.raw.dropout, ft.init.clone()),
                (0.1, crate::train::recipe::Init::Previous)
            );
        }
        let r = Pipeline::load(&dir.join("phi-1.5.toml"), &[], None)
            .unwrap()
            .train;
        // 150B tokens at 2048 × 2048 per step.
        assert_eq!(
            r.stages[0].steps,
            150_000_000_000u64.div_ceil(2048 * 2048) as usize
        );
    }

    /// A prefs step whose student is a stage comes after the data that stage reads, however the
    /// file lists it; a dpo stage after the student reads it. Refused, each with the key and why:
    /// a stage reading pairs of its own (or a later) checkpoint, a non-dpo stage reading pairs, a
    /// data step reading pairs, both or neither of import and sampling, one sample.
    #[test]
    fn a_prefs_step_runs_between_its_student_and_the_dpo_stage() {
        let text = RECIPE
            .replace(
                "[[data]]\nname = \"stories\"",
                "[[data]]\nname = \"prefs\"\nkind = \"prefs\"\nstudent = \"pretrain\"\nprompts = \"p.txt\"\n\n[[data]]\nname = \"stories\"",
            )
            .replace(
                "[[eval]]",
                "[[stage]]\nname = \"dpo\"\nobjective = \"dpo\"\ninit = \"previous\"\nchat_template = \"phi-3\"\ndata = [{ step = \"prefs\" }]\nseq_len = 32\nmicro_batch = 2\nsteps = 2\nlr = 1e-4\n\n[[eval]]",
            );
        let p = parse(&text, &[]).unwrap();
        let order: Vec<&str> = p.order().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["stories", "clean", "tok", "prefs"]);
        assert_eq!(p.student_stage(p.step("prefs").unwrap()), Some(0));
        assert_eq!(p.needs(p.step("prefs").unwrap()), ["tok"]);
        assert_eq!(p.stage_refs[1], [Some("prefs".to_string())]);
        let wrong = [
            (
                text.replace("student = \"pretrain\"", "student = \"dpo\""),
                "cannot read pairs its own or a later stage's checkpoint makes",
            ),
            (
                text.replace("objective = \"dpo\"\n", "objective = \"sft\"\n"),
                "which is not a dpo stage",
            ),
            (
                text.replace("from = [\"clean\"]", "from = [\"prefs\"]"),
                "a prefs step: its pairs are read by a dpo stage",
            ),
            (
                text.replace(
                    "prompts = \"p.txt\"",
                    "prompts = \"p.txt\"\npaths = [\"x.jsonl\"]",
                ),
                "give one or the other",
            ),
            (text.replace("prompts = \"p.txt\"\n", ""), "needs `student`"),
            (
                text.replace("prompts = \"p.txt\"", "prompts = \"p.txt\"\nsamples = 1"),
                "must be at least 2",
            ),
            // Prompts from a step: one chat-data step, in place of `prompts`.
            (
                text.replace(
                    "prompts = \"p.txt\"",
                    "prompts = \"p.txt\"\nfrom = [\"stories\"]",
                ),
                "both name the prompts",
            ),
            (
                text.replace("prompts = \"p.txt\"", "from = [\"stories\"]"),
                "reads its prompts from a chat-data step",
            ),
        ];
        for (t, want) in wrong {
            let e = parse(&t, &[]).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        // Import: `paths` alone, no student.
        let import = text.replace(
            "student = \"pretrain\"\nprompts = \"p.txt\"",
            "paths = [\"pairs.jsonl\"]",
        );
        let p = parse(&import, &[]).unwrap();
        assert_eq!(p.student_stage(p.step("prefs").unwrap()), None);
        assert_eq!(p.step("prefs").unwrap().action.teacher(), None);
    }
}

//! The plan of a recipe run: every step (data steps, training, evals) with its id, directory,
//! status and estimates (records, tokens, teacher cost, FLOPs, memory, disk), computed before
//! anything runs and without sending anything.
//!
//! Estimates come from the recipe (requested records × the corpus's typical answer length and
//! the price table) and, once a step has a pilot (an earlier, partial run), from what that run
//! measured: tokens per answer and cost per kept record (a filter step: cost per rated file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Serialize;
use serde_json::{json, Value};

use super::manifest::{fingerprint, Identity, Status, StepManifest};
use super::recipe::{Action, DataKind, DataStep, EvalAction, EvalStep, Pipeline, Target};
use super::PipelineError;
use crate::generate::engine::{DryRun, GenerateOptions};
use crate::generate::run::{CorpusSettings, SandboxSettings, TextbooksSettings};
use crate::teacher::factory::{Backend, ResolvedTeacher, TeacherConfig};

/// A source repeated more often than this in training gets a warning (phi-1 saw its data ~8
/// times, but beyond ~4 epochs a repeated token is worth much less: Muennighoff et al. 2023).
pub const MAX_EPOCHS: f64 = 4.0;

/// The model-FLOPs utilisation the time estimate assumes (llm.c reaches 45–50% on an H100;
/// phigen's CUDA path is unmeasured).
pub const ASSUMED_MFU: f64 = 0.4;

/// Which part of the recipe a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Node {
    Data(usize),
    Train,
    Eval(usize),
}

/// The step that trains: its name in plans, `--until` and `--only`.
pub const TRAIN: &str = "train";

#[derive(Debug, Clone, Default, Serialize)]
pub struct Estimate {
    /// Records a generate step asks for (from `n`, or from `tokens` and the tokens per record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    /// Records (documents) the step's output holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
    /// Tokens its output holds (generate: completion tokens kept; training: tokens seen).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Teacher spend still to come, USD (`None`: the price is unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Where the per-record numbers come from: `recipe` or `pilot`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basis: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flops: Option<f64>,
    /// Peak bytes of one training step, the largest over the stages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Training: how each stage runs on the planned device.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageFit>,
}

/// A training stage's batch split and recompute setting on the planned device, and its memory.
#[derive(Debug, Clone, Serialize)]
pub struct StageFit {
    pub stage: String,
    pub micro_batch: usize,
    pub grad_accum: usize,
    /// `micro_batch = "auto"`: chosen for the device's memory (1 when it is unknown).
    pub auto: bool,
    /// `checkpoint = "blocks"`.
    pub recompute: bool,
    pub memory_bytes: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedStep {
    pub name: String,
    /// `textbooks`, `dedup`, …, `train`, `eval:humaneval`.
    pub kind: String,
    pub node: Node,
    #[serde(skip)]
    pub identity: Identity,
    pub id: String,
    pub dir: PathBuf,
    pub status: Status,
    /// Steps it reads.
    pub upstream: Vec<String>,
    /// A paid teacher writes for it.
    pub paid: bool,
    pub estimate: Estimate,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub recipe: PathBuf,
    pub run_dir: PathBuf,
    pub steps: Vec<PlannedStep>,
    /// Teacher spend of the steps still to run, USD (known prices only).
    pub cost_usd: f64,
    /// Steps whose teacher's price is unknown.
    pub unpriced: Vec<String>,
    /// Paid steps still to run with neither a `max_cost` nor `--max-cost`.
    pub unbudgeted: Vec<String>,
    /// Bytes free for training on the device (`--device-memory`, the CPU's available RAM, a
    /// CUDA GPU's free memory; `None`: not known).
    pub device_memory_bytes: Option<f64>,
    /// The device's peak TFLOP/s (`--peak-tflops`).
    pub peak_tflops: Option<f64>,
    /// Training time at [`ASSUMED_MFU`] of the peak.
    pub train_seconds: Option<f64>,
}

impl Plan {
    pub fn step(&self, name: &str) -> Option<&PlannedStep> {
        self.steps.iter().find(|s| s.name == name)
    }
}

/// Tokens a generated record has when nothing measured says otherwise: the corpus's typical
/// answer (the same number `--dry-run` uses).
fn typical_tokens(dry: &DryRun) -> Option<f64> {
    (dry.prompts > 0).then(|| dry.expected_completion_tokens as f64 / dry.prompts as f64)
}

/// What an earlier run of a generate step measured: (tokens per answer, USD per kept record).
fn pilot(dir: &Path) -> Option<(f64, Option<f64>)> {
    pilot_stats(dir).map(|(tokens, cost, _)| (tokens, cost))
}

/// What an earlier, partial rating of a filter step measured (its labels are a generation
/// directory): (USD per rated file, files rated so far).
fn rating_pilot(labels: &Path) -> Option<(f64, u64)> {
    let (_, cost, records) = pilot_stats(labels)?;
    Some((cost?, records))
}

/// `stats.json` of a generation directory: (tokens per answer, USD per kept record, records in
/// the directory).
fn pilot_stats(dir: &Path) -> Option<(f64, Option<f64>, u64)> {
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("stats.json")).ok()?).ok()?;
    let records = v["records"].as_u64()?;
    let run = &v["run"];
    let written = run["written"].as_u64()?;
    let dropped: u64 = run["dropped"]
        .as_object()
        .map_or(0, |d| d.values().filter_map(Value::as_u64).sum());
    let answers = written + dropped;
    if answers == 0 || written == 0 {
        return None;
    }
    let tokens = run["completion_tokens"].as_u64()? as f64 / answers as f64;
    let cost = run["cost_usd"].as_f64().map(|c| c / written as f64);
    Some((tokens, cost, records))
}

/// Whether `cfg` costs money, and whether its price is known.
fn paid(r: &ResolvedTeacher) -> bool {
    match (&r.backend, r.price) {
        (Backend::Local { .. }, _) => false,
        (_, Some(p)) => p.input_per_m > 0.0 || p.output_per_m > 0.0,
        (_, None) => true,
    }
}

/// USD of `prompt` and `completion` tokens at the teacher's price: 0 for a local teacher, `None`
/// when the price is unknown.
fn teacher_cost(r: &ResolvedTeacher, prompt: u64, completion: u64) -> Option<f64> {
    match (&r.backend, r.price) {
        (_, Some(price)) => Some(price.cost(prompt, completion)),
        (Backend::Local { .. }, None) => Some(0.0),
        (_, None) => None,
    }
}

/// What of a teacher decides its answers (and so the ids of the steps it writes for): the model
/// records carry and the sampling it draws with, the backend's defaults filled in (an HTTP
/// teacher's are what its unset settings always stood for, so the ids of its recipes do not
/// change; a local teacher's defaults changed on 2026-12-06, and its steps got new ids with
/// them). `min_tokens` is there only when set, so the ids of recipes written before it existed
/// do not change.
fn teacher_identity(cfg: &TeacherConfig, r: &ResolvedTeacher) -> Value {
    let s = cfg.draws(&r.backend);
    let mut identity = json!({
        "model": r.model,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "repetition_penalty": s.repetition_penalty,
    });
    if let Some(m) = cfg.min_tokens {
        identity["min_tokens"] = m.into();
    }
    identity
}

/// The directory of data step `name` with id `id`.
fn data_dir(run: &Path, name: &str, id: &str) -> PathBuf {
    run.join("data").join(format!("{name}-{}", &id[..8]))
}

/// The files a corpus's settings name (seed lists, templates).
fn corpus_files(c: &CorpusSettings) -> Vec<PathBuf> {
    let opt = |p: &Option<PathBuf>| p.iter().cloned().collect::<Vec<_>>();
    match c {
        CorpusSettings::Stories(s) => {
            [opt(&s.words), opt(&s.prompt), opt(&s.summary_prompt)].concat()
        }
        CorpusSettings::Textbooks(s) => [
            vec![s.topics.clone()],
            opt(&s.audiences),
            opt(&s.styles),
            opt(&s.prompt),
            opt(&s.web),
        ]
        .concat(),
        CorpusSettings::Exercises(s) => [opt(&s.topics), opt(&s.names), opt(&s.prompt)].concat(),
        CorpusSettings::Topics(s) => [
            vec![s.seeds.clone()],
            opt(&s.web),
            opt(&s.subtopics_prompt),
            opt(&s.leaves_prompt),
        ]
        .concat(),
        CorpusSettings::Chat(s) => [opt(&s.topics), opt(&s.prompt)].concat(),
    }
}

/// The settings a generate step runs with: a textbooks step that reads a topics step (`from`)
/// gets that step's list, `topics.txt` in `upstream` (the topics step's directory).
pub fn with_upstream_topics(corpus: &CorpusSettings, upstream: Option<&Path>) -> CorpusSettings {
    match (corpus, upstream) {
        (CorpusSettings::Textbooks(t), Some(dir)) => CorpusSettings::Textbooks(TextbooksSettings {
            topics: dir.join(crate::generate::topics::TOPICS_FILE),
            ..t.clone()
        }),
        _ => corpus.clone(),
    }
}

/// Plans the run: ids, directories, statuses and estimates of every step, in execution order.
pub async fn plan(
    p: &Pipeline,
    dtype: DType,
    budget: Option<crate::train::memory::Budget>,
    max_cost: Option<f64>,
    peak_tflops: Option<f64>,
) -> Result<Plan, PipelineError> {
    let mut steps: Vec<PlannedStep> = Vec::new();
    let find = |steps: &[PlannedStep], name: &str| -> PlannedStep {
        steps
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .expect("upstream planned first")
    };
    for s in p.order() {
        let index = p
            .data
            .iter()
            .position(|d| d.name == s.name)
            .expect("a step");
        let upstream: Vec<PlannedStep> = s.from.iter().map(|f| find(&steps, f)).collect();
        let step = match &s.action {
            Action::Prefs { teacher, settings } => {
                plan_prefs(p, index, s, &p.teachers[teacher], settings, &steps, dtype)?
            }
            _ => plan_data(p, index, s, &upstream).await?,
        };
        steps.push(step);
    }
    let train = plan_train(p, &steps, dtype, budget)?;
    let train_flops = train.estimate.flops;
    steps.push(train);
    for (i, e) in p.evals.iter().enumerate() {
        let t = find(&steps, TRAIN);
        let data = match &e.action {
            EvalAction::Loss(l) => {
                let name = l.data.clone().or_else(|| first_stage_step(p, &e.stage));
                name.map(|n| find(&steps, &n))
            }
            EvalAction::Code(..) | EvalAction::Stories { .. } => None,
        };
        steps.push(plan_eval(p, i, e, &t, data.as_ref())?);
    }
    let todo = |s: &&PlannedStep| s.status != Status::Done;
    let cost_usd = steps
        .iter()
        .filter(todo)
        .filter_map(|s| s.estimate.cost_usd)
        .sum::<f64>()
        + 0.0; // an empty sum is -0.0
    let unpriced = steps
        .iter()
        .filter(todo)
        .filter(|s| s.paid && s.estimate.cost_usd.is_none())
        .map(|s| s.name.clone())
        .collect();
    let unbudgeted = if max_cost.is_some() {
        Vec::new()
    } else {
        steps
            .iter()
            .filter(todo)
            .filter(|s| s.paid && teacher_of(p, s).and_then(|t| t.max_cost).is_none())
            .map(|s| s.name.clone())
            .collect()
    };
    Ok(Plan {
        recipe: p.path.clone(),
        run_dir: p.out.clone(),
        steps,
        cost_usd,
        unpriced,
        unbudgeted,
        device_memory_bytes: budget.map(|b| b.bytes),
        peak_tflops,
        train_seconds: peak_tflops
            .zip(train_flops)
            .map(|(peak, flops)| flops / (peak * 1e12 * ASSUMED_MFU)),
    })
}

/// The teacher a step uses, if it uses one.
pub fn teacher_of<'p>(p: &'p Pipeline, s: &PlannedStep) -> Option<&'p TeacherConfig> {
    let name = match s.node {
        Node::Data(i) => p.data[i].action.teacher(),
        Node::Eval(i) => match &p.evals[i].action {
            EvalAction::Stories { teacher, .. } => Some(teacher.as_str()),
            _ => None,
        },
        Node::Train => None,
    };
    name.and_then(|n| p.teachers.get(n))
}

/// The first data step a stage reads.
fn first_stage_step(p: &Pipeline, stage: &str) -> Option<String> {
    let i = p.train.stages.iter().position(|s| s.raw.name == stage)?;
    p.stage_refs[i].iter().flatten().next().cloned()
}

/// The effective output-token limit of a generate step.
fn max_tokens(cfg: &TeacherConfig, corpus: &CorpusSettings) -> u32 {
    cfg.max_tokens
        .unwrap_or_else(|| corpus.default_max_tokens())
}

/// A data step's id, directory and estimates, before its status is known.
struct Draft {
    identity: Identity,
    dir: PathBuf,
    estimate: Estimate,
    warnings: Vec<String>,
    paid: bool,
}

async fn plan_data(
    p: &Pipeline,
    index: usize,
    s: &DataStep,
    upstream: &[PlannedStep],
) -> Result<PlannedStep, PipelineError> {
    let known = StepManifest::read(&p.out, &s.name)?;
    let known_inputs = known.as_ref().map_or(&[][..], |m| &m.inputs[..]);
    let Draft {
        identity,
        dir,
        mut estimate,
        warnings,
        paid: is_paid,
    } = match &s.action {
        Action::Generate {
            target,
            seed,
            max_attempts,
            shard_size: _,
            teacher,
            corpus,
        } => {
            let corpus = with_upstream_topics(corpus, upstream.first().map(|u| u.dir.as_path()));
            let g = GenerateStep {
                target,
                seed: *seed,
                max_attempts: *max_attempts,
                cfg: &p.teachers[teacher],
                corpus: &corpus,
                upstream,
            };
            plan_generate(p, s, &g, known_inputs).await?
        }
        action => plan_transform(p, s, action, upstream, known.as_ref(), known_inputs)?,
    };
    let status = Status::of(known.as_ref(), &identity.id, &dir);
    if let (Status::Done, Some(m)) = (&status, &known) {
        apply_measured(&mut estimate, &m.summary);
        estimate.cost_usd = Some(0.0);
    }
    Ok(PlannedStep {
        name: s.name.clone(),
        kind: s.kind.name().into(),
        node: Node::Data(index),
        id: identity.id.clone(),
        identity,
        dir,
        status,
        upstream: s.from.clone(),
        paid: is_paid,
        estimate,
        warnings,
    })
}

/// What decides the final checkpoint of stage `upto` (and so what a student that is that stage
/// samples): the training step's identity ([`plan_train`]'s settings) over stages 0..=upto, the
/// files those stages read, and the data steps they read by id.
fn stages_identity(
    p: &Pipeline,
    steps: &[PlannedStep],
    upto: usize,
    dtype: DType,
) -> (Value, Vec<PathBuf>, BTreeMap<String, String>) {
    let (mut stages, mut files, mut ups) = (Vec::new(), Vec::new(), BTreeMap::new());
    for (i, stage) in p.train.stages.iter().enumerate().take(upto + 1) {
        let mut raw = serde_json::to_value(&stage.raw).expect("stage serializes");
        raw.as_object_mut()
            .expect("a stage is a table")
            .remove("checkpoint");
        for (j, (path, _)) in stage.data.iter().enumerate() {
            match &p.stage_refs[i][j] {
                Some(name) => {
                    let up = steps
                        .iter()
                        .find(|s| &s.name == name)
                        .expect("ordered first");
                    ups.insert(name.clone(), up.id.clone());
                    raw["data"][j]["path"] = json!(super::recipe::placeholder(name));
                }
                None => files.push(path.clone()),
            }
        }
        if let crate::train::recipe::Init::Checkpoint(d) | crate::train::recipe::Init::Tile(d) =
            &stage.init
        {
            files.push(d.clone());
        }
        stages.push(raw);
    }
    let settings = json!({
        "model": p.train.model,
        "tokenizer": p.train.tokenizer,
        "seed": p.train.raw.seed,
        "stages": stages,
        "dtype": format!("{dtype:?}"),
    });
    (settings, files, ups)
}

/// A prefs step. Its id holds the student's identity: a stage's training settings and inputs
/// ([`stages_identity`]), so retraining that stage differently makes the pairs stale, or a
/// checkpoint's files; and the judge's, the rubric's and the prompts'.
fn plan_prefs(
    p: &Pipeline,
    index: usize,
    s: &DataStep,
    cfg: &TeacherConfig,
    settings: &super::recipe::PrefsSettings,
    steps: &[PlannedStep],
    dtype: DType,
) -> Result<PlannedStep, PipelineError> {
    let known = StepManifest::read(&p.out, &s.name)?;
    let known_inputs = known.as_ref().map_or(&[][..], |m| &m.inputs[..]);
    let mut identity = serde_json::to_value(settings).expect("settings serialize");
    let mut files = s.paths.clone();
    let mut ups = BTreeMap::new();
    let mut estimate = Estimate::default();
    let mut is_paid = false;
    if settings.student.is_some() {
        let resolved = cfg.resolve()?;
        identity["judge"] = teacher_identity(cfg, &resolved);
        match p.student_stage(s) {
            Some(stage) => {
                let (train, stage_files, stage_ups) = stages_identity(p, steps, stage, dtype);
                identity["student_training"] = train;
                files.extend(stage_files);
                ups.extend(stage_ups);
            }
            None => files.extend(settings.student.iter().map(PathBuf::from)),
        }
        files.extend(settings.prompts.iter().cloned());
        files.extend(settings.rubric.iter().cloned());
        // A chat-data step's conversations: its id stands for them, its estimate for their count.
        let mut from_step = None;
        for f in &s.from {
            let up = steps
                .iter()
                .find(|u| &u.name == f)
                .expect("upstream planned first");
            ups.insert(f.clone(), up.id.clone());
            from_step = Some(up);
        }
        // Each prompt: one judge request holding the rubric and every response.
        let prompts = match from_step {
            Some(up) => up.estimate.records.unwrap_or(0),
            None => settings
                .prompts
                .as_deref()
                .and_then(|f| crate::generate::prefs::read_prompts(f).ok())
                .map_or(0, |v| v.len()) as u64,
        };
        let prompt_tokens =
            prompts * (400 + settings.samples as u64 * settings.max_new_tokens as u64);
        estimate.records = Some(prompts);
        estimate.cost_usd = teacher_cost(&resolved, prompt_tokens, prompts * 200);
        estimate.basis = Some("recipe");
        is_paid = paid(&resolved);
    }
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(PipelineError::Usage(format!(
            "{}: data step `{}` (prefs) reads `{}`, which does not exist (paths are relative to the working directory); fix the path",
            p.path.display(),
            s.name,
            missing.display(),
        )));
    }
    identity["paths"] = json!(s.paths);
    let inputs = fingerprint(&files, known_inputs)?;
    let identity = Identity::new(s.kind.name(), identity, inputs, ups);
    let dir = data_dir(&p.out, &s.name, &identity.id);
    let status = Status::of(known.as_ref(), &identity.id, &dir);
    if let (Status::Done, Some(m)) = (&status, &known) {
        apply_measured(&mut estimate, &m.summary);
        estimate.cost_usd = Some(0.0);
    }
    Ok(PlannedStep {
        name: s.name.clone(),
        kind: s.kind.name().into(),
        node: Node::Data(index),
        id: identity.id.clone(),
        identity,
        dir,
        status,
        upstream: p.needs(s).into_iter().map(str::to_string).collect(),
        paid: is_paid,
        estimate,
        warnings: Vec::new(),
    })
}

/// A generate step's settings, as the planner reads them.
struct GenerateStep<'a> {
    target: &'a Target,
    seed: u64,
    max_attempts: u32,
    cfg: &'a TeacherConfig,
    corpus: &'a CorpusSettings,
    /// The topics step a textbooks step reads (`from`), if any.
    upstream: &'a [PlannedStep],
}

async fn plan_generate(
    p: &Pipeline,
    s: &DataStep,
    g: &GenerateStep<'_>,
    known_inputs: &[super::manifest::FileFingerprint],
) -> Result<Draft, PipelineError> {
    let GenerateStep {
        target,
        seed,
        max_attempts,
        cfg,
        corpus,
        upstream,
    } = *g;
    let (seed, max_attempts) = (&seed, &max_attempts);
    let mut estimate = Estimate::default();
    let mut warnings = Vec::new();
    let resolved = cfg.resolve()?;
    // An upstream step's output is known by that step's id, and may not exist yet.
    let (made_upstream, files): (Vec<PathBuf>, Vec<PathBuf>) = corpus_files(corpus)
        .into_iter()
        .partition(|f| upstream.iter().any(|u| f.starts_with(&u.dir)));
    let waiting = made_upstream.iter().any(|f| !f.exists());
    let ups: BTreeMap<String, String> = upstream
        .iter()
        .map(|u| (u.name.clone(), u.id.clone()))
        .collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(PipelineError::Usage(format!(
            "{}: data step `{}` ({}) reads `{}`, which does not exist (paths are relative to the working directory); fix the path",
            p.path.display(),
            s.name,
            s.kind.name(),
            missing.display(),
        )));
    }
    let inputs = fingerprint(&files, known_inputs)?;
    // How many programs run at once does not change what is kept (exercises hold it at the top,
    // textbooks in their `sandbox`; a sandbox left with only defaults is no setting).
    let mut identity = corpus.clone();
    if let CorpusSettings::Textbooks(t) = &mut identity {
        t.sandbox = t.sandbox.take().and_then(SandboxSettings::kept_identity);
    }
    let mut corpus_json = serde_json::to_value(&identity).expect("settings serialize");
    if let Some(o) = corpus_json.as_object_mut() {
        o.remove("sandbox_workers");
    }
    // The settings that decide record ids name the directory; the amount asked for does
    // not, so a larger `n` adds records to the same directory.
    let records_identity = json!({
        "corpus": corpus_json,
        "teacher": teacher_identity(cfg, &resolved),
        "max_tokens": max_tokens(cfg, corpus),
        "seed": seed,
    });
    let dir_identity = Identity::new(
        s.kind.name(),
        records_identity.clone(),
        inputs.clone(),
        ups.clone(),
    );
    let dir = data_dir(&p.out, &s.name, &dir_identity.id);
    let mut settings = records_identity;
    settings["target"] = json!(target);
    settings["max_attempts"] = json!(max_attempts);
    let identity = Identity::new(s.kind.name(), settings, inputs, ups);
    // Estimates: a dry run of the first attempts (nothing is sent), per-record numbers
    // from a pilot when one exists.
    let is_paid = paid(&resolved);
    let measured = pilot(&dir);
    let probe = |n: u64| GenerateOptions {
        out: dir.clone(),
        n,
        seed: *seed,
        max_attempts: *max_attempts,
        shard_size: 1000,
        concurrency: 1,
        task: None,
    };
    // Tokens per record: measured by a pilot, else the corpus's typical answer (what the dry run
    // assumes). A token target needs it before `n` is known: one extra dry run of one record.
    let typical =
        |dry: &DryRun| typical_tokens(dry).unwrap_or(max_tokens(cfg, corpus) as f64 / 2.0);
    let n = match (target, measured) {
        (Target::Records(n), _) => *n,
        (Target::Tokens(t), m) => {
            let per = match m {
                Some((measured, _)) => measured,
                None if waiting => max_tokens(cfg, corpus) as f64 / 2.0,
                None => typical(&corpus.dry_run(cfg, &probe(1)).await?),
            };
            ((*t as f64 / per.max(1.0)).ceil() as u64).max(1)
        }
    };
    // Without its upstream list there is nothing to dry-run: the estimate assumes half the
    // output limit a record, and its cost is unknown until the upstream step has run.
    let dry = if waiting {
        warnings.push(format!(
            "estimated without a dry run: its topics come from step `{}`, which has not run yet",
            upstream.first().map_or("", |u| u.name.as_str())
        ));
        None
    } else {
        Some(corpus.dry_run(cfg, &probe(n)).await?)
    };
    let tokens_per_record = measured
        .map(|m| m.0)
        .or(dry.as_ref().map(typical))
        .unwrap_or(max_tokens(cfg, corpus) as f64 / 2.0)
        .max(1.0);
    let remaining = n.saturating_sub(dry.as_ref().map_or(0, |d| d.already_done));
    estimate.n = Some(n);
    estimate.records = Some(n);
    estimate.tokens = Some((n as f64 * tokens_per_record) as u64);
    estimate.basis = Some(if measured.is_some() {
        "pilot"
    } else {
        "recipe"
    });
    estimate.cost_usd = match measured {
        Some((_, Some(per_record))) => Some(per_record * remaining as f64),
        _ => dry.and_then(|d| d.expected_cost_usd),
    };
    // Parquet text: about 4 bytes a token, compressed about 2×.
    estimate.disk_bytes = Some((n as f64 * tokens_per_record * 2.0) as u64);
    if resolved.note.is_some() && matches!(resolved.backend, Backend::Local { .. }) {
        warnings.push(format!(
            "no teacher configured: the local default {} writes this data",
            crate::teacher::local::DEFAULT_MODEL
        ));
    }
    Ok(Draft {
        identity,
        dir,
        estimate,
        warnings,
        paid: is_paid,
    })
}

/// A filter, dedup, decontaminate or tokenize step.
fn plan_transform(
    p: &Pipeline,
    s: &DataStep,
    action: &Action,
    upstream: &[PlannedStep],
    known: Option<&StepManifest>,
    known_inputs: &[super::manifest::FileFingerprint],
) -> Result<Draft, PipelineError> {
    let ups: BTreeMap<String, String> = upstream
        .iter()
        .map(|u| (u.name.clone(), u.id.clone()))
        .collect();
    let mut estimate = Estimate::default();
    let mut is_paid = false;
    let mut rater = None;
    let mut settings = match action {
        Action::Dedup(d) => serde_json::to_value(d),
        Action::Decontaminate(d) => serde_json::to_value(d),
        Action::Tokenize(t) => serde_json::to_value(t),
        Action::Filter { settings, .. } => serde_json::to_value(settings),
        Action::ChatImport(c) => serde_json::to_value(c),
        Action::Generate { .. } | Action::Prefs { .. } => unreachable!("planned by their own"),
    }
    .expect("settings serialize");
    let mut files = s.paths.clone();
    if let Action::Decontaminate(d) = action {
        files.extend(d.benchmarks.iter().cloned());
    }
    if let Action::Filter {
        teacher,
        settings: f,
    } = action
    {
        let cfg = &p.teachers[teacher];
        let resolved = cfg.resolve()?;
        // The ratings decide the classifier: who rates, and how.
        settings["teacher"] = teacher_identity(cfg, &resolved);
        files.extend(f.sample.prompt.iter().cloned());
        is_paid = paid(&resolved);
        rater = Some(resolved);
    }
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(PipelineError::Usage(format!(
            "{}: data step `{}` ({}) reads `{}`, which does not exist (paths are relative to the working directory, {}); fix the path or make it first",
            p.path.display(),
            s.name,
            s.kind.name(),
            missing.display(),
            std::env::current_dir().map_or("?".into(), |d| d.display().to_string())
        )));
    }
    if let Action::Tokenize(t) = action {
        let tokenizer = t
            .spec(&p.train.tokenizer)
            .map_err(crate::tokenize::TokenizeError::from)?;
        settings["tokenizer"] = json!(tokenizer);
    }
    settings["paths"] = json!(s.paths);
    let inputs = fingerprint(&files, known_inputs)?;
    let identity = Identity::new(s.kind.name(), settings, inputs, ups.clone());
    let dir = data_dir(&p.out, &s.name, &identity.id);
    if let (Action::Filter { settings: f, .. }, Some(resolved)) = (action, &rater) {
        (estimate.cost_usd, estimate.basis) = rating_cost(&f.sample, resolved, &dir);
    }
    // Sizes flow down: what the inputs hold, or what a finished step measured.
    let outside_bytes: u64 = identity
        .inputs
        .iter()
        .filter(|f| s.paths.iter().any(|p| f.path.starts_with(p)))
        .map(|f| f.bytes)
        .sum();
    let tokens_in = upstream
        .iter()
        .filter_map(|u| u.estimate.tokens)
        .sum::<u64>()
        + outside_bytes / 4;
    let records_in = upstream
        .iter()
        .filter_map(|u| u.estimate.records)
        .sum::<u64>();
    estimate.records = Some(records_in);
    estimate.tokens = Some(tokens_in);
    // Token shards: 2 bytes a token (4 past 65,536 ids); text: about 2 bytes a token.
    estimate.disk_bytes = Some(tokens_in * 2);
    if let Action::Filter { settings: f, .. } = action {
        let ext = f.extensions();
        let is_code = |p: &Path| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ext.iter().any(|x| x == e))
        };
        // Loose source files; Parquet/jsonl dumps hold many files each (unknown here).
        let files = identity.inputs.iter().filter(|i| is_code(&i.path)).count() as u64;
        estimate.records = Some(files);
        if let Some(m) = known {
            apply_measured(&mut estimate, &m.summary);
        }
    }
    if s.kind == DataKind::Tokenize {
        if let Ok(meta) = crate::tokenize::read_meta(&dir) {
            estimate.tokens = Some(meta.splits.values().map(|m| m.tokens).sum());
            estimate.records = Some(meta.splits.values().map(|m| m.documents).sum());
        }
    }
    Ok(Draft {
        identity,
        dir,
        estimate,
        warnings: Vec::new(),
        paid: is_paid,
    })
}

/// What rating a filter step's sample costs, and what the estimate rests on.
fn rating_cost(
    sample: &crate::classify::pipeline::SampleSettings,
    resolved: &ResolvedTeacher,
    dir: &Path,
) -> (Option<f64>, Option<&'static str>) {
    use crate::classify::pipeline::{HTTP_FILE_TOKENS, LOCAL_FILE_TOKENS};
    let files = sample.sample as u64;
    let (labels, _) = crate::classify::annotate::recipe_paths(dir);
    match rating_pilot(&labels) {
        // An earlier run of this step rated part of the sample: the rest costs what a rating
        // cost then.
        Some((per_file, rated)) => (
            Some(per_file * files.saturating_sub(rated) as f64),
            Some("pilot"),
        ),
        // The sample's prompts: the head of each file (max_chars at about 4 characters a token,
        // cut to the teacher's file-token budget as the run cuts it) plus the rubric; each answer
        // a short rating.
        None => {
            let budget = sample.max_file_tokens.unwrap_or(match resolved.backend {
                Backend::Local { .. } => LOCAL_FILE_TOKENS,
                _ => HTTP_FILE_TOKENS,
            });
            let head = (sample.max_chars / 4).min(budget) as u64;
            let prompt = files * (head + 400);
            (teacher_cost(resolved, prompt, files * 60), Some("recipe"))
        }
    }
}

/// Numbers a finished step recorded replace the estimates.
fn apply_measured(e: &mut Estimate, summary: &Value) {
    if let Some(r) = summary["records"].as_u64() {
        e.records = Some(r);
    }
    if let Some(t) = summary["tokens"].as_u64() {
        e.tokens = Some(t);
    }
}

fn plan_train(
    p: &Pipeline,
    steps: &[PlannedStep],
    dtype: DType,
    budget: Option<crate::train::memory::Budget>,
) -> Result<PlannedStep, PipelineError> {
    let known = StepManifest::read(&p.out, TRAIN)?;
    let known_inputs = known.as_ref().map_or(&[][..], |m| &m.inputs[..]);
    let mut ups = BTreeMap::new();
    let mut files = Vec::new();
    let mut stages = Vec::new();
    let mut estimate = Estimate::default();
    let mut warnings = Vec::new();
    let (mut flops, mut tokens, mut peak) = (0.0, 0u64, 0.0f64);
    for (i, stage) in p.train.stages.iter().enumerate() {
        let mut raw = serde_json::to_value(&stage.raw).expect("stage serializes");
        // Recompute changes the memory a step takes, not its result: not part of the identity.
        raw.as_object_mut()
            .expect("a stage is a table")
            .remove("checkpoint");
        let total_weight: f64 = stage.data.iter().map(|d| d.1).sum();
        let stage_tokens = (stage.steps * stage.tokens_per_step()) as u64;
        for (j, (path, weight)) in stage.data.iter().enumerate() {
            let source_tokens = match &p.stage_refs[i][j] {
                Some(name) => {
                    let up = steps.iter().find(|s| &s.name == name).expect("planned");
                    ups.insert(name.clone(), up.id.clone());
                    raw["data"][j]["path"] = json!(super::recipe::placeholder(name));
                    up.estimate.tokens
                }
                None => {
                    files.push(path.clone());
                    crate::tokenize::read_meta(path)
                        .ok()
                        .map(|m| m.splits.values().map(|s| s.tokens).sum())
                }
            };
            if let Some(src) = source_tokens.filter(|&t| t > 0) {
                let epochs = stage_tokens as f64 * weight / total_weight / src as f64;
                if epochs > MAX_EPOCHS {
                    warnings.push(format!(
                        "stage `{}` repeats `{}` {epochs:.1} times (more than {MAX_EPOCHS}): make more of it or lower its weight",
                        stage.raw.name,
                        p.stage_refs[i][j].clone().unwrap_or_else(|| path.display().to_string())
                    ));
                }
            }
        }
        if let crate::train::recipe::Init::Checkpoint(d) | crate::train::recipe::Init::Tile(d) =
            &stage.init
        {
            files.push(d.clone());
        }
        flops +=
            crate::train::flops_per_token(&p.train.model, stage.raw.seq_len) * stage_tokens as f64;
        tokens += stage_tokens;
        let fitted = crate::train::memory::fit(&p.train.model, stage, dtype, budget, 1);
        let memory = crate::train::memory_estimate(&p.train.model, &fitted, dtype);
        peak = peak.max(memory);
        estimate.stages.push(StageFit {
            stage: stage.raw.name.clone(),
            micro_batch: fitted.micro_batch,
            grad_accum: fitted.grad_accum,
            auto: fitted.is_auto(),
            recompute: !fitted.recompute().is_off(),
            memory_bytes: memory,
        });
        stages.push(raw);
    }
    let settings = json!({
        "model": p.train.model,
        "tokenizer": p.train.tokenizer,
        "seed": p.train.raw.seed,
        "stages": stages,
        "dtype": format!("{dtype:?}"),
    });
    let inputs = fingerprint(&files, known_inputs)?;
    let identity = Identity::new(TRAIN, settings, inputs, ups.clone());
    let dir = p.out.join(format!("train-{}", &identity.id[..8]));
    estimate.tokens = Some(tokens);
    estimate.flops = Some(flops);
    estimate.memory_bytes = Some(peak);
    // Checkpoints: fp32 weights + two Adam moments, `keep_last` + the best per stage.
    let params = p.train.model.parameter_count() as f64;
    let kept: usize = p.train.stages.iter().map(|s| s.raw.keep_last + 1).sum();
    estimate.disk_bytes = Some((params * 12.0 * kept as f64) as u64);
    let status = Status::of(known.as_ref(), &identity.id, &dir);
    Ok(PlannedStep {
        name: TRAIN.into(),
        kind: TRAIN.into(),
        node: Node::Train,
        id: identity.id.clone(),
        identity,
        dir,
        status,
        upstream: ups.keys().cloned().collect(),
        paid: false,
        estimate,
        warnings,
    })
}

fn plan_eval(
    p: &Pipeline,
    index: usize,
    e: &EvalStep,
    train: &PlannedStep,
    data: Option<&PlannedStep>,
) -> Result<PlannedStep, PipelineError> {
    let known = StepManifest::read(&p.out, &e.name)?;
    let known_inputs = known.as_ref().map_or(&[][..], |m| &m.inputs[..]);
    let mut ups = BTreeMap::from([(TRAIN.to_string(), train.id.clone())]);
    let (settings, files) = match &e.action {
        EvalAction::Loss(l) => {
            if let Some(d) = data {
                ups.insert(d.name.clone(), d.id.clone());
            }
            (serde_json::to_value(l), Vec::new())
        }
        EvalAction::Code(_, c) => (serde_json::to_value(c), vec![c.problems.clone()]),
        EvalAction::Stories { settings, .. } => (
            serde_json::to_value(settings),
            [settings.beginnings.clone(), settings.rubric.clone()]
                .into_iter()
                .flatten()
                .collect(),
        ),
    };
    let mut estimate = Estimate::default();
    let mut is_paid = false;
    if let EvalAction::Stories {
        teacher,
        settings: st,
    } = &e.action
    {
        let cfg = &p.teachers[teacher];
        let resolved = cfg.resolve()?;
        is_paid = paid(&resolved);
        let beginnings = match &st.beginnings {
            Some(path) => std::fs::read_to_string(path)
                .map(|t| crate::eval::stories::parse_beginnings(&t).len())
                .unwrap_or(0),
            None => {
                crate::eval::stories::parse_beginnings(crate::eval::stories::BUILTIN_BEGINNINGS)
                    .len()
            }
        } as u64;
        // Each grade: the rubric and the story (~ max_new_tokens + 400 tokens), ~150 out.
        let prompt = beginnings * (st.max_new_tokens as u64 + 400);
        estimate.records = Some(beginnings);
        estimate.cost_usd = teacher_cost(&resolved, prompt, beginnings * 150);
        estimate.basis = Some("recipe");
    }
    let mut settings = settings.expect("settings serialize");
    settings["stage"] = json!(e.stage);
    let kind = format!(
        "eval:{}",
        serde_json::to_value(e.kind)
            .expect("kind")
            .as_str()
            .unwrap_or("")
    );
    let inputs = fingerprint(&files, known_inputs)?;
    let identity = Identity::new(&kind, settings, inputs, ups.clone());
    let dir = p
        .out
        .join("eval")
        .join(format!("{}-{}", e.name, &identity.id[..8]));
    let status = Status::of(known.as_ref(), &identity.id, &dir);
    Ok(PlannedStep {
        name: e.name.clone(),
        kind,
        node: Node::Eval(index),
        id: identity.id.clone(),
        identity,
        dir,
        status,
        upstream: ups.keys().cloned().collect(),
        paid: is_paid,
        estimate,
        warnings: Vec::new(),
    })
}

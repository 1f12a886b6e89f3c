//! Runs a planned recipe: every selected step that is not done, in dependency order (up to
//! `--jobs` independent data steps at once, see [`run`]), each into its own directory, then the
//! scoreboard.
//!
//! A step that stops early (killed, interrupted, over budget) leaves its directory as its stage
//! leaves it, and no manifest: the same command continues it (generation resumes its slots, the
//! trainer its last checkpoint, tokenize and the cleaners redo their output whole), so nothing
//! answered and written is sent again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device};
use serde_json::{json, Value};

use super::lineage;
use super::manifest::{Status, StepManifest};
use super::plan::{Node, Plan, PlannedStep, TRAIN};
use super::recipe::{Action, EvalAction, Pipeline, Target};
use super::PipelineError;
use crate::artifact::outdir::DirLock;
use crate::artifact::task::{Task, COMPLETIONS};
use crate::generate::engine::{GenerateOptions, RunState, StopReason};
use crate::generate::run::Progress;
use crate::teacher::factory::TeacherConfig;
use crate::train::dist::{Comm, World};

pub struct RunOptions {
    /// Run this step and what it needs, nothing after it.
    pub until: Option<String>,
    /// Run only this step (what it reads must be done).
    pub only: Option<String>,
    /// A budget for every paid teacher of this invocation together, USD.
    pub max_cost: Option<f64>,
    pub device: Device,
    pub dtype: DType,
    /// Bytes training may plan with on the device (`--device-memory`; `None`: what it reports).
    pub device_memory: Option<f64>,
    pub peak_tflops: Option<f64>,
    /// Set by a signal handler: generation saves what is in flight, training checkpoints, and
    /// the run stops after the current step.
    pub stop: Arc<AtomicBool>,
    /// Stop training with a checkpoint after this many optimizer steps in this invocation.
    pub max_train_steps: Option<usize>,
    /// Data steps run at once (at least 1); see [`run`] for which may overlap.
    pub jobs: usize,
    /// Run the `--only` step as this task of an array job (a generate, decontaminate, tokenize
    /// or filter step): its share, then its marker. The same command without a task then merges
    /// the N tasks' outputs and finishes the step.
    pub task: Option<Task>,
    /// With `--only` a dedup step: run this one of dedup's array stages (as `task`, or as one
    /// task), not the whole dedup; the same command without a stage then finishes the step.
    pub dedup_stage: Option<crate::dedup::stages::Stage>,
    /// With `--only` a filter step: `classifier` rates the sample and trains the classifier (one
    /// job, before the array); `score` is an array task (as `task`, or as one task).
    pub filter_stage: Option<crate::classify::pipeline::Stage>,
    /// The ranks of a data parallel launch (torchrun, srun): rank 0 runs the recipe, and the
    /// training step with all of them ([`follow_training`] is the others' side).
    pub world: World,
    /// The ranks' connection, made at the start; the training step takes it.
    pub comm: Mutex<Option<Comm>>,
}

/// What the runner reports to its caller (progress bars, logs).
pub enum Event<'a> {
    Skip(&'a PlannedStep),
    Start(&'a PlannedStep),
    Finish(&'a PlannedStep, &'a Value),
    Generate(&'a PlannedStep, &'a Progress),
    /// Bytes read by a cleaning step, tokens written by tokenize, files scored by a filter.
    Work(&'a PlannedStep, u64),
    Train(crate::train::Event<'a>),
}

#[derive(Debug, PartialEq)]
pub enum RunOutcome {
    /// Every selected step is done.
    Complete {
        scoreboard: Option<PathBuf>,
    },
    /// A step stopped before it finished (budget, failed requests); the same command continues.
    Incomplete {
        step: String,
        reason: String,
    },
    Interrupted {
        step: String,
    },
    /// One task of an array job did its share of `step` (or had done it).
    TaskDone {
        step: String,
        task: Task,
    },
}

/// The steps `opts` selects, by name, in plan order.
pub fn selected(plan: &Plan, opts: &RunOptions) -> Result<Vec<String>, PipelineError> {
    let exists = |name: &str| -> Result<(), PipelineError> {
        plan.step(name).map(|_| ()).ok_or_else(|| {
            let names: Vec<&str> = plan.steps.iter().map(|s| s.name.as_str()).collect();
            PipelineError::Usage(format!(
                "no step `{name}` in {}; its steps are: {}",
                plan.recipe.display(),
                names.join(", ")
            ))
        })
    };
    if let Some(only) = &opts.only {
        exists(only)?;
        return Ok(vec![only.clone()]);
    }
    let Some(until) = &opts.until else {
        return Ok(plan.steps.iter().map(|s| s.name.clone()).collect());
    };
    exists(until)?;
    // `until` and everything it reads, transitively.
    let mut wanted: BTreeSet<String> = BTreeSet::from([until.clone()]);
    for s in plan.steps.iter().rev() {
        if wanted.contains(&s.name) {
            wanted.extend(s.upstream.iter().cloned());
        }
    }
    Ok(plan
        .steps
        .iter()
        .filter(|s| wanted.contains(&s.name))
        .map(|s| s.name.clone())
        .collect())
}

/// Runs the selected steps that are not done. Up to `opts.jobs` data steps run at once, each
/// as soon as the steps it reads are done; training and evals run alone (they use the whole
/// device). Each step's output depends only on its inputs and settings, so the artifacts are the
/// same for any `jobs`. With `--max-cost` paid steps run one at a time, so each is budgeted with
/// exactly what the finished ones left; without it their own `max_cost` bounds each. A step that
/// fails or stops early starts nothing new: the steps running finish (their manifests are
/// written) and the run reports the first that stopped.
pub async fn run(
    p: &Pipeline,
    plan: &Plan,
    opts: &RunOptions,
    on_event: &(dyn Fn(Event) + Send + Sync),
) -> Result<RunOutcome, PipelineError> {
    let names = selected(plan, opts)?;
    let chosen: Vec<&PlannedStep> = plan
        .steps
        .iter()
        .filter(|s| names.contains(&s.name))
        .collect();
    let unbudgeted: Vec<&String> = plan
        .unbudgeted
        .iter()
        .filter(|n| names.contains(n))
        .collect();
    if !unbudgeted.is_empty() {
        return Err(PipelineError::NoBudget(
            unbudgeted.iter().map(|s| s.to_string()).collect(),
        ));
    }
    if let Some(only) = &opts.only {
        let s = plan.step(only).expect("selected");
        let missing: Vec<&String> = s
            .upstream
            .iter()
            .filter(|u| plan.step(u).is_some_and(|u| u.status != Status::Done))
            .collect();
        if !missing.is_empty() {
            return Err(PipelineError::Usage(format!(
                "--only {only}: it reads {}, which {} not done; run them first (e.g. --until {only})",
                missing.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "),
                if missing.len() == 1 { "is" } else { "are" }
            )));
        }
    }
    std::fs::create_dir_all(&p.out).map_err(|source| PipelineError::Io {
        path: p.out.clone(),
        source,
    })?;
    // One recipe run per run directory (the tasks of one array share it, each task once); each
    // stage also locks its own directory.
    let staged = opts.dedup_stage.is_some() || opts.filter_stage.is_some();
    let _lock = match (opts.task, staged) {
        (Some(t), _) => DirLock::slice(&p.out, t.k, t.n)?,
        (None, true) => DirLock::slice(&p.out, 0, 1)?,
        (None, false) => DirLock::exclusive(&p.out)?,
    };
    write_recipe(p)?;
    let cx = Ctx {
        p,
        plan,
        opts,
        on_event,
    };
    if opts.task.is_some() || staged {
        return task_step(&cx).await;
    }
    let stopped = tokio::task::block_in_place(|| schedule(&cx, &chosen))?;
    if let Some(outcome) = stopped {
        return Ok(outcome);
    }
    let scoreboard = write_scoreboard(p, plan)?;
    Ok(RunOutcome::Complete { scoreboard })
}

/// Writes `RUN/recipe.toml`, the effective recipe. The tasks of an array start at once and all
/// write it: each writes (the same bytes) under a temp name of its own before the rename, since
/// one shared temp name would be renamed away under the others; one already in place is kept.
fn write_recipe(p: &Pipeline) -> Result<(), PipelineError> {
    let path = p.out.join("recipe.toml");
    if std::fs::read(&path).is_ok_and(|b| b == p.effective.as_bytes()) {
        return Ok(());
    }
    let tmp = p
        .out
        .join(format!("recipe.toml.{}.tmp", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, p.effective.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    written.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        PipelineError::Io { path, source }
    })
}

/// What a step's thread reports: its position in `chosen`, its result (or its panic), what it
/// paid.
type Finished = (
    usize,
    std::thread::Result<Result<StepResult, PipelineError>>,
    f64,
);

/// Runs `chosen` (in plan order, so dependencies first) as described at [`run`]; `Some` when a
/// step stopped the run. Each running step has its own thread that drives its stage on the
/// runtime; this thread starts steps, and writes the manifest of each that finishes.
fn schedule(cx: &Ctx<'_>, chosen: &[&PlannedStep]) -> Result<Option<RunOutcome>, PipelineError> {
    let (opts, on_event) = (cx.opts, cx.on_event);
    let runtime = tokio::runtime::Handle::current();
    let names: BTreeSet<&str> = chosen.iter().map(|s| s.name.as_str()).collect();
    let mut waiting: Vec<usize> = (0..chosen.len()).collect();
    let mut finished: BTreeSet<&str> = BTreeSet::new();
    // Running steps: position in `chosen` → (is paid, runs alone).
    let mut running: std::collections::BTreeMap<usize, (bool, bool)> = Default::default();
    let mut spent = 0.0;
    let mut stopped: Option<Result<RunOutcome, PipelineError>> = None;
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<Finished>();
        loop {
            // Start what may start, in plan order.
            let mut k = 0;
            while stopped.is_none() && k < waiting.len() {
                let step = chosen[waiting[k]];
                let ready = step
                    .upstream
                    .iter()
                    .all(|u| !names.contains(u.as_str()) || finished.contains(u.as_str()));
                if !ready {
                    k += 1;
                    continue;
                }
                if step.status == Status::Done {
                    on_event(Event::Skip(step));
                    finished.insert(&step.name);
                    waiting.remove(k);
                    continue;
                }
                // A prefs step whose student is a training stage trains it first.
                let alone = match step.node {
                    Node::Data(i) => cx.p.student_stage(&cx.p.data[i]).is_some(),
                    _ => true,
                };
                if running.len() >= opts.jobs.max(1)
                    || running.values().any(|&(_, alone)| alone)
                    || (alone && !running.is_empty())
                {
                    // Nothing more fits now. A step that runs alone keeps the later ones
                    // waiting, so that a stream of data steps cannot hold it back.
                    break;
                }
                if opts.max_cost.is_some() && step.paid && running.values().any(|&(paid, _)| paid) {
                    k += 1;
                    continue;
                }
                if opts.stop.load(Ordering::SeqCst) {
                    stopped = Some(Ok(RunOutcome::Interrupted {
                        step: step.name.clone(),
                    }));
                    break;
                }
                let index = waiting.remove(k);
                running.insert(index, (step.paid, alone));
                on_event(Event::Start(step));
                let (tx, runtime, start) = (tx.clone(), runtime.clone(), spent);
                scope.spawn(move || {
                    let mut paid = start;
                    // A panic is reported too (and raised again on this thread), so that the
                    // loop below never waits for a step that will not report.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        runtime.block_on(run_step(cx, step, &mut paid))
                    }));
                    // The receiver lives until every step has reported.
                    let _ = tx.send((index, result, paid - start));
                });
            }
            if running.is_empty() {
                break;
            }
            let (index, result, paid) = rx.recv().expect("a running step reports");
            let result = result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            running.remove(&index);
            spent += paid;
            let step = chosen[index];
            let summary = match result {
                Ok(StepResult::Done(v)) => v,
                Ok(StepResult::Incomplete(reason)) => {
                    stopped.get_or_insert(Ok(RunOutcome::Incomplete {
                        step: step.name.clone(),
                        reason,
                    }));
                    continue;
                }
                Ok(StepResult::Interrupted) => {
                    stopped.get_or_insert(Ok(RunOutcome::Interrupted {
                        step: step.name.clone(),
                    }));
                    continue;
                }
                Err(e) => {
                    stopped.get_or_insert(Err(e));
                    continue;
                }
            };
            let manifest =
                StepManifest::new(&step.name, &step.kind, &step.identity, &step.dir, summary);
            let written = lineage::write(cx.plan, &manifest)
                .and_then(|()| manifest.write(&cx.p.out).map_err(PipelineError::from));
            match written {
                Ok(()) => {
                    finished.insert(&step.name);
                    on_event(Event::Finish(step, &manifest.summary));
                }
                Err(e) => {
                    stopped.get_or_insert(Err(e));
                }
            }
        }
    });
    stopped.transpose()
}

/// One step, on its own thread; `spent` is what the run had paid when it started, and grows by
/// what this step pays.
async fn run_step(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    spent: &mut f64,
) -> Result<StepResult, PipelineError> {
    match step.node {
        Node::Data(i) => run_data(cx, step, i, spent).await,
        Node::Train => run_train(cx, step),
        Node::Eval(i) => run_eval(cx, step, i, spent).await,
    }
}

enum StepResult {
    Done(Value),
    Incomplete(String),
    Interrupted,
}

/// `cfg` with what is left of `--max-cost` (after `spent` by earlier steps) as its budget; a task
/// of an array of N gets 1/N of it, so the N tasks together spend at most what one run may.
fn budgeted(cfg: &TeacherConfig, opts: &RunOptions, spent: f64) -> TeacherConfig {
    let mut cfg = cfg.clone();
    if let Some(total) = opts.max_cost {
        let left = (total - spent).max(0.0);
        cfg.max_cost = Some(cfg.max_cost.map_or(left, |m| m.min(left)));
    }
    if let Some(task) = opts.task {
        cfg.max_cost = cfg.max_cost.map(|m| m / task.n as f64);
    }
    cfg
}

/// Runs a teacher-driven stage with a fresh [`RunState`] that the run's stop flag (a signal)
/// stops the way Ctrl-C does.
async fn stoppable<F: std::future::Future>(
    opts: &RunOptions,
    run: impl FnOnce(Arc<RunState>) -> F,
) -> F::Output {
    let state = Arc::new(RunState::default());
    let watcher = {
        let (state, stop) = (state.clone(), opts.stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            state.stop(StopReason::Interrupted);
        })
    };
    let out = run(state).await;
    watcher.abort();
    out
}

/// Runs one task of the `--only` step (see [`RunOptions::task`], [`RunOptions::dedup_stage`],
/// [`RunOptions::filter_stage`]).
async fn task_step(cx: &Ctx<'_>) -> Result<RunOutcome, PipelineError> {
    let task = cx.opts.task.unwrap_or(Task { k: 0, n: 1 });
    let only = cx.opts.only.as_deref().ok_or_else(|| {
        PipelineError::Usage(format!(
            "task {task} of an array job (--shard, --dedup-stage, --filter-stage, or SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX in the environment) runs one step: add --only STEP"
        ))
    })?;
    let step = cx.plan.step(only).expect("selected");
    let action = match step.node {
        Node::Data(i) => Some(&cx.p.data[i].action),
        _ => None,
    };
    let fits = match (action, cx.opts.dedup_stage, cx.opts.filter_stage) {
        (Some(Action::Dedup(_)), Some(_), None) => true,
        (Some(Action::Filter { .. }), None, _) => true,
        (_, Some(_), _) | (_, _, Some(_)) => false,
        (Some(a), None, None) => matches!(
            a,
            Action::Generate { .. } | Action::Decontaminate(_) | Action::Tokenize(_)
        ),
        (None, None, None) => false,
    };
    if !fits {
        return Err(PipelineError::Usage(format!(
            "--only {only}: a {} step does not run as an array task this way; generate, decontaminate, tokenize and filter steps do, dedup steps with --dedup-stage, filter steps also with --filter-stage (unset the array variables, or drop --shard / --dedup-stage / --filter-stage)",
            step.kind
        )));
    }
    if step.status != Status::Done {
        (cx.on_event)(Event::Start(step));
        let mut spent = 0.0;
        match run_step(cx, step, &mut spent).await? {
            StepResult::Done(_) => {}
            StepResult::Incomplete(reason) => {
                return Ok(RunOutcome::Incomplete {
                    step: step.name.clone(),
                    reason,
                })
            }
            StepResult::Interrupted => {
                return Ok(RunOutcome::Interrupted {
                    step: step.name.clone(),
                })
            }
        }
    }
    Ok(RunOutcome::TaskDone {
        step: step.name.clone(),
        task,
    })
}

/// Whether the step writing `dir` ran as an array job: its tasks' markers are there, so the step
/// finishes by merging them (the merge names the tasks that have not finished).
fn ran_as_array(dir: &Path) -> bool {
    dir.join(COMPLETIONS).is_dir()
}

/// The directories a data step reads: its upstream steps' outputs, then its paths.
fn inputs(p: &Pipeline, plan: &Plan, i: usize) -> Vec<PathBuf> {
    let s = &p.data[i];
    s.from
        .iter()
        .map(|f| {
            let dir = plan.step(f).expect("planned").dir.clone();
            match p.step(f).map(|u| u.kind) {
                // A filter's output is its kept files; `scored/` and the labels are reports.
                Some(super::recipe::DataKind::Filter) => dir.join("kept"),
                _ => dir,
            }
        })
        .chain(s.paths.iter().cloned())
        .collect()
}

/// Runs blocking stage code on this thread without stalling the async runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// What every step's runner reads.
struct Ctx<'a> {
    p: &'a Pipeline,
    plan: &'a Plan,
    opts: &'a RunOptions,
    on_event: &'a (dyn Fn(Event) + Send + Sync),
}

async fn run_data(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    i: usize,
    spent: &mut f64,
) -> Result<StepResult, PipelineError> {
    match &cx.p.data[i].action {
        Action::Generate {
            target,
            seed,
            max_attempts,
            shard_size,
            teacher,
            corpus,
        } => {
            let gen = GenerateOptions {
                out: step.dir.clone(),
                n: match target {
                    Target::Records(n) => *n,
                    Target::Tokens(_) => step.estimate.n.expect("planned from the token target"),
                },
                seed: *seed,
                max_attempts: *max_attempts,
                shard_size: *shard_size,
                concurrency: 1, // the teacher config's concurrency decides
                task: cx.opts.task,
            };
            // A textbooks step that reads a topics step gets that step's list.
            let upstream = cx.p.data[i].from.first().and_then(|f| cx.plan.step(f));
            let corpus =
                super::plan::with_upstream_topics(corpus, upstream.map(|u| u.dir.as_path()));
            generate(cx, step, &cx.p.teachers[teacher], &corpus, gen, spent).await
        }
        Action::Filter { teacher, settings } => {
            filter(cx, step, i, &cx.p.teachers[teacher], settings, spent).await
        }
        Action::Dedup(d) => blocking(|| dedup(cx, step, i, d)),
        Action::Decontaminate(d) => blocking(|| decontaminate(cx, step, i, d)),
        Action::Tokenize(t) => blocking(|| tokenize(cx, step, i, t)),
        Action::Prefs { teacher, settings } => {
            prefs(cx, step, i, &cx.p.teachers[teacher], settings, spent).await
        }
        Action::ChatImport(c) => blocking(|| chat_import(cx, step, i, c)),
    }
}

/// A prefs step: imports its `paths`, or has its student sample and the teacher judge. A student
/// that is a training stage is trained first, into the training step's directory (the stages up
/// to it, resumed like the training step), where the training step later goes on from it.
async fn prefs(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    i: usize,
    teacher: &TeacherConfig,
    settings: &super::recipe::PrefsSettings,
    spent: &mut f64,
) -> Result<StepResult, PipelineError> {
    use crate::generate::prefs::{self, StudentSampling};
    let s = &cx.p.data[i];
    // The prompts: a file or directory, or a chat-data step's conversations (`from`).
    let prompts = match (&settings.prompts, s.from.is_empty()) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => inputs(cx.p, cx.plan, i).into_iter().next(),
        (None, true) => None,
    };
    let (Some(student), Some(prompts)) = (&settings.student, prompts) else {
        let stats = blocking(|| prefs::import(&s.paths, &step.dir))?;
        return Ok(StepResult::Done(json!({
            "records": stats.pairs,
            "rows": stats.inputs,
            "dropped": stats.dropped,
        })));
    };
    let student = match cx.p.student_stage(s) {
        Some(stage) => {
            if let Some(stopped) = train_until(cx, stage)? {
                return Ok(stopped);
            }
            stage_checkpoint(cx.plan, &cx.p.train.stages[stage].raw.name)?
        }
        None => PathBuf::from(student),
    };
    let run_settings = prefs::PrefsSettings {
        prompts,
        student,
        out: step.dir.clone(),
        sampling: StudentSampling {
            samples: settings.samples,
            max_new_tokens: settings.max_new_tokens,
            temperature: settings.gen_temperature,
            top_p: settings.gen_top_p,
            seed: settings.seed.unwrap_or(cx.p.seed),
            batch: settings.student_batch,
        },
        rubric: settings.rubric.clone(),
        max_attempts: settings.max_attempts,
    };
    let cfg = budgeted(teacher, cx.opts, *spent);
    let progress = |g: &Progress| (cx.on_event)(Event::Generate(step, g));
    let stats = stoppable(cx.opts, |state| {
        prefs::run(&run_settings, &cfg, state, &progress)
    })
    .await?;
    let judging = stats.judging.clone().unwrap_or(Value::Null);
    let cost = judging["run"]["cost_usd"].as_f64().unwrap_or(0.0);
    *spent += cost;
    if !stats.complete {
        return Ok(if cx.opts.stop.load(Ordering::SeqCst) {
            StepResult::Interrupted
        } else {
            StepResult::Incomplete(format!(
                "{} pairs so far: the judge stopped ({}) or requests failed; run the same command again to go on",
                stats.pairs,
                judging["stopped"]
            ))
        });
    }
    if stats.pairs == 0 {
        return Ok(StepResult::Incomplete(format!(
            "no pair was made from {} prompts (dropped: {}); see {}",
            stats.inputs,
            serde_json::to_string(&stats.dropped).unwrap_or_default(),
            stats.rejects_path.display()
        )));
    }
    Ok(StepResult::Done(json!({
        "records": stats.pairs,
        "prompts": stats.inputs,
        "dropped": stats.dropped,
        "judge": stats.judge,
        "student_hash": stats.student_hash,
        "cost_usd_this_run": cost,
    })))
}

/// Trains the stages up to `stage` in the training step's directory (resuming what is there);
/// `Some` when training stopped before that stage's end.
fn train_until(cx: &Ctx<'_>, stage: usize) -> Result<Option<StepResult>, PipelineError> {
    let train = cx.plan.step(TRAIN).expect("planned");
    let mut opts = train_options(cx.p, cx.plan, train, cx.opts)?;
    opts.recipe.stages.truncate(stage + 1);
    opts.recipe.raw.stages.truncate(stage + 1);
    opts.resume = crate::train::latest_checkpoint(&train.dir, &opts.recipe)?.is_some();
    // The other ranks of a data parallel launch join at the training step.
    opts.world = crate::train::dist::World::single();
    let outcome = blocking(|| crate::train::run(&opts, |e| (cx.on_event)(Event::Train(e))))?;
    Ok((outcome == crate::train::Outcome::Stopped).then(|| {
        if cx.opts.stop.load(Ordering::SeqCst) {
            StepResult::Interrupted
        } else {
            StepResult::Incomplete(format!(
                "training stopped with a checkpoint before the end of stage `{}`, the student of this step; run the same command again to go on",
                cx.p.train.stages[stage].raw.name
            ))
        }
    }))
}

/// A `kind = "chat-data"` step with inputs: their conversations checked and imported.
fn chat_import(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    i: usize,
    c: &crate::generate::chat::ChatImportSettings,
) -> Result<StepResult, PipelineError> {
    let stats = crate::generate::chat::import(&inputs(cx.p, cx.plan, i), &step.dir, c)
        .map_err(|e| PipelineError::Usage(format!("step `{}`: {e}", step.name)))?;
    if stats.records == 0 {
        return Ok(StepResult::Incomplete(format!(
            "no conversation of {} rows was kept ({}); see {}",
            stats.rows,
            stats
                .rejects_total
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            step.dir.join("rejects.parquet").display()
        )));
    }
    Ok(StepResult::Done(json!({
        "records": stats.records,
        "rows_in": stats.rows,
        "keep_rate": stats.keep_rate,
    })))
}

async fn generate(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    teacher: &TeacherConfig,
    corpus: &crate::generate::run::CorpusSettings,
    gen: GenerateOptions,
    spent: &mut f64,
) -> Result<StepResult, PipelineError> {
    let (opts, on_event) = (cx.opts, cx.on_event);
    let n = gen.n;
    if opts.task.is_none() && ran_as_array(&step.dir) {
        let merged = blocking(|| crate::generate::merge::merge(&step.dir))?.stats;
        let checked = merged["answers_checked"].as_u64().unwrap_or(0);
        let completion = merged["run"]["completion_tokens"].as_u64().unwrap_or(0);
        let records = merged["records"].as_u64().unwrap_or(0);
        return Ok(StepResult::Done(json!({
            "records": records,
            "tokens": (records as f64 * completion as f64 / checked.max(1) as f64) as u64,
            "cost_usd_this_run": 0.0,
            "cost_usd_of_tasks": merged["run"]["cost_usd"],
            "tasks": merged["tasks"],
            "keep_rate": merged["keep_rate"],
            "model": merged["model"],
        })));
    }
    let cfg = budgeted(teacher, opts, *spent);
    let progress = |g: &Progress| on_event(Event::Generate(step, g));
    if let Some(marker) = crate::generate::run::task_done(&gen) {
        tracing::info!("{}: this task is done ({})", step.name, marker.display());
        return Ok(StepResult::Done(Value::Null));
    }
    let stats = stoppable(opts, |state| corpus.run(&cfg, &gen, state, &progress)).await?;
    let cost = stats.run.cost_usd.unwrap_or(0.0);
    *spent += cost;
    let answers = stats.run.written + stats.run.dropped.values().sum::<u64>();
    let summary = json!({
        "records": stats.records,
        "tokens": (stats.records as f64 * stats.run.completion_tokens as f64 / answers.max(1) as f64) as u64,
        "cost_usd_this_run": cost,
        "requests": stats.run.requests.sent,
        "keep_rate": stats.keep_rate,
        "given_up": stats.run.given_up_slots,
        "model": stats.model,
    });
    Ok(match stats.stopped {
        Some(StopReason::Interrupted) => StepResult::Interrupted,
        Some(StopReason::Budget) => StepResult::Incomplete(format!(
            "the budget ran out after {} of {n} records (${cost:.4} spent by this run): raise `max_cost` or --max-cost and run the same command again",
            stats.records
        )),
        // Failed requests are sent again by the next run; slots that gave up after
        // max_attempts drops stay given up (a larger max_attempts retries them), so the
        // step is as done as this recipe makes it.
        _ if stats.run.failed_requests > 0 => StepResult::Incomplete(format!(
            "{} of {n} records: {} requests failed after retries; run the same command again to send them again",
            stats.records, stats.run.failed_requests
        )),
        // Nothing for the steps after it to read: say why here, not as an empty input there.
        _ if stats.records == 0 => StepResult::Incomplete(format!(
            "no record was kept: every slot gave up after max_attempts = {} drops ({}); the teacher \
             does not write what the checks accept — use a stronger teacher or raise max_attempts",
            gen.max_attempts,
            stats
                .rejects_total
                .iter()
                .map(|(r, c)| format!("{r} {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        _ => StepResult::Done(summary),
    })
}

/// The filter in two calls, so that its rating spends from the run's budget like a generate
/// step: first the teacher rates the sample (stopping the step, like a generate step, when the
/// budget runs out: a classifier trained on part of the sample would be thrown away by the next
/// run), then the classifier is trained and every file scored. Whatever either call paid adds
/// to `spent`.
///
/// On a cluster the filter is three jobs: `--filter-stage classifier` (the two calls, without the
/// scoring), an array whose task K scores the parts i ≡ K mod N ([`filter_task`]), and the same
/// command without a stage or task, which merges them ([`filter_merge`]).
async fn filter(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    i: usize,
    teacher: &TeacherConfig,
    settings: &super::recipe::FilterSettings,
    spent: &mut f64,
) -> Result<StepResult, PipelineError> {
    use crate::classify::pipeline::{self as filtering, PipelineProgress as P};
    let (p, plan, opts, on_event) = (cx.p, cx.plan, cx.opts, cx.on_event);
    let recipe = filtering::FilterRecipe {
        input: crate::classify::InputOptions {
            inputs: inputs(p, plan, i),
            preset: settings.preset,
            extensions: settings.extensions(),
            max_bytes: settings.max_bytes,
            follow_symlinks: false,
        },
        sample: settings.sample.clone(),
        model: settings.model.clone(),
        threshold: None,
        shard: None,
        batch: settings.batch,
        // The manifest's token count prices the steps after this one (the plan's estimates).
        count_tokens: true,
        out: step.dir.clone(),
        classifier: None,
    };
    let stage = opts.filter_stage;
    match (opts.task, stage) {
        (Some(task), Some(filtering::Stage::Classifier)) => {
            return Err(PipelineError::Usage(format!(
                "--only {} --filter-stage classifier runs as one job, not as task {task} of an array: unset SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX and drop --shard",
                step.name
            )))
        }
        (Some(task), _) => return blocking(|| filter_task(cx, step, &recipe, task)),
        (None, Some(filtering::Stage::Score)) => {
            return blocking(|| filter_task(cx, step, &recipe, Task { k: 0, n: 1 }))
        }
        (None, None) if ran_as_array(&step.dir) => {
            return blocking(|| filter_merge(cx, step, &recipe))
        }
        _ => {}
    }
    let (labels, _) = crate::classify::annotate::recipe_paths(&step.dir);
    let rated = || {
        crate::classify::annotate::load_labels(&labels).map_or(0, |l| l.len())
            >= settings.sample.sample
    };
    let mut cost = 0.0;
    if !rated() {
        let cfg = budgeted(teacher, opts, *spent);
        let progress = |g: &Progress| on_event(Event::Generate(step, g));
        let stats = stoppable(opts, |state| {
            filtering::annotate(
                &recipe.input,
                &recipe.sample,
                &labels,
                &cfg,
                None,
                state,
                &progress,
            )
        })
        .await?;
        cost = stats.run.cost_usd.unwrap_or(0.0);
        *spent += cost;
        match stats.stopped {
            Some(StopReason::Interrupted) => return Ok(StepResult::Interrupted),
            Some(StopReason::Budget) => {
                return Ok(StepResult::Incomplete(format!(
                    "the budget ran out after rating {} of {} sampled files (${cost:.4} spent by this run): raise `max_cost` or --max-cost and run the same command again",
                    stats.records, stats.requested
                )))
            }
            _ => {}
        }
    }
    // The second call rates again only what the first left unrated (failed requests, a sample
    // larger than the readable files): its spend is reported by its `Rated` event.
    let cfg = budgeted(teacher, opts, *spent);
    let rerated = std::sync::Mutex::new(0.0);
    let progress = |e: P| match e {
        P::Generation(g) => on_event(Event::Generate(step, g)),
        P::Scored { files } => on_event(Event::Work(step, files)),
        P::Rated { stats, .. } => {
            *rerated.lock().unwrap_or_else(|e| e.into_inner()) += stats.run.cost_usd.unwrap_or(0.0)
        }
        _ => {}
    };
    if stage == Some(filtering::Stage::Classifier) {
        let model = stoppable(opts, |state| {
            filtering::classifier(&recipe, &cfg, state, &progress)
        })
        .await;
        *spent += rerated.into_inner().unwrap_or_else(|e| e.into_inner());
        return match model {
            Err(filtering::PipelineError::Interrupted { .. }) => Ok(StepResult::Interrupted),
            other => {
                other?;
                Ok(StepResult::Done(Value::Null))
            }
        };
    }
    let stats = stoppable(opts, |state| {
        filtering::run(&recipe, &cfg, state, &progress)
    })
    .await;
    let rerated = rerated.into_inner().unwrap_or_else(|e| e.into_inner());
    *spent += rerated;
    cost += rerated;
    let stats = match stats {
        Err(filtering::PipelineError::Interrupted { .. }) => return Ok(StepResult::Interrupted),
        other => other?,
    };
    Ok(StepResult::Done(filter_summary(&stats, cost)))
}

/// A finished filter step's numbers for its manifest.
fn filter_summary(stats: &crate::classify::FilterStats, cost: f64) -> Value {
    json!({
        "records": stats.kept,
        "preset": stats.preset,
        "files_scored": stats.scored,
        "kept_share": stats.kept_share,
        "tokens": stats.tokens_kept,
        "threshold": stats.threshold,
        "cost_usd_this_run": cost,
    })
}

/// The scoring of `recipe` as task `task` of an array, with the classifier that
/// `--filter-stage classifier` trained: the parts i ≡ K mod N into the step's `scored/` and
/// `kept/` (what one run writes there), `progress-K-of-N.jsonl`, then the task's marker. A
/// relaunched task whose marker exists does nothing; a killed one rescores only the parts its
/// progress file does not list.
fn filter_task(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    recipe: &crate::classify::pipeline::FilterRecipe,
    task: Task,
) -> Result<StepResult, PipelineError> {
    if task.is_done(&step.dir) {
        tracing::info!("{}: task {task} is done", step.name);
        return Ok(StepResult::Done(Value::Null));
    }
    let (_, model) = crate::classify::annotate::recipe_paths(&step.dir);
    if !model.is_file() {
        return Err(PipelineError::Usage(format!(
            "{}: task {task} of `{}` scores with this classifier, which is not trained yet: run `phigen train --recipe {} --only {} --filter-stage classifier` first (the emitted Slurm and Kubernetes jobs do, before the array)",
            model.display(),
            step.name,
            cx.plan.recipe.display(),
            step.name
        )));
    }
    let stats = score(cx, step, recipe, model, task)?;
    task.mark_done(
        &step.dir,
        serde_json::to_value(&stats).expect("stats serialize"),
    )
    .map_err(|source| PipelineError::Io {
        path: task.marker(&step.dir),
        source,
    })?;
    Ok(StepResult::Done(Value::Null))
}

/// Finishes a filter that ran as an array: once every task's marker is there, the whole-run
/// scoring finds every part in the tasks' progress files, scores nothing again, and writes
/// `stats.json` over all of them.
fn filter_merge(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    recipe: &crate::classify::pipeline::FilterRecipe,
) -> Result<StepResult, PipelineError> {
    let tasks = crate::artifact::task::all_finished(&step.dir)?.len();
    let (_, model) = crate::classify::annotate::recipe_paths(&step.dir);
    let stats = score(cx, step, recipe, model, Task { k: 0, n: 1 })?;
    if stats.parts_this_run > 0 {
        tracing::warn!(
            "{}: {} parts were scored by the merge, not by the tasks (their inputs changed since)",
            step.name,
            stats.parts_this_run
        );
    }
    let mut summary = filter_summary(&stats, 0.0);
    summary["tasks"] = json!(tasks);
    Ok(StepResult::Done(summary))
}

/// Scores `task`'s parts of the filter's input with `model` into the step's directory.
fn score(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    recipe: &crate::classify::pipeline::FilterRecipe,
    model: PathBuf,
    task: Task,
) -> Result<crate::classify::FilterStats, PipelineError> {
    let opts = crate::classify::FilterOptions {
        input: recipe.input.clone(),
        out: step.dir.clone(),
        model,
        threshold: recipe.threshold,
        shard: (task.k, task.n),
        cache: recipe.model.cache.clone(),
        batch: recipe.batch,
        count_tokens: recipe.count_tokens,
    };
    crate::classify::filter(&opts, &|files| (cx.on_event)(Event::Work(step, files)))
        .map_err(|e| PipelineError::Filter(e.into()))
}

fn dedup(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    i: usize,
    d: &super::recipe::DedupSettings,
) -> Result<StepResult, PipelineError> {
    let (p, plan) = (cx.p, cx.plan);
    let progress = |n: u64| (cx.on_event)(Event::Work(step, n));
    let opts = crate::dedup::DedupOptions {
        inputs: inputs(p, plan, i),
        out: step.dir.clone(),
        params: d.params().map_err(PipelineError::Usage)?,
        exact: d.normalize().map_err(PipelineError::Usage)?,
        verify_jaccard: d.verify_jaccard,
        index: None,
        stage: cx.opts.dedup_stage,
        shard: cx.opts.task,
        follow_symlinks: false,
        // Generated corpora are written in arrival order: keeping the least id makes the kept
        // set the same on every run (and after a resume).
        keep: crate::dedup::Keep::LeastId,
    };
    let stats = match crate::dedup::run(&opts, &progress)? {
        crate::dedup::Outcome::Done(s) | crate::dedup::Outcome::UpToDate(s) => s,
        // One task of an array stage: the step finishes in a later run without a stage.
        crate::dedup::Outcome::Task(_) => return Ok(StepResult::Done(Value::Null)),
    };
    Ok(StepResult::Done(json!({
        "records": stats.kept,
        "documents_in": stats.documents,
        "removed_exact": stats.removed_exact,
        "removed_near": stats.removed_near,
    })))
}

fn decontaminate(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    i: usize,
    d: &super::recipe::DecontaminateSettings,
) -> Result<StepResult, PipelineError> {
    let (p, plan) = (cx.p, cx.plan);
    let progress = |n: u64| (cx.on_event)(Event::Work(step, n));
    let opts = crate::dedup::decontaminate::DecontaminateOptions {
        inputs: inputs(p, plan, i),
        out: step.dir.clone(),
        benchmarks: d.benchmarks.clone(),
        ngram: d.ngram,
        identifier_ngram: (d.identifier_ngram > 0).then_some(d.identifier_ngram),
        identifier_share: d.identifier_share,
        mode: d.mode,
        follow_symlinks: false,
        task: cx.opts.task,
    };
    let r = if cx.opts.task.is_none() && ran_as_array(&step.dir) {
        crate::dedup::decontaminate::merge(&step.dir)?
    } else {
        crate::dedup::decontaminate::run(&opts, &progress)?
    };
    let kept = match d.mode {
        crate::dedup::decontaminate::Mode::Drop => r.documents - r.contaminated_documents,
        crate::dedup::decontaminate::Mode::Flag => r.documents,
    };
    Ok(StepResult::Done(json!({
        "records": kept,
        "documents_in": r.documents,
        "contaminated": r.contaminated_documents,
    })))
}

fn tokenize(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    i: usize,
    t: &super::recipe::TokenizeSettings,
) -> Result<StepResult, PipelineError> {
    let (p, plan) = (cx.p, cx.plan);
    let progress = |n: u64| (cx.on_event)(Event::Work(step, n));
    let opts = crate::tokenize::TokenizeOptions {
        inputs: inputs(p, plan, i),
        out: step.dir.clone(),
        tokenizer: t
            .spec(&p.train.tokenizer)
            .map_err(crate::tokenize::TokenizeError::from)?,
        eos_token: t.eos_token.clone(),
        val_fraction: t.val_fraction,
        shard_tokens: t.shard_tokens,
        force: false,
        follow_symlinks: false,
        // Generation writes records in answer order: id order makes the shards a
        // function of the records alone (a resumed run gives the same bytes).
        order: crate::tokenize::Order::Id,
    };
    let outcome = match cx.opts.task {
        Some(task) => {
            crate::tokenize::array::run_task(&opts, task, progress)?;
            return Ok(StepResult::Done(Value::Null));
        }
        None if ran_as_array(&step.dir) => crate::tokenize::array::merge(&step.dir)?,
        None => crate::tokenize::run(&opts, progress)?,
    };
    let meta = match outcome {
        crate::tokenize::Outcome::Written(m) | crate::tokenize::Outcome::UpToDate(m) => m,
    };
    let split = |s| meta.splits.get(&s).map_or(0, |m| m.tokens);
    Ok(StepResult::Done(json!({
        "records": meta.splits.values().map(|s| s.documents).sum::<u64>(),
        "tokens": split(crate::tokenize::Split::Train) + split(crate::tokenize::Split::Val),
        "train_tokens": split(crate::tokenize::Split::Train),
        "val_tokens": split(crate::tokenize::Split::Val),
    })))
}

/// The training recipe with every `{ step = … }` pointing at that step's directory.
fn resolved_recipe(p: &Pipeline, plan: &Plan) -> crate::train::recipe::Recipe {
    let mut recipe = p.train.clone();
    for (i, stage) in recipe.stages.iter_mut().enumerate() {
        for (j, d) in stage.data.iter_mut().enumerate() {
            if let Some(name) = &p.stage_refs[i][j] {
                d.0 = plan.step(name).expect("planned").dir.clone();
                stage.raw.data[j].path = d.0.clone();
            }
        }
    }
    recipe
}

/// The training step's options: the recipe reading the data steps' outputs, resumed from the
/// checkpoints a run killed part way left.
fn train_options(
    p: &Pipeline,
    plan: &Plan,
    step: &PlannedStep,
    opts: &RunOptions,
) -> Result<crate::train::TrainOptions, PipelineError> {
    let recipe = resolved_recipe(p, plan);
    let resume = crate::train::latest_checkpoint(&step.dir, &recipe)?.is_some();
    Ok(crate::train::TrainOptions {
        recipe,
        out: step.dir.clone(),
        resume,
        device: opts.device.clone(),
        dtype: opts.dtype,
        peak_tflops: opts.peak_tflops,
        stop: opts.stop.clone(),
        max_steps_this_run: opts.max_train_steps,
        device_memory: opts.device_memory,
        world: opts.world.clone(),
    })
}

/// A data parallel rank other than 0 of a whole-run recipe: waits (connected to rank 0, however
/// long its data steps take) until rank 0 reaches the training step, then trains with it. Returns
/// `false` when rank 0 finished without training (the step was done, or not selected).
pub async fn follow_training(
    p: &Pipeline,
    opts: &RunOptions,
    replan: impl std::future::Future<Output = Result<Plan, PipelineError>>,
) -> Result<bool, PipelineError> {
    let mut comm = opts
        .comm
        .lock()
        .expect("comm lock")
        .take()
        .expect("connected at the start");
    if !tokio::task::block_in_place(|| comm.await_root()).map_err(crate::train::TrainError::from)? {
        return Ok(false);
    }
    // The data steps are done now, so the plan names the training step's final directory.
    let plan = replan.await?;
    let step = plan
        .steps
        .iter()
        .find(|s| s.node == Node::Train)
        .expect("rank 0 trains only a recipe with a training step");
    let train_opts = train_options(p, &plan, step, opts)?;
    blocking(|| crate::train::run_connected(&train_opts, comm, |_| {}))?;
    Ok(true)
}

/// Rank 0's side of [`follow_training`] when the run ends without training: lets the other
/// ranks go.
pub fn release_followers(opts: &RunOptions) -> Result<(), PipelineError> {
    if let Some(mut comm) = opts.comm.lock().expect("comm lock").take() {
        comm.signal(false).map_err(crate::train::TrainError::from)?;
    }
    Ok(())
}

fn run_train(cx: &Ctx<'_>, step: &PlannedStep) -> Result<StepResult, PipelineError> {
    let (p, plan, opts, on_event) = (cx.p, cx.plan, cx.opts, cx.on_event);
    let train_opts = train_options(p, plan, step, opts)?;
    let comm = opts.comm.lock().expect("comm lock").take();
    let outcome = blocking(|| match comm {
        // The other ranks wait for this signal (see follow_training).
        Some(mut comm) => {
            comm.signal(true)?;
            crate::train::run_connected(&train_opts, comm, |e| on_event(Event::Train(e)))
        }
        None => crate::train::run(&train_opts, |e| on_event(Event::Train(e))),
    })?;
    if outcome == crate::train::Outcome::Stopped {
        return Ok(if opts.stop.load(Ordering::SeqCst) {
            StepResult::Interrupted
        } else {
            StepResult::Incomplete(
                "training stopped with a checkpoint after --max-steps; run the same command again to go on".into(),
            )
        });
    }
    let last = last_checkpoints(&step.dir, p)?;
    Ok(StepResult::Done(json!({
        "tokens": step.estimate.tokens,
        "checkpoints": last,
    })))
}

/// The last checkpoint of every stage.
fn last_checkpoints(dir: &Path, p: &Pipeline) -> Result<Value, PipelineError> {
    let mut out = serde_json::Map::new();
    for s in &p.train.stages {
        if let Some((_, d)) = crate::train::checkpoints(dir, &s.raw.name)?.last() {
            out.insert(s.raw.name.clone(), json!(d));
        }
    }
    Ok(Value::Object(out))
}

/// The last checkpoint of `stage` in the training step's directory.
fn stage_checkpoint(plan: &Plan, stage: &str) -> Result<PathBuf, PipelineError> {
    let train = plan.step(TRAIN).expect("planned");
    crate::train::checkpoints(&train.dir, stage)?
        .last()
        .map(|(_, d)| d.clone())
        .ok_or_else(|| {
            PipelineError::Usage(format!(
                "no checkpoint of stage `{stage}` in {}: run the training step first",
                train.dir.display()
            ))
        })
}

async fn run_eval(
    cx: &Ctx<'_>,
    step: &PlannedStep,
    i: usize,
    spent: &mut f64,
) -> Result<StepResult, PipelineError> {
    let (p, plan, opts, on_event) = (cx.p, cx.plan, cx.opts, cx.on_event);
    let e = &p.evals[i];
    let checkpoint = stage_checkpoint(plan, &e.stage)?;
    std::fs::create_dir_all(&step.dir).map_err(|source| PipelineError::Io {
        path: step.dir.clone(),
        source,
    })?;
    match &e.action {
        EvalAction::Loss(l) => {
            let stage = p
                .train
                .stages
                .iter()
                .find(|s| s.raw.name == e.stage)
                .expect("checked");
            let data = step
                .upstream
                .iter()
                .find(|u| *u != TRAIN)
                .and_then(|u| plan.step(u))
                .map(|s| s.dir.clone())
                .or_else(|| stage.data.first().map(|d| d.0.clone()))
                .expect("a stage has data");
            let seq_len = l.seq_len.unwrap_or(stage.raw.seq_len);
            let (batches, rows) = (l.batches, l.rows);
            let report = blocking(|| {
                crate::eval::validation_loss(&checkpoint, &data, seq_len, batches, rows)
            })?;
            let path = step.dir.join("loss.json");
            crate::artifact::atomic::write_json(&path, &report)
                .map_err(|source| PipelineError::Io { path, source })?;
            Ok(StepResult::Done(json!({
                "loss": report.loss,
                "perplexity": report.perplexity,
                "checkpoint": checkpoint,
            })))
        }
        EvalAction::Code(kind, c) => {
            use crate::eval::code::{Benchmark, CodeEvalSettings};
            let settings = CodeEvalSettings {
                benchmark: match kind {
                    super::recipe::EvalKind::Mbpp => Benchmark::Mbpp,
                    _ => Benchmark::HumanEval,
                },
                problems: c.problems.clone(),
                checkpoint: Some(checkpoint.clone()),
                samples: None,
                out: step.dir.clone(),
                samples_per_task: c.samples_per_task,
                k: c.k.clone(),
                max_new_tokens: c.max_new_tokens,
                temperature: c.temperature,
                top_p: c.top_p,
                seed: c.seed,
                batch: c.batch,
                python: c.python.clone(),
                workers: c.workers,
                timeout: c.timeout,
                memory_mb: c.memory_mb,
                unsafe_sandbox: c.unsafe_sandbox,
            };
            let summary = crate::eval::code::run(&settings, &|_| {}).await?;
            Ok(StepResult::Done(json!({
                "pass_at_k": summary.pass_at_k,
                "samples": summary.samples,
                "passed": summary.passed,
                "checkpoint": checkpoint,
            })))
        }
        EvalAction::Stories {
            teacher,
            settings: st,
        } => {
            let cfg = budgeted(&p.teachers[teacher], opts, *spent);
            let settings = crate::eval::stories::StorySettings {
                checkpoint: checkpoint.clone(),
                beginnings: st.beginnings.clone(),
                rubric: st.rubric.clone(),
                out: step.dir.clone(),
                max_new_tokens: st.max_new_tokens,
                gen_temperature: st.gen_temperature,
                gen_top_p: st.gen_top_p,
                seed: st.seed,
            };
            let progress = |g: &Progress| on_event(Event::Generate(step, g));
            let graded = stoppable(opts, |state| {
                crate::eval::stories::run(&settings, &cfg, state, &progress)
            })
            .await?;
            let cost = graded.grading.run.cost_usd.unwrap_or(0.0);
            *spent += cost;
            if graded.grading.stopped.is_some() || !graded.grading.complete {
                return Ok(StepResult::Incomplete(format!(
                    "{} of {} stories graded; run the same command again to grade the rest",
                    graded.summary.graded, graded.summary.stories
                )));
            }
            Ok(StepResult::Done(json!({
                "records": graded.summary.graded,
                "metrics": graded.summary.metrics,
                "cost_usd_this_run": cost,
                "checkpoint": checkpoint,
            })))
        }
    }
}

/// `RUN/scoreboard.md`: the run's training and eval numbers next to the published anchors, once
/// the training step is done.
fn write_scoreboard(p: &Pipeline, plan: &Plan) -> Result<Option<PathBuf>, PipelineError> {
    let train = plan.step(TRAIN).expect("planned");
    if StepManifest::read(&p.out, TRAIN)?.is_none_or(|m| m.id != train.id) {
        return Ok(None);
    }
    let mut run = crate::eval::scoreboard::collect(&train.dir)?;
    for s in plan
        .steps
        .iter()
        .filter(|s| matches!(s.node, Node::Eval(_)))
    {
        if !s.dir.is_dir() {
            continue;
        }
        let e = crate::eval::scoreboard::collect(&s.dir)?;
        run.code.extend(e.code);
        run.stories.extend(e.stories);
        if e.val_loss.is_some() {
            run.val_loss = e.val_loss;
        }
    }
    run.run = p.name.clone();
    let path = p.out.join("scoreboard.md");
    crate::artifact::atomic::write_bytes(
        &path,
        crate::eval::scoreboard::markdown(&[run]).as_bytes(),
    )
    .map_err(|source| PipelineError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(Some(path))
}

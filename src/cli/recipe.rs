//! `phigen train --recipe R` for whole-run recipes (the plan, the progress of each step, the
//! outcome) and `phigen lineage`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::DType;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar};

use super::train::TrainArgs;
use super::Outcome;
use crate::pipeline::manifest::Status;
use crate::pipeline::plan::{Node, Plan, TRAIN};
use crate::pipeline::{self, lineage, Event, Pipeline, PipelineError, RunOptions, RunOutcome};
use crate::train::memory::Budget;

#[derive(Debug, Clone, Args)]
pub struct LineageArgs {
    /// A directory a recipe run wrote: a data step's, the training run's (or a checkpoint in
    /// it), or an eval's.
    pub dir: PathBuf,
    /// Print the lineage as JSON instead of a tree.
    #[arg(long)]
    pub json: bool,
}

pub fn lineage(args: &LineageArgs) -> anyhow::Result<Outcome> {
    let (path, l) = lineage::find(&args.dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&l)?);
    } else {
        println!("lineage of {} ({}):", args.dir.display(), path.display());
        print!("{}", lineage::render(&l));
    }
    Ok(Outcome::Complete)
}

fn si(v: f64) -> String {
    if v >= 1e15 {
        return format!("{v:.1e}");
    }
    let (d, s) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")]
        .into_iter()
        .find(|(d, _)| v >= *d)
        .unwrap_or((1.0, ""));
    if d == 1.0 {
        format!("{v:.0}")
    } else {
        format!("{:.1}{s}", v / d)
    }
}

fn bytes(v: f64) -> String {
    format!("{}B", si(v))
}

/// The plan as a table, then totals and warnings.
pub fn print_plan(plan: &Plan, max_cost: Option<f64>) {
    println!(
        "plan of {} (run directory {}):",
        plan.recipe.display(),
        plan.run_dir.display()
    );
    println!(
        "  {:<16} {:<16} {:<8} {:>9} {:>9} {:>10} {:>9}  directory",
        "step", "kind", "status", "records", "tokens", "cost", "disk"
    );
    for s in &plan.steps {
        let e = &s.estimate;
        let cost = match (e.cost_usd, s.paid) {
            (Some(c), _) => format!("${c:.4}"),
            (None, true) => "unknown".into(),
            (None, false) => "–".into(),
        };
        let records = match (e.n, e.records) {
            (Some(n), _) => si(n as f64),
            (None, Some(r)) => format!("~{}", si(r as f64)),
            _ => "–".into(),
        };
        println!(
            "  {:<16} {:<16} {:<8} {:>9} {:>9} {:>10} {:>9}  {}",
            s.name,
            s.kind,
            s.status.name(),
            records,
            e.tokens
                .map_or("–".into(), |t| format!("~{}", si(t as f64))),
            cost,
            e.disk_bytes.map_or("–".into(), |b| bytes(b as f64)),
            s.dir.display()
        );
        if s.node == Node::Train {
            let memory = e.memory_bytes.unwrap_or(0.0);
            let usable = |free: f64| crate::train::memory::HEADROOM * free;
            let fits = match plan.device_memory_bytes {
                Some(free) if memory > usable(free) => {
                    let settings = if e.stages.iter().all(|f| f.auto && f.recompute) {
                        ""
                    } else {
                        "set checkpoint = \"blocks\" and micro_batch = \"auto\" (with batch), or "
                    };
                    format!(
                        "does NOT fit {} of the {} available: {settings}lower seq_len, or use a device with more memory",
                        bytes(usable(free)),
                        bytes(free)
                    )
                }
                Some(free) => format!(
                    "fits {} of the {} available",
                    bytes(usable(free)),
                    bytes(free)
                ),
                None => "device memory not checked".into(),
            };
            let time = match plan.train_seconds {
                Some(t) => format!(
                    ", ~{:.1} days at {:.0}% MFU of {} TFLOP/s",
                    t / 86_400.0,
                    100.0 * pipeline::plan::ASSUMED_MFU,
                    plan.peak_tflops.unwrap_or(0.0)
                ),
                None => String::new(),
            };
            println!(
                "  {:<16} training: {} tokens, {} FLOPs{time}; memory per step ~{} ({fits})",
                "",
                si(e.tokens.unwrap_or(0) as f64),
                si(e.flops.unwrap_or(0.0)),
                bytes(memory),
            );
            for f in &e.stages {
                let auto = match (f.auto, plan.device_memory_bytes) {
                    (false, _) => "",
                    (true, Some(_)) => " (auto)",
                    (true, None) => " (auto; device memory unknown: pass --device-memory GB)",
                };
                println!(
                    "  {:<16} stage `{}`: micro_batch {} × grad_accum {}{auto}, recompute {}, ~{}",
                    "",
                    f.stage,
                    f.micro_batch,
                    f.grad_accum,
                    if f.recompute { "blocks" } else { "off" },
                    bytes(f.memory_bytes)
                );
            }
        }
        if let Some(basis) = e.basis {
            if s.status != Status::Done {
                println!("  {:<16} estimate from the {basis}", "");
            }
        }
        for w in &s.warnings {
            println!("  {:<16} warning: {w}", "");
        }
    }
    let budget = max_cost.map_or(String::new(), |m| format!(" (--max-cost ${m:.2})"));
    println!(
        "  teacher cost still to come: ${:.4}{budget}{}",
        plan.cost_usd,
        if plan.unpriced.is_empty() {
            String::new()
        } else {
            format!(
                "; unknown for {} (give the teacher price_input and price_output)",
                plan.unpriced.join(", ")
            )
        }
    );
    println!("  done steps are skipped; a changed setting or input re-runs its step and those after it in new directories (the old ones stay: delete them when no longer needed)");
}

/// A progress bar per running step on stderr, prefixed with its name (none with --quiet).
struct Bars {
    quiet: bool,
    multi: MultiProgress,
    bars: Mutex<BTreeMap<String, ProgressBar>>,
}

impl Bars {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ProgressBar>> {
        self.bars.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new bar for `step`, in place of the one it had.
    fn new_bar(&self, step: &str, len: Option<u64>, template: &str) -> ProgressBar {
        let mut bar = super::progress_bar(self.quiet, len, template);
        if !self.quiet {
            bar = self.multi.add(bar);
        }
        bar.set_prefix(step.to_string());
        if let Some(old) = self.lock().insert(step.to_string(), bar.clone()) {
            old.finish_and_clear();
        }
        bar
    }

    /// The bar of `step` (a hidden one when it has none).
    fn bar(&self, step: &str) -> ProgressBar {
        self.lock()
            .get(step)
            .cloned()
            .unwrap_or_else(ProgressBar::hidden)
    }

    fn finish(&self, step: &str) {
        if let Some(bar) = self.lock().remove(step) {
            bar.finish_and_clear();
        }
    }

    fn finish_all(&self) {
        for (_, bar) in std::mem::take(&mut *self.lock()) {
            bar.finish_and_clear();
        }
    }

    /// A line on stdout, the bars cleared while it is printed.
    fn say(&self, line: String) {
        if !self.quiet {
            self.multi.suspend(|| println!("{line}"));
        }
    }

    fn on_event(&self, event: Event) {
        match event {
            Event::Skip(s) => self.say(format!("{}: done, skipped ({})", s.name, s.dir.display())),
            Event::Start(s) => {
                self.say(format!(
                    "{}: {} ({})",
                    s.name,
                    s.status.name(),
                    s.dir.display()
                ));
                self.new_bar(
                    &s.name,
                    None,
                    "{spinner} {prefix} {pos} [{elapsed_precise}] {msg}",
                );
            }
            Event::Finish(s, summary) => {
                self.finish(&s.name);
                self.say(format!("{}: finished {}", s.name, summary));
            }
            Event::Generate(s, g) => {
                let bar = self.bar(&s.name);
                bar.set_length(g.total);
                bar.set_position(g.done);
                bar.set_message(format!(
                    "records · retries {} · failed {} · dropped {} · tokens {}/{}{}",
                    g.retries,
                    g.failed,
                    g.dropped,
                    g.prompt_tokens,
                    g.completion_tokens,
                    g.spent_usd.map_or(String::new(), |c| format!(" · ${c:.4}"))
                ));
            }
            Event::Work(s, n) => self.bar(&s.name).inc(n),
            // Training runs alone, as the step `train`.
            Event::Train(e) => match e {
                crate::train::Event::StageStart {
                    stage, start_step, ..
                } => {
                    let bar = self.new_bar(
                        TRAIN,
                        Some(stage.steps as u64),
                        "{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
                    );
                    bar.set_prefix(format!("{TRAIN} {}", stage.raw.name));
                    bar.set_position(start_step as u64);
                }
                crate::train::Event::Step(m) => {
                    let bar = self.bar(TRAIN);
                    bar.set_position(m.step as u64);
                    bar.set_message(format!(
                        "loss {:.4}  {:.0} tok/s",
                        m.train_loss.unwrap_or(f64::NAN),
                        m.tokens_per_sec
                    ));
                }
                crate::train::Event::Eval(m) => self.bar(TRAIN).println(format!(
                    "step {}: val loss {:.4}",
                    m.step,
                    m.val_loss.unwrap_or(f64::NAN)
                )),
                crate::train::Event::Checkpoint(_) => {}
            },
        }
    }
}

pub async fn run(args: &TrainArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let p = Pipeline::load(&args.recipe, &args.sets, args.out.as_deref())?;
    let world = crate::train::dist::World::from_env(|v| std::env::var(v).ok())?;
    // Emitting cluster jobs needs no device here (the jobs open theirs where they run).
    let device = if args.executor.is_some() {
        candle_core::Device::Cpu
    } else {
        super::train::device(args.device, world.local_rank)?
    };
    let dtype: DType = args.dtype.into();
    let budget = Budget::of(&device, args.device_memory.map(|gb| gb * 1e9));
    if !world.is_root() && !args.plan && args.executor.is_none() {
        // Another rank of a data parallel launch: it plans once rank 0 has run the data steps.
        let opts = run_options(args, device, dtype, &p, world.clone())?;
        let replan = pipeline::plan(&p, dtype, budget, args.max_cost, args.peak_tflops);
        let trained = pipeline::run::follow_training(&p, &opts, replan).await?;
        if !quiet {
            println!(
                "rank {} of {}: {}",
                world.rank,
                world.size,
                if trained {
                    "trained with rank 0"
                } else {
                    "rank 0 finished without training"
                }
            );
        }
        return Ok(Outcome::Complete);
    }
    let plan = pipeline::plan(&p, dtype, budget, args.max_cost, args.peak_tflops).await?;
    if args.plan || !quiet {
        print_plan(&plan, args.max_cost);
    }
    if !plan.unbudgeted.is_empty() {
        eprintln!(
            "error: {}",
            PipelineError::NoBudget(plan.unbudgeted.clone())
        );
        return Ok(Outcome::Incomplete);
    }
    if args.plan {
        return Ok(Outcome::Complete);
    }
    if let Some(executor) = args.executor {
        return cluster_jobs(args, executor, &p, &plan, quiet);
    }
    let opts = run_options(args, device, dtype, &p, world)?;
    let bars = Bars {
        quiet,
        multi: MultiProgress::new(),
        bars: Mutex::new(BTreeMap::new()),
    };
    let outcome = pipeline::run(&p, &plan, &opts, &|e| bars.on_event(e)).await;
    bars.finish_all();
    pipeline::run::release_followers(&opts)?;
    Ok(match outcome? {
        RunOutcome::Complete { scoreboard } => {
            if !quiet {
                match scoreboard {
                    Some(path) => println!("{}: complete; scoreboard {}", p.name, path.display()),
                    None => println!("{}: the selected steps are done", p.name),
                }
            }
            Outcome::Complete
        }
        RunOutcome::Incomplete { step, reason } => {
            eprintln!("{step}: stopped before it finished: {reason}");
            Outcome::Incomplete
        }
        RunOutcome::TaskDone { step, task } => {
            if !quiet {
                println!(
                    "{step}: task {task} done; once all {} tasks are, the same command without a task merges them",
                    task.n
                );
            }
            Outcome::Complete
        }
        RunOutcome::Interrupted { step } => {
            eprintln!(
                "{step}: interrupted; `phigen train --recipe {}` continues where it stopped",
                args.recipe.display()
            );
            Outcome::Interrupted
        }
    })
}

/// What the runner needs from the flags; on a data parallel launch the ranks meet here (rank 0
/// then runs the recipe, the others wait to train with it).
fn run_options(
    args: &TrainArgs,
    device: candle_core::Device,
    dtype: DType,
    p: &Pipeline,
    world: crate::train::dist::World,
) -> anyhow::Result<RunOptions> {
    let comm = if world.size > 1 {
        Some(crate::train::dist::Comm::connect(&world, &p.out, &device)?)
    } else {
        None
    };
    Ok(RunOptions {
        until: args.until.clone(),
        only: args.only.clone(),
        max_cost: args.max_cost,
        device,
        dtype,
        device_memory: args.device_memory.map(|gb| gb * 1e9),
        peak_tflops: args.peak_tflops,
        stop: super::train::stop_on_signals()?,
        max_train_steps: args.max_steps,
        jobs: args.jobs,
        task: crate::artifact::task::Task::from_env(args.shard, args.shards)?,
        dedup_stage: args.dedup_stage,
        filter_stage: args.filter_stage,
        world,
        comm: Mutex::new(comm),
    })
}

/// `--executor slurm|kubernetes`: the jobs that run this recipe on a cluster, instead of running
/// it.
fn cluster_jobs(
    args: &TrainArgs,
    executor: super::train::Executor,
    p: &Pipeline,
    plan: &Plan,
    quiet: bool,
) -> anyhow::Result<Outcome> {
    use super::train::Executor;
    use clap::ValueEnum;
    let tasks = args.shards.ok_or_else(|| {
        anyhow::anyhow!("--executor: pass --shards N, the tasks of each generate, decontaminate, tokenize, filter and dedup array")
    })?;
    let absolute = |path: &std::path::Path| std::path::absolute(path).unwrap_or(path.to_path_buf());
    let mut job_args = vec![
        "--recipe".to_string(),
        absolute(&args.recipe).display().to_string(),
        "--out".to_string(),
        absolute(&p.out).display().to_string(),
    ];
    for set in &args.sets {
        job_args.extend(["--set".to_string(), set.clone()]);
    }
    let name = |v: Option<clap::builder::PossibleValue>| v.map(|v| v.get_name().to_string());
    if let Some(device) = name(args.device.to_possible_value()) {
        job_args.extend(["--device".to_string(), device]);
    }
    if let Some(dtype) = name(args.dtype.to_possible_value()) {
        job_args.extend(["--dtype".to_string(), dtype]);
    }
    if let Some(max) = args.max_cost {
        job_args.extend(["--max-cost".to_string(), max.to_string()]);
    }
    let gpu = args.device == super::train::DeviceArg::Cuda;
    let workdir = std::env::current_dir()?;
    let (what, path) = match executor {
        Executor::Slurm => {
            let opts = pipeline::cluster::SlurmOptions {
                phigen: std::env::current_exe()?,
                workdir,
                args: job_args,
                tasks,
                parallel: None,
                gpu_lines: if gpu {
                    vec!["--gres=gpu:1".to_string()]
                } else {
                    Vec::new()
                },
                train_ranks: args.train_ranks,
            };
            (
                "Slurm scripts",
                pipeline::cluster::write_scripts(p, plan, &opts)?,
            )
        }
        Executor::Kubernetes => {
            let missing = |flag: &str| {
                anyhow::anyhow!("--executor kubernetes: pass {flag} (the pods need an image with phigen on its PATH, and the run directory on a volume they all mount)")
            };
            let opts = pipeline::cluster::KubeOptions {
                image: args.image.clone().ok_or_else(|| missing("--image IMAGE"))?,
                volume_claim: args
                    .volume_claim
                    .clone()
                    .ok_or_else(|| missing("--volume-claim PVC"))?,
                workdir,
                args: job_args,
                tasks,
                gpu,
                train_ranks: args.train_ranks,
            };
            (
                "Kubernetes Jobs",
                pipeline::cluster::write_manifests(p, plan, &opts)?,
            )
        }
    };
    if !quiet {
        println!(
            "{}: {what} written; run them with `bash {}`",
            p.name,
            path.display()
        );
    }
    Ok(Outcome::Complete)
}

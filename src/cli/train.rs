//! `phigen train`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use super::model::DTypeArg;
use super::numbers::{self, f64_in, int_at_least};
use super::Outcome;
use crate::train::dist::World;
use crate::train::recipe::Recipe;
use crate::train::{self, Event, TrainOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// The device of `arg`; on CUDA, GPU `ordinal` (a data parallel rank's `LOCAL_RANK`).
pub fn device(arg: DeviceArg, ordinal: usize) -> anyhow::Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            // cudarc panics when it cannot load the driver; say it plainly instead.
            if cfg!(feature = "cuda") && !cuda_driver_present() {
                bail!("--device cuda: the NVIDIA driver library (libcuda.so.1) was not found; run on a machine with an NVIDIA GPU and its driver, or add the driver's directory to LD_LIBRARY_PATH");
            }
            Device::new_cuda(ordinal).with_context(|| format!(
                "--device cuda: GPU {ordinal}: this phigen was built without `--features cuda` (scripts/build-cuda.sh), or the GPU is not visible"
            ))
        }
    }
}

fn cuda_driver_present() -> bool {
    // SAFETY: dlopen/dlclose of a system library by a constant name; the handle is not used.
    unsafe {
        let handle = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
        true
    }
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Recipe TOML (see recipes/).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe value, e.g. --set stage.0.steps=100 --set model.preset=tiny-phi. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue from the run directory's newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Run directory [default: runs/<recipe name>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Compute dtype; master weights and AdamW moments stay fp32. bf16 is for GPUs.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Peak TFLOP/s of the device in the compute dtype, for the MFU column (e.g. 989 for an H100 in bf16).
    #[arg(long, value_parser = f64_in(numbers::above(0.0, f64::INFINITY)))]
    pub peak_tflops: Option<f64>,
    /// Memory training may plan with on the device, in GB [default: what the device reports free
    /// at the start: the CPU's MemAvailable, a CUDA GPU's free memory]. A stage needing more than
    /// 90% of it is refused; `micro_batch = "auto"` takes the largest micro-batch that fits.
    #[arg(long, value_name = "GB", value_parser = f64_in(numbers::above(0.0, f64::INFINITY)))]
    pub device_memory: Option<f64>,
    /// Stop with a checkpoint after this many steps in this invocation (`--resume` goes on).
    #[arg(long, value_parser = int_at_least(1usize))]
    pub max_steps: Option<usize>,
    /// Whole-run recipes (with [[data]] or [[eval]] steps): print every step's status and
    /// estimates (records, tokens, teacher cost, FLOPs, memory, disk) and run nothing.
    #[arg(long)]
    pub plan: bool,
    /// Whole-run recipes: run this step and the steps it needs, nothing after it.
    #[arg(long, value_name = "STEP", conflicts_with = "only")]
    pub until: Option<String>,
    /// Whole-run recipes: run only this step (the steps it reads must be done).
    #[arg(long, value_name = "STEP")]
    pub only: Option<String>,
    /// Whole-run recipes: a budget in USD for every paid teacher of this invocation together.
    #[arg(long, value_parser = f64_in(numbers::NON_NEGATIVE))]
    pub max_cost: Option<f64>,
    /// Whole-run recipes: data steps run at once, each when the steps it reads are done
    /// (training and evals run alone; with --max-cost, paid steps one at a time). The outputs
    /// are the same for any value.
    #[arg(long, default_value_t = 1, value_parser = int_at_least(1usize))]
    pub jobs: usize,
    /// Whole-run recipes, with --only STEP (a generate, decontaminate, tokenize or filter step): run as
    /// task K of an array of N, writing the step's share and a completion marker; the same
    /// command without a task then merges the N shares and finishes the step. In a Slurm array
    /// (SLURM_ARRAY_TASK_ID) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with --shards)
    /// the task comes from the environment.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<crate::artifact::task::Task>,
    /// The number of tasks of the array, where the environment gives only the task's index.
    #[arg(long, value_parser = int_at_least(1usize))]
    pub shards: Option<usize>,
    /// Whole-run recipes, with --only DEDUP_STEP: run one of dedup's array stages
    /// (signatures, buckets, clusters, filter; all but clusters as --shard / array tasks); the
    /// same command without a stage then finishes the step.
    #[arg(long, value_enum, requires = "only")]
    pub dedup_stage: Option<crate::dedup::stages::Stage>,
    /// Whole-run recipes, with --only FILTER_STEP: `classifier` rates the sample and trains the
    /// classifier (one job, before the array); `score` scores the files (as --shard / array
    /// tasks); the same command without a stage then merges the tasks' outputs.
    #[arg(long, value_enum, requires = "only", conflicts_with = "dedup_stage")]
    pub filter_stage: Option<crate::classify::pipeline::Stage>,
    /// Whole-run recipes: write the jobs that run the recipe on a cluster instead of running it
    /// here: Slurm (OUT/slurm/submit.sh submits one job per step, generate, decontaminate,
    /// tokenize and filter steps as arrays of --shards tasks each followed by its merge, chained with
    /// --dependency=afterok) or Kubernetes (OUT/kubernetes/apply.sh applies one Job per step,
    /// Indexed Jobs for the arrays, each after the last completes).
    #[arg(long, value_enum)]
    pub executor: Option<Executor>,
    /// With --executor: train data parallel on this many ranks (Slurm: `srun` over `--ntasks`,
    /// one GPU a task with --device cuda; Kubernetes: `torchrun --no-python` in one pod with as
    /// many GPUs).
    #[arg(long, default_value_t = 1, value_parser = int_at_least(1usize), requires = "executor")]
    pub train_ranks: usize,
    /// With --executor kubernetes: the container image, with `phigen` on its PATH.
    #[arg(long)]
    pub image: Option<String>,
    /// With --executor kubernetes: the PersistentVolumeClaim holding the working directory (the
    /// recipe, its inputs and the run directory), mounted at the same path in every pod.
    #[arg(long)]
    pub volume_claim: Option<String>,
}

/// Where a whole-run recipe runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Executor {
    /// Emit sbatch scripts (OUT/slurm/) instead of running.
    Slurm,
    /// Emit Kubernetes Job manifests, Indexed Jobs for the arrays (OUT/kubernetes/), instead of
    /// running.
    Kubernetes,
}

/// A flag the first SIGINT / SIGTERM sets (a checkpoint after the current step, requests in
/// flight saved); a second one exits at once with 130.
pub fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop))
            .context("installing the signal handler")?;
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    Ok(stop)
}

pub fn train(args: &TrainArgs, quiet: bool) -> anyhow::Result<Outcome> {
    if args.plan
        || args.until.is_some()
        || args.only.is_some()
        || args.max_cost.is_some()
        || args.jobs != 1
    {
        anyhow::bail!(
            "--plan, --until, --only, --max-cost and --jobs are for whole-run recipes; {} has no [[data]] or [[eval]] steps",
            args.recipe.display()
        );
    }
    let world = World::from_env(|v| std::env::var(v).ok())?;
    let recipe = Recipe::load(&args.recipe, &args.sets)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&recipe.raw.name));
    let stop = stop_on_signals()?;
    let dtype: DType = args.dtype.into();
    let opts = TrainOptions {
        recipe,
        out: out.clone(),
        resume: args.resume,
        device: device(args.device, world.local_rank)?,
        dtype,
        peak_tflops: args.peak_tflops,
        stop: Arc::clone(&stop),
        max_steps_this_run: args.max_steps,
        device_memory: args.device_memory.map(|gb| gb * 1e9),
        world,
    };
    let mut bar = ProgressBar::hidden();
    let outcome = train::run(&opts, |event| match event {
        Event::StageStart {
            stage,
            start_step,
            params,
            memory_gb,
            ..
        } => {
            bar.finish_and_clear();
            tracing::info!(
                "stage `{}`: {} steps of {} tokens (micro_batch {}{} × grad_accum {}, recompute {}), {:.1}M parameters, about {:.1} GB, from step {}",
                stage.raw.name,
                stage.steps,
                stage.tokens_per_step(),
                stage.micro_batch,
                if stage.is_auto() { " (auto)" } else { "" },
                stage.grad_accum,
                if stage.recompute().is_off() { "off" } else { "blocks" },
                params as f64 / 1e6,
                memory_gb,
                start_step
            );
            bar = if quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(stage.steps as u64)
            };
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(stage.raw.name.clone());
            bar.set_position(start_step as u64);
            bar.reset_eta();
        }
        Event::Step(m) => {
            bar.set_position(m.step as u64);
            bar.set_message(format!(
                "loss {:.4}  {:.0} tok/s",
                m.train_loss.unwrap_or(f64::NAN),
                m.tokens_per_sec
            ));
        }
        Event::Eval(m) => bar.println(format!(
            "step {}: val loss {:.4}",
            m.step,
            m.val_loss.unwrap_or(f64::NAN)
        )),
        Event::Checkpoint(dir) => tracing::debug!("checkpoint {}", dir.display()),
    })?;
    bar.finish_and_clear();
    match outcome {
        train::Outcome::Finished => {
            tracing::info!("done: {}", out.display());
            Ok(Outcome::Complete)
        }
        train::Outcome::Stopped => {
            tracing::info!(
                "stopped with a checkpoint; `phigen train --recipe {} --resume` goes on",
                args.recipe.display()
            );
            Ok(if stop.load(Ordering::SeqCst) {
                Outcome::Interrupted
            } else {
                Outcome::Incomplete
            })
        }
    }
}

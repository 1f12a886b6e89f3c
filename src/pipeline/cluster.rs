//! `phigen train --recipe R --executor slurm|kubernetes`: the recipe as cluster jobs instead of a
//! local run.
//!
//! Slurm ([`write_scripts`]) writes `OUT/slurm/`: one script per step that is not done, in plan order, and `submit.sh`,
//! which submits them with `sbatch --parsable`, each with `--dependency=afterok:` on the jobs of
//! the steps it reads. A generate, decontaminate or tokenize step is a job array of N tasks
//! (`--array=0-(N-1)`, `%W` at most W at once), each running `phigen train … --only STEP`, which
//! finds its task in `SLURM_ARRAY_TASK_ID` ([`crate::artifact::task`]); a second job, after the
//! array, runs the same command without a task and merges the N shares into the step. A dedup
//! step is its four array stages (`--dedup-stage signatures|buckets|clusters|filter`, clusters as
//! one task) and a job that finishes it; a filter step is one job that rates the sample and trains
//! the classifier (`--filter-stage classifier`), an array that scores the files, and the merge.
//! Every other step is one job. Logs go to `OUT/slurm/logs/`.
//!
//! Kubernetes ([`write_manifests`]) writes `OUT/kubernetes/`: one Job manifest per step, an
//! Indexed Job of N completions for the steps that shard (each pod finds its task in
//! `JOB_COMPLETION_INDEX`; the command passes `--shards N`) followed by a one-pod merge Job (a
//! filter's classifier Job and dedup's stages as for Slurm), and
//! `apply.sh`, which applies them in plan order, waiting for each to complete
//! (`kubectl wait --for=condition=complete`). The run directory must be on a volume every pod
//! mounts at the same path (`--volume-claim`), since steps read each other's outputs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::manifest::Status;
use super::plan::{Node, Plan, PlannedStep};
use super::recipe::{Action, Pipeline};
use super::PipelineError;
use crate::artifact::atomic;

/// How the emitted jobs run.
pub struct SlurmOptions {
    /// The phigen binary the jobs run (absolute).
    pub phigen: PathBuf,
    /// The directory the jobs start in (the recipe's relative paths are read from there).
    pub workdir: PathBuf,
    /// The arguments every job passes to `phigen train` (recipe, --out, --set …), before --only.
    pub args: Vec<String>,
    /// Tasks per array.
    pub tasks: usize,
    /// Tasks of one array running at once (`%W`); `None`: as many as Slurm gives.
    pub parallel: Option<usize>,
    /// `#SBATCH` lines for the training and eval jobs (e.g. `--gres=gpu:1`).
    pub gpu_lines: Vec<String>,
    /// Ranks of data parallel training (above 1: the training job is `--ntasks` ranks started
    /// by `srun`, one GPU each when `gpu_lines` ask for GPUs).
    pub train_ranks: usize,
}

/// One job of the chain.
struct Job {
    file: String,
    var: String,
    array: bool,
    after: Vec<String>,
}

/// Writes the scripts; returns `submit.sh`.
pub fn write_scripts(
    p: &Pipeline,
    plan: &Plan,
    o: &SlurmOptions,
) -> Result<PathBuf, PipelineError> {
    let dir = p.out.join("slurm");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|source| PipelineError::Io {
        path: logs.clone(),
        source,
    })?;
    let mut jobs: Vec<Job> = Vec::new();
    let todo: Vec<&PlannedStep> = plan
        .steps
        .iter()
        .filter(|s| s.status != Status::Done)
        .collect();
    for (n, step) in todo.iter().enumerate() {
        let var = shell_var(&step.name);
        // The jobs of upstream steps that are not done yet (done ones need no wait); each job of
        // a step after the first waits for the one before it.
        let mut after: Vec<String> = step
            .upstream
            .iter()
            .filter(|u| todo.iter().any(|s| &s.name == *u))
            .map(|u| shell_var(u))
            .collect();
        let gpu = on_gpu(p, step);
        for part in step_jobs(p, step, o.tasks) {
            let file = format!("{n:02}-{}{}.sbatch", step.name, part.suffix);
            write(&dir.join(&file), &script(o, step, &logs, &part, gpu))?;
            jobs.push(Job {
                file,
                var: var.clone(),
                array: part.tasks.is_some(),
                after: std::mem::replace(&mut after, vec![var.clone()]),
            });
        }
    }
    let mut submit = String::from(
        "#!/bin/bash\n# Submits the recipe's steps to Slurm, each after the steps it reads (written by\n# `phigen train --executor slurm`; run it from anywhere).\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n",
    );
    for job in &jobs {
        let dependency = if job.after.is_empty() {
            String::new()
        } else {
            let ids: Vec<String> = job.after.iter().map(|v| format!("${v}")).collect();
            format!(" --dependency=afterok:{}", ids.join(":"))
        };
        let what = if job.array { "array" } else { "job" };
        let _ = writeln!(
            submit,
            "{}=$(sbatch --parsable{dependency} {})\necho \"submitted {} ({what} ${})\"",
            job.var, job.file, job.file, job.var
        );
    }
    let path = dir.join("submit.sh");
    write(&path, &submit)?;
    Ok(path)
}

/// One job of a step: its file-name suffix, its array size, and the flags it adds.
struct StepJob {
    suffix: &'static str,
    tasks: Option<usize>,
    flags: Vec<String>,
}

/// The jobs that run `step`, in order: an array of `tasks` and its merge for generate,
/// decontaminate and tokenize; the classifier job, the scoring array and the merge for a filter;
/// dedup's four array stages (clusters as one task) and the job that finishes the step; one job
/// for anything else.
fn step_jobs(p: &Pipeline, step: &PlannedStep, tasks: usize) -> Vec<StepJob> {
    let job = |suffix, tasks, flags: &[&str]| StepJob {
        suffix,
        tasks,
        flags: flags.iter().map(|f| f.to_string()).collect(),
    };
    let action = match step.node {
        Node::Data(i) => Some(&p.data[i].action),
        _ => None,
    };
    match action {
        // A topic expansion runs as one task (each level reads the whole level before).
        Some(Action::Generate {
            corpus: crate::generate::run::CorpusSettings::Topics(_),
            ..
        }) => vec![job("", None, &[])],
        Some(Action::Generate { .. } | Action::Decontaminate(_) | Action::Tokenize(_)) => {
            vec![job("", Some(tasks), &[]), job("-merge", None, &[])]
        }
        Some(Action::Filter { .. }) => vec![
            job("-classifier", None, &["--filter-stage", "classifier"]),
            job("-score", Some(tasks), &["--filter-stage", "score"]),
            job("-merge", None, &[]),
        ],
        Some(Action::Dedup(_)) => vec![
            job("-signatures", Some(tasks), &["--dedup-stage", "signatures"]),
            job("-buckets", Some(tasks), &["--dedup-stage", "buckets"]),
            job("-clusters", None, &["--dedup-stage", "clusters"]),
            job("-filter", Some(tasks), &["--dedup-stage", "filter"]),
            job("-finish", None, &[]),
        ],
        _ => vec![job("", None, &[])],
    }
}

fn script(o: &SlurmOptions, step: &PlannedStep, logs: &Path, part: &StepJob, gpu: bool) -> String {
    let tasks = part.tasks;
    let mut s = format!("#!/bin/bash\n#SBATCH --job-name=phigen-{}\n", step.name);
    match tasks {
        Some(n) => {
            let limit = o.parallel.map_or(String::new(), |w| format!("%{w}"));
            let _ = writeln!(s, "#SBATCH --array=0-{}{limit}", n - 1);
            let _ = writeln!(
                s,
                "#SBATCH --output={}",
                logs.join(format!("{}-%A_%a.out", step.name)).display()
            );
        }
        None => {
            let _ = writeln!(
                s,
                "#SBATCH --output={}",
                logs.join(format!("{}-%j.out", step.name)).display()
            );
        }
    }
    let ranks = if step.node == Node::Train {
        o.train_ranks
    } else {
        1
    };
    if ranks > 1 {
        // srun starts one rank a task; each finds its rank in SLURM_PROCID (src/train/dist.rs).
        let _ = writeln!(s, "#SBATCH --ntasks={ranks}");
        if gpu && !o.gpu_lines.is_empty() {
            let _ = writeln!(s, "#SBATCH --gpus-per-task=1");
        }
    } else if gpu {
        for line in &o.gpu_lines {
            let _ = writeln!(s, "#SBATCH {line}");
        }
    }
    let mut command = Vec::new();
    if ranks > 1 {
        // A rank that fails ends the others (they would otherwise wait in a collective).
        command.extend(["srun".to_string(), "--kill-on-bad-exit=1".to_string()]);
    }
    command.extend([quote(&o.phigen.display().to_string()), "train".to_string()]);
    command.extend(o.args.iter().map(|a| quote(a)));
    command.extend(["--only".to_string(), quote(&step.name)]);
    command.extend(part.flags.iter().cloned());
    if let Some(n) = tasks {
        // SLURM_ARRAY_TASK_ID and _COUNT say which task; --shards makes the size explicit.
        command.extend(["--shards".to_string(), n.to_string()]);
    }
    let _ = write!(
        s,
        "set -euo pipefail\ncd {}\nexec {}\n",
        quote(&o.workdir.display().to_string()),
        command.join(" ")
    );
    s
}

fn write(path: &Path, text: &str) -> Result<(), PipelineError> {
    atomic::write_bytes(path, text.as_bytes()).map_err(|source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
    }
    Ok(())
}

/// A shell variable for a step's job id (`j_` + the name, `-` as `_`).
fn shell_var(step: &str) -> String {
    format!("j_{}", step.replace(['-', '.', ':'], "_"))
}

/// `s` as one shell word.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// How the emitted Kubernetes Jobs run.
pub struct KubeOptions {
    /// The container image with `phigen` on its PATH.
    pub image: String,
    /// The PersistentVolumeClaim that holds the working directory, mounted at `workdir`.
    pub volume_claim: String,
    /// The working directory (the recipe's relative paths are read from there).
    pub workdir: PathBuf,
    /// The arguments every job passes to `phigen train` (recipe, --out, --set …), before --only.
    pub args: Vec<String>,
    /// Completions per Indexed Job.
    pub tasks: usize,
    /// Training and eval pods ask for one GPU (`nvidia.com/gpu: 1`).
    pub gpu: bool,
    /// Ranks of data parallel training (above 1: the training pod asks for that many GPUs and
    /// starts the ranks with `torchrun --no-python`, which the image must have).
    pub train_ranks: usize,
}

/// Writes the Job manifests and `apply.sh`; returns `apply.sh`.
pub fn write_manifests(
    p: &Pipeline,
    plan: &Plan,
    o: &KubeOptions,
) -> Result<PathBuf, PipelineError> {
    let dir = p.out.join("kubernetes");
    std::fs::create_dir_all(&dir).map_err(|source| PipelineError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut apply = String::from(
        "#!/bin/bash\n# Runs the recipe's steps as Kubernetes Jobs, one after another (written by\n# `phigen train --executor kubernetes`; run it from anywhere).\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n",
    );
    let todo = plan.steps.iter().filter(|s| s.status != Status::Done);
    for (n, step) in todo.enumerate() {
        let gpu = o.gpu && on_gpu(p, step);
        for part in step_jobs(p, step, o.tasks) {
            let base = format!("{n:02}-{}{}", step.name, part.suffix);
            let name = job_name(&p.name, &base);
            let file = format!("{base}.yaml");
            write(&dir.join(&file), &manifest(o, step, &name, &part, gpu))?;
            let _ = writeln!(
                apply,
                "kubectl apply -f {file}\nkubectl wait --for=condition=complete --timeout=-1s job/{name}"
            );
        }
    }
    let path = dir.join("apply.sh");
    write(&path, &apply)?;
    Ok(path)
}

/// A Job name Kubernetes accepts (DNS-1123: lower-case letters, digits and `-`, at most 63).
fn job_name(recipe: &str, base: &str) -> String {
    let raw = format!("phigen-{recipe}-{base}").to_lowercase();
    let name: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

fn manifest(o: &KubeOptions, step: &PlannedStep, name: &str, part: &StepJob, gpu: bool) -> String {
    let ranks = if step.node == Node::Train {
        o.train_ranks
    } else {
        1
    };
    let mut command: Vec<String> = Vec::new();
    if ranks > 1 {
        // torchrun starts the ranks in the pod; each finds its rank in RANK (src/train/dist.rs).
        command.extend(["torchrun", "--no-python", "--nproc-per-node"].map(String::from));
        command.push(ranks.to_string());
    }
    command.extend(["phigen".to_string(), "train".to_string()]);
    command.extend(o.args.iter().cloned());
    command.extend(["--only".to_string(), step.name.clone()]);
    command.extend(part.flags.iter().cloned());
    let indexed = match part.tasks {
        Some(n) => {
            command.extend(["--shards".to_string(), n.to_string()]);
            format!("  completionMode: Indexed\n  completions: {n}\n  parallelism: {n}\n  backoffLimitPerIndex: 3\n")
        }
        None => "  backoffLimit: 3\n".to_string(),
    };
    // JSON strings are YAML flow scalars: every argument quoted safely.
    let command = serde_json::to_string(&command).expect("strings serialize");
    let workdir = serde_json::to_string(&o.workdir.display().to_string()).expect("a string");
    let resources = if gpu {
        format!("        resources:\n          limits:\n            nvidia.com/gpu: {ranks}\n")
    } else {
        String::new()
    };
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\n  labels:\n    app.kubernetes.io/name: phigen\nspec:\n{indexed}  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: phigen\n        image: {image}\n        workingDir: {workdir}\n        command: {command}\n{resources}        volumeMounts:\n        - name: run\n          mountPath: {workdir}\n      volumes:\n      - name: run\n        persistentVolumeClaim:\n          claimName: {claim}\n",
        image = serde_json::to_string(&o.image).expect("a string"),
        claim = serde_json::to_string(&o.volume_claim).expect("a string"),
    )
}

/// Whether a step computes with the model: training, evals, and a prefs step whose student is a
/// training stage (it trains the stages up to it first).
fn on_gpu(p: &Pipeline, step: &PlannedStep) -> bool {
    match step.node {
        Node::Data(i) => p.student_stage(&p.data[i]).is_some(),
        Node::Train | Node::Eval(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words with spaces, quotes or shell characters come back as one word (what bash reads
    /// `'it'\''s'` as: it's).
    #[test]
    fn words_are_quoted_for_the_shell() {
        assert_eq!(quote("runs/demo"), "runs/demo");
        assert_eq!(quote("teacher.model=\"x\""), "'teacher.model=\"x\"'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(shell_var("tok-textbooks"), "j_tok_textbooks");
    }

    /// Job names are DNS-1123 labels: lower case, `-` for anything else, at most 63 characters
    /// (Kubernetes' rule for Job names that pods are named after).
    #[test]
    fn job_names_are_dns_labels() {
        assert_eq!(job_name("phi-1", "00-tok_text"), "phigen-phi-1-00-tok-text");
        let long = job_name(&"x".repeat(80), "01-a");
        assert_eq!(long.len(), 63);
        assert!(long
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '-' || c.is_ascii_digit()));
    }
}

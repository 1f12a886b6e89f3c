//! `phigen train --recipe R --executor slurm`: the recipe as Slurm batch scripts instead of a
//! local run.
//!
//! Writes `OUT/slurm/`: one script per step that is not done, in plan order, and `submit.sh`,
//! which submits them with `sbatch --parsable`, each with `--dependency=afterok:` on the jobs of
//! the steps it reads. A generate, decontaminate or tokenize step is a job array of N tasks
//! (`--array=0-(N-1)`, `%W` at most W at once), each running `phigen train … --only STEP`, which
//! finds its task in `SLURM_ARRAY_TASK_ID` ([`crate::artifact::task`]); a second job, after the
//! array, runs the same command without a task and merges the N shares into the step. Every other
//! step is one job. Logs go to `OUT/slurm/logs/`.

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
        // The jobs of upstream steps that are not done yet (done ones need no wait).
        let after: Vec<String> = step
            .upstream
            .iter()
            .filter(|u| todo.iter().any(|s| &s.name == *u))
            .map(|u| shell_var(u))
            .collect();
        let gpu = matches!(step.node, Node::Train | Node::Eval(_));
        let base = format!("{n:02}-{}", step.name);
        if shardable(p, step) {
            let file = format!("{base}.sbatch");
            write(
                &dir.join(&file),
                &script(o, step, &logs, Some(o.tasks), gpu),
            )?;
            jobs.push(Job {
                file,
                var: var.clone(),
                array: true,
                after,
            });
            let file = format!("{base}-merge.sbatch");
            write(&dir.join(&file), &script(o, step, &logs, None, gpu))?;
            jobs.push(Job {
                file,
                var: var.clone(),
                array: false,
                after: vec![var],
            });
        } else {
            let file = format!("{base}.sbatch");
            write(&dir.join(&file), &script(o, step, &logs, None, gpu))?;
            jobs.push(Job {
                file,
                var,
                array: false,
                after,
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

/// Steps that run as arrays: generate, decontaminate, tokenize.
fn shardable(p: &Pipeline, step: &PlannedStep) -> bool {
    match step.node {
        Node::Data(i) => matches!(
            p.data[i].action,
            Action::Generate { .. } | Action::Decontaminate(_) | Action::Tokenize(_)
        ),
        _ => false,
    }
}

fn script(
    o: &SlurmOptions,
    step: &PlannedStep,
    logs: &Path,
    tasks: Option<usize>,
    gpu: bool,
) -> String {
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
    if gpu {
        for line in &o.gpu_lines {
            let _ = writeln!(s, "#SBATCH {line}");
        }
    }
    let mut command = vec![quote(&o.phigen.display().to_string()), "train".to_string()];
    command.extend(o.args.iter().map(|a| quote(a)));
    command.extend(["--only".to_string(), quote(&step.name)]);
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
}

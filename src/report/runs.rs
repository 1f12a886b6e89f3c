//! Training runs (`metrics.jsonl`, one [`Metrics`] line per logged step, as the trainer writes
//! it) and evaluation outputs (`results.jsonl` of `phigen eval humaneval|mbpp`,
//! `continuations.jsonl` and grades of `phigen eval stories`) found in a directory.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::svg::Series;
use super::ReportError;
use crate::artifact::table;
use crate::eval::scoreboard::files_below;
use crate::train::{Metrics, METRICS_FILE};

/// One training run's logged steps, in file order.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: String,
    pub metrics: Vec<Metrics>,
}

/// Reads `dir/metrics.jsonl` (lines that do not parse, such as a torn last line, are skipped).
pub fn read_run(dir: &Path, name: String) -> Result<Run, ReportError> {
    let path = dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| ReportError::Io {
        path: path.clone(),
        source,
    })?;
    let metrics = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok(Run { name, metrics })
}

/// Tokens seen since the start of the run: a stage's `tokens` count from its own start, so each
/// stage is offset by the tokens of the stages before it.
fn run_tokens(metrics: &[Metrics]) -> Vec<f64> {
    let mut offset = 0u64;
    let mut stage: Option<&str> = None;
    let mut last = 0u64;
    metrics
        .iter()
        .map(|m| {
            if stage != Some(m.stage.as_str()) {
                offset += last;
                last = 0;
                stage = Some(&m.stage);
            }
            last = last.max(m.tokens);
            (offset + m.tokens) as f64
        })
        .collect()
}

/// One series per (run, stage) of `value` against tokens seen; steps without the value are left
/// out, and so are series with no point.
pub fn series(runs: &[Run], value: impl Fn(&Metrics) -> Option<f64>) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for run in runs {
        for (m, x) in run.metrics.iter().zip(run_tokens(&run.metrics)) {
            let Some(y) = value(m) else { continue };
            let name = format!("{} · {}", run.name, m.stage);
            match out.last_mut().filter(|s| s.name == name) {
                Some(s) => s.points.push((x, y)),
                None => out.push(Series {
                    name,
                    points: vec![(x, y)],
                }),
            }
        }
    }
    out
}

/// A stage's totals for the table under the charts.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRow {
    pub run: String,
    pub stage: String,
    pub steps: usize,
    pub tokens: u64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub tokens_per_sec: f64,
    /// Mean model-FLOPs utilisation over the steps that report it.
    pub mfu: Option<f64>,
}

pub fn stages(runs: &[Run]) -> Vec<StageRow> {
    let mut rows: Vec<StageRow> = Vec::new();
    let mut mfu_n = 0usize;
    for run in runs {
        for m in &run.metrics {
            let same = rows
                .last()
                .is_some_and(|r| r.run == run.name && r.stage == m.stage);
            if !same {
                mfu_n = 0;
                rows.push(StageRow {
                    run: run.name.clone(),
                    stage: m.stage.clone(),
                    steps: 0,
                    tokens: 0,
                    train_loss: None,
                    val_loss: None,
                    tokens_per_sec: 0.0,
                    mfu: None,
                });
            }
            let r = rows.last_mut().expect("pushed above");
            r.steps = r.steps.max(m.step);
            r.tokens = r.tokens.max(m.tokens);
            r.train_loss = m.train_loss.or(r.train_loss);
            r.val_loss = m.val_loss.or(r.val_loss);
            if m.train_loss.is_some() {
                // Training steps carry the throughput; eval lines repeat the last one.
                r.tokens_per_sec = m.tokens_per_sec;
            }
            if let Some(mfu) = m.mfu {
                mfu_n += 1;
                r.mfu = Some(r.mfu.unwrap_or(0.0) + (mfu - r.mfu.unwrap_or(0.0)) / mfu_n as f64);
            }
        }
    }
    rows
}

/// A completion an evaluation judged, with its verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub source: PathBuf,
    pub title: String,
    pub verdict: String,
    pub text: String,
}

/// Up to `per_file` passed and `per_file` failed code samples of each `results.jsonl`, and up to
/// `per_file` graded stories of each `continuations.jsonl`, below `dir` (three levels).
pub fn judged(dir: &Path, per_file: usize) -> Vec<Judged> {
    let mut files = Vec::new();
    files_below(dir, 3, &mut files);
    let mut out = Vec::new();
    for f in files {
        match f.file_name().and_then(|n| n.to_str()) {
            Some("results.jsonl") => out.extend(code_results(&f, per_file)),
            Some("continuations.jsonl") => out.extend(stories(&f, per_file)),
            _ => {}
        }
    }
    out
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn code_results(path: &Path, per_file: usize) -> Vec<Judged> {
    let rows = jsonl(path);
    let pick = |passed: bool| {
        rows.iter()
            .filter(move |r| r["passed"].as_bool() == Some(passed))
            .take(per_file)
    };
    pick(true)
        .chain(pick(false))
        .map(|r| Judged {
            source: path.to_path_buf(),
            title: r["task_id"].as_str().unwrap_or("?").to_string(),
            verdict: r["result"].as_str().unwrap_or("?").to_string(),
            text: r["completion"].as_str().unwrap_or("").to_string(),
        })
        .collect()
}

/// Stories and, where a judge graded them (`grades/*/part-*.parquet` next to the file), their
/// grades.
fn stories(path: &Path, per_file: usize) -> Vec<Judged> {
    let grades = path
        .parent()
        .map(|d| grades_by_index(&d.join("grades")))
        .unwrap_or_default();
    jsonl(path)
        .iter()
        .take(per_file)
        .map(|c| {
            let index = c["index"].as_u64().unwrap_or(0);
            Judged {
                source: path.to_path_buf(),
                title: format!("story {index}"),
                verdict: grades
                    .iter()
                    .find(|(i, _)| *i == index)
                    .map_or("not graded".to_string(), |(_, g)| g.clone()),
                text: format!(
                    "{}{}",
                    c["beginning"].as_str().unwrap_or(""),
                    c["completion"].as_str().unwrap_or("")
                ),
            }
        })
        .collect()
}

/// (story index, "grammar 7, creativity 6, …") of every graded story below `dir`.
fn grades_by_index(dir: &Path) -> Vec<(u64, String)> {
    let mut files = Vec::new();
    files_below(dir, 1, &mut files);
    let metrics = ["grammar", "creativity", "consistency", "plot"];
    let mut out = Vec::new();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "parquet"))
    {
        let mut columns = vec!["index"];
        columns.extend(metrics);
        let Ok(df) = table::read_columns(f, &columns) else {
            continue;
        };
        let Ok(index) = table::int_column(&df, f, "index") else {
            continue;
        };
        let scores: Vec<Vec<Option<i64>>> = metrics
            .iter()
            .map(|m| table::int_column(&df, f, m).unwrap_or_default())
            .collect();
        for (row, i) in index.iter().enumerate() {
            let Some(i) = i else { continue };
            let text: Vec<String> = metrics
                .iter()
                .zip(&scores)
                .filter_map(|(m, s)| s.get(row).copied().flatten().map(|v| format!("{m} {v}")))
                .collect();
            out.push((*i as u64, text.join(", ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(stage: &str, step: usize, tokens: u64, loss: f64, mfu: Option<f64>) -> Metrics {
        Metrics {
            stage: stage.into(),
            step,
            tokens,
            train_loss: Some(loss),
            val_loss: None,
            lr: 1e-3,
            grad_norm: Some(1.0),
            tokens_per_sec: 100.0,
            tflops: 1.0,
            mfu,
            comm_secs: None,
            reward_accuracy: None,
            reward_margin: None,
        }
    }

    /// The second stage's tokens continue from the first stage's last count (100 + 50).
    #[test]
    fn stages_follow_each_other_on_the_token_axis() {
        let run = Run {
            name: "r".into(),
            metrics: vec![
                m("a", 1, 50, 3.0, Some(0.2)),
                m("a", 2, 100, 2.0, Some(0.4)),
                m("b", 1, 50, 1.5, None),
            ],
        };
        let s = series(std::slice::from_ref(&run), |m| m.train_loss);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].points, vec![(50.0, 3.0), (100.0, 2.0)]);
        assert_eq!(s[1].name, "r · b");
        assert_eq!(s[1].points, vec![(150.0, 1.5)]);
        let rows = stages(&[run]);
        assert_eq!(rows.len(), 2);
        assert!((rows[0].mfu.unwrap() - 0.3).abs() < 1e-12);
        assert_eq!((rows[0].steps, rows[0].tokens), (2, 100));
        assert_eq!(rows[1].mfu, None);
    }
}

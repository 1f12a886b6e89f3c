//! The reproduction scoreboard: each run's numbers next to the published anchors.
//!
//! A run is a directory holding any of: a training run (`metrics.jsonl`, checkpoints with
//! `config.json`), `phigen eval humaneval|mbpp` outputs (`summary.json`), `phigen eval stories`
//! output (`stories.json`) and `phigen eval loss --out` reports (any `*.json` with `perplexity`),
//! found in the directory and one level below.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::EvalError;

/// Published numbers a phigen run can be compared with (sources in `../shared/seeds/`).
pub const ANCHORS: &[(&str, &str, &str)] = &[
    (
        "phi-1 (1.3B, 7B tokens, CodeTextbook + CodeExercises)",
        "HumanEval pass@1",
        "50.6%",
    ),
    (
        "phi-1-base (1.3B, before CodeExercises finetuning)",
        "HumanEval pass@1",
        "29%",
    ),
    ("phi-1-small (350M)", "HumanEval pass@1", "45%"),
    (
        "350M ablation: The Stack unfiltered → filtered → + synthetic",
        "HumanEval pass@1",
        "12.19% → 17.68% → 20.12%",
    ),
    (
        "llama2.c TinyStories 260K / 15M / 42M / 110M (Llama 2 tokenizer, 32K)",
        "validation loss",
        "1.297 / 1.072 / 0.847 / 0.760",
    ),
];

#[derive(Clone, Debug, Default, Serialize)]
pub struct Run {
    pub run: String,
    pub parameters: Option<u64>,
    pub tokens_seen: Option<u64>,
    pub val_loss: Option<f64>,
    /// `humaneval pass@1` → value, `mbpp pass@1` → value, …
    pub code: BTreeMap<String, f64>,
    /// Story grade means by metric.
    pub stories: BTreeMap<String, f64>,
    pub tokenizer: Option<String>,
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The files below `dir` (at most `depth` directories down), in path order; unreadable
/// directories are passed over.
pub(crate) fn files_below(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            if depth > 0 {
                files_below(&p, depth - 1, out);
            }
        } else {
            out.push(p);
        }
    }
}

/// What a run directory holds.
pub fn collect(dir: &Path) -> Result<Run, EvalError> {
    if !dir.is_dir() {
        return Err(EvalError::Usage(format!(
            "{}: not a directory; pass training run or evaluation output directories",
            dir.display()
        )));
    }
    let mut run = Run {
        run: dir.display().to_string(),
        ..Run::default()
    };
    let mut files = Vec::new();
    files_below(dir, 3, &mut files);
    let mut last_tokens: BTreeMap<String, u64> = BTreeMap::new();
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == crate::train::METRICS_FILE {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            for line in text.lines() {
                let Ok(m) = serde_json::from_str::<crate::train::Metrics>(line) else {
                    continue;
                };
                last_tokens.insert(m.stage.clone(), m.tokens);
                if m.val_loss.is_some() {
                    run.val_loss = m.val_loss;
                }
            }
        } else if name == "config.json" && run.parameters.is_none() {
            if let Ok(cfg) = crate::model::checkpoint::read_config(f.parent().unwrap_or(dir)) {
                run.parameters = Some(cfg.parameter_count() as u64);
            }
        } else if name == crate::model::tokenizer::PHIGEN_FILE {
            if run.tokenizer.is_none() {
                // A tiktoken name, or a tokenizer file's path.
                run.tokenizer = read_json(f).and_then(|v| {
                    let t = &v["tokenizer"];
                    t.as_str().or(t["path"].as_str()).map(str::to_string)
                });
            }
        } else if name.ends_with(".json") {
            let Some(v) = read_json(f) else { continue };
            if let (Some(bench), Some(pass)) = (v["benchmark"].as_str(), v["pass_at_k"].as_object())
            {
                for (k, p) in pass {
                    if let Some(p) = p.as_f64() {
                        run.code.insert(format!("{bench} {k}"), p);
                    }
                }
            } else if let Some(metrics) =
                v["metrics"].as_object().filter(|_| v["judge"].is_string())
            {
                for (k, m) in metrics {
                    if let Some(mean) = m["mean"].as_f64() {
                        run.stories.insert(k.clone(), mean);
                    }
                }
            } else if let (Some(loss), true) = (v["loss"].as_f64(), v["perplexity"].is_number()) {
                run.val_loss = Some(loss);
            }
        }
    }
    if !last_tokens.is_empty() {
        run.tokens_seen = Some(last_tokens.values().sum());
    }
    Ok(run)
}

fn cell<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or("–".to_string(), f)
}

/// The scoreboard as Markdown: the runs, then the anchors.
pub fn markdown(runs: &[Run]) -> String {
    let mut code_cols: Vec<String> = runs.iter().flat_map(|r| r.code.keys().cloned()).collect();
    code_cols.sort();
    code_cols.dedup();
    let mut story_cols: Vec<String> = runs
        .iter()
        .flat_map(|r| r.stories.keys().cloned())
        .collect();
    story_cols.sort();
    story_cols.dedup();
    let mut head = vec![
        "run".to_string(),
        "parameters".into(),
        "tokens seen".into(),
        "val loss".into(),
    ];
    head.extend(code_cols.iter().cloned());
    head.extend(story_cols.iter().map(|s| format!("stories: {s}")));
    let mut out = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
    for r in runs {
        let mut row = vec![
            r.run.clone(),
            cell(r.parameters, |p| format!("{:.1}M", p as f64 / 1e6)),
            cell(r.tokens_seen, |t| format!("{:.2}M", t as f64 / 1e6)),
            cell(r.val_loss, |l| {
                format!(
                    "{l:.3}{}",
                    r.tokenizer
                        .as_ref()
                        .map_or(String::new(), |t| format!(" ({t})"))
                )
            }),
        ];
        row.extend(
            code_cols
                .iter()
                .map(|c| cell(r.code.get(c), |v| format!("{:.2}%", 100.0 * v))),
        );
        row.extend(
            story_cols
                .iter()
                .map(|c| cell(r.stories.get(c), |v| format!("{v:.2}"))),
        );
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out.push_str("\nPublished anchors:\n\n| model | metric | value |\n|---|---|---|\n");
    for (model, metric, value) in ANCHORS {
        out.push_str(&format!("| {model} | {metric} | {value} |\n"));
    }
    out.push_str("\nValidation losses depend on the tokenizer and the validation text: compare a phigen loss with the llama2.c anchors only for the same tokenizer and data.\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with an eval summary, a stories summary and a loss report becomes one row with
    /// those numbers; an empty one has dashes; the anchors are listed.
    #[test]
    fn runs_collect_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(run.join("he")).unwrap();
        std::fs::write(
            run.join("he/summary.json"),
            r#"{"benchmark":"humaneval","pass_at_k":{"pass@1":0.125}}"#,
        )
        .unwrap();
        std::fs::write(
            run.join("stories.json"),
            r#"{"judge":"gpt-4o","metrics":{"grammar":{"mean":7.5}}}"#,
        )
        .unwrap();
        std::fs::write(run.join("loss.json"), r#"{"loss":1.25,"perplexity":3.49}"#).unwrap();
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let runs = [collect(&run).unwrap(), collect(&empty).unwrap()];
        assert_eq!(runs[0].code["humaneval pass@1"], 0.125);
        assert_eq!(runs[0].stories["grammar"], 7.5);
        assert_eq!(runs[0].val_loss, Some(1.25));
        let md = markdown(&runs);
        assert!(md.contains("| 1.250 | 12.50% | 7.50 |"), "{md}");
        assert!(md.contains("| – | – | – | – | – |"), "{md}");
        assert!(md.contains("50.6%") && md.contains("1.297"));
        assert!(collect(&dir.path().join("missing")).is_err());
    }
}

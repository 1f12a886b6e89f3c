//! The page: one HTML document, its style inline, no script. Sections follow the recipe: data,
//! diversity, training, evaluation, lineage; a section with nothing to show is left out.

use std::fmt::Write;

use super::corpus::Corpus;
use super::diversity::{CLUSTER_COSINE, NEAR_DUPLICATE_THRESHOLDS};
use super::runs::{self, Judged};
use super::svg::{self, escape, short, Mark, Plot, Series};
use super::{Measured, Report};
use crate::eval::scoreboard;

const STYLE: &str = "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;color:#222}
h1{font-size:24px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}h3{margin-top:24px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#555;font-size:13px}.warn{background:#fff4e5;border-left:4px solid #f28e2b;padding:6px 10px}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;white-space:pre-wrap;max-height:300px}
svg.chart{display:block;margin:8px 0;font-size:11px;max-width:100%;height:auto}
svg .t{font-size:13px;font-weight:600}svg .g{stroke:#eee}svg .frame{fill:none;stroke:#999}
svg .xl{text-anchor:middle;fill:#444}svg .yl{text-anchor:end;fill:#444}svg .line{stroke-width:1.6}
.charts{display:flex;flex-wrap:wrap;gap:8px}";

/// The whole page.
pub fn page(r: &Report) -> String {
    let mut out = String::new();
    let paths: Vec<String> = r.paths.iter().map(|p| p.display().to_string()).collect();
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>phigen report: {}</title><style>{STYLE}</style></head><body><h1>phigen report</h1><p class=\"note\">{}</p>",
        escape(&paths.join(", ")),
        escape(&paths.join(" · ")),
    );
    if let Some(note) = &r.embedding_note {
        let _ = write!(out, "<p class=\"warn\">{}</p>", escape(note));
    }
    for m in &r.corpora {
        data(&mut out, m, r.reference.as_ref());
    }
    if !r.corpora.is_empty() {
        diversity(&mut out, r);
    }
    if !r.runs.is_empty() {
        training(&mut out, &r.runs);
    }
    if !r.scoreboard.is_empty() || !r.judged.is_empty() {
        evaluation(&mut out, &r.scoreboard, &r.judged);
    }
    for (file, tree) in &r.lineage {
        let _ = write!(
            out,
            "<h2 id=\"lineage\">Lineage</h2><p class=\"note\">{}</p><pre>{}</pre>",
            escape(&file.display().to_string()),
            escape(tree)
        );
    }
    out.push_str("</body></html>\n");
    out
}

/// A table: a header row, then rows of cells already escaped or formatted as HTML.
fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    out.push_str("<table><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let class = if cell.parse::<f64>().is_ok() || cell.ends_with('%') {
                " class=\"n\""
            } else {
                ""
            };
            let _ = write!(out, "<td{class}>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

fn pct(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

fn num(v: &serde_json::Value) -> Option<f64> {
    v.as_f64()
}

/// Equal-width bins from the least to the greatest value of every series (shared, so series
/// compare), as bar series of shares.
fn histograms(named: &[(&str, &[u64])]) -> Vec<Series> {
    let values = || named.iter().flat_map(|(_, v)| v.iter()).copied();
    let (lo, hi) = (values().min().unwrap_or(0), values().max().unwrap_or(0));
    let width = ((hi - lo + 1) as f64 / 30.0).ceil().max(1.0);
    let bins = ((hi - lo) as f64 / width) as usize + 1;
    named
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(name, values)| {
            let mut counts = vec![0u64; bins];
            for &v in values.iter() {
                counts[((v - lo) as f64 / width) as usize] += 1;
            }
            let total = values.len() as f64;
            Series {
                name: name.to_string(),
                points: counts
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| (lo as f64 + (i as f64 + 0.5) * width, c as f64 / total))
                    .collect(),
            }
        })
        .collect()
}

fn chart(out: &mut String, title: &str, x: &str, y: &str, mark: Mark, series: &[Series]) {
    if series.iter().any(|s| !s.points.is_empty()) {
        out.push_str(&svg::plot(&Plot {
            title,
            x_label: x,
            y_label: y,
            mark,
            series,
        }));
    }
}

fn name_of(c: &Corpus) -> String {
    c.dir.display().to_string()
}

/// The data section of one corpus.
fn data(out: &mut String, m: &Measured, reference: Option<&Measured>) {
    let c = &m.corpus;
    let _ = write!(
        out,
        "<h2>Data: {}</h2><p class=\"note\">{}</p>",
        escape(&name_of(c)),
        escape(c.kind().unwrap_or("documents (no phigen manifest)"))
    );
    summary(out, c);
    drops(out, c);
    out.push_str("<div class=\"charts\">");
    if !c.tokens.is_empty() {
        chart(
            out,
            "Length in tokens (the teacher's count)",
            "completion tokens",
            "share of records",
            Mark::Bars,
            &histograms(&[("this corpus", &c.tokens)]),
        );
    }
    let mut named: Vec<(&str, &[u64])> = vec![("this corpus", &c.words)];
    if let Some(r) = reference {
        named.push(("reference", &r.corpus.words));
    }
    chart(
        out,
        "Length in words",
        "words",
        "share of records",
        Mark::Bars,
        &histograms(&named),
    );
    if let Some(per) = c.per_label() {
        let mut rows: Vec<(String, f64)> = per
            .counts
            .iter()
            .map(|(k, v)| (k.clone(), *v as f64))
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out.push_str(&svg::bars(
            &format!(
                "Records per {} value (top 20 of {})",
                per.column,
                rows.len()
            ),
            "records",
            &rows,
        ));
    }
    out.push_str("</div>");
    coverage(out, c);
    openings(out, c);
}

fn summary(out: &mut String, c: &Corpus) {
    let mut rows = vec![vec!["records".to_string(), c.records.to_string()]];
    if !c.tokens.is_empty() {
        let total: u64 = c.tokens.iter().sum();
        rows.push(vec!["tokens (teacher's count)".into(), total.to_string()]);
        rows.push(vec![
            "tokens per record".into(),
            format!("{:.1}", total as f64 / c.tokens.len() as f64),
        ]);
    }
    if let Some(s) = &c.stats {
        let run = &s["run"];
        if let Some(model) = s["model"].as_str() {
            rows.push(vec!["teacher".into(), escape(model)]);
        }
        if let Some(k) = num(&s["keep_rate"]) {
            rows.push(vec!["keep rate (all runs)".into(), pct(k)]);
        }
        if let Some(v) = num(&run["cost_usd"]) {
            rows.push(vec!["cost of the last run, USD".into(), format!("{v:.4}")]);
        }
        if let Some(v) = num(&run["wall_seconds"]) {
            rows.push(vec!["time of the last run, s".into(), format!("{v:.1}")]);
        }
        for key in ["prompt_tokens", "completion_tokens"] {
            if let Some(v) = run[key].as_u64() {
                rows.push(vec![
                    format!("{} of the last run", key.replace('_', " ")),
                    v.to_string(),
                ]);
            }
        }
        if let Some(note) = s["teacher_note"].as_str() {
            rows.push(vec!["teacher note".into(), escape(note)]);
        }
    }
    table(out, &["", "value"], &rows);
}

fn drops(out: &mut String, c: &Corpus) {
    if c.drops.is_empty() {
        return;
    }
    out.push_str("<h3>Drops</h3><p class=\"note\">Every answer a check refused, from rejects.parquet (all runs), with the first example of each reason.</p>");
    let total: u64 = c.drops.iter().map(|d| d.count).sum::<u64>() + c.records;
    let rows: Vec<Vec<String>> = c
        .drops
        .iter()
        .map(|d| {
            vec![
                escape(&d.reason),
                d.count.to_string(),
                pct(d.count as f64 / total.max(1) as f64),
                format!(
                    "<details><summary>{}</summary><pre>{}</pre></details>",
                    escape(&svg::clip(&d.detail, 120)),
                    escape(&svg::clip(&d.text, 600))
                ),
            ]
        })
        .collect();
    table(
        out,
        &["reason", "count", "share of answers", "example"],
        &rows,
    );
}

fn coverage(out: &mut String, c: &Corpus) {
    if c.coverage.is_empty() {
        return;
    }
    out.push_str("<h3>Constraint coverage</h3><p class=\"note\">Distinct values drawn of each constraint, against the entries of phigen's built-in seed list (a run given its own lists drew from those); entropy of the drawn values in bits, against log₂ of the list (all entries drawn equally often).</p>");
    let rows: Vec<Vec<String>> = c
        .coverage
        .iter()
        .map(|cov| {
            let drawn = cov.counts.len();
            vec![
                escape(&cov.column),
                drawn.to_string(),
                cov.seeds.map_or("–".into(), |s| s.to_string()),
                cov.seeds
                    .map_or("–".into(), |s| pct(drawn as f64 / s.max(1) as f64)),
                format!("{:.2}", cov.entropy_bits()),
                cov.seeds
                    .map_or("–".into(), |s| format!("{:.2}", (s.max(1) as f64).log2())),
            ]
        })
        .collect();
    table(
        out,
        &[
            "constraint",
            "drawn",
            "seed list",
            "covered",
            "entropy (bits)",
            "max (bits)",
        ],
        &rows,
    );
}

fn openings(out: &mut String, c: &Corpus) {
    if c.openings.is_empty() {
        return;
    }
    out.push_str("<h3>Most common openings</h3><p class=\"note\">The first three words of each record, lower-cased.</p>");
    let rows: Vec<Vec<String>> = c
        .openings
        .iter()
        .map(|(o, n)| {
            vec![
                escape(o),
                n.to_string(),
                pct(*n as f64 / c.records.max(1) as f64),
            ]
        })
        .collect();
    table(out, &["opening", "records", "share"], &rows);
}

/// One row per measure, one column per corpus (and the reference), each measure explained.
fn diversity(out: &mut String, r: &Report) {
    out.push_str("<h2 id=\"diversity\">Diversity</h2>");
    let mut all: Vec<(String, &Measured)> =
        r.corpora.iter().map(|m| (name_of(&m.corpus), m)).collect();
    if let Some(m) = &r.reference {
        all.push((format!("reference: {}", name_of(&m.corpus)), m));
    }
    let _ = write!(
        out,
        "<p class=\"note\">Measured on a sample of at most {} records per corpus (those whose ids hash lowest, so the same records every time); the sentence encoder reads the first {} of them, {} tokens each.</p>",
        r.options.sample, r.options.embed_sample, super::EMBED_TOKENS
    );
    type Measure = (String, String, Box<dyn Fn(&Measured) -> String>);
    let mut measures: Vec<Measure> = vec![
        (
            "records sampled".into(),
            "Records these measures read.".into(),
            Box::new(|m| m.text.sample.to_string()),
        ),
        (
            "distinct-1".into(),
            "Unique words over all words: higher is more varied vocabulary.".into(),
            Box::new(|m| format!("{:.4}", m.text.distinct_1)),
        ),
        (
            "distinct-2".into(),
            "Unique word pairs over all word pairs (within a record).".into(),
            Box::new(|m| format!("{:.4}", m.text.distinct_2)),
        ),
        (
            "distinct-3".into(),
            "Unique word triples over all word triples: low means repeated phrasing.".into(),
            Box::new(|m| format!("{:.4}", m.text.distinct_3)),
        ),
        (
            "compression ratio".into(),
            "Bytes of the sample over its gzip size: repeated text compresses well, so lower is more diverse.".into(),
            Box::new(|m| format!("{:.2}", m.text.compression_ratio)),
        ),
    ];
    for (i, t) in NEAR_DUPLICATE_THRESHOLDS.iter().enumerate() {
        measures.push((
            format!("near duplicates ≥ {t}"),
            format!("Share of records with another record whose 5-word-shingle Jaccard similarity (MinHash estimate) is at least {t}: lower is better."),
            Box::new(move |m| m.near_duplicates.get(i).map_or("–".into(), |v| pct(*v))),
        ));
    }
    measures.push((
        "mean pairwise cosine".into(),
        "Mean cosine similarity of all-MiniLM-L6-v2 embeddings over every pair: lower means records spread over more meanings.".into(),
        Box::new(|m| {
            m.embedding
                .as_ref()
                .and_then(|e| e.mean_cosine)
                .map_or("–".into(), |v| format!("{v:.4}"))
        }),
    ));
    measures.push((
        "clusters".into(),
        format!("Groups a greedy pass finds (each record joins the first earlier leader within cosine {CLUSTER_COSINE}, or leads a new one), of the records embedded: higher is more diverse."),
        Box::new(|m| {
            m.embedding
                .as_ref()
                .map_or("–".into(), |e| format!("{} of {}", e.clusters, e.rows))
        }),
    ));
    let mut head = vec!["measure"];
    head.extend(all.iter().map(|(n, _)| n.as_str()));
    head.push("what it says");
    let rows: Vec<Vec<String>> = measures
        .iter()
        .map(|(name, why, f)| {
            let mut row = vec![escape(name)];
            row.extend(all.iter().map(|(_, m)| f(m)));
            row.push(format!("<span class=\"note\">{}</span>", escape(why)));
            row
        })
        .collect();
    table(out, &head, &rows);
    if all.iter().any(|(_, m)| m.text_from_stats) {
        out.push_str("<p class=\"note\">distinct-n and compression ratio of a generated corpus come from its stats.json when it measured the same sample.</p>");
    }
    out.push_str("<div class=\"charts\">");
    for (name, m) in &all {
        if let Some(e) = &m.embedding {
            projection(out, name, m.corpus.label_column.as_deref(), &e.points);
        }
    }
    out.push_str("</div>");
}

/// The embedding projection, one colour per label (the nine most common, then "other").
fn projection(out: &mut String, name: &str, label: Option<&str>, points: &[([f64; 2], String)]) {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, l) in points {
        *counts.entry(l.as_str()).or_default() += 1;
    }
    let mut top: Vec<(&str, usize)> = counts.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let keep: Vec<&str> = top.iter().take(9).map(|(l, _)| *l).collect();
    let mut series: Vec<Series> = keep
        .iter()
        .map(|l| Series {
            // Records without a label: all of them in a corpus without labels.
            name: if l.is_empty() {
                label.map_or("records", |_| "(none)").to_string()
            } else {
                l.to_string()
            },
            points: Vec::new(),
        })
        .collect();
    let mut other = Series {
        name: "other".into(),
        points: Vec::new(),
    };
    for ([x, y], l) in points {
        match keep.iter().position(|k| k == l) {
            Some(i) => series[i].points.push((*x, *y)),
            None => other.points.push((*x, *y)),
        }
    }
    if !other.points.is_empty() {
        series.push(other);
    }
    let title = svg::clip(
        &format!(
            "Embeddings (PCA): {name}{}",
            label.map_or(String::new(), |l| format!(", colour: {l}"))
        ),
        60,
    );
    chart(out, &title, "PC 1", "PC 2", Mark::Dots, &series);
}

/// A number of one metrics line, where the line has it.
type Metric = fn(&crate::train::Metrics) -> Option<f64>;

fn training(out: &mut String, runs_: &[runs::Run]) {
    out.push_str("<h2 id=\"training\">Training</h2><p class=\"note\">From each run's metrics.jsonl; tokens count from the start of the run, each stage after the previous one.</p><div class=\"charts\">");
    let charts: [(&str, &str, Metric); 5] = [
        ("Training loss", "loss", |m| m.train_loss),
        ("Validation loss", "loss", |m| m.val_loss),
        ("Learning rate", "lr", |m| m.train_loss.map(|_| m.lr)),
        ("Gradient norm", "norm", |m| m.grad_norm),
        ("Throughput", "tokens/s", |m| {
            m.train_loss.map(|_| m.tokens_per_sec)
        }),
    ];
    for (title, y, value) in charts {
        chart(
            out,
            title,
            "tokens",
            y,
            Mark::Lines,
            &runs::series(runs_, value),
        );
    }
    out.push_str("</div>");
    let rows: Vec<Vec<String>> = runs::stages(runs_)
        .into_iter()
        .map(|s| {
            vec![
                escape(&s.run),
                escape(&s.stage),
                s.steps.to_string(),
                short(s.tokens as f64),
                s.train_loss.map_or("–".into(), |v| format!("{v:.4}")),
                s.val_loss.map_or("–".into(), |v| format!("{v:.4}")),
                format!("{:.0}", s.tokens_per_sec),
                s.mfu.map_or("–".into(), pct),
            ]
        })
        .collect();
    table(
        out,
        &[
            "run",
            "stage",
            "steps",
            "tokens",
            "last train loss",
            "last val loss",
            "tokens/s",
            "mean MFU",
        ],
        &rows,
    );
}

fn evaluation(out: &mut String, rows: &[scoreboard::Run], judged: &[Judged]) {
    out.push_str("<h2 id=\"evaluation\">Evaluation</h2>");
    if !rows.is_empty() {
        let mut code: Vec<&String> = rows.iter().flat_map(|r| r.code.keys()).collect();
        code.sort();
        code.dedup();
        let mut stories: Vec<&String> = rows.iter().flat_map(|r| r.stories.keys()).collect();
        stories.sort();
        stories.dedup();
        let mut head: Vec<String> = ["run", "parameters", "tokens seen", "val loss"]
            .map(String::from)
            .to_vec();
        head.extend(code.iter().map(|c| c.to_string()));
        head.extend(stories.iter().map(|s| format!("stories: {s}")));
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let mut row = vec![
                    escape(&r.run),
                    r.parameters.map_or("–".into(), |p| short(p as f64)),
                    r.tokens_seen.map_or("–".into(), |t| short(t as f64)),
                    r.val_loss.map_or("–".into(), |l| format!("{l:.3}")),
                ];
                row.extend(
                    code.iter()
                        .map(|c| r.code.get(*c).map_or("–".into(), |v| pct(*v))),
                );
                row.extend(
                    stories
                        .iter()
                        .map(|s| r.stories.get(*s).map_or("–".into(), |v| format!("{v:.2}"))),
                );
                row
            })
            .collect();
        let head: Vec<&str> = head.iter().map(String::as_str).collect();
        table(out, &head, &cells);
    }
    out.push_str("<h3>Published anchors</h3>");
    let anchors: Vec<Vec<String>> = scoreboard::ANCHORS
        .iter()
        .map(|(m, k, v)| vec![escape(m), escape(k), escape(v)])
        .collect();
    table(out, &["model", "metric", "value"], &anchors);
    out.push_str("<p class=\"note\">Validation losses depend on the tokenizer and the validation text: compare with the llama2.c anchors only for the same tokenizer and data.</p>");
    if !judged.is_empty() {
        out.push_str("<h3>Sample completions</h3>");
        for j in judged {
            let _ = write!(
                out,
                "<details><summary>{} — {} <span class=\"note\">({})</span></summary><pre>{}</pre></details>",
                escape(&j.title),
                escape(&j.verdict),
                escape(&j.source.display().to_string()),
                escape(&svg::clip(&j.text, 2000))
            );
        }
    }
}

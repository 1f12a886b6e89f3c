//! `phigen report`: parse, build the page, write it, say where.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::numbers::int_in;
use super::Outcome;
use crate::report::{self, diversity, ReportOptions};

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Directories to report side by side: corpora (a generate step's output, or any directory of .parquet/.jsonl/.txt documents), training runs, evaluation outputs, recipe runs.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The HTML file to write (self-contained: no scripts, fonts or network).
    #[arg(long, default_value = "report.html")]
    pub out: PathBuf,
    /// A corpus to compare diversity and lengths with (e.g. the real TinyStories).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Records per corpus the diversity measures read at most (a deterministic sample).
    #[arg(long, default_value_t = diversity::DEFAULT_SAMPLE, value_parser = int_in(2usize, 1 << 24))]
    pub sample: usize,
    /// Records per corpus the sentence encoder embeds at most (the first of the sample).
    #[arg(long, default_value_t = 128, value_parser = int_in(2usize, 1 << 20))]
    pub embed_sample: usize,
    /// The sentence encoder for the embedding measures: a directory or a model id already in the Hugging Face cache (never downloaded); without one the page says so.
    #[arg(
        long,
        env = "PHIGEN_MINILM",
        default_value = "sentence-transformers/all-MiniLM-L6-v2"
    )]
    pub embed_model: String,
}

pub fn report(args: &ReportArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let r = report::build(&ReportOptions {
        paths: args.paths.clone(),
        reference: args.reference.clone(),
        sample: args.sample,
        embed_sample: args.embed_sample,
        embed_model: args.embed_model.clone(),
    })?;
    for w in r.warnings() {
        eprintln!("warning: {w}");
    }
    crate::artifact::atomic::write_bytes(&args.out, r.html().as_bytes())
        .with_context(|| format!("--out {}: could not write the report", args.out.display()))?;
    if !quiet {
        println!(
            "wrote {} ({} corpora, {} training runs, {} evaluated runs)",
            args.out.display(),
            r.corpora.len(),
            r.runs.len(),
            r.scoreboard.len()
        );
    }
    Ok(Outcome::Complete)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// The defaults are inside their flags' ranges (as `numbers::every_default_is_in_its_range`
    /// checks for the other subcommands), and a sample of one record is refused.
    #[test]
    fn defaults_parse_and_ranges_hold() {
        let parse = |args: &[&str]| {
            crate::cli::Cli::try_parse_from(std::iter::once("phigen").chain(args.iter().copied()))
        };
        assert!(parse(&["report", "d"]).is_ok());
        assert!(parse(&["report", "d", "--sample", "1"]).is_err());
        assert!(parse(&["report"]).is_err(), "a path is required");
    }
}

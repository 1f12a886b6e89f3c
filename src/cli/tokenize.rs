//! `phigen tokenize` and `phigen shards inspect|decode`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::numbers::{self, f64_in, int_in};
use super::Outcome;
use crate::model::tokenizer::{Tokenizer, TokenizerSpec};
use crate::tokenize::{self, Order, Split, TokenDir, TokenizeOptions};

#[derive(Debug, Clone, Args)]
pub struct TokenizeArgs {
    /// Corpus directories or files: Parquet (`text`, `id` columns), jsonl (`text`, `id` fields) or .txt (documents split at <|endoftext|>). Repeatable.
    #[arg(long, required = true)]
    pub input: Vec<PathBuf>,
    /// Output directory for the token shards and meta.json.
    #[arg(long)]
    pub out: PathBuf,
    /// A tiktoken encoding (gpt2, p50k_base, cl100k_base, o200k_base), a Hugging Face tokenizer.json, or a checkpoint directory holding one (and optionally tokenizer_config.json, whose eos_token ends each document).
    #[arg(long, default_value = "gpt2", value_parser = TokenizerSpec::parse)]
    pub tokenizer: TokenizerSpec,
    /// The token that ends each document, for a tokenizer.json whose end-of-text token phigen cannot find (no eos_token in tokenizer_config.json, no <|endoftext|> or </s> among its added tokens).
    #[arg(long)]
    pub eos_token: Option<String>,
    /// Share of documents (by hash of their id) held out for validation: at least 0, below 1 (something must be left to train on).
    #[arg(long, default_value_t = 0.01, value_parser = f64_in(numbers::below(0.0, 1.0)))]
    pub val_fraction: f64,
    /// Tokens per shard file before a new one is started.
    #[arg(long, default_value_t = 100_000_000, value_parser = int_in(1u64, 1 << 40))]
    pub shard_tokens: u64,
    /// Replace shards made from other inputs or settings.
    #[arg(long)]
    pub force: bool,
    /// Read symlinks that lead out of the input directories (by default they are skipped and counted).
    #[arg(long)]
    pub follow_symlinks: bool,
    /// Document order in the shards: `input` (files in path order, rows in file order) or `id`
    /// (by the hash of each document's id: the same documents give the same shards wherever
    /// they sit in the inputs; recipe runs use it).
    #[arg(long, value_enum, default_value = "input")]
    pub order: Order,
    #[command(flatten)]
    pub array: super::ArrayArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ShardsCommand {
    /// Header of every shard, document and token counts, the most frequent tokens.
    Inspect {
        /// A `phigen tokenize` output directory.
        dir: PathBuf,
        /// How many of the most frequent tokens to list.
        #[arg(long, default_value_t = 20, value_parser = int_in(0usize, 1 << 24))]
        top: usize,
    },
    /// Print the text of a token range of one split.
    Decode {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "train")]
        split: Split,
        /// First token (counted across the split's shards).
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Number of tokens (at most 16,777,216; decode a longer range in pieces).
        #[arg(long, default_value_t = 256, value_parser = int_in(1usize, 1 << 24))]
        len: usize,
    },
}

pub fn tokenize(args: &TokenizeArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let opts = TokenizeOptions {
        inputs: args.input.clone(),
        out: args.out.clone(),
        tokenizer: args.tokenizer.clone(),
        eos_token: args.eos_token.clone(),
        val_fraction: args.val_fraction,
        shard_tokens: args.shard_tokens,
        force: args.force,
        follow_symlinks: args.follow_symlinks,
        order: args.order,
    };
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {human_pos} tokens  {per_sec}  {elapsed}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let started = std::time::Instant::now();
    if let Some(task) = args.array.task()? {
        let ran = tokenize::array::run_task(&opts, task, |n| bar.inc(n))?;
        bar.finish_and_clear();
        tracing::info!(
            "task {task} {}; `phigen merge {}` writes the shards once all {} tasks are done",
            if ran { "done" } else { "was already done" },
            args.out.display(),
            task.n
        );
        return Ok(Outcome::Complete);
    }
    let outcome = tokenize::run(&opts, |n| bar.inc(n))?;
    bar.finish_and_clear();
    let (meta, verb) = match outcome {
        tokenize::Outcome::Written(m) => (m, "wrote"),
        tokenize::Outcome::UpToDate(m) => (m, "up to date:"),
    };
    let bytes: u64 = meta.sources.iter().map(|s| s.bytes).sum();
    for (split, s) in &meta.splits {
        tracing::info!(
            "{verb} {}: {} documents, {} tokens in {} shards",
            split,
            s.documents,
            s.tokens,
            s.shards.len()
        );
    }
    tracing::info!(
        "{} sources, {:.1} MB in {:.1}s ({:.1} MB/s) → {}",
        meta.sources.len(),
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        bytes as f64 / 1e6 / started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(Outcome::Complete)
}

pub fn shards(cmd: &ShardsCommand) -> anyhow::Result<Outcome> {
    match cmd {
        ShardsCommand::Inspect { dir, top } => {
            let t = TokenDir::open(dir, None)?;
            let m = &t.meta;
            println!(
                "{}: tokenizer {} (vocab {}, end-of-text {}), {:?} tokens, format version {}",
                dir.display(),
                m.tokenizer,
                m.vocab_size,
                m.end_of_text,
                m.token_width,
                m.format_version
            );
            let mut counts: HashMap<u32, u64> = HashMap::new();
            for split in [Split::Train, Split::Val] {
                for s in t.shards(split) {
                    println!(
                        "  {}  {} documents  {} tokens",
                        s.path.display(),
                        s.documents,
                        s.tokens
                    );
                    for id in s.slice(0, s.tokens) {
                        *counts.entry(id).or_default() += 1;
                    }
                }
                if let Some(sm) = m.splits.get(&split) {
                    println!("{split}: {} documents, {} tokens", sm.documents, sm.tokens);
                }
            }
            let total: u64 = counts.values().sum();
            let mut sorted: Vec<(u32, u64)> = counts.into_iter().collect();
            sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            println!("{} distinct tokens; most frequent:", sorted.len());
            let tokenizer = Tokenizer::from_spec(&m.tokenizer)?;
            for (id, n) in sorted.iter().take(*top) {
                let text = tokenizer
                    .decode_with_special(&[*id])
                    .unwrap_or_else(|_| format!("<{id}>"));
                println!(
                    "  {id:>7}  {n:>12}  {:5.2}%  {:?}",
                    100.0 * *n as f64 / total.max(1) as f64,
                    text
                );
            }
        }
        ShardsCommand::Decode {
            dir,
            split,
            offset,
            len,
        } => {
            let t = TokenDir::open(dir, None)?;
            let ids = t.read(*split, *offset, *len);
            let text = Tokenizer::from_spec(&t.meta.tokenizer)?.decode_with_special(&ids)?;
            println!("{text}");
        }
    }
    Ok(Outcome::Complete)
}

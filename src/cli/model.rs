//! `phigen sample` and `phigen init`: the model commands of the CLI.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};

use super::numbers::{self, f64_in, int_in};
use crate::model::checkpoint;
use crate::model::config::{PhiConfig, Preset};
use crate::model::sample::{
    generate, Finish, RepetitionPenalty, Sampling, SamplingParams, TextStream,
};
use crate::model::tokenizer::{Encoding, Tokenizer};

/// Number format of weights in memory (sampling) or on disk (init).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> DType {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// Checkpoint directory in the Hugging Face layout (config.json + model.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Prompt text; repeat for a batch (left-padded, generated together).
    #[arg(
        long,
        required_unless_present = "prompt_ids",
        conflicts_with = "prompt_ids"
    )]
    pub prompt: Vec<String>,
    /// Prompt as token ids, e.g. 1,2,3; the output is then the generated ids as JSON.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Most tokens generated per prompt.
    #[arg(long, default_value_t = 256, value_parser = int_in(1usize, 1 << 20))]
    pub max_new_tokens: usize,
    /// Sampling temperature, 0 (greedy) to 10.
    #[arg(long, default_value_t = 0.8, value_parser = f64_in(numbers::TEMPERATURE))]
    pub temperature: f64,
    /// Keep only the K most likely tokens [default: all].
    #[arg(long, value_parser = int_in(1usize, 1 << 24))]
    pub top_k: Option<usize>,
    /// Keep the most likely tokens up to this probability mass, above 0 (1 = off).
    #[arg(long, default_value_t = 0.95, value_parser = f64_in(numbers::TOP_P))]
    pub top_p: f64,
    /// Drop tokens less likely than this share of the most likely one [default: off].
    #[arg(long, value_parser = f64_in(numbers::UNIT))]
    pub min_p: Option<f64>,
    /// Penalise tokens already in the text (1 = off; 1.1–1.3 is typical; above 0, at most 10).
    #[arg(long, default_value_t = 1.0, value_parser = f64_in(numbers::above(0.0, 10.0)))]
    pub repetition_penalty: f64,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Always take the most likely token (ignores temperature, top-k, top-p).
    #[arg(long)]
    pub greedy: bool,
    /// Stop a row when its text contains this string (not printed); repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Tokenizer to use when the checkpoint has neither tokenizer.json nor phigen.json.
    #[arg(long, value_enum)]
    pub tokenizer: Option<Encoding>,
    /// Number format of the weights in memory.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Model size: phi-1, phi-1-small, phi-1.5, phi-2, phi-3-mini, or a tiny test size.
    #[arg(long, value_enum)]
    pub preset: Preset,
    /// Output checkpoint directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokenizer recorded in phigen.json. A preset with fewer token embeddings than the
    /// tokenizer has ids gets the tokenizer's size, rounded up to a multiple of 64.
    #[arg(long, value_enum, default_value_t = Encoding::Gpt2)]
    pub tokenizer: Encoding,
    /// Token embeddings (vocab_size) instead of the preset's; at least the tokenizer's size.
    #[arg(long, value_parser = int_in(1usize, 1 << 24))]
    pub vocab_size: Option<usize>,
    /// Number format on disk.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// Replace an existing checkpoint in --out.
    #[arg(long)]
    pub force: bool,
}

pub fn init(args: &InitArgs) -> anyhow::Result<()> {
    if args.out.join(checkpoint::CONFIG_FILE).exists() && !args.force {
        bail!(
            "{} already holds a checkpoint; pass --force to replace it",
            args.out.display()
        );
    }
    let mut cfg = PhiConfig::preset(args.preset);
    cfg.vocab_size = vocab_size(args.preset, cfg.vocab_size, args.tokenizer, args.vocab_size)?;
    checkpoint::save_random(
        &args.out,
        &cfg,
        args.seed,
        args.dtype.into(),
        args.tokenizer,
    )?;
    tracing::info!(
        "wrote {} ({}, {:.1}M parameters) to {}",
        args.preset,
        format!("{:?}", args.dtype).to_lowercase(),
        cfg.parameter_count() as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}

/// The vocab_size `init` writes: `explicit` if the tokenizer's ids fit in it (else an error), the
/// preset's if they fit in that, else the tokenizer's size rounded up to a multiple of 64 (as
/// GPT-2's 50,257 becomes 50,304 in nanoGPT) — a checkpoint whose tokenizer makes ids it cannot
/// embed fails on the first prompt that holds one.
fn vocab_size(
    preset: Preset,
    preset_size: usize,
    encoding: Encoding,
    explicit: Option<usize>,
) -> anyhow::Result<usize> {
    let needed = checkpoint::tokenizer_size(&Tokenizer::Tiktoken(encoding));
    let name = checkpoint::tokenizer_name(encoding);
    let rounded = needed.next_multiple_of(64);
    match explicit {
        Some(n) if n < needed => bail!(
            "--vocab-size {n} is smaller than the {name} tokenizer, whose ids go up to {}: the model could not embed them. Pass --vocab-size {rounded} (its {needed} ids rounded up to a multiple of 64) or more, or leave --vocab-size out to let init choose",
            needed - 1
        ),
        Some(n) => Ok(n),
        None if preset_size >= needed => Ok(preset_size),
        None => {
            tracing::info!(
                "vocab_size {rounded} instead of {preset}'s {preset_size}: the {name} tokenizer has {needed} ids (rounded up to a multiple of 64); pass --vocab-size to choose"
            );
            Ok(rounded)
        }
    }
}

pub fn sample(args: &SampleArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let model = checkpoint::load(&args.checkpoint, args.dtype.into(), &Device::Cpu)?;
    tracing::info!(
        "loaded {} ({:.1}M parameters) in {:.1}s",
        args.checkpoint.display(),
        model.config().parameter_count() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let sampling = if args.greedy {
        Sampling::Greedy
    } else {
        Sampling::new(
            args.temperature,
            args.top_p,
            args.top_k,
            args.min_p,
            args.seed,
        )
    };
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: 0,
        sampling,
        repetition_penalty: (args.repetition_penalty != 1.0).then_some(RepetitionPenalty {
            penalty: args.repetition_penalty,
            last_n: None,
        }),
        loop_stop: None,
    };
    let eos = model.config().eos_ids();
    if let Some(ids) = &args.prompt_ids {
        let started = Instant::now();
        let out = generate(&model, std::slice::from_ref(ids), &params, &eos, |_, _| {
            true
        })?;
        log_speed(&out, started);
        println!(
            "{}",
            serde_json::json!({ "ids": out.ids[0], "finish": finish_name(out.finish[0]) })
        );
        return Ok(());
    }
    let tokenizer = match (Tokenizer::for_checkpoint(&args.checkpoint), args.tokenizer) {
        (Ok(t), _) => t,
        (Err(_), Some(encoding)) => Tokenizer::Tiktoken(encoding),
        (Err(e), None) => return Err(e.into()),
    };
    let prompts = args
        .prompt
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut streams: Vec<TextStream> = prompts
        .iter()
        .map(|_| TextStream::new(&tokenizer, &args.stop))
        .collect();
    let mut texts = vec![String::new(); prompts.len()];
    let streaming = prompts.len() == 1;
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let started = Instant::now();
    let out = generate(&model, &prompts, &params, &eos, |row, ids| {
        match streams[row].push(ids) {
            Ok((piece, stop)) => {
                if streaming {
                    if let Err(e) = stdout
                        .write_all(piece.as_bytes())
                        .and_then(|_| stdout.flush())
                    {
                        write_error = Some(e);
                        return false;
                    }
                }
                texts[row].push_str(&piece);
                !stop
            }
            Err(_) => true,
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("writing to stdout");
    }
    for (row, ids) in out.ids.iter().enumerate() {
        let rest = streams[row].finish(ids)?;
        texts[row].push_str(&rest);
        if streaming {
            writeln!(stdout, "{rest}")?;
        } else {
            writeln!(
                stdout,
                "=== {}\n{}{}",
                row + 1,
                args.prompt[row],
                texts[row]
            )?;
        }
    }
    log_speed(&out, started);
    Ok(())
}

fn log_speed(out: &crate::model::sample::Generation, started: Instant) {
    let generated: usize = out.ids.iter().map(Vec::len).sum();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "generated {generated} tokens in {secs:.3}s ({:.2} tokens/s); finished: {:?}",
        generated as f64 / secs,
        out.finish
            .iter()
            .map(|f| finish_name(*f))
            .collect::<Vec<_>>()
    );
}

fn finish_name(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        Finish::EndOfSequence => "eos",
        Finish::Stopped => "stop",
        Finish::Looping => "loop",
    }
}

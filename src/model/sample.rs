//! Batched generation with a KV cache. Logits are processed as transformers' `generate` does:
//! repetition penalty over the recent ids, then temperature, top-k, top-p, min-p; greedy decoding
//! takes the first arg-max. Until a row has `min_new_tokens` new ids its end-of-sequence ids get
//! probability 0 (vLLM's `min_tokens`). Prompts of different lengths are left-padded. Each row is a
//! [`Sequence`] with its own sampler, so what a row gets does not depend on the rows beside it.

use std::collections::HashSet;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::decoder::{Decoder, KvCache};
use super::tokenizer::Tokenizer;
use super::ModelError;

/// How the next id is chosen from a row's logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The first arg-max.
    Greedy,
    /// A draw from the softmax at `temperature`, cut by top-k, then top-p, then min-p (the
    /// tokens below `min_p` times the most likely one's probability: transformers'
    /// MinPLogitsWarper, llama.cpp's `min_p`), from a generator seeded by `seed`.
    Random {
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        min_p: Option<f64>,
        seed: u64,
    },
}

impl Sampling {
    /// The settings as APIs and flags take them: temperature 0 is greedy; top-p 1, top-k 0 and
    /// min-p 0 are off.
    pub fn new(
        temperature: f64,
        top_p: f64,
        top_k: Option<usize>,
        min_p: Option<f64>,
        seed: u64,
    ) -> Sampling {
        if temperature <= 0.0 {
            return Sampling::Greedy;
        }
        Sampling::Random {
            temperature,
            top_k: top_k.filter(|&k| k > 0),
            top_p: (top_p < 1.0).then_some(top_p),
            min_p: min_p.filter(|&p| p > 0.0),
            seed,
        }
    }

    /// The seed of a random sampler (0 for greedy, which draws nothing).
    pub fn seed(&self) -> u64 {
        match self {
            Sampling::Greedy => 0,
            Sampling::Random { seed, .. } => *seed,
        }
    }

    /// The same sampler with another seed (greedy stays greedy).
    pub fn with_seed(self, new: u64) -> Sampling {
        match self {
            Sampling::Greedy => Sampling::Greedy,
            Sampling::Random {
                temperature,
                top_k,
                top_p,
                min_p,
                ..
            } => Sampling::Random {
                temperature,
                top_k,
                top_p,
                min_p,
                seed: new,
            },
        }
    }
}

/// CTRL's repetition penalty as transformers and llama.cpp apply it: the logit of every id seen
/// in the window is divided by `penalty` when positive and multiplied by it when negative, so
/// `penalty` > 1 makes seen ids less likely (1 = off).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RepetitionPenalty {
    pub penalty: f64,
    /// The last ids (prompt included) the penalty looks at; `None`: all of them (transformers).
    /// llama.cpp's `repeat_last_n` is 64.
    pub last_n: Option<usize>,
}

/// Stops a row that loops: once its new ids end in a run of `window` ids repeated back to back
/// `times` times, that is once the last `window + (times − 1)·p` new ids have period `p` for some
/// `p` (one id repeated `window + times − 1` times is a loop too).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoopStop {
    pub window: usize,
    pub times: usize,
}

impl LoopStop {
    /// What the local teacher uses: a run of 32 ids repeated a third time in a row. A small model
    /// that loops repeats a sentence or a paragraph verbatim until the token limit; a period-`p`
    /// loop is cut after `32 + 2p` ids. Repeats must be back to back: a textbook section that
    /// shows a function again in a later example is not a loop (counting repeats anywhere cut 13
    /// of 58 Qwen2.5-Coder-0.5B sections as `truncated`, README, issue 25).
    pub const TEACHER: LoopStop = LoopStop {
        window: 32,
        times: 3,
    };

    /// Whether `out` ends in a loop (see [`LoopStop`]).
    pub fn ends(&self, out: &[u32]) -> bool {
        let (w, t, n) = (self.window.max(1), self.times.max(1), out.len());
        if t == 1 {
            return n >= w;
        }
        (1..)
            .map(|p| (p, w + (t - 1) * p))
            .take_while(|&(_, span)| span <= n)
            .any(|(p, span)| {
                let tail = &out[n - span..];
                tail[p..] == tail[..span - p]
            })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// End-of-sequence ids get probability 0 until the row has this many new ids (vLLM's
    /// `min_tokens`); 0: off. Stop strings are text, not ids: they still end a row earlier.
    pub min_new_tokens: usize,
    pub sampling: Sampling,
    pub repetition_penalty: Option<RepetitionPenalty>,
    pub loop_stop: Option<LoopStop>,
}

/// New tokens that still fit in `model`'s context after a prompt of `prompt_len` tokens.
pub fn context_room(model: &Decoder, prompt_len: usize) -> usize {
    model
        .config()
        .max_position_embeddings
        .saturating_sub(prompt_len)
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 256,
            min_new_tokens: 0,
            sampling: Sampling::new(0.8, 0.95, None, None, 0),
            repetition_penalty: None,
            loop_stop: None,
        }
    }
}

/// Why a row stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// `max_new_tokens` reached.
    Length,
    /// An end-of-sequence id was generated (it is kept in the output).
    EndOfSequence,
    /// The caller asked to stop (a stop string matched).
    Stopped,
    /// The row was looping ([`LoopStop`]): cut short, as incomplete as a row at its limit.
    Looping,
}

#[derive(Clone, Debug)]
pub struct Generation {
    /// The new ids of each row, prompt excluded.
    pub ids: Vec<Vec<u32>>,
    pub finish: Vec<Finish>,
}

/// Applies `penalty` to the logits of the ids in `recent` (each id once).
pub(crate) fn penalize(logits: &mut [f32], recent: &[u32], penalty: f64) {
    let r = penalty as f32;
    let mut seen = HashSet::new();
    for &id in recent {
        if seen.insert(id) {
            let l = &mut logits[id as usize];
            *l = if *l > 0.0 { *l / r } else { *l * r };
        }
    }
}

/// Gives the `eos` ids probability 0 (logit -inf), as vLLM's `min_tokens` does before a row is
/// long enough, unless nothing else could be drawn (every other logit already -inf or NaN):
/// then the logits stay as they were, so the row can still end.
pub(crate) fn hold_back(logits: &mut [f32], eos: &[u32]) {
    let held = |i: usize| eos.contains(&(i as u32));
    let other_left = logits
        .iter()
        .enumerate()
        .any(|(i, &l)| !held(i) && l > f32::NEG_INFINITY);
    if other_left {
        for &id in eos {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0 as u32
}

/// Chooses the next id from one row's logits.
pub(crate) fn pick(logits: &[f32], sampling: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let Sampling::Random {
        temperature,
        top_k,
        top_p,
        min_p,
        ..
    } = *sampling
    else {
        return argmax(logits);
    };
    let t = temperature as f32;
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let weight = |l: f32| f64::from((l - max) / t).exp();
    // A token's weight is its probability relative to the most likely one's: min-p drops the
    // tokens whose weight is below it (after top-k and top-p, as transformers orders them).
    let min_p = min_p.unwrap_or(0.0);
    if top_k.is_none() && top_p.is_none() {
        // The whole softmax: no order needed.
        let kept = |l: f32| match weight(l) {
            w if w < min_p => 0.0,
            w => w,
        };
        let total: f64 = logits.iter().map(|&l| kept(l)).sum();
        let mut u = rng.random::<f64>() * total;
        for (i, &l) in logits.iter().enumerate() {
            let w = kept(l);
            if u < w {
                return i as u32;
            }
            u -= w;
        }
        return argmax(logits);
    }
    // Candidates by descending logit; top-k and top-p cut the list. Sorting a 50k vocabulary per
    // token costs more than a small model's forward pass, so the best CANDIDATES are sorted first
    // and the rest only when they do not reach the top-p mass.
    const CANDIDATES: usize = 64;
    let total: f64 = logits.iter().map(|&l| weight(l)).sum();
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let head = top_k
        .unwrap_or(CANDIDATES)
        .clamp(1, CANDIDATES.max(top_k.unwrap_or(0)))
        .min(order.len());
    if head < order.len() {
        order.select_nth_unstable_by(head - 1, by_logit);
    }
    order[..head].sort_unstable_by(by_logit);
    let head_mass: f64 = order[..head]
        .iter()
        .map(|&i| weight(logits[i]))
        .sum::<f64>()
        / total;
    match top_k {
        Some(k) => order.truncate(k.max(1)),
        None if head_mass >= top_p.unwrap_or(1.0) => order.truncate(head),
        None => order.sort_unstable_by(by_logit),
    }
    let mut probs: Vec<f64> = order.iter().map(|&i| weight(logits[i]) / total).collect();
    if top_k.is_some() {
        // Renormalise over the k kept, as transformers' TopKLogitsWarper does before top-p.
        let kept: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= kept);
    }
    if let Some(top_p) = top_p {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                mass += p;
                mass >= top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    // Sorted by weight, so the tokens min-p keeps are a prefix (the first has weight 1).
    let keep = order
        .iter()
        .position(|&i| weight(logits[i]) < min_p)
        .unwrap_or(order.len())
        .max(1);
    probs.truncate(keep);
    order.truncate(keep);
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (p, &i) in probs.iter().zip(&order) {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    *order.last().expect("at least one candidate") as u32
}

/// One row being generated: its settings and sampler, the ids it has seen, and why it ended.
#[derive(Clone, Debug)]
pub struct Sequence {
    params: SamplingParams,
    eos: Vec<u32>,
    rng: ChaCha8Rng,
    /// The prompt, then the new ids (the repetition penalty looks at both).
    context: Vec<u32>,
    prompt_len: usize,
    loops: Option<LoopStop>,
    ended: Option<Finish>,
}

impl Sequence {
    /// A row that continues `prompt` under `params`, ending at any of `eos`, drawing from a
    /// generator seeded by `params`' seed.
    pub fn new(prompt: Vec<u32>, params: &SamplingParams, eos: &[u32]) -> Sequence {
        Sequence::with_rng(
            prompt,
            params,
            eos,
            ChaCha8Rng::seed_from_u64(params.sampling.seed()),
        )
    }

    fn with_rng(
        prompt: Vec<u32>,
        params: &SamplingParams,
        eos: &[u32],
        rng: ChaCha8Rng,
    ) -> Sequence {
        Sequence {
            params: *params,
            eos: eos.to_vec(),
            rng,
            prompt_len: prompt.len(),
            context: prompt,
            loops: params.loop_stop,
            ended: (params.max_new_tokens == 0).then_some(Finish::Length),
        }
    }

    pub fn prompt(&self) -> &[u32] {
        &self.context[..self.prompt_len]
    }

    /// The new ids so far.
    pub fn out(&self) -> &[u32] {
        &self.context[self.prompt_len..]
    }

    /// Why the row ended; `None` while it goes on.
    pub fn ended(&self) -> Option<Finish> {
        self.ended
    }

    /// Ends the row from outside (a failure of the batch it is in).
    pub fn end(&mut self, finish: Finish) {
        self.ended.get_or_insert(finish);
    }

    /// Chooses the next id from `logits` (changed in place by the repetition penalty and, while
    /// the row is shorter than `min_new_tokens`, by [`hold_back`]), appends it and decides
    /// whether the row ends. The checks, in order: `stop(new ids)` (a stop string; it sees
    /// every id, so a caller can stream from it), an end-of-sequence id, the token limit, a loop.
    pub fn advance(&mut self, logits: &mut [f32], stop: impl FnOnce(&[u32]) -> bool) -> u32 {
        if let Some(r) = self.params.repetition_penalty {
            let from = r.last_n.map_or(0, |n| self.context.len().saturating_sub(n));
            penalize(logits, &self.context[from..], r.penalty);
        }
        if self.context.len() - self.prompt_len < self.params.min_new_tokens {
            hold_back(logits, &self.eos);
        }
        let id = pick(logits, &self.params.sampling, &mut self.rng);
        self.context.push(id);
        let out = &self.context[self.prompt_len..];
        self.ended = if stop(out) {
            Some(Finish::Stopped)
        } else if self.eos.contains(&id) {
            Some(Finish::EndOfSequence)
        } else if out.len() >= self.params.max_new_tokens {
            Some(Finish::Length)
        } else if self.loops.is_some_and(|l| l.ends(out)) {
            Some(Finish::Looping)
        } else {
            None
        };
        id
    }
}

/// Generates up to `params.max_new_tokens` ids after each prompt. `on_token(row, new_ids)` is
/// called after every id a row receives and returns false to stop that row (stop strings).
/// A row also stops at any of `eos_ids`. Row `r` draws from stream `r` of the generator seeded
/// by `params`' seed, so rows of one prompt differ and a row does not depend on the others.
pub fn generate(
    model: &Decoder,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    eos_ids: &[u32],
    mut on_token: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Generation, ModelError> {
    let rows = prompts
        .iter()
        .enumerate()
        .map(|(r, p)| {
            let mut rng = ChaCha8Rng::seed_from_u64(params.sampling.seed());
            rng.set_stream(r as u64);
            Sequence::with_rng(p.clone(), params, eos_ids, rng)
        })
        .collect();
    let rows = generate_rows(model, rows, |r, ids| !on_token(r, ids))?;
    Ok(Generation {
        ids: rows.iter().map(|s| s.out().to_vec()).collect(),
        finish: rows
            .iter()
            .map(|s| s.ended().expect("generate_rows ends every row"))
            .collect(),
    })
}

/// Runs `rows` (each with its own settings and sampler) to their ends, in one batch;
/// `stop(row, new_ids)` says after each id whether a row stops there (see
/// [`Sequence::advance`]). Returns the rows, all ended.
pub fn generate_rows(
    model: &Decoder,
    mut rows: Vec<Sequence>,
    mut stop: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Sequence>, ModelError> {
    let vocab = model.config().vocab_size;
    for (r, s) in rows.iter().enumerate() {
        let p = s.prompt();
        if p.is_empty() {
            return Err(ModelError::Input(format!("prompt {r} has no tokens")));
        }
        if let Some(bad) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "prompt {r} has token id {bad}, beyond this model's vocabulary of {vocab}"
            )));
        }
    }
    // The rows still generating, in batch order: finished rows leave the batch.
    let mut active: Vec<usize> = (0..rows.len())
        .filter(|&r| rows[r].ended().is_none())
        .collect();
    if active.is_empty() {
        return Ok(rows);
    }
    let b = active.len();
    let longest = active
        .iter()
        .map(|&r| rows[r].prompt_len)
        .max()
        .unwrap_or(0);
    let pads: Vec<usize> = active
        .iter()
        .map(|&r| longest - rows[r].prompt_len)
        .collect();
    let pad_id = model.config().pad_token_id.unwrap_or(0);
    let new_cache = || {
        if pads.iter().any(|&n| n > 0) {
            KvCache::with_left_padding(model.config(), pads.clone())
        } else {
            KvCache::new(model.config())
        }
    };
    let mut cache = new_cache();
    let padded: Vec<u32> = active
        .iter()
        .zip(&pads)
        .flat_map(|(&r, &n)| std::iter::repeat_n(pad_id, n).chain(rows[r].prompt().iter().copied()))
        .collect();
    let mut input = Tensor::from_vec(padded, (b, longest), model.device())?;
    // Every id fed so far (pads included), to rebuild the cache when LongRoPE switches tables.
    let mut fed = Tensor::zeros((b, 0), DType::U32, model.device())?;
    // Positions in the first batch of the rows still in it (what `keep_rows` indexes after a
    // rebuild).
    let mut first_batch: Vec<usize> = (0..b).collect();
    while !active.is_empty() {
        let n = active.len();
        if let Some(original_max) = model.long_rope_from() {
            let (past, t) = (cache.len(), input.dim(1)?);
            // The cached keys were rotated with the short factors; the whole sequence is about to
            // need the long ones. Recompute from scratch, as transformers' Phi-3 generate does.
            if past > 0 && past <= original_max && past + t > original_max {
                input = Tensor::cat(&[&fed, &input], 1)?;
                fed = Tensor::zeros((n, 0), DType::U32, model.device())?;
                cache = new_cache();
                if n < b {
                    cache.keep_rows(&first_batch)?;
                }
            }
        }
        fed = Tensor::cat(&[&fed, &input], 1)?;
        let hidden = model.hidden_states(&input, Some(&mut cache))?; //            (n, T, C)
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        let logits = model
            .head_forward(&last)?
            .squeeze(1)?
            .to_dtype(DType::F32)?; // (n, V)
        let mut logits: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut next = Vec::with_capacity(n);
        let mut keep = Vec::with_capacity(n);
        for (i, &r) in active.iter().enumerate() {
            let id = rows[r].advance(&mut logits[i], |ids| stop(r, ids));
            if rows[r].ended().is_none() {
                keep.push(i);
                next.push(id);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < n {
            cache.keep_rows(&keep)?;
            let index = Tensor::new(
                keep.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                model.device(),
            )?;
            fed = fed.index_select(&index, 0)?;
            active = keep.iter().map(|&i| active[i]).collect();
            first_batch = keep.iter().map(|&i| first_batch[i]).collect();
        }
        input = Tensor::from_vec(next, (active.len(), 1), model.device())?;
    }
    Ok(rows)
}

/// Where the earliest of `stops` begins in `text`, if any does.
pub fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Turns one row's growing ids into text to print: cuts at the first stop string (never printed)
/// and holds back a tail that could still become one.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    stops: &'a [String],
    printed: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stops: &'a [String]) -> Self {
        TextStream {
            tokenizer,
            stops,
            printed: 0,
        }
    }

    /// The new text after `ids` (all new ids so far) and whether a stop string was reached.
    pub fn push(&mut self, ids: &[u32]) -> Result<(String, bool), ModelError> {
        let text = self.tokenizer.decode(ids)?;
        if let Some(cut) = first_stop(&text, self.stops) {
            return Ok((self.take(&text, cut), true));
        }
        let hold = self
            .stops
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut end = text.len().saturating_sub(hold);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Ok((self.take(&text, end), false))
    }

    /// Whatever was held back, once the row is finished.
    pub fn finish(&mut self, ids: &[u32]) -> Result<String, ModelError> {
        let text = self.tokenizer.decode(ids)?;
        let end = first_stop(&text, self.stops).unwrap_or(text.len());
        Ok(self.take(&text, end))
    }

    fn take(&mut self, text: &str, end: usize) -> String {
        let mut start = self.printed.min(end);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        self.printed = self.printed.max(end);
        text[start..end].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(temperature: f64) -> Sampling {
        Sampling::Random {
            temperature,
            top_k: None,
            top_p: None,
            min_p: None,
            seed: 0,
        }
    }

    /// Draws `n` ids from `logits` and counts each.
    fn draw(logits: &[f32], s: &Sampling, n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[pick(logits, s, rng) as usize] += 1;
        }
        counts
    }

    /// Within 5 standard deviations of `n * p` for each probability of `expected`.
    fn assert_near(counts: &[usize], expected: &[f64], n: usize) {
        for (c, p) in counts.iter().zip(expected) {
            let mean = n as f64 * p;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (*c as f64 - mean).abs() <= 5.0 * sd,
                "{counts:?} vs {expected:?}"
            );
        }
    }

    /// The settings as flags give them: temperature 0 is greedy whatever else is set; top-p 1,
    /// top-k 0 and min-p 0 are off.
    #[test]
    fn sampling_from_api_settings() {
        assert_eq!(
            Sampling::new(0.0, 0.5, Some(4), Some(0.1), 9),
            Sampling::Greedy
        );
        assert_eq!(
            Sampling::new(0.7, 1.0, Some(0), Some(0.0), 9),
            Sampling::Random {
                temperature: 0.7,
                top_k: None,
                top_p: None,
                min_p: None,
                seed: 9
            }
        );
        let s = Sampling::new(1.0, 0.9, Some(40), Some(0.05), 1);
        assert_eq!(s.with_seed(2).seed(), 2);
        assert_eq!(Sampling::Greedy.with_seed(2), Sampling::Greedy);
    }

    /// Hand-worked: penalty 2 halves a positive logit and doubles a negative one (transformers'
    /// RepetitionPenaltyLogitsProcessor), which moves the arg-max here from 0 to 2.
    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut logits = vec![3.0, -1.0, 2.0];
        penalize(&mut logits, &[0, 1, 0], 2.0);
        assert_eq!(logits, vec![1.5, -2.0, 2.0]);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(pick(&logits, &Sampling::Greedy, &mut rng), 2);
    }

    /// llama.cpp's window: with `last_n` 2 over the context [0, 1, 2] only ids 1 and 2 are
    /// penalized. By hand, with every logit 2: penalty 2 turns those of ids 1 and 2 into 1, so at
    /// temperature 1 the probabilities of (0, 1, 2, 3) with logits (2, 1, 1, 2) are
    /// (e², e, e, e²) / (2e² + 2e) = (0.3655, 0.1345, 0.1345, 0.3655).
    #[test]
    fn repetition_penalty_looks_at_the_last_n_ids() {
        let params = SamplingParams {
            max_new_tokens: 10,
            min_new_tokens: 0,
            sampling: random(1.0),
            repetition_penalty: Some(RepetitionPenalty {
                penalty: 2.0,
                last_n: Some(2),
            }),
            loop_stop: None,
        };
        let mut s = Sequence::new(vec![0, 1, 2], &params, &[]);
        let mut logits = [2.0f32; 4];
        s.clone().advance(&mut logits, |_| false);
        assert_eq!(logits, [2.0, 1.0, 1.0, 2.0]);
        let e = std::f64::consts::E;
        let z = 2.0 * e * e + 2.0 * e;
        let expected = [e * e / z, e / z, e / z, e * e / z];
        let n = 8000;
        let mut counts = vec![0usize; 4];
        for _ in 0..n {
            let mut row = s.clone();
            let id = row.advance(&mut [2.0f32; 4], |_| false);
            counts[id as usize] += 1;
            // The row's generator moves on: the next row draws the next number.
            s.rng = row.rng;
        }
        assert_near(&counts, &expected, n);
    }

    /// With top-k 1 sampling can only return the arg-max; with top-p 0.5 over probabilities
    /// (0.7, 0.2, 0.1) only the first token reaches the mass.
    #[test]
    fn top_k_and_top_p_cut_the_candidates() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let top1 = Sampling::new(2.0, 1.0, Some(1), None, 0);
        assert_eq!(draw(&[0.0, 5.0, 1.0, 4.0], &top1, 50, &mut rng)[1], 50);
        let l: Vec<f32> = [0.7f32, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let nucleus = Sampling::new(1.0, 0.5, None, None, 0);
        assert_eq!(draw(&l, &nucleus, 50, &mut rng)[0], 50);
    }

    /// Top-k 2 over probabilities (0.5, 0.3, 0.15, 0.05) keeps ids 0 and 1, renormalised to
    /// 0.5/0.8 = 0.625 and 0.3/0.8 = 0.375; top-k 3 with min-p 0.4 keeps (0.5, 0.3) too (0.15 <
    /// 0.4 · 0.5); at temperature 2 top-k 2 draws in proportion √0.5 : √0.3 (= 0.5635 : 0.4365).
    #[test]
    fn top_k_draws_from_the_renormalised_head() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let n = 8000;
        let k2 = Sampling::new(1.0, 1.0, Some(2), None, 0);
        let c = draw(&l, &k2, n, &mut rng);
        assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
        assert_near(&c, &[0.625, 0.375], n);
        let k3_min_p = Sampling::new(1.0, 1.0, Some(3), Some(0.4), 0);
        let c = draw(&l, &k3_min_p, n, &mut rng);
        assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
        assert_near(&c, &[0.625, 0.375], n);
        let hot = Sampling::new(2.0, 1.0, Some(2), None, 0);
        let (a, b) = (0.5f64.sqrt(), 0.3f64.sqrt());
        assert_near(&draw(&l, &hot, n, &mut rng), &[a / (a + b), b / (a + b)], n);
    }

    /// Min-p 0.25 over probabilities (0.5, 0.3, 0.15, 0.05): tokens below 0.25 × 0.5 = 0.125 are
    /// dropped, so only ids 0, 1 and 2 can be drawn, in proportion 0.5 : 0.3 : 0.15; with top-p
    /// 0.7 as well, top-p keeps ids 0 and 1 first. Hand-computed from transformers'
    /// MinPLogitsWarper definition.
    #[test]
    fn min_p_drops_tokens_below_its_share_of_the_best() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let min_p = Sampling::new(1.0, 1.0, None, Some(0.25), 0);
        let c = draw(&l, &min_p, 4000, &mut rng);
        assert_eq!(c[3], 0, "{c:?}");
        assert_near(&c, &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], 4000);
        let with_top_p = Sampling::new(1.0, 0.7, None, Some(0.25), 0);
        let c = draw(&l, &with_top_p, 4000, &mut rng);
        assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
        let strict = Sampling::new(1.0, 0.7, None, Some(0.9), 0);
        assert_eq!(draw(&l, &strict, 4000, &mut rng), [4000, 0, 0, 0]);
    }

    /// Feeds `ids` to a greedy row (one-hot logits) under `stop`; returns how many ids it took
    /// and why it ended.
    fn run_ids(prompt: &[u32], ids: &[u32], stop: LoopStop) -> (usize, Option<Finish>) {
        let params = SamplingParams {
            max_new_tokens: 1000,
            min_new_tokens: 0,
            sampling: Sampling::Greedy,
            repetition_penalty: None,
            loop_stop: Some(stop),
        };
        let mut s = Sequence::new(prompt.to_vec(), &params, &[]);
        for &id in ids {
            let mut logits = [0.0f32; 32];
            logits[id as usize] = 1.0;
            assert_eq!(s.advance(&mut logits, |_| false), id);
            if s.ended().is_some() {
                break;
            }
        }
        (s.out().len(), s.ended())
    }

    /// The loop stop by hand, window 3 three times in a row: the period-3 run 1 2 3 1 2 3 1 2 3
    /// ends at its 9th id (3 + 2·3), when [1 2 3] ends the row for the third time; one id
    /// repeated ends at the 5th (3 + 3 − 1); 1..=20 has no repeated window and runs out; a window
    /// that appeared only in the prompt does not count, so the row ends at the same 9th id.
    /// [1 2 3] three times with other ids between is not a loop (a function shown again in a
    /// later example), nor is a period-3 run that stops short: 1 2 3 1 2 3 1 2 (8 ids).
    #[test]
    fn loop_stop_ends_a_row_at_the_third_repeat() {
        let stop = LoopStop {
            window: 3,
            times: 3,
        };
        let period: Vec<u32> = [1, 2, 3].repeat(5);
        assert_eq!(run_ids(&[9], &period, stop), (9, Some(Finish::Looping)));
        assert_eq!(run_ids(&[9], &[5; 10], stop), (5, Some(Finish::Looping)));
        let distinct: Vec<u32> = (1..=20).collect();
        assert_eq!(run_ids(&[9], &distinct, stop), (20, None));
        let prompt = [1, 2, 3, 1, 2, 3, 1, 2, 3];
        assert_eq!(run_ids(&prompt, &period, stop), (9, Some(Finish::Looping)));
        let apart = [1, 2, 3, 7, 1, 2, 3, 8, 9, 1, 2, 3, 10, 1, 2, 3, 11];
        assert_eq!(run_ids(&[9], &apart, stop), (17, None));
        assert_eq!(run_ids(&[9], &period[..8], stop), (8, None));
        // Window 4, twice: 1 2 3 4 1 2 3 4 ends at its 8th id.
        let twice = LoopStop {
            window: 4,
            times: 2,
        };
        let p4: Vec<u32> = [1, 2, 3, 4].repeat(3);
        assert_eq!(run_ids(&[9], &p4, twice), (8, Some(Finish::Looping)));
    }

    /// Min tokens by hand, over probabilities (0.5, 0.3, 0.2) with id 2 the end of sequence and
    /// `min_new_tokens` 2: while a row has 0 or 1 new ids, id 2's logit is -inf and the draws
    /// follow (0.5, 0.3) / 0.8 = (0.625, 0.375, 0); from 2 new ids on, the logits are untouched
    /// and the draws follow (0.5, 0.3, 0.2).
    #[test]
    fn min_tokens_gives_end_of_sequence_zero_probability_until_n() {
        let l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let params = SamplingParams {
            max_new_tokens: 10,
            min_new_tokens: 2,
            sampling: random(1.0),
            repetition_penalty: None,
            loop_stop: None,
        };
        let n = 8000;
        for (new_ids, expected) in [
            (0, [0.625, 0.375, 0.0]),
            (1, [0.625, 0.375, 0.0]),
            (2, [0.5, 0.3, 0.2]),
            (5, [0.5, 0.3, 0.2]),
        ] {
            let mut s = Sequence::new(vec![7], &params, &[2]);
            s.context.extend(std::iter::repeat_n(0, new_ids));
            let mut logits = l.clone();
            s.clone().advance(&mut logits, |_| false);
            let held = new_ids < 2;
            assert_eq!(
                logits[2] == f32::NEG_INFINITY,
                held,
                "{new_ids}: {logits:?}"
            );
            assert_eq!(logits[..2], l[..2]);
            let mut counts = vec![0usize; 3];
            for _ in 0..n {
                let mut row = s.clone();
                let id = row.advance(&mut l.clone(), |_| false);
                counts[id as usize] += 1;
                assert_eq!(row.ended() == Some(Finish::EndOfSequence), id == 2);
                s.rng = row.rng;
            }
            if held {
                assert_eq!(counts[2], 0, "{new_ids}: {counts:?}");
            }
            assert_near(&counts, &expected, n);
        }
    }

    /// Greedy over logits (0, 1, 5) with id 2 the end of sequence and `min_new_tokens` 3: the
    /// arg-max is held back, so the row takes id 1 three times and ends with id 2 as its 4th;
    /// top-k 1 takes the best of what is left the same way. When the end of sequence is the only
    /// id left (every other logit -inf), it is drawn: the row ends rather than draw nothing.
    #[test]
    fn min_tokens_delays_the_end_and_falls_back_when_nothing_else_is_left() {
        let run = |sampling: Sampling, logits: [f32; 3]| {
            let params = SamplingParams {
                max_new_tokens: 10,
                min_new_tokens: 3,
                sampling,
                repetition_penalty: None,
                loop_stop: None,
            };
            let mut s = Sequence::new(vec![7], &params, &[2]);
            while s.ended().is_none() {
                s.advance(&mut logits.clone(), |_| false);
            }
            (s.out().to_vec(), s.ended())
        };
        let ended = Some(Finish::EndOfSequence);
        assert_eq!(
            run(Sampling::Greedy, [0.0, 1.0, 5.0]),
            (vec![1, 1, 1, 2], ended)
        );
        let top1 = Sampling::new(1.0, 1.0, Some(1), None, 4);
        assert_eq!(run(top1, [0.0, 1.0, 5.0]), (vec![1, 1, 1, 2], ended));
        let only_eos = [f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0];
        assert_eq!(run(Sampling::Greedy, only_eos), (vec![2], ended));
        assert_eq!(run(random(1.0), only_eos), (vec![2], ended));
    }

    /// Streaming "Hello world\n\ndef" token by token with stop "\n\n": the pieces printed are
    /// exactly the text before the stop, and the stop is reported at the token that completes it.
    #[test]
    fn text_stream_cuts_at_stop_strings() {
        use crate::model::tokenizer::Encoding;
        let t = Tokenizer::Tiktoken(Encoding::Gpt2);
        let ids = t.encode("Hello world\n\ndef f").unwrap();
        let stops = vec!["\n\n".to_string()];
        let mut stream = TextStream::new(&t, &stops);
        let mut printed = String::new();
        let mut stopped_at = None;
        for n in 1..=ids.len() {
            let (piece, stop) = stream.push(&ids[..n]).unwrap();
            printed.push_str(&piece);
            if stop {
                stopped_at = Some(n);
                break;
            }
        }
        assert_eq!(printed, "Hello world");
        assert!(stopped_at.is_some());
        let mut plain = TextStream::new(&t, &[]);
        let (all, stop) = plain.push(&ids).unwrap();
        assert_eq!((all.as_str(), stop), ("Hello world\n\ndef f", false));
    }

    /// Sampling at temperature 1 draws in proportion to softmax: 2,000 draws over logits
    /// ln(0.6), ln(0.3), ln(0.1) land near 1200/600/200.
    #[test]
    fn sampling_follows_the_distribution() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let l: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
        assert_near(
            &draw(&l, &random(1.0), 2000, &mut rng),
            &[0.6, 0.3, 0.1],
            2000,
        );
    }
}

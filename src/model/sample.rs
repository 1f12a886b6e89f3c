//! Batched generation with a KV cache. Logits are processed as transformers' `generate` does:
//! repetition penalty over the prompt and what was generated, then temperature, top-k, top-p;
//! greedy decoding takes the first arg-max. Prompts of different lengths are left-padded.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::decoder::{Decoder, KvCache};
use super::tokenizer::Tokenizer;
use super::ModelError;

#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// Ignored when `greedy`.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// Min-p: drop tokens whose probability is below `min_p` times the most likely one's
    /// (transformers' MinPLogitsWarper, llama.cpp's `min_p`; applied after top-k and top-p).
    pub min_p: Option<f64>,
    /// > 1 discourages tokens already present (1 = off).
    pub repetition_penalty: f64,
    pub seed: u64,
    pub greedy: bool,
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
            temperature: 0.8,
            top_k: None,
            top_p: Some(0.95),
            min_p: None,
            repetition_penalty: 1.0,
            seed: 0,
            greedy: false,
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
}

#[derive(Clone, Debug)]
pub struct Generation {
    /// The new ids of each row, prompt excluded.
    pub ids: Vec<Vec<u32>>,
    pub finish: Vec<Finish>,
}

/// Chooses the next id from one row's logits.
pub(crate) fn pick(
    logits: &mut [f32],
    context: &[u32],
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> u32 {
    if params.repetition_penalty != 1.0 {
        let r = params.repetition_penalty as f32;
        let mut seen = std::collections::HashSet::new();
        for &id in context {
            if seen.insert(id) {
                let l = &mut logits[id as usize];
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
        }
    }
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if params.greedy || params.temperature <= 0.0 {
        return argmax(logits);
    }
    let t = params.temperature as f32;
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let weight = |l: f32| f64::from((l - max) / t).exp();
    // A token's weight is its probability relative to the most likely one's: min-p drops the
    // tokens whose weight is below it (after top-k and top-p, as transformers orders them).
    let min_p = params.min_p.unwrap_or(0.0);
    if params.top_k.is_none() && params.top_p.is_none() {
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
    let head = params
        .top_k
        .unwrap_or(CANDIDATES)
        .clamp(1, CANDIDATES.max(params.top_k.unwrap_or(0)))
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
    let top_p = params.top_p.unwrap_or(1.0);
    match params.top_k {
        Some(k) => order.truncate(k.max(1)),
        None if head_mass >= top_p => order.truncate(head),
        None => order.sort_unstable_by(by_logit),
    }
    let mut probs: Vec<f64> = order.iter().map(|&i| weight(logits[i]) / total).collect();
    if params.top_k.is_some() {
        // Renormalise over the k kept, as transformers' TopKLogitsWarper does before top-p.
        let kept: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= kept);
    }
    if let Some(top_p) = params.top_p {
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

/// Generates up to `params.max_new_tokens` ids after each prompt. `on_token(row, new_ids)` is
/// called after every id a row receives and returns false to stop that row (stop strings).
/// A row also stops at any of `eos_ids`.
pub fn generate(
    model: &Decoder,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    eos_ids: &[u32],
    mut on_token: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Generation, ModelError> {
    let b = prompts.len();
    let vocab = model.config().vocab_size;
    for (r, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ModelError::Input(format!("prompt {r} has no tokens")));
        }
        if let Some(bad) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "prompt {r} has token id {bad}, beyond this model's vocabulary of {vocab}"
            )));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let pad_id = model.config().pad_token_id.unwrap_or(0);
    let new_cache = || {
        if pads.iter().any(|&n| n > 0) {
            KvCache::with_left_padding(model.config(), pads.clone())
        } else {
            KvCache::new(model.config())
        }
    };
    let mut cache = new_cache();
    let padded: Vec<u32> = prompts
        .iter()
        .zip(&pads)
        .flat_map(|(p, &n)| std::iter::repeat_n(pad_id, n).chain(p.iter().copied()))
        .collect();
    let mut input = Tensor::from_vec(padded, (b, longest), model.device())?;
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let mut contexts: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut finish: Vec<Option<Finish>> = vec![None; b];
    if params.max_new_tokens == 0 {
        return Ok(Generation {
            ids: out,
            finish: vec![Finish::Length; b],
        });
    }
    // Every id fed so far (pads included), to rebuild the cache when LongRoPE switches tables.
    let mut fed = Tensor::zeros((b, 0), DType::U32, model.device())?;
    // The rows still generating, in batch order: finished rows leave the batch.
    let mut active: Vec<usize> = (0..b).collect();
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
                    cache.keep_rows(&active)?;
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
        let mut rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut next = Vec::with_capacity(n);
        let mut keep = Vec::with_capacity(n);
        for (i, &r) in active.iter().enumerate() {
            let id = pick(&mut rows[i], &contexts[r], params, &mut rng);
            contexts[r].push(id);
            out[r].push(id);
            if !on_token(r, &out[r]) {
                finish[r] = Some(Finish::Stopped);
            } else if eos_ids.contains(&id) {
                finish[r] = Some(Finish::EndOfSequence);
            } else if out[r].len() >= params.max_new_tokens {
                finish[r] = Some(Finish::Length);
            } else {
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
        }
        input = Tensor::from_vec(next, (active.len(), 1), model.device())?;
    }
    Ok(Generation {
        ids: out,
        finish: finish
            .into_iter()
            .map(|f| f.expect("loop ends when all rows finished"))
            .collect(),
    })
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

    fn params(greedy: bool) -> SamplingParams {
        SamplingParams {
            greedy,
            ..SamplingParams::default()
        }
    }

    /// Hand-worked: penalty 2 halves a positive logit and doubles a negative one (transformers'
    /// RepetitionPenaltyLogitsProcessor), which moves the arg-max here from 0 to 2.
    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params(true)
        };
        let mut logits = vec![3.0, -1.0, 2.0];
        assert_eq!(pick(&mut logits, &[0, 1, 0], &p, &mut rng), 2);
        assert_eq!(logits, vec![1.5, -2.0, 2.0]);
    }

    /// With top-k 1 sampling can only return the arg-max; with top-p 0.5 over probabilities
    /// (0.7, 0.2, 0.1) only the first token reaches the mass.
    #[test]
    fn top_k_and_top_p_cut_the_candidates() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let logits = [0.0f32, 5.0, 1.0, 4.0];
        for _ in 0..50 {
            let p = SamplingParams {
                top_k: Some(1),
                temperature: 2.0,
                ..params(false)
            };
            assert_eq!(pick(&mut logits.clone(), &[], &p, &mut rng), 1);
        }
        let probs = [0.7f32, 0.2, 0.1];
        let l: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        for _ in 0..50 {
            let p = SamplingParams {
                top_p: Some(0.5),
                temperature: 1.0,
                top_k: None,
                ..params(false)
            };
            assert_eq!(pick(&mut l.clone(), &[], &p, &mut rng), 0);
        }
    }

    /// Min-p 0.25 over probabilities (0.5, 0.3, 0.15, 0.05): tokens below 0.25 × 0.5 = 0.125 are
    /// dropped, so only ids 0, 1 and 2 can be drawn, in proportion 0.5 : 0.3 : 0.15; with top-p
    /// 0.7 as well, top-p keeps ids 0 and 1 first. Hand-computed from transformers'
    /// MinPLogitsWarper definition.
    #[test]
    fn min_p_drops_tokens_below_its_share_of_the_best() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let draw = |p: &SamplingParams, rng: &mut ChaCha8Rng| {
            let mut counts = [0usize; 4];
            for _ in 0..4000 {
                counts[pick(&mut l.clone(), &[], p, rng) as usize] += 1;
            }
            counts
        };
        let p = SamplingParams {
            min_p: Some(0.25),
            temperature: 1.0,
            top_k: None,
            top_p: None,
            ..params(false)
        };
        let c = draw(&p, &mut rng);
        assert_eq!(c[3], 0, "{c:?}");
        // 0.5 / 0.95 of 4000 ≈ 2105, σ ≈ 32: within 5σ.
        assert!((c[0] as f64 - 4000.0 * 0.5 / 0.95).abs() < 160.0, "{c:?}");
        assert!(c[2] > 0, "{c:?}");
        let p = SamplingParams {
            top_p: Some(0.7),
            ..p
        };
        let c = draw(&p, &mut rng);
        assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
        let p = SamplingParams {
            min_p: Some(0.9),
            ..p
        };
        assert_eq!(draw(&p, &mut rng), [4000, 0, 0, 0]);
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
    /// ln(0.6), ln(0.3), ln(0.1) land within 4 standard deviations of 1200/600/200.
    #[test]
    fn sampling_follows_the_distribution() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let l: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
        let p = SamplingParams {
            top_p: None,
            temperature: 1.0,
            ..params(false)
        };
        let mut counts = [0usize; 3];
        for _ in 0..2000 {
            counts[pick(&mut l.clone(), &[], &p, &mut rng) as usize] += 1;
        }
        for (c, expected) in counts.iter().zip([0.6, 0.3, 0.1]) {
            let mean = 2000.0 * expected;
            let sd = (2000.0_f64 * expected * (1.0 - expected)).sqrt();
            assert!((*c as f64 - mean).abs() < 4.0 * sd, "{counts:?}");
        }
    }
}

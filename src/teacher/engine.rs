//! The batching engine behind the local teacher and `phigen serve`: one thread that owns a
//! [`LocalModel`] and batches requests continuously. Every row of the batch shares each forward
//! pass (one KV cache row per sequence); a row that finishes leaves, and a request that arrives
//! while others are generating joins at the next step (the prompts that arrive together run as
//! one prefill). Where the decoder has a slot path ([`crate::model::Decoder::decode_slots`]: a
//! GGUF file's 4/8-bit projections on a CPU with VNNI), each row owns its keys and values (a
//! [`Slot`]) and a newcomer's prefill is copied into its own slot only; elsewhere the batch's
//! cache is regrouped (one copy) when rows leave or join. Models whose rotary tables change with
//! the length (LongRoPE) are batched statically instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::local::LocalModel;
use super::{FinishReason, Sampling};
use crate::model::cache::Slot;
use crate::model::sample::{
    self, first_stop, Finish, LoopStop, RepetitionPenalty, SamplingParams, Sequence,
};
use crate::model::KvCache;

/// The ids the repetition penalty looks at (prompt included): llama.cpp's `repeat_last_n`
/// default, so a penalty means here what it means there.
pub const REPEAT_LAST_N: usize = 64;

/// One generation request: it carries its own seed, so its answer does not depend on what else
/// the engine is generating or in which order requests arrive.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// End-of-sequence ids get probability 0 until the answer has this many tokens (vLLM's
    /// `min_tokens`; 0: off).
    pub min_tokens: usize,
    pub sampling: sample::Sampling,
    /// > 1 makes ids among the last [`REPEAT_LAST_N`] less likely (`None` or 1: off).
    pub repetition_penalty: Option<f32>,
    /// Cut the answer short (finish reason `length`) once it loops; `None`: never.
    pub loop_stop: Option<LoopStop>,
    /// Text at which the answer ends (not included).
    pub stop: Vec<String>,
    /// Go on past end-of-sequence tokens until `max_tokens` (benchmarks; vLLM's extension).
    pub ignore_eos: bool,
}

impl Request {
    /// A request for `prompt` under a teacher's settings, sampled with `seed`; no stop strings,
    /// no loop stop.
    pub fn new(prompt: Vec<u32>, settings: &Sampling, seed: u64) -> Request {
        Request {
            prompt,
            max_tokens: settings.max_tokens as usize,
            min_tokens: settings.min_tokens.map_or(0, |n| n as usize),
            sampling: settings.decoding(seed),
            repetition_penalty: settings.repetition_penalty,
            loop_stop: None,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }

    /// New tokens allowed: the request's, within the `context` left after the prompt.
    fn limit(&self, context: usize) -> usize {
        self.max_tokens.min(context - self.prompt.len()).max(1)
    }

    /// The row that generates this request's answer on `model`.
    fn sequence(&self, model: &LocalModel) -> Sequence {
        let limit = self.limit(model.context());
        let params = SamplingParams {
            max_new_tokens: limit,
            min_new_tokens: self.min_tokens.min(limit),
            sampling: self.sampling,
            repetition_penalty: self.repetition_penalty.filter(|&p| p != 1.0).map(|p| {
                RepetitionPenalty {
                    penalty: f64::from(p),
                    last_n: Some(REPEAT_LAST_N),
                }
            }),
            loop_stop: self.loop_stop,
        };
        let eos: &[u32] = if self.ignore_eos { &[] } else { &model.eos };
        Sequence::new(self.prompt.clone(), &params, eos)
    }

    /// Whether the answer so far (`out`) has reached one of the stop strings.
    fn stopped(&self, model: &LocalModel, out: &[u32]) -> bool {
        !self.stop.is_empty()
            && first_stop(&model.tokenizer.decode(out).unwrap_or_default(), &self.stop).is_some()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt has {prompt} tokens; the model's context is {context}: shorten it")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("generation failed: {0}")]
    Failed(String),
}

struct Job {
    request: Request,
    reply: tokio::sync::oneshot::Sender<Result<Completion, EngineError>>,
}

/// Batches requests onto one model; cheap to share (`Arc`).
pub struct Engine {
    model: Arc<LocalModel>,
    seed: u64,
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
    /// Tokens generated and batches run, for benchmarks and logs.
    pub generated: Arc<AtomicU64>,
    pub batches: Arc<AtomicU64>,
}

impl Engine {
    /// Starts the batching thread: at most `max_batch` sequences share a forward pass. Every
    /// request carries its own seed; `phigen serve` derives the seeds of requests that bring
    /// none from `seed` ([`Engine::seed`]).
    pub fn start(model: Arc<LocalModel>, max_batch: usize, seed: u64) -> Engine {
        let (tx, rx) = mpsc::channel::<Job>();
        let generated = Arc::new(AtomicU64::new(0));
        let batches = Arc::new(AtomicU64::new(0));
        let (m, g, b) = (model.clone(), generated.clone(), batches.clone());
        std::thread::Builder::new()
            .name("phigen-local-teacher".into())
            .spawn(move || {
                // The loop runs as a worker of a pool of its own, so the parallel loops of each
                // step split among the pool's workers, this one included: a caller outside the
                // pool would sleep on a latch and be woken for every one of the hundreds of
                // products of a step.
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(rayon::current_num_threads())
                    .thread_name(|i| format!("phigen-teacher-{i}"))
                    .build()
                    .expect("the teacher's threads can be started");
                pool.install(move || run(&m, &rx, max_batch.max(1), &g, &b))
            })
            .expect("a thread can be spawned");
        Engine {
            model,
            seed,
            jobs: std::sync::Mutex::new(tx),
            generated,
            batches,
        }
    }

    /// The seed the engine was started with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn model(&self) -> &LocalModel {
        &self.model
    }

    /// Queues `request` and waits for its completion.
    pub async fn complete(&self, request: Request) -> Result<Completion, EngineError> {
        let context = self.model.context();
        if request.prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                prompt: request.prompt.len(),
                context,
            });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .lock()
            .expect("the sender is never poisoned")
            .send(Job { request, reply })
            .map_err(|_| EngineError::Failed("the generation thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| EngineError::Failed("the generation thread has stopped".into()))?
    }
}

/// How long the thread waits for more requests once one arrived and nothing is running:
/// workers that were answered together send their next requests within moments of each other.
const GATHER: Duration = Duration::from_millis(5);

fn run(
    model: &LocalModel,
    rx: &mpsc::Receiver<Job>,
    max_batch: usize,
    generated: &AtomicU64,
    batches: &AtomicU64,
) {
    if model.decoder.long_rope_from().is_some() {
        return run_static(model, rx, max_batch, generated, batches);
    }
    if model.decoder.decodes_slots() {
        return run_slots(model, rx, max_batch, generated, batches);
    }
    let mut live: Vec<Row> = Vec::new();
    let mut cache: Option<KvCache> = None;
    loop {
        let room = max_batch.saturating_sub(live.iter().filter(|r| r.going_on()).count());
        let Some(joining) = arrivals(rx, live.is_empty(), room, max_batch) else {
            return;
        };
        let mut rows: Vec<Row> = Vec::new();
        let mut joined: Option<KvCache> = None;
        if !joining.is_empty() {
            batches.fetch_add(1, Ordering::Relaxed);
            rows = joining
                .into_iter()
                .map(|job| Row::new(job, model))
                .collect();
            match prefill(model, &mut rows) {
                Ok(c) => joined = Some(c),
                Err(e) => fail(&mut rows, &e),
            }
            rows.iter_mut().for_each(|r| r.answer(model, generated));
        }
        // One copy of the cache: the rows still generating, then the newcomers still going on.
        let keep: Vec<usize> = (0..live.len()).filter(|&i| live[i].going_on()).collect();
        let going_on: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].going_on()).collect();
        if keep.len() < live.len() || !going_on.is_empty() {
            let join = joined.as_ref().map(|c| (c, going_on.as_slice()));
            let regrouped = cache
                .get_or_insert_with(|| KvCache::new(model.decoder.config()))
                .regroup(&keep, join);
            live.retain(Row::going_on);
            live.extend(rows.into_iter().filter(Row::going_on));
            if let Err(e) = regrouped {
                fail(&mut live, &e);
            }
        }
        if !live.iter().any(Row::going_on) {
            live.clear();
            cache = None;
            continue;
        }
        let c = cache.as_mut().expect("a cache while rows generate");
        if let Err(e) = decode_step(model, c, &mut live) {
            fail(&mut live, &e);
        }
        live.iter_mut().for_each(|r| r.answer(model, generated));
    }
}

/// Continuous batching over slots: each newcomer is prefilled on its own (so its numbers do not
/// depend on what arrived with it), gets its own [`Slot`], and every step decodes
/// all live rows over their slots in place. A row that ends leaves with its slot.
fn run_slots(
    model: &LocalModel,
    rx: &mpsc::Receiver<Job>,
    max_batch: usize,
    generated: &AtomicU64,
    batches: &AtomicU64,
) {
    let mut live: Vec<Row> = Vec::new();
    loop {
        let room = max_batch.saturating_sub(live.len());
        let Some(joining) = arrivals(rx, live.is_empty(), room, max_batch) else {
            return;
        };
        if !joining.is_empty() {
            batches.fetch_add(1, Ordering::Relaxed);
            let mut rows: Vec<Row> = joining
                .into_iter()
                .map(|job| Row::new(job, model))
                .collect();
            // Each newcomer's prompt runs on its own: a row's numbers must not depend on which
            // other prompts arrived with it (records are the same at any --concurrency).
            for row in rows.iter_mut() {
                let one = std::slice::from_mut(row);
                match prefill(model, one) {
                    Ok(cache) => {
                        if !one[0].going_on() {
                            continue;
                        }
                        let more = one[0].request.limit(model.context());
                        match Slot::from_batch(&cache, 0, more) {
                            Ok(slot) => one[0].slot = Some(slot),
                            Err(e) => fail(one, &e),
                        }
                    }
                    Err(e) => fail(one, &e),
                }
            }
            rows.iter_mut().for_each(|r| r.answer(model, generated));
            live.extend(rows.into_iter().filter(Row::going_on));
        }
        if live.is_empty() {
            continue;
        }
        let ids: Vec<u32> = live
            .iter()
            .map(|r| *r.seq.out().last().expect("rows have an id"))
            .collect();
        let mut slots: Vec<&mut Slot> = live
            .iter_mut()
            .map(|r| r.slot.as_mut().expect("live rows have a slot"))
            .collect();
        match model.decoder.decode_slots(&ids, &mut slots) {
            Ok(mut logits) => {
                let v = logits.len() / live.len();
                live.par_iter_mut()
                    .zip(logits.par_chunks_mut(v))
                    .for_each(|(row, l)| row.take(l, model));
            }
            Err(e) => fail(&mut live, &e),
        }
        live.iter_mut().for_each(|r| r.answer(model, generated));
        live.retain(Row::going_on);
    }
}

/// The requests that join the batch now: when it is `idle`, after a short gathering wait (see
/// [`gather`]); while rows are generating, those already waiting, up to `room`. `None` once every
/// sender is gone and nothing is waiting.
fn arrivals(
    rx: &mpsc::Receiver<Job>,
    idle: bool,
    room: usize,
    max_batch: usize,
) -> Option<Vec<Job>> {
    let mut joining = Vec::new();
    if idle {
        return gather(rx, &mut joining, max_batch).then_some(joining);
    }
    while joining.len() < room {
        match rx.try_recv() {
            Ok(job) => joining.push(job),
            Err(_) => break,
        }
    }
    Some(joining)
}

/// Waits for a job when `jobs` is empty, then up to [`GATHER`] for more, up to `max_batch` in all.
/// False once every sender is gone and nothing is waiting.
fn gather(rx: &mpsc::Receiver<Job>, jobs: &mut Vec<Job>, max_batch: usize) -> bool {
    if jobs.is_empty() {
        match rx.recv() {
            Ok(job) => jobs.push(job),
            Err(_) => return false,
        }
    }
    let deadline = Instant::now() + GATHER;
    while jobs.len() < max_batch {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    true
}

/// Ends every row still going with `error`.
fn fail(rows: &mut [Row], error: &candle_core::Error) {
    for row in rows.iter_mut().filter(|r| r.going_on()) {
        row.seq.end(Finish::Stopped);
        if let Some(reply) = row.reply.take() {
            let _ = reply.send(Err(EngineError::Failed(error.to_string())));
        }
    }
}

/// One request being generated.
struct Row {
    request: Request,
    /// Taken when the answer is sent.
    reply: Option<tokio::sync::oneshot::Sender<Result<Completion, EngineError>>>,
    seq: Sequence,
    /// Its keys and values, on the slot path.
    slot: Option<Slot>,
}

impl Row {
    fn new(job: Job, model: &LocalModel) -> Row {
        Row {
            seq: job.request.sequence(model),
            request: job.request,
            reply: Some(job.reply),
            slot: None,
        }
    }

    fn going_on(&self) -> bool {
        self.seq.ended().is_none()
    }

    /// Sends the answer of a row that has ended (once).
    fn answer(&mut self, model: &LocalModel, generated: &AtomicU64) {
        if self.going_on() {
            return;
        }
        if let Some(reply) = self.reply.take() {
            let result = completion(model, &self.request, &self.seq);
            if let Ok(c) = &result {
                generated.fetch_add(c.completion_tokens, Ordering::Relaxed);
            }
            let _ = reply.send(result);
        }
    }

    /// Samples the next id from this row's logits and decides whether the row goes on.
    fn take(&mut self, logits: &mut [f32], model: &LocalModel) {
        let Row { request, seq, .. } = self;
        seq.advance(logits, |out| request.stopped(model, out));
    }
}

/// Runs the prompts of `rows` (left-padded into one batch) and samples each row's first id;
/// returns their cache.
fn prefill(model: &LocalModel, rows: &mut [Row]) -> candle_core::Result<KvCache> {
    let longest = rows.iter().map(|r| r.seq.prompt().len()).max().unwrap_or(0);
    let pads: Vec<usize> = rows
        .iter()
        .map(|r| longest - r.seq.prompt().len())
        .collect();
    let pad_id = model.decoder.config().pad_token_id.unwrap_or(0);
    let ids: Vec<u32> = rows
        .iter()
        .zip(&pads)
        .flat_map(|(r, &n)| std::iter::repeat_n(pad_id, n).chain(r.seq.prompt().iter().copied()))
        .collect();
    let mut cache = KvCache::with_left_padding(model.decoder.config(), pads);
    let input = Tensor::from_vec(ids, (rows.len(), longest), model.decoder.device())?;
    let hidden = model.decoder.hidden_states(&input, Some(&mut cache))?;
    sample_next(model, &hidden.narrow(1, longest - 1, 1)?, rows)?;
    Ok(cache)
}

/// Feeds every row its last id and samples the next.
fn decode_step(
    model: &LocalModel,
    cache: &mut KvCache,
    rows: &mut [Row],
) -> candle_core::Result<()> {
    let last: Vec<u32> = rows
        .iter()
        .map(|r| *r.seq.out().last().expect("rows have an id"))
        .collect();
    let input = Tensor::from_vec(last, (rows.len(), 1), model.decoder.device())?;
    let hidden = model.decoder.hidden_states(&input, Some(cache))?;
    sample_next(model, &hidden, rows)
}

/// hidden (n, 1, C) of the rows' last positions → one new id per row (rows in parallel, each
/// with its own sampler).
fn sample_next(model: &LocalModel, hidden: &Tensor, rows: &mut [Row]) -> candle_core::Result<()> {
    let logits = model
        .decoder
        .head_forward(hidden)?
        .squeeze(1)?
        .to_dtype(DType::F32)?;
    let mut logits: Vec<Vec<f32>> = logits.to_vec2()?;
    rows.par_iter_mut()
        .zip(logits.par_iter_mut())
        .for_each(|(row, l)| row.take(l, model));
    Ok(())
}

/// Static batches, for models whose rotary tables change with the length (LongRoPE): whatever
/// is waiting when a batch starts is generated together (each row with its own settings and
/// sampler); a row that finishes leaves the batch.
fn run_static(
    model: &LocalModel,
    rx: &mpsc::Receiver<Job>,
    max_batch: usize,
    generated: &AtomicU64,
    batches: &AtomicU64,
) {
    let mut waiting: Vec<Job> = Vec::new();
    loop {
        if !gather(rx, &mut waiting, max_batch) {
            return;
        }
        let rest = waiting.split_off(waiting.len().min(max_batch));
        let batch = std::mem::replace(&mut waiting, rest);
        batches.fetch_add(1, Ordering::Relaxed);
        let results = generate_batch(model, &batch);
        for (job, result) in batch.into_iter().zip(results) {
            if let Ok(c) = &result {
                generated.fetch_add(c.completion_tokens, Ordering::Relaxed);
            }
            let _ = job.reply.send(result);
        }
    }
}

fn generate_batch(model: &LocalModel, jobs: &[Job]) -> Vec<Result<Completion, EngineError>> {
    let rows = jobs.iter().map(|j| j.request.sequence(model)).collect();
    match sample::generate_rows(&model.decoder, rows, |row, ids| {
        jobs[row].request.stopped(model, ids)
    }) {
        Ok(rows) => jobs
            .iter()
            .zip(&rows)
            .map(|(job, seq)| completion(model, &job.request, seq))
            .collect(),
        Err(e) => {
            let reason = e.to_string();
            jobs.iter()
                .map(|_| Err(EngineError::Failed(reason.clone())))
                .collect()
        }
    }
}

/// The answer to `request` from its ended row `seq`. A row cut short by the loop stop is
/// reported as `length`: its text is as incomplete as one at the token limit.
fn completion(
    model: &LocalModel,
    request: &Request,
    seq: &Sequence,
) -> Result<Completion, EngineError> {
    let out = seq.out();
    let (ids, finish) = match seq.ended() {
        Some(Finish::EndOfSequence) => (&out[..out.len().saturating_sub(1)], FinishReason::Stop),
        Some(Finish::Stopped) => (out, FinishReason::Stop),
        Some(Finish::Length | Finish::Looping) | None => (out, FinishReason::Length),
    };
    let mut text = model
        .tokenizer
        .decode(ids)
        .map_err(|e| EngineError::Failed(e.to_string()))?;
    if let Some(cut) = first_stop(&text, &request.stop) {
        text.truncate(cut);
    }
    Ok(Completion {
        text,
        finish,
        prompt_tokens: request.prompt.len() as u64,
        completion_tokens: out.len() as u64,
    })
}

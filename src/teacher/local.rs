//! The in-process teacher: a small instruct model run by phigen's own decoder, so a corpus can be
//! generated with no API key and no server (`--teacher local:SPEC`).
//!
//! SPEC is a checkpoint directory (Hugging Face layout with `tokenizer.json`, and the chat template
//! from `tokenizer_config.json`), a `.gguf` file, or a Hub id fetched into the Hugging Face cache.
//! Requests from all workers go to one [`Engine`] thread that batches them continuously: every
//! row of the batch shares each forward pass (one KV cache row per sequence); a row that finishes
//! leaves, and a request that arrives while others are generating joins at the next step (its
//! prompt runs as a prefill of its own, then its cache rows are merged in). The same engine
//! serves `phigen serve`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::retry::RequestCounters;
use super::{Answer, FinishReason, Sampling, Teacher, TeacherError, Usage};
use crate::model::chat::{ChatTemplate, Message};
use crate::model::sample::{self, first_stop, Finish, SamplingParams};
use crate::model::tokenizer::Tokenizer;
use crate::model::{checkpoint, gguf, hub, Decoder, KvCache, ModelError};

/// The teacher used when none is configured: small enough for a laptop, and an instruct model.
/// It writes simple, imperfect text: for trying the pipeline, not for training a phi-1.
pub const DEFAULT_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Said in the README, on the console and in `stats.json` when a teacher this small writes a corpus.
pub const SMALL_TEACHER_NOTE: &str = "a local teacher of this size writes simple, imperfect data: it is for trying the pipeline, not for training a phi-1";

/// A model, its tokenizer and chat template, ready to answer.
pub struct LocalModel {
    /// `local:` + what was loaded, recorded with each record.
    pub name: String,
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
    /// Ids that end an answer: the config's, `generation_config.json`'s and the chat template's.
    pub eos: Vec<u32>,
}

/// `eos_token_id` of a JSON file (one id or a list), if it has one.
fn eos_in(path: &Path) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    match &v["eos_token_id"] {
        serde_json::Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|n| n.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl LocalModel {
    /// Loads SPEC (see the module documentation) with weights in `dtype` on the CPU; a GGUF
    /// file's projections stay in their quantized types when `quantized`.
    pub fn load(spec: &str, dtype: DType, quantized: bool) -> Result<Self, ModelError> {
        let device = Device::Cpu;
        let path = Path::new(spec);
        let gguf_file = if path.is_file() {
            Some(path.to_path_buf())
        } else {
            let dir = hub::model_dir(spec, true)?;
            if dir.join(checkpoint::CONFIG_FILE).is_file() {
                None
            } else {
                let mut ggufs: Vec<_> = std::fs::read_dir(&dir)
                    .map_err(|source| ModelError::Io {
                        path: dir.clone(),
                        source,
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                    .collect();
                ggufs.sort();
                match ggufs.as_slice() {
                    [one] => Some(one.clone()),
                    _ => return Err(ModelError::BadFile {
                        path: dir,
                        reason: format!("expected a checkpoint ({}) or exactly one .gguf file; found {} .gguf files", checkpoint::CONFIG_FILE, ggufs.len()),
                    }),
                }
            }
        };
        let (decoder, tokenizer, chat, extra_eos) = match &gguf_file {
            Some(file) => {
                let g = gguf::load(file, dtype, &device, quantized)?;
                (g.decoder, g.tokenizer, g.chat, Vec::new())
            }
            None => {
                let dir = hub::model_dir(spec, true)?;
                let decoder = checkpoint::load(&dir, dtype, &device)?;
                let mut eos = eos_in(&dir.join("generation_config.json"));
                let tokenizer = Tokenizer::for_checkpoint(&dir)?;
                let chat = ChatTemplate::for_checkpoint(&dir)?;
                if let Some(t) = &chat {
                    if let Ok(ids) = tokenizer.encode_rendered(t.eos_token()) {
                        if let [one] = ids.as_slice() {
                            eos.push(*one);
                        }
                    }
                }
                (decoder, tokenizer, chat, eos)
            }
        };
        let mut eos = decoder.config().eos_ids();
        for id in extra_eos {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let name = match &gguf_file {
            Some(f) if !path.is_file() => format!(
                "local:{spec}/{}",
                f.file_name().unwrap_or_default().to_string_lossy()
            ),
            _ => format!("local:{spec}"),
        };
        Ok(LocalModel {
            name,
            decoder,
            tokenizer,
            chat,
            eos,
        })
    }

    /// Prompt ids for a conversation: the chat template when the model has one, else the
    /// messages' contents joined by blank lines (a base model just continues the text).
    pub fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>, ModelError> {
        match &self.chat {
            Some(t) => self.tokenizer.encode_rendered(&t.render(messages, true)?),
            None => {
                let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
                self.tokenizer.encode(&text.join("\n\n"))
            }
        }
    }

    /// Positions of the model's context.
    pub fn context(&self) -> usize {
        self.decoder.config().max_position_embeddings
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    /// Text at which the answer ends (not included).
    pub stop: Vec<String>,
    /// Go on past end-of-sequence tokens until `max_tokens` (benchmarks; vLLM's extension).
    pub ignore_eos: bool,
}

impl Request {
    /// New tokens allowed: the request's, within the `context` left after the prompt.
    fn limit(&self, context: usize) -> usize {
        self.max_tokens.min(context - self.prompt.len()).max(1)
    }

    fn sampling(&self, max_new_tokens: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            max_new_tokens,
            temperature: f64::from(self.temperature),
            top_k: self.top_k.map(|k| k as usize),
            top_p: (self.top_p < 1.0).then_some(f64::from(self.top_p)),
            min_p: self.min_p.filter(|&p| p > 0.0).map(f64::from),
            repetition_penalty: 1.0,
            seed,
            greedy: self.temperature <= 0.0,
        }
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
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
    /// Tokens generated and batches run, for benchmarks and logs.
    pub generated: Arc<AtomicU64>,
    pub batches: Arc<AtomicU64>,
}

impl Engine {
    /// Starts the batching thread: at most `max_batch` sequences share a forward pass; `seed`
    /// seeds the sampler (each batch draws from its own stream).
    pub fn start(model: Arc<LocalModel>, max_batch: usize, seed: u64) -> Engine {
        let (tx, rx) = mpsc::channel::<Job>();
        let generated = Arc::new(AtomicU64::new(0));
        let batches = Arc::new(AtomicU64::new(0));
        let (m, g, b) = (model.clone(), generated.clone(), batches.clone());
        std::thread::Builder::new()
            .name("phigen-local-teacher".into())
            .spawn(move || run(&m, &rx, max_batch.max(1), seed, &g, &b))
            .expect("a thread can be spawned");
        Engine {
            model,
            jobs: std::sync::Mutex::new(tx),
            generated,
            batches,
        }
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
    seed: u64,
    generated: &AtomicU64,
    batches: &AtomicU64,
) {
    if model.decoder.long_rope_from().is_some() {
        return run_static(model, rx, max_batch, seed, generated, batches);
    }
    let mut live: Vec<Row> = Vec::new();
    let mut cache: Option<KvCache> = None;
    let mut admitted = 0u64;
    loop {
        // Requests join whenever there is room: at once while rows are generating, after a
        // short gathering wait when nothing is.
        let mut joining: Vec<Job> = Vec::new();
        if live.is_empty() {
            if !gather(rx, &mut joining, max_batch) {
                return;
            }
        } else {
            let room = max_batch.saturating_sub(live.iter().filter(|r| r.ended.is_none()).count());
            while joining.len() < room {
                match rx.try_recv() {
                    Ok(job) => joining.push(job),
                    Err(_) => break,
                }
            }
        }
        let mut rows: Vec<Row> = Vec::new();
        let mut joined: Option<KvCache> = None;
        if !joining.is_empty() {
            batches.fetch_add(1, Ordering::Relaxed);
            rows = joining
                .into_iter()
                .map(|job| {
                    admitted += 1;
                    Row::new(job, model, seed.wrapping_add(admitted))
                })
                .collect();
            match prefill(model, &mut rows) {
                Ok(c) => joined = Some(c),
                Err(e) => fail(&mut rows, &e),
            }
            rows.iter_mut().for_each(|r| r.answer(model, generated));
        }
        // One copy of the cache: the rows still generating, then the newcomers still going on.
        let keep: Vec<usize> = (0..live.len())
            .filter(|&i| live[i].ended.is_none())
            .collect();
        let going_on: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].ended.is_none())
            .collect();
        if keep.len() < live.len() || !going_on.is_empty() {
            let join = joined.as_ref().map(|c| (c, going_on.as_slice()));
            let regrouped = cache
                .get_or_insert_with(|| KvCache::new(model.decoder.config()))
                .regroup(&keep, join);
            live.retain(|r| r.ended.is_none());
            live.extend(rows.into_iter().filter(|r| r.ended.is_none()));
            if let Err(e) = regrouped {
                fail(&mut live, &e);
            }
        }
        if live.iter().all(|r| r.ended.is_some()) {
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
    for row in rows.iter_mut().filter(|r| r.ended.is_none()) {
        row.ended = Some(Finish::Stopped);
        if let Some(reply) = row.reply.take() {
            let _ = reply.send(Err(EngineError::Failed(error.to_string())));
        }
    }
}

/// One sequence being generated.
struct Row {
    request: Request,
    /// Taken when the answer is sent.
    reply: Option<tokio::sync::oneshot::Sender<Result<Completion, EngineError>>>,
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Prompt and new ids (repetition penalty looks at both).
    context: Vec<u32>,
    out: Vec<u32>,
    ended: Option<Finish>,
}

impl Row {
    fn new(job: Job, model: &LocalModel, seed: u64) -> Row {
        let r = &job.request;
        let params = r.sampling(r.limit(model.context()), seed);
        Row {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            context: r.prompt.clone(),
            out: Vec::new(),
            ended: None,
            request: job.request,
            reply: Some(job.reply),
        }
    }

    /// Sends the answer of a row that has ended (once).
    fn answer(&mut self, model: &LocalModel, generated: &AtomicU64) {
        if self.ended.is_none() {
            return;
        }
        if let Some(reply) = self.reply.take() {
            let result = self.completion(model);
            if let Ok(c) = &result {
                generated.fetch_add(c.completion_tokens, Ordering::Relaxed);
            }
            let _ = reply.send(result);
        }
    }

    /// Samples the next id from this row's logits and decides whether the row goes on.
    fn take(&mut self, logits: &mut [f32], model: &LocalModel) {
        let id = sample::pick(logits, &self.context, &self.params, &mut self.rng);
        self.context.push(id);
        self.out.push(id);
        let request = &self.request;
        if !request.ignore_eos && model.eos.contains(&id) {
            self.ended = Some(Finish::EndOfSequence);
        } else if !request.stop.is_empty()
            && first_stop(
                &model.tokenizer.decode(&self.out).unwrap_or_default(),
                &request.stop,
            )
            .is_some()
        {
            self.ended = Some(Finish::Stopped);
        } else if self.out.len() >= self.params.max_new_tokens {
            self.ended = Some(Finish::Length);
        }
    }

    fn completion(&self, model: &LocalModel) -> Result<Completion, EngineError> {
        completion(model, &self.request, &self.out, self.ended)
    }
}

/// Runs the prompts of `rows` (left-padded into one batch) and samples each row's first id;
/// returns their cache.
fn prefill(model: &LocalModel, rows: &mut [Row]) -> candle_core::Result<KvCache> {
    let longest = rows
        .iter()
        .map(|r| r.request.prompt.len())
        .max()
        .unwrap_or(0);
    let pads: Vec<usize> = rows
        .iter()
        .map(|r| longest - r.request.prompt.len())
        .collect();
    let pad_id = model.decoder.config().pad_token_id.unwrap_or(0);
    let ids: Vec<u32> = rows
        .iter()
        .zip(&pads)
        .flat_map(|(r, &n)| std::iter::repeat_n(pad_id, n).chain(r.request.prompt.iter().copied()))
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
        .map(|r| *r.out.last().expect("rows have an id"))
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
/// is waiting when a batch starts is generated together; a row that finishes leaves the batch.
fn run_static(
    model: &LocalModel,
    rx: &mpsc::Receiver<Job>,
    max_batch: usize,
    seed: u64,
    generated: &AtomicU64,
    batches: &AtomicU64,
) {
    let mut waiting: Vec<Job> = Vec::new();
    loop {
        if !gather(rx, &mut waiting, max_batch) {
            return;
        }
        // One batch shares one sampler setting: the first job's; others wait for the next batch.
        let key = |j: &Job| {
            let r = &j.request;
            let min_p = r.min_p.map(f32::to_bits);
            (r.temperature.to_bits(), r.top_p.to_bits(), r.top_k, min_p)
        };
        let first = key(&waiting[0]);
        let (batch, rest): (Vec<Job>, Vec<Job>) =
            waiting.into_iter().partition(|j| key(j) == first);
        let (batch, overflow) = if batch.len() > max_batch {
            let mut b = batch;
            let o = b.split_off(max_batch);
            (b, o)
        } else {
            (batch, Vec::new())
        };
        waiting = overflow.into_iter().chain(rest).collect();
        let n = batches.fetch_add(1, Ordering::Relaxed);
        let results = generate_batch(model, &batch, seed.wrapping_add(n));
        for (job, result) in batch.into_iter().zip(results) {
            if let Ok(c) = &result {
                generated.fetch_add(c.completion_tokens, Ordering::Relaxed);
            }
            let _ = job.reply.send(result);
        }
    }
}

fn generate_batch(
    model: &LocalModel,
    jobs: &[Job],
    seed: u64,
) -> Vec<Result<Completion, EngineError>> {
    let limits: Vec<usize> = jobs
        .iter()
        .map(|j| j.request.limit(model.context()))
        .collect();
    let longest = *limits.iter().max().expect("a batch is not empty");
    let params = jobs[0].request.sampling(longest, seed);
    let prompts: Vec<Vec<u32>> = jobs.iter().map(|j| j.request.prompt.clone()).collect();
    // Why a row stopped early, decided here per row (end-of-sequence is per row too).
    let mut ended = vec![None; jobs.len()];
    let outcome = sample::generate(&model.decoder, &prompts, &params, &[], |row, ids| {
        let request = &jobs[row].request;
        let last = *ids.last().expect("called after each new id");
        if !request.ignore_eos && model.eos.contains(&last) {
            ended[row] = Some(Finish::EndOfSequence);
            return false;
        }
        if !request.stop.is_empty() {
            let text = model.tokenizer.decode(ids).unwrap_or_default();
            if first_stop(&text, &request.stop).is_some() {
                ended[row] = Some(Finish::Stopped);
                return false;
            }
        }
        ids.len() < limits[row]
    });
    let generation = match outcome {
        Ok(g) => g,
        Err(e) => {
            let reason = e.to_string();
            return jobs
                .iter()
                .map(|_| Err(EngineError::Failed(reason.clone())))
                .collect();
        }
    };
    jobs.iter()
        .enumerate()
        .map(|(row, job)| completion(model, &job.request, &generation.ids[row], ended[row]))
        .collect()
}

/// The answer to `request` whose new ids are `out`, ended for `ended` (`None`: its length).
fn completion(
    model: &LocalModel,
    request: &Request,
    out: &[u32],
    ended: Option<Finish>,
) -> Result<Completion, EngineError> {
    let (ids, finish) = match ended {
        Some(Finish::EndOfSequence) => (&out[..out.len().saturating_sub(1)], FinishReason::Stop),
        Some(Finish::Stopped) => (out, FinishReason::Stop),
        Some(Finish::Length) | None => (out, FinishReason::Length),
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

/// A [`Teacher`] backed by an in-process [`Engine`]: the same records, stats and resume as the
/// HTTP teacher; usage in tokens, cost 0.
pub struct LocalTeacher {
    engine: Arc<Engine>,
    sampling: Sampling,
    counters: RequestCounters,
}

impl LocalTeacher {
    pub fn new(engine: Arc<Engine>, sampling: Sampling) -> Self {
        LocalTeacher {
            engine,
            sampling,
            counters: RequestCounters::default(),
        }
    }
}

impl Teacher for LocalTeacher {
    fn model(&self) -> &str {
        &self.engine.model().name
    }

    fn sampling(&self) -> Sampling {
        self.sampling
    }

    async fn chat(&self, prompt: &str) -> Result<Answer, TeacherError> {
        RequestCounters::bump(&self.counters.sent);
        let model = self.engine.model();
        let fail = |reason: String| TeacherError::Local {
            model: model.name.clone(),
            reason,
        };
        let ids = model
            .prompt_ids(&[Message::user(prompt)])
            .map_err(|e| fail(e.to_string()))?;
        let request = Request {
            prompt: ids,
            max_tokens: self.sampling.max_tokens as usize,
            temperature: self.sampling.temperature,
            top_p: self.sampling.top_p,
            top_k: self.sampling.top_k,
            min_p: self.sampling.min_p,
            stop: Vec::new(),
            ignore_eos: false,
        };
        match self.engine.complete(request).await {
            Ok(c) => Ok(Answer {
                text: c.text,
                finish_reason: c.finish,
                usage: Usage {
                    prompt_tokens: c.prompt_tokens,
                    completion_tokens: c.completion_tokens,
                },
                attempts: 1,
            }),
            Err(e @ EngineError::PromptTooLong { .. }) => Err(TeacherError::Rejected {
                url: model.name.clone(),
                status: 400,
                body: e.to_string(),
            }),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    fn note(&self) -> Option<&str> {
        // Below a billion parameters every instruct model writes noticeably weaker text than the
        // teachers of the papers (GPT-3.5/4).
        (self.engine.model().decoder.config().parameter_count() < 1_000_000_000)
            .then_some(SMALL_TEACHER_NOTE)
    }

    fn counters(&self) -> &RequestCounters {
        &self.counters
    }
}

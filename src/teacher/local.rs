//! The in-process teacher: a small instruct model run by phigen's own decoder, so a corpus can be
//! generated with no API key and no server (`--teacher local:SPEC`).
//!
//! SPEC is a checkpoint directory (Hugging Face layout with `tokenizer.json`, and the chat template
//! from `tokenizer_config.json`), a `.gguf` file, or a Hub id fetched into the Hugging Face cache.
//! This file loads the model ([`LocalModel`]) and answers as a [`Teacher`] ([`LocalTeacher`]);
//! requests from all workers go to one [`Engine`] thread (`super::engine`) that batches them
//! continuously. The same engine serves `phigen serve` (`super::serve`).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};

use super::engine::{Engine, EngineError, Request};
use super::retry::RequestCounters;
use super::{Answer, Sampling, Teacher, TeacherError, Usage};
use crate::model::chat::{ChatTemplate, Message};
use crate::model::sample::LoopStop;
use crate::model::tokenizer::Tokenizer;
use crate::model::{checkpoint, gguf, hub, Decoder, ModelError};

/// The teacher used when none is configured: small enough for a laptop, and an instruct model.
/// It writes simple, imperfect text: for trying the pipeline, not for training a phi-1.
/// Qwen2.5-Coder-0.5B-Instruct, not SmolLM2-135M-Instruct (the default until 2026-12-06): on the
/// same prompts it keeps 62–75% of its textbook answers against 41%, and 66% of its stories
/// against 48% (README, issue 25). Its projections run as 8-bit copies
/// ([`checkpoint::load_quantized`]).
pub const DEFAULT_MODEL: &str = "Qwen/Qwen2.5-Coder-0.5B-Instruct";

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
    /// The chat template's end of turn when it is not one token (a chat stage trained on a
    /// tiktoken encoding writes `<|end|>` as five): a chat answer stops at this text.
    pub chat_stop: Vec<String>,
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
    /// Loads SPEC (see the module documentation) with weights in `dtype` on the CPU. With
    /// `quantized` a GGUF file's projections stay in their quantized types and a checkpoint's get
    /// 8-bit copies ([`checkpoint::load_quantized`], float32 whatever `dtype`).
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
        let (decoder, tokenizer, chat, extra_eos, chat_stop) = match &gguf_file {
            Some(file) => {
                let g = gguf::load(file, dtype, &device, quantized)?;
                (g.decoder, g.tokenizer, g.chat, Vec::new(), Vec::new())
            }
            None => {
                let dir = hub::model_dir(spec, true)?;
                let decoder = match quantized {
                    true => checkpoint::load_quantized(&dir, &device)?,
                    false => checkpoint::load(&dir, dtype, &device)?,
                };
                let mut eos = eos_in(&dir.join("generation_config.json"));
                let tokenizer = Tokenizer::for_checkpoint(&dir)?;
                let chat = ChatTemplate::for_checkpoint(&dir)?;
                let mut stop = Vec::new();
                if let Some(t) = chat.as_ref().filter(|t| !t.eos_token().is_empty()) {
                    match tokenizer.encode_rendered(t.eos_token()).as_deref() {
                        Ok([one]) => eos.push(*one),
                        _ => stop.push(t.eos_token().to_string()),
                    }
                }
                (decoder, tokenizer, chat, eos, stop)
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
            chat_stop,
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

    async fn chat(&self, prompt: &str, seed: u64) -> Result<Answer, TeacherError> {
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
            loop_stop: Some(LoopStop::TEACHER),
            stop: model.chat_stop.clone(),
            ..Request::new(ids, &self.sampling, seed)
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
            Err(EngineError::PromptTooLong { prompt, context }) => {
                Err(TeacherError::PromptTooLong {
                    model: model.name.clone(),
                    prompt,
                    context,
                })
            }
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

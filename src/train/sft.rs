//! Conversations for the `sft` and `dpo` objectives: rendered with the model's chat template,
//! tokenized with the token-level loss mask, padded into rows, cached in the run directory.
//!
//! Reads jsonl or Parquet files (or directories of them): `messages` ([{role, content}, …],
//! OpenAI style) for SFT; `prompt` (a string, the user's message, or a messages list) with
//! `chosen` and `rejected` (the assistant's answers: strings, or lists of assistant messages) for
//! DPO, each pair becoming two conversations that share the prompt.
//!
//! **The loss mask comes from the rendered text, not from guessing.** For assistant message i the
//! template is rendered twice more: the messages before it with the generation prompt (text `G`),
//! and the messages up to it (text `P`). The full conversation's text must begin with `G` (else
//! the template rewrites history and no span can be named: an error). The assistant's span is from
//! the end of `G` to where `P` and the full text part, trailing whitespace dropped — exactly what
//! the model must write after the generation prompt: the content and the turn's end token
//! (`<|end|>`, `<|im_end|>`), not the newline after it. The tokenizer gives each token its byte
//! span of the text (Hugging Face `tokenizers` offsets; for tiktoken, the lengths of the tokens'
//! bytes in order), and **a token carries loss iff one of its bytes lies inside an assistant
//! span**: a token straddling the start holds the answer's first bytes, one straddling the end its
//! last, so both are part of what the model must produce; tokens with no bytes (a bos the
//! tokenizer adds) carry none. For DPO only the final assistant message (the response) counts.
//!
//! **Padding, not packing.** Each example is one row of `seq_len + 1` tokens: cut if longer (an
//! example left with no trained token is dropped, with a warning), else padded with token 0 whose
//! targets weigh 0. Attention stays causal, so a row's tokens never see the padding after them and
//! positions start at 0 in every example: the loss equals that of the example alone. This wastes
//! the compute of the padding, which packing with a block-diagonal mask would save.
//!
//! **Order.** Global row g of a stage (step · batch + index in the step) is item g mod n of epoch
//! g div n's permutation of the training items, drawn from (seed, stage, epoch): every example once
//! per epoch, a function of the step alone, so resume and any micro-batch split read the same rows.
//! Every 20th example (index mod 20 = 19) is held out for validation (none under 20 examples).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::artifact::atomic;
use crate::artifact::records::{self, RecordsError};
use crate::model::chat::{ChatTemplate, Message};
use crate::model::tokenizer::Tokenizer;
use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum SftError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Record { path: PathBuf, what: String },
    /// Not wrapped as a source: the message says it whole (the CLI prints sources after it).
    #[error("stage data {0} (a stage's `data` names conversation files or directories of them)")]
    Data(RecordsError),
    #[error("stage `{stage}`: {reason}")]
    Template { stage: String, reason: String },
    #[error("stage `{stage}`: no example has a trained token within seq_len {seq_len} ({dropped} dropped); raise seq_len or check the data's assistant turns")]
    Empty {
        stage: String,
        seq_len: usize,
        dropped: usize,
    },
    #[error("stage `{stage}`: token id {id} is beyond the model's vocab_size {vocab}; the tokenizer and the model disagree: raise model.vocab_size")]
    Vocab {
        stage: String,
        id: u32,
        vocab: usize,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The chat templates a stage may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// phi-3's `<|user|>\n…<|end|>\n<|assistant|>\n…<|end|>\n` (system as `<|system|>`). With a
    /// tiktoken encoding these markers are plain text (GPT-2's encoding has no such special
    /// tokens), so each is a few ordinary tokens, which the model learns as any other text.
    Phi3,
    /// ChatML: `<|im_start|>ROLE\n…<|im_end|>\n` (markers plain text under tiktoken as well).
    Chatml,
}

impl Builtin {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "phi-3" | "phi3" => Some(Builtin::Phi3),
            "chatml" => Some(Builtin::Chatml),
            _ => None,
        }
    }

    pub fn template(self) -> ChatTemplate {
        let source = match self {
            Builtin::Phi3 => "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
            Builtin::Chatml => "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        };
        let eos = match self {
            Builtin::Phi3 => "<|end|>",
            Builtin::Chatml => "<|im_end|>",
        };
        ChatTemplate::new(source.into(), String::new(), eos.into())
            .expect("the built-in templates render")
    }
}

/// Which assistant messages carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turns {
    /// Every one (SFT).
    All,
    /// The last one: the response a DPO pair compares.
    Last,
}

/// The rendered conversation and the byte spans of its trained assistant turns.
pub fn assistant_spans(
    template: &ChatTemplate,
    messages: &[Message],
    turns: Turns,
) -> Result<(String, Vec<Range<usize>>), ModelError> {
    let full = template.render(messages, false)?;
    let last = messages.iter().rposition(|m| m.role == "assistant");
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" || (turns == Turns::Last && Some(i) != last) {
            continue;
        }
        let before = template.render(&messages[..i], true)?;
        if !full.starts_with(&before) {
            return Err(ModelError::Tokenizer(format!(
                "chat template: message {i}'s generation prompt is not a prefix of the whole conversation (the template rewrites earlier turns), so its span cannot be found; use a template that renders history unchanged"
            )));
        }
        let upto = template.render(&messages[..=i], false)?;
        let common = full
            .bytes()
            .zip(upto.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let mut end = common.max(before.len());
        while !full.is_char_boundary(end) {
            end -= 1;
        }
        let end = before.len() + full[before.len()..end].trim_end().len();
        spans.push(before.len()..end);
    }
    Ok((full, spans))
}

/// The ids of rendered text and each token's byte span in it.
pub fn token_spans(
    tokenizer: &Tokenizer,
    text: &str,
) -> Result<(Vec<u32>, Vec<Range<usize>>), ModelError> {
    match tokenizer {
        Tokenizer::Tiktoken(e) => {
            let bpe = e.bpe();
            let ids = bpe.encode_with_special_tokens(text);
            let mut at = 0;
            let spans = ids
                .iter()
                .map(|&id| {
                    let n = bpe
                        .decode_bytes(&[id])
                        .map_err(|e| ModelError::Tokenizer(e.to_string()))?
                        .len();
                    at += n;
                    Ok(at - n..at)
                })
                .collect::<Result<_, ModelError>>()?;
            Ok((ids, spans))
        }
        Tokenizer::HuggingFace(t) => {
            // Rendered text holds its special tokens: nothing is added (as encode_rendered).
            let enc = t
                .encode(text, false)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            let spans = enc.get_offsets().iter().map(|&(a, b)| a..b).collect();
            Ok((enc.get_ids().to_vec(), spans))
        }
    }
}

/// A tokenized conversation: `trained[j]` says whether token j is a target that carries loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

pub fn example(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    turns: Turns,
) -> Result<Example, ModelError> {
    let (text, assistant) = assistant_spans(template, messages, turns)?;
    let (ids, spans) = token_spans(tokenizer, &text)?;
    let trained = spans
        .iter()
        .map(|t| t.start < t.end && assistant.iter().any(|a| t.start < a.end && t.end > a.start))
        .collect();
    Ok(Example { ids, trained })
}

/// One jsonl line or Parquet row of SFT data.
#[derive(Deserialize)]
struct ConversationRecord {
    messages: Vec<Message>,
}

/// One DPO record: the prompt a string or messages; the answers strings or assistant messages.
#[derive(Deserialize)]
struct PairRecord {
    prompt: TextOrMessages,
    chosen: TextOrMessages,
    rejected: TextOrMessages,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TextOrMessages {
    Text(String),
    Messages(Vec<Message>),
}

impl TextOrMessages {
    fn messages(self, role: &str) -> Vec<Message> {
        match self {
            TextOrMessages::Text(content) => vec![Message {
                role: role.into(),
                content,
            }],
            TextOrMessages::Messages(m) => m,
        }
    }
}

/// The conversations of `records`, as the objective reads them: one per SFT record, two (chosen,
/// rejected) per DPO pair.
fn conversations(
    path: &Path,
    records: Vec<serde_json::Value>,
    pairs: bool,
) -> Result<Vec<Vec<Message>>, SftError> {
    let mut out = Vec::new();
    for (i, r) in records.into_iter().enumerate() {
        let bad = |e: serde_json::Error, expected: &str| SftError::Record {
            path: path.to_path_buf(),
            what: format!("record {i}: expected {expected}: {e}"),
        };
        if pairs {
            let p: PairRecord = serde_json::from_value(r).map_err(|e| {
                bad(e, "{prompt: string or messages, chosen: string or messages, rejected: string or messages}")
            })?;
            let prompt = p.prompt.messages("user");
            for answer in [p.chosen, p.rejected] {
                let mut c = prompt.clone();
                c.extend(answer.messages("assistant"));
                out.push(c);
            }
        } else {
            let c: ConversationRecord = serde_json::from_value(r)
                .map_err(|e| bad(e, "{messages: [{role, content}, …]}"))?;
            out.push(c.messages);
        }
    }
    Ok(out)
}

/// The records of a jsonl (or `.jsonl.gz`) or Parquet file, as JSON values; a line that is not
/// JSON fails the file.
pub fn read_records(path: &Path) -> Result<Vec<serde_json::Value>, SftError> {
    records::read(path)
        .map_err(SftError::Data)?
        .into_iter()
        .map(|r| {
            let line = r.number();
            r.value.map_err(|why| SftError::Record {
                path: path.to_path_buf(),
                what: format!("line {line}: {why}"),
            })
        })
        .collect()
}

/// Every example of a stage, one row each, concatenated: `ids[starts[i]..starts[i + 1]]` with the
/// loss mask `mask` alongside (1 = a trained target).
#[derive(Debug, Clone, PartialEq)]
pub struct Examples {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
    pub starts: Vec<usize>,
}

impl Examples {
    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> (&[u32], &[u8]) {
        let r = self.starts[i]..self.starts[i + 1];
        (&self.ids[r.clone()], &self.mask[r])
    }

    fn save(&self, path: &Path) -> Result<(), SftError> {
        let dev = Device::Cpu;
        let starts: Vec<i64> = self.starts.iter().map(|&s| s as i64).collect();
        let tensors = [
            ("ids", Tensor::from_slice(&self.ids, self.ids.len(), &dev)?),
            (
                "mask",
                Tensor::from_slice(&self.mask, self.mask.len(), &dev)?,
            ),
            ("starts", Tensor::from_slice(&starts, starts.len(), &dev)?),
        ];
        let tmp = atomic::temp_path(path);
        candle_core::safetensors::save(&HashMap::from(tensors), &tmp)?;
        std::fs::rename(&tmp, path).map_err(|source| SftError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    fn load(path: &Path) -> Option<Self> {
        let t = candle_core::safetensors::load(path, &Device::Cpu).ok()?;
        let starts: Vec<i64> = t.get("starts")?.to_vec1().ok()?;
        Some(Examples {
            ids: t.get("ids")?.to_vec1().ok()?,
            mask: t.get("mask")?.to_vec1().ok()?,
            starts: starts.into_iter().map(|s| s as usize).collect(),
        })
    }
}

/// What a stage's examples are made from: the cache file's key.
pub struct Source<'a> {
    pub stage: &'a str,
    pub files: &'a [PathBuf],
    pub pairs: bool,
    pub template: &'a ChatTemplate,
    /// Names the tokenizer (an encoding, or a hash of its file).
    pub tokenizer_id: &'a str,
    pub tokenizer: &'a Tokenizer,
    pub seq_len: usize,
    pub vocab: usize,
}

impl Source<'_> {
    /// A hash of everything the examples depend on: the files' bytes, the template, the
    /// tokenizer, the row length and the objective.
    fn key(&self) -> Result<String, SftError> {
        let mut h = blake3::Hasher::new();
        let probe = [
            Message {
                role: "system".into(),
                content: "s".into(),
            },
            Message::user("u"),
            Message {
                role: "assistant".into(),
                content: "a".into(),
            },
        ];
        let rendered = self.template.render(&probe, false)?;
        for part in [
            format!("pairs {} seq_len {}", self.pairs, self.seq_len),
            rendered,
            self.tokenizer_id.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        for f in self.files {
            let bytes = std::fs::read(f).map_err(|source| SftError::Io {
                path: f.clone(),
                source,
            })?;
            h.update(blake3::hash(&bytes).as_bytes());
        }
        Ok(h.finalize().to_hex()[..16].to_string())
    }

    /// The examples, from `cache_dir`'s file for this key when it is there, else tokenized now
    /// (and written there when `write`). DPO keeps or drops a pair's two rows together.
    pub fn examples(&self, cache_dir: &Path, write: bool) -> Result<Examples, SftError> {
        let path = cache_dir.join(format!("examples-{}.safetensors", self.key()?));
        if let Some(e) = Examples::load(&path) {
            return Ok(e);
        }
        let mut conversations = Vec::new();
        for f in self.files {
            conversations.extend(self::conversations(f, read_records(f)?, self.pairs)?);
        }
        let turns = if self.pairs { Turns::Last } else { Turns::All };
        let n = self.seq_len + 1;
        let tokenized = conversations
            .iter()
            .map(|c| {
                let mut e = example(self.tokenizer, self.template, c, turns)?;
                e.ids.truncate(n);
                e.trained.truncate(n);
                Ok(e)
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let per_item = if self.pairs { 2 } else { 1 };
        let mut out = Examples {
            ids: Vec::new(),
            mask: Vec::new(),
            starts: vec![0],
        };
        let mut dropped = 0;
        for item in tokenized.chunks(per_item) {
            // The first token is no target: only tokens 1.. carry loss.
            if !item.iter().all(|e| e.trained.iter().skip(1).any(|&t| t)) {
                dropped += 1;
                continue;
            }
            for e in item {
                if let Some(&id) = e.ids.iter().find(|&&id| id as usize >= self.vocab) {
                    return Err(SftError::Vocab {
                        stage: self.stage.into(),
                        id,
                        vocab: self.vocab,
                    });
                }
                out.ids.extend(&e.ids);
                out.mask.extend(e.trained.iter().map(|&t| u8::from(t)));
                out.starts.push(out.ids.len());
            }
        }
        if dropped > 0 {
            tracing::warn!(
                "stage `{}`: {dropped} of {} examples have no trained token within seq_len {} and are left out",
                self.stage,
                tokenized.len() / per_item,
                self.seq_len
            );
        }
        if out.is_empty() {
            return Err(SftError::Empty {
                stage: self.stage.into(),
                seq_len: self.seq_len,
                dropped,
            });
        }
        if write {
            std::fs::create_dir_all(cache_dir).map_err(|source| SftError::Io {
                path: cache_dir.to_path_buf(),
                source,
            })?;
            out.save(&path)?;
        }
        Ok(out)
    }
}

/// A stage's examples split into training and validation items (an item is one row for SFT,
/// a chosen row and its rejected row for DPO).
pub struct ChatData {
    pub examples: Examples,
    pub per_item: usize,
    train: Vec<usize>,
    val: Vec<usize>,
    seq_len: usize,
}

/// One padded batch: ids (rows, seq_len + 1) and the loss mask of its rows' targets (rows ·
/// seq_len), and the examples' indices.
pub struct Rows {
    pub ids: Tensor,
    pub mask: Vec<f32>,
    pub examples: Vec<usize>,
}

impl ChatData {
    pub fn new(examples: Examples, per_item: usize, seq_len: usize) -> Self {
        let items = examples.len() / per_item;
        let held_out = |i: &usize| items >= 20 && i % 20 == 19;
        let (val, train) = (0..items).partition(held_out);
        ChatData {
            examples,
            per_item,
            train,
            val,
            seq_len,
        }
    }

    pub fn train_items(&self) -> usize {
        self.train.len()
    }

    /// The items at global rows `rows` of stage `stage` (see the module doc).
    pub fn train_items_at(&self, seed: u64, stage: usize, rows: Range<usize>) -> Vec<usize> {
        let n = self.train.len();
        let mut epoch = None;
        let mut order = Vec::new();
        rows.map(|g| {
            if epoch != Some(g / n) {
                epoch = Some(g / n);
                order = self.train.clone();
                let key = blake3::hash(format!("sft/{seed}/{stage}/epoch {}", g / n).as_bytes());
                order.shuffle(&mut ChaCha8Rng::from_seed(*key.as_bytes()));
            }
            order[g % n]
        })
        .collect()
    }

    /// The targets that carry loss in the rows of `items`.
    pub fn trained_tokens(&self, items: &[usize]) -> usize {
        items
            .iter()
            .flat_map(|&i| i * self.per_item..(i + 1) * self.per_item)
            .map(|e| {
                self.examples
                    .get(e)
                    .1
                    .iter()
                    .skip(1)
                    .filter(|&&m| m > 0)
                    .count()
            })
            .sum()
    }

    /// Up to `items` validation items, the same every time.
    pub fn val_items(&self, items: usize) -> &[usize] {
        &self.val[..items.min(self.val.len())]
    }

    /// The rows of `items`, padded.
    pub fn rows(&self, items: &[usize], device: &Device) -> candle_core::Result<Rows> {
        let n = self.seq_len + 1;
        let examples: Vec<usize> = items
            .iter()
            .flat_map(|&i| i * self.per_item..(i + 1) * self.per_item)
            .collect();
        let mut ids = vec![0u32; examples.len() * n];
        let mut mask = vec![0f32; examples.len() * self.seq_len];
        for (r, &e) in examples.iter().enumerate() {
            let (e_ids, e_mask) = self.examples.get(e);
            ids[r * n..r * n + e_ids.len()].copy_from_slice(e_ids);
            for (j, &m) in e_mask.iter().enumerate().skip(1) {
                mask[r * self.seq_len + j - 1] = f32::from(m);
            }
        }
        Ok(Rows {
            ids: Tensor::from_vec(ids, (examples.len(), n), device)?,
            mask,
            examples,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::Encoding;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    fn conversation() -> Vec<Message> {
        vec![
            msg("system", "Be brief."),
            msg("user", "Hi there"),
            msg("assistant", "Hello friend"),
            msg("user", "Bye"),
            msg("assistant", "See you"),
        ]
    }

    /// The text of the trained tokens, each run of consecutive ones joined, runs separated by |.
    fn trained_text(tokenizer: &Tokenizer, e: &Example) -> String {
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut prev = false;
        for (&id, &t) in e.ids.iter().zip(&e.trained) {
            if t {
                if !prev {
                    runs.push(Vec::new());
                }
                runs.last_mut().unwrap().push(id);
            }
            prev = t;
        }
        runs.iter()
            .map(|r| tokenizer.decode(r).unwrap())
            .collect::<Vec<_>>()
            .join("|")
    }

    /// A word-level Hugging Face tokenizer built here: the words and newline of the test
    /// conversation, plus phi-3's and ChatML's markers as added special tokens.
    fn word_tokenizer() -> Tokenizer {
        let specials = [
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|end|>",
            "<|im_start|>",
            "<|im_end|>",
        ];
        let words = [
            "[UNK]",
            "\n",
            "Be",
            "brief.",
            "Hi",
            "there",
            "Hello",
            "friend",
            "Bye",
            "See",
            "you",
            "system",
            "user",
            "assistant",
        ];
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
            .collect();
        let added: Vec<serde_json::Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({"id": words.len() + i, "content": s, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        // Split on spaces (dropped) and newlines (kept as tokens) before the word lookup.
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": false},
                {"type": "Split", "pattern": {"String": "\n"}, "behavior": "Isolated", "invert": false}
            ]},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        let t = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
        Tokenizer::HuggingFace(Box::new(t))
    }

    /// phi-3 template, word-level HF tokenizer: the expectation is written by hand from the
    /// template's text `<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n
    /// Hello friend<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\nSee you<|end|>\n`: exactly
    /// `Hello friend<|end|>` and `See you<|end|>` are trained, the newlines after them not.
    #[test]
    fn phi3_mask_covers_the_assistant_turns_and_their_end_token() {
        let tok = word_tokenizer();
        let e = example(&tok, &Builtin::Phi3.template(), &conversation(), Turns::All).unwrap();
        let words = [
            "<|system|>",
            "\n",
            "Be",
            "brief.",
            "<|end|>",
            "\n",
            "<|user|>",
            "\n",
            "Hi",
            "there",
            "<|end|>",
            "\n",
            "<|assistant|>",
            "\n",
            "Hello",
            "friend",
            "<|end|>",
            "\n",
            "<|user|>",
            "\n",
            "Bye",
            "<|end|>",
            "\n",
            "<|assistant|>",
            "\n",
            "See",
            "you",
            "<|end|>",
            "\n",
        ];
        let Tokenizer::HuggingFace(hf) = &tok else {
            unreachable!()
        };
        let ids: Vec<u32> = words.iter().map(|w| hf.token_to_id(w).unwrap()).collect();
        assert_eq!(e.ids, ids);
        let trained: Vec<bool> = (0..words.len())
            .map(|i| matches!(i, 14..=16 | 25..=27))
            .collect();
        assert_eq!(e.trained, trained);
        // DPO trains the final response only.
        let last = example(
            &tok,
            &Builtin::Phi3.template(),
            &conversation(),
            Turns::Last,
        )
        .unwrap();
        let trained: Vec<bool> = (0..words.len()).map(|i| (25..=27).contains(&i)).collect();
        assert_eq!(last.trained, trained);
    }

    /// ChatML given as a string (as a checkpoint's tokenizer_config.json would), with a default
    /// system prompt injected on the first turn as SmolLM2's template does: the expectation by hand
    /// is `Hello friend<|im_end|>` and `See you<|im_end|>`; the role names after `<|im_start|>`
    /// are prompt.
    #[test]
    fn chatml_string_template_mask() {
        let source = "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(source.into(), String::new(), "<|im_end|>".into()).unwrap();
        let tok = word_tokenizer();
        let e = example(&tok, &t, &conversation()[1..], Turns::All).unwrap();
        assert_eq!(
            trained_text(&tok, &e),
            // decode() skips special tokens: the trained runs hold them, shown by their count.
            "Hello friend|See you"
        );
        let Tokenizer::HuggingFace(hf) = &tok else {
            unreachable!()
        };
        let im_end = hf.token_to_id("<|im_end|>").unwrap();
        let trained_ends = e
            .ids
            .iter()
            .zip(&e.trained)
            .filter(|(&id, &t)| t && id == im_end)
            .count();
        let all_ends = e.ids.iter().filter(|&&id| id == im_end).count();
        assert_eq!((trained_ends, all_ends), (2, 5));
    }

    /// tiktoken GPT-2 (the markers are plain text there): the trained bytes are exactly the
    /// assistant spans (`Hello friend<|end|>`, `See you<|end|>`), as every token here lies wholly
    /// inside or outside a span.
    #[test]
    fn tiktoken_mask_uses_byte_offsets() {
        let tok = Tokenizer::Tiktoken(Encoding::Gpt2);
        let t = Builtin::Phi3.template();
        let e = example(&tok, &t, &conversation(), Turns::All).unwrap();
        assert_eq!(trained_text(&tok, &e), "Hello friend<|end|>|See you<|end|>");
        let (text, spans) = assistant_spans(&t, &conversation(), Turns::All).unwrap();
        let pieces: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(pieces, ["Hello friend<|end|>", "See you<|end|>"]);
    }

    /// A token straddling a span's edge carries loss (the rule in the module doc): the
    /// generation prompt `A: ` ends in a space that GPT-2 merges with the answer's first word
    /// (` Sure`), so that token is trained; the newline after the answer is not.
    #[test]
    fn a_token_straddling_the_start_carries_loss() {
        let source = "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}";
        let t = ChatTemplate::new(source.into(), String::new(), String::new()).unwrap();
        let tok = Tokenizer::Tiktoken(Encoding::Gpt2);
        let conversation = [msg("user", "ok?"), msg("assistant", "Sure")];
        let (text, spans) = assistant_spans(&t, &conversation, Turns::All).unwrap();
        assert_eq!(
            (text.as_str(), spans),
            (
                "Q: ok?\nA: Sure\n",
                vec![std::ops::Range { start: 10, end: 14 }]
            )
        );
        let e = example(&tok, &t, &conversation, Turns::All).unwrap();
        assert_eq!(trained_text(&tok, &e), " Sure");
    }

    /// Rows are padded with 0 and the padding's targets weigh 0; the mask is shifted to targets.
    #[test]
    fn rows_pad_and_shift_the_mask() {
        let examples = Examples {
            ids: vec![5, 6, 7, 8, 9],
            mask: vec![0, 0, 1, 0, 1],
            starts: vec![0, 3, 5],
        };
        let data = ChatData::new(examples, 1, 4);
        let rows = data.rows(&[0, 1], &Device::Cpu).unwrap();
        assert_eq!(
            rows.ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7, 0, 0], vec![8, 9, 0, 0, 0]]
        );
        assert_eq!(rows.mask, vec![0., 1., 0., 0., 1., 0., 0., 0.]);
        // Two epochs of 2 items: each item once per epoch, the same rows on every call.
        let order = data.train_items_at(1, 0, 0..4);
        for epoch in order.chunks(2) {
            let mut e = epoch.to_vec();
            e.sort();
            assert_eq!(e, [0, 1]);
        }
        assert_eq!(order[2..], data.train_items_at(1, 0, 2..4)[..]);
    }

    /// Parquet as Hugging Face datasets write chat and preference data (fixtures made with
    /// pyarrow by tests/fixtures/dpo/make_parquet.py): `messages` a list of structs; `prompt` a
    /// list of structs with string answers; other columns ignored.
    #[test]
    fn reads_parquet_messages_and_pairs() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dpo"));
        let chat = dir.join("chat.parquet");
        let c = conversations(&chat, read_records(&chat).unwrap(), false).unwrap();
        assert_eq!(
            c,
            vec![
                vec![msg("user", "Hi"), msg("assistant", "Hello")],
                vec![
                    msg("system", "Be brief."),
                    msg("user", "2+2?"),
                    msg("assistant", "4")
                ],
            ]
        );
        let pairs = dir.join("pairs.parquet");
        let p = conversations(&pairs, read_records(&pairs).unwrap(), true).unwrap();
        assert_eq!(
            p,
            vec![
                vec![msg("user", "Name a color."), msg("assistant", "Blue.")],
                vec![msg("user", "Name a color."), msg("assistant", "No.")],
            ]
        );
        // A jsonl line that is not a conversation names the file and the record.
        let bad = tempfile::tempdir().unwrap();
        let f = bad.path().join("x.jsonl");
        std::fs::write(&f, "{\"text\": \"hi\"}\n").unwrap();
        let err = conversations(&f, read_records(&f).unwrap(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.jsonl") && err.contains("record 0") && err.contains("messages"),
            "{err}"
        );
        // A gzipped jsonl reads as the plain one (the formats artifact::docs names), and a
        // directory lists it beside the others.
        let gz = bad.path().join("y.jsonl.gz");
        let line = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n";
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, line.as_bytes()).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        let c = conversations(&gz, read_records(&gz).unwrap(), false).unwrap();
        assert_eq!(c, vec![vec![msg("user", "Hi"), msg("assistant", "Hello")]]);
        assert_eq!(
            records::table_files(&[bad.path().to_path_buf()]).unwrap(),
            vec![f.clone(), gz.clone()]
        );
        // A line that is not JSON fails the file, named by its line (blank lines count).
        let broken = bad.path().join("z.jsonl");
        std::fs::write(&broken, format!("{line}\n{{oops\n")).unwrap();
        let err = read_records(&broken).unwrap_err().to_string();
        assert!(
            err.contains("z.jsonl") && err.contains("line 3: not JSON"),
            "{err}"
        );
    }
}

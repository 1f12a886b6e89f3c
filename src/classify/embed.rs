//! Feature vectors of code files, which the forest learns from.
//!
//! Three embedders: [`Hashed`], model-free and fast (hashed token uni- and bigram frequencies plus
//! code statistics, or prose statistics for web text: [`WEB_STATS`]), the offline default; [`LmEmbedder`], the mean of the last hidden states of
//! any causal LM phigen loads (phi-1 used a pretrained code model's embeddings this way); and
//! [`BertEmbedder`], a BERT-family sentence encoder's mean-pooled, normalised embeddings (as
//! sentence-transformers computes them).
//! A model embedder's vectors are cached on disk by content hash ([`Cache`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64_with_seed};

use super::bert::Bert;
use super::preset::Preset;
use super::{io_err, ClassifyError};
use crate::model::tokenizer::Tokenizer;
use crate::model::{checkpoint, Decoder};

/// What a saved classifier needs to rebuild its embedder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EmbedderSpec {
    Hashed {
        buckets: usize,
    },
    Lm {
        checkpoint: PathBuf,
        /// Tokens embedded per file (the head of the file).
        max_tokens: usize,
        batch: usize,
    },
    /// A BERT-family sentence encoder: a directory, or a model id found in the Hugging Face cache.
    Bert {
        model: String,
        max_tokens: usize,
        batch: usize,
    },
}

pub trait Embedder: Send + Sync {
    /// Names the features: equal ids give equal vectors for equal text.
    fn id(&self) -> String;
    fn dim(&self) -> usize;
    /// One vector per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ClassifyError>;
    /// Whether vectors are worth caching on disk (slower to compute than to read).
    fn cacheable(&self) -> bool;
}

impl EmbedderSpec {
    /// The embedder with the code preset's hashed features; a model embedder does not depend
    /// on the preset.
    pub fn load(&self) -> Result<Box<dyn Embedder>, ClassifyError> {
        self.load_for(Preset::Code)
    }

    /// The embedder, for texts of `preset` (the hashed features follow it; a model embeds any
    /// text the same way).
    pub fn load_for(&self, preset: Preset) -> Result<Box<dyn Embedder>, ClassifyError> {
        Ok(match self {
            EmbedderSpec::Hashed { buckets } => Box::new(Hashed {
                buckets: *buckets,
                preset,
            }),
            EmbedderSpec::Lm {
                checkpoint,
                max_tokens,
                batch,
            } => Box::new(LmEmbedder::load(checkpoint, *max_tokens, *batch)?),
            EmbedderSpec::Bert {
                model,
                max_tokens,
                batch,
            } => {
                let dir = crate::model::hub::model_dir(model, true)?;
                Box::new(BertEmbedder {
                    bert: Bert::load(&dir)?,
                    id: format!("bert-mean-v1:{}:{max_tokens}", weights_id(&dir)?),
                    max_tokens: *max_tokens,
                    batch: (*batch).max(1),
                })
            }
        })
    }
}

/// Hashed token n-gram frequencies and code statistics (or prose statistics for web text).
///
/// Tokens are identifiers/words, numbers (all one token) and single punctuation characters;
/// unigrams and bigrams are hashed into `buckets` and divided by the token count. The code
/// statistics ([`STATS`]) are what separates a documented function from minified, generated or
/// data files; the web ones ([`WEB_STATS`]) what separates explaining prose from lists, logs,
/// boilerplate and navigation text. Web words are hashed lower-cased: in prose, "The" and "the"
/// are one word.
pub struct Hashed {
    pub buckets: usize,
    pub preset: Preset,
}

/// Names of the statistics that follow the hashed buckets, in order.
pub const STATS: [&str; 22] = [
    "log2_bytes",
    "log2_lines",
    "mean_line_length",
    "log2_max_line_length",
    "long_line_share",
    "blank_line_share",
    "comment_line_share",
    "docstrings_per_line",
    "defs_per_line",
    "classes_per_line",
    "imports_per_line",
    "asserts_per_line",
    "indented_line_share",
    "alpha_share",
    "digit_share",
    "whitespace_share",
    "non_ascii_share",
    "uppercase_share",
    "mean_identifier_length",
    "distinct_identifier_share",
    "number_token_share",
    "log2_longest_word",
];

/// Names of the statistics that follow the hashed buckets for web text, in order.
pub const WEB_STATS: [&str; 24] = [
    "log2_bytes",
    "log2_words",
    "log2_lines",
    "mean_word_length",
    "mean_sentence_words",
    "mean_line_words",
    "sentence_end_share",
    "blank_line_share",
    "short_line_share",
    "bullet_line_share",
    "prose_line_share",
    "code_line_share",
    "function_word_share",
    "distinct_word_share",
    "capitalized_word_share",
    "link_word_share",
    "alpha_share",
    "digit_share",
    "whitespace_share",
    "punctuation_share",
    "non_ascii_share",
    "uppercase_share",
    "number_token_share",
    "log2_longest_word",
];

/// English function words: their share is high in running prose and low in lists, tables,
/// logs, keyword stuffing and code.
const FUNCTION_WORDS: [&str; 48] = [
    "the", "a", "an", "of", "to", "in", "and", "or", "is", "are", "was", "were", "be", "been",
    "it", "its", "that", "this", "these", "which", "who", "what", "when", "how", "why", "for",
    "with", "as", "by", "on", "at", "from", "can", "will", "would", "if", "then", "because", "so",
    "not", "but", "we", "you", "they", "he", "she", "there", "each",
];

const NUMBER: u64 = 0x6e75_6d62_6572;

impl Hashed {
    fn features(&self, text: &str, out: &mut [f32]) {
        match self.preset {
            Preset::Code => self.code_features(text, out),
            Preset::Web => self.web_features(text, out),
        }
    }

    /// Hashed lower-cased word and punctuation uni- and bigrams, then [`WEB_STATS`].
    fn web_features(&self, text: &str, out: &mut [f32]) {
        let (grams, stats) = out.split_at_mut(self.buckets);
        let mut prev: Option<u64> = None;
        let mut tokens = 0usize;
        let (mut words, mut word_chars, mut numbers, mut function, mut capitalized, mut links) =
            (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
        let mut longest = 0usize;
        let mut distinct = std::collections::HashSet::new();
        let mut lower = String::new();
        let mut add = |h: u64, grams: &mut [f32]| {
            tokens += 1;
            grams[(h % self.buckets as u64) as usize] += 1.0;
            if let Some(p) = prev {
                let bigram = p.rotate_left(17) ^ h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                grams[(bigram % self.buckets as u64) as usize] += 1.0;
            }
            prev = Some(h);
        };
        for raw in text.split_whitespace() {
            if raw.contains("://") || raw.starts_with("www.") || raw.contains('@') {
                links += 1;
            }
            // A whitespace-separated chunk: its words, numbers and punctuation marks.
            let mut rest = raw;
            while let Some(c) = rest.chars().next() {
                let end = if c.is_alphabetic() {
                    rest.find(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '-'))
                        .unwrap_or(rest.len())
                } else if c.is_ascii_digit() {
                    rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == ','))
                        .unwrap_or(rest.len())
                } else {
                    c.len_utf8()
                };
                let token = &rest[..end];
                rest = &rest[end..];
                if c.is_alphabetic() {
                    words += 1;
                    let n = token.chars().count();
                    word_chars += n;
                    longest = longest.max(n);
                    capitalized += usize::from(c.is_uppercase());
                    lower.clear();
                    lower.extend(token.chars().flat_map(char::to_lowercase));
                    function += usize::from(FUNCTION_WORDS.contains(&lower.as_str()));
                    let h = xxh3_64_with_seed(lower.as_bytes(), 1);
                    distinct.insert(h);
                    add(h, grams);
                } else if c.is_ascii_digit() {
                    numbers += 1;
                    add(NUMBER, grams);
                } else {
                    add(xxh3_64_with_seed(token.as_bytes(), 2), grams);
                }
            }
        }
        let norm = tokens.max(1) as f32;
        grams.iter_mut().for_each(|g| *g /= norm);

        let lines: Vec<&str> = text.lines().collect();
        let n_lines = lines.len().max(1) as f32;
        let share =
            |pred: &dyn Fn(&str) -> bool| lines.iter().filter(|l| pred(l)).count() as f32 / n_lines;
        let sentence_end = |l: &str| l.trim_end().ends_with(['.', '!', '?', ':', '"']);
        let sentences = text
            .split_inclusive(['.', '!', '?'])
            .filter(|s| s.ends_with(['.', '!', '?']) && s.trim().len() > 1)
            .count();
        let [mut chars, mut alpha, mut digit, mut space, mut punct, mut non_ascii, mut upper] =
            [0usize; 7];
        for c in text.chars() {
            chars += 1;
            alpha += usize::from(c.is_alphabetic());
            upper += usize::from(c.is_uppercase());
            digit += usize::from(c.is_ascii_digit());
            space += usize::from(c.is_whitespace());
            punct += usize::from(c.is_ascii_punctuation());
            non_ascii += usize::from(!c.is_ascii());
        }
        let chars = chars.max(1) as f32;
        let n_words = words.max(1) as f32;
        let values = [
            (text.len() as f32 + 1.0).log2(),
            (words as f32 + 1.0).log2(),
            (n_lines + 1.0).log2(),
            word_chars as f32 / n_words,
            words as f32 / sentences.max(1) as f32,
            words as f32 / n_lines,
            share(&sentence_end),
            share(&|l| l.trim().is_empty()),
            share(&|l| !l.trim().is_empty() && l.trim().chars().count() < 30),
            share(&|l| {
                let t = l.trim_start();
                t.starts_with(['-', '*', '•', '+', '|', '#'])
                    || t.split_once(['.', ')']).is_some_and(|(n, _)| {
                        !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())
                    })
            }),
            // Long lines that end a sentence: running paragraphs.
            share(&|l| l.split_whitespace().count() >= 8 && sentence_end(l)),
            share(&|l| {
                let t = l.trim_end();
                t.ends_with([';', '{', '}']) || t.contains("()") || t.contains(" = ")
            }),
            function as f32 / n_words,
            distinct.len() as f32 / n_words,
            capitalized as f32 / n_words,
            links as f32 / n_words,
            alpha as f32 / chars,
            digit as f32 / chars,
            space as f32 / chars,
            punct as f32 / chars,
            non_ascii as f32 / chars,
            upper as f32 / (alpha as f32).max(1.0),
            numbers as f32 / norm,
            (longest as f32 + 1.0).log2(),
        ];
        stats.copy_from_slice(&values);
    }

    /// Hashed identifier, number and punctuation uni- and bigrams, then [`STATS`].
    fn code_features(&self, text: &str, out: &mut [f32]) {
        let (grams, stats) = out.split_at_mut(self.buckets);
        let b = text.as_bytes();
        let mut prev: Option<u64> = None;
        let mut tokens = 0usize;
        let mut identifiers = 0usize;
        let mut identifier_bytes = 0usize;
        let mut numbers = 0usize;
        // The keys are xxh3 hashes already: a fast hasher is enough (only the count is used).
        let mut distinct = foldhash::HashSet::default();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let start = i;
            let h = if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80)
                {
                    i += 1;
                }
                identifiers += 1;
                identifier_bytes += i - start;
                let h = xxh3_64_with_seed(&b[start..i], 1);
                distinct.insert(h);
                h
            } else if c.is_ascii_digit() {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                numbers += 1;
                NUMBER
            } else if c.is_ascii_whitespace() {
                i += 1;
                continue;
            } else {
                i += 1;
                xxh3_64_with_seed(&b[start..i], 2)
            };
            tokens += 1;
            grams[(h % self.buckets as u64) as usize] += 1.0;
            if let Some(p) = prev {
                let bigram = p.rotate_left(17) ^ h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                grams[(bigram % self.buckets as u64) as usize] += 1.0;
            }
            prev = Some(h);
        }
        let norm = tokens.max(1) as f32;
        grams.iter_mut().for_each(|g| *g /= norm);

        // Every line statistic in one pass over the lines (trimmed once each).
        let [mut n_lines, mut max_line, mut long, mut blank, mut comments] = [0usize; 5];
        let [mut defs, mut classes, mut imports, mut asserts, mut indented] = [0usize; 5];
        for l in text.lines() {
            n_lines += 1;
            max_line = max_line.max(l.len());
            long += usize::from(l.len() > 100);
            indented += usize::from(l.starts_with([' ', '\t']));
            let t = l.trim_start();
            let starts = |prefixes: &[&str]| usize::from(prefixes.iter().any(|p| t.starts_with(p)));
            blank += usize::from(t.is_empty());
            comments += starts(&["#", "//"]);
            defs += starts(&["def ", "async def "]);
            classes += starts(&["class "]);
            imports += starts(&["import ", "from "]);
            asserts += starts(&["assert ", "self.assert"]);
        }
        let n_lines = n_lines.max(1) as f32;
        let share = |count: usize| count as f32 / n_lines;
        // Character classes and the longest whitespace-separated word (in bytes) in one pass.
        let [mut chars, mut alpha, mut digit, mut space, mut non_ascii, mut upper] = [0usize; 6];
        let (mut word, mut longest_word) = (0usize, 0usize);
        for c in text.chars() {
            chars += 1;
            alpha += usize::from(c.is_ascii_alphabetic());
            upper += usize::from(c.is_ascii_uppercase());
            digit += usize::from(c.is_ascii_digit());
            non_ascii += usize::from(!c.is_ascii());
            if c.is_whitespace() {
                space += 1;
                word = 0;
            } else {
                word += c.len_utf8();
                longest_word = longest_word.max(word);
            }
        }
        let chars = chars.max(1) as f32;
        let letters = (alpha as f32).max(1.0);
        let values = [
            (b.len() as f32 + 1.0).log2(),
            (n_lines + 1.0).log2(),
            b.len() as f32 / n_lines,
            (max_line as f32 + 1.0).log2(),
            share(long),
            share(blank),
            share(comments),
            (text.matches("\"\"\"").count() + text.matches("'''").count()) as f32 / 2.0 / n_lines,
            share(defs),
            share(classes),
            share(imports),
            share(asserts),
            share(indented),
            alpha as f32 / chars,
            digit as f32 / chars,
            space as f32 / chars,
            non_ascii as f32 / chars,
            upper as f32 / letters,
            identifier_bytes as f32 / identifiers.max(1) as f32,
            distinct.len() as f32 / identifiers.max(1) as f32,
            numbers as f32 / norm,
            (longest_word as f32 + 1.0).log2(),
        ];
        stats.copy_from_slice(&values);
    }
}

impl Embedder for Hashed {
    fn id(&self) -> String {
        match self.preset {
            Preset::Code => format!("hashed-v1:{}", self.buckets),
            Preset::Web => format!("hashed-web-v1:{}", self.buckets),
        }
    }

    fn dim(&self) -> usize {
        self.buckets
            + match self.preset {
                Preset::Code => STATS.len(),
                Preset::Web => WEB_STATS.len(),
            }
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ClassifyError> {
        Ok(texts
            .par_iter()
            .map(|t| {
                let mut v = vec![0.0; self.dim()];
                self.features(t, &mut v);
                v
            })
            .collect())
    }

    fn cacheable(&self) -> bool {
        false
    }
}

/// Mean-pooled last hidden states of a causal LM checkpoint.
pub struct LmEmbedder {
    model: Decoder,
    tokenizer: Tokenizer,
    max_tokens: usize,
    batch: usize,
    pad: u32,
    id: String,
}

impl LmEmbedder {
    pub fn load(dir: &Path, max_tokens: usize, batch: usize) -> Result<LmEmbedder, ClassifyError> {
        let model = checkpoint::load(dir, DType::F32, &Device::Cpu)?;
        let tokenizer = Tokenizer::for_checkpoint(dir)?;
        let weights = weights_id(dir)?;
        let pad = model.config().eos_ids().first().copied().unwrap_or(0);
        let id = format!("lm-mean-v1:{weights}:{max_tokens}");
        Ok(LmEmbedder {
            model,
            tokenizer,
            max_tokens: max_tokens.max(1),
            batch: batch.max(1),
            pad,
            id,
        })
    }
}

impl Embedder for LmEmbedder {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn dim(&self) -> usize {
        self.model.config().hidden_size
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ClassifyError> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| {
                let mut ids = self.tokenizer.encode(t)?;
                ids.truncate(self.max_tokens);
                let vocab = self.model.config().vocab_size;
                if let Some(&big) = ids.iter().find(|&&i| i as usize >= vocab) {
                    return Err(ClassifyError::Model(crate::model::ModelError::Tokenizer(format!(
                        "token id {big} is beyond the model's vocab_size {vocab}: the checkpoint's tokenizer does not belong to its weights"
                    ))));
                }
                if ids.is_empty() {
                    ids.push(self.pad);
                }
                Ok(ids)
            })
            .collect::<Result<_, ClassifyError>>()?;
        by_length(&ids, self.batch, |rows| {
            let (input, mask) = padded(rows, self.pad, self.model.device())?;
            // Right padding under a causal mask: real positions never see the pads.
            let hidden = self
                .model
                .hidden_states(&input, None)?
                .to_dtype(DType::F32)?;
            Ok(masked_mean(&hidden, &mask)?.to_vec2::<f32>()?)
        })
    }

    fn cacheable(&self) -> bool {
        true
    }
}

/// Embeds token rows in batches of similar length (little padding), `batch` rows at a time;
/// the vectors come back in input order.
fn by_length(
    ids: &[Vec<u32>],
    batch: usize,
    mut embed: impl FnMut(&[&[u32]]) -> Result<Vec<Vec<f32>>, ClassifyError>,
) -> Result<Vec<Vec<f32>>, ClassifyError> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut out = vec![Vec::new(); ids.len()];
    for chunk in order.chunks(batch.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
        for (&i, v) in chunk.iter().zip(embed(&rows)?) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// Right-padded ids (B, T) of `rows` and their mask (B, T): 1 on real tokens, 0 on padding.
pub(super) fn padded(
    rows: &[impl AsRef<[u32]>],
    pad: u32,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let t = rows
        .iter()
        .map(|r| r.as_ref().len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut flat = Vec::with_capacity(rows.len() * t);
    let mut mask = Vec::with_capacity(rows.len() * t);
    for r in rows {
        let r = r.as_ref();
        flat.extend(r.iter().copied().chain(std::iter::repeat(pad)).take(t));
        mask.extend((0..t).map(|k| if k < r.len() { 1f32 } else { 0.0 }));
    }
    Ok((
        Tensor::from_vec(flat, (rows.len(), t), dev)?,
        Tensor::from_vec(mask, (rows.len(), t), dev)?,
    ))
}

/// The mean of `hidden` (B, T, H) over the positions where `mask` (B, T) is 1.
pub(super) fn masked_mean(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.unsqueeze(candle_core::D::Minus1)?;
    hidden.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)
}

/// A short hash of a model directory's `config.json` and `*.safetensors`: the weights identify
/// the features.
fn weights_id(dir: &Path) -> Result<String, ClassifyError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n == "config.json" || n.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in &files {
        let mut file = File::open(f).map_err(io_err(f))?;
        std::io::copy(&mut file, &mut h).map_err(io_err(f))?;
    }
    Ok(h.finalize().to_hex()[..16].to_string())
}

/// Mean-pooled, normalised BERT sentence embeddings of each file's head.
pub struct BertEmbedder {
    bert: Bert,
    id: String,
    max_tokens: usize,
    batch: usize,
}

impl Embedder for BertEmbedder {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn dim(&self) -> usize {
        self.bert.hidden_size()
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ClassifyError> {
        let ids: Vec<Vec<u32>> = texts
            .par_iter()
            .map(|t| self.bert.encode(t, self.max_tokens))
            .collect::<Result<_, _>>()?;
        by_length(&ids, self.batch, |rows| self.bert.embed_ids(rows))
    }

    fn cacheable(&self) -> bool {
        true
    }
}

/// Vectors of one embedder on disk: `DIR/<embedder id hash>.bin`, records of a 16-byte content
/// hash followed by `dim` little-endian f32. Appended as computed; a torn last record (a crash
/// mid-write) is cut off when the file is opened.
pub struct Cache {
    path: PathBuf,
    dim: usize,
    map: HashMap<u128, Vec<f32>>,
    file: File,
}

impl Cache {
    pub fn open(dir: &Path, embedder: &dyn Embedder) -> Result<Cache, ClassifyError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let name = blake3::hash(embedder.id().as_bytes()).to_hex()[..16].to_string();
        let path = dir.join(format!("{name}.bin"));
        let dim = embedder.dim();
        let record = 16 + 4 * dim;
        let mut bytes = Vec::new();
        if path.exists() {
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(io_err(&path))?;
        }
        let whole = bytes.len() / record * record;
        let mut map = HashMap::new();
        for rec in bytes[..whole].chunks_exact(record) {
            let key = u128::from_le_bytes(rec[..16].try_into().expect("16 bytes"));
            let v = rec[16..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            map.insert(key, v);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if whole != bytes.len() {
            file.set_len(whole as u64).map_err(io_err(&path))?;
        }
        Ok(Cache {
            path,
            dim,
            map,
            file,
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn insert(&mut self, key: u128, v: Vec<f32>) -> Result<(), ClassifyError> {
        debug_assert_eq!(v.len(), self.dim);
        let mut rec = Vec::with_capacity(16 + 4 * v.len());
        rec.extend_from_slice(&key.to_le_bytes());
        v.iter()
            .for_each(|x| rec.extend_from_slice(&x.to_le_bytes()));
        self.file.write_all(&rec).map_err(io_err(&self.path))?;
        self.map.insert(key, v);
        Ok(())
    }
}

/// Vectors of `texts`, from `cache` where it has them (and adding the rest to it).
pub fn embed_all(
    embedder: &dyn Embedder,
    texts: &[&str],
    cache: Option<&mut Cache>,
) -> Result<Vec<Vec<f32>>, ClassifyError> {
    let Some(cache) = cache else {
        return embedder.embed(texts);
    };
    let keys: Vec<u128> = texts.iter().map(|t| xxh3_128(t.as_bytes())).collect();
    let mut wanted = std::collections::HashSet::new();
    let missing: Vec<usize> = (0..texts.len())
        .filter(|&i| !cache.map.contains_key(&keys[i]) && wanted.insert(keys[i]))
        .collect();
    let fresh = embedder.embed(&missing.iter().map(|&i| texts[i]).collect::<Vec<_>>())?;
    for (&i, v) in missing.iter().zip(fresh) {
        cache.insert(keys[i], v)?;
    }
    Ok(keys.iter().map(|k| cache.map[k].clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Statistics counted by hand: 3 lines (1 comment, 1 def, 1 indented); tokens `#` `add` `def`
    /// `f` `(` `x` `)` `:` `return` `x` (10), of which 6 identifiers, 5 distinct; bucket
    /// frequencies sum to (10 unigrams + 9 bigrams) / 10 tokens.
    #[test]
    fn hashed_features_match_hand_counts() {
        let h = Hashed {
            buckets: 64,
            preset: Preset::Code,
        };
        let text = "# add\ndef f(x):\n    return x\n";
        let v = &h.embed(&[text]).unwrap()[0];
        let stat = |name: &str| v[64 + STATS.iter().position(|s| *s == name).unwrap()];
        assert_eq!(stat("comment_line_share"), 1.0 / 3.0);
        assert_eq!(stat("defs_per_line"), 1.0 / 3.0);
        assert_eq!(stat("indented_line_share"), 1.0 / 3.0);
        assert_eq!(stat("distinct_identifier_share"), 5.0 / 6.0);
        let sum: f32 = v[..64].iter().sum();
        assert!((sum - (10.0 + 9.0) / 10.0).abs() < 1e-5, "{sum}");
        assert_eq!(v.len(), h.dim());
    }

    /// Web statistics counted by hand on two lines. Tokens: `The cat sat on the mat` `.` `-`
    /// `See` `www` `.` `example` `.` `com` (14: 10 words, 4 marks); function words `the` `on`
    /// `the` (3); distinct lower-cased words 9; capitalized 2; one link (`www.…`); sentences
    /// ending in `.` split at every dot: `…mat.`, `- See www.`, `example.` (3); line 1 ends a
    /// sentence, line 2 is a bullet; bucket frequencies sum to (14 + 13 bigrams) / 14.
    #[test]
    fn web_features_match_hand_counts() {
        let h = Hashed {
            buckets: 64,
            preset: Preset::Web,
        };
        let v = &h
            .embed(&["The cat sat on the mat.\n- See www.example.com\n"])
            .unwrap()[0];
        assert_eq!(v.len(), 64 + WEB_STATS.len());
        let stat = |name: &str| v[64 + WEB_STATS.iter().position(|s| *s == name).unwrap()];
        assert_eq!(stat("function_word_share"), 3.0 / 10.0);
        assert_eq!(stat("distinct_word_share"), 9.0 / 10.0);
        assert_eq!(stat("capitalized_word_share"), 2.0 / 10.0);
        assert_eq!(stat("link_word_share"), 1.0 / 10.0);
        assert_eq!(stat("mean_sentence_words"), 10.0 / 3.0);
        assert_eq!(stat("sentence_end_share"), 0.5);
        assert_eq!(stat("bullet_line_share"), 0.5);
        assert_eq!(stat("prose_line_share"), 0.0);
        assert_eq!(stat("number_token_share"), 0.0);
        let sum: f32 = v[..64].iter().sum();
        assert!((sum - 27.0 / 14.0).abs() < 1e-5, "{sum}");
        assert_ne!(
            h.id(),
            Hashed {
                buckets: 64,
                preset: Preset::Code
            }
            .id()
        );
    }

    struct Counting(std::sync::atomic::AtomicUsize);
    impl Embedder for Counting {
        fn id(&self) -> String {
            "counting".into()
        }
        fn dim(&self) -> usize {
            2
        }
        fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ClassifyError> {
            self.0
                .fetch_add(texts.len(), std::sync::atomic::Ordering::SeqCst);
            Ok(texts.iter().map(|t| vec![t.len() as f32, 1.0]).collect())
        }
        fn cacheable(&self) -> bool {
            true
        }
    }

    /// A second pass computes nothing; a torn record is dropped and recomputed.
    #[test]
    fn the_cache_saves_work_and_survives_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let e = Counting(Default::default());
        let texts = ["a", "bb", "a"];
        let mut cache = Cache::open(dir.path(), &e).unwrap();
        let v = embed_all(&e, &texts, Some(&mut cache)).unwrap();
        assert_eq!(v, vec![vec![1.0, 1.0], vec![2.0, 1.0], vec![1.0, 1.0]]);
        drop(cache);
        let calls = e.0.load(std::sync::atomic::Ordering::SeqCst);
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let len = std::fs::metadata(&file).unwrap().len();
        assert_eq!(len, 2 * (16 + 8));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap()
            .write_all(&[1, 2, 3])
            .unwrap();
        let mut cache = Cache::open(dir.path(), &e).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(embed_all(&e, &texts, Some(&mut cache)).unwrap(), v);
        assert_eq!(e.0.load(std::sync::atomic::Ordering::SeqCst), calls);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), len);
    }

    /// The code statistics as they were computed before they went into one pass over lines
    /// and characters (commit 2ce1ea1, verbatim but for the hashed n-grams, which did not
    /// change): the oracle for [`code_statistics_are_those_of_the_previous_code`].
    fn previous_code_stats(text: &str) -> Vec<f32> {
        let b = text.as_bytes();
        let (mut tokens, mut identifiers, mut identifier_bytes, mut numbers) = (0usize, 0, 0, 0);
        let mut distinct = std::collections::HashSet::new();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let start = i;
            if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80)
                {
                    i += 1;
                }
                identifiers += 1;
                identifier_bytes += i - start;
                distinct.insert(xxh3_64_with_seed(&b[start..i], 1));
            } else if c.is_ascii_digit() {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                numbers += 1;
            } else if c.is_ascii_whitespace() {
                i += 1;
                continue;
            } else {
                i += 1;
            }
            tokens += 1;
        }
        let norm = tokens.max(1) as f32;
        let lines: Vec<&str> = text.lines().collect();
        let n_lines = lines.len().max(1) as f32;
        let share =
            |pred: &dyn Fn(&str) -> bool| lines.iter().filter(|l| pred(l)).count() as f32 / n_lines;
        let starts = |prefixes: &'static [&'static str]| {
            move |l: &str| {
                let t = l.trim_start();
                prefixes.iter().any(|p| t.starts_with(p))
            }
        };
        let max_line = lines.iter().map(|l| l.len()).max().unwrap_or(0);
        let [mut chars, mut alpha, mut digit, mut space, mut non_ascii, mut upper] = [0usize; 6];
        for c in text.chars() {
            chars += 1;
            alpha += usize::from(c.is_ascii_alphabetic());
            upper += usize::from(c.is_ascii_uppercase());
            digit += usize::from(c.is_ascii_digit());
            space += usize::from(c.is_whitespace());
            non_ascii += usize::from(!c.is_ascii());
        }
        let chars = chars.max(1) as f32;
        let letters = (alpha as f32).max(1.0);
        let longest_word = text.split_whitespace().map(str::len).max().unwrap_or(0);
        vec![
            (b.len() as f32 + 1.0).log2(),
            (n_lines + 1.0).log2(),
            b.len() as f32 / n_lines,
            (max_line as f32 + 1.0).log2(),
            share(&|l| l.len() > 100),
            share(&|l| l.trim().is_empty()),
            share(&starts(&["#", "//"])),
            (text.matches("\"\"\"").count() + text.matches("'''").count()) as f32 / 2.0 / n_lines,
            share(&starts(&["def ", "async def "])),
            share(&starts(&["class "])),
            share(&starts(&["import ", "from "])),
            share(&starts(&["assert ", "self.assert"])),
            share(&|l| l.starts_with(' ') || l.starts_with('\t')),
            alpha as f32 / chars,
            digit as f32 / chars,
            space as f32 / chars,
            non_ascii as f32 / chars,
            upper as f32 / letters,
            identifier_bytes as f32 / identifiers.max(1) as f32,
            distinct.len() as f32 / identifiers.max(1) as f32,
            numbers as f32 / norm,
            (longest_word as f32 + 1.0).log2(),
        ]
    }

    /// The one-pass code statistics equal the previous code's bit for bit, so a classifier
    /// trained before scores every file as it did. Texts: pieces chosen to hit each statistic's
    /// edge (Unicode whitespace that `trim` and `split_whitespace` see but ASCII checks do not:
    /// U+0085, U+00A0, U+2003, U+3000, vertical tab; `\r\n` endings, whitespace-only and
    /// 100/101-byte lines, a missing last newline, prefixes like `async def` and `self.assert`),
    /// joined at random by a seeded RNG, plus every `.py` file of this repository.
    #[test]
    fn code_statistics_are_those_of_the_previous_code() {
        use rand::seq::IndexedRandom;
        use rand::{Rng, SeedableRng};
        let long = "x".repeat(100);
        let pieces: &[&str] = &[
            "def f(x):\n",
            "    return x\n",
            "async def g():\n",
            "\tpass\n",
            "class A:\n",
            "import os\n",
            "from a import b\n",
            "assert x\n",
            "self.assertEqual(a, b)\n",
            "# comment\n",
            "// c\n",
            "\"\"\"doc\"\"\"\n",
            "'''s'''\n",
            "\"\"\"\"",
            "\r\n",
            "\n",
            "   \n",
            "\u{a0}\u{a0}def h(): pass\n",
            "word\u{2003}word\n",
            "\u{85}x\n",
            "\u{3000}\n",
            "\x0bvt\x0c\n",
            "caf\u{e9} na\u{ef}ve \u{1f600}\n",
            "0x1F 3.14 12e5\n",
            "",
            " ",
            "ABC_def",
            "\u{5b57}\u{7b26}",
            &long,
            "y",
            "\n\n\n",
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut texts: Vec<String> = pieces.iter().map(|p| p.to_string()).collect();
        for _ in 0..2000 {
            let n = rng.random_range(1..30);
            texts.push((0..n).map(|_| *pieces.choose(&mut rng).unwrap()).collect());
        }
        let mut dirs = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let (p, name) = (e.path(), e.file_name());
                if p.is_dir() && name != ".git" && name != "target" {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "py") {
                    texts.extend(std::fs::read_to_string(&p).ok());
                }
            }
        }
        assert!(texts.len() > 2040, "{} texts", texts.len());
        let h = Hashed {
            buckets: 64,
            preset: Preset::Code,
        };
        for text in &texts {
            let now: Vec<u32> = h.embed(&[text]).unwrap()[0][64..]
                .iter()
                .map(|x| x.to_bits())
                .collect();
            let before: Vec<u32> = previous_code_stats(text)
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(now, before, "{text:?}");
        }
    }
}

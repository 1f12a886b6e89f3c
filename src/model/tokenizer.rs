//! Text ↔ token ids. A corpus is tokenized with a [`TokenizerSpec`]: a tiktoken encoding by name,
//! or a Hugging Face `tokenizer.json` (read with the `tokenizers` crate, ids as Python
//! `tokenizers` gives them). A checkpoint phigen trains records its tokenizer in `DIR/phigen.json`
//! and, for a file tokenizer, holds a copy of `tokenizer.json` (and `tokenizer_config.json`);
//! Hugging Face checkpoints bring their own `tokenizer.json`, which wins when both are present.

mod bpe;
mod pretokenize;
mod unicode_classes;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use super::ModelError;
use crate::artifact::atomic;

pub const PHIGEN_FILE: &str = "phigen.json";
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";
/// Beside `tokenizer.json`: its special tokens (`eos_token`, `bos_token`, `pad_token`).
pub const HF_TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// What goes wrong finding or loading a tokenizer for training data.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer `{given}`: not a tiktoken encoding ({names}) and no such file or directory; pass one of those names, a Hugging Face tokenizer.json, or a checkpoint directory holding one")]
    Unknown { given: String, names: String },
    #[error("{dir}: no {HF_TOKENIZER_FILE} in this directory; expected a Hugging Face checkpoint directory holding {HF_TOKENIZER_FILE} (and optionally {HF_TOKENIZER_CONFIG_FILE}), or pass the tokenizer.json path itself")]
    NotInDirectory { dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a Hugging Face tokenizer.json ({reason}); expected the JSON file `tokenizers` writes (`Tokenizer.save`, or a model repository's tokenizer.json)")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: changed since it was chosen (blake3 {expected}, now {found}); run the step again so every part uses the same file")]
    Changed {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: no end-of-text token to end documents with: {HF_TOKENIZER_CONFIG_FILE} beside it names no `eos_token`, and none of {candidates} is an added token; pass --eos-token TOKEN (`eos_token` in a recipe's tokenize step)")]
    NoEndOfText { path: PathBuf, candidates: String },
    #[error("{path}: the {what} `{token}` is not a token of this tokenizer; {fix}")]
    UnknownToken {
        path: PathBuf,
        what: &'static str,
        token: String,
        fix: &'static str,
    },
    #[error("{path}: could not encode a document: {reason}")]
    Encode { path: PathBuf, reason: String },
}

/// The tiktoken encodings phigen trains with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Encoding {
    /// GPT-2's 50,257 tokens (r50k_base); phi-1's codegen tokenizer is GPT-2 based.
    Gpt2,
    P50kBase,
    Cl100kBase,
    O200kBase,
}

impl Encoding {
    pub fn bpe(self) -> &'static CoreBPE {
        match self {
            Encoding::Gpt2 => tiktoken_rs::r50k_base_singleton(),
            Encoding::P50kBase => tiktoken_rs::p50k_base_singleton(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
        }
    }

    /// The ids of `text` with special tokens in it read as plain text: tiktoken's
    /// `encode_ordinary`, identical ids, from phigen's own pre-tokenizer and BPE (several times
    /// faster than tiktoken-rs's regex-driven one).
    /// This is the entry point to count or make tiktoken ids elsewhere in phigen.
    pub fn encode_ordinary(self, text: &str) -> Vec<u32> {
        self.encoder().encode(text, 0)
    }

    /// `encode_ordinary(text).len()`, without keeping the ids.
    pub fn count_ordinary(self, text: &str) -> usize {
        self.encoder().count(text)
    }

    /// The fast encoder, built on first use from tiktoken-rs's ranks (tens of milliseconds).
    fn encoder(self) -> &'static bpe::Encoder {
        static ENCODERS: [OnceLock<bpe::Encoder>; 4] = [const { OnceLock::new() }; 4];
        let (slot, pattern) = match self {
            Encoding::Gpt2 => (0, pretokenize::Pattern::R50k),
            Encoding::P50kBase => (1, pretokenize::Pattern::R50k),
            Encoding::Cl100kBase => (2, pretokenize::Pattern::Cl100k),
            Encoding::O200kBase => (3, pretokenize::Pattern::O200k),
        };
        ENCODERS[slot].get_or_init(|| {
            let ranks = bpe::RankTable::from_core(self.bpe(), self.vocab_size() as u32);
            bpe::Encoder::new(pattern, ranks)
        })
    }

    /// `<|endoftext|>`, the document separator of every tiktoken encoding.
    pub fn end_of_text(self) -> u32 {
        self.bpe().encode_with_special_tokens("<|endoftext|>")[0]
    }

    /// tiktoken's `n_vocab` (largest id + 1, special tokens included).
    pub fn vocab_size(self) -> usize {
        match self {
            Encoding::Gpt2 => 50_257,
            Encoding::P50kBase => 50_281,
            Encoding::Cl100kBase => 100_277,
            Encoding::O200kBase => 200_019,
        }
    }

    /// The name `--tokenizer` takes, e.g. `cl100k_base`.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_else(|| format!("{self:?}"))
    }
}

/// Which tokenizer makes a corpus's ids. Written as `"gpt2"` (as before file tokenizers existed,
/// so older meta.json files read unchanged) or `{"path": …, "blake3": …}` in meta.json,
/// phigen.json and the settings that identify a step, so a changed file is a changed step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenizerSpec {
    Tiktoken(Encoding),
    /// A Hugging Face `tokenizer.json`. `blake3` hashes its bytes and then those of the
    /// `tokenizer_config.json` beside it, if any: the two files that decide the ids and the
    /// end-of-text token.
    File {
        path: PathBuf,
        blake3: String,
    },
}

impl std::fmt::Display for TokenizerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerSpec::Tiktoken(e) => f.write_str(&e.name()),
            TokenizerSpec::File { path, blake3 } => {
                write!(
                    f,
                    "{} (blake3 {})",
                    path.display(),
                    &blake3[..blake3.len().min(12)]
                )
            }
        }
    }
}

/// Added tokens that end a document, in the order they are looked for when
/// `tokenizer_config.json` names no `eos_token`.
const END_OF_TEXT_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<eos>",
];
const BOS_TOKENS: &[&str] = &["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"];
const PAD_TOKENS: &[&str] = &["<pad>", "<|pad|>", "[PAD]", "<|padding|>"];

impl TokenizerSpec {
    /// A `--tokenizer` value or a recipe's `tokenizer`: a tiktoken encoding's name, a
    /// `tokenizer.json`, or a directory holding one (a Hugging Face checkpoint).
    pub fn parse(arg: &str) -> Result<Self, TokenizerError> {
        if let Ok(e) = <Encoding as clap::ValueEnum>::from_str(arg, false) {
            return Ok(TokenizerSpec::Tiktoken(e));
        }
        let given = Path::new(arg);
        let path = if given.is_dir() {
            let path = given.join(HF_TOKENIZER_FILE);
            if !path.is_file() {
                return Err(TokenizerError::NotInDirectory {
                    dir: given.to_path_buf(),
                });
            }
            path
        } else if given.is_file() {
            given.to_path_buf()
        } else {
            let names: Vec<String> = <Encoding as clap::ValueEnum>::value_variants()
                .iter()
                .map(|e| e.name())
                .collect();
            return Err(TokenizerError::Unknown {
                given: arg.to_string(),
                names: names.join(", "),
            });
        };
        Self::file(path)
    }

    /// The tokenizer.json at `path`, its hash taken.
    fn file(path: PathBuf) -> Result<Self, TokenizerError> {
        let (_, blake3) = read_tokenizer_files(&path)?;
        Ok(TokenizerSpec::File { path, blake3 })
    }

    /// The tokenizer of checkpoint `dir`: its `tokenizer.json` (what sampling reads), else the
    /// encoding its `phigen.json` names.
    pub fn for_checkpoint(dir: &Path) -> Result<Self, ModelError> {
        let hf = dir.join(HF_TOKENIZER_FILE);
        if hf.is_file() {
            return Ok(Self::file(hf)?);
        }
        match read_phigen_file(dir)?.tokenizer {
            TokenizerSpec::Tiktoken(e) => Ok(TokenizerSpec::Tiktoken(e)),
            TokenizerSpec::File { .. } => Err(missing_copy(dir)),
        }
    }

    /// Whether ids of `self` and `other` are the same: one encoding, or files with the same
    /// bytes wherever they lie (a checkpoint holds a copy).
    pub fn same_tokenizer(&self, other: &TokenizerSpec) -> bool {
        match (self, other) {
            (TokenizerSpec::Tiktoken(a), TokenizerSpec::Tiktoken(b)) => a == b,
            (TokenizerSpec::File { blake3: a, .. }, TokenizerSpec::File { blake3: b, .. }) => {
                a == b
            }
            _ => false,
        }
    }

    /// Largest id + 1, special and added tokens included: the embedding rows a model needs.
    pub fn vocab_size(&self) -> Result<usize, TokenizerError> {
        match self {
            TokenizerSpec::Tiktoken(e) => Ok(e.vocab_size()),
            TokenizerSpec::File { path, blake3 } => Ok(hf_vocab_size(&load_file(path, blake3)?)),
        }
    }

    /// The tokenizer, loaded to make documents. `eos_token` overrides the end-of-text token of
    /// a file tokenizer (tiktoken encodings always end documents with `<|endoftext|>`).
    pub fn load(&self, eos_token: Option<&str>) -> Result<DocTokenizer, TokenizerError> {
        match self {
            TokenizerSpec::Tiktoken(e) => Ok(DocTokenizer {
                ids: SpecialIds {
                    vocab_size: e.vocab_size(),
                    eos: e.end_of_text(),
                    bos: None,
                    pad: None,
                },
                kind: DocKind::Tiktoken(*e),
            }),
            TokenizerSpec::File { path, blake3 } => {
                let mut t = load_file(path, blake3)?;
                // Documents are whole: a truncation or padding the file sets is for model inputs.
                t.with_truncation(None)
                    .map_err(|e| TokenizerError::Invalid {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?
                    .with_padding(None);
                let ids = special_ids(&t, path, eos_token)?;
                Ok(DocTokenizer {
                    ids,
                    kind: DocKind::File {
                        path: path.clone(),
                        tokenizer: Box::new(t),
                    },
                })
            }
        }
    }
}

/// The ids a model and its data must agree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    /// Largest id + 1.
    pub vocab_size: usize,
    /// Ends every document.
    pub eos: u32,
    pub bos: Option<u32>,
    pub pad: Option<u32>,
}

/// A tokenizer loaded to turn documents into training ids.
pub struct DocTokenizer {
    pub ids: SpecialIds,
    kind: DocKind,
}

enum DocKind {
    Tiktoken(Encoding),
    File {
        path: PathBuf,
        tokenizer: Box<tokenizers::Tokenizer>,
    },
}

impl DocTokenizer {
    /// A document's ids: its text's, then the end-of-text id. With tiktoken special tokens in the
    /// text are plain text (`encode_ordinary`); with a tokenizer.json added tokens written in
    /// the text are matched whole and nothing is added around it, as Python `tokenizers`'
    /// `encode(text, add_special_tokens=False)`.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = match &self.kind {
            // Room for the end-of-text id.
            DocKind::Tiktoken(e) => e.encoder().encode(text, 1),
            DocKind::File { path, tokenizer } => tokenizer
                .encode_fast(text, false)
                .map_err(|e| TokenizerError::Encode {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
                .get_ids()
                .to_vec(),
        };
        ids.push(self.ids.eos);
        Ok(ids)
    }
}

/// The bytes of `tokenizer.json` and the hash of it and its `tokenizer_config.json`.
fn read_tokenizer_files(path: &Path) -> Result<(Vec<u8>, String), TokenizerError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TokenizerError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    let bytes = read(path)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&bytes);
    let config = config_path(path);
    if config.is_file() {
        hasher.update(&read(&config)?);
    }
    Ok((bytes, hasher.finalize().to_hex().to_string()))
}

fn config_path(tokenizer_json: &Path) -> PathBuf {
    tokenizer_json.with_file_name(HF_TOKENIZER_CONFIG_FILE)
}

/// The tokenizer at `path`, which must still hash to `blake3`.
fn load_file(path: &Path, blake3: &str) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let (bytes, found) = read_tokenizer_files(path)?;
    if found != blake3 {
        return Err(TokenizerError::Changed {
            path: path.to_path_buf(),
            expected: blake3.to_string(),
            found,
        });
    }
    tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn hf_vocab_size(t: &tokenizers::Tokenizer) -> usize {
    t.get_vocab(true)
        .values()
        .max()
        .map_or(0, |&id| id as usize + 1)
}

/// eos, bos and pad: those `tokenizer_config.json` names, else the first known one among the
/// added tokens (`--eos-token` wins for eos; without any eos it is an error, the others are
/// optional).
fn special_ids(
    t: &tokenizers::Tokenizer,
    path: &Path,
    eos_token: Option<&str>,
) -> Result<SpecialIds, TokenizerError> {
    let config_file = config_path(path);
    let config: Option<serde_json::Value> = match std::fs::read_to_string(&config_file) {
        Ok(text) => Some(
            serde_json::from_str(&text).map_err(|e| TokenizerError::Invalid {
                path: config_file.clone(),
                reason: format!("{HF_TOKENIZER_CONFIG_FILE} is not JSON: {e}"),
            })?,
        ),
        Err(_) => None,
    };
    let added: Vec<String> = t
        .get_added_tokens_decoder()
        .into_values()
        .map(|a| a.content)
        .collect();
    let known = |candidates: &[&str]| {
        candidates
            .iter()
            .find(|c| added.iter().any(|a| a == *c))
            .map(|c| c.to_string())
    };
    // `eos_token` is a string, or an AddedToken object with a `content`.
    let named = |key: &str| {
        let v = config.as_ref()?.get(key)?;
        v.as_str()
            .or_else(|| v.get("content")?.as_str())
            .map(str::to_string)
    };
    let id_of = |token: String, what: &'static str, fix: &'static str| {
        t.token_to_id(&token)
            .ok_or_else(|| TokenizerError::UnknownToken {
                path: path.to_path_buf(),
                what,
                token,
                fix,
            })
    };
    let eos = match (eos_token, named("eos_token")) {
        (Some(token), _) => id_of(token.into(), "--eos-token", "pass a token it has")?,
        (None, Some(token)) => id_of(
            token,
            "eos_token of tokenizer_config.json",
            "fix tokenizer_config.json or pass --eos-token TOKEN",
        )?,
        (None, None) => match known(END_OF_TEXT_TOKENS) {
            Some(token) => id_of(token, "end-of-text token", "pass --eos-token TOKEN")?,
            None => {
                return Err(TokenizerError::NoEndOfText {
                    path: path.to_path_buf(),
                    candidates: END_OF_TEXT_TOKENS.join(", "),
                })
            }
        },
    };
    let optional = |key: &str, candidates: &[&str]| {
        named(key)
            .or_else(|| known(candidates))
            .and_then(|token| t.token_to_id(&token))
    };
    Ok(SpecialIds {
        vocab_size: hf_vocab_size(t),
        eos,
        bos: optional("bos_token", BOS_TOKENS),
        pad: optional("pad_token", PAD_TOKENS),
    })
}

/// What `phigen.json` records next to a checkpoint phigen wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhigenFile {
    pub tokenizer: TokenizerSpec,
    /// The texts a chat stage's template (`chat_template.jinja` beside it) takes as its
    /// `bos_token` and end-of-turn `eos_token`: a tiktoken checkpoint has no
    /// `tokenizer_config.json` to hold them, and a copied one names the tokenizer's, not the
    /// template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatTokens>,
}

/// See [`PhigenFile::chat`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatTokens {
    pub bos_token: String,
    pub eos_token: String,
}

/// Records `spec` as the tokenizer of checkpoint `dir`; a file tokenizer is copied in (with its
/// `tokenizer_config.json`), so the checkpoint samples and evaluates without the original.
pub fn write_phigen_file(dir: &Path, spec: &TokenizerSpec) -> Result<(), ModelError> {
    if let TokenizerSpec::File { path, .. } = spec {
        for (from, name) in [
            (path.clone(), HF_TOKENIZER_FILE),
            (config_path(path), HF_TOKENIZER_CONFIG_FILE),
        ] {
            if name == HF_TOKENIZER_FILE || from.is_file() {
                std::fs::copy(&from, dir.join(name))
                    .map_err(|source| ModelError::Io { path: from, source })?;
            }
        }
    }
    let path = dir.join(PHIGEN_FILE);
    atomic::write_json(
        &path,
        &PhigenFile {
            tokenizer: spec.clone(),
            chat: None,
        },
    )
    .map_err(|source| ModelError::Io { path, source })
}

pub(crate) fn read_phigen_file(dir: &Path) -> Result<PhigenFile, ModelError> {
    let path = dir.join(PHIGEN_FILE);
    let text = std::fs::read_to_string(&path).map_err(|_| ModelError::BadFile {
        path: dir.to_path_buf(),
        reason: format!(
            "no {HF_TOKENIZER_FILE} and no {PHIGEN_FILE}, so the tokenizer is unknown; pass --tokenizer or --prompt-ids"
        ),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
        path: path.clone(),
        reason: format!("expected {{\"tokenizer\": \"gpt2\" | \"p50k_base\" | \"cl100k_base\" | \"o200k_base\" | {{\"path\": …, \"blake3\": …}}}}: {e}"),
    })
}

fn missing_copy(dir: &Path) -> ModelError {
    ModelError::BadFile {
        path: dir.to_path_buf(),
        reason: format!("{PHIGEN_FILE} names a tokenizer file, but its copy {HF_TOKENIZER_FILE} is not in the directory; copy the tokenizer.json the model was trained with here"),
    }
}

pub enum Tokenizer {
    Tiktoken(Encoding),
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// The tokenizer a checkpoint directory names.
    pub fn for_checkpoint(dir: &Path) -> Result<Self, ModelError> {
        let hf = dir.join(HF_TOKENIZER_FILE);
        if hf.is_file() {
            return Self::from_file(&hf);
        }
        match read_phigen_file(dir)?.tokenizer {
            TokenizerSpec::Tiktoken(e) => Ok(Tokenizer::Tiktoken(e)),
            TokenizerSpec::File { .. } => Err(missing_copy(dir)),
        }
    }

    /// The tokenizer `spec` names (a file tokenizer read where the spec says it lies).
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Self, ModelError> {
        match spec {
            TokenizerSpec::Tiktoken(e) => Ok(Tokenizer::Tiktoken(*e)),
            TokenizerSpec::File { path, .. } => Self::from_file(path),
        }
    }

    fn from_file(path: &Path) -> Result<Self, ModelError> {
        let t = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::BadFile {
            path: path.to_path_buf(),
            reason: format!("not a tokenizers JSON file: {e}"),
        })?;
        Ok(Tokenizer::HuggingFace(Box::new(t)))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        match self {
            Tokenizer::Tiktoken(e) => Ok(e.bpe().encode_with_special_tokens(text)),
            Tokenizer::HuggingFace(t) => t
                .encode(text, true)
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
        }
    }

    /// Ids of text that already holds its special tokens (a rendered chat template): nothing is
    /// added around it, as transformers' `apply_chat_template` tokenizes.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        match self {
            Tokenizer::Tiktoken(_) => self.encode(text),
            Tokenizer::HuggingFace(t) => t
                .encode(text, false)
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
        }
    }

    /// The text of `ids` with their special tokens written out (`<|endoftext|>`, `</s>`): what
    /// `phigen shards decode` shows of a token shard.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, ModelError> {
        match self {
            Tokenizer::Tiktoken(_) => self.decode(ids),
            Tokenizer::HuggingFace(t) => t
                .decode(ids, false)
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
        }
    }

    /// The text of `ids`. A character whose bytes are split across tokens appears once complete:
    /// the text stops before an incomplete trailing character (other invalid bytes become U+FFFD).
    /// Ids a tiktoken encoding does not have (the padding rows of a model's embedding, e.g.
    /// 50,257–50,303 for GPT-2, which an untrained model may sample) decode to nothing.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        match self {
            Tokenizer::Tiktoken(e) => {
                let bpe = e.bpe();
                let bytes = match bpe.decode_bytes(ids) {
                    Ok(b) => b,
                    Err(_) => {
                        let known: Vec<u32> = ids
                            .iter()
                            .copied()
                            .filter(|&i| bpe.decode_bytes(&[i]).is_ok())
                            .collect();
                        bpe.decode_bytes(&known)
                            .map_err(|e| ModelError::Tokenizer(e.to_string()))?
                    }
                };
                Ok(String::from_utf8_lossy(&bytes[..complete_prefix(&bytes)]).into_owned())
            }
            Tokenizer::HuggingFace(t) => t
                .decode(ids, true)
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
        }
    }
}

/// Length of `bytes` without an incomplete UTF-8 character at its end.
fn complete_prefix(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 != 0x80 {
            let needed = match b {
                0xF0.. => 4,
                0xE0.. => 3,
                0xC0.. => 2,
                _ => 1,
            };
            return if needed > back {
                bytes.len() - back
            } else {
                bytes.len()
            };
        }
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The padding rows of a model's embedding (GPT-2 has 50,257 tokens, models 50,304 rows) are
    /// not tokens: they decode to nothing, and "Hello world" ([15496, 995]) stays itself.
    #[test]
    fn ids_past_the_encoding_decode_to_nothing() {
        let t = Tokenizer::Tiktoken(Encoding::Gpt2);
        assert_eq!(
            t.decode(&[15496, 50275, 995, 50303]).unwrap(),
            "Hello world"
        );
    }

    /// GPT-2 ids from OpenAI's published encoder: "Hello world" = [15496, 995], and
    /// `<|endoftext|>` = 50256.
    #[test]
    fn gpt2_encoding_matches_the_published_ids() {
        let t = Tokenizer::Tiktoken(Encoding::Gpt2);
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(Encoding::Gpt2.end_of_text(), 50256);
        assert_eq!(t.decode(&[15496, 995]).unwrap(), "Hello world");
    }

    /// GPT-2's vocabulary splits "日" (3 UTF-8 bytes) over byte-level tokens; decoding only the
    /// first must give no replacement character, the whole sequence the character.
    #[test]
    fn partial_characters_are_held_back() {
        let t = Tokenizer::Tiktoken(Encoding::Gpt2);
        let ids = t.encode("日").unwrap();
        assert!(ids.len() > 1, "{ids:?}");
        assert_eq!(t.decode(&ids[..1]).unwrap(), "");
        assert_eq!(t.decode(&ids).unwrap(), "日");
        // A stray continuation byte mid-text does not hold back what follows it.
        assert_eq!(complete_prefix(&[b'a', 0x97, b'b']), 3);
        assert_eq!(complete_prefix(&[b'a', 0xE6, 0x97]), 1);
    }

    #[test]
    fn a_directory_without_a_tokenizer_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::for_checkpoint(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--tokenizer"), "{err}");
    }

    const ENCODINGS: [Encoding; 4] = [
        Encoding::Gpt2,
        Encoding::P50kBase,
        Encoding::Cl100kBase,
        Encoding::O200kBase,
    ];

    /// phigen's encoder against tiktoken-rs's CoreBPE (an independent implementation: the regex
    /// crate's engines and tiktoken's own merge loop) on `text`, ids and count.
    fn assert_same_ids(e: Encoding, text: &str) {
        let expected = e.bpe().encode_ordinary(text);
        let found = e.encode_ordinary(text);
        assert_eq!(found, expected, "{} on {text:?}", e.name());
        assert_eq!(
            e.count_ordinary(text),
            expected.len(),
            "{} on {text:?}",
            e.name()
        );
    }

    /// Text chosen to hit every branch of the three pre-tokenizer patterns: whitespace runs of
    /// every kind (at the end, before words, with line breaks inside), contractions in both cases
    /// (and `ſ`, which `(?i:s)` matches), digit runs longer than 3, emoji with ZWJ, CJK,
    /// combining marks, case changes (o200k), mixed scripts, code, U+FFFD, private use,
    /// non-BMP letters and special-token text (plain text here).
    #[test]
    fn ids_match_tiktoken_on_adversarial_text() {
        let texts = [
            "",
            " ",
            "  ",
            "\n",
            "\r\n",
            "\r\n\r\n  \r\n",
            "a  ",
            "a \t ",
            "a\t\tb",
            "  a",
            "\t a",
            " \u{a0}a\u{3000}b\u{2028}c\u{85}d\u{1680}e\u{2000}\u{200a}f\u{202f}\u{205f}g\u{2029}",
            "x \n\n  y \n \t z\r\r\n w   ",
            "\u{b}\u{c}a\u{1c}\u{1d}\u{1e}\u{1f}b",
            "I'm you're he's she'd we'll they've it't 'S 'T 'RE 'Ve 'LL 'D 'M 'ſ 'ſt",
            "DON'T WE'LL I'M 'x 'sup ''s ' s .'s '' ''",
            "12 123 1234 12345678901 ٣٤٥٦ ５６７８ ½²³ Ⅻⅻ 1.5e10 0x1F",
            "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ a👍b",
            "日本語のテキスト、漢字かな混じり。한국어 텍스트 中文",
            "e\u{301}cole cafe\u{301} \u{301}\u{301}x a\u{20dd} \u{903}b",
            "HTTPServer XMLHttpRequest camelCase snake_case ǅungla ʰa Ǆ ǈx",
            "Привет мир Γειά σου κόσμε مرحبا بالعالم שלום עולם नमस्ते",
            "def f(x):\n    return x ** 2  # square\n\n\tif a != b: pass\n",
            "fn main() { let v: Vec<u32> = vec![1, 2, 3]; println!(\"{v:?}\"); }\r\n",
            "a//b //c /// ..\n/ x.\n/y !?\r\n/",
            "\u{fffd}\u{fffd}x \u{e000}\u{f0000} \u{10ffff}",
            "𝐀𝐁𝐂 𐐨𐐩 𝒳y \u{1d7d8}\u{1d7d9}",
            "<|endoftext|> <|fim_prefix|>",
            "\u{ad}soft\u{200b}zero\u{200d}joiner\u{feff}bom",
            "tab\tsep\tvalues\t\t\n",
            "   leading and trailing   ",
            "=================================================================",
            "ᾼ ᾈ ǲ Ǳ ǳ",
        ];
        for e in ENCODINGS {
            for text in texts {
                assert_same_ids(e, text);
            }
        }
        // Encodings alternating on one thread: each must see only its own cached merges.
        for text in texts {
            for e in ENCODINGS {
                assert_same_ids(e, text);
            }
        }
    }

    /// Thousands of random strings (seeded ChaCha8, so the same every run) mixing characters of
    /// every class the patterns tell apart, plus random code points, against tiktoken-rs.
    #[test]
    fn ids_match_tiktoken_on_random_text() {
        use rand::{Rng, SeedableRng};
        let pool: Vec<char> = concat!(
            "aAzZsStTdDmMlLvVrReEſ'''   \t\n\r\r\n0123456789",
            ".,;:!?/\\//()[]{}<>=+-*&^%$#@~`\"_|",
            "\u{b}\u{c}\u{85}\u{a0}\u{1680}\u{2000}\u{2009}\u{200a}\u{2028}\u{2029}\u{202f}\u{205f}\u{3000}",
            "\u{300}\u{301}\u{20dd}\u{903}\u{200d}\u{fe0f}\u{ad}\u{200b}",
            "ǅǈʰʲא日本語한中ÀÉßçøΩπДжअ",
            "٣５½²Ⅻ\u{1d7d8}",
            "𝐀𝐁𐐨𐐩👍🏽😀\u{fffd}\u{e000}\u{f0000}",
        )
        .chars()
        .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(33);
        for e in ENCODINGS {
            for _ in 0..1500 {
                let len = rng.random_range(0..40);
                let text: String = (0..len)
                    .map(|_| {
                        if rng.random_range(0..20) == 0 {
                            // Any scalar value: unassigned and plane-16 ones too.
                            char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('\u{fffd}')
                        } else {
                            pool[rng.random_range(0..pool.len())]
                        }
                    })
                    .collect();
                assert_same_ids(e, &text);
            }
        }
    }
}

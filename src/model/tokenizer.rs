//! Text ↔ token ids for a checkpoint. Models phigen trains use a tiktoken encoding, recorded in
//! `DIR/phigen.json`; Hugging Face checkpoints bring a `tokenizer.json` (read with the
//! `tokenizers` crate). A `tokenizer.json` wins when both are present.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use super::ModelError;
use crate::artifact::atomic;

pub const PHIGEN_FILE: &str = "phigen.json";
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";

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

    /// `<|endoftext|>`, the document separator of every tiktoken encoding.
    pub fn end_of_text(self) -> u32 {
        self.bpe().encode_with_special_tokens("<|endoftext|>")[0]
    }
}

/// What `phigen.json` records next to a checkpoint phigen wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhigenFile {
    pub tokenizer: Encoding,
}

pub fn write_phigen_file(dir: &Path, encoding: Encoding) -> Result<(), ModelError> {
    let path = dir.join(PHIGEN_FILE);
    atomic::write_json(
        &path,
        &PhigenFile {
            tokenizer: encoding,
        },
    )
    .map_err(|source| ModelError::Io { path, source })
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
            let t = tokenizers::Tokenizer::from_file(&hf).map_err(|e| ModelError::BadFile {
                path: hf.clone(),
                reason: format!("not a tokenizers JSON file: {e}"),
            })?;
            return Ok(Tokenizer::HuggingFace(Box::new(t)));
        }
        let path = dir.join(PHIGEN_FILE);
        let text = std::fs::read_to_string(&path).map_err(|_| ModelError::BadFile {
            path: dir.to_path_buf(),
            reason: format!(
                "no {HF_TOKENIZER_FILE} and no {PHIGEN_FILE}, so the tokenizer is unknown; pass --tokenizer or --prompt-ids"
            ),
        })?;
        let file: PhigenFile = serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
            path: path.clone(),
            reason: format!("expected {{\"tokenizer\": \"gpt2\" | \"p50k_base\" | \"cl100k_base\" | \"o200k_base\"}}: {e}"),
        })?;
        Ok(Tokenizer::Tiktoken(file.tokenizer))
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
}

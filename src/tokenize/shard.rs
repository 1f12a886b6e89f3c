//! Token shards: a 32-byte header, then the tokens as flat little-endian u16 or u32.
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `PHIGTOKS` |
//! | 8 | 4 | format version (u32 LE, [`FORMAT_VERSION`]) |
//! | 12 | 4 | bytes per token: 2 (u16) or 4 (u32) |
//! | 16 | 8 | token count (u64 LE) |
//! | 24 | 8 | document count (u64 LE) |
//!
//! Written to a temp name and renamed, so a shard that exists is complete. Read memory-mapped.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::artifact::atomic;

pub const MAGIC: &[u8; 8] = b"PHIGTOKS";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ShardFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a phigen token shard: {reason} — re-run `phigen tokenize`")]
    Bad { path: PathBuf, reason: String },
    #[error("{path}: token shard format version {found}, this phigen reads version {expected} — re-run `phigen tokenize` with this phigen")]
    Version {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
}

/// Bytes per token: u16 when every id fits, else u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenWidth {
    U16,
    U32,
}

impl TokenWidth {
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }
}

/// Streams tokens into one shard file.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    width: TokenWidth,
    tokens: u64,
    documents: u64,
    /// One document's bytes, reused: a fresh buffer per document cost page faults.
    bytes: Vec<u8>,
}

impl ShardWriter {
    pub fn create(path: &Path, width: TokenWidth) -> Result<Self, ShardFileError> {
        let tmp = atomic::temp_path(path);
        let io = |source| ShardFileError::Io {
            path: tmp.clone(),
            source,
        };
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io)?);
        out.write_all(&[0; HEADER_BYTES]).map_err(io)?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            width,
            tokens: 0,
            documents: 0,
            bytes: Vec::new(),
        })
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Appends one document's tokens (already ending in the end-of-text token).
    pub fn push_document(&mut self, ids: &[u32]) -> Result<(), ShardFileError> {
        let bytes = &mut self.bytes;
        bytes.clear();
        match self.width {
            TokenWidth::U16 => ids
                .iter()
                .for_each(|&id| bytes.extend_from_slice(&(id as u16).to_le_bytes())),
            TokenWidth::U32 => ids
                .iter()
                .for_each(|&id| bytes.extend_from_slice(&id.to_le_bytes())),
        }
        self.out
            .write_all(bytes)
            .map_err(|source| ShardFileError::Io {
                path: self.tmp.clone(),
                source,
            })?;
        self.tokens += ids.len() as u64;
        self.documents += 1;
        Ok(())
    }

    /// Writes the header, syncs and renames the shard into place.
    pub fn finish(self) -> Result<PathBuf, ShardFileError> {
        let io = |source| ShardFileError::Io {
            path: self.tmp.clone(),
            source,
        };
        let mut file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        let mut header = Vec::with_capacity(HEADER_BYTES);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&(self.width.bytes() as u32).to_le_bytes());
        header.extend_from_slice(&self.tokens.to_le_bytes());
        header.extend_from_slice(&self.documents.to_le_bytes());
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.tmp, &self.path).map_err(|source| ShardFileError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.path)
    }
}

/// A memory-mapped shard.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
    pub width: TokenWidth,
    pub tokens: usize,
    pub documents: usize,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self, ShardFileError> {
        let bad = |reason: String| ShardFileError::Bad {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|source| ShardFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: shards are never modified after the rename that publishes them.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| ShardFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if map.len() < HEADER_BYTES || &map[..8] != MAGIC {
            return Err(bad(format!(
                "expected the {HEADER_BYTES}-byte header starting with `PHIGTOKS`"
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(ShardFileError::Version {
                path: path.to_path_buf(),
                expected: FORMAT_VERSION,
                found: version,
            });
        }
        let width = match u32_at(12) {
            2 => TokenWidth::U16,
            4 => TokenWidth::U32,
            other => return Err(bad(format!("token width {other} bytes; expected 2 or 4"))),
        };
        let (tokens, documents) = (u64_at(16) as usize, u64_at(24) as usize);
        let expected = HEADER_BYTES + tokens * width.bytes();
        if map.len() != expected {
            return Err(bad(format!(
                "header says {tokens} tokens ({expected} bytes in all), the file has {} bytes (truncated or damaged)",
                map.len()
            )));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            width,
            tokens,
            documents,
        })
    }

    /// Tokens `start .. start + len` (clamped to the shard).
    pub fn slice(&self, start: usize, len: usize) -> Vec<u32> {
        let end = start.saturating_add(len).min(self.tokens);
        let start = start.min(end);
        let w = self.width.bytes();
        let bytes = &self.map[HEADER_BYTES + start * w..HEADER_BYTES + end * w];
        match self.width {
            TokenWidth::U16 => bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect(),
            TokenWidth::U32 => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        for (width, ids) in [
            (TokenWidth::U16, vec![0u32, 1, 65_535, 7]),
            (TokenWidth::U32, vec![0, 100_276, 199_998]),
        ] {
            let path = dir.path().join("s.bin");
            let mut w = ShardWriter::create(&path, width).unwrap();
            w.push_document(&ids[..2]).unwrap();
            w.push_document(&ids[2..]).unwrap();
            w.finish().unwrap();
            let s = Shard::open(&path).unwrap();
            assert_eq!((s.tokens, s.documents, s.width), (ids.len(), 2, width));
            assert_eq!(s.slice(0, 100), ids);
            assert_eq!(s.slice(1, 2), ids[1..3]);
            // The file is exactly header + tokens, little-endian: the first token's bytes sit at 32.
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len(), 32 + ids.len() * width.bytes());
        }
        let path = dir.path().join("s.bin");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Shard::open(&path)
            .err()
            .unwrap()
            .to_string()
            .contains("truncated"));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        std::fs::write(&path, &v2).unwrap();
        let err = Shard::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("version 2") && err.contains("version 1"),
            "{err}"
        );
    }
}

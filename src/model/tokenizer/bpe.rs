//! Byte-pair encoding of pre-tokenized pieces with a tiktoken rank table: the same merges as
//! tiktoken's `byte_pair_merge` (the lowest-ranked adjacent pair first, the leftmost on a tie),
//! over a rank table built for lookups of short byte strings (no string hashing, no memcmp call
//! for tokens of up to 8 bytes).

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use foldhash::HashMap;

use tiktoken_rs::CoreBPE;

use super::pretokenize::{self, Pattern};

/// Token bytes → rank (= id), open addressing with linear probing.
pub struct RankTable {
    slots: Vec<Slot>,
    mask: usize,
    /// 64 − log2(slots): a slot index is the hash's top bits, its best mixed ones.
    shift: u32,
    /// The bytes of tokens longer than 8 bytes, which `Slot::rest` points into.
    long: Vec<u8>,
}

/// 16 bytes, four to a cache line.
#[derive(Clone, Copy, Default)]
struct Slot {
    /// The token's first (up to) 8 bytes, little-endian, zero-padded.
    head: u64,
    rank: u32,
    /// Byte length in the low 8 bits (0 marks an empty slot), and above them where the bytes
    /// after the first 8 lie in `RankTable::long`.
    len_rest: u32,
}

impl Slot {
    fn len(self) -> usize {
        (self.len_rest & 0xFF) as usize
    }

    fn rest(self) -> usize {
        (self.len_rest >> 8) as usize
    }
}

/// The first (up to) 8 bytes of `bytes` as a little-endian word, zero-padded. Short keys are
/// read as two overlapping loads (the overlap holds the same bytes, so OR is exact) instead of
/// a copy into a buffer, which would stall the load that follows it.
#[inline]
fn head(bytes: &[u8]) -> u64 {
    let n = bytes.len();
    let word = |at: usize| u64::from(u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4")));
    let half = |at: usize| u64::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
    match n {
        8.. => u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
        4..=7 => word(0) | (word(n - 4) << ((n - 4) * 8)),
        2..=3 => half(0) | (half(n - 2) << ((n - 2) * 8)),
        1 => u64::from(bytes[0]),
        0 => 0,
    }
}

#[inline]
fn hash(head: u64, bytes: &[u8]) -> u64 {
    let mut h = head ^ (bytes.len() as u64).rotate_right(8);
    if bytes.len() > 8 {
        for chunk in bytes[8..].chunks(8) {
            h = (h ^ (h >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self::head(chunk);
        }
    }
    // A multiply carries every byte into the top bits, which pick the slot.
    (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

impl RankTable {
    /// Every ordinary token of `bpe` (its ids are its ranks) below id `n_vocab`; special tokens
    /// (`<|endoftext|>`, …) are left out, as `encode_ordinary` never makes them.
    pub fn from_core(bpe: &CoreBPE, n_vocab: u32) -> RankTable {
        let special = bpe.special_tokens();
        let capacity = (n_vocab as usize * 2).next_power_of_two();
        let mut table = RankTable {
            slots: vec![Slot::default(); capacity],
            mask: capacity - 1,
            shift: 64 - capacity.trailing_zeros(),
            long: Vec::new(),
        };
        // One token at a time, each buffer freed before the next is made: the allocator hands
        // back the same memory instead of faulting in fresh pages for all of them.
        for id in 0..n_vocab {
            let Ok(bytes) = bpe.decode_bytes(&[id]) else {
                continue;
            };
            if !std::str::from_utf8(&bytes).is_ok_and(|text| special.contains(text)) {
                table.insert(&bytes, id);
            }
        }
        table
    }

    fn insert(&mut self, bytes: &[u8], rank: u32) {
        let h = head(bytes);
        let mut i = (hash(h, bytes) >> self.shift) as usize;
        while self.slots[i].len() != 0 {
            i = (i + 1) & self.mask;
        }
        let rest = self.long.len();
        if bytes.len() > 8 {
            self.long.extend_from_slice(&bytes[8..]);
        }
        assert!(
            (1..256).contains(&bytes.len()) && rest < 1 << 24,
            "tiktoken tokens are 1 to 255 bytes, their tails fit 16 MiB"
        );
        self.slots[i] = Slot {
            head: h,
            rank,
            len_rest: (rest << 8) as u32 | bytes.len() as u32,
        };
    }

    /// The rank of `bytes`, if it is a token.
    #[inline]
    pub fn get(&self, bytes: &[u8]) -> Option<u32> {
        let h = head(bytes);
        let mut i = (hash(h, bytes) >> self.shift) as usize;
        loop {
            let slot = self.slots[i];
            if slot.len() == 0 {
                return None;
            }
            if slot.head == h && slot.len() == bytes.len() {
                let rest = slot.rest();
                if bytes.len() <= 8 || self.long[rest..rest + bytes.len() - 8] == bytes[8..] {
                    return Some(slot.rank);
                }
            }
            i = (i + 1) & self.mask;
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Per thread, reused across calls: encoding then allocates only its exact-size result (growing
/// a fresh vector per document cost more in page faults than the encoding itself).
#[derive(Default)]
struct Scratch {
    /// The ids being made.
    ids: Vec<u32>,
    /// The merge's parts.
    parts: Vec<(usize, u32)>,
    merged: MergeCache,
}

/// The ids of pieces that needed merges, for the encoder last used on this thread: code repeats
/// a few thousand such pieces (indentation after a line break, long identifiers) a great many
/// times, and a lookup here costs less than the merge.
#[derive(Default)]
struct MergeCache {
    /// [`Encoder::id`] of the encoder these merges are of (0: none yet).
    encoder: usize,
    spans: HashMap<Box<[u8]>, (u32, u32)>,
    ids: Vec<u32>,
}

impl MergeCache {
    /// Pieces longer than this are merged every time (rare, and they would bloat the cache).
    const MAX_PIECE: usize = 128;
    const MAX_PIECES: usize = 1 << 16;
    const MAX_IDS: usize = 1 << 20;

    /// Empties the cache when it holds another encoder's merges.
    fn serve(&mut self, encoder: &Encoder) {
        if self.encoder != encoder.id {
            self.clear();
            self.encoder = encoder.id;
        }
    }

    fn clear(&mut self) {
        self.spans.clear();
        self.ids.clear();
    }

    fn get(&self, piece: &[u8]) -> Option<&[u32]> {
        let &(start, len) = self.spans.get(piece)?;
        Some(&self.ids[start as usize..(start + len) as usize])
    }

    fn insert(&mut self, piece: &[u8], ids: &[u32]) {
        if piece.len() > Self::MAX_PIECE {
            return;
        }
        if self.spans.len() >= Self::MAX_PIECES || self.ids.len() + ids.len() > Self::MAX_IDS {
            self.clear();
        }
        let start = self.ids.len() as u32;
        self.ids.extend_from_slice(ids);
        self.spans.insert(piece.into(), (start, ids.len() as u32));
    }
}

/// Drops a scratch vector grown past 16 MiB (a huge document's), so a thread does not keep it.
fn release_if_huge(ids: &mut Vec<u32>) {
    if ids.capacity() > 1 << 22 {
        *ids = Vec::new();
    }
}

/// An encoding's pre-tokenizer and ranks: `encode_ordinary` as tiktoken's.
pub struct Encoder {
    pattern: Pattern,
    ranks: RankTable,
    /// Tells encoders apart for the per-thread [`MergeCache`]; unique in the process, from 1.
    id: usize,
}

impl Encoder {
    pub fn new(pattern: Pattern, ranks: RankTable) -> Encoder {
        static NEXT_ID: AtomicUsize = AtomicUsize::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Encoder { pattern, ranks, id }
    }

    /// The ids of `text` (special tokens in it are plain text), in a vector with room for
    /// `room` more.
    pub fn encode(&self, text: &str, room: usize) -> Vec<u32> {
        SCRATCH.with_borrow_mut(|scratch| {
            self.encode_into(text, scratch);
            let mut out = Vec::with_capacity(scratch.ids.len() + room);
            out.extend_from_slice(&scratch.ids);
            release_if_huge(&mut scratch.ids);
            out
        })
    }

    /// The number of ids of `text`, without keeping them.
    pub fn count(&self, text: &str) -> usize {
        SCRATCH.with_borrow_mut(|scratch| {
            self.encode_into(text, scratch);
            let count = scratch.ids.len();
            release_if_huge(&mut scratch.ids);
            count
        })
    }

    /// Leaves the ids of `text` in `scratch.ids`.
    fn encode_into(&self, text: &str, scratch: &mut Scratch) {
        let Scratch { ids, parts, merged } = scratch;
        ids.clear();
        merged.serve(self);
        for piece in pretokenize::pieces(self.pattern, text) {
            let bytes = piece.as_bytes();
            if let Some(rank) = self.ranks.get(bytes) {
                ids.push(rank);
            } else if let Some(known) = merged.get(bytes) {
                ids.extend_from_slice(known);
            } else {
                let start = ids.len();
                self.merge(bytes, parts, ids);
                merged.insert(bytes, &ids[start..]);
            }
        }
    }

    /// The rank of `piece[parts[i].0..parts[i + 2].0]`: the pair starting at part `i`.
    #[inline]
    fn pair_rank(&self, piece: &[u8], parts: &[(usize, u32)], i: usize) -> u32 {
        match parts.get(i + 2) {
            Some(&(end, _)) => self.ranks.get(&piece[parts[i].0..end]).unwrap_or(u32::MAX),
            None => u32::MAX,
        }
    }

    /// tiktoken's `byte_pair_merge` of a piece that is not one token: `parts` holds each part's
    /// start and the rank of the pair it starts (`u32::MAX`: none), plus an end marker.
    fn merge(&self, piece: &[u8], parts: &mut Vec<(usize, u32)>, out: &mut Vec<u32>) {
        parts.clear();
        parts.extend((0..=piece.len()).map(|start| (start, u32::MAX)));
        for i in 0..piece.len().saturating_sub(1) {
            parts[i].1 = self.pair_rank(piece, parts, i);
        }
        loop {
            let mut min = (u32::MAX, 0);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min.0 {
                    min = (rank, i);
                }
            }
            if min.0 == u32::MAX {
                break;
            }
            let i = min.1;
            parts.remove(i + 1);
            parts[i].1 = self.pair_rank(piece, parts, i);
            if i > 0 {
                parts[i - 1].1 = self.pair_rank(piece, parts, i - 1);
            }
        }
        for w in parts.windows(2) {
            let token = &piece[w[0].0..w[1].0];
            // Every single byte is a token of the tiktoken encodings, and merges only make tokens.
            out.push(self.ranks.get(token).expect("a merged part is a token"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every ordinary gpt2 token is found with its id (= rank, as tiktoken-rs decodes it), and
    /// `<|endoftext|>` (special: never made by `encode_ordinary`) and non-tokens are not.
    #[test]
    fn the_rank_table_holds_exactly_the_ordinary_tokens() {
        let bpe = tiktoken_rs::r50k_base_singleton();
        let table = RankTable::from_core(bpe, 50_257);
        for id in 0..50_256 {
            let bytes = bpe.decode_bytes(&[id]).expect("an ordinary gpt2 id");
            assert_eq!(table.get(&bytes), Some(id), "{bytes:?}");
        }
        assert_eq!(table.get(b"<|endoftext|>"), None);
        assert_eq!(table.get(b"zzzzqqqqxxxxjjjj"), None);
        assert_eq!(table.get(b""), None);
    }
}

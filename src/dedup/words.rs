//! Words and punctuation of a text, as dedup and decontamination split it.
//!
//! A word is a maximal run of ASCII letters, digits, `_` and non-ASCII bytes (so every byte of a
//! non-ASCII character); with punctuation asked for, every other byte that is not ASCII whitespace
//! is a token of its own. Bytes are classified eight at a time (SWAR: range tests on a `u64`) into
//! one bit per byte, and tokens are read off those bit masks with `trailing_zeros`/`trailing_ones`,
//! so the loop turns once per token instead of branching on every byte.

use xxhash_rust::xxh3::xxh3_64;

/// One token: a word (and whether it has ASCII capitals) or one punctuation byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Word { capitals: bool },
    Punctuation,
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Per byte of `x` (every byte below 0x80): 0x80 where the byte lies in `lo..=hi`, else 0.
/// No byte's sum carries into the next: `x + 0x80 − lo` and `x + 0x7f − hi` stay below 0x100.
#[inline(always)]
fn in_range(x: u64, lo: u8, hi: u8) -> u64 {
    let at_least_lo = x + ONES * u64::from(0x80 - lo);
    let above_hi = x + ONES * u64::from(0x7f - hi);
    at_least_lo & !above_hi & HIGH
}

/// The top bit of each byte of `m` (the rest zero) gathered into one bit per byte, byte 0 lowest.
#[inline(always)]
fn gather(m: u64) -> u64 {
    ((m >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
}

/// Bit masks (bit i = byte i) of up to 64 bytes: word bytes, ASCII capitals, and punctuation
/// (neither word nor ASCII whitespace). Missing bytes count as whitespace.
#[inline(always)]
fn masks(block: &[u8]) -> (u64, u64, u64) {
    let mut padded = [b' '; 64];
    let bytes: &[u8; 64] = match block.try_into() {
        Ok(full) => full,
        Err(_) => {
            padded[..block.len()].copy_from_slice(block);
            &padded
        }
    };
    let (mut word, mut upper, mut punct) = (0u64, 0u64, 0u64);
    for (k, lane) in bytes.chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(lane.try_into().expect("8 bytes"));
        let high = v & HIGH; // non-ASCII bytes: word bytes
        let x = v & !HIGH;
        let capital = in_range(x, b'A', b'Z') & !high;
        let w = high
            | capital
            | in_range(x, b'a', b'z')
            | in_range(x, b'0', b'9')
            | in_range(x, b'_', b'_');
        let space =
            (in_range(x, b' ', b' ') | in_range(x, b'\t', b'\n') | in_range(x, 0x0c, b'\r'))
                & !high;
        word |= gather(w & HIGH) << (8 * k);
        upper |= gather(capital) << (8 * k);
        punct |= gather(!(w | space) & HIGH) << (8 * k);
    }
    (word, upper, punct)
}

/// Bits `from..to` set (`from < 64`, `to ≤ 64`).
fn bits(from: u32, to: u32) -> u64 {
    let below_to = if to >= 64 { u64::MAX } else { (1u64 << to) - 1 };
    below_to & (u64::MAX << from)
}

/// Calls `each(start, end, piece)` for every word (and, when `punctuation`, every punctuation
/// byte) of `text`, in order; `start..end` is the token's byte range.
pub fn each_piece(text: &[u8], punctuation: bool, mut each: impl FnMut(usize, usize, Piece)) {
    // A word still open at the end of a block: its start and whether it had capitals so far.
    let mut open: Option<(usize, bool)> = None;
    for (b, block) in text.chunks(64).enumerate() {
        let base = 64 * b;
        let (word, upper, punct) = masks(block);
        let tokens = if punctuation { word | punct } else { word };
        let mut pos = 0u32;
        loop {
            if let Some((start, capitals)) = open {
                let end = pos + (word >> pos).trailing_ones();
                let capitals = capitals || upper & bits(pos, end) != 0;
                if end == 64 {
                    open = Some((start, capitals));
                    break;
                }
                each(start, base + end as usize, Piece::Word { capitals });
                open = None;
                pos = end;
            }
            if pos >= 64 || tokens >> pos == 0 {
                break;
            }
            let p = pos + (tokens >> pos).trailing_zeros();
            if word >> p & 1 == 1 {
                open = Some((base + p as usize, false));
                pos = p;
            } else {
                each(base + p as usize, base + p as usize + 1, Piece::Punctuation);
                pos = p + 1;
            }
        }
    }
    if let Some((start, capitals)) = open {
        each(start, text.len(), Piece::Word { capitals });
    }
}

/// The 64-bit hash of a word, ASCII-lowercased when it has capitals.
pub fn word_hash(word: &[u8], capitals: bool) -> u64 {
    if !capitals {
        return xxh3_64(word);
    }
    let mut buf = [0u8; 64];
    match buf.get_mut(..word.len()) {
        Some(lower) => {
            lower.copy_from_slice(word);
            lower.make_ascii_lowercase();
            xxh3_64(lower)
        }
        None => xxh3_64(&word.to_ascii_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The definition, one byte at a time (the module documentation, written out).
    fn reference(text: &[u8], punctuation: bool) -> Vec<(usize, usize, Piece)> {
        let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
        let mut out = Vec::new();
        let mut i = 0;
        while i < text.len() {
            let start = i;
            if is_word(text[i]) {
                while i < text.len() && is_word(text[i]) {
                    i += 1;
                }
                let capitals = text[start..i].iter().any(u8::is_ascii_uppercase);
                out.push((start, i, Piece::Word { capitals }));
            } else {
                i += 1;
                if punctuation && !text[start].is_ascii_whitespace() {
                    out.push((start, i, Piece::Punctuation));
                }
            }
        }
        out
    }

    fn pieces(text: &[u8], punctuation: bool) -> Vec<(usize, usize, Piece)> {
        let mut out = Vec::new();
        each_piece(text, punctuation, |s, e, p| out.push((s, e, p)));
        out
    }

    /// Every byte value, words across 64-byte block edges, words filling whole blocks, and random
    /// texts over an alphabet rich in boundaries agree with the byte-at-a-time definition.
    #[test]
    fn pieces_match_the_byte_at_a_time_definition() {
        let every_byte: Vec<u8> = (0..=255u8).flat_map(|b| [b, b'a', b]).collect();
        let long_word = "x".repeat(64 * 3 + 5);
        let mut texts: Vec<Vec<u8>> = vec![
            every_byte,
            Vec::new(),
            long_word.clone().into_bytes(),
            format!("{}Ab c", "y".repeat(62)).into_bytes(),
            format!("{long_word}, ÉtÉ {long_word}").into_bytes(),
            "\x0b\x0c\r\n\t x\u{a0}y".as_bytes().to_vec(),
        ];
        let alphabet = b"aZ_9 \n\t,.({\x0b\x00\xc3\xa9\x7f@[`";
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for len in [1, 7, 63, 64, 65, 127, 128, 200, 1000] {
            for _ in 0..20 {
                texts.push(
                    (0..len)
                        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                        .collect(),
                );
            }
        }
        for text in &texts {
            for punctuation in [false, true] {
                assert_eq!(
                    pieces(text, punctuation),
                    reference(text, punctuation),
                    "{:?}",
                    String::from_utf8_lossy(text)
                );
            }
        }
    }

    #[test]
    fn word_hashes_ignore_ascii_case_only() {
        assert_eq!(word_hash(b"Hello", true), xxh3_64(b"hello"));
        let long = "Q".repeat(100);
        assert_eq!(
            word_hash(long.as_bytes(), true),
            xxh3_64("q".repeat(100).as_bytes())
        );
        assert_ne!(word_hash("É".as_bytes(), true), xxh3_64("é".as_bytes()));
    }
}

//! The pre-tokenizers of the tiktoken encodings, hand-written: each splits text into exactly the
//! pieces its regex (below, as tiktoken-rs and Python tiktoken write it) finds with `find_iter`,
//! leftmost-first with backtracking, without running a regex engine. Characters are classified
//! with regex-syntax's own Unicode tables ([`super::unicode_classes`]), so `\p{L}`, `\p{N}`, `\s`
//! and o200k's case classes mean here what they mean there. The tests compare every piece with
//! tiktoken-rs on adversarial and random text.

use super::unicode_classes::{ASCII, BMP_BLOCKS, BMP_BLOCK_OF, RUN_CLASSES, RUN_STARTS};

/// `\p{L}`.
const LETTER: u8 = 1;
/// `\p{N}`.
const NUMBER: u8 = 2;
/// `\s` (Unicode White_Space).
const SPACE: u8 = 4;
/// o200k's `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`.
const UPPER_SIDE: u8 = 8;
/// o200k's `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`.
const LOWER_SIDE: u8 = 16;

/// Which regex splits the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// gpt2 (r50k_base) and p50k_base:
    /// `'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s`
    R50k,
    /// cl100k_base: `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|
    /// ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s`
    Cl100k,
    /// o200k_base: `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
    /// [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
    /// \p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    O200k,
}

/// The pieces of `text`, in order; together they are `text`.
pub fn pieces(pattern: Pattern, text: &str) -> Pieces<'_> {
    Pieces {
        pattern,
        text,
        at: 0,
    }
}

pub struct Pieces<'a> {
    pattern: Pattern,
    text: &'a str,
    at: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        if self.at >= self.text.len() {
            return None;
        }
        let s = Text(self.text.as_bytes());
        let end = match self.pattern {
            Pattern::R50k => s.r50k(self.at),
            Pattern::Cl100k => s.cl100k(self.at),
            Pattern::O200k => s.o200k(self.at),
        };
        debug_assert!(end > self.at && self.text.is_char_boundary(end));
        let piece = &self.text[self.at..end];
        self.at = end;
        Some(piece)
    }
}

/// The class bits of `c`.
#[inline]
fn class(c: u32) -> u8 {
    if c < 0x80 {
        return ASCII[c as usize];
    }
    if c < 0x1_0000 {
        let block = BMP_BLOCK_OF[c as usize >> 7] as usize;
        return BMP_BLOCKS[(block << 7) | (c as usize & 0x7F)];
    }
    // The last run starting at or before `c` (RUN_STARTS[0] is 0x80).
    let run = RUN_STARTS.partition_point(|&start| start <= c) - 1;
    RUN_CLASSES[run]
}

/// Neither letter, number nor space: what `[^\s\p{L}\p{N}]` matches.
#[inline]
fn is_other(class: u8) -> bool {
    class & (LETTER | NUMBER | SPACE) == 0
}

/// UTF-8 text as bytes; positions are byte offsets on character boundaries.
#[derive(Clone, Copy)]
struct Text<'a>(&'a [u8]);

impl Text<'_> {
    fn len(self) -> usize {
        self.0.len()
    }

    /// The character at `i` (which must be < len) and its length in bytes.
    #[inline]
    fn char_at(self, i: usize) -> (u32, usize) {
        let b = self.0;
        let b0 = b[i] as u32;
        if b0 < 0x80 {
            (b0, 1)
        } else if b0 < 0xE0 {
            (((b0 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
        } else if b0 < 0xF0 {
            let c =
                ((b0 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F);
            (c, 3)
        } else {
            let c = ((b0 & 0x07) << 18)
                | ((b[i + 1] as u32 & 0x3F) << 12)
                | ((b[i + 2] as u32 & 0x3F) << 6)
                | (b[i + 3] as u32 & 0x3F);
            (c, 4)
        }
    }

    /// The class of the character at `i`, or `None` at the end.
    #[inline]
    fn class_at(self, i: usize) -> Option<u8> {
        (i < self.len()).then(|| class(self.char_at(i).0))
    }

    /// The end of the run of characters from `i` whose class `keep` accepts.
    #[inline]
    fn run(self, mut i: usize, keep: impl Fn(u8) -> bool) -> usize {
        while i < self.len() {
            let b = self.0[i];
            if b < 0x80 {
                if !keep(ASCII[b as usize]) {
                    break;
                }
                i += 1;
            } else {
                let (c, n) = self.char_at(i);
                if !keep(class(c)) {
                    break;
                }
                i += n;
            }
        }
        i
    }

    /// Up to three `\p{N}` from `i`.
    fn digits(self, mut i: usize) -> usize {
        for _ in 0..3 {
            match self.class_at(i) {
                Some(k) if k & NUMBER != 0 => i += self.char_at(i).1,
                _ => break,
            }
        }
        i
    }

    /// The end of the run of bytes in `set` from `i` (ASCII bytes only).
    fn bytes_in(self, mut i: usize, set: &[u8]) -> usize {
        while i < self.len() && set.contains(&self.0[i]) {
            i += 1;
        }
        i
    }

    /// Whether the character at `i` is ASCII `lower` or its other case; `'s'` also accepts `ſ`
    /// (U+017F), which Unicode simple case folding maps to `s`, as `(?i:s)` does.
    #[inline]
    fn is_ci(self, i: usize, lower: u8) -> Option<usize> {
        let b = *self.0.get(i)?;
        if b.to_ascii_lowercase() == lower {
            return Some(i + 1);
        }
        (lower == b's' && self.0[i..].starts_with("ſ".as_bytes())).then_some(i + 2)
    }

    /// `(?:[sdmt]|ll|ve|re)` after an apostrophe at `i - 1`, case-insensitive or not.
    fn contraction(self, i: usize, case_insensitive: bool) -> Option<usize> {
        let is = |at: usize, lower: u8| {
            if case_insensitive {
                self.is_ci(at, lower)
            } else {
                (self.0.get(at) == Some(&lower)).then_some(at + 1)
            }
        };
        for one in *b"sdmt" {
            if let Some(end) = is(i, one) {
                return Some(end);
            }
        }
        for [a, b] in [*b"ll", *b"ve", *b"re"] {
            if let Some(end) = is(i, a).and_then(|j| is(j, b)) {
                return Some(end);
            }
        }
        None
    }

    /// o200k's `(?i:'s|'t|'re|'ve|'m|'ll|'d)?` at `i`: the end of the contraction, or `i`.
    fn o200k_suffix(self, i: usize) -> usize {
        if self.0.get(i) != Some(&b'\'') {
            return i;
        }
        let is = |at: usize, lower: u8| self.is_ci(at, lower);
        for one in *b"st" {
            if let Some(end) = is(i + 1, one) {
                return end;
            }
        }
        for [a, b] in [*b"re", *b"ve"] {
            if let Some(end) = is(i + 1, a).and_then(|j| is(j, b)) {
                return end;
            }
        }
        if let Some(end) = is(i + 1, b'm') {
            return end;
        }
        if let Some(end) = is(i + 1, b'l').and_then(|j| is(j, b'l')) {
            return end;
        }
        is(i + 1, b'd').unwrap_or(i)
    }

    /// How a run of whitespace from `i` ends a piece, in the three patterns' shared tail:
    /// `\s++$` (to the end, where `to_end_first`), else `\s*[\r\n]` (through the run's last line
    /// break, where `line_break`), else `\s+(?!\S)` (all but the run's last character), else one
    /// character (`\s` / `\s+`).
    fn whitespace(self, i: usize, to_end_first: bool, line_break: bool) -> usize {
        let mut j = i;
        let mut last_start = i;
        let mut after_break = None;
        while j < self.len() {
            let (c, n) = self.char_at(j);
            if class(c) & SPACE == 0 {
                break;
            }
            if c == u32::from(b'\r') || c == u32::from(b'\n') {
                after_break = Some(j + n);
            }
            last_start = j;
            j += n;
        }
        if to_end_first && j == self.len() {
            return j;
        }
        if let (true, Some(end)) = (line_break, after_break) {
            return end;
        }
        if j == self.len() {
            return j;
        }
        if last_start > i {
            return last_start;
        }
        j
    }

    fn r50k(self, i: usize) -> usize {
        let (c, n) = self.char_at(i);
        if c == u32::from(b'\'') {
            if let Some(end) = self.contraction(i + n, false) {
                return end;
            }
        }
        // ` ?\p{L}++`, ` ?\p{N}++`, ` ?[^\s\p{L}\p{N}]++`: the optional space, then a run of the
        // next character's kind.
        let mut start = i;
        let mut k = class(c);
        if c == u32::from(b' ') {
            if let Some(next) = self.class_at(i + 1) {
                if next & SPACE == 0 {
                    start = i + 1;
                    k = next;
                }
            }
        }
        if k & LETTER != 0 {
            self.run(start, |x| x & LETTER != 0)
        } else if k & NUMBER != 0 {
            self.run(start, |x| x & NUMBER != 0)
        } else if k & SPACE == 0 {
            self.run(start, is_other)
        } else {
            self.whitespace(i, true, false)
        }
    }

    fn cl100k(self, i: usize) -> usize {
        let (c, n) = self.char_at(i);
        let k = class(c);
        if c == u32::from(b'\'') {
            if let Some(end) = self.contraction(i + n, true) {
                return end;
            }
        }
        // `[^\r\n\p{L}\p{N}]?+\p{L}++`
        if k & LETTER != 0 {
            return self.run(i + n, |x| x & LETTER != 0);
        }
        let line_break = c == u32::from(b'\r') || c == u32::from(b'\n');
        let next = self.class_at(i + n);
        if k & NUMBER == 0 && !line_break && next.is_some_and(|x| x & LETTER != 0) {
            return self.run(i + n, |x| x & LETTER != 0);
        }
        // `\p{N}{1,3}+`
        if k & NUMBER != 0 {
            return self.digits(i);
        }
        // ` ?[^\s\p{L}\p{N}]++[\r\n]*+`
        let others_from = if is_other(k) {
            Some(i)
        } else if c == u32::from(b' ') && next.is_some_and(is_other) {
            Some(i + 1)
        } else {
            None
        };
        if let Some(start) = others_from {
            let end = self.run(start, is_other);
            return self.bytes_in(end, b"\r\n");
        }
        self.whitespace(i, true, true)
    }

    fn o200k(self, i: usize) -> usize {
        let (c, n) = self.char_at(i);
        let k = class(c);
        // The optional `[^\r\n\p{L}\p{N}]` first taken, then left out, as backtracking tries them.
        let can_prefix =
            k & (LETTER | NUMBER) == 0 && c != u32::from(b'\r') && c != u32::from(b'\n');
        let starts = if can_prefix {
            [Some(i + n), Some(i)]
        } else {
            [Some(i), None]
        };
        // `[upper]*[lower]+`: the upper run is greedy, then gives back characters until a lower
        // one follows; the lower run is then greedy.
        for s in starts.into_iter().flatten() {
            let mut j = s;
            let mut last_lower_end = None;
            while j < self.len() {
                let (c, n) = self.char_at(j);
                let x = class(c);
                if x & UPPER_SIDE == 0 {
                    break;
                }
                if x & LOWER_SIDE != 0 {
                    last_lower_end = Some(j + n);
                }
                j += n;
            }
            if self.class_at(j).is_some_and(|x| x & LOWER_SIDE != 0) {
                return self.o200k_suffix(self.run(j, |x| x & LOWER_SIDE != 0));
            }
            if let Some(end) = last_lower_end {
                return self.o200k_suffix(end);
            }
        }
        // `[upper]+[lower]*`
        for s in starts.into_iter().flatten() {
            let j = self.run(s, |x| x & UPPER_SIDE != 0);
            if j > s {
                return self.o200k_suffix(self.run(j, |x| x & LOWER_SIDE != 0));
            }
        }
        // `\p{N}{1,3}`
        if k & NUMBER != 0 {
            return self.digits(i);
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
        let others_from = if is_other(k) {
            Some(i)
        } else if c == u32::from(b' ') && self.class_at(i + 1).is_some_and(is_other) {
            Some(i + 1)
        } else {
            None
        };
        if let Some(start) = others_from {
            let end = self.run(start, is_other);
            return self.bytes_in(end, b"\r\n/");
        }
        // `\s*[\r\n]+`, `\s+(?!\S)`, `\s+`
        self.whitespace(i, false, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The BMP block table and the runs are two encodings of the same generated classes: every
    /// BMP character must get the same class from both (the runs are what the oracle tests of
    /// astral characters go through).
    #[test]
    fn the_bmp_blocks_agree_with_the_runs() {
        for c in 0x80..0x1_0000u32 {
            let run = RUN_STARTS.partition_point(|&start| start <= c) - 1;
            assert_eq!(class(c), RUN_CLASSES[run], "U+{c:04X}");
        }
        // Spot checks against the Unicode categories: 'é' Ll, 'Σ' Lu, '٣' Nd, U+3000 space,
        // U+0301 a mark (o200k's both sides, not \p{L}), U+FFFD a symbol (none of them).
        assert_eq!(class(0xE9), LETTER | LOWER_SIDE);
        assert_eq!(class(0x3A3), LETTER | UPPER_SIDE);
        assert_eq!(class(0x663), NUMBER);
        assert_eq!(class(0x3000), SPACE);
        assert_eq!(class(0x301), UPPER_SIDE | LOWER_SIDE);
        assert_eq!(class(0xFFFD), 0);
    }
}

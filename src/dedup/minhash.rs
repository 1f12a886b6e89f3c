//! Shingles, MinHash signatures and LSH band keys.
//!
//! A document's shingles are its word n-grams (words: maximal runs of ASCII letters, digits, `_`
//! and non-ASCII bytes, ASCII-lowercased) or, for code, its byte n-grams after whitespace runs are
//! collapsed. Each shingle is hashed once to 64 bits (xxh3); permutation `i` maps a hash `x` to
//! `aᵢ·x + bᵢ mod 2⁶⁴` (`aᵢ` odd, so a bijection; `aᵢ, bᵢ` from the seed), and the signature keeps
//! each permutation's minimum. Band `j` is keyed by the xxh3 of its `rows` minima, so two documents
//! share a band key with probability `J^rows` and become candidates with `1 − (1 − J^rows)^bands`.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64, xxh3_64_with_seed};

use super::words::{self, Piece};

/// What a shingle is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shingles {
    /// Word n-grams (datatrove's default: 5).
    Words(usize),
    /// Byte n-grams of the whitespace-collapsed text (for code).
    Chars(usize),
}

/// The MinHash-LSH settings; a signature file or an index is only reused under equal settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    pub shingles: Shingles,
    pub bands: usize,
    pub rows: usize,
    pub seed: u64,
}

impl Default for Params {
    /// datatrove's MinhashConfig: 5-gram words, 14 bands × 8 rows, 64-bit hashes.
    fn default() -> Self {
        Params {
            shingles: Shingles::Words(5),
            bands: 14,
            rows: 8,
            seed: 1,
        }
    }
}

impl Params {
    pub fn num_perm(&self) -> usize {
        self.bands * self.rows
    }
}

/// The seeded permutations of one [`Params`].
pub struct MinHasher {
    params: Params,
    a: Vec<u64>,
    b: Vec<u64>,
}

thread_local! {
    // Per-thread scratch buffers: a document's word and shingle hashes (no page faults per document).
    static WORDS: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
    static SHINGLES: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
    static NORMALISED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Calls `each` with the 64-bit hash of every word of `text` (ASCII-lowercased).
pub fn word_hashes(text: &str, mut each: impl FnMut(u64)) {
    let bytes = text.as_bytes();
    words::each_piece(bytes, false, |start, end, piece| {
        let capitals = piece == (Piece::Word { capitals: true });
        each(words::word_hash(&bytes[start..end], capitals));
    });
}

/// The hash of each window of `n` word or token hashes, with the window's start: a polynomial rolling
/// hash (one multiply-add per step), finished with murmur3's 64-bit mixer.
pub fn window_hashes(hashes: &[u64], n: usize) -> impl Iterator<Item = (usize, u64)> + '_ {
    const P: u64 = 0x9e37_79b9_7f4a_7c15;
    let top = (1..n).fold(1u64, |acc, _| acc.wrapping_mul(P)); // P^(n-1)
    let mut rolling = hashes
        .iter()
        .take(n.saturating_sub(1))
        .fold(0u64, |acc, &h| acc.wrapping_mul(P).wrapping_add(h));
    // No windows of zero tokens, nor of more tokens than there are.
    let count = if n == 0 {
        0
    } else {
        (hashes.len() + 1).saturating_sub(n)
    };
    (0..count).map(move |s| {
        rolling = rolling.wrapping_mul(P).wrapping_add(hashes[s + n - 1]);
        let mut h = rolling ^ n as u64;
        rolling = rolling.wrapping_sub(hashes[s].wrapping_mul(top));
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        (s, h ^ (h >> 33))
    })
}

impl MinHasher {
    pub fn new(params: Params) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(params.seed);
        let n = params.num_perm();
        let a = (0..n).map(|_| rng.random::<u64>() | 1).collect();
        let b = (0..n).map(|_| rng.random::<u64>()).collect();
        MinHasher { params, a, b }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Calls `each` with the hash of every shingle of `text` (repeats included). A text shorter
    /// than one shingle is one shingle; an empty text has none.
    pub fn shingle_hashes(&self, text: &str, mut each: impl FnMut(u64)) {
        match self.params.shingles {
            Shingles::Words(n) => WORDS.with_borrow_mut(|words| {
                words.clear();
                word_hashes(text, |h| words.push(h));
                let n = n.max(1).min(words.len());
                window_hashes(words, n).for_each(|(_, h)| each(h));
            }),
            Shingles::Chars(n) => {
                let collapsed = collapse_whitespace(text);
                let bytes = collapsed.as_bytes();
                let n = n.max(1);
                if bytes.len() <= n {
                    if !bytes.is_empty() {
                        each(xxh3_64(bytes));
                    }
                } else {
                    bytes.windows(n).for_each(|w| each(xxh3_64(w)));
                }
            }
        }
    }

    /// The signature: per permutation, the least permuted shingle hash (`u64::MAX` for no shingles).
    pub fn signature(&self, text: &str) -> Vec<u64> {
        SHINGLES.with_borrow_mut(|hashes| {
            hashes.clear();
            self.shingle_hashes(text, |x| hashes.push(x));
            self.signature_of(hashes)
        })
    }

    fn signature_of(&self, hashes: &[u64]) -> Vec<u64> {
        let mut sig = vec![u64::MAX; self.params.num_perm()];
        // Eight permutations at a time over all shingles: the minima stay in registers and the
        // eight multiply-add-min chains are independent, so the loop runs at multiplier speed.
        let chunks = sig
            .chunks_mut(LANES)
            .zip(self.a.chunks(LANES))
            .zip(self.b.chunks(LANES));
        for ((sig, a), b) in chunks {
            if let (Ok(sig), Ok(a), Ok(b)) = (
                <&mut [u64; LANES]>::try_from(&mut *sig),
                <&[u64; LANES]>::try_from(a),
                <&[u64; LANES]>::try_from(b),
            ) {
                min_block_dispatch(sig, a, b, hashes);
            } else {
                for ((s, &a), &b) in sig.iter_mut().zip(a).zip(b) {
                    *s = hashes
                        .iter()
                        .fold(*s, |m, &x| m.min(a.wrapping_mul(x).wrapping_add(b)));
                }
            }
        }
        sig
    }

    /// The sorted, distinct shingle hashes of `text` (for exact Jaccard).
    pub fn shingle_set(&self, text: &str) -> Vec<u64> {
        let mut set = Vec::new();
        self.shingle_hashes(text, |h| set.push(h));
        set.sort_unstable();
        set.dedup();
        set
    }

    /// The LSH key of band `j` of a signature.
    pub fn band_key(&self, sig: &[u64], j: usize) -> u64 {
        let r = self.params.rows;
        xxh3_64_with_seed(words_as_bytes(&sig[j * r..(j + 1) * r]), j as u64)
    }
}

const LANES: usize = 8;

/// `sig[k] = min(sig[k], min over x of a[k]·x + b[k])` for eight permutations.
fn min_block(sig: &mut [u64; LANES], a: &[u64; LANES], b: &[u64; LANES], hashes: &[u64]) {
    let mut acc = *sig;
    for &x in hashes {
        for k in 0..LANES {
            acc[k] = acc[k].min(a[k].wrapping_mul(x).wrapping_add(b[k]));
        }
    }
    *sig = acc;
}

/// [`min_block`], with AVX2 where the CPU has it (checked per call; std caches the answer).
fn min_block_dispatch(sig: &mut [u64; LANES], a: &[u64; LANES], b: &[u64; LANES], hashes: &[u64]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { min_block_avx2(sig, a, b, hashes) };
    }
    min_block(sig, a, b, hashes)
}

/// [`min_block`] in AVX2: two vectors of four permutations. AVX2 has no 64-bit multiply, so
/// `a·x mod 2⁶⁴ = lo(a)·lo(x) + ((hi(a)·lo(x) + lo(a)·hi(x)) << 32)` from three 32×32→64 products,
/// and no unsigned 64-bit compare, so values are kept with their top bit flipped (adding 2⁶³
/// to `b`) and compared signed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn min_block_avx2(
    sig: &mut [u64; LANES],
    a: &[u64; LANES],
    b: &[u64; LANES],
    hashes: &[u64],
) {
    use std::arch::x86_64::*;
    const FLIP: u64 = 1 << 63;
    let load = |v: [u64; 4]| _mm256_loadu_si256(v.as_ptr().cast());
    let half = |v: &[u64; LANES], h: usize, f: fn(u64) -> u64| {
        load([
            f(v[4 * h]),
            f(v[4 * h + 1]),
            f(v[4 * h + 2]),
            f(v[4 * h + 3]),
        ])
    };
    let a_lo = [half(a, 0, |v| v), half(a, 1, |v| v)];
    let a_hi = [half(a, 0, |v| v >> 32), half(a, 1, |v| v >> 32)];
    let b_flip = [
        half(b, 0, |v| v.wrapping_add(FLIP)),
        half(b, 1, |v| v.wrapping_add(FLIP)),
    ];
    let mut acc = [half(sig, 0, |v| v ^ FLIP), half(sig, 1, |v| v ^ FLIP)];
    for &x in hashes {
        let x_lo = _mm256_set1_epi64x(x as i64);
        let x_hi = _mm256_set1_epi64x((x >> 32) as i64);
        for h in 0..2 {
            let low = _mm256_mul_epu32(a_lo[h], x_lo);
            let cross = _mm256_add_epi64(
                _mm256_mul_epu32(a_hi[h], x_lo),
                _mm256_mul_epu32(a_lo[h], x_hi),
            );
            let v = _mm256_add_epi64(
                _mm256_add_epi64(low, _mm256_slli_epi64::<32>(cross)),
                b_flip[h],
            );
            let smaller = _mm256_cmpgt_epi64(acc[h], v);
            acc[h] = _mm256_blendv_epi8(acc[h], v, smaller);
        }
    }
    let mut out = [0u64; LANES];
    _mm256_storeu_si256(out.as_mut_ptr().cast(), acc[0]);
    _mm256_storeu_si256(out.as_mut_ptr().add(4).cast(), acc[1]);
    for (s, o) in sig.iter_mut().zip(out) {
        *s = o ^ FLIP;
    }
}

pub(crate) fn words_as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding and any byte pattern is a valid u8; the length is exact.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

pub(crate) fn words_as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: as `words_as_bytes`; every byte pattern is also a valid u64.
    unsafe {
        std::slice::from_raw_parts_mut(
            words.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(words),
        )
    }
}

/// `true` when every signature entry is `u64::MAX`: the document had no shingles.
pub fn is_empty(sig: &[u64]) -> bool {
    sig.iter().all(|&v| v == u64::MAX)
}

/// The share of equal entries: MinHash's estimate of the Jaccard similarity.
pub fn estimated_similarity(a: &[u64], b: &[u64]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// |A ∩ B| / |A ∪ B| of two sorted, distinct sets.
pub fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - both;
    if union == 0 {
        1.0
    } else {
        both as f64 / union as f64
    }
}

/// Whitespace runs become one space; leading and trailing whitespace go.
pub fn collapse_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How texts are normalised before the exact-duplicate hash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Normalize {
    pub whitespace: bool,
    pub case: bool,
}

impl Normalize {
    /// `whitespace`, `case`, both comma-separated, or `none` (`--exact-normalize`).
    pub fn parse(spec: &str) -> Result<Normalize, String> {
        let mut n = Normalize::default();
        for part in spec
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "none")
        {
            match part {
                "whitespace" => n.whitespace = true,
                "case" => n.case = true,
                other => {
                    return Err(format!(
                        "exact normalisation `{other}` is unknown; use whitespace, case, both comma-separated, or none"
                    ))
                }
            }
        }
        Ok(n)
    }
}

/// 128-bit hash of the normalised text: equal hashes mean exact duplicates. Whitespace
/// normalisation collapses runs of ASCII whitespace to one space and trims the ends; case
/// normalisation lowercases ASCII letters.
pub fn exact_hash(text: &str, norm: Normalize) -> u128 {
    if !norm.whitespace && !norm.case {
        return xxh3_128(text.as_bytes());
    }
    NORMALISED.with_borrow_mut(|out| {
        let bytes = text.as_bytes();
        if !norm.whitespace {
            out.clear();
            out.extend_from_slice(bytes);
            out.make_ascii_lowercase();
            return xxh3_128(out);
        }
        // Branch-free: every byte is written at `len`; `len` advances past a non-space byte and
        // past the first space of a run, so runs collapse (code alternates too often to predict).
        if out.len() < bytes.len() {
            out.resize(bytes.len(), 0);
        }
        let buf = &mut out[..bytes.len()];
        let (mut len, mut after_space) = (0usize, true);
        for &c in bytes {
            let space = c.is_ascii_whitespace();
            let lowered = if norm.case && c.is_ascii_uppercase() {
                c | 0x20
            } else {
                c
            };
            buf[len] = if space { b' ' } else { lowered };
            len += usize::from(!space || !after_space);
            after_space = space;
        }
        if after_space && len > 0 {
            len -= 1;
        }
        xxh3_128(&buf[..len])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_split_lowercased_and_shingled() {
        let mut words = Vec::new();
        word_hashes("Hello, wörld_1 (x)", |h| words.push(h));
        let expected: Vec<u64> = ["hello", "wörld_1", "x"]
            .iter()
            .map(|w| xxh3_64(w.as_bytes()))
            .collect();
        assert_eq!(words, expected);
        let m = MinHasher::new(Params {
            shingles: Shingles::Words(2),
            ..Params::default()
        });
        let mut n = 0;
        m.shingle_hashes("a b c d", |_| n += 1);
        assert_eq!(n, 3, "4 words give 3 bigrams");
        let mut short = 0;
        m.shingle_hashes("alone", |_| short += 1);
        assert_eq!(short, 1, "a text shorter than a shingle is one shingle");
        assert!(is_empty(&m.signature("  ... ")));
    }

    #[test]
    fn jaccard_of_sorted_sets() {
        assert_eq!(jaccard(&[1, 2, 3, 4], &[3, 4, 5, 6]), 2.0 / 6.0);
        assert_eq!(jaccard(&[], &[]), 1.0);
    }

    #[test]
    fn exact_hash_normalisation() {
        let ws = Normalize {
            whitespace: true,
            case: false,
        };
        assert_eq!(exact_hash("a  b\n", ws), exact_hash("a b", ws));
        assert_eq!(exact_hash(" \t Ab \r\n\n c\t", ws), xxh3_128(b"Ab c"));
        let case = Normalize {
            whitespace: false,
            case: true,
        };
        assert_eq!(exact_hash(" Ab\n", case), xxh3_128(b" ab\n"));
        assert_ne!(exact_hash("A b", ws), exact_hash("a b", ws));
        let both = Normalize {
            whitespace: true,
            case: true,
        };
        assert_eq!(exact_hash("A  b", both), exact_hash("a b", both));
        assert_ne!(
            exact_hash("a  b", Normalize::default()),
            exact_hash("a b", Normalize::default())
        );
    }

    /// The rolling hash of each window equals the one computed from scratch for that window alone,
    /// so a match does not depend on where the n-gram sits in the document.
    #[test]
    fn rolling_window_hash_depends_only_on_the_window() {
        let hashes: Vec<u64> = (0..40u64).map(|i| xxh3_64(&i.to_le_bytes())).collect();
        for n in [1, 3, 13] {
            let rolled: Vec<(usize, u64)> = window_hashes(&hashes, n).collect();
            assert_eq!(rolled.len(), 40 - n + 1);
            for &(s, h) in &rolled {
                assert_eq!(window_hashes(&hashes[s..s + n], n).next(), Some((0, h)));
            }
            assert_ne!(rolled[0].1, rolled[1].1);
        }
        assert_eq!(window_hashes(&hashes[..5], 13).count(), 0);
    }

    /// The AVX2 kernel computes exactly the scalar definition min(a·x + b mod 2⁶⁴).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_equals_the_scalar_definition() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            // The kernel never runs there; but in CI such a CPU must fail here, not pass unchecked.
            crate::artifact::skip_unless_ci(
                "this CPU has no AVX2, so the AVX2 MinHash kernel went untested",
            );
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for len in [0, 1, 5, 300] {
            let hashes: Vec<u64> = (0..len).map(|_| rng.random()).collect();
            let a: [u64; LANES] = std::array::from_fn(|_| rng.random::<u64>() | 1);
            let b: [u64; LANES] = std::array::from_fn(|_| rng.random());
            let start: [u64; LANES] =
                std::array::from_fn(|k| if k % 2 == 0 { u64::MAX } else { rng.random() });
            let (mut scalar, mut simd) = (start, start);
            min_block(&mut scalar, &a, &b, &hashes);
            // SAFETY: AVX2 is present (checked above).
            unsafe { min_block_avx2(&mut simd, &a, &b, &hashes) };
            assert_eq!(scalar, simd, "{len} hashes");
        }
    }
}

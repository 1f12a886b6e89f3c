//! Diversity of a corpus, measured on a bounded sample of its records.
//!
//! - distinct-n: unique word n-grams over all word n-grams (n-grams do not cross records), as Li
//!   et al. (2016) define it; words as MinHash dedup splits them ([`minhash::word_hashes`]);
//! - compression ratio: bytes of the sample's texts joined by newlines over their gzip size
//!   (level 6), as Shaib et al. (2024) use it: repeated text compresses well, so lower is more
//!   diverse;
//! - near-duplicate share: records with another record of the sample whose estimated Jaccard
//!   similarity of 5-word shingles (dedup's MinHash) reaches a threshold;
//! - embedding spread: the mean cosine between every pair of sentence embeddings, the number of
//!   clusters a greedy leader pass finds, and a 2-D PCA projection for the plot.
//!
//! The sample is the `n` records whose ids have the least xxh3 hashes ([`Sampler`]): the same
//! records whatever the file order, so `stats.json` and `phigen report` measure the same ones.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io::Write;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::dedup::minhash::{self, MinHasher, Params};

/// Records sampled for the text measures unless `--sample` says otherwise (and by `stats.json`).
pub const DEFAULT_SAMPLE: usize = 2000;
/// Estimated Jaccard similarities at which two records count as near duplicates.
pub const NEAR_DUPLICATE_THRESHOLDS: [f64; 2] = [0.5, 0.8];
/// Cosine at which a record joins a cluster's leader.
pub const CLUSTER_COSINE: f32 = 0.8;

/// The cheap measures, which `stats.json` of a generate step records (`diversity`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TextDiversity {
    /// Records measured.
    pub sample: usize,
    pub distinct_1: f64,
    pub distinct_2: f64,
    pub distinct_3: f64,
    pub compression_ratio: f64,
}

/// Keeps the `cap` items with the least id hashes seen so far, with a label each (e.g. the topic).
pub struct Sampler<L> {
    cap: usize,
    heap: BinaryHeap<(u64, String, L)>,
}

impl<L: Ord> Sampler<L> {
    pub fn new(cap: usize) -> Sampler<L> {
        Sampler {
            cap,
            heap: BinaryHeap::with_capacity(cap + 1),
        }
    }

    /// Offers a record; its text is only copied when it is kept for now.
    pub fn offer(&mut self, id: &str, text: &str, label: impl FnOnce() -> L) {
        let key = xxh3_64(id.as_bytes());
        if self.heap.len() < self.cap {
            self.heap.push((key, text.to_string(), label()));
        } else if self.heap.peek().is_some_and(|(top, _, _)| key < *top) {
            self.heap.pop();
            self.heap.push((key, text.to_string(), label()));
        }
    }

    /// The kept records (text, label), least hash first.
    pub fn into_sorted(self) -> Vec<(String, L)> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|(_, text, label)| (text, label))
            .collect()
    }
}

/// distinct-1/2/3 and the compression ratio of `texts`.
pub fn text_diversity(texts: &[&str]) -> TextDiversity {
    let [distinct_1, distinct_2, distinct_3] = distinct_n(texts);
    TextDiversity {
        sample: texts.len(),
        distinct_1,
        distinct_2,
        distinct_3,
        compression_ratio: compression_ratio(texts),
    }
}

/// Unique over total word n-grams for n = 1, 2, 3 (0 where there are none).
pub fn distinct_n(texts: &[&str]) -> [f64; 3] {
    let mut unique: [HashSet<u64>; 3] = Default::default();
    let mut total = [0usize; 3];
    let mut words = Vec::new();
    for text in texts {
        words.clear();
        minhash::word_hashes(text, |h| words.push(h));
        for n in 1..=3 {
            for (_, h) in minhash::window_hashes(&words, n) {
                unique[n - 1].insert(h);
                total[n - 1] += 1;
            }
        }
    }
    std::array::from_fn(|i| ratio(unique[i].len(), total[i]))
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Bytes of the texts joined by newlines over their gzip size (1 for no text).
pub fn compression_ratio(texts: &[&str]) -> f64 {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    let mut raw = 0usize;
    for t in texts {
        // Writing into a Vec cannot fail.
        gz.write_all(t.as_bytes()).expect("in-memory write");
        gz.write_all(b"\n").expect("in-memory write");
        raw += t.len() + 1;
    }
    let packed = gz.finish().expect("in-memory write").len();
    if raw <= texts.len() {
        1.0
    } else {
        raw as f64 / packed as f64
    }
}

/// For each threshold, the share of `texts` that have another text of `texts` at least that
/// similar (estimated Jaccard of dedup's 5-word shingles; LSH bands tuned per threshold find the
/// candidate pairs, so the work stays near linear).
pub fn near_duplicate_shares(texts: &[&str], thresholds: &[f64]) -> Vec<f64> {
    let hasher = MinHasher::new(Params::default());
    let sigs: Vec<Vec<u64>> = texts.iter().map(|t| hasher.signature(t)).collect();
    thresholds
        .iter()
        .map(|&t| near_duplicate_share(&sigs, t))
        .collect()
}

/// Rows per band so that a pair at `threshold` is a candidate with probability above ~0.98: the
/// S-curve `1 − (1 − s^r)^b` has its midpoint near `(1/b)^(1/r)`, kept below the threshold.
fn rows_for(threshold: f64, num_perm: usize) -> usize {
    (1..=num_perm)
        .rev()
        .filter(|r| num_perm.is_multiple_of(*r))
        .find(|&r| {
            let bands = (num_perm / r) as i32;
            1.0 - (1.0 - threshold.powi(r as i32)).powi(bands) > 0.98
        })
        .unwrap_or(1)
}

fn near_duplicate_share(sigs: &[Vec<u64>], threshold: f64) -> f64 {
    let Some(num_perm) = sigs.first().map(Vec::len) else {
        return 0.0;
    };
    let rows = rows_for(threshold, num_perm);
    let mut dup = vec![false; sigs.len()];
    for band in 0..num_perm / rows {
        let mut buckets: HashMap<&[u64], Vec<usize>> = HashMap::new();
        for (i, sig) in sigs.iter().enumerate() {
            if !minhash::is_empty(sig) {
                buckets
                    .entry(&sig[band * rows..(band + 1) * rows])
                    .or_default()
                    .push(i);
            }
        }
        for members in buckets.values().filter(|m| m.len() > 1) {
            // Each unmarked member looks for one similar member; copies find one at once.
            for &i in members {
                if dup[i] {
                    continue;
                }
                if let Some(&j) = members.iter().find(|&&j| {
                    j != i && minhash::estimated_similarity(&sigs[i], &sigs[j]) >= threshold
                }) {
                    dup[i] = true;
                    dup[j] = true;
                }
            }
        }
    }
    ratio(dup.iter().filter(|d| **d).count(), sigs.len())
}

/// Unit-length copies of `vectors` (a zero vector stays zero).
pub fn normalized(vectors: &[Vec<f32>]) -> Vec<Vec<f32>> {
    vectors
        .iter()
        .map(|v| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter()
                .map(|x| if norm > 0.0 { x / norm } else { 0.0 })
                .collect()
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The mean cosine over every pair of distinct rows (of unit vectors); `None` under two rows.
pub fn mean_pairwise_cosine(unit: &[Vec<f32>]) -> Option<f64> {
    if unit.len() < 2 {
        return None;
    }
    let mut sum = 0f64;
    for (i, a) in unit.iter().enumerate() {
        for b in &unit[i + 1..] {
            sum += f64::from(dot(a, b));
        }
    }
    let pairs = unit.len() * (unit.len() - 1) / 2;
    Some(sum / pairs as f64)
}

/// Clusters of a greedy leader pass: in order, each row joins the first leader it is at least
/// `cosine` close to, or becomes a leader.
pub fn leader_clusters(unit: &[Vec<f32>], cosine: f32) -> usize {
    let mut leaders: Vec<&[f32]> = Vec::new();
    for v in unit {
        if !leaders.iter().any(|l| dot(l, v) >= cosine) {
            leaders.push(v);
        }
    }
    leaders.len()
}

/// Each row projected on the first two principal components (power iteration with deflation).
pub fn pca2(rows: &[Vec<f32>]) -> Vec<[f64; 2]> {
    let dim = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || dim == 0 {
        return vec![[0.0, 0.0]; rows.len()];
    }
    let mut mean = vec![0f64; dim];
    for r in rows {
        for (m, x) in mean.iter_mut().zip(r) {
            *m += f64::from(*x) / rows.len() as f64;
        }
    }
    let centered: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .zip(&mean)
                .map(|(x, m)| f64::from(*x) - m)
                .collect()
        })
        .collect();
    let first = principal_component(&centered, None);
    let second = principal_component(&centered, Some(&first));
    centered
        .iter()
        .map(|r| [dot64(r, &first), dot64(r, &second)])
        .collect()
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The leading eigenvector of XᵀX (orthogonal to `not` when given), by power iteration from a
/// fixed start, so the projection is deterministic.
fn principal_component(x: &[Vec<f64>], not: Option<&[f64]>) -> Vec<f64> {
    let dim = x[0].len();
    let mut v: Vec<f64> = (0..dim).map(|i| 1.0 + (i % 7) as f64 / 7.0).collect();
    for _ in 0..200 {
        if let Some(u) = not {
            let p = dot64(&v, u);
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= p * b);
        }
        let norm = dot64(&v, &v).sqrt();
        if norm == 0.0 {
            break;
        }
        v.iter_mut().for_each(|a| *a /= norm);
        // v ← Xᵀ (X v)
        let mut next = vec![0f64; dim];
        for row in x {
            let s = dot64(row, &v);
            next.iter_mut().zip(row).for_each(|(n, r)| *n += s * r);
        }
        v = next;
    }
    if let Some(u) = not {
        let p = dot64(&v, u);
        v.iter_mut().zip(u).for_each(|(a, b)| *a -= p * b);
    }
    let norm = dot64(&v, &v).sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|a| *a /= norm);
    }
    v
}

/// Shannon entropy in bits of a distribution given by counts.
pub fn entropy_bits<'a>(counts: impl IntoIterator<Item = &'a u64>) -> f64 {
    let counts: Vec<u64> = counts.into_iter().copied().filter(|c| *c > 0).collect();
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Twenty unrelated texts: each a run of words no other text shares.
    fn unrelated() -> Vec<String> {
        (0..20)
            .map(|i| {
                (0..30)
                    .map(|j| format!("w{i}x{j}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    /// By hand: "a b a b" has 4 unigrams (2 unique), 3 bigrams (ab, ba, ab: 2 unique), 2 trigrams
    /// (aba, bab: 2 unique). k copies of a text with unique n-grams score 1/k; unrelated texts 1.
    #[test]
    fn distinct_n_counts_unique_over_total() {
        assert_eq!(distinct_n(&["a b a b"]), [0.5, 2.0 / 3.0, 1.0]);
        assert_eq!(distinct_n(&["The cat, sat"; 4]), [0.25, 0.25, 0.25]);
        assert_eq!(distinct_n(&refs(&unrelated())), [1.0, 1.0, 1.0]);
        // n-grams do not cross records: "a b" + "c" has no trigram.
        assert_eq!(distinct_n(&["a b", "c"])[2], 0.0);
        assert_eq!(distinct_n(&[]), [0.0, 0.0, 0.0]);
    }

    /// Copies compress far better than unrelated texts (gzip finds each copy in its 32 KiB
    /// window); no text is ratio 1.
    #[test]
    fn compression_ratio_is_high_for_copies() {
        let text = unrelated()[0].clone();
        let copies = vec![text.as_str(); 50];
        let copied = compression_ratio(&copies);
        let varied = compression_ratio(&refs(&unrelated()));
        assert!(copied > 20.0, "{copied}");
        assert!(varied < 6.0, "{varied}");
        assert_eq!(compression_ratio(&[]), 1.0);
    }

    /// Three copies and one unrelated text: 3 of 4 records have a duplicate at both thresholds;
    /// unrelated texts have none.
    #[test]
    fn near_duplicate_shares_count_records_with_a_twin() {
        let texts = unrelated();
        let mut corpus = vec![texts[0].as_str(); 3];
        corpus.push(texts[1].as_str());
        assert_eq!(
            near_duplicate_shares(&corpus, &NEAR_DUPLICATE_THRESHOLDS),
            vec![0.75, 0.75]
        );
        assert_eq!(
            near_duplicate_shares(&refs(&texts), &NEAR_DUPLICATE_THRESHOLDS),
            vec![0.0, 0.0]
        );
        // 30 words = 26 shingles; changing word 15 changes the 5 that hold it: Jaccard 21/31 ≈
        // 0.68, between the thresholds (MinHash's 112 permutations estimate it within ±0.1).
        let edited = texts[0].replace("w0x15", "changed");
        let pair = [texts[0].as_str(), edited.as_str()];
        let shares = near_duplicate_shares(&pair, &NEAR_DUPLICATE_THRESHOLDS);
        assert_eq!(shares, vec![1.0, 0.0]);
    }

    /// The bands found for each threshold catch a pair at the threshold almost surely.
    #[test]
    fn bands_suit_their_threshold() {
        // 0.8⁴ = 0.41, 28 bands: 1 − 0.59²⁸ > 0.99 (7 rows, 16 bands: 0.977, too few).
        assert_eq!(rows_for(0.8, 112), 4);
        // 0.5² = 0.25, 56 bands: 1 − 0.75⁵⁶ > 0.99 (4 rows, 28 bands: 0.84).
        assert_eq!(rows_for(0.5, 112), 2);
    }

    /// Copies: cosine 1, one cluster. Orthogonal vectors: cosine 0, one cluster each.
    #[test]
    fn embedding_spread_of_copies_and_orthogonal_vectors() {
        let copies = normalized(&vec![vec![3.0, 4.0]; 5]);
        assert!((mean_pairwise_cosine(&copies).unwrap() - 1.0).abs() < 1e-6);
        assert_eq!(leader_clusters(&copies, CLUSTER_COSINE), 1);
        let basis: Vec<Vec<f32>> = (0..4)
            .map(|i| (0..4).map(|j| f32::from(u8::from(i == j))).collect())
            .collect();
        assert_eq!(mean_pairwise_cosine(&basis), Some(0.0));
        assert_eq!(leader_clusters(&basis, CLUSTER_COSINE), 4);
        assert_eq!(mean_pairwise_cosine(&basis[..1]), None);
    }

    /// Points on the line t·(1, 1, 0) + (0, 0, 5): the first component carries all of the spread
    /// (|coordinate| = |t − mean t|·√2), the second none.
    #[test]
    fn pca_finds_the_line() {
        let rows: Vec<Vec<f32>> = (0..5).map(|t| vec![t as f32, t as f32, 5.0]).collect();
        let p = pca2(&rows);
        for (t, [a, b]) in p.iter().enumerate() {
            let expected = (t as f64 - 2.0) * 2f64.sqrt();
            assert!((a.abs() - expected.abs()).abs() < 1e-6, "{a} vs {expected}");
            assert!(b.abs() < 1e-6, "{b}");
        }
    }

    /// Two equal classes: 1 bit; one class: 0 bits; four equal classes: 2 bits.
    #[test]
    fn entropy_in_bits() {
        assert_eq!(entropy_bits(&[5, 5]), 1.0);
        assert_eq!(entropy_bits(&[7]), 0.0);
        assert_eq!(entropy_bits(&[2, 2, 2, 2, 0]), 2.0);
    }

    /// The sample is the least id hashes, whatever the order records come in.
    #[test]
    fn sample_ignores_record_order() {
        let ids: Vec<String> = (0..100).map(|i| format!("id{i}")).collect();
        let pick = |order: &mut dyn Iterator<Item = &String>| {
            let mut s = Sampler::new(10);
            for id in order {
                s.offer(id, id, || ());
            }
            s.into_sorted()
        };
        let forward = pick(&mut ids.iter());
        assert_eq!(forward.len(), 10);
        assert_eq!(forward, pick(&mut ids.iter().rev()));
    }
}

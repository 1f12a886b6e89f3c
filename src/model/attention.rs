//! Attention of one new position per row over the KV cache, on the CPU: the decoding step.
//!
//! candle's matrix product runs the (row, kv head) pairs of a batched product one after another,
//! each a tiny multiply of 1–4 query heads by the cached keys; for a batch of 32 rows and 30
//! layers that is thousands of calls per step. Here each (row, kv head) pair is one task (in
//! parallel), which reads its cached keys and values once for all the query heads that share
//! them (grouped-query attention), with no mask: the row's visible keys are a range.

use candle_core::{Result, Storage, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// q (B, H, 1, D), contiguous; key and value (B, K, S, D) with contiguous rows of D (views of
/// the cache's buffers); row b attends to keys `first[b]..S`. Returns (B, 1, H·D), heads in order.
/// All f32 on the CPU.
pub fn decode(
    q: &Tensor,
    key: &Tensor,
    value: &Tensor,
    first: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, k, s, _) = key.dims4()?;
    if t != 1 || first.len() != b || h % k != 0 {
        candle_core::bail!(
            "decode attention: q {:?}, key {:?}, {} rows",
            q.dims(),
            key.dims(),
            first.len()
        );
    }
    let rep = h / k;
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = key.storage_and_layout();
    let (vs, vl) = value.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
        candle_core::bail!("decode attention runs on the CPU");
    };
    let qv = &qs.as_slice::<f32>()?[ql.start_offset()..];
    let kv = &ks.as_slice::<f32>()?[kl.start_offset()..];
    let vv = &vs.as_slice::<f32>()?[vl.start_offset()..];
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[3] != 1 || vst[3] != 1 || kst[2] != d || vst[2] != d {
        candle_core::bail!("decode attention: cached rows of D must be contiguous");
    }
    let mut y = vec![0f32; b * h * d];
    y.par_chunks_mut(rep * d).enumerate().for_each(|(i, out)| {
        let (row, g) = (i / k, i % k);
        let q = &qv[(row * h + g * rep) * d..][..rep * d];
        let keys = &kv[row * kst[0] + g * kst[1]..];
        let values = &vv[row * vst[0] + g * vst[1]..];
        group(q, keys, values, first[row].min(s), s, d, scale, out);
    });
    Tensor::from_vec(y, (b, 1, h * d), key.device())
}

/// The query heads `q` (rep × D) of one kv group over keys/values `first..s` (rows of D).
#[allow(clippy::too_many_arguments)]
fn group(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    first: usize,
    s: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    group_strided(q, keys, values, first, s, d, d, 0, scale, out);
}

/// Where one kv head's positions lie in a buffer: position j starts at `j·stride + offset` and
/// holds D values; the group reads positions `first..first + n`.
#[derive(Clone, Copy)]
pub(crate) struct Rows {
    pub first: usize,
    pub n: usize,
    pub d: usize,
    pub stride: usize,
    pub offset: usize,
}

impl Rows {
    fn at(&self, j: usize) -> usize {
        (self.first + j) * self.stride + self.offset
    }
}

/// Key and value elements the attention reads: f32 as they are, f16 widened (exactly) to f32.
/// The two loops of [`group_strided`] are methods, so that an element type can bring its own
/// (f16 with AVX-512); the portable ones are the defaults.
pub(crate) trait KvElement: Copy + Sized {
    /// The row as f32: itself, or widened into `buf` (D values).
    fn widen<'a>(row: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];

    /// `scores[r·n + j] = q_r · key_j · scale` for the query heads `q` (rep × D).
    fn scores(q: &[f32], keys: &[Self], at: Rows, scale: f32, scores: &mut [f32]) {
        scores_portable(q, keys, at, scale, scores);
    }

    /// `out_r += Σ_j scores[r·n + j] · value_j` for the rep query heads.
    fn weigh(scores: &[f32], values: &[Self], at: Rows, out: &mut [f32]) {
        weigh_portable(scores, values, at, out);
    }
}

impl KvElement for f32 {
    fn widen<'a>(row: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        row
    }
}

impl KvElement for f16 {
    fn widen<'a>(row: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        row.convert_to_f32_slice(buf);
        buf
    }

    fn scores(q: &[f32], keys: &[f16], at: Rows, scale: f32, scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx512_fits(keys, at, q.len(), scores.len()) {
            // SAFETY: AVX-512F is present and every row read lies in `keys` (checked above).
            return unsafe { scores_avx512(q, keys, at, scale, scores) };
        }
        scores_portable(q, keys, at, scale, scores);
    }

    fn weigh(scores: &[f32], values: &[f16], at: Rows, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx512_fits(values, at, out.len(), scores.len()) {
            // SAFETY: as above.
            return unsafe { weigh_avx512(scores, values, at, out) };
        }
        weigh_portable(scores, values, at, out);
    }
}

/// Whether the AVX-512 loops can run on `at`'s rows of `buf` for heads of `heads` values (q or
/// out: whole heads of D) and `scores` scores: the CPU has AVX-512F, D is a multiple of 64, the
/// last row lies in `buf` and `scores` holds heads × n.
#[cfg(target_arch = "x86_64")]
fn avx512_fits<T>(buf: &[T], at: Rows, heads: usize, scores: usize) -> bool {
    at.n > 0
        && at.d.is_multiple_of(64)
        && buf.len() >= at.at(at.n - 1) + at.d
        && heads.is_multiple_of(at.d)
        && scores >= heads / at.d * at.n
        && std::arch::is_x86_feature_detected!("avx512f")
}

fn scores_portable<T: KvElement>(q: &[f32], keys: &[T], at: Rows, scale: f32, scores: &mut [f32]) {
    let (n, d) = (at.n, at.d);
    let mut buf = vec![0f32; d];
    for j in 0..n {
        let key = T::widen(&keys[at.at(j)..][..d], &mut buf);
        for (r, q) in q.chunks_exact(d).enumerate() {
            scores[r * n + j] = dot(q, key) * scale;
        }
    }
}

fn weigh_portable<T: KvElement>(scores: &[f32], values: &[T], at: Rows, out: &mut [f32]) {
    let (n, d) = (at.n, at.d);
    let mut buf = vec![0f32; d];
    for j in 0..n {
        let value = T::widen(&values[at.at(j)..][..d], &mut buf);
        for (r, out) in out.chunks_exact_mut(d).enumerate() {
            let p = scores[r * n + j];
            out.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
        }
    }
}

/// [`group`] over keys and values whose position j starts at `j·stride + offset` (a slot's
/// (positions, K·D) buffers, read in place for kv head g at offset g·D); adds into `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_strided<T: KvElement>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    first: usize,
    s: usize,
    d: usize,
    stride: usize,
    offset: usize,
    scale: f32,
    out: &mut [f32],
) {
    let rep = q.len() / d;
    let at = Rows {
        first,
        n: s - first,
        d,
        stride,
        offset,
    };
    if at.n == 0 {
        return;
    }
    let mut scores = vec![0f32; rep * at.n];
    T::scores(q, keys, at, scale, &mut scores);
    for r in 0..rep {
        super::ops::softmax_in_place(&mut scores[r * at.n..][..at.n], 1.0);
    }
    T::weigh(&scores, values, at, out);
}

/// The 16 values at `p` (f16) as f32.
#[cfg(target_arch = "x86_64")]
macro_rules! widen16 {
    ($p:expr) => {
        _mm512_cvtph_ps(_mm256_loadu_si256($p.cast::<__m256i>()))
    };
}

/// `scores[r·n + j] = q_r · key_j · scale`, D a multiple of 64: two chains of sums per key
/// (each register and pointer spelled out, so that even unoptimized builds keep the sums in
/// registers; arrays indexed in a loop were spilled).
///
/// # Safety
/// AVX-512F; D a multiple of 64; `keys` holds every row of `at`; `q` holds rep × D and `scores`
/// rep × n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512(q: &[f32], keys: &[f16], at: Rows, scale: f32, scores: &mut [f32]) {
    use std::arch::x86_64::*;
    // `wrapping_*` and intrinsic loads: no precondition checks in the loop (see int8.rs).
    let (n, d) = (at.n, at.d);
    let first = keys.as_ptr().wrapping_add(at.at(0));
    for r in 0..q.len() / d {
        let qr = q.as_ptr().wrapping_add(r * d);
        let row = scores.as_mut_ptr().wrapping_add(r * n);
        let mut key = first;
        for j in 0..n {
            let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut c = 0;
            while c < d {
                let (k, q) = (key.wrapping_add(c), qr.wrapping_add(c));
                a = _mm512_fmadd_ps(_mm512_loadu_ps(q), widen16!(k), a);
                b = _mm512_fmadd_ps(
                    _mm512_loadu_ps(q.wrapping_add(16)),
                    widen16!(k.wrapping_add(16)),
                    b,
                );
                a = _mm512_fmadd_ps(
                    _mm512_loadu_ps(q.wrapping_add(32)),
                    widen16!(k.wrapping_add(32)),
                    a,
                );
                b = _mm512_fmadd_ps(
                    _mm512_loadu_ps(q.wrapping_add(48)),
                    widen16!(k.wrapping_add(48)),
                    b,
                );
                c += 64;
            }
            *row.wrapping_add(j) = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * scale;
            key = key.wrapping_add(at.stride);
        }
    }
}

/// `out_r += Σ_j scores[r·n + j] · value_j`, D a multiple of 64: per head and 64 columns, the
/// sums stay in registers (two sets, for even and odd positions, so that twice as many products
/// are in flight) and `out` is read and written once.
///
/// # Safety
/// As [`scores_avx512`]; `out` holds rep × D.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weigh_avx512(scores: &[f32], values: &[f16], at: Rows, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (n, d, stride) = (at.n, at.d, at.stride);
    let first = values.as_ptr().wrapping_add(at.at(0));
    for r in 0..out.len() / d {
        let p = scores.as_ptr().wrapping_add(r * n);
        let mut c = 0;
        while c < d {
            let o = out.as_mut_ptr().wrapping_add(r * d + c);
            let (mut e0, mut e1, mut e2, mut e3) = (
                _mm512_loadu_ps(o),
                _mm512_loadu_ps(o.wrapping_add(16)),
                _mm512_loadu_ps(o.wrapping_add(32)),
                _mm512_loadu_ps(o.wrapping_add(48)),
            );
            let zero = _mm512_setzero_ps();
            let (mut o0, mut o1, mut o2, mut o3) = (zero, zero, zero, zero);
            let mut v = first.wrapping_add(c);
            let mut j = 0;
            while j + 1 < n {
                let (p0, p1) = (
                    _mm512_set1_ps(*p.wrapping_add(j)),
                    _mm512_set1_ps(*p.wrapping_add(j + 1)),
                );
                let w = v.wrapping_add(stride);
                e0 = _mm512_fmadd_ps(p0, widen16!(v), e0);
                e1 = _mm512_fmadd_ps(p0, widen16!(v.wrapping_add(16)), e1);
                e2 = _mm512_fmadd_ps(p0, widen16!(v.wrapping_add(32)), e2);
                e3 = _mm512_fmadd_ps(p0, widen16!(v.wrapping_add(48)), e3);
                o0 = _mm512_fmadd_ps(p1, widen16!(w), o0);
                o1 = _mm512_fmadd_ps(p1, widen16!(w.wrapping_add(16)), o1);
                o2 = _mm512_fmadd_ps(p1, widen16!(w.wrapping_add(32)), o2);
                o3 = _mm512_fmadd_ps(p1, widen16!(w.wrapping_add(48)), o3);
                v = v.wrapping_add(2 * stride);
                j += 2;
            }
            if j < n {
                let p0 = _mm512_set1_ps(*p.wrapping_add(j));
                e0 = _mm512_fmadd_ps(p0, widen16!(v), e0);
                e1 = _mm512_fmadd_ps(p0, widen16!(v.wrapping_add(16)), e1);
                e2 = _mm512_fmadd_ps(p0, widen16!(v.wrapping_add(32)), e2);
                e3 = _mm512_fmadd_ps(p0, widen16!(v.wrapping_add(48)), e3);
            }
            _mm512_storeu_ps(o, _mm512_add_ps(e0, o0));
            _mm512_storeu_ps(o.wrapping_add(16), _mm512_add_ps(e1, o1));
            _mm512_storeu_ps(o.wrapping_add(32), _mm512_add_ps(e2, o2));
            _mm512_storeu_ps(o.wrapping_add(48), _mm512_add_ps(e3, o3));
            c += 64;
        }
    }
}

/// Σ a·b with eight partial sums (so the compiler can use vector registers).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Against candle's composed attention (matmul, additive mask, softmax, matmul) on the same
    /// inputs: grouped heads (H = 6, K = 2), keys that are a view into a longer buffer (as the
    /// cache's are), and rows that see different ranges (left pads, a sliding window).
    #[test]
    fn equals_the_composed_attention() {
        let dev = Device::Cpu;
        let (b, h, k, s, cap, d) = (3, 6, 2, 9, 16, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, 1, d), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (b, k, cap, d), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (b, k, cap, d), &dev).unwrap();
        let (key, value) = (kbuf.narrow(2, 0, s).unwrap(), vbuf.narrow(2, 0, s).unwrap());
        let first = [0usize, 4, 7];
        let scale = 0.3f32;
        let got = decode(&q, &key, &value, &first, scale).unwrap();
        // Composed: repeat each kv head for its query heads, mask keys before `first`.
        let rep = h / k;
        let expand = |t: &Tensor| {
            t.unsqueeze(2)
                .unwrap()
                .repeat((1, 1, rep, 1, 1))
                .unwrap()
                .reshape((b, h, s, d))
                .unwrap()
        };
        let (kx, vx) = (
            expand(&key.contiguous().unwrap()),
            expand(&value.contiguous().unwrap()),
        );
        let mask: Vec<f32> = (0..b)
            .flat_map(|r| (0..s).map(move |j| if j < first[r] { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, s), &dev).unwrap();
        let scores = (q.matmul(&kx.t().unwrap()).unwrap() * f64::from(scale))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let want = probs
            .matmul(&vx)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, 1, h * d))
            .unwrap();
        let diff = crate::model::tests::max_abs_diff(&got, &want);
        assert!(diff < 1e-5, "max difference {diff}");
    }

    /// The f16 kernels (AVX-512 where the CPU has it, and the portable loops) equal the f32
    /// kernel run on the same keys and values rounded to f16 (exact widening; only the order
    /// of the partial sums differs): grouped heads, a strided buffer read at a kv head's offset,
    /// a window that starts past position 0 (an odd and an even count of positions), `out`
    /// added into, and both head sizes the AVX-512 loops take (64, 128).
    #[test]
    fn f16_groups_equal_the_f32_group_on_the_rounded_values() {
        for (d, first) in [(64, 4), (128, 5)] {
            f16_group_case(d, first);
        }
    }

    fn f16_group_case(d: usize, first: usize) {
        let (rep, k, s, g) = (3, 3, 37, 1);
        let stride = k * d;
        let mut state = 11u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        };
        let q: Vec<f32> = (0..rep * d).map(|_| next()).collect();
        let kh: Vec<f16> = (0..s * stride).map(|_| f16::from_f32(next())).collect();
        let vh: Vec<f16> = (0..s * stride).map(|_| f16::from_f32(next())).collect();
        let widen = |h: &[f16]| h.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let (kf, vf) = (widen(&kh), widen(&vh));
        let start: Vec<f32> = (0..rep * d).map(|_| next()).collect();
        let mut want = start.clone();
        group_strided(&q, &kf, &vf, first, s, d, stride, g * d, 0.125, &mut want);
        let mut fast = start.clone();
        group_strided(&q, &kh, &vh, first, s, d, stride, g * d, 0.125, &mut fast);
        // The portable loops for f16, in the flow of `group_strided`.
        let at = Rows {
            first,
            n: s - first,
            d,
            stride,
            offset: g * d,
        };
        let mut scores = vec![0f32; rep * at.n];
        scores_portable(&q, &kh, at, 0.125, &mut scores);
        for row in scores.chunks_exact_mut(at.n) {
            crate::model::ops::softmax_in_place(row, 1.0);
        }
        let mut portable = start.clone();
        weigh_portable(&scores, &vh, at, &mut portable);
        for (name, got) in [("dispatched", &fast), ("portable", &portable)] {
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{name}, D = {d}: max difference {diff}");
        }
        assert_ne!(want, start);
    }
}

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

/// Key and value elements the attention reads: f32 as they are, f16 widened (exactly) to f32.
pub(crate) trait KvElement: Copy {
    /// The row as f32: itself, or widened into `buf` (D values).
    fn widen<'a>(row: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
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
    let n = s - first;
    if n == 0 {
        return;
    }
    let mut scores = vec![0f32; rep * n];
    let mut buf = vec![0f32; d];
    for j in 0..n {
        let key = T::widen(&keys[(first + j) * stride + offset..][..d], &mut buf);
        for r in 0..rep {
            scores[r * n + j] = dot(&q[r * d..][..d], key) * scale;
        }
    }
    for r in 0..rep {
        super::ops::softmax_in_place(&mut scores[r * n..][..n], 1.0);
    }
    for j in 0..n {
        let value = T::widen(&values[(first + j) * stride + offset..][..d], &mut buf);
        for r in 0..rep {
            let p = scores[r * n + j];
            out[r * d..][..d]
                .iter_mut()
                .zip(value)
                .for_each(|(o, v)| *o += p * v);
        }
    }
}

/// [`group_strided`] over f16 keys and values (a [`super::cache::Slot`]'s): position j of the
/// kv head starts at `j·stride + offset`; adds into `out`. Each f16 is widened to f32 exactly,
/// so this is [`group_strided`] on the rounded keys and values; with AVX-512 (every CPU the slot
/// path runs on) the products use 16 lanes, with the partial sums in another order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_f16(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    first: usize,
    s: usize,
    d: usize,
    stride: usize,
    offset: usize,
    scale: f32,
    out: &mut [f32],
) {
    let rep = q.len() / d;
    let n = s - first;
    if n == 0 {
        return;
    }
    let end = (s - 1) * stride + offset + d;
    assert!(
        keys.len() >= end && values.len() >= end && out.len() == rep * d,
        "group_f16: buffers too short"
    );
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
        let mut scores = vec![0f32; rep * n];
        // SAFETY: AVX-512F is present; the bounds were checked above.
        unsafe { scores_avx512(q, keys, first, n, d, stride, offset, scale, &mut scores) };
        for r in 0..rep {
            super::ops::softmax_in_place(&mut scores[r * n..][..n], 1.0);
        }
        // SAFETY: as above.
        unsafe { values_avx512(&scores, values, first, n, d, stride, offset, out) };
        return;
    }
    group_strided(q, keys, values, first, s, d, stride, offset, scale, out);
}

/// `scores[r·n + j] = q_r · key_(first+j) · scale` for the rep query heads in `q`.
///
/// # Safety
/// AVX-512F; `d` a multiple of 16; keys hold position `first + n - 1` at `stride`, `offset`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_avx512(
    q: &[f32],
    keys: &[f16],
    first: usize,
    n: usize,
    d: usize,
    stride: usize,
    offset: usize,
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    // `wrapping_add` and intrinsic loads: no precondition checks in the loop (see int8.rs).
    let rep = q.len() / d;
    for j in 0..n {
        let key = keys
            .as_ptr()
            .wrapping_add((first + j) * stride + offset)
            .cast::<__m256i>();
        for r in 0..rep {
            let q = q.as_ptr().wrapping_add(r * d);
            let mut acc = _mm512_setzero_ps();
            for c in 0..d / 16 {
                let k = _mm512_cvtph_ps(_mm256_loadu_si256(key.wrapping_add(c)));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.wrapping_add(c * 16)), k, acc);
            }
            scores[r * n + j] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
}

/// `out_r += Σ_j scores[r·n + j] · value_(first+j)` for the rep query heads.
///
/// # Safety
/// As [`scores_avx512`]; `out` holds rep × d.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn values_avx512(
    scores: &[f32],
    values: &[f16],
    first: usize,
    n: usize,
    d: usize,
    stride: usize,
    offset: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let rep = out.len() / d;
    let out = out.as_mut_ptr();
    for j in 0..n {
        let value = values
            .as_ptr()
            .wrapping_add((first + j) * stride + offset)
            .cast::<__m256i>();
        for r in 0..rep {
            let p = _mm512_set1_ps(scores[r * n + j]);
            let o = out.wrapping_add(r * d);
            for c in 0..d / 16 {
                let v = _mm512_cvtph_ps(_mm256_loadu_si256(value.wrapping_add(c)));
                let o = o.wrapping_add(c * 16);
                _mm512_storeu_ps(o, _mm512_fmadd_ps(p, v, _mm512_loadu_ps(o)));
            }
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
    /// a window that starts past position 0, and `out` added into.
    #[test]
    fn f16_groups_equal_the_f32_group_on_the_rounded_values() {
        let (rep, k, d, s, first, g) = (3, 3, 64, 37, 5, 1);
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
        group_f16(&q, &kh, &vh, first, s, d, stride, g * d, 0.125, &mut fast);
        let mut portable = start.clone();
        group_strided(
            &q,
            &kh,
            &vh,
            first,
            s,
            d,
            stride,
            g * d,
            0.125,
            &mut portable,
        );
        for (name, got) in [("dispatched", &fast), ("portable", &portable)] {
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{name}: max difference {diff}");
        }
        assert_ne!(want, start);
    }
}

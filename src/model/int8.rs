//! 8-bit matrix products for batched inference on CPUs with AVX-512 VNNI.
//!
//! A projection that came quantized (a GGUF file) is also kept as 8-bit codes: per output feature
//! and block of 32 inputs, `w = d·u + m` with `u` in 0..=255, fitted to the block's range of the
//! dequantized weights (a 4-bit block's values land on codes exactly when its range spans all 16
//! levels, and within 1/34 of its step otherwise). The activations of each call are quantized per
//! row and block of 32 to `a = s·q`, `q` in -127..=127, as llama.cpp's Q8 activations are, so
//!
//! `Σ w·a = s·(d·Σ u·q + m·Σ q)` per block,
//!
//! where `Σ u·q` is exact integer arithmetic: one `vpdpbusd` multiplies 16 output features × 4
//! inputs, four times the products of an f32 FMA, and the weights are a quarter of the bytes.
//! Many rows at once (a batch of sequences decoding, a prompt) is where this beats an f32 matrix
//! product and candle's quantized kernels (which re-read the weights for every row); a single row
//! stays on candle's kernels, which read the file's 4-bit codes.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Inputs that share one scale and offset (weights) or one scale (activations).
const BLOCK: usize = 32;
/// Output features a kernel call computes: two registers of 16.
const TILE: usize = 32;
/// Rows a kernel call computes at once (the broadcast activations are reused over the tile).
const ROWS: usize = 4;

/// Whether this CPU has the instructions the kernel needs.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight matrix (out, inp) as 8-bit codes in the kernel's layout.
#[derive(Debug)]
pub struct Int8Weight {
    out: usize,
    inp: usize,
    /// Per tile of 32 features, per block, per group of 4 inputs: 16 features × 4 codes for the
    /// tile's first half, then its second half (what one register load takes).
    codes: Vec<u8>,
    /// Per tile and block: the 32 features' `d`.
    scale: Vec<f32>,
    /// Per tile and block: the 32 features' `m`.
    offset: Vec<f32>,
}

impl Int8Weight {
    /// Codes for `w`, row-major (out, inp); `None` where the CPU lacks VNNI or `inp` is not a
    /// multiple of 32 (the caller keeps its f32 product then).
    pub fn new(w: &[f32], out: usize, inp: usize) -> Option<Self> {
        if !supported()
            || out == 0
            || inp == 0
            || !inp.is_multiple_of(BLOCK)
            || w.len() != out * inp
        {
            return None;
        }
        let blocks = inp / BLOCK;
        let tiles = out.div_ceil(TILE);
        let mut codes = vec![0u8; tiles * blocks * BLOCK * TILE];
        let mut scale = vec![0f32; tiles * blocks * TILE];
        let mut offset = vec![0f32; tiles * blocks * TILE];
        codes
            .par_chunks_mut(blocks * BLOCK * TILE)
            .zip(scale.par_chunks_mut(blocks * TILE))
            .zip(offset.par_chunks_mut(blocks * TILE))
            .enumerate()
            .for_each(|(t, ((codes, scale), offset))| {
                for c in 0..TILE.min(out - t * TILE) {
                    let row = &w[(t * TILE + c) * inp..][..inp];
                    let (half, col) = (c / 16, c % 16);
                    for (b, vals) in row.chunks_exact(BLOCK).enumerate() {
                        let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
                        let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let d = (hi - lo) / 255.0;
                        scale[b * TILE + c] = d;
                        offset[b * TILE + c] = lo;
                        for (j, &v) in vals.iter().enumerate() {
                            let u = if d > 0.0 {
                                ((v - lo) / d).round().clamp(0.0, 255.0) as u8
                            } else {
                                0
                            };
                            codes[((b * 8 + j / 4) * 2 + half) * 64 + col * 4 + j % 4] = u;
                        }
                    }
                }
            });
        Some(Int8Weight {
            out,
            inp,
            codes,
            scale,
            offset,
        })
    }

    /// `x Wᵀ` for `x` (rows, inp), f32 row-major; returns (rows, out) row-major.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.inp, "x is (rows, inp)");
        let a = Activations::new(x, rows, self.inp);
        let mut y = vec![0f32; rows * self.out];
        let out = SharedOut(y.as_mut_ptr());
        let tiles = self.out.div_ceil(TILE);
        (0..tiles).into_par_iter().for_each(|t| {
            let out = &out;
            for r0 in (0..rows).step_by(ROWS) {
                // SAFETY: `supported()` held when this weight was made (it is checked in `new`);
                // each (tile, rows) pair writes its own disjoint part of `y`, which outlives the loop.
                unsafe {
                    match rows - r0 {
                        1 => kernel::<1>(self, t, &a, r0, out.0),
                        2 => kernel::<2>(self, t, &a, r0, out.0),
                        3 => kernel::<3>(self, t, &a, r0, out.0),
                        _ => kernel::<ROWS>(self, t, &a, r0, out.0),
                    }
                }
            }
        });
        y
    }
}

/// The output buffer, written by the tiles in parallel at disjoint places.
struct SharedOut(*mut f32);
// SAFETY: every task writes a disjoint set of elements (its own tile's columns).
unsafe impl Sync for SharedOut {}

/// A batch of activations quantized per row and block: `a ≈ s·q`.
struct Activations {
    q: Vec<i8>,
    /// Per row and block: `s`.
    s: Vec<f32>,
    /// Per row and block: `s·Σq`, which multiplies the weights' offset.
    sq: Vec<f32>,
}

impl Activations {
    fn new(x: &[f32], rows: usize, inp: usize) -> Self {
        let blocks = rows * inp / BLOCK;
        let mut q = vec![0i8; rows * inp];
        let mut s = vec![0f32; blocks];
        let mut sq = vec![0f32; blocks];
        q.par_chunks_mut(inp)
            .zip(s.par_chunks_mut(inp / BLOCK))
            .zip(sq.par_chunks_mut(inp / BLOCK))
            .zip(x.par_chunks(inp))
            .for_each(|(((q, s), sq), x)| {
                for (b, (q, x)) in q
                    .chunks_exact_mut(BLOCK)
                    .zip(x.chunks_exact(BLOCK))
                    .enumerate()
                {
                    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = amax / 127.0;
                    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                    let mut sum = 0i32;
                    for (q, &v) in q.iter_mut().zip(x) {
                        *q = (v * inv).round() as i8;
                        sum += i32::from(*q);
                    }
                    s[b] = scale;
                    sq[b] = scale * sum as f32;
                }
            });
        Activations { q, s, sq }
    }
}

/// Rows `r0..r0+R` × the 32 features of tile `t`, written into `out` (rows, w.out).
///
/// # Safety
/// The CPU has AVX-512F and VNNI; `r0 + R` rows exist in `a`; `out` holds (rows, w.out) f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn kernel<const R: usize>(
    w: &Int8Weight,
    t: usize,
    a: &Activations,
    r0: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let blocks = w.inp / BLOCK;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for b in 0..blocks {
        let tb = t * blocks + b;
        let codes = w.codes.as_ptr().add(tb * BLOCK * TILE);
        let mut dot = [[_mm512_setzero_si512(); 2]; R];
        for k4 in 0..BLOCK / 4 {
            let w0 = _mm512_loadu_si512(codes.add(k4 * 128).cast());
            let w1 = _mm512_loadu_si512(codes.add(k4 * 128 + 64).cast());
            for (r, dot) in dot.iter_mut().enumerate() {
                let q = a.q.as_ptr().add((r0 + r) * w.inp + b * BLOCK + k4 * 4);
                let x = _mm512_set1_epi32(std::ptr::read_unaligned(q.cast::<i32>()));
                dot[0] = _mm512_dpbusd_epi32(dot[0], w0, x);
                dot[1] = _mm512_dpbusd_epi32(dot[1], w1, x);
            }
        }
        let scale = w.scale.as_ptr().add(tb * TILE);
        let offset = w.offset.as_ptr().add(tb * TILE);
        let d = [_mm512_loadu_ps(scale), _mm512_loadu_ps(scale.add(16))];
        let m = [_mm512_loadu_ps(offset), _mm512_loadu_ps(offset.add(16))];
        for (r, (acc, dot)) in acc.iter_mut().zip(&dot).enumerate() {
            let s = _mm512_set1_ps(a.s[(r0 + r) * blocks + b]);
            let sq = _mm512_set1_ps(a.sq[(r0 + r) * blocks + b]);
            for h in 0..2 {
                let ds = _mm512_mul_ps(d[h], s);
                acc[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[h]), ds, acc[h]);
                acc[h] = _mm512_fmadd_ps(m[h], sq, acc[h]);
            }
        }
    }
    let col0 = t * TILE;
    for (r, acc) in acc.iter().enumerate() {
        let row = out.add((r0 + r) * w.out);
        for (h, v) in acc.iter().enumerate() {
            let c = col0 + h * 16;
            let n = w.out.saturating_sub(c).min(16);
            if n > 0 {
                let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
                _mm512_mask_storeu_ps(row.add(c), mask, *v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const R: usize>(_: &Int8Weight, _: usize, _: &Activations, _: usize, _: *mut f32) {
    unreachable!("Int8Weight::new returns None without AVX-512 VNNI")
}

/// `x Wᵀ` for a CPU f32 tensor `x` (rows, inp) → (rows, out).
pub fn forward(w: &Int8Weight, x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Product(w))
}

struct Product<'a>(&'a Int8Weight);

impl CustomOp1 for Product<'_> {
    fn name(&self) -> &'static str {
        "phigen-int8-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inp) = l.shape().dims2()?;
        if inp != self.0.inp {
            candle_core::bail!(
                "int8 product: x has {inp} features, the weight {}",
                self.0.inp
            );
        }
        let x = super::ops::cpu_f32(s, l)?;
        let y = self.0.matmul(x, rows);
        Ok((CpuStorage::F32(y), Shape::from((rows, self.0.out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// The plain f32 product `x Wᵀ`, element by element in f64: the oracle.
    fn reference(w: &[f32], x: &[f32], rows: usize, out: usize, inp: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for n in 0..out {
                let dot: f64 = (0..inp)
                    .map(|k| f64::from(x[r * inp + k]) * f64::from(w[n * inp + k]))
                    .sum();
                y[r * out + n] = dot as f32;
            }
        }
        y
    }

    /// The kernel's tests on a CPU without VNNI, where the kernel never runs (decoding keeps the
    /// f32 product): skipped locally, but CI runs on a CPU with VNNI, so there a CPU without it
    /// means the kernel went untested, and the test fails.
    fn no_vnni() {
        crate::artifact::skip_unless_ci(
            "this CPU has no AVX-512 VNNI (avx512_vnni in /proc/cpuinfo), so the int8 kernel \
             went untested; run the tests on a CPU with it (Intel since Cascade Lake, AMD since \
             Zen 4)",
        );
    }

    /// Weights on a 4-bit grid per block (as a Q4_1 file's are): their codes are exact, so the
    /// only error left is the activations' 8-bit rounding, bounded per block by
    /// Σ|w|·s/2 (each activation is off by at most half its block's step s = max|a|/127).
    #[test]
    fn matches_the_f32_product_within_the_activation_rounding() {
        if !supported() {
            no_vnni();
            return;
        }
        // Odd sizes: a partial last tile (out = 45) and a partial last row group (rows = 7).
        let (rows, out, inp) = (7, 45, 96);
        let mut w = vec![0f32; out * inp];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for block in w.chunks_mut(BLOCK) {
            let (d, m) = (
                rng.random_range(0.001..0.02f32),
                rng.random_range(-0.1..0.0f32),
            );
            for (j, v) in block.iter_mut().enumerate() {
                // Levels 0 and 15 both present, so the block spans the full 4-bit range.
                let q = if j == 0 {
                    0
                } else if j == 1 {
                    15
                } else {
                    rng.random_range(0..16)
                };
                *v = d * q as f32 + m;
            }
        }
        let x = random(rows * inp, 8, 2.0);
        let q = Int8Weight::new(&w, out, inp).unwrap();
        let got = q.matmul(&x, rows);
        let want = reference(&w, &x, rows, out, inp);
        for r in 0..rows {
            for n in 0..out {
                let mut bound = 1e-5f64;
                for b in 0..inp / BLOCK {
                    let xs = &x[r * inp + b * BLOCK..][..BLOCK];
                    let ws = &w[n * inp + b * BLOCK..][..BLOCK];
                    let step = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    bound +=
                        ws.iter().map(|v| f64::from(v.abs())).sum::<f64>() * f64::from(step) / 2.0;
                }
                let (g, e) = (got[r * out + n], want[r * out + n]);
                assert!(
                    f64::from((g - e).abs()) <= bound * 1.01,
                    "row {r} feature {n}: {g} vs {e} (bound {bound})"
                );
            }
        }
    }

    /// Arbitrary f32 weights (a checkpoint's, not on any grid) keep the product close to f32:
    /// relative error of the whole output under 1%, as for llama.cpp's Q8 types.
    #[test]
    fn arbitrary_weights_stay_close() {
        if !supported() {
            no_vnni();
            return;
        }
        let (rows, out, inp) = (33, 64, 576);
        let w = random(out * inp, 1, 0.05);
        let x = random(rows * inp, 2, 1.0);
        let got = Int8Weight::new(&w, out, inp).unwrap().matmul(&x, rows);
        let want = reference(&w, &x, rows, out, inp);
        let err: f64 = got
            .iter()
            .zip(&want)
            .map(|(g, e)| f64::from(g - e).powi(2))
            .sum();
        let norm: f64 = want.iter().map(|e| f64::from(*e).powi(2)).sum();
        assert!(
            (err / norm).sqrt() < 0.01,
            "relative error {}",
            (err / norm).sqrt()
        );
    }

    #[test]
    fn shapes_the_kernel_cannot_take_are_refused() {
        // 40 inputs is not a whole number of 32-input blocks.
        assert!(Int8Weight::new(&[0.0; 80], 2, 40).is_none());
        assert_eq!(Int8Weight::new(&[0.0; 128], 2, 64).is_some(), supported());
    }
}

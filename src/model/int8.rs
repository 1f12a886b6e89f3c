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
/// Rows a packed kernel call computes at once: each unpacked weight register serves 8 rows, and
/// 8 rows are 8 independent chains of products (fewer rows split each row's sum in two).
const PACKED_ROWS: usize = 8;

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
    /// Per row and block: `Σq`, which multiplies a zero code (see [`PackedWeight`]).
    sum: Vec<i32>,
}

impl Activations {
    fn new(x: &[f32], rows: usize, inp: usize) -> Self {
        let blocks = rows * inp / BLOCK;
        let mut q = vec![0i8; rows * inp];
        let mut s = vec![0f32; blocks];
        let mut sq = vec![0f32; blocks];
        let mut sums = vec![0i32; blocks];
        q.par_chunks_mut(inp)
            .zip(s.par_chunks_mut(inp / BLOCK))
            .zip(sq.par_chunks_mut(inp / BLOCK))
            .zip(sums.par_chunks_mut(inp / BLOCK))
            .zip(x.par_chunks(inp))
            .for_each(|((((q, s), sq), sums), x)| {
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
                    sums[b] = sum;
                }
            });
        Activations {
            q,
            s,
            sq,
            sum: sums,
        }
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

/// A projection in a GGUF file's own 4- or 8-bit codes (Q4_0, Q4_1, Q8_0), re-laid for the
/// VNNI kernel: the weights are read as the file stores them (Q4_1: 0.625 bytes a weight, against
/// the 8-bit codes' 1.125), and each value is exactly the file's. This is llama.cpp's scheme:
/// the activations are quantized per block of 32 to 8 bits and each block's product is integer.
///
/// Every block of a file's type is `w = d·u + m` with `u` its unsigned code: Q4_1 stores `d` and
/// `m`; Q4_0 stores `d` with `m = -8d`; Q8_0 stores `d` and signed codes, stored here as
/// `u = q + 128` with `m = -128d` (both exact in f16: a power of two times `d`).
///
/// Where `m = -z·d` (Q4_0: `z = 8`, Q8_0: `z = 128`) a block's product is `d·s·(Σ u·q − z·Σq)`,
/// all integer but the one scaling: the kernel starts the block's sum at `−z·Σq` instead of
/// adding `m·s·Σq` in floats afterwards (one fused multiply-add fewer per row and block).
#[derive(Debug)]
pub struct PackedWeight {
    out: usize,
    inp: usize,
    four_bit: bool,
    /// Q4_1: each block's `m` is its own (stored); Q4_0 and Q8_0: `m = -z·d`.
    free_offset: bool,
    /// Per tile of 16 features, per block of 32 inputs: the codes (see [`PackedWeight::record`]),
    /// then the 16 features' `d` and `m` as f16 bits.
    data: Vec<u8>,
}

/// Output features of a packed tile: one 512-bit register of i32 / f32.
const LANES: usize = 16;

impl PackedWeight {
    /// Bytes of one (tile, block) record: 4-bit codes take 4 loads of 64 bytes (low nibbles are
    /// input groups 0..4 of 4 inputs, high nibbles groups 4..8), 8-bit codes 8 loads; then 16
    /// f16 `d` and 16 f16 `m`.
    fn record(four_bit: bool) -> usize {
        (if four_bit { 256 } else { 512 }) + 4 * LANES
    }

    /// The packed copy of a GGUF tensor (out, inp) of type `dtype` with raw blocks `bytes`;
    /// `None` for other types, shapes the kernel cannot take, or a CPU without VNNI.
    pub fn from_gguf(
        dtype: candle_core::quantized::GgmlDType,
        bytes: &[u8],
        out: usize,
        inp: usize,
    ) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        if !Self::accepts(dtype, out, inp) {
            return None;
        }
        // (block bytes, four-bit) per type.
        let (block_bytes, four_bit) = match dtype {
            GgmlDType::Q4_0 => (18, true),
            GgmlDType::Q4_1 => (20, true),
            _ => (34, false),
        };
        let blocks = inp / BLOCK;
        if bytes.len() != out * blocks * block_bytes {
            return None;
        }
        let rec = Self::record(four_bit);
        let tiles = out.div_ceil(LANES);
        let mut data = vec![0u8; tiles * blocks * rec];
        data.par_chunks_mut(blocks * rec)
            .enumerate()
            .for_each(|(t, tile)| {
                for col in 0..LANES.min(out - t * LANES) {
                    let row = &bytes[(t * LANES + col) * blocks * block_bytes..];
                    for b in 0..blocks {
                        let src = &row[b * block_bytes..][..block_bytes];
                        let dst = &mut tile[b * rec..][..rec];
                        let d = u16::from_le_bytes([src[0], src[1]]);
                        let m = match dtype {
                            GgmlDType::Q4_1 => u16::from_le_bytes([src[2], src[3]]),
                            GgmlDType::Q4_0 => f16_times(d, -8.0),
                            _ => f16_times(d, -128.0),
                        };
                        for i in 0..BLOCK {
                            let (group, j) = (i / 4, i % 4);
                            let u = match dtype {
                                GgmlDType::Q4_1 => nibble(&src[4..], i),
                                GgmlDType::Q4_0 => nibble(&src[2..], i),
                                _ => src[2 + i] ^ 0x80,
                            };
                            if four_bit {
                                let at = (group % 4) * 64 + col * 4 + j;
                                dst[at] |= u << (4 * (group / 4));
                            } else {
                                dst[group * 64 + col * 4 + j] = u;
                            }
                        }
                        let scales = rec - 4 * LANES;
                        dst[scales + 2 * col..][..2].copy_from_slice(&d.to_le_bytes());
                        dst[scales + 2 * LANES + 2 * col..][..2].copy_from_slice(&m.to_le_bytes());
                    }
                }
            });
        Some(PackedWeight {
            out,
            inp,
            four_bit,
            free_offset: dtype == GgmlDType::Q4_1,
            data,
        })
    }

    /// Whether [`PackedWeight::from_gguf`] takes a tensor (out, inp) of type `dtype` (given its
    /// bytes are whole blocks) on this CPU.
    pub fn accepts(dtype: candle_core::quantized::GgmlDType, out: usize, inp: usize) -> bool {
        use candle_core::quantized::GgmlDType;
        matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
            && supported()
            && out > 0
            && inp > 0
            && inp.is_multiple_of(BLOCK)
    }

    pub fn out(&self) -> usize {
        self.out
    }

    pub fn inp(&self) -> usize {
        self.inp
    }

    /// `x Wᵀ` for `x` (rows, inp), f32 row-major, into `y` (rows, out) row-major. The tiles are
    /// split into one contiguous run per thread, so each streams its part of the weights once.
    pub fn matmul_into(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        assert_eq!(x.len(), rows * self.inp, "x is (rows, inp)");
        assert_eq!(y.len(), rows * self.out, "y is (rows, out)");
        let a = Activations::new(x, rows, self.inp);
        let out = SharedOut(y.as_mut_ptr());
        let tiles = self.out.div_ceil(LANES);
        let parts = rayon::current_num_threads().clamp(1, tiles);
        let pick = match (self.four_bit, self.free_offset) {
            (true, true) => packed_kernel_for::<true, true>,
            (true, false) => packed_kernel_for::<true, false>,
            (false, true) => packed_kernel_for::<false, true>,
            (false, false) => packed_kernel_for::<false, false>,
        };
        (0..parts).into_par_iter().for_each(|p| {
            let out = &out;
            for t in tiles * p / parts..tiles * (p + 1) / parts {
                for r0 in (0..rows).step_by(PACKED_ROWS) {
                    // SAFETY: `supported()` held when this weight was made (checked in
                    // `from_gguf`); the kernel takes `min(rows - r0, PACKED_ROWS)` rows, which
                    // exist; each (tile, rows) pair writes its own disjoint part of `y`.
                    unsafe { pick(rows - r0)(self, t, &a, r0, out.0) }
                }
            }
        });
    }

    /// `x Wᵀ` for `x` (rows, inp); returns (rows, out).
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * self.out];
        self.matmul_into(x, rows, &mut y);
        y
    }

    /// Row `r` of the weight (out = vocabulary for an embedding table), dequantized into `dst`.
    pub fn row_into(&self, r: usize, dst: &mut [f32]) {
        let rec = Self::record(self.four_bit);
        let blocks = self.inp / BLOCK;
        let (t, col) = (r / LANES, r % LANES);
        for b in 0..blocks {
            let src = &self.data[(t * blocks + b) * rec..][..rec];
            let scales = rec - 4 * LANES;
            let d = f16_to_f32(u16::from_le_bytes([
                src[scales + 2 * col],
                src[scales + 2 * col + 1],
            ]));
            let at = scales + 2 * LANES + 2 * col;
            let m = f16_to_f32(u16::from_le_bytes([src[at], src[at + 1]]));
            for (i, v) in dst[b * BLOCK..][..BLOCK].iter_mut().enumerate() {
                let (group, j) = (i / 4, i % 4);
                let u = if self.four_bit {
                    (src[(group % 4) * 64 + col * 4 + j] >> (4 * (group / 4))) & 0x0f
                } else {
                    src[group * 64 + col * 4 + j]
                };
                *v = d * f32::from(u) + m;
            }
        }
    }
}

/// Code `i` (0..32) of a 4-bit GGUF block's 16 code bytes: low nibbles are 0..16, high 16..32.
fn nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0f
    } else {
        qs[i - 16] >> 4
    }
}

/// IEEE half → f32 (normal, subnormal, zero, inf/nan).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f32::from(h & 0x3ff);
    match exp {
        0 => sign * frac * 2f32.powi(-24),
        31 if frac == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        e => sign * (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

/// The f16 bits of `d·k` for `k` a power of two (±8, ±128): the exponent moves, the mantissa
/// stays, so the product is exact while it stays a normal number (it does for a GGUF scale).
fn f16_times(d: u16, k: f32) -> u16 {
    let shift = k.abs().log2() as u16;
    let sign = if k < 0.0 { 0x8000 } else { 0 };
    let exp = (d >> 10) & 0x1f;
    if exp == 0 {
        // Zero (or a subnormal scale, which no real file has): the offset is zero too.
        return sign ^ (d & 0x8000);
    }
    ((d & 0x8000) ^ sign) | ((exp + shift).min(30) << 10) | (d & 0x3ff)
}

/// A packed kernel: rows `r0..r0+R` of tile `t` (see [`packed_kernel`]).
type PackedKernel = unsafe fn(&PackedWeight, usize, &Activations, usize, *mut f32);

/// The packed kernel for `rows` rows (up to [`PACKED_ROWS`]) of a weight of this kind.
fn packed_kernel_for<const FOUR: bool, const FREE: bool>(rows: usize) -> PackedKernel {
    match rows {
        1 => packed_kernel::<1, FOUR, FREE>,
        2 => packed_kernel::<2, FOUR, FREE>,
        3 => packed_kernel::<3, FOUR, FREE>,
        4 => packed_kernel::<4, FOUR, FREE>,
        5 => packed_kernel::<5, FOUR, FREE>,
        6 => packed_kernel::<6, FOUR, FREE>,
        7 => packed_kernel::<7, FOUR, FREE>,
        _ => packed_kernel::<PACKED_ROWS, FOUR, FREE>,
    }
}

/// Rows `r0..r0+R` × the 16 features of tile `t` of a packed weight, written into `out`.
/// `FOUR`: 4-bit codes; `FREE`: each block stores its offset `m` (else `m = -z·d`, and the
/// integer sum starts at `−z·Σq`).
///
/// # Safety
/// The CPU has AVX-512F and VNNI; `r0 + R` rows exist in `a`; `out` holds (rows, w.out) f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn packed_kernel<const R: usize, const FOUR: bool, const FREE: bool>(
    w: &PackedWeight,
    t: usize,
    a: &Activations,
    r0: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    // Raw pointers advanced with `wrapping_add` and loads through intrinsics: in builds with
    // debug assertions, `add`, `read` and `get_unchecked` check their preconditions, and those
    // branches in the innermost loop cost more than the products (and spilled the sums).
    let blocks = w.inp / BLOCK;
    let rec = PackedWeight::record(FOUR);
    let low = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); R];
    let base = w.data.as_ptr().wrapping_add(t * blocks * rec);
    let q: [*const u8; R] =
        std::array::from_fn(|r| a.q.as_ptr().cast::<u8>().wrapping_add((r0 + r) * w.inp));
    let s: [*const f32; R] = std::array::from_fn(|r| a.s.as_ptr().wrapping_add((r0 + r) * blocks));
    let sq: [*const f32; R] =
        std::array::from_fn(|r| a.sq.as_ptr().wrapping_add((r0 + r) * blocks));
    let sum: [*const i32; R] =
        std::array::from_fn(|r| a.sum.as_ptr().wrapping_add((r0 + r) * blocks));
    // The zero code of a fixed offset, negated: Q4_0's 8, Q8_0's 128.
    let zero: i32 = if FOUR { -8 } else { -128 };
    // Independent chains of products per row: with fewer than 4 rows, each row's sum is split
    // in two so that a product does not wait for the one before it.
    let chains = if R < 4 { 2 } else { 1 };
    // `acc + Σ` of the codes `w` by four activations at `p` (one group) broadcast to every
    // lane, as one instruction: the intrinsics' loads check their preconditions in builds
    // with debug assertions, here once per product.
    macro_rules! dot_group {
        ($acc:expr, $w:expr, $p:expr) => {{
            let mut acc: __m512i = $acc;
            // SAFETY: `$p` points at 4 readable bytes (an activation group of this row).
            std::arch::asm!(
                "vpdpbusd {acc}, {w}, dword ptr [{p}]{{1to16}}",
                acc = inout(zmm_reg) acc,
                w = in(zmm_reg) $w,
                p = in(reg) $p,
                options(pure, readonly, nostack, preserves_flags)
            );
            acc
        }};
    }
    for b in 0..blocks {
        let r = base.wrapping_add(b * rec);
        let x = b * BLOCK;
        let mut dot = [[_mm512_setzero_si512(); 2]; R];
        if !FREE {
            for (row, dot) in dot.iter_mut().enumerate() {
                dot[0] = _mm512_set1_epi32(zero * *sum[row].wrapping_add(b));
            }
        }
        if FOUR {
            for c in 0..4 {
                let v = _mm512_loadu_si512(r.wrapping_add(c * 64).cast());
                let lo = _mm512_and_si512(v, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                for row in 0..R {
                    let p = q[row].wrapping_add(x + c * 4);
                    dot[row][0] = dot_group!(dot[row][0], lo, p);
                    let h = 1 % chains;
                    dot[row][h] = dot_group!(dot[row][h], hi, p.wrapping_add(16));
                }
            }
        } else {
            for g in 0..8 {
                let v = _mm512_loadu_si512(r.wrapping_add(g * 64).cast());
                for row in 0..R {
                    let p = q[row].wrapping_add(x + g * 4);
                    let h = g % chains;
                    dot[row][h] = dot_group!(dot[row][h], v, p);
                }
            }
        }
        let scales = r.wrapping_add(rec - 4 * LANES);
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(scales.cast()));
        let m = if FREE {
            _mm512_cvtph_ps(_mm256_loadu_si256(scales.wrapping_add(2 * LANES).cast()))
        } else {
            _mm512_setzero_ps()
        };
        for row in 0..R {
            let sv = _mm512_broadcastss_ps(_mm_load_ss(s[row].wrapping_add(b)));
            let total = if chains == 2 {
                _mm512_add_epi32(dot[row][0], dot[row][1])
            } else {
                dot[row][0]
            };
            let ds = _mm512_mul_ps(d, sv);
            acc[row] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), ds, acc[row]);
            if FREE {
                let sqv = _mm512_broadcastss_ps(_mm_load_ss(sq[row].wrapping_add(b)));
                acc[row] = _mm512_fmadd_ps(m, sqv, acc[row]);
            }
        }
    }
    let c = t * LANES;
    let n = w.out.saturating_sub(c).min(LANES);
    let mask: __mmask16 = if n == LANES { 0xffff } else { (1u16 << n) - 1 };
    for (row, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add((r0 + row) * w.out + c), mask, *acc);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn packed_kernel<const R: usize, const FOUR: bool, const FREE: bool>(
    _: &PackedWeight,
    _: usize,
    _: &Activations,
    _: usize,
    _: *mut f32,
) {
    unreachable!("PackedWeight::from_gguf returns None without AVX-512 VNNI")
}

/// `x Wᵀ` for a CPU f32 tensor `x` (rows, inp) → (rows, out), with a packed weight.
pub fn forward_packed(w: &PackedWeight, x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (rows, inp) = x.dims2()?;
    if inp != w.inp {
        candle_core::bail!("packed product: x has {inp} features, the weight {}", w.inp);
    }
    let (s, l) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*s else {
        candle_core::bail!("packed product runs on the CPU");
    };
    let y = w.matmul(super::ops::cpu_f32(cpu, l)?, rows);
    Tensor::from_vec(y, (rows, w.out), x.device())
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

    /// The packed kernel on GGUF blocks made by candle's quantizer (Q4_0, Q4_1, Q8_0): each
    /// weight unpacks to candle's own dequantized value (the oracle for the file's weights), and
    /// the product equals the f32 product of those weights within the activations' 8-bit
    /// rounding (the bound of the test above). Sizes leave a partial tile (out = 45) and
    /// partial row groups (rows = 3, 7, 13); one row is the decoding case.
    #[test]
    fn packed_gguf_blocks_unpack_exactly_and_multiply_within_the_rounding() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::Device;
        if !supported() {
            no_vnni();
            return;
        }
        let (out, inp) = (45, 96);
        let w = random(out * inp, 3, 0.1);
        let t = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let wq: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let p = PackedWeight::from_gguf(dtype, &q.data().unwrap(), out, inp).unwrap();
            let mut row = vec![0f32; inp];
            for r in 0..out {
                p.row_into(r, &mut row);
                assert_eq!(row, wq[r * inp..][..inp], "{dtype:?} row {r}");
            }
            // One row (decoding), a partial group of rows, a full group of 8 and one more.
            for rows in [1, 3, 7, 8, 13] {
                let x = random(rows * inp, 4, 2.0);
                let got = p.matmul(&x, rows);
                let want = reference(&wq, &x, rows, out, inp);
                for r in 0..rows {
                    for n in 0..out {
                        let mut bound = 1e-5f64;
                        for b in 0..inp / BLOCK {
                            let xs = &x[r * inp + b * BLOCK..][..BLOCK];
                            let ws = &wq[n * inp + b * BLOCK..][..BLOCK];
                            let step = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                            bound += ws.iter().map(|v| f64::from(v.abs())).sum::<f64>()
                                * f64::from(step)
                                / 2.0;
                        }
                        let (g, e) = (got[r * out + n], want[r * out + n]);
                        assert!(
                            f64::from((g - e).abs()) <= bound * 1.01,
                            "{dtype:?} row {r} feature {n}: {g} vs {e} (bound {bound})"
                        );
                    }
                }
            }
        }
        // A type the kernel does not read is refused.
        let q = QTensor::quantize(&t, GgmlDType::Q8_1).unwrap();
        assert!(PackedWeight::from_gguf(GgmlDType::Q8_1, &q.data().unwrap(), out, inp).is_none());
    }

    #[test]
    fn shapes_the_kernel_cannot_take_are_refused() {
        // 40 inputs is not a whole number of 32-input blocks.
        assert!(Int8Weight::new(&[0.0; 80], 2, 40).is_none());
        assert_eq!(Int8Weight::new(&[0.0; 128], 2, 64).is_some(), supported());
    }
}

//! 8-bit matrix products for batched inference on CPUs with AVX-512 VNNI.
//!
//! A quantized projection (a GGUF file's, or a checkpoint's 8-bit copy) is kept as codes the
//! kernel reads: per output feature and block of inputs, `w = d·u + m` with `u` an unsigned code
//! (see [`PackedWeight`]). The activations of each call are quantized per row and block to
//! `a = s·q`, `q` in -127..=127, as llama.cpp's Q8 activations are, so
//!
//! `Σ w·a = s·(d·Σ u·q + m·Σ q)` per block,
//!
//! where `Σ u·q` is exact integer arithmetic: one `vpdpbusd` multiplies 16 output features × 4
//! inputs, four times the products of an f32 FMA. Many rows at once (a batch of sequences
//! decoding, a prompt) is where this beats an f32 matrix product and candle's quantized kernels
//! (which re-read the weights for every row); one row reads a quarter of an f32 weight's bytes.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Inputs of a GGUF block (one scale, one offset) and of one pass of the kernel's products.
const BLOCK: usize = 32;
/// Rows a kernel call computes at once: each unpacked weight register serves 8 rows, and 8 rows
/// are 8 independent chains of products (fewer rows split each row's sum in two).
const PACKED_ROWS: usize = 8;
/// Blocks of 32 that share one scale in the 8-bit codes made from float weights (Q8_0 included):
/// the float work per block (convert, scale, add) is then paid once per 128 inputs instead of 32.
const WIDE: usize = 4;

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

/// The output buffer, written by the tiles in parallel at disjoint places.
struct SharedOut(*mut f32);
// SAFETY: every task writes a disjoint set of elements (its own tile's columns).
unsafe impl Sync for SharedOut {}

/// A batch of activations quantized per row and block of `block` inputs: `a ≈ s·q`.
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
    fn new(x: &[f32], rows: usize, inp: usize, block: usize) -> Self {
        let blocks = rows * inp / block;
        let mut q = vec![0i8; rows * inp];
        let mut s = vec![0f32; blocks];
        let mut sq = vec![0f32; blocks];
        let mut sums = vec![0i32; blocks];
        q.par_chunks_mut(inp)
            .zip(s.par_chunks_mut(inp / block))
            .zip(sq.par_chunks_mut(inp / block))
            .zip(sums.par_chunks_mut(inp / block))
            .zip(x.par_chunks(inp))
            .for_each(|((((q, s), sq), sums), x)| {
                for (b, (q, x)) in q
                    .chunks_exact_mut(block)
                    .zip(x.chunks_exact(block))
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

/// A projection's codes, laid out for the VNNI kernel.
///
/// - A GGUF file's 4-bit types (Q4_0, Q4_1) are read as the file stores them (0.625 bytes a
///   weight), each value exactly the file's, in blocks of 32: llama.cpp's scheme.
/// - 8-bit codes (Q8_0, which phigen also runs Qwen2.5's k-quants and Q5_0 in, and which a
///   checkpoint's quantized copy is) are re-fitted to blocks of 128 inputs ("wide"): symmetric,
///   `d = max|w|/127` per feature and block, so each weight moves by at most half a step of
///   8 bits over its 128 (a 4-bit source's own step is ~16 times that). The activations are then
///   quantized per 128 too (llama.cpp's k-quant products use 256), and the float work after
///   each block's integer sum is paid a quarter as often. Where the inputs are not whole blocks
///   of 128, Q8_0 stays in its file's blocks of 32, exact.
///
/// Every block is `w = d·u + m` with `u` its unsigned code: Q4_1 stores `d` and `m`; Q4_0 stores
/// `d` with `m = -8d`; 8-bit codes are signed ones stored as `u = q + 128` with `m = -128d` (both
/// exact in f16: a power of two times `d`). Where `m = -z·d` (`z` = 8 or 128) a block's product
/// is `d·s·(Σ u·q − z·Σq)`, all integer but the one scaling: the kernel starts the block's sum
/// at `−z·Σq` instead of adding `m·s·Σq` in floats afterwards.
#[derive(Debug)]
pub struct PackedWeight {
    out: usize,
    inp: usize,
    four_bit: bool,
    /// Q4_1: each block's `m` is its own (stored); the others: `m = -z·d`.
    free_offset: bool,
    /// 8-bit codes in blocks of 128 inputs (`WIDE` × 32) instead of 32.
    wide: bool,
    /// Per tile of 16 features, per block: the codes (see [`PackedWeight::record`]), then the
    /// 16 features' `d` and `m` as f16 bits.
    data: Vec<u8>,
}

/// Output features of a packed tile: one 512-bit register of i32 / f32.
const LANES: usize = 16;

impl PackedWeight {
    /// Bytes of one (tile, block) record: 4-bit codes take 4 loads of 64 bytes (low nibbles are
    /// input groups 0..4 of 4 inputs, high nibbles groups 4..8), 8-bit codes 8 loads per 32
    /// inputs (wide: 4 × 8, one run of 32 after the other); then 16 f16 `d` and 16 f16 `m`.
    fn record(four_bit: bool, wide: bool) -> usize {
        let codes = match (four_bit, wide) {
            (true, _) => 256,
            (false, false) => 512,
            (false, true) => 512 * WIDE,
        };
        codes + 4 * LANES
    }

    /// Inputs per block (one `d` and `m` per feature).
    fn block(&self) -> usize {
        if self.wide {
            BLOCK * WIDE
        } else {
            BLOCK
        }
    }

    /// Wide 8-bit codes for float weights (out, inp), row-major; `None` on a CPU without VNNI
    /// or where `inp` is not a multiple of 128.
    pub fn from_f32(w: &[f32], out: usize, inp: usize) -> Option<Self> {
        if w.len() != out * inp {
            return None;
        }
        Self::wide(out, inp, |r, dst| dst.copy_from_slice(&w[r * inp..][..inp]))
    }

    /// Wide 8-bit codes for the weights (out, inp) that `row(r, dst)` writes, one feature at a
    /// time (so a large table needs no float copy of itself).
    fn wide(out: usize, inp: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Option<Self> {
        let block = BLOCK * WIDE;
        if !supported() || out == 0 || inp == 0 || !inp.is_multiple_of(block) {
            return None;
        }
        let (blocks, rec) = (inp / block, Self::record(false, true));
        let tiles = out.div_ceil(LANES);
        let mut data = vec![0u8; tiles * blocks * rec];
        data.par_chunks_mut(blocks * rec)
            .enumerate()
            .for_each(|(t, tile)| {
                let mut values = vec![0f32; inp];
                for col in 0..LANES.min(out - t * LANES) {
                    row(t * LANES + col, &mut values);
                    for (b, vals) in values.chunks_exact(block).enumerate() {
                        let dst = &mut tile[b * rec..][..rec];
                        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                        // The f16 step at or above amax/127 (rounding down would push the
                        // largest weight past code 127).
                        let mut d = half::f16::from_f32(amax / 127.0);
                        if d.to_f32() * 127.0 < amax {
                            d = half::f16::from_bits(d.to_bits() + 1);
                        }
                        let inv = if d.to_f32() > 0.0 {
                            1.0 / d.to_f32()
                        } else {
                            0.0
                        };
                        for (i, &v) in vals.iter().enumerate() {
                            let q = (v * inv).round().clamp(-128.0, 127.0) as i32;
                            let (run, group, j) = (i / BLOCK, (i % BLOCK) / 4, i % 4);
                            dst[run * 512 + group * 64 + col * 4 + j] = (q + 128) as u8;
                        }
                        let d = d.to_bits();
                        put_scales(dst, col, d, f16_times(d, -128.0));
                    }
                }
            });
        Some(PackedWeight {
            out,
            inp,
            four_bit: false,
            free_offset: false,
            wide: true,
            data,
        })
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
        if dtype == GgmlDType::Q8_0 && inp.is_multiple_of(BLOCK * WIDE) {
            // Re-fitted in blocks of 128, one row of the file's blocks at a time.
            let row_bytes = inp / BLOCK * 34;
            if bytes.len() != out * row_bytes {
                return None;
            }
            return Self::wide(out, inp, |r, dst| {
                let row = &bytes[r * row_bytes..][..row_bytes];
                for (block, vals) in row.chunks_exact(34).zip(dst.chunks_exact_mut(BLOCK)) {
                    let d = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
                    for (v, &q) in vals.iter_mut().zip(&block[2..]) {
                        *v = d * f32::from(q as i8);
                    }
                }
            });
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
        let rec = Self::record(four_bit, false);
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
                        put_scales(dst, col, d, m);
                    }
                }
            });
        Some(PackedWeight {
            out,
            inp,
            four_bit,
            free_offset: dtype == GgmlDType::Q4_1,
            wide: false,
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
        let a = Activations::new(x, rows, self.inp, self.block());
        let out = SharedOut(y.as_mut_ptr());
        let tiles = self.out.div_ceil(LANES);
        let parts = rayon::current_num_threads().clamp(1, tiles);
        let pick = match (self.four_bit, self.free_offset, self.wide) {
            (true, true, _) => packed_kernel_for::<true, true, 1>,
            (true, false, _) => packed_kernel_for::<true, false, 1>,
            (false, _, false) => packed_kernel_for::<false, false, 1>,
            (false, _, true) => packed_kernel_for::<false, false, WIDE>,
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
        let rec = Self::record(self.four_bit, self.wide);
        let block = self.block();
        let blocks = self.inp / block;
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
            for (i, v) in dst[b * block..][..block].iter_mut().enumerate() {
                let (run, group, j) = (i / BLOCK, (i % BLOCK) / 4, i % 4);
                let u = if self.four_bit {
                    (src[(group % 4) * 64 + col * 4 + j] >> (4 * (group / 4))) & 0x0f
                } else {
                    src[run * 512 + group * 64 + col * 4 + j]
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

/// Writes feature `col`'s `d` and `m` (f16 bits) into the scales at the end of a (tile, block)
/// record (see [`PackedWeight::record`]).
fn put_scales(record: &mut [u8], col: usize, d: u16, m: u16) {
    let scales = record.len() - 4 * LANES;
    record[scales + 2 * col..][..2].copy_from_slice(&d.to_le_bytes());
    record[scales + 2 * LANES + 2 * col..][..2].copy_from_slice(&m.to_le_bytes());
}

/// IEEE half bits → f32.
fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// The f16 bits of `d·k` for `k` a power of two (−8, −128): exact, `d` normal or subnormal (the
/// product only moves the exponent, and stays within f16's range for a weight's scale).
fn f16_times(d: u16, k: f32) -> u16 {
    half::f16::from_f32(k * f16_to_f32(d)).to_bits()
}

/// A packed kernel: rows `r0..r0+R` of tile `t` (see [`packed_kernel`]).
type PackedKernel = unsafe fn(&PackedWeight, usize, &Activations, usize, *mut f32);

/// The packed kernel for `rows` rows (up to [`PACKED_ROWS`]) of a weight of this kind.
fn packed_kernel_for<const FOUR: bool, const FREE: bool, const G: usize>(
    rows: usize,
) -> PackedKernel {
    match rows {
        1 => packed_kernel::<1, FOUR, FREE, G>,
        2 => packed_kernel::<2, FOUR, FREE, G>,
        3 => packed_kernel::<3, FOUR, FREE, G>,
        4 => packed_kernel::<4, FOUR, FREE, G>,
        5 => packed_kernel::<5, FOUR, FREE, G>,
        6 => packed_kernel::<6, FOUR, FREE, G>,
        7 => packed_kernel::<7, FOUR, FREE, G>,
        _ => packed_kernel::<PACKED_ROWS, FOUR, FREE, G>,
    }
}

/// Rows `r0..r0+R` × the 16 features of tile `t` of a packed weight, written into `out`.
/// `FOUR`: 4-bit codes; `FREE`: each block stores its offset `m` (else `m = -z·d`, and the
/// integer sum starts at `−z·Σq`); `G`: runs of 32 inputs per block (8-bit codes only).
///
/// # Safety
/// The CPU has AVX-512F and VNNI; `r0 + R` rows exist in `a`; `out` holds (rows, w.out) f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn packed_kernel<const R: usize, const FOUR: bool, const FREE: bool, const G: usize>(
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
    let blocks = w.inp / (BLOCK * G);
    let rec = PackedWeight::record(FOUR, G > 1);
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
        let x = b * BLOCK * G;
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
            for g in 0..8 * G {
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
unsafe fn packed_kernel<const R: usize, const FOUR: bool, const FREE: bool, const G: usize>(
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

    /// Asserts that `got` is `x Wᵀ` within the activations' 8-bit rounding: per row and block
    /// of `block` inputs, each activation is off by at most half its block's step
    /// `s = max|a|/127`, so the product by at most `Σ|w|·s/2` (plus float summation noise).
    fn assert_within_rounding(
        got: &[f32],
        w: &[f32],
        x: &[f32],
        dims: (usize, usize, usize),
        block: usize,
        what: &str,
    ) {
        let (rows, out, inp) = dims;
        let want = reference(w, x, rows, out, inp);
        for r in 0..rows {
            for n in 0..out {
                let mut bound = 1e-5f64;
                for b in 0..inp / block {
                    let xs = &x[r * inp + b * block..][..block];
                    let ws = &w[n * inp + b * block..][..block];
                    let step = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    bound +=
                        ws.iter().map(|v| f64::from(v.abs())).sum::<f64>() * f64::from(step) / 2.0;
                }
                let (g, e) = (got[r * out + n], want[r * out + n]);
                assert!(
                    f64::from((g - e).abs()) <= bound * 1.01,
                    "{what}: row {r} feature {n}: {g} vs {e} (bound {bound})"
                );
            }
        }
    }

    /// Weights on the wide codes' own grid (per block of 128, `d·k` with `k` in -127..=127 and
    /// ±127 present, `d` exact in f16): their codes are exact, so the only error left is the
    /// activations' rounding per block of 128. Sizes leave a partial tile (out = 45) and partial
    /// row groups (rows = 1, 3, 7, 13).
    #[test]
    fn wide_codes_match_the_f32_product_within_the_activation_rounding() {
        if !supported() {
            no_vnni();
            return;
        }
        let (out, inp) = (45, 256);
        let mut w = vec![0f32; out * inp];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for block in w.chunks_mut(BLOCK * WIDE) {
            // A multiple of 2^-14 below 0.06: exact in f16.
            let d = rng.random_range(16..1000) as f32 / 16384.0;
            for (j, v) in block.iter_mut().enumerate() {
                let k = match j {
                    0 => 127,
                    1 => -127,
                    _ => rng.random_range(-127..=127),
                };
                *v = d * k as f32;
            }
        }
        let p = PackedWeight::from_f32(&w, out, inp).unwrap();
        let mut row = vec![0f32; inp];
        for r in 0..out {
            p.row_into(r, &mut row);
            assert_eq!(row, w[r * inp..][..inp], "row {r}");
        }
        for rows in [1, 3, 7, 13] {
            let x = random(rows * inp, 8, 2.0);
            let got = p.matmul(&x, rows);
            assert_within_rounding(&got, &w, &x, (rows, out, inp), BLOCK * WIDE, "wide");
        }
        // Small weights (max |w| below 127·2⁻¹⁴, where the f16 step is subnormal) and arbitrary
        // ones: each unpacks within half a step (the f16 step at or above max|w|/127) of itself.
        for (scale, seed) in [(1e-3f32, 9), (0.3, 10)] {
            let w = random(out * inp, seed, scale);
            let p = PackedWeight::from_f32(&w, out, inp).unwrap();
            for r in 0..out {
                p.row_into(r, &mut row);
                let want = &w[r * inp..][..inp];
                for (got, want) in row.chunks(BLOCK * WIDE).zip(want.chunks(BLOCK * WIDE)) {
                    let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let step = half::f16::from_f32(amax / 127.0).to_f32().max(amax / 127.0);
                    for (g, e) in got.iter().zip(want) {
                        assert!(
                            (g - e).abs() <= step * 0.5001 + step * 0.01,
                            "scale {scale} row {r}: {g} vs {e} (step {step})"
                        );
                    }
                }
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
        let (rows, out, inp) = (33, 64, 640);
        let w = random(out * inp, 1, 0.05);
        let x = random(rows * inp, 2, 1.0);
        let got = PackedWeight::from_f32(&w, out, inp)
            .unwrap()
            .matmul(&x, rows);
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

    /// The packed kernel on GGUF blocks made by candle's quantizer (Q4_0, Q4_1, Q8_0): with
    /// inputs in blocks of 32 (96 inputs) each weight unpacks to candle's own dequantized value
    /// (the oracle for the file's weights); Q8_0 with inputs in blocks of 128 (256 inputs) is
    /// re-fitted, each weight within half a step (`max|w|/127` of its block of 128, in f16) of
    /// candle's. The product equals the f32 product of the unpacked weights within the
    /// activations' rounding. Sizes leave a partial tile (out = 45) and partial row groups
    /// (rows = 3, 7, 13); one row is the decoding case.
    #[test]
    fn packed_gguf_blocks_unpack_and_multiply_within_the_rounding() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::Device;
        if !supported() {
            no_vnni();
            return;
        }
        let out = 45;
        for (dtype, inp) in [
            (GgmlDType::Q4_0, 96),
            (GgmlDType::Q4_1, 96),
            (GgmlDType::Q8_0, 96),
            (GgmlDType::Q8_0, 256),
        ] {
            let w = random(out * inp, 3, 0.1);
            let t = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, dtype).unwrap();
            let wq: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let p = PackedWeight::from_gguf(dtype, &q.data().unwrap(), out, inp).unwrap();
            let what = format!("{dtype:?} with {inp} inputs");
            let mut unpacked = vec![0f32; out * inp];
            for (r, row) in unpacked.chunks_mut(inp).enumerate() {
                p.row_into(r, row);
                let file = &wq[r * inp..][..inp];
                if inp % (BLOCK * WIDE) == 0 {
                    for (b, (got, want)) in row
                        .chunks(BLOCK * WIDE)
                        .zip(file.chunks(BLOCK * WIDE))
                        .enumerate()
                    {
                        let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let half_step = half::f16::from_f32(amax / 127.0).to_f32() / 2.0;
                        for (g, e) in got.iter().zip(want) {
                            assert!(
                                (g - e).abs() <= half_step * 1.001 + 1e-7,
                                "{what} row {r} block {b}: {g} vs {e}"
                            );
                        }
                    }
                } else {
                    assert_eq!(row, file, "{what} row {r}");
                }
            }
            let block = if inp % (BLOCK * WIDE) == 0 {
                BLOCK * WIDE
            } else {
                BLOCK
            };
            for rows in [1, 3, 7, 8, 13] {
                let x = random(rows * inp, 4, 2.0);
                let got = p.matmul(&x, rows);
                assert_within_rounding(&got, &unpacked, &x, (rows, out, inp), block, &what);
            }
        }
        // A type the kernel does not read is refused.
        let t = Tensor::from_vec(random(out * 96, 3, 0.1), (out, 96), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_1).unwrap();
        assert!(PackedWeight::from_gguf(GgmlDType::Q8_1, &q.data().unwrap(), out, 96).is_none());
    }

    #[test]
    fn shapes_the_kernel_cannot_take_are_refused() {
        // Wide codes take whole blocks of 128 inputs.
        assert!(PackedWeight::from_f32(&[0.0; 128], 2, 64).is_none());
        assert_eq!(
            PackedWeight::from_f32(&[0.0; 256], 2, 128).is_some(),
            supported()
        );
    }
}

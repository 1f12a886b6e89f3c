//! `y = x · Wt` for a few rows of `x` (decoding: one new token per sequence) on the CPU, in f32.
//!
//! Decoding one token reads every weight once and does two flops per weight, so its speed is
//! the memory bandwidth's. A general matrix product (gemm) packs panels of the weight for reuse
//! that one row never gets. Here `Wt` (in, out) is cut into blocks of [`CHUNK`] inputs ×
//! [`TILE`] outputs, each a few contiguous runs of memory that one task streams once, four inputs
//! at a time, into its own partial sums; the partials are then added in block order. The blocks
//! do not depend on the number of threads, so neither does any output bit.
//!
//! Symbols: R rows of x (≤ [`MAX_ROWS`]), I inputs, O outputs.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Up to this many rows the weight is read once for all of them; more rows go to gemm.
pub const MAX_ROWS: usize = 4;

/// Inputs of one block: enough blocks for many threads even on narrow layers.
const CHUNK: usize = 128;

/// Outputs of one block: each of its rows of `Wt` is a run of up to 32 KiB (one run of the whole
/// block when the layer is at most this wide), and its partial sums (`R × TILE` f32) stay in L1/L2.
const TILE: usize = 8192;

/// One block of `Wt`: inputs `inputs`, outputs `c0..c0 + width` (`width` = the partial's length / R).
struct Block {
    inputs: std::ops::Range<usize>,
    c0: usize,
}

/// `x` (R, I) times `wt` (I, O) → (R, O), for CPU f32 tensors with at most [`MAX_ROWS`] rows;
/// `None` for anything else (the caller's matmul takes it).
pub fn forward(x: &Tensor, wt: &Tensor) -> Result<Option<Tensor>> {
    let (rows, inp) = x.dims2()?;
    let (w_inp, out) = wt.dims2()?;
    let eligible = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(1..=MAX_ROWS).contains(&rows) || w_inp != inp || !eligible(x) || !eligible(wt) {
        return Ok(None);
    }
    let (x, wt) = (x.contiguous()?, wt.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = wt.storage_and_layout();
    let (candle_core::Storage::Cpu(xc), candle_core::Storage::Cpu(wc)) = (&*xs, &*ws) else {
        return Ok(None);
    };
    let x_values = super::ops::cpu_f32(xc, xl)?;
    let y = gemv(x_values, rows, super::ops::cpu_f32(wc, wl)?, inp, out);
    Tensor::from_vec(y, (rows, out), x.device()).map(Some)
}

/// `x` (R, I) row-major times `wt` (I, O) row-major → (R, O) row-major.
pub fn gemv(x: &[f32], rows: usize, wt: &[f32], inp: usize, out: usize) -> Vec<f32> {
    assert!(
        (1..=MAX_ROWS).contains(&rows),
        "gemv takes 1..={MAX_ROWS} rows"
    );
    assert_eq!(x.len(), rows * inp, "x is (rows, inp)");
    assert_eq!(wt.len(), inp * out, "wt is (inp, out)");
    let (chunks, tiles) = (inp.div_ceil(CHUNK).max(1), out.div_ceil(TILE).max(1));
    let partials: Vec<Vec<f32>> = (0..chunks * tiles)
        .into_par_iter()
        .map(|task| {
            let (chunk, tile) = (task / tiles, task % tiles);
            let block = Block {
                inputs: chunk * CHUNK..((chunk + 1) * CHUNK).min(inp),
                c0: tile * TILE,
            };
            let mut acc = vec![0f32; rows * TILE.min(out - block.c0)];
            block_product(x, rows, wt, inp, out, &block, &mut acc);
            acc
        })
        .collect();
    let mut y = vec![0f32; rows * out];
    for (task, acc) in partials.iter().enumerate() {
        let c0 = (task % tiles) * TILE;
        let width = acc.len() / rows;
        for r in 0..rows {
            let dst = &mut y[r * out + c0..r * out + c0 + width];
            for (d, &a) in dst.iter_mut().zip(&acc[r * width..(r + 1) * width]) {
                *d += a;
            }
        }
    }
    y
}

/// One block's share of the product into `acc` (R, width), with the widest vector unit the CPU
/// has. The kernels use intrinsics rather than trusting the compiler to vectorize, so that a
/// debug-optimized build decodes as fast as a release one.
fn block_product(
    x: &[f32],
    rows: usize,
    wt: &[f32],
    inp: usize,
    out: usize,
    block: &Block,
    acc: &mut [f32],
) {
    let width = acc.len() / rows;
    assert!(block.c0 + width <= out && block.inputs.end <= inp);
    assert!(wt.len() == inp * out && x.len() == rows * inp);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; every pointer stays inside `x`, `wt` and `acc` (the
            // assert above and the loop bounds).
            return unsafe { tile_avx512(x, rows, wt, inp, out, block, acc) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above, with AVX2 and FMA.
            return unsafe { tile_avx2(x, rows, wt, inp, out, block, acc) };
        }
    }
    tile_scalar(x, rows, wt, inp, out, block, acc)
}

/// One kernel per vector unit, from one body: `$lanes` floats a vector, four rows of `Wt` per
/// pass fused into each accumulator vector; the columns past the last full vector and the
/// inputs past the last multiple of four go through the scalar loop.
macro_rules! tile_kernel {
    ($name:ident, $features:literal, $lanes:literal, $load:ident, $store:ident, $splat:ident, $fma:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(
            x: &[f32],
            rows: usize,
            wt: &[f32],
            inp: usize,
            out: usize,
            block: &Block,
            acc: &mut [f32],
        ) {
            use std::arch::x86_64::*;
            let width = acc.len() / rows;
            let full = width / $lanes * $lanes;
            let (i0, i1) = (block.inputs.start, block.inputs.end);
            let inp4 = i0 + (i1 - i0) / 4 * 4;
            let w = wt.as_ptr().add(block.c0);
            for i in (i0..inp4).step_by(4) {
                let w0 = w.add(i * out);
                let (w1, w2, w3) = (w0.add(out), w0.add(2 * out), w0.add(3 * out));
                for r in 0..rows {
                    let xr = &x[r * inp + i..r * inp + i + 4];
                    let (x0, x1, x2, x3) =
                        ($splat(xr[0]), $splat(xr[1]), $splat(xr[2]), $splat(xr[3]));
                    let a = acc.as_mut_ptr().add(r * width);
                    for j in (0..full).step_by($lanes) {
                        let mut v = $load(a.add(j));
                        v = $fma($load(w0.add(j)), x0, v);
                        v = $fma($load(w1.add(j)), x1, v);
                        v = $fma($load(w2.add(j)), x2, v);
                        v = $fma($load(w3.add(j)), x3, v);
                        $store(a.add(j), v);
                    }
                }
            }
            tile_rest(x, rows, wt, inp, out, block, acc, inp4, full);
        }
    };
}

tile_kernel!(
    tile_avx512,
    "avx512f",
    16,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps
);
tile_kernel!(
    tile_avx2,
    "avx2,fma",
    8,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps
);

/// Without a vector unit: every input, every column.
fn tile_scalar(
    x: &[f32],
    rows: usize,
    wt: &[f32],
    inp: usize,
    out: usize,
    block: &Block,
    acc: &mut [f32],
) {
    tile_rest(x, rows, wt, inp, out, block, acc, block.inputs.start, 0)
}

/// What the vector loops leave: columns `full..width` for the block's inputs before `inp4`, then
/// every column for its inputs from `inp4`.
#[allow(clippy::too_many_arguments)]
fn tile_rest(
    x: &[f32],
    rows: usize,
    wt: &[f32],
    inp: usize,
    out: usize,
    block: &Block,
    acc: &mut [f32],
    inp4: usize,
    full: usize,
) {
    let (width, c0) = (acc.len() / rows, block.c0);
    for i in block.inputs.clone() {
        let cols = if i < inp4 { full..width } else { 0..width };
        let w = &wt[i * out + c0..i * out + c0 + width];
        for r in 0..rows {
            let xi = x[r * inp + i];
            let a = &mut acc[r * width..(r + 1) * width];
            for j in cols.clone() {
                a[j] += xi * w[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product equals a plain f64 triple loop (the oracle: the definition of the product)
    /// within f32 round-off, for shapes that hit every edge: inputs not a multiple of four,
    /// outputs not a multiple of the tile or of a vector, one to four rows; through the dispatch
    /// (threads and tiles) and through each kernel this CPU can run, whole width at once.
    #[test]
    fn equals_the_definition_on_ragged_shapes() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        type Kernel = fn(&[f32], usize, &[f32], usize, usize, &Block, &mut [f32]);
        let mut kernels: Vec<(&str, Kernel)> = vec![("scalar", tile_scalar)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the feature (the kernel's bounds are the dispatch's).
                kernels.push(("avx512", |x, r, w, i, o, c, a| unsafe {
                    tile_avx512(x, r, w, i, o, c, a)
                }));
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                kernels.push(("avx2", |x, r, w, i, o, c, a| unsafe {
                    tile_avx2(x, r, w, i, o, c, a)
                }));
            }
        }
        for (inp, out) in [
            (1, 1),
            (3, 17),
            (7, 2050),
            (64, 4097),
            (130, 33),
            (300, 8200),
        ] {
            let wt: Vec<f32> = (0..inp * out).map(|_| next()).collect();
            for rows in 1..=MAX_ROWS {
                let x: Vec<f32> = (0..rows * inp).map(|_| next()).collect();
                let mut results = vec![("dispatch", gemv(&x, rows, &wt, inp, out))];
                for (name, kernel) in &kernels {
                    let mut acc = vec![0f32; rows * out];
                    let whole = Block {
                        inputs: 0..inp,
                        c0: 0,
                    };
                    kernel(&x, rows, &wt, inp, out, &whole, &mut acc);
                    results.push((name, acc));
                }
                for (name, y) in results {
                    for r in 0..rows {
                        for o in 0..out {
                            let want: f64 = (0..inp)
                                .map(|i| x[r * inp + i] as f64 * wt[i * out + o] as f64)
                                .sum();
                            let got = y[r * out + o] as f64;
                            assert!(
                                (got - want).abs() <= 1e-6 * (1.0 + want.abs()) * inp as f64,
                                "{name}: inp {inp} out {out} rows {rows} [{r},{o}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

//! `y = x Wᵀ + b` on the CPU in f32, for the projections of an inference-only decoder.
//!
//! Decoding one token reads every weight once and does two flops per weight, so its speed is
//! the memory bandwidth's. The weight is stored once, in panels of [`PANEL`] outputs: panel p
//! holds, input by input, the weights of outputs `p·PANEL..(p+1)·PANEL` (zeros past the last
//! output). One task streams a panel front to back, one run of memory, with the sums of up to
//! [`ROWS`] rows of x in registers, and writes its outputs once: no partial sums, no reduction.
//! More rows (a prompt) take each [`CHUNK`] of inputs of the panel from L1, [`ROWS`] at a time,
//! which makes the loop a register-blocked matrix product as well.
//!
//! Below [`GEMM_ROWS`] rows every output is the sum over the inputs in order, so no bit depends
//! on the number of threads, nor on which other rows share the product (a prompt through gemm
//! sums in gemm's order). The panels live in 2 MiB pages where the
//! kernel allows it (see [`huge_page_vec`]): streaming 4 KiB pages costs a TLB miss every 4 KiB.
//!
//! Symbols: R rows of x, I inputs, O outputs.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Outputs per panel: four 512-bit registers (eight 256-bit ones) of sums per row.
const PANEL: usize = 64;

/// Rows of x per pass over a chunk: 3 × 4 accumulators. (At four rows the dev profile, -O1,
/// keeps the sums on the stack rather than in registers.)
const ROWS: usize = 3;

/// From this many rows (a prompt) a product runs through gemm, panel by panel: it multiplies
/// many rows faster than the panel loop does at the dev profile's -O1. Fewer rows (decoding)
/// take the panel loop, whose outputs do not depend on the other rows of the batch.
const GEMM_ROWS: usize = 8;

/// Inputs per chunk of a panel: 64 × 64 weights, 16 KiB, which stay in L1 while every group of
/// rows passes over them (a prompt); the sums go to memory and back between chunks.
const CHUNK: usize = 64;

/// The weight of a frozen projection, packed in panels (see the module documentation).
#[derive(Debug)]
pub struct PanelWeight {
    inp: usize,
    out: usize,
    /// `out.div_ceil(PANEL)` panels of `inp × PANEL` values.
    data: Vec<f32>,
    /// One value per output, added as each output is written.
    bias: Option<Vec<f32>>,
}

impl PanelWeight {
    /// From `w` (O, I) row-major, as a linear layer stores its weight, and its bias (O).
    pub fn new(w: &[f32], bias: Option<Vec<f32>>, out: usize, inp: usize) -> Self {
        assert_eq!(w.len(), out * inp, "w is (out, inp)");
        assert!(
            bias.as_ref().is_none_or(|b| b.len() == out),
            "the bias has one value per output"
        );
        let mut data = huge_page_vec(out.div_ceil(PANEL) * PANEL * inp);
        data.par_chunks_mut(PANEL * inp.max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..PANEL.min(out - p * PANEL) {
                    let row = &w[(p * PANEL + c) * inp..][..inp];
                    for (i, &v) in row.iter().enumerate() {
                        panel[i * PANEL + c] = v;
                    }
                }
            });
        PanelWeight {
            inp,
            out,
            data,
            bias,
        }
    }

    /// From a weight (O, I) and a bias (O) of any float dtype on any device.
    pub fn from_tensors(w: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let bias = bias.map(f32s).transpose()?;
        // A CPU f32 weight is packed from its own storage: no transient copy of the matrix.
        if w.dtype() == DType::F32 && w.is_contiguous() {
            let (s, l) = w.storage_and_layout();
            if let candle_core::Storage::Cpu(cpu) = &*s {
                return Ok(Self::new(super::ops::cpu_f32(cpu, l)?, bias, out, inp));
            }
        }
        Ok(Self::new(&f32s(w)?, bias, out, inp))
    }

    pub fn inp(&self) -> usize {
        self.inp
    }

    pub fn out(&self) -> usize {
        self.out
    }

    /// The packed values, panel by panel (what one product of one row reads).
    pub fn values(&self) -> &[f32] {
        &self.data
    }

    /// `x` (R, I) row-major → `x Wᵀ + b` (R, O) row-major.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (inp, out) = (self.inp, self.out);
        assert_eq!(x.len(), rows * inp, "x is (rows, inp)");
        if rows >= GEMM_ROWS && inp > 0 {
            return self.matmul_prompt(x, rows);
        }
        let mut y = vec![0f32; rows * out];
        let panels = out.div_ceil(PANEL);
        // A few tasks per thread, so that a late thread does not hold up the product.
        let per_task = panels.div_ceil(4 * rayon::current_num_threads()).max(1);
        let y_at = Shared(y.as_mut_ptr());
        let task = |t: usize| {
            // The running sums of every row for one panel: carried from chunk to chunk of
            // inputs, so each output still sums its inputs in order, one fused multiply-add each.
            let mut sums = vec![[0f32; PANEL]; rows];
            for p in t * per_task..((t + 1) * per_task).min(panels) {
                let panel = &self.data[p * PANEL * inp..][..PANEL * inp];
                let (c0, width) = (p * PANEL, PANEL.min(out - p * PANEL));
                sums.iter_mut().for_each(|s| s.fill(0.0));
                for i0 in (0..inp).step_by(CHUNK) {
                    let n = CHUNK.min(inp - i0);
                    let chunk = &panel[i0 * PANEL..(i0 + n) * PANEL];
                    for r0 in (0..rows).step_by(ROWS) {
                        let group = ROWS.min(rows - r0);
                        let x = &x[r0 * inp + i0..];
                        panel_product(x, inp, chunk, &mut sums[r0..r0 + group]);
                    }
                }
                for (r, s) in sums.iter().enumerate() {
                    let dst = r * out + c0;
                    // SAFETY: `dst..dst + width` lies in `y` (row r < rows, columns c0 + width ≤
                    // out), and no other task writes panel p's columns.
                    let dst = unsafe { std::slice::from_raw_parts_mut(y_at.at(dst), width) };
                    self.write(dst, s, c0);
                }
            }
        };
        let tasks = panels.div_ceil(per_task);
        if rows * inp * out < 1 << 16 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
        y
    }

    /// [`PanelWeight::matmul`] for a prompt: each panel is a contiguous (I, PANEL) matrix, which
    /// gemm multiplies (packing it for its own cache blocking), into the panel's columns.
    fn matmul_prompt(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (inp, out) = (self.inp, self.out);
        let mut y = vec![0f32; rows * out];
        let mut part = vec![0f32; rows * PANEL];
        for (p, panel) in self.data.chunks_exact(PANEL * inp).enumerate() {
            let dims = (rows, PANEL, inp);
            super::ops::matmul_f32(dims, &mut part, false, (x, 1, inp), (panel, 1, PANEL));
            let (c0, width) = (p * PANEL, PANEL.min(out - p * PANEL));
            for (dst, src) in y.chunks_exact_mut(out).zip(part.chunks_exact(PANEL)) {
                self.write(&mut dst[c0..c0 + width], src, c0);
            }
        }
        y
    }

    /// One row's outputs `c0..c0 + dst.len()` from a panel's sums, plus the bias.
    fn write(&self, dst: &mut [f32], sums: &[f32], c0: usize) {
        match &self.bias {
            Some(b) => {
                for ((d, s), b) in dst.iter_mut().zip(sums).zip(&b[c0..]) {
                    *d = s + b;
                }
            }
            None => dst.copy_from_slice(&sums[..dst.len()]),
        }
    }

    /// `x Wᵀ + b` for a CPU f32 tensor `x` (R, I) → (R, O).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (rows, inp) = x.dims2()?;
        if inp != self.inp {
            candle_core::bail!(
                "panel product: x has {inp} features, the weight {}",
                self.inp
            );
        }
        let (s, l) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*s else {
            candle_core::bail!("panel product runs on the CPU");
        };
        let y = self.matmul(super::ops::cpu_f32(cpu, l)?, rows);
        Tensor::from_vec(y, (rows, self.out), x.device())
    }
}

/// The output buffer, written by several tasks at disjoint columns.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: tasks write disjoint ranges (see `PanelWeight::matmul`), and `y` outlives them.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The element `i` (a method, so that closures capture the whole wrapper, not its field).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `sums[g] += x[g] · chunk` for the rows g of `sums`, the row of x g starting at `g·stride`,
/// over the chunk's inputs (its rows of PANEL weights) in order, with the widest vector unit
/// the CPU has. The kernels use intrinsics rather than trusting the compiler to vectorize, so
/// that a debug-optimized build decodes as fast as a release one.
fn panel_product(x: &[f32], stride: usize, chunk: &[f32], sums: &mut [[f32; PANEL]]) {
    let (n, group) = (chunk.len() / PANEL, sums.len());
    assert!((1..=ROWS).contains(&group) && x.len() >= (group - 1) * stride + n);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the kernel reads n values of `group` rows of `x` and
            // the chunk's n rows (the assert above).
            unsafe {
                match group {
                    1 => panel_avx512::<1>(x, stride, chunk, sums),
                    2 => panel_avx512::<2>(x, stride, chunk, sums),
                    _ => panel_avx512::<3>(x, stride, chunk, sums),
                }
            }
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // 8 registers of sums per row: one row at a time fits AVX2's 16 registers.
            for (g, s) in sums.iter_mut().enumerate() {
                // SAFETY: as above, with AVX2 and FMA, for one row.
                unsafe {
                    panel_avx2::<1>(&x[g * stride..], stride, chunk, std::slice::from_mut(s))
                };
            }
            return;
        }
    }
    for (g, s) in sums.iter_mut().enumerate() {
        for (i, w) in chunk.chunks_exact(PANEL).enumerate() {
            let xi = x[g * stride + i];
            for (s, w) in s.iter_mut().zip(w) {
                *s = w.mul_add(xi, *s);
            }
        }
    }
}

/// One kernel per vector unit, from one body: `R` rows × PANEL/`$lanes` registers of sums,
/// one fused multiply-add per weight and row, inputs in order.
macro_rules! panel_kernel {
    ($name:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(
            x: &[f32],
            stride: usize,
            chunk: &[f32],
            sums: &mut [[f32; PANEL]],
        ) {
            use std::arch::x86_64::*;
            const V: usize = PANEL / $lanes;
            let n = chunk.len() / PANEL;
            assert!(sums.len() >= R && x.len() >= (R - 1) * stride + n);
            let mut acc = [[$zero(); V]; R];
            for r in 0..R {
                for v in 0..V {
                    acc[r][v] = $load(sums[r].as_ptr().add(v * $lanes));
                }
            }
            let (w, xp) = (chunk.as_ptr(), x.as_ptr());
            for i in 0..n {
                let row = w.add(i * PANEL);
                for r in 0..R {
                    let xr = $splat(*xp.add(r * stride + i));
                    for v in 0..V {
                        acc[r][v] = $fma($load(row.add(v * $lanes)), xr, acc[r][v]);
                    }
                }
            }
            for r in 0..R {
                for v in 0..V {
                    $store(sums[r].as_mut_ptr().add(v * $lanes), acc[r][v]);
                }
            }
        }
    };
}

panel_kernel!(
    panel_avx512,
    "avx512f",
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps
);
panel_kernel!(
    panel_avx2,
    "avx2,fma",
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps
);

/// `n` default values in memory advised into transparent huge pages (`madvise`), before any of
/// it is touched: a weight that is streamed once per token then costs a TLB miss every 2 MiB
/// rather than every 4 KiB. Where the kernel does not take the advice, ordinary pages.
pub(crate) fn huge_page_vec<T: Copy + Default>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let (first, end) = (
            start.next_multiple_of(HUGE),
            (start + n * std::mem::size_of::<T>()) / HUGE * HUGE,
        );
        if end > first {
            // SAFETY: the range lies inside the allocation just made; madvise only advises.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    v.resize(n, T::default());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product equals a plain f64 triple loop (the oracle: the definition of the product)
    /// within f32 round-off, for shapes that hit every edge: outputs not a multiple of a panel
    /// or of a vector, one input, one to nine rows (whole groups, a ragged last group, and prompts through gemm), with
    /// and without a bias; through the dispatch and through each kernel this CPU can run.
    /// Then: below a prompt's size a row's outputs do not depend on the rows beside it, nor on the
    /// thread count.
    #[test]
    fn equals_the_definition_on_ragged_shapes() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (inp, out) in [(1, 1), (3, 17), (7, 130), (64, 4097), (130, 33), (300, 200)] {
            let w: Vec<f32> = (0..inp * out).map(|_| next()).collect();
            let bias: Vec<f32> = (0..out).map(|_| next()).collect();
            for b in [None, Some(bias.as_slice())] {
                let packed = PanelWeight::new(&w, b.map(<[f32]>::to_vec), out, inp);
                for rows in 1..=9 {
                    let x: Vec<f32> = (0..rows * inp).map(|_| next()).collect();
                    let y = packed.matmul(&x, rows);
                    for r in 0..rows {
                        for o in 0..out {
                            let want: f64 = (0..inp)
                                .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                                .sum::<f64>()
                                + b.map_or(0.0, |b| b[o] as f64);
                            let got = y[r * out + o] as f64;
                            assert!(
                                (got - want).abs() <= 1e-6 * (1.0 + want.abs()) * inp as f64,
                                "inp {inp} out {out} rows {rows} [{r},{o}]: {got} vs {want}"
                            );
                        }
                    }
                    // Each row alone gives the same bits as in a decoding batch.
                    for r in (0..rows).filter(|_| rows < GEMM_ROWS) {
                        let alone = packed.matmul(&x[r * inp..(r + 1) * inp], 1);
                        assert_eq!(alone, y[r * out..(r + 1) * out], "row {r} of {rows}");
                    }
                }
            }
        }
        let (inp, out) = (256, 3000);
        let w: Vec<f32> = (0..inp * out).map(|_| next()).collect();
        let x: Vec<f32> = (0..3 * inp).map(|_| next()).collect();
        let packed = PanelWeight::new(&w, None, out, inp);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        assert_eq!(
            one.install(|| packed.matmul(&x, 3)),
            three.install(|| packed.matmul(&x, 3))
        );
    }

    /// Each kernel this CPU runs gives the portable loop's bits (both use a fused multiply-add
    /// per weight, inputs in order): the vector units change the speed, not the result.
    #[test]
    fn kernels_equal_the_portable_loop() {
        let (inp, rows) = (37, ROWS);
        let panel: Vec<f32> = (0..inp * PANEL)
            .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
            .collect();
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 104729) % 1000) as f32 / 991.0 - 0.5)
            .collect();
        let mut want = [[0f32; PANEL]; ROWS];
        for (g, s) in want.iter_mut().enumerate() {
            for (i, w) in panel.chunks_exact(PANEL).enumerate() {
                for (s, w) in s.iter_mut().zip(w) {
                    *s = w.mul_add(x[g * inp + i], *s);
                }
            }
        }
        let mut got = [[0f32; PANEL]; ROWS];
        panel_product(&x, inp, &panel, &mut got);
        assert_eq!(got, want, "dispatch");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            for (g, row) in x.chunks_exact(inp).enumerate() {
                let mut one = [[0f32; PANEL]; 1];
                // SAFETY: the CPU has AVX2 and FMA; one row of `inp` values, a panel of `inp` rows.
                unsafe { panel_avx2::<1>(row, inp, &panel, &mut one) };
                assert_eq!(one[0], want[g], "avx2 row {g}");
            }
        }
    }
}

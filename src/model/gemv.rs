//! `y = x Wᵀ + b` on the CPU in f32, for the projections of an inference-only decoder.
//!
//! Decoding one token reads every weight once and does two flops per weight, so its speed is
//! the memory bandwidth's. The weight is stored once, in panels of [`PANEL`] outputs: panel p
//! holds, input by input, the weights of outputs `p·PANEL..(p+1)·PANEL` (zeros past the last
//! output). One task streams a panel front to back, one run of memory, with the sums of up to
//! [`ROWS`] rows of x in registers, and writes its outputs once: no partial sums, no reduction.
//! More rows take the same panel again from cache, [`ROWS`] at a time, which makes the loop a
//! register-blocked matrix product for prompts as well.
//!
//! Every output is the sum over the inputs in order, so no bit depends on the number of
//! threads, nor on which other rows share the product. The panels live in 2 MiB pages where the
//! kernel allows it (see [`huge_page_vec`]): streaming 4 KiB pages costs a TLB miss every 4 KiB.
//!
//! Symbols: R rows of x, I inputs, O outputs.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Outputs per panel: four 512-bit registers (eight 256-bit ones) of sums per row.
const PANEL: usize = 64;

/// Rows of x per pass over a panel: 4 × 4 accumulators, half of AVX-512's registers.
const ROWS: usize = 4;

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
        let (inp, out, bias) = (self.inp, self.out, self.bias.as_deref());
        assert_eq!(x.len(), rows * inp, "x is (rows, inp)");
        let mut y = vec![0f32; rows * out];
        let panels = out.div_ceil(PANEL);
        // A few tasks per thread, so that a late thread does not hold up the product.
        let per_task = panels.div_ceil(4 * rayon::current_num_threads()).max(1);
        let y_at = Shared(y.as_mut_ptr());
        let task = |t: usize| {
            let mut sums = [[0f32; PANEL]; ROWS];
            for p in t * per_task..((t + 1) * per_task).min(panels) {
                let panel = &self.data[p * PANEL * inp..][..PANEL * inp];
                let (c0, width) = (p * PANEL, PANEL.min(out - p * PANEL));
                for r0 in (0..rows).step_by(ROWS) {
                    let group = ROWS.min(rows - r0);
                    panel_product(&x[r0 * inp..(r0 + group) * inp], group, panel, &mut sums);
                    for (g, s) in sums[..group].iter().enumerate() {
                        let dst = (r0 + g) * out + c0;
                        // SAFETY: `dst..dst + width` lies in `y` (row r0 + g < rows, columns
                        // c0 + width ≤ out), and no other task writes panel p's columns.
                        let dst = unsafe { std::slice::from_raw_parts_mut(y_at.at(dst), width) };
                        match bias {
                            Some(b) => {
                                for ((d, s), b) in dst.iter_mut().zip(s).zip(&b[c0..]) {
                                    *d = s + b;
                                }
                            }
                            None => dst.copy_from_slice(&s[..width]),
                        }
                    }
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

/// `sums[g] = x[g] · panel` for the `group` rows of `x` (each I values), all PANEL outputs, with
/// the widest vector unit the CPU has. The kernels use intrinsics rather than trusting the
/// compiler to vectorize, so that a debug-optimized build decodes as fast as a release one.
fn panel_product(x: &[f32], group: usize, panel: &[f32], sums: &mut [[f32; PANEL]; ROWS]) {
    let inp = panel.len() / PANEL;
    assert!(x.len() == group * inp && (1..=ROWS).contains(&group));
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the kernel reads `group` rows of `x` and `inp` rows
            // of the panel (the assert above).
            unsafe {
                match group {
                    1 => panel_avx512::<1>(x, panel, sums),
                    2 => panel_avx512::<2>(x, panel, sums),
                    3 => panel_avx512::<3>(x, panel, sums),
                    _ => panel_avx512::<4>(x, panel, sums),
                }
            }
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // 8 registers of sums per row: one row at a time fits AVX2's 16 registers.
            for (g, row) in x.chunks_exact(inp.max(1)).enumerate().take(group) {
                let mut one = [[0f32; PANEL]; 1];
                // SAFETY: as above, with AVX2 and FMA, for one row.
                unsafe { panel_avx2::<1>(row, panel, &mut one) };
                sums[g] = one[0];
            }
            return;
        }
    }
    for (g, s) in sums.iter_mut().enumerate().take(group) {
        s.fill(0.0);
        for (i, w) in panel.chunks_exact(PANEL).enumerate() {
            let xi = x[g * inp + i];
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
        unsafe fn $name<const R: usize>(x: &[f32], panel: &[f32], sums: &mut [[f32; PANEL]]) {
            use std::arch::x86_64::*;
            const V: usize = PANEL / $lanes;
            let inp = panel.len() / PANEL;
            assert!(sums.len() >= R && x.len() >= R * inp);
            let mut acc = [[$zero(); V]; R];
            let (w, xp) = (panel.as_ptr(), x.as_ptr());
            for i in 0..inp {
                let row = w.add(i * PANEL);
                for r in 0..R {
                    let xr = $splat(*xp.add(r * inp + i));
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
    /// or of a vector, one input, one to nine rows (groups of four and a ragged last group), with
    /// and without a bias; through the dispatch and through each kernel this CPU can run.
    /// Then: a row's outputs do not depend on the rows beside it, nor on the thread count.
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
                    // Each row alone gives the same bits as in the batch.
                    for r in 0..rows {
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
        let (inp, rows) = (37, 4);
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
        panel_product(&x, rows, &panel, &mut got);
        assert_eq!(got, want, "dispatch");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            for (g, row) in x.chunks_exact(inp).enumerate() {
                let mut one = [[0f32; PANEL]; 1];
                // SAFETY: the CPU has AVX2 and FMA; one row of `inp` values, a panel of `inp` rows.
                unsafe { panel_avx2::<1>(row, &panel, &mut one) };
                assert_eq!(one[0], want[g], "avx2 row {g}");
            }
        }
    }
}

//! Softmax over the last dimension, gelu_new (tanh approximation) and LayerNorm / RMSNorm as
//! one-pass CPU kernels that carry their own backward.
//!
//! candle's fused softmax has no backward, and its composed softmax and gelu backward take about a
//! dozen passes over the tensor (each a fresh allocation): for a small phi these were a tenth of a
//! training step. Here each direction is one pass. Other devices and dtypes use candle's composed
//! ops, which compute the same functions.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// Elements per rayon task: big enough that splitting costs nothing next to the work.
const GRAIN: usize = 1 << 14;

/// Softmax over the last dimension; trains on every device.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if is_cpu_f32(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// gelu_new: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`; trains on every device.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if is_cpu_f32(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu()
    }
}

fn is_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The f32 values of a contiguous CPU tensor.
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// `row ← scale · softmax(row)`; returns the row's max and Σ exp(x − max), so its log-sum-exp is
/// `max + ln(sum)`.
pub(crate) fn softmax_in_place(row: &mut [f32], scale: f32) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = scale / sum;
    row.iter_mut().for_each(|x| *x *= inv);
    (max, sum)
}

/// `acc += x`, elementwise.
pub(crate) fn add_assign(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "phigen-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = last_dim(l);
        let mut out = cpu_f32(s, l)?.to_vec();
        out.par_chunks_mut(v)
            .with_min_len(GRAIN / v)
            .for_each(|row| {
                softmax_in_place(row, 1.0);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// ∂x = y ⊙ (∂y − Σ ∂y ⊙ y) per row.
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "phigen-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let v = last_dim(yl);
        let y = cpu_f32(ys, yl)?;
        let mut out = cpu_f32(gs, gl)?.to_vec();
        out.par_chunks_mut(v)
            .zip(y.par_chunks(v))
            .with_min_len(GRAIN / v)
            .for_each(|(g, y)| {
                let dot: f32 = g.iter().zip(y).map(|(g, y)| g * y).sum();
                g.iter_mut().zip(y).for_each(|(g, y)| *g = y * (*g - dot));
            });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;

/// tanh through one `exp` (libm's `tanhf` costs about twice as much); absolute error below 1e-7,
/// exactly ±1 where `exp` overflows or vanishes.
fn tanh(y: f32) -> f32 {
    1.0 - 2.0 / ((2.0 * y).exp() + 1.0)
}

/// gelu_new of one value (the kernel below, for callers that hold raw buffers).
pub(crate) fn gelu_tanh_one(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + CUBIC * x * x * x)))
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "phigen-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = cpu_f32(s, l)?.to_vec();
        out.par_chunks_mut(GRAIN).for_each(|xs| {
            for x in xs {
                let t = tanh(SQRT_2_OVER_PI * (*x + CUBIC * *x * *x * *x));
                *x *= 0.5 * (1.0 + t);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// ∂x = ∂y · (½(1 + t) + ½·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)), t = tanh(√(2/π)(x + 0.044715x³)).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "phigen-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(xs, xl)?;
        let mut out = cpu_f32(gs, gl)?.to_vec();
        out.par_chunks_mut(GRAIN)
            .zip(x.par_chunks(GRAIN))
            .for_each(|(g, x)| {
                for (g, &x) in g.iter_mut().zip(x) {
                    let x2 = x * x;
                    let t = tanh(SQRT_2_OVER_PI * (x + CUBIC * x2 * x));
                    let dt = (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x2);
                    *g *= 0.5 * (1.0 + t) + 0.5 * x * dt;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// LayerNorm (`bias` given: centred, then scaled and shifted) or RMSNorm (no bias) over the last
/// dimension, `None` where the fused kernel does not apply (not all CPU f32): the caller composes.
pub fn norm(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !(is_cpu_f32(x) && is_cpu_f32(weight) && bias.is_none_or(is_cpu_f32)) {
        return Ok(None);
    }
    let zero;
    let b = match bias {
        Some(b) => b,
        None => {
            zero = weight.zeros_like()?;
            &zero
        }
    };
    let op = Norm {
        centre: bias.is_some(),
        eps: eps as f32,
    };
    Ok(Some(x.contiguous()?.apply_op3(weight, b, op)?))
}

#[derive(Clone, Copy)]
struct Norm {
    /// LayerNorm: subtract the mean and add a bias; RMSNorm: neither.
    centre: bool,
    eps: f32,
}

impl Norm {
    /// The normalised row (x − mean)·rstd (mean 0 for RMSNorm) written to `out`; returns rstd.
    fn normalise(&self, x: &[f32], out: &mut [f32]) -> f32 {
        let c = x.len() as f32;
        let mean = if self.centre {
            x.iter().sum::<f32>() / c
        } else {
            0.0
        };
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c;
        let rstd = 1.0 / (var + self.eps).sqrt();
        out.iter_mut()
            .zip(x)
            .for_each(|(o, v)| *o = (v - mean) * rstd);
        rstd
    }
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "phigen-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = last_dim(xl);
        let (x, w, b) = (cpu_f32(xs, xl)?, cpu_f32(ws, wl)?, cpu_f32(bs, bl)?);
        if w.len() != c || b.len() != c {
            candle_core::bail!(
                "norm over {c} features with {} weights, {} biases",
                w.len(),
                b.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .with_min_len(GRAIN / c)
            .for_each(|(y, x)| {
                self.normalise(x, y);
                for ((y, w), b) in y.iter_mut().zip(w).zip(b) {
                    *y = *y * w + b;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = weight.elem_count();
        let n = x.elem_count() / c;
        let op = NormGrad { norm: *self };
        // One buffer: ∂x (n·c), then ∂weight (c), then ∂bias (c).
        let all = x.apply_op3_no_bwd(weight, &grad.contiguous()?, &op)?;
        let dx = all.narrow(0, 0, n * c)?.reshape(x.shape())?;
        let dw = all.narrow(0, n * c, c)?.reshape(weight.shape())?;
        let db = all.narrow(0, n * c + c, c)?.reshape(weight.shape())?;
        Ok((Some(dx), Some(dw), self.centre.then_some(db)))
    }
}

/// Per row, with x̂ the normalised row and ĝ = ∂y ⊙ weight:
/// ∂x = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂)) (RMSNorm: without the mean(ĝ) term);
/// ∂weight = Σ_rows ∂y ⊙ x̂; ∂bias = Σ_rows ∂y.
struct NormGrad {
    norm: Norm,
}

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        "phigen-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = last_dim(xl);
        let (x, w, g) = (cpu_f32(xs, xl)?, cpu_f32(ws, wl)?, cpu_f32(gs, gl)?);
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, _) = out.split_at_mut(x.len());
        let (dw, db) = dx
            .par_chunks_mut(c)
            .zip(x.par_chunks(c).zip(g.par_chunks(c)))
            .with_min_len(GRAIN / c)
            .fold(
                || (vec![0f32; c], vec![0f32; c]),
                |(mut dw, mut db), (dx, (x, g))| {
                    let rstd = self.norm.normalise(x, dx); // dx holds x̂ for now
                    let (mut mean_g, mut mean_gx) = (0.0f32, 0.0f32);
                    for i in 0..c {
                        dw[i] += g[i] * dx[i];
                        db[i] += g[i];
                        let gh = g[i] * w[i];
                        mean_g += gh;
                        mean_gx += gh * dx[i];
                    }
                    let (mean_g, mean_gx) = (
                        if self.norm.centre {
                            mean_g / c as f32
                        } else {
                            0.0
                        },
                        mean_gx / c as f32,
                    );
                    for i in 0..c {
                        dx[i] = rstd * (g[i] * w[i] - mean_g - dx[i] * mean_gx);
                    }
                    (dw, db)
                },
            )
            .reduce(
                || (vec![0f32; c], vec![0f32; c]),
                |(mut dw, mut db), (dw2, db2)| {
                    add_assign(&mut dw, &dw2);
                    add_assign(&mut db, &db2);
                    (dw, db)
                },
            );
        let n = x.len();
        out[n..n + c].copy_from_slice(&dw);
        out[n + c..].copy_from_slice(&db);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// `dst (m×n, row-major) = [dst +] lhs (m×k) · rhs (k×n)`, each operand given as
/// (values, column stride, row stride), on candle's thread count.
pub(crate) fn matmul_f32(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    (lhs, lhs_cs, lhs_rs): (&[f32], usize, usize),
    (rhs, rhs_cs, rhs_rs): (&[f32], usize, usize),
) {
    // The last element each operand is read or written at must lie inside its slice.
    let last = |rows: usize, cols: usize, cs: usize, rs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && n > 0 && k > 0);
    assert!(last(m, n, 1, n) < dst.len());
    assert!(last(m, k, lhs_cs, lhs_rs) < lhs.len());
    assert!(last(k, n, rhs_cs, rhs_rs) < rhs.len());
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assertions above keep every access inside its slice, and `dst` is a unique
    // borrow, so it overlaps neither operand. gemm computes dst = alpha·dst + beta·lhs·rhs,
    // reading dst only when asked to.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::model::tests::max_abs_diff as max_diff;

    /// Each kernel against candle's composed ops (the oracle: candle's own softmax and gelu with
    /// their backward), forward values and the gradient of a weighted sum, on a (3, 5, 7, 40)
    /// tensor with a row of -inf entries but one (a masked attention row).
    #[test]
    fn kernels_equal_candle_composed_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let mut values = Tensor::randn(0f32, 3.0, (3, 5, 7, 40), &dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        values[1..40].fill(f32::NEG_INFINITY);
        let x = Var::from_vec(values, (3, 5, 7, 40), &dev).unwrap();
        // gelu of -inf is NaN in both: it gets the finite values.
        let finite = Var::from_tensor(&x.as_tensor().clamp(-1e4f32, 1e4f32).unwrap()).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (3, 5, 7, 40), &dev).unwrap();
        type Op = fn(&Tensor) -> Result<Tensor>;
        let cases: [(Op, Op, &Var); 2] = [
            (
                softmax_last_dim,
                |x| candle_nn::ops::softmax(x, D::Minus1),
                &x,
            ),
            (gelu_tanh, |x| x.gelu(), &finite),
        ];
        for (ours, theirs, input) in cases {
            let (a, b) = (ours(input).unwrap(), theirs(input).unwrap());
            assert!(max_diff(&a, &b) < 1e-5, "forward differs");
            let ga = (a * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (b * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (ga, gb) = (ga.get(input).unwrap(), gb.get(input).unwrap());
            assert!(
                max_diff(ga, gb) < 1e-4,
                "gradient differs by {}",
                max_diff(ga, gb)
            );
        }
    }

    /// The fused LayerNorm and RMSNorm against candle-nn's composed `layer_norm_slow` /
    /// `rms_norm_slow` (with their backward): outputs and the gradients of x, weight and bias.
    #[test]
    fn norm_equals_candle_composed_norms() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], mean: f32| {
            Var::from_tensor(&Tensor::randn(mean, 2.0, shape, &dev).unwrap()).unwrap()
        };
        let (x, w, b) = (var(&[4, 9, 48], 1.5), var(&[48], 1.0), var(&[48], 0.0));
        let weights = Tensor::randn(0f32, 1.0, (4, 9, 48), &dev).unwrap();
        for bias in [Some(&b), None] {
            let ours = norm(
                x.as_tensor(),
                w.as_tensor(),
                bias.map(|b| b.as_tensor()),
                1e-5,
            )
            .unwrap()
            .expect("CPU f32 is fused");
            let theirs = match bias {
                Some(b) => candle_nn::ops::layer_norm_slow(
                    x.as_tensor(),
                    w.as_tensor(),
                    b.as_tensor(),
                    1e-5,
                ),
                None => candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5),
            }
            .unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-5, "forward differs");
            let ga = (ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (theirs * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let vars = if bias.is_some() {
                vec![&x, &w, &b]
            } else {
                vec![&x, &w]
            };
            for v in vars {
                let (a, c) = (
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    max_diff(a, c) < 1e-4,
                    "gradient differs by {}",
                    max_diff(a, c)
                );
            }
            assert!(bias.is_some() || ga.get(b.as_tensor()).is_none());
        }
    }
}

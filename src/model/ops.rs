//! Softmax over the last dimension and gelu_new (tanh approximation) as one-pass CPU kernels that
//! carry their own backward.
//!
//! candle's fused softmax has no backward, and its composed softmax and gelu backward take about a
//! dozen passes over the tensor (each a fresh allocation): for a small phi these were a tenth of a
//! training step. Here each direction is one pass. Other devices and dtypes use candle's composed
//! ops, which compute the same functions.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
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
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
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

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "phigen-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = cpu_f32(s, l)?.to_vec();
        out.par_chunks_mut(GRAIN).for_each(|xs| {
            for x in xs {
                let t = (SQRT_2_OVER_PI * (*x + CUBIC * *x * *x * *x)).tanh();
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
                    let t = (SQRT_2_OVER_PI * (x + CUBIC * x2 * x)).tanh();
                    let dt = (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x2);
                    *g *= 0.5 * (1.0 + t) + 0.5 * x * dt;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

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
            let (a, b) = (ours(&input).unwrap(), theirs(&input).unwrap());
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
            let (ga, gb) = (ga.get(&input).unwrap(), gb.get(&input).unwrap());
            assert!(
                max_diff(ga, gb) < 1e-4,
                "gradient differs by {}",
                max_diff(ga, gb)
            );
        }
    }
}

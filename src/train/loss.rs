//! Next-token cross-entropy with a fused CPU kernel.
//!
//! The logits of a step are the largest tensor by far (B·T × V: 2048 × 50,304 floats = 412 MB for a
//! small batch). Composed from candle ops, log-softmax and its backward make about a dozen passes
//! and as many fresh allocations of that size; this op makes one pass forward (row max, log-sum-exp,
//! picked logit) and one backward (softmax − one-hot, scaled), both parallel over rows. Other
//! devices and dtypes use the composed ops (`candle_nn::loss::cross_entropy`).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Mean cross-entropy of `logits` (N, V) against `targets` (N) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 {
        return candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, targets);
    }
    let targets = Arc::new(targets.to_vec1::<u32>()?);
    logits.contiguous()?.apply_op1(CrossEntropy { targets })
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("cross-entropy needs contiguous logits".into()))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

struct CrossEntropy {
    targets: Arc<Vec<u32>>,
}

/// Rows of (N, V) logits and their targets, checked.
fn rows<'a>(s: &'a CpuStorage, l: &Layout, targets: &[u32]) -> Result<(&'a [f32], usize)> {
    let (n, v) = l.shape().dims2()?;
    if n != targets.len() {
        candle_core::bail!(
            "cross-entropy: {n} rows of logits, {} targets",
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross-entropy: target {t} is beyond the {v} logits");
    }
    Ok((contiguous(s, l)?, v))
}

/// log Σ exp(row).
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, v) = rows(s, l, &self.targets)?;
        let total: f64 = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| (log_sum_exp(row) - row[t as usize]) as f64)
            .sum();
        let mean = (total / self.targets.len().max(1) as f64) as f32;
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let scale =
            grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.targets.len().max(1) as f32;
        let grad = arg.apply_op1_no_bwd(&CrossEntropyGrad {
            targets: Arc::clone(&self.targets),
            scale,
        })?;
        Ok(Some(grad))
    }
}

/// (softmax(row) − one_hot(target)) · scale, row by row.
struct CrossEntropyGrad {
    targets: Arc<Vec<u32>>,
    scale: f32,
}

impl CustomOp1 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, v) = rows(s, l, &self.targets)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(self.targets.par_iter())
            .for_each(|((g, row), &t)| {
                let lse = log_sum_exp(row);
                for (gi, &xi) in g.iter_mut().zip(row) {
                    *gi = (xi - lse).exp() * self.scale;
                }
                g[t as usize] -= self.scale;
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op against candle's composed cross-entropy: same loss, same gradient.
    #[test]
    fn fused_equals_composed_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (37, 101), &dev).unwrap())).unwrap();
        let t = Tensor::from_vec(
            (0..37u32).map(|i| (i * 13) % 101).collect::<Vec<_>>(),
            37,
            &dev,
        )
        .unwrap();
        let fused = cross_entropy(x.as_tensor(), &t).unwrap();
        let composed = candle_nn::loss::cross_entropy(x.as_tensor(), &t).unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let ga = (fused * 2.0)
            .unwrap()
            .backward()
            .unwrap()
            .remove(x.as_tensor())
            .unwrap();
        let gb = (composed * 2.0)
            .unwrap()
            .backward()
            .unwrap()
            .remove(x.as_tensor())
            .unwrap();
        let diff: f32 = (ga - gb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6, "gradients differ by {diff}");
    }
}

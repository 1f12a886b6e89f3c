//! Next-token cross-entropy, fused with the LM head on the CPU.
//!
//! The logits of a step are the largest tensor by far (B·T × V: 2048 × 50,304 floats = 412 MB for a
//! small batch). Composed from candle ops, the head, log-softmax and their backward make about a
//! dozen passes over that size and as many fresh allocations (candle's backprop also starts every
//! gradient from zeros). Here the head and the loss run over chunks of rows, and the gradients of
//! the hidden states, the head weight and bias are computed in the same pass (the loss is a scalar,
//! so they only need scaling by its incoming gradient later): no logits-sized tensor ever exists,
//! and the FLOPs are those of the unfused head. Other devices and dtypes use composed ops.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows of logits per chunk: 256 × 50,304 floats ≈ 51 MB.
const CHUNK_ROWS: usize = 256;

/// Mean cross-entropy of `hidden · weightᵀ + bias` (N, C) × (V, C) against `targets` (N) u32.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
) -> Result<Tensor> {
    let fused =
        hidden.device().is_cpu() && hidden.dtype() == DType::F32 && weight.dtype() == DType::F32;
    if !fused {
        let logits = hidden.matmul(&weight.t()?)?;
        let logits = match bias {
            Some(b) => logits.broadcast_add(b)?,
            None => logits,
        };
        return candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, targets);
    }
    let targets = targets.to_vec1::<u32>()?;
    let (n, _) = hidden.dims2()?;
    let (h, w) = (hidden.detach(), weight.detach());
    let scale = 1.0 / n.max(1) as f32;
    let (mut loss, mut grad_h, mut grad_w, mut grad_b) =
        (0.0f64, Vec::new(), None::<Tensor>, None::<Tensor>);
    for start in (0..n).step_by(CHUNK_ROWS) {
        let k = CHUNK_ROWS.min(n - start);
        let hc = h.narrow(0, start, k)?; //                                                  (k, C)
        let mut logits = hc.matmul(&w.t()?)?; //                                              (k, V)
        if let Some(b) = bias {
            logits = logits.broadcast_add(&b.detach())?;
        }
        let op = SoftmaxMinusOneHot {
            targets: targets[start..start + k].to_vec(),
            scale,
            loss: Mutex::new(0.0),
        };
        let g = logits.apply_op1_no_bwd(&op)?; //                      (k, V): ∂loss/∂logits
        loss += *op.loss.lock().expect("not poisoned");
        grad_h.push(g.matmul(&w)?); //                                                      (k, C)
        let gw = g.t()?.matmul(&hc)?; //                                                    (V, C)
        grad_w = Some(match grad_w {
            Some(acc) => (acc + gw)?,
            None => gw,
        });
        if bias.is_some() {
            let gb = g.sum(0)?;
            grad_b = Some(match grad_b {
                Some(acc) => (acc + gb)?,
                None => gb,
            });
        }
    }
    let grads = Grads {
        loss: (loss / n.max(1) as f64) as f32,
        hidden: Tensor::cat(&grad_h, 0)?,
        weight: grad_w.expect("at least one row"),
        bias: grad_b,
    };
    // The op's forward only returns the loss computed above; its backward hands out the gradients.
    let zero_bias;
    let b = match bias {
        Some(b) => b,
        None => {
            zero_bias = Tensor::zeros(1, DType::F32, hidden.device())?;
            &zero_bias
        }
    };
    hidden.apply_op3(
        weight,
        b,
        PrecomputedLoss {
            grads: Arc::new(grads),
            has_bias: bias.is_some(),
        },
    )
}

/// (softmax(row) − one_hot(target)) · scale for each row; the summed row losses go to `loss`.
struct SoftmaxMinusOneHot {
    targets: Vec<u32>,
    scale: f32,
    loss: Mutex<f64>,
}

impl CustomOp1 for SoftmaxMinusOneHot {
    fn name(&self) -> &'static str {
        "softmax-minus-one-hot"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        if n != self.targets.len() {
            candle_core::bail!(
                "cross-entropy: {n} rows of logits, {} targets",
                self.targets.len()
            );
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: target {t} is beyond the {v} logits");
        }
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("cross-entropy needs contiguous logits".into())
        })?;
        let x = &s.as_slice::<f32>()?[start..end];
        let mut out = vec![0f32; x.len()];
        let loss: f64 = out
            .par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(self.targets.par_iter())
            .map(|((g, row), &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for (gi, &xi) in g.iter_mut().zip(row) {
                    *gi = (xi - max).exp();
                    sum += *gi;
                }
                let lse = max + sum.ln();
                let inv = self.scale / sum;
                g.iter_mut().for_each(|gi| *gi *= inv);
                g[t as usize] -= self.scale;
                (lse - row[t as usize]) as f64
            })
            .sum();
        *self.loss.lock().expect("not poisoned") = loss;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

struct Grads {
    loss: f32,
    hidden: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
}

struct PrecomputedLoss {
    grads: Arc<Grads>,
    has_bias: bool,
}

impl CustomOp3 for PrecomputedLoss {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![self.grads.loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let scaled = |t: &Tensor| if g == 1.0 { Ok(t.clone()) } else { t * g };
        let bias = match (&self.grads.bias, self.has_bias) {
            (Some(b), true) => Some(scaled(b)?),
            _ => None,
        };
        Ok((
            Some(scaled(&self.grads.hidden)?),
            Some(scaled(&self.grads.weight)?),
            bias,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused head + loss against candle's composed ops (matmul, bias, log-softmax, gather) on
    /// 600 rows (three chunks, the last partial): same loss, same gradients for hidden, weight, bias.
    #[test]
    fn fused_equals_composed_forward_and_backward() {
        let dev = Device::Cpu;
        let var = |shape: (usize, usize)| {
            Var::from_tensor(&Tensor::randn(0f32, 0.5, shape, &dev).unwrap()).unwrap()
        };
        let (h, w) = (var((600, 24)), var((101, 24)));
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 101, &dev).unwrap()).unwrap();
        let t = Tensor::from_vec(
            (0..600u32).map(|i| (i * 13) % 101).collect::<Vec<_>>(),
            600,
            &dev,
        )
        .unwrap();
        let fused =
            linear_cross_entropy(h.as_tensor(), w.as_tensor(), Some(b.as_tensor()), &t).unwrap();
        let logits = h
            .as_tensor()
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        let composed = candle_nn::loss::cross_entropy(&logits, &t).unwrap();
        let (x, y) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        let mut ga = (fused * 2.0).unwrap().backward().unwrap();
        let mut gb = (composed * 2.0).unwrap().backward().unwrap();
        for v in [&h, &w, &b] {
            let (a, c) = (
                ga.remove(v.as_tensor()).unwrap(),
                gb.remove(v.as_tensor()).unwrap(),
            );
            let diff: f32 = (a - c)
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
}

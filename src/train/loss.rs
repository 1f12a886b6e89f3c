//! Next-token cross-entropy, fused with the LM head on the CPU.
//!
//! The logits of a step are the largest tensor by far (B·T × V: 2048 × 50,304 floats = 412 MB for a
//! small batch). Composed from candle ops, the head, log-softmax and their backward make about a
//! dozen passes over that size and as many fresh allocations (candle's backprop also starts every
//! gradient from zeros). Here the head and the loss run over chunks of rows, and the gradients of
//! the hidden states, the head weight and bias are computed in the same pass (the loss is a scalar,
//! so they only need scaling by its incoming gradient later): no logits-sized tensor ever exists,
//! and the FLOPs are those of the unfused head. Other devices and dtypes use composed ops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::model::ops::{add_assign, cpu_f32, matmul_f32 as matmul, softmax_in_place};

/// Rows of logits per chunk: 256 × 50,304 floats ≈ 51 MB.
const CHUNK_ROWS: usize = 256;

/// Mean cross-entropy of `hidden · weightᵀ + bias` (N, C) × (V, C) against `targets` (N) u32.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
) -> Result<Tensor> {
    let n = targets.dims1()?;
    let weights = vec![1.0 / n.max(1) as f32; n];
    weighted_linear_cross_entropy(hidden, weight, bias, targets, &weights)
}

/// Σᵢ `weights[i]` · cross-entropy of row i of `hidden · weightᵀ + bias` against `targets[i]`:
/// a loss mask (0 for a row that carries no loss) already divided by what the mean is taken over,
/// which may be more rows than these (SFT normalizes by the assistant tokens of the whole step).
pub fn weighted_linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    weights: &[f32],
) -> Result<Tensor> {
    let fused =
        hidden.device().is_cpu() && hidden.dtype() == DType::F32 && weight.dtype() == DType::F32;
    if !fused {
        let logits = hidden.matmul(&weight.t()?)?;
        let logits = match bias {
            Some(b) => logits.broadcast_add(b)?,
            None => logits,
        };
        let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, 1)?;
        let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?; //            (N)
        let w = Tensor::from_slice(weights, weights.len(), hidden.device())?;
        return (picked * w)?.sum_all()?.neg();
    }
    let grads = fused_cpu(hidden, weight, bias, &targets.to_vec1::<u32>()?, weights)?;
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

/// The cross-entropy of each row (N), outside any graph: what a row's log-likelihood is before
/// the loss that weighs it is known (DPO), computed `CHUNK_ROWS` rows at a time so no logits
/// tensor larger than a chunk's exists.
pub fn row_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
) -> Result<Vec<f32>> {
    let (n, _) = hidden.dims2()?;
    let (hidden, weight) = (hidden.detach(), weight.detach());
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(CHUNK_ROWS) {
        let k = CHUNK_ROWS.min(n - start);
        let logits = hidden.narrow(0, start, k)?.matmul(&weight.t()?)?; //                  (k, V)
        let logits = match bias {
            Some(b) => logits.broadcast_add(&b.detach())?,
            None => logits,
        };
        let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, 1)?;
        let t = targets.narrow(0, start, k)?.unsqueeze(1)?;
        out.extend(
            log_probs
                .gather(&t, 1)?
                .squeeze(1)?
                .neg()?
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

/// The loss and its gradients, chunk by chunk, with gemm writing straight into three buffers made
/// once (the chunk's logits, reused; ∂hidden, row block by row block; ∂weight, accumulated in place).
fn fused_cpu(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &[u32],
    row_weights: &[f32],
) -> Result<Grads> {
    let (n, c) = hidden.dims2()?;
    let (v, wc) = weight.dims2()?;
    if wc != c || targets.len() != n || row_weights.len() != n {
        candle_core::bail!(
            "cross-entropy: hidden {n}×{c}, head {v}×{wc}, {} targets, {} weights",
            targets.len(),
            row_weights.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross-entropy: target {t} is beyond the {v} logits");
    }
    let bias_values = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    let (hidden, weight) = (hidden.contiguous()?, weight.contiguous()?);
    let (h_storage, h_layout) = hidden.storage_and_layout();
    let (w_storage, w_layout) = weight.storage_and_layout();
    let (h, w) = match (&*h_storage, &*w_storage) {
        (Storage::Cpu(hs), Storage::Cpu(ws)) => (cpu_f32(hs, h_layout)?, cpu_f32(ws, w_layout)?),
        _ => candle_core::bail!("the fused cross-entropy runs on the CPU"),
    };
    let mut logits = vec![0f32; CHUNK_ROWS.min(n) * v];
    let (mut grad_h, mut grad_w) = (vec![0f32; n * c], vec![0f32; v * c]);
    let mut grad_b = vec![0f32; if bias.is_some() { v } else { 0 }];
    let mut loss = 0.0f64;
    for start in (0..n).step_by(CHUNK_ROWS) {
        let k = CHUNK_ROWS.min(n - start);
        let (hc, g) = (&h[start * c..(start + k) * c], &mut logits[..k * v]);
        matmul((k, v, c), g, false, (hc, 1, c), (w, c, 1)); //                           hc · wᵀ
        let (chunk_loss, column_sums) = softmax_minus_one_hot(
            g,
            v,
            &targets[start..start + k],
            bias_values.as_deref(),
            &row_weights[start..start + k],
        );
        loss += chunk_loss;
        add_assign(&mut grad_b, &column_sums);
        let gh = &mut grad_h[start * c..(start + k) * c];
        matmul((k, c, v), gh, false, (g, 1, v), (w, 1, c)); //                             g · w
        matmul((v, c, k), &mut grad_w, start > 0, (g, v, 1), (hc, 1, c)); //           gᵀ · hc
    }
    let device = hidden.device();
    Ok(Grads {
        loss: loss as f32,
        hidden: Tensor::from_vec(grad_h, (n, c), device)?,
        weight: Tensor::from_vec(grad_w, (v, c), device)?,
        bias: match bias {
            Some(_) => Some(Tensor::from_vec(grad_b, v, device)?),
            None => None,
        },
    })
}

/// Turns each row of logits (plus `bias`) into (softmax(row) − one_hot(target)) · its weight in
/// place. Returns the weighted sum of the row losses and the column sums of the result (the bias
/// gradient). A row of weight 0 becomes zeros without its softmax being taken.
fn softmax_minus_one_hot(
    logits: &mut [f32],
    v: usize,
    targets: &[u32],
    bias: Option<&[f32]>,
    weights: &[f32],
) -> (f64, Vec<f32>) {
    let columns = if bias.is_some() { v } else { 0 };
    logits
        .par_chunks_mut(v)
        .zip(targets.par_iter().zip(weights.par_iter()))
        .fold(
            || (0.0f64, vec![0f32; columns]),
            |(loss, mut sums), (row, (&t, &scale))| {
                if scale == 0.0 {
                    row.fill(0.0);
                    return (loss, sums);
                }
                if let Some(b) = bias {
                    row.iter_mut().zip(b).for_each(|(x, b)| *x += b);
                }
                let target_logit = row[t as usize];
                let (max, sum) = softmax_in_place(row, scale);
                row[t as usize] -= scale;
                add_assign(&mut sums, row);
                let row_loss = (max + sum.ln() - target_logit) as f64;
                (loss + f64::from(scale) * row_loss, sums)
            },
        )
        .reduce(
            || (0.0f64, vec![0f32; columns]),
            |(la, mut sa), (lb, sb)| {
                add_assign(&mut sa, &sb);
                (la + lb, sa)
            },
        )
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
    /// 600 rows (three chunks, the last partial), with and without a bias: same loss, same
    /// gradients for hidden, weight and bias.
    #[test]
    fn fused_equals_composed_forward_and_backward() {
        let dev = Device::Cpu;
        let var = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 0.5, shape, &dev).unwrap()).unwrap()
        };
        let (h, w, b) = (var(&[600, 24]), var(&[101, 24]), var(&[101]));
        let t = Tensor::from_vec(
            (0..600u32).map(|i| (i * 13) % 101).collect::<Vec<_>>(),
            600,
            &dev,
        )
        .unwrap();
        for bias in [Some(&b), None] {
            let fused = linear_cross_entropy(
                h.as_tensor(),
                w.as_tensor(),
                bias.map(|b| b.as_tensor()),
                &t,
            )
            .unwrap();
            let mut logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
            if let Some(b) = bias {
                logits = logits.broadcast_add(b.as_tensor()).unwrap();
            }
            let composed = candle_nn::loss::cross_entropy(&logits, &t).unwrap();
            let (x, y) = (
                fused.to_scalar::<f32>().unwrap(),
                composed.to_scalar::<f32>().unwrap(),
            );
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            let mut ga = (fused * 2.0).unwrap().backward().unwrap();
            let mut gb = (composed * 2.0).unwrap().backward().unwrap();
            let vars = if bias.is_some() {
                vec![&h, &w, &b]
            } else {
                vec![&h, &w]
            };
            for v in vars {
                let (a, c) = (
                    ga.remove(v.as_tensor()).unwrap(),
                    gb.remove(v.as_tensor()).unwrap(),
                );
                let diff = crate::model::tests::max_abs_diff(&a, &c);
                assert!(diff < 1e-6, "gradients differ by {diff}");
            }
            assert!(bias.is_some() || ga.get(b.as_tensor()).is_none());
        }
    }

    /// Per-row weights (zeros as a loss mask leaves, negatives as DPO's rejected rows get) on the
    /// fused path against the composed Σ w · (−log softmax[target]); `row_cross_entropy` gives
    /// each row's cross-entropy, whose weighted sum is the same loss.
    #[test]
    fn weighted_rows_equal_the_composed_weighted_sum() {
        let dev = Device::Cpu;
        let var = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 0.5, shape, &dev).unwrap()).unwrap()
        };
        let (h, w) = (var(&[300, 16]), var(&[37, 16]));
        let t = Tensor::from_vec((0..300u32).map(|i| (i * 7) % 37).collect(), 300, &dev).unwrap();
        let weights: Vec<f32> = (0..300)
            .map(|i| match i % 4 {
                0 => 0.0,
                1 => -0.01,
                _ => 0.02,
            })
            .collect();
        let fused = weighted_linear_cross_entropy(h.as_tensor(), w.as_tensor(), None, &t, &weights)
            .unwrap();
        let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let log_probs = candle_nn::ops::log_softmax(&logits, 1).unwrap();
        let picked = log_probs
            .gather(&t.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let wt = Tensor::from_slice(&weights, 300, &dev).unwrap();
        let composed = (picked * wt).unwrap().sum_all().unwrap().neg().unwrap();
        let (x, y) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        let rows = row_cross_entropy(h.as_tensor(), w.as_tensor(), None, &t).unwrap();
        let z: f32 = rows.iter().zip(&weights).map(|(r, w)| r * w).sum();
        assert!((z - y).abs() < 1e-5, "{z} vs {y}");
        let (ga, gb) = (fused.backward().unwrap(), composed.backward().unwrap());
        for v in [&h, &w] {
            let diff = crate::model::tests::max_abs_diff(
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            assert!(diff < 1e-6, "gradients differ by {diff}");
        }
    }
}

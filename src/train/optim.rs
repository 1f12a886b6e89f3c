//! AdamW as PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments), with
//! fp32 master weights and fp32 moments whatever dtype the model computes in, and global-norm
//! gradient clipping as `torch.nn.utils.clip_grad_norm_`.
//!
//! candle-nn's `AdamW` keeps its moments in the parameter dtype and private, so they could neither
//! stay fp32 under bf16 compute nor be checkpointed; this one is small enough to read at once.

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use rayon::prelude::*;

use crate::model::ops::cpu_f32;

/// One trainable tensor: its fp32 master copy and moments.
pub struct Slot {
    pub name: String,
    pub var: Var,
    pub m: Tensor,
    pub v: Tensor,
    /// Weight decay applies to matrices only, never to norms, biases or the embedding.
    pub decay: bool,
}

pub struct AdamW {
    pub slots: Vec<Slot>,
    /// Optimizer steps taken (bias correction uses it).
    pub t: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct Hyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Whether a parameter gets weight decay: 2-D weights other than the token embedding.
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && name != "model.embed_tokens.weight"
}

impl AdamW {
    /// fp32 master weights from `weights` (any dtype), zero moments.
    pub fn new(weights: &HashMap<String, Tensor>) -> Result<Self> {
        let mut names: Vec<&String> = weights.keys().collect();
        names.sort();
        let slots = names
            .into_iter()
            .map(|name| {
                let w = weights[name].to_dtype(DType::F32)?;
                Ok(Slot {
                    name: name.clone(),
                    decay: decays(name, w.rank()),
                    m: w.zeros_like()?,
                    v: w.zeros_like()?,
                    var: Var::from_tensor(&w)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { slots, t: 0 })
    }

    /// The model's weights in `dtype`, tracked for gradients back to the fp32 masters.
    pub fn weights(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        self.slots
            .iter()
            .map(|s| {
                let t = if dtype == DType::F32 {
                    s.var.as_tensor().clone()
                } else {
                    s.var.as_tensor().to_dtype(dtype)?
                };
                Ok((s.name.clone(), t))
            })
            .collect()
    }

    /// One step with `grads` (fp32, by name, already averaged over the batch).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, h: Hyper) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - h.beta1.powi(self.t as i32);
        let bc2 = 1.0 - h.beta2.powi(self.t as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.name) else {
                continue;
            };
            let wd = if s.decay { h.weight_decay } else { 0.0 };
            if s.var.device().is_cpu() {
                // In place, no temporaries: the moments and the parameter are each read and written once.
                let g = g.contiguous()?;
                s.m.inplace_op2(
                    &g,
                    &Moment {
                        beta: h.beta1 as f32,
                        square: false,
                    },
                )?;
                s.v.inplace_op2(
                    &g,
                    &Moment {
                        beta: h.beta2 as f32,
                        square: true,
                    },
                )?;
                let update = Update {
                    lr: h.lr,
                    wd,
                    bc1,
                    bc2,
                    eps: h.eps,
                };
                s.var.as_tensor().inplace_op3(&s.m, &s.v, &update)?;
                continue;
            }
            let mut p = s.var.as_tensor().clone();
            if wd > 0.0 {
                p = (p * (1.0 - h.lr * wd))?;
            }
            s.m = ((&s.m * h.beta1)? + (g * (1.0 - h.beta1))?)?;
            s.v = ((&s.v * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
            let denom = ((s.v.sqrt()? / bc2.sqrt())? + h.eps)?;
            let update = (s.m.div(&denom)? * (h.lr / bc1))?;
            s.var.set(&(p - update)?)?;
        }
        Ok(())
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("AdamW needs contiguous tensors".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("AdamW state is fp32"),
    }
}

/// m ← β m + (1 − β) g, or v ← β v + (1 − β) g² (`square`).
struct Moment {
    beta: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (m, g) = (slice_mut(s1, l1)?, cpu_f32(s2, l2)?);
        let (b, square) = (self.beta, self.square);
        m.par_iter_mut().zip(g.par_iter()).for_each(|(m, &g)| {
            *m = b * *m + (1.0 - b) * if square { g * g } else { g };
        });
        Ok(())
    }
}

/// p ← p (1 − lr·wd) − lr · (m / bc1) / (√(v / bc2) + ε), as torch's AdamW.
struct Update {
    lr: f64,
    wd: f64,
    bc1: f64,
    bc2: f64,
    eps: f64,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (p, m, v) = (slice_mut(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let decay = (1.0 - self.lr * self.wd) as f32;
        let step = (self.lr / self.bc1) as f32;
        let sqrt_bc2 = self.bc2.sqrt() as f32;
        let eps = self.eps as f32;
        p.par_iter_mut()
            .zip(m.par_iter().zip(v.par_iter()))
            .for_each(|(p, (&m, &v))| {
                *p = *p * decay - step * m / (v.sqrt() / sqrt_bc2 + eps);
            });
        Ok(())
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (0 = no clipping);
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads.values() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

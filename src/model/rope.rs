//! Rotary position embedding, as transformers' `apply_rotary_pos_emb` (`rotate_half`, the two
//! halves of the rotated slice paired) on the first `dim` features of each head; the rest pass
//! through (phi's partial rotary). Tables are precomputed in f64 for every position up to
//! `max_position_embeddings`.
//!
//! Symbols: B batch, H heads, T time, D head_dim, R rotary dim, P positions.

use candle_core::{DType, Device, Result, Tensor, D};

use super::config::{RopeScaling, Rotary};

/// cos and sin for every position: (P, R/2) each.
#[derive(Clone, Debug)]
struct Table {
    cos: Tensor,
    sin: Tensor,
}

impl Table {
    fn new(
        inv_freq: &[f64],
        scale: f64,
        positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in inv_freq {
                let angle = p as f64 * f;
                cos.push((angle.cos() * scale) as f32);
                sin.push((angle.sin() * scale) as f32);
            }
        }
        let make = |v: Vec<f32>| Tensor::from_vec(v, (positions, half), device)?.to_dtype(dtype);
        Ok(Table {
            cos: make(cos)?,
            sin: make(sin)?,
        })
    }
}

/// Which positions a forward pass covers.
#[derive(Clone, Debug)]
pub enum Positions {
    /// The same `start..start + len` for every row.
    Range { start: usize, len: usize },
    /// One position per token, (B, T) u32, for left-padded batches; `max` is the largest.
    PerRow { ids: Tensor, max: usize },
}

impl Positions {
    fn last(&self) -> usize {
        match self {
            Positions::Range { start, len } => start + len.saturating_sub(1),
            Positions::PerRow { max, .. } => *max,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Rope {
    dim: usize,
    short: Table,
    /// LongRoPE's second table and the length beyond which it is used.
    long: Option<(Table, usize)>,
    positions: usize,
}

impl Rope {
    pub fn new(rotary: &Rotary, positions: usize, dtype: DType, device: &Device) -> Result<Self> {
        let base_freq = |i: usize| 1.0 / rotary.theta.powf((2 * i) as f64 / rotary.dim as f64);
        let half = rotary.dim / 2;
        let scaled = |factors: &[f64]| -> Vec<f64> {
            (0..half).map(|i| base_freq(i) / factors[i]).collect()
        };
        let (short, long) = match &rotary.scaling {
            RopeScaling::None => (
                Table::new(&scaled(&vec![1.0; half]), 1.0, positions, dtype, device)?,
                None,
            ),
            RopeScaling::Linear { factor } => {
                let freq = scaled(&vec![*factor; half]);
                (Table::new(&freq, 1.0, positions, dtype, device)?, None)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max,
                attention_factor,
            } => (
                Table::new(
                    &scaled(short_factor),
                    *attention_factor,
                    positions,
                    dtype,
                    device,
                )?,
                Some((
                    Table::new(
                        &scaled(long_factor),
                        *attention_factor,
                        positions,
                        dtype,
                        device,
                    )?,
                    *original_max,
                )),
            ),
        };
        Ok(Rope {
            dim: rotary.dim,
            short,
            long,
            positions,
        })
    }

    /// LongRoPE's original context length, past which the long table is used.
    pub fn long_from(&self) -> Option<usize> {
        self.long.as_ref().map(|(_, original_max)| *original_max)
    }

    /// cos and sin for these positions: (T, R/2) for a shared range, (B, T, R/2) per row.
    /// LongRoPE picks its long table when the last position is beyond the original context, for the
    /// whole pass, as transformers does.
    pub fn tables(&self, positions: &Positions) -> Result<(Tensor, Tensor)> {
        let last = positions.last();
        if last >= self.positions {
            candle_core::bail!(
                "position {last} is beyond max_position_embeddings ({}); use a shorter prompt or fewer new tokens",
                self.positions
            );
        }
        let table = match &self.long {
            Some((long, original_max)) if last + 1 > *original_max => long,
            _ => &self.short,
        };
        match positions {
            Positions::Range { start, len } => Ok((
                table.cos.narrow(0, *start, *len)?,
                table.sin.narrow(0, *start, *len)?,
            )),
            Positions::PerRow { ids, .. } => {
                let (b, t) = ids.dims2()?;
                let flat = ids.flatten_all()?;
                let pick = |x: &Tensor| x.index_select(&flat, 0)?.reshape((b, t, self.dim / 2));
                Ok((pick(&table.cos)?, pick(&table.sin)?))
            }
        }
    }

    /// Rotates the first R features of x (B, H, T, D). `fused` uses candle's kernel, which has
    /// no backward: inference only.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, fused: bool) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let (rot, pass) = if self.dim < d {
            (
                x.narrow(D::Minus1, 0, self.dim)?,
                Some(x.narrow(D::Minus1, self.dim, d - self.dim)?),
            )
        } else {
            (x.clone(), None)
        };
        let rotated = if fused {
            candle_nn::rotary_emb::rope(&rot.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)?
        } else {
            // (T, R) or (B, 1, T, R), broadcast over heads.
            let widen = |t: &Tensor| -> Result<Tensor> {
                let full = Tensor::cat(&[t, t], D::Minus1)?;
                if full.rank() == 3 {
                    full.unsqueeze(1)
                } else {
                    Ok(full)
                }
            };
            let half = self.dim / 2;
            let x1 = rot.narrow(D::Minus1, 0, half)?;
            let x2 = rot.narrow(D::Minus1, half, half)?;
            let rotate_half = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            (rot.broadcast_mul(&widen(cos)?)? + rotate_half.broadcast_mul(&widen(sin)?)?)?
        };
        match pass {
            Some(pass) => Tensor::cat(&[&rotated, &pass], D::Minus1),
            None => Ok(rotated),
        }
    }
}

//! The KV cache of sampling: keys and values of the positions seen so far, per layer, and the
//! regroup of continuous batching (rows leave the batch, a prefill of new prompts joins it).
//!
//! Symbols: B batch (rows), K kv heads, T new positions, D head_dim.

use candle_core::{DType, Result, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::PhiConfig;

/// Keys and values of the positions seen so far, one pair per layer; owned by the caller.
pub struct KvCache {
    layers: Vec<LayerCache>,
    seen: usize,
    /// Positions a layer's buffers grow by when full.
    chunk: usize,
    /// Pad tokens at the start of each row of a left-padded batch: never attended to.
    left_pad: Option<Vec<usize>>,
}

/// One layer's keys and values: (B, K, capacity, D) buffers filled up to `len` positions.
#[derive(Default)]
pub(super) struct LayerCache {
    kv: Option<[Tensor; 2]>,
    len: usize,
}

impl LayerCache {
    /// Appends (B, K, T, D) keys and values; returns all of them so far, (B, K, len, D).
    pub(super) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        chunk: usize,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let cap = match &self.kv {
            Some([kb, _]) => kb.dim(2)?,
            None => 0,
        };
        if self.len + t > cap {
            let grow = (self.len + t - cap).div_ceil(chunk) * chunk;
            let more = |x: &Tensor| {
                let (b, h, _, d) = x.dims4()?;
                Tensor::zeros((b, h, grow, d), x.dtype(), x.device())
            };
            self.kv = Some(match self.kv.take() {
                Some([kb, vb]) => [
                    Tensor::cat(&[&kb, &more(k)?], 2)?,
                    Tensor::cat(&[&vb, &more(v)?], 2)?,
                ],
                None => [more(k)?, more(v)?],
            });
        }
        let [kb, vb] = self.kv.as_ref().expect("allocated above");
        kb.slice_set(k, 2, self.len)?;
        vb.slice_set(v, 2, self.len)?;
        self.len += t;
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }
}

impl KvCache {
    pub fn new(cfg: &PhiConfig) -> Self {
        KvCache {
            layers: (0..cfg.num_hidden_layers)
                .map(|_| LayerCache::default())
                .collect(),
            seen: 0,
            chunk: cfg.max_position_embeddings.clamp(1, 512),
            left_pad: None,
        }
    }

    /// A cache for a batch whose row r starts with `left_pad[r]` pad tokens.
    pub fn with_left_padding(cfg: &PhiConfig, left_pad: Vec<usize>) -> Self {
        KvCache {
            left_pad: Some(left_pad),
            ..Self::new(cfg)
        }
    }

    /// Keeps only the batch rows `rows` (in that order): a finished sequence leaves the batch, so
    /// later steps stop computing it.
    pub fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        self.regroup(rows, None)
    }

    /// Keeps the rows `keep` of this cache (in that order) and appends the rows `join.1` of
    /// another cache `join.0` (a prefill of new prompts) after them, in one copy: continuous
    /// batching. Every row ends at the same position, so the side with fewer positions is
    /// left-padded, and pad positions that no row needs any more are cut away: the cache is as
    /// long as its longest row.
    pub fn regroup(&mut self, keep: &[usize], join: Option<(&KvCache, &[usize])>) -> Result<()> {
        let mut sides: Vec<Side> = Vec::new();
        for (cache, rows) in std::iter::once((&*self, keep)).chain(join) {
            if rows.is_empty() {
                continue;
            }
            let pads: Vec<usize> = rows
                .iter()
                .map(|&r| cache.left_pad.as_ref().map_or(0, |p| p[r]))
                .collect();
            let cut = pads.iter().copied().min().unwrap_or(0);
            sides.push(Side {
                cache,
                rows,
                pads,
                cut,
                len: cache.seen - cut,
            });
        }
        let seen = sides.iter().map(|s| s.len).max().unwrap_or(0);
        let capacity = seen + self.chunk;
        let layers = (0..self.layers.len())
            .map(|l| {
                let parts: Vec<(&[Tensor; 2], &Side)> = sides
                    .iter()
                    .filter_map(|s| s.cache.layers[l].kv.as_ref().map(|kv| (kv, s)))
                    .collect();
                if parts.is_empty() {
                    return Ok(LayerCache::default());
                }
                let k = gather(&parts, 0, seen, capacity)?;
                let v = gather(&parts, 1, seen, capacity)?;
                Ok(LayerCache {
                    kv: Some([k, v]),
                    len: seen,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let left_pad: Vec<usize> = sides
            .iter()
            .flat_map(|s| s.pads.iter().map(move |p| p - s.cut + (seen - s.len)))
            .collect();
        self.layers = layers;
        self.seen = seen;
        self.left_pad = Some(left_pad);
        Ok(())
    }

    /// Layer `i`'s keys and values, and the positions its buffers grow by.
    pub(super) fn layer(&mut self, i: usize) -> (&mut LayerCache, usize) {
        (&mut self.layers[i], self.chunk)
    }

    /// Pad tokens at the start of each row, for a left-padded batch.
    pub(super) fn left_pad(&self) -> Option<&[usize]> {
        self.left_pad.as_deref()
    }

    /// Records that every layer has appended `t` more positions.
    pub(super) fn advance(&mut self, t: usize) {
        self.seen += t;
    }

    /// Positions written so far (pads included).
    pub fn len(&self) -> usize {
        self.seen
    }

    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }
}

/// Rows of one cache that go into a regrouped one: positions `cut..cut + len` of each.
struct Side<'a> {
    cache: &'a KvCache,
    rows: &'a [usize],
    pads: Vec<usize>,
    cut: usize,
    len: usize,
}

/// The regrouped buffer (rows, K, capacity, D) of keys (`which` 0) or values (1): each side's
/// rows, their positions right-aligned to end at `seen`, zeros before and after.
fn gather(
    parts: &[(&[Tensor; 2], &Side)],
    which: usize,
    seen: usize,
    capacity: usize,
) -> Result<Tensor> {
    let first = &parts[0].0[which];
    let (_, heads, _, d) = first.dims4()?;
    let rows: usize = parts.iter().map(|(_, s)| s.rows.len()).sum();
    if first.device().is_cpu() && first.dtype() == DType::F32 {
        // One pass, straight from the old buffers into the new one.
        let mut out = vec![0f32; rows * heads * capacity * d];
        let mut at = 0;
        for (kv, side) in parts {
            let buf = &kv[which];
            let (storage, layout) = buf.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("expected a CPU buffer");
            };
            let src = &cpu.as_slice::<f32>()?[layout.start_offset()..];
            let src_cap = buf.dim(2)?;
            let dst_at = seen - side.len;
            let block = side.len * d;
            out[at * heads * capacity * d..][..side.rows.len() * heads * capacity * d]
                .par_chunks_mut(capacity * d)
                .enumerate()
                .for_each(|(i, dst)| {
                    let (row, head) = (side.rows[i / heads], i % heads);
                    let from = ((row * heads + head) * src_cap + side.cut) * d;
                    dst[dst_at * d..][..block].copy_from_slice(&src[from..from + block]);
                });
            at += side.rows.len();
        }
        return Tensor::from_vec(out, (rows, heads, capacity, d), first.device());
    }
    // Other devices and dtypes: the same with tensor ops.
    let mut blocks = Vec::with_capacity(parts.len());
    for (kv, side) in parts {
        let buf = &kv[which];
        let index = Tensor::new(
            side.rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            buf.device(),
        )?;
        let n = side.rows.len();
        let zeros = |len| Tensor::zeros((n, heads, len, d), buf.dtype(), buf.device());
        let kept = buf.index_select(&index, 0)?.narrow(2, side.cut, side.len)?;
        blocks.push(Tensor::cat(
            &[&zeros(seen - side.len)?, &kept, &zeros(capacity - seen)?],
            2,
        )?);
    }
    Tensor::cat(&blocks, 0)
}

/// One sequence's keys and values for slot decoding ([`super::Decoder::decode_slots`]): per
/// layer, a growing run of positions, each its K kv heads × D features. A sequence owns its
/// slot, so one joining or leaving a batch copies nothing of the others (continuous batching
/// without a regroup), and each new position is written in place at the end.
///
/// Keys and values are stored as f16 (what llama.cpp's KV cache holds by default): half the
/// memory of f32, each value rounded to nearest (relative error ≤ 2⁻¹¹). The attention reads
/// them as f32 ([`super::attention::group_strided`]).
pub struct Slot {
    /// Per layer: keys, then values, (positions, K·D) row-major.
    layers: Vec<[Vec<f16>; 2]>,
    len: usize,
}

impl Slot {
    /// Row `row` of a prefilled batch cache (CPU): its positions after the row's left pad, with
    /// room reserved for `more` positions (so decoding does not reallocate).
    pub fn from_batch(cache: &KvCache, row: usize, more: usize) -> Result<Slot> {
        let pad = cache.left_pad.as_ref().map_or(0, |p| p[row]);
        let len = cache.seen - pad;
        let layers = cache
            .layers
            .iter()
            .map(|layer| {
                let Some(kv) = &layer.kv else {
                    candle_core::bail!("slot: the batch cache has a layer with no positions");
                };
                let part = |t: &Tensor| -> Result<Vec<f16>> {
                    let (_, k, _, d) = t.dims4()?;
                    let mut out = Vec::with_capacity((len + more) * k * d);
                    out.extend(
                        t.narrow(0, row, 1)?
                            .narrow(2, pad, len)? //                                   (1, K, S, D)
                            .squeeze(0)?
                            .transpose(0, 1)? //                                           (S, K, D)
                            .to_dtype(DType::F16)?
                            .flatten_all()?
                            .to_vec1::<f16>()?,
                    );
                    Ok(out)
                };
                Ok([part(&kv[0])?, part(&kv[1])?])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Slot { layers, len })
    }

    /// Positions stored (the next one's index).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layer `l`'s keys and values, (positions, K·D) each.
    pub(crate) fn layer(&self, l: usize) -> (&[f16], &[f16]) {
        let [k, v] = &self.layers[l];
        (k, v)
    }

    /// Appends one position's keys and values (K·D each, rounded to f16) to layer `l`.
    pub(super) fn push(&mut self, l: usize, k: &[f32], v: &[f32]) {
        for (buf, x) in self.layers[l].iter_mut().zip([k, v]) {
            let at = buf.len();
            buf.resize(at + x.len(), f16::ZERO);
            buf[at..].convert_from_f32_slice(x);
        }
    }

    /// Records that every layer has one more position.
    pub(super) fn advance(&mut self) {
        self.len += 1;
    }
}

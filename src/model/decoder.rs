//! The decoder: embedding, N blocks, final norm, a head. Follows transformers'
//! `modeling_phi.py` (parallel block), `modeling_phi3.py` and `modeling_llama.py` (sequential
//! block); which one is decided by the config, never by a copied file.
//!
//! Two modes: training uses only ops with a backward (composed candle ops, or on the CPU the
//! one-pass kernels of `ops.rs` that carry their own) and applies dropout; inference uses candle's
//! fused softmax / norm / rotary kernels, which have no backward.
//!
//! Symbols: B batch, T new tokens, S keys (past + T), C hidden, H heads, K kv heads, D head_dim,
//! I intermediate, V vocab (or labels).

use std::collections::HashMap;

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::Linear;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use super::attention;
/// The cache `forward` takes: the caller owns it.
pub use super::cache::KvCache;
use super::cache::{LayerCache, Slot};
use super::config::{Activation, BlockLayout, HeadKind, MlpKind, NormKind, PhiConfig};
use super::gemv::PanelWeight;
use super::int8::{self, PackedWeight};
use super::names::{parameter_table, Init};
use super::rope::{Positions, Rope};
use super::ModelError;

/// The tensors a decoder is built from, by phigen name (see `names.rs`).
pub type Weights = HashMap<String, Tensor>;

fn take(w: &Weights, name: &str) -> std::result::Result<Tensor, ModelError> {
    w.get(name)
        .cloned()
        .ok_or_else(|| ModelError::MissingParameter(name.to_string()))
}

/// Quantized weight matrices (from a GGUF file) by phigen name; they take the place of the dense
/// weights of the same name. Inference only: quantized matmuls have no backward.
pub type QuantizedWeights = HashMap<String, Arc<QTensor>>;

/// A projection `x Wᵀ + b`.
#[derive(Clone, Debug)]
enum Proj {
    /// Trainable: the weight as stored, (out, in).
    Dense(Linear),
    /// Inference only, in the form that multiplies fastest where it runs.
    Frozen {
        /// On an accelerator or in half precision: the weight transposed to (in, out) and
        /// contiguous, which candle's matmul multiplies about twice as fast for batches of rows.
        wt: Option<Tensor>,
        /// On the CPU in f32: the weight and bias in panels (see [`super::gemv`]), which reads each
        /// weight once per product whatever the number of rows (`bias` is then `None`).
        panels: Option<Arc<PanelWeight>>,
        bias: Option<Tensor>,
        /// A quantized copy (GGUF), faster for a few rows because it reads a quarter of the bytes.
        quantized: Option<QMatMul>,
        /// The quantized copy's codes for the VNNI kernel (see [`PackedWeight`]), on CPUs with
        /// it: every product, any number of rows (it takes the place of the three above).
        packed: Option<Arc<PackedWeight>>,
    },
}

/// Up to this many rows go through the quantized copy of a projection, more through the dense
/// one (measured on candle's CPU kernels: Q8_0 is 3.7× faster for one row, 1.9× slower for 8):
/// candle's kernels re-read the weights for every row. CPUs without VNNI only: the packed
/// kernel serves every row count where there is one.
const QUANTIZED_ROWS: usize = 3;

impl Proj {
    fn freeze(self, quantized: Option<&Arc<QTensor>>) -> Result<Proj> {
        let Proj::Dense(l) = self else {
            candle_core::bail!("a projection is frozen once");
        };
        let (w, bias) = (l.weight(), l.bias().cloned());
        let packed = match quantized {
            Some(q) => {
                let (out, inp) = q.shape().dims2()?;
                PackedWeight::from_gguf(q.dtype(), &q.data()?, out, inp).map(Arc::new)
            }
            None => None,
        };
        if packed.is_some() {
            return Ok(Proj::Frozen {
                wt: None,
                panels: None,
                bias,
                quantized: None,
                packed,
            });
        }
        let quantized = quantized
            .map(|q| QMatMul::from_arc(q.clone()))
            .transpose()?;
        let (wt, panels, bias) = if w.device().is_cpu() && w.dtype() == DType::F32 {
            let panels = PanelWeight::from_tensors(w, bias.as_ref())?;
            (None, Some(Arc::new(panels)), None)
        } else {
            (Some(w.t()?.contiguous()?), None, bias)
        };
        Ok(Proj::Frozen {
            wt,
            panels,
            bias,
            quantized,
            packed: None,
        })
    }
}

fn linear(w: &Weights, prefix: &str, bias: bool) -> std::result::Result<Proj, ModelError> {
    let b = if bias {
        Some(take(w, &format!("{prefix}.bias"))?)
    } else {
        None
    };
    Ok(Proj::Dense(Linear::new(
        take(w, &format!("{prefix}.weight"))?,
        b,
    )))
}

/// `x @ wᵀ (+ b)` over the last dimension with every leading dimension folded into the rows: one
/// matrix product instead of candle's per-batch-item products over a broadcast weight, which
/// read the whole weight once per row when decoding a batch.
fn project(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let c = dims[dims.len() - 1];
    let rows = x.elem_count() / c;
    let y = x.reshape((rows, c))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims.to_vec();
    *out.last_mut().expect("x has dimensions") = y.dim(1)?;
    y.reshape(out)
}

fn apply(p: &Proj, x: &Tensor) -> Result<Tensor> {
    match p {
        Proj::Dense(l) => project(x, l.weight(), l.bias()),
        Proj::Frozen {
            wt,
            panels,
            bias,
            quantized,
            packed,
        } => {
            let dims = x.dims();
            let c = dims[dims.len() - 1];
            let rows = x.elem_count() / c;
            let x2 = x.reshape((rows, c))?;
            let y = match (packed, quantized, panels, wt) {
                (Some(p), ..) => {
                    int8::forward_packed(p, &x2.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
                }
                (_, Some(q), ..) if rows <= QUANTIZED_ROWS => q.forward(&x2)?,
                (_, _, Some(p), _) => p.forward(&x2.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?,
                (_, _, _, Some(wt)) => x2.matmul(wt)?,
                (None, _, None, None) => {
                    unreachable!("a frozen projection keeps a weight or packed codes")
                }
            };
            let y = match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            let mut out = dims.to_vec();
            *out.last_mut().expect("x has dimensions") = y.dim(1)?;
            y.reshape(out)
        }
    }
}

/// Where a dropout mask applies: each (seed, layer, site) draws its own mask.
#[derive(Clone, Copy, Debug)]
enum DropSite {
    Embedding,
    AttentionProbs,
    AttentionOut,
    MlpOut,
}

/// Dropout with a mask drawn from `seed` (the forward pass's, see [`Decoder::set_dropout_seed`]),
/// the layer and the site, never from candle's unseeded thread RNG: two runs of a recipe, and a
/// run killed and resumed, draw the same masks. `None` (inference) or `p = 0` is the identity.
fn dropout(x: &Tensor, p: f64, seed: Option<u64>, layer: usize, site: DropSite) -> Result<Tensor> {
    let Some(seed) = seed.filter(|_| p > 0.0) else {
        return Ok(x.clone());
    };
    let key = blake3::hash(format!("{seed}/{layer}/{site:?}").as_bytes());
    let uniform = match x.device() {
        Device::Cpu => {
            use rand::Rng;
            let mut rng = rand_chacha::ChaCha8Rng::from_seed(*key.as_bytes());
            let u: Vec<f32> = (0..x.elem_count()).map(|_| rng.random()).collect();
            Tensor::from_vec(u, x.shape(), x.device())?
        }
        // On an accelerator, the device's own generator, reseeded for this mask.
        device => {
            let mut first = [0u8; 8];
            first.copy_from_slice(&key.as_bytes()[..8]);
            device.set_seed(u64::from_le_bytes(first))?;
            Tensor::rand(0f32, 1f32, x.shape(), device)?
        }
    };
    let keep = (uniform.ge(p as f32)?.to_dtype(x.dtype())? * (1.0 / (1.0 - p)))?;
    x * keep
}

/// LayerNorm (weight + bias) or RMSNorm (weight) over the last dimension, computed in f32.
#[derive(Clone, Debug)]
struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    fn new(
        w: &Weights,
        prefix: &str,
        kind: NormKind,
        eps: f64,
    ) -> std::result::Result<Self, ModelError> {
        let bias = match kind {
            NormKind::Layer => Some(take(w, &format!("{prefix}.bias"))?),
            NormKind::Rms => None,
        };
        Ok(Norm {
            weight: take(w, &format!("{prefix}.weight"))?,
            bias,
            eps,
        })
    }

    fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        if !training {
            let x = x.contiguous()?;
            return match &self.bias {
                Some(b) => candle_nn::ops::layer_norm(&x, &self.weight, b, self.eps as f32),
                None => candle_nn::ops::rms_norm(&x, &self.weight, self.eps as f32),
            };
        }
        if let Some(y) = super::ops::norm(x, &self.weight, self.bias.as_ref(), self.eps)? {
            return Ok(y);
        }
        let eps = self.eps as f32;
        match &self.bias {
            Some(b) => candle_nn::ops::layer_norm_slow(x, &self.weight, b, eps),
            None => candle_nn::ops::rms_norm_slow(x, &self.weight, eps),
        }
    }
}

/// Additive mask (rows, 1, T, S), rows = B when padded else 1; `None` when nothing is masked.
/// A key is visible if it is not in the future, not a left pad, and (with a sliding window)
/// fewer than `window` positions back, as transformers' `sliding_window_overlay`.
fn attention_mask(
    b: usize,
    t: usize,
    past: usize,
    left_pad: Option<&[usize]>,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    let s = past + t;
    let padded = left_pad.is_some_and(|p| p.iter().any(|&n| n > 0));
    if t == 1 && !padded && window.is_none_or(|w| s <= w) {
        return Ok(None);
    }
    let rows = if padded { b } else { 1 };
    let mut mask = vec![0f32; rows * t * s];
    for r in 0..rows {
        let pad = if padded {
            left_pad.map_or(0, |p| p[r])
        } else {
            0
        };
        for i in 0..t {
            let q = past + i;
            for k in 0..s {
                // A pad query sees itself only, so its softmax row is never empty.
                let visible = k == q || (k < q && k >= pad && window.is_none_or(|w| q - k < w));
                if !visible {
                    mask[(r * t + i) * s + k] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(mask, (rows, 1, t, s), device)?
        .to_dtype(dtype)
        .map(Some)
}

struct Attention {
    qkv: Proj,
    out: Proj,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dropout: f64,
}

/// What every layer of one forward pass shares.
struct Step<'a> {
    rope: &'a Rope,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    training: bool,
    /// The dropout seed of this pass (training only).
    dropout: Option<u64>,
    /// Decoding one position per row on the CPU (f32, with a cache): each row's first visible
    /// key, for [`attention::decode`] in place of the mask.
    decode_from: Option<Vec<usize>>,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        cache: Option<(&mut LayerCache, usize)>,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, k, d) = (self.heads, self.kv_heads, self.head_dim);
        let qkv = apply(&self.qkv, x)?; //                                          (B, T, (H+2K)D)
        let q = qkv.narrow(2, 0, h * d)?.reshape((b, t, h, d))?;
        let key = qkv.narrow(2, h * d, k * d)?.reshape((b, t, k, d))?;
        let value = qkv.narrow(2, (h + k) * d, k * d)?.reshape((b, t, k, d))?;
        let (q, key) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (
                qn.forward(&q, step.training)?,
                kn.forward(&key, step.training)?,
            ),
            _ => (q, key),
        };
        let fused = !step.training;
        let q = step.rope.apply(
            &q.transpose(1, 2)?.contiguous()?,
            &step.cos,
            &step.sin,
            fused,
        )?; // (B, H, T, D)
        let key = step.rope.apply(
            &key.transpose(1, 2)?.contiguous()?,
            &step.cos,
            &step.sin,
            fused,
        )?; // (B, K, T, D)
        let value = value.transpose(1, 2)?.contiguous()?;
        let (key, value) = match cache {
            Some((c, chunk)) => c.append(&key.contiguous()?, &value, chunk)?, // (B, K, S, D)
            None => (key, value),
        };
        if let Some(first) = &step.decode_from {
            let y = attention::decode(&q, &key, &value, first, (d as f32).powf(-0.5))?;
            return apply(&self.out, &y);
        }
        let s = key.dim(2)?;
        // Grouped-query attention without copying K/V: the H/K query heads of a group share rows.
        let rep = h / k;
        let q = q.reshape((b, k, rep * t, d))?;
        let scores = (q.matmul(&key.t()?)? * (d as f64).powf(-0.5))?.reshape((b, h, t, s))?; // (B, H, T, S)
        let scores = match &step.mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let scores = scores.to_dtype(DType::F32)?;
        let probs = if step.training {
            super::ops::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let probs = dropout(
            &probs.to_dtype(x.dtype())?,
            self.dropout,
            step.dropout,
            layer,
            DropSite::AttentionProbs,
        )?;
        let y = probs.reshape((b, k, rep * t, s))?.matmul(&value)?; //               (B, K, rep·T, D)
        let y = y
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?; // (B, T, H·D)
        apply(&self.out, &y)
    }
}

struct Mlp {
    up: Proj,
    down: Proj,
    kind: MlpKind,
    act: Activation,
    inter: usize,
}

impl Mlp {
    fn act(&self, x: &Tensor) -> Result<Tensor> {
        match self.act {
            Activation::GeluTanh => super::ops::gelu_tanh(x),
            Activation::Gelu => x.gelu_erf(),
            Activation::Silu => x.silu(),
            Activation::Relu => x.relu(),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let up = apply(&self.up, x)?; //                                  (B, T, I) or (B, T, 2I)
        let hidden = match self.kind {
            MlpKind::Plain => self.act(&up)?,
            MlpKind::Gated => {
                let gate = up.narrow(D::Minus1, 0, self.inter)?;
                let up = up.narrow(D::Minus1, self.inter, self.inter)?;
                (self.act(&gate)? * up)?
            }
        };
        apply(&self.down, &hidden)
    }
}

struct Block {
    input_norm: Norm,
    /// Sequential blocks normalise again before the MLP.
    post_norm: Option<Norm>,
    attn: Attention,
    mlp: Mlp,
    resid_dropout: f64,
    /// This block's index, for its dropout masks.
    layer: usize,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Result<Tensor> {
        let drop =
            |y: &Tensor, site| dropout(y, self.resid_dropout, step.dropout, self.layer, site);
        let h = self.input_norm.forward(x, step.training)?;
        let attn = self.attn.forward(&h, step, cache, self.layer)?;
        let attn = drop(&attn, DropSite::AttentionOut)?;
        match &self.post_norm {
            // phi: x + attn(ln(x)) + mlp(ln(x))
            None => (attn + drop(&self.mlp.forward(&h)?, DropSite::MlpOut)?)? + x,
            // phi-3, llama: x += attn(norm(x)); x += mlp(norm(x))
            Some(post) => {
                let x = (x + attn)?;
                let m = self.mlp.forward(&post.forward(&x, step.training)?)?;
                let m = drop(&m, DropSite::MlpOut)?;
                x + m
            }
        }
    }
}

/// One training pass split into embedding, blocks and final norm (see
/// [`Decoder::training_pass`]).
pub struct TrainingPass<'a> {
    decoder: &'a Decoder,
    step: Step<'a>,
}

impl TrainingPass<'_> {
    /// ids (B, T) → (B, T, C): the input of block 0.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.decoder.embed(ids, &self.step)
    }

    pub fn blocks(&self) -> usize {
        self.decoder.blocks.len()
    }

    /// Block `i` on its input (B, T, C) → its output (B, T, C).
    pub fn block(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        self.decoder.blocks[i].forward(x, &self.step, None)
    }

    /// The last block's output → the final-norm hidden states (B, T, C), the head's input.
    pub fn norm(&self, x: &Tensor) -> Result<Tensor> {
        self.decoder.norm.forward(x, true)
    }
}

/// The token embedding table: the weights (training, checkpoints), or for a GGUF file's model the
/// file's quantized rows, dequantized as they are looked up — the f32 table of SmolLM2-135M is
/// 113 MB, its Q4_1 rows 18 MB, and a lookup reads one row a token.
enum Embedding {
    Dense(Tensor),
    Quantized {
        table: Arc<QTensor>,
        dtype: DType,
        device: Device,
    },
}

impl Embedding {
    fn dtype(&self) -> DType {
        match self {
            Embedding::Dense(t) => t.dtype(),
            Embedding::Quantized { dtype, .. } => *dtype,
        }
    }

    fn device(&self) -> &Device {
        match self {
            Embedding::Dense(t) => t.device(),
            Embedding::Quantized { device, .. } => device,
        }
    }

    /// The weights (training only).
    fn dense(&self) -> Result<&Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t),
            Embedding::Quantized { .. } => {
                candle_core::bail!("an inference-only decoder has no trainable embedding")
            }
        }
    }

    /// ids (N) → their rows (N, C).
    fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let Embedding::Quantized {
            table,
            dtype,
            device,
        } = self
        else {
            return self.dense()?.index_select(ids, 0);
        };
        let (vocab, c) = table.shape().dims2()?;
        let data = table.data()?;
        let row = data.len() / vocab;
        let ids = ids.to_vec1::<u32>()?;
        let mut bytes = Vec::with_capacity(ids.len() * row);
        for &id in &ids {
            let id = id as usize;
            if id >= vocab {
                candle_core::bail!("token id {id} is beyond the vocabulary ({vocab})");
            }
            bytes.extend_from_slice(&data[id * row..][..row]);
        }
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Owned(bytes),
            device,
            table.dtype(),
        )?;
        QTensor::new(storage, (ids.len(), c))?
            .dequantize(device)?
            .to_dtype(*dtype)
    }
}

pub struct Decoder {
    cfg: PhiConfig,
    head_kind: HeadKind,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Norm,
    /// `None` when the LM head is tied to the embedding (and no quantized copy of it is given).
    head: Option<Proj>,
    rope: Rope,
    training: bool,
    /// Where this pass's dropout masks come from (training only).
    dropout_seed: u64,
    /// Built by [`Decoder::frozen`]: inference only.
    frozen: bool,
    /// What [`Decoder::decode_slots`] needs, where the model can take that path.
    slots: Option<SlotPath>,
}

impl Decoder {
    /// Builds the decoder from tensors named as in `names::parameter_table`, all of one dtype.
    pub fn new(cfg: &PhiConfig, w: &Weights) -> std::result::Result<Self, ModelError> {
        cfg.validate()?;
        let embed = take(w, "model.embed_tokens.weight")?;
        let (dtype, device) = (embed.dtype(), embed.device().clone());
        let (norm_kind, eps) = (cfg.norm_kind(), cfg.norm_eps());
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qk_norm = |which: &str| -> std::result::Result<Option<Norm>, ModelError> {
                cfg.qk_layernorm
                    .then(|| Norm::new(w, &format!("{p}.self_attn.{which}"), NormKind::Layer, eps))
                    .transpose()
            };
            blocks.push(Block {
                input_norm: Norm::new(w, &format!("{p}.input_layernorm"), norm_kind, eps)?,
                post_norm: match cfg.layout() {
                    BlockLayout::Parallel => None,
                    BlockLayout::Sequential => Some(Norm::new(
                        w,
                        &format!("{p}.post_attention_layernorm"),
                        norm_kind,
                        eps,
                    )?),
                },
                attn: Attention {
                    qkv: linear(w, &format!("{p}.self_attn.qkv_proj"), cfg.attention_bias())?,
                    out: linear(
                        w,
                        &format!("{p}.self_attn.o_proj"),
                        cfg.attention_out_bias(),
                    )?,
                    q_norm: qk_norm("q_layernorm")?,
                    k_norm: qk_norm("k_layernorm")?,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.kv_heads(),
                    head_dim: cfg.head_dim(),
                    dropout: cfg.attention_dropout,
                },
                mlp: Mlp {
                    up: linear(w, &format!("{p}.mlp.up_proj"), cfg.mlp_bias())?,
                    down: linear(w, &format!("{p}.mlp.down_proj"), cfg.mlp_bias())?,
                    kind: cfg.mlp_kind(),
                    act: cfg.hidden_act,
                    inter: cfg.intermediate_size,
                },
                resid_dropout: cfg.resid_pdrop,
                layer: i,
            });
        }
        let head_kind = cfg.head()?;
        let head = match head_kind {
            HeadKind::CausalLm if cfg.tie_word_embeddings => None,
            HeadKind::CausalLm => Some(linear(w, "lm_head", cfg.lm_head_bias())?),
            HeadKind::SequenceClassification { .. } => Some(linear(w, "score", false)?),
        };
        Ok(Decoder {
            cfg: cfg.clone(),
            head_kind,
            embed: Embedding::Dense(embed),
            blocks,
            norm: Norm::new(w, "model.norm", norm_kind, eps)?,
            head,
            rope: Rope::new(&cfg.rotary()?, cfg.max_position_embeddings, dtype, &device)?,
            training: false,
            dropout_seed: 0,
            frozen: false,
            slots: None,
        })
    }

    /// An inference-only decoder (see [`Proj::Frozen`]): projections named in `quantized` also
    /// get that quantized copy; a quantized `lm_head.weight` serves a head tied to the embedding,
    /// and a quantized `model.embed_tokens.weight` the lookups (`w`'s table may then be a
    /// placeholder). Each weight, dense or quantized, is dropped once its copy is made, so the
    /// peak memory is the frozen model's plus one matrix, not twice the model's.
    pub fn frozen(
        cfg: &PhiConfig,
        w: Weights,
        mut quantized: QuantizedWeights,
    ) -> std::result::Result<Self, ModelError> {
        let mut d = Self::new(cfg, &w)?;
        drop(w);
        let table = quantized.remove("model.embed_tokens.weight");
        let mut q = |name: String| quantized.remove(&name);
        for (i, block) in d.blocks.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut block.attn;
            a.qkv = a
                .qkv
                .clone()
                .freeze(q(format!("{p}.self_attn.qkv_proj.weight")).as_ref())?;
            a.out = a
                .out
                .clone()
                .freeze(q(format!("{p}.self_attn.o_proj.weight")).as_ref())?;
            let m = &mut block.mlp;
            m.up =
                m.up.clone()
                    .freeze(q(format!("{p}.mlp.up_proj.weight")).as_ref())?;
            m.down = m
                .down
                .clone()
                .freeze(q(format!("{p}.mlp.down_proj.weight")).as_ref())?;
        }
        let head = match d.head.take() {
            Some(h) => h,
            None => Proj::Dense(Linear::new(d.embed.dense()?.clone(), None)),
        };
        let head_q = q("lm_head.weight".into()).or_else(|| q("score.weight".into()));
        d.head = Some(head.freeze(head_q.as_ref())?);
        if let Some(table) = table {
            let (dtype, device) = (d.embed.dtype(), d.embed.device().clone());
            d.embed = Embedding::Quantized {
                table,
                dtype,
                device,
            };
        }
        d.frozen = true;
        d.slots = SlotPath::new(&d)?;
        Ok(d)
    }

    /// Fresh weights as transformers initialises them (normal(0, initializer_range) for
    /// matrices, zero biases, unit norms), from `seed`.
    pub fn init_weights(
        cfg: &PhiConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Weights, ModelError> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, cfg.initializer_range as f32).map_err(|e| {
            ModelError::InvalidConfig {
                key: "initializer_range",
                expected: "a finite standard deviation".into(),
                found: format!("{} ({e})", cfg.initializer_range),
            }
        })?;
        let mut w = Weights::new();
        for p in parameter_table(cfg)? {
            let tensor = match p.init {
                Init::Normal => {
                    let n = p.shape.iter().product();
                    let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                    Tensor::from_vec(values, p.shape.as_slice(), device)?.to_dtype(dtype)?
                }
                Init::Zeros => Tensor::zeros(p.shape.as_slice(), dtype, device)?,
                Init::Ones => Tensor::ones(p.shape.as_slice(), dtype, device)?,
            };
            w.insert(p.name, tensor);
        }
        Ok(w)
    }

    pub fn config(&self) -> &PhiConfig {
        &self.cfg
    }

    pub fn head_kind(&self) -> HeadKind {
        self.head_kind
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// LongRoPE's original context: positions beyond it use the long factors. `None` otherwise.
    pub fn long_rope_from(&self) -> Option<usize> {
        self.rope.long_from()
    }

    /// Training mode: dropout on, differentiable ops only.
    pub fn set_training(&mut self, training: bool) {
        assert!(
            !(training && self.frozen),
            "an inference-only decoder cannot be trained"
        );
        self.training = training;
    }

    /// The seed the dropout masks of the next training passes derive from (with the layer and
    /// the site). The trainer sets one per (recipe seed, stage, step, micro-batch).
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.dropout_seed = seed;
    }

    /// ids: (B, T) u32 → logits (B, T, V) at every position (V = labels for classifier heads).
    /// Pass a cache only when sampling: it supplies the past and records this step.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.hidden_states(ids, cache)?;
        self.head_forward(&hidden)
    }

    /// The final-norm hidden states (B, T, C): the input of every head, and the embedding the
    /// classifier stage uses.
    pub fn hidden_states(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let step = self.step(b, t, cache.as_deref())?;
        let mut x = self.embed(ids, &step)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer = cache.as_deref_mut().map(|c| c.layer(i));
            x = block.forward(&x, &step, layer)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        self.norm.forward(&x, self.training)
    }

    /// What every layer of a pass over (B, T) new tokens shares: positions, mask, dropout.
    fn step(&self, b: usize, t: usize, cache: Option<&KvCache>) -> Result<Step<'_>> {
        let device = self.embed.device();
        let past = cache.map_or(0, |c| c.len());
        let left_pad = cache.and_then(|c| c.left_pad().map(<[usize]>::to_vec));
        let positions = match &left_pad {
            Some(pad) if pad.iter().any(|&n| n > 0) => {
                if pad.len() != b {
                    candle_core::bail!(
                        "the cache was made for {} rows, this batch has {b}",
                        pad.len()
                    );
                }
                let ids: Vec<u32> = (0..b)
                    .flat_map(|r| (0..t).map(move |i| (past + i).saturating_sub(pad[r]) as u32))
                    .collect();
                let max = *ids.iter().max().unwrap_or(&0) as usize;
                Positions::PerRow {
                    ids: Tensor::from_vec(ids, (b, t), device)?,
                    max,
                }
            }
            _ => Positions::Range {
                start: past,
                len: t,
            },
        };
        let (cos, sin) = self.rope.tables(&positions)?;
        let decoding = t == 1 && cache.is_some() && !self.training;
        let decode_from: Option<Vec<usize>> =
            (decoding && device.is_cpu() && self.dtype() == DType::F32).then(|| {
                let window_start = self
                    .cfg
                    .window()
                    .map_or(0, |w| (past + 1).saturating_sub(w));
                (0..b)
                    .map(|r| left_pad.as_ref().map_or(0, |p| p[r]).max(window_start))
                    .collect()
            });
        // The decode kernel reads each row's visible range instead: no mask to build.
        let mask = match decode_from {
            Some(_) => None,
            None => attention_mask(
                b,
                t,
                past,
                left_pad.as_deref(),
                self.cfg.window(),
                self.dtype(),
                device,
            )?,
        };
        Ok(Step {
            rope: &self.rope,
            cos,
            sin,
            mask,
            training: self.training,
            dropout: self.training.then_some(self.dropout_seed),
            decode_from,
        })
    }

    /// ids (B, T) → the embedded tokens (B, T, C), with the embedding dropout.
    fn embed(&self, ids: &Tensor, step: &Step) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self.embed.rows(&ids.flatten_all()?)?.reshape((b, t, ()))?; // (B, T, C)
        dropout(
            &x,
            self.cfg.embd_pdrop,
            step.dropout,
            0,
            DropSite::Embedding,
        )
    }

    /// A training pass over (B, T) tokens cut at the block boundaries, for activation
    /// recompute: the caller runs the embedding, each block and the final norm as it chooses and
    /// keeps what it wants of their graphs. The pieces composed equal [`Decoder::hidden_states`],
    /// dropout masks included (they are a function of the seed, layer and site).
    pub fn training_pass(&self, b: usize, t: usize) -> Result<TrainingPass<'_>> {
        if !self.training {
            candle_core::bail!("a training pass needs a decoder in training mode (set_training)");
        }
        Ok(TrainingPass {
            decoder: self,
            step: self.step(b, t, None)?,
        })
    }

    /// hidden (B, T, C) → (B, T, V) through the head (the embedding when tied).
    pub fn head_forward(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.head {
            Some(head) => apply(head, hidden),
            None => project(hidden, self.embed.dense()?, None),
        }
    }

    /// The head's weight (V, C) and bias: the embedding and no bias when tied (training only).
    pub fn head_parts(&self) -> Result<(&Tensor, Option<&Tensor>)> {
        match &self.head {
            None => Ok((self.embed.dense()?, None)),
            Some(Proj::Dense(head)) => Ok((head.weight(), head.bias())),
            Some(Proj::Frozen { .. }) => {
                candle_core::bail!("an inference-only decoder has no trainable head")
            }
        }
    }

    /// A sequence classifier's logits (B, labels), read at each row's last non-pad token as
    /// transformers' `GenericForSequenceClassification` does.
    pub fn sequence_logits(&self, ids: &Tensor) -> Result<Tensor> {
        let logits = self.forward(ids, None)?; //                                          (B, T, L)
        let rows = ids.to_vec2::<u32>()?;
        let picked = rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let last = match self.cfg.pad_token_id {
                    Some(pad) => row.iter().rposition(|&id| id != pad).unwrap_or(0),
                    None => row.len() - 1,
                };
                logits.get(r)?.get(last)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&picked, 0)
    }
}

/// The raw parts of a frozen decoder that [`Decoder::decode_slots`] reads: every projection
/// packed (a GGUF file's Q4_0 / Q4_1 / Q8_0 on a CPU with VNNI), f32, sequential blocks with
/// RMSNorm and a gated MLP (llama, SmolLM2, phi-3 without LongRoPE), no q/k norms.
struct SlotPath {
    /// Per layer: input norm, post-attention norm.
    norms: Vec<[Vec<f32>; 2]>,
    final_norm: Vec<f32>,
    /// Rotary cos and sin per position, (P, R/2) row-major.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// The packed weight and bias of a projection the slot path can run.
fn packed(p: &Proj) -> Option<(&PackedWeight, Option<&Tensor>)> {
    match p {
        Proj::Frozen {
            packed: Some(w),
            bias,
            ..
        } => Some((w, bias.as_ref())),
        _ => None,
    }
}

fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

impl SlotPath {
    fn new(d: &Decoder) -> Result<Option<SlotPath>> {
        let cfg = &d.cfg;
        let plain = d.device().is_cpu()
            && d.dtype() == DType::F32
            && cfg.layout() == BlockLayout::Sequential
            && cfg.norm_kind() == NormKind::Rms
            && cfg.mlp_kind() == MlpKind::Gated
            && matches!(cfg.hidden_act, Activation::Silu | Activation::GeluTanh)
            && d.rope.long_from().is_none()
            && d.head.as_ref().is_some_and(|h| packed(h).is_some())
            && d.blocks.iter().all(|b| {
                b.attn.q_norm.is_none()
                    && b.post_norm.is_some()
                    && [&b.attn.qkv, &b.attn.out, &b.mlp.up, &b.mlp.down]
                        .iter()
                        .all(|p| packed(p).is_some())
            });
        if !plain {
            return Ok(None);
        }
        let norms = d
            .blocks
            .iter()
            .map(|b| {
                let post = b.post_norm.as_ref().expect("checked above");
                Ok([f32s(&b.input_norm.weight)?, f32s(&post.weight)?])
            })
            .collect::<Result<Vec<_>>>()?;
        let (cos, sin) = d.rope.tables(&Positions::Range {
            start: 0,
            len: cfg.max_position_embeddings,
        })?;
        Ok(Some(SlotPath {
            norms,
            final_norm: f32s(&d.norm.weight)?,
            cos: f32s(&cos)?,
            sin: f32s(&sin)?,
        }))
    }
}

/// `out = x / rms(x) · w` per row of `w.len()` features, rounded as candle's `rms_norm` (the
/// same operations in the same order), so the two paths agree to the bit.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let c = w.len();
    for (x, out) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let m = (x.iter().map(|v| v * v).sum::<f32>() / c as f32 + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
            *o = v / m * w;
        }
    }
}

/// `y = x Wᵀ (+ b)` for `rows` rows with a packed projection.
fn packed_rows(p: &Proj, x: &[f32], rows: usize, y: &mut Vec<f32>) -> Result<()> {
    let (w, bias) = packed(p).expect("the slot path has packed projections only");
    y.clear();
    y.resize(rows * w.out(), 0.0);
    w.matmul_into(x, rows, y);
    if let Some(b) = bias {
        let b = f32s(b)?;
        y.chunks_exact_mut(b.len())
            .for_each(|row| super::ops::add_assign(row, &b));
    }
    Ok(())
}

/// Rotates the first `2·half` features of each head of `x` (heads × d) at one position, as
/// `rope.rs` (the two halves paired).
fn rotate(x: &mut [f32], d: usize, cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(d) {
        for i in 0..half {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos[i] - b * sin[i];
            head[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

impl Decoder {
    /// Whether [`Decoder::decode_slots`] serves this decoder (see [`SlotPath`]).
    pub fn decodes_slots(&self) -> bool {
        self.slots.is_some()
    }

    /// One decoding step of `ids.len()` sequences, each with its own [`Slot`] (its keys and
    /// values so far; this step's are appended in place): the next-token logits, (n, V)
    /// row-major. The same function as [`Decoder::forward`] with a cache, computed on raw
    /// buffers: no tensor op per layer, no mask, no copy of any other sequence's cache.
    pub fn decode_slots(&self, ids: &[u32], slots: &mut [&mut Slot]) -> Result<Vec<f32>> {
        let Some(path) = &self.slots else {
            candle_core::bail!("decode_slots: this decoder has no slot path (see decodes_slots)");
        };
        let n = ids.len();
        if slots.len() != n {
            candle_core::bail!("decode_slots: {n} ids for {} slots", slots.len());
        }
        let cfg = &self.cfg;
        let (c, h, k, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.kv_heads(),
            cfg.head_dim(),
        );
        let half = path.cos.len() / cfg.max_position_embeddings;
        let eps = cfg.norm_eps() as f32;
        for s in slots.iter() {
            if s.len() >= cfg.max_position_embeddings {
                candle_core::bail!(
                    "position {} is beyond max_position_embeddings ({}); use a shorter prompt or fewer new tokens",
                    s.len(),
                    cfg.max_position_embeddings
                );
            }
        }
        // x: (n, C), the embeddings of `ids`.
        let mut x = Vec::with_capacity(n * c);
        if let Embedding::Quantized { .. } = self.embed {
            let ids = Tensor::new(ids, &Device::Cpu)?;
            x = self.embed.rows(&ids)?.flatten_all()?.to_vec1::<f32>()?;
        } else {
            let (storage, layout) = self.embed.dense()?.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("decode_slots runs on the CPU");
            };
            let table = super::ops::cpu_f32(cpu, layout)?;
            for &id in ids {
                let id = id as usize;
                if (id + 1) * c > table.len() {
                    candle_core::bail!("token id {id} is beyond the vocabulary");
                }
                x.extend_from_slice(&table[id * c..][..c]);
            }
        }
        let (mut normed, mut qkv, mut attn, mut proj, mut up) = (
            vec![0f32; n * c],
            Vec::new(),
            vec![0f32; n * h * d],
            Vec::new(),
            Vec::new(),
        );
        let mut act = vec![0f32; n * cfg.intermediate_size];
        let scale = (d as f32).powf(-0.5);
        for (l, block) in self.blocks.iter().enumerate() {
            let [in_norm, post_norm] = &path.norms[l];
            rms_norm_rows(&x, in_norm, eps, &mut normed);
            packed_rows(&block.attn.qkv, &normed, n, &mut qkv)?; //            (n, (H+2K)·D)
            let width = (h + 2 * k) * d;
            for (r, slot) in slots.iter_mut().enumerate() {
                let pos = slot.len();
                let (cos, sin) = (
                    &path.cos[pos * half..][..half],
                    &path.sin[pos * half..][..half],
                );
                let row = &mut qkv[r * width..][..width];
                let (q, kv) = row.split_at_mut(h * d);
                rotate(q, d, cos, sin);
                rotate(&mut kv[..k * d], d, cos, sin);
                slot.push(l, &kv[..k * d], &kv[k * d..]);
            }
            let window = cfg.window();
            let task = |(i, out): (usize, &mut [f32])| {
                let (r, g) = (i / k, i % k);
                let rep = h / k;
                let (keys, values) = slots[r].layer(l);
                let s = keys.len() / (k * d);
                let first = window.map_or(0, |w| s.saturating_sub(w));
                let q = &qkv[r * width + g * rep * d..][..rep * d];
                attention::group_strided(q, keys, values, first, s, d, k * d, g * d, scale, out);
            };
            attn.iter_mut().for_each(|v| *v = 0.0);
            if n * k > 4 {
                attn.par_chunks_mut(h / k * d).enumerate().for_each(task);
            } else {
                attn.chunks_mut(h / k * d).enumerate().for_each(task);
            }
            packed_rows(&block.attn.out, &attn, n, &mut proj)?;
            super::ops::add_assign(&mut x, &proj);
            rms_norm_rows(&x, post_norm, eps, &mut normed);
            packed_rows(&block.mlp.up, &normed, n, &mut up)?; //                    (n, 2I)
            let inter = block.mlp.inter;
            for (a, u) in act.chunks_exact_mut(inter).zip(up.chunks_exact(2 * inter)) {
                let (gate, up) = u.split_at(inter);
                for ((a, g), u) in a.iter_mut().zip(gate).zip(up) {
                    let g = match block.mlp.act {
                        Activation::GeluTanh => super::ops::gelu_tanh_one(*g),
                        _ => g / (1.0 + (-g).exp()),
                    };
                    *a = g * u;
                }
            }
            packed_rows(&block.mlp.down, &act, n, &mut proj)?;
            super::ops::add_assign(&mut x, &proj);
        }
        for slot in slots.iter_mut() {
            slot.advance();
        }
        rms_norm_rows(&x, &path.final_norm, eps, &mut normed);
        let mut logits = Vec::new();
        packed_rows(
            self.head.as_ref().expect("checked in SlotPath::new"),
            &normed,
            n,
            &mut logits,
        )?;
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask's rule, checked by hand on a 3-token step after 2 cached tokens, window 3, one
    /// left pad in row 1: key k is visible from query q iff k == q or (pad ≤ k < q and q - k < 3).
    #[test]
    fn mask_follows_causality_padding_and_window() {
        let m = attention_mask(2, 3, 2, Some(&[0, 1]), Some(3), DType::F32, &Device::Cpu)
            .unwrap()
            .unwrap();
        let m: Vec<Vec<Vec<f32>>> = m.squeeze(1).unwrap().to_vec3().unwrap();
        let vis = |row: &Vec<f32>| row.iter().map(|v| u8::from(*v == 0.0)).collect::<Vec<_>>();
        assert_eq!(vis(&m[0][0]), [1, 1, 1, 0, 0]); // q=2 sees 0,1,2
        assert_eq!(vis(&m[0][2]), [0, 0, 1, 1, 1]); // q=4 sees 2,3,4 (window 3)
        assert_eq!(vis(&m[1][0]), [0, 1, 1, 0, 0]); // row 1: key 0 is a pad
        assert!(
            attention_mask(1, 1, 5, None, None, DType::F32, &Device::Cpu)
                .unwrap()
                .is_none()
        );
    }

    /// A frozen decoder that looks its tokens up in a quantized table gives exactly the logits of
    /// one whose dense table holds that table's values (candle's own dequantization of the whole
    /// table, not the row lookup under test): the rows are the same numbers.
    #[test]
    fn quantized_embedding_lookups_equal_the_dequantized_table() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama_tied");
        let (cfg, mut w) =
            super::super::checkpoint::load_weights(&dir, DType::F32, &Device::Cpu).unwrap();
        let table = QTensor::quantize(
            &w["model.embed_tokens.weight"],
            candle_core::quantized::GgmlDType::Q8_0,
        )
        .unwrap();
        w.insert(
            "model.embed_tokens.weight".into(),
            table.dequantize(&Device::Cpu).unwrap(),
        );
        let dense = Decoder::frozen(&cfg, w.clone(), QuantizedWeights::new()).unwrap();
        let mut q = QuantizedWeights::new();
        q.insert("model.embed_tokens.weight".into(), Arc::new(table));
        let looked_up = Decoder::frozen(&cfg, w, q).unwrap();
        assert!(matches!(looked_up.embed, Embedding::Quantized { .. }));
        let ids = Tensor::new(&[[3u32, 17, 42, 8, 90, 1, 64]], &Device::Cpu).unwrap();
        let a = dense.forward(&ids, None).unwrap().flatten_all().unwrap();
        let b = looked_up
            .forward(&ids, None)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        let beyond = Tensor::new(&[[cfg.vocab_size as u32]], &Device::Cpu).unwrap();
        let err = looked_up.forward(&beyond, None).unwrap_err().to_string();
        assert!(err.contains("beyond the vocabulary"), "{err}");
    }
}

#[cfg(test)]
mod dropout_tests {
    use super::*;

    /// Inverted dropout as in PyTorch: each element is zeroed with probability p and the rest are
    /// scaled by 1/(1-p). Over 100k ones at p = 0.25 the zero share is 0.25 within 5 standard
    /// deviations (sqrt(p(1-p)/n) ≈ 0.0014), and sites and layers draw different masks.
    #[test]
    fn masks_have_the_rate_and_scale_and_differ_by_site() {
        let ones = Tensor::ones(100_000, DType::F32, &Device::Cpu).unwrap();
        let y = dropout(&ones, 0.25, Some(9), 3, DropSite::MlpOut).unwrap();
        let v = y.to_vec1::<f32>().unwrap();
        let zeros = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - 0.25).abs() < 5.0 * 0.0014, "zero share {zeros}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
        for other in [
            dropout(&ones, 0.25, Some(9), 3, DropSite::AttentionOut).unwrap(),
            dropout(&ones, 0.25, Some(9), 4, DropSite::MlpOut).unwrap(),
        ] {
            assert_ne!(other.to_vec1::<f32>().unwrap(), v);
        }
        let same = dropout(&ones, 0.25, None, 3, DropSite::MlpOut).unwrap();
        assert_eq!(same.to_vec1::<f32>().unwrap(), vec![1.0; 100_000]);
    }
}

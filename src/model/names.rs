//! Every parameter of a decoder: its name inside phigen, its shape, how a fresh model initialises
//! it, and the Hugging Face tensors it is made of. The one place names live: the decoder reads
//! these names, checkpoints translate through them, the trainer enumerates them.
//!
//! phigen fuses what some layouts split — q/k/v into `qkv_proj` and gate/up into `up_proj` — so
//! one attention and one MLP serve every layout; fused tensors are concatenations along the
//! output dimension (rows), in the order transformers' `Phi3` modules split them.

use super::config::{BlockLayout, HeadKind, ModelType, NormKind, PhiConfig};
use super::ModelError;

/// How a fresh model fills a parameter (as transformers' `_init_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal(0, initializer_range): linear and embedding weights.
    Normal,
    Zeros,
    Ones,
}

/// One parameter. `parts` are the checkpoint tensors stacked (along dim 0) to make it, with their
/// row counts; most parameters are a single part of the same shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub parts: Vec<(String, usize)>,
}

impl Param {
    fn new(name: String, shape: Vec<usize>, init: Init, parts: Vec<(String, usize)>) -> Self {
        Param {
            name,
            shape,
            init,
            parts,
        }
    }

    /// A parameter stored under its own name.
    fn same(name: String, shape: Vec<usize>, init: Init) -> Self {
        let rows = shape[0];
        Param::new(name.clone(), shape, init, vec![(name, rows)])
    }
}

/// A linear layer `rows × cols`: weight (+ bias); its checkpoint parts are `hf` names with row counts.
fn linear(out: &mut Vec<Param>, name: &str, hf: &[(String, usize)], cols: usize, bias: bool) {
    let rows = hf.iter().map(|(_, r)| r).sum();
    let with = |suffix: &str| -> Vec<(String, usize)> {
        hf.iter()
            .map(|(n, r)| (format!("{n}.{suffix}"), *r))
            .collect()
    };
    out.push(Param::new(
        format!("{name}.weight"),
        vec![rows, cols],
        Init::Normal,
        with("weight"),
    ));
    if bias {
        out.push(Param::new(
            format!("{name}.bias"),
            vec![rows],
            Init::Zeros,
            with("bias"),
        ));
    }
}

fn norm(out: &mut Vec<Param>, name: &str, hf: &str, dim: usize, kind: NormKind) {
    let part = |suffix: &str| vec![(format!("{hf}.{suffix}"), dim)];
    out.push(Param::new(
        format!("{name}.weight"),
        vec![dim],
        Init::Ones,
        part("weight"),
    ));
    if kind == NormKind::Layer {
        out.push(Param::new(
            format!("{name}.bias"),
            vec![dim],
            Init::Zeros,
            part("bias"),
        ));
    }
}

/// The full table for a config, in a stable order (embedding, layers, final norm, head).
pub fn parameter_table(cfg: &PhiConfig) -> Result<Vec<Param>, ModelError> {
    let (c, v, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (h, kv, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
    let norm_kind = cfg.norm_kind();
    let mut out = vec![Param::same(
        "model.embed_tokens.weight".into(),
        vec![v, c],
        Init::Normal,
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let part = |n: &str, rows: usize| (format!("{p}.{n}"), rows);
        norm(
            &mut out,
            &format!("{p}.input_layernorm"),
            &format!("{p}.input_layernorm"),
            c,
            norm_kind,
        );
        let qkv = match cfg.model_type {
            ModelType::Phi3 => vec![part("self_attn.qkv_proj", (h + 2 * kv) * d)],
            ModelType::Phi | ModelType::Llama | ModelType::Qwen2 => vec![
                part("self_attn.q_proj", h * d),
                part("self_attn.k_proj", kv * d),
                part("self_attn.v_proj", kv * d),
            ],
        };
        linear(
            &mut out,
            &format!("{p}.self_attn.qkv_proj"),
            &qkv,
            c,
            cfg.attention_bias(),
        );
        if cfg.qk_layernorm {
            for which in ["q_layernorm", "k_layernorm"] {
                let name = format!("{p}.self_attn.{which}");
                norm(&mut out, &name, &name, d, NormKind::Layer);
            }
        }
        let o_name = match cfg.model_type {
            ModelType::Phi => "self_attn.dense",
            ModelType::Phi3 | ModelType::Llama | ModelType::Qwen2 => "self_attn.o_proj",
        };
        linear(
            &mut out,
            &format!("{p}.self_attn.o_proj"),
            &[part(o_name, c)],
            h * d,
            cfg.attention_out_bias(),
        );
        if cfg.layout() == BlockLayout::Sequential {
            let name = format!("{p}.post_attention_layernorm");
            norm(&mut out, &name, &name, c, norm_kind);
        }
        let (up, down) = match cfg.model_type {
            ModelType::Phi => (vec![part("mlp.fc1", inter)], "mlp.fc2"),
            ModelType::Phi3 => (vec![part("mlp.gate_up_proj", 2 * inter)], "mlp.down_proj"),
            ModelType::Llama | ModelType::Qwen2 => (
                vec![part("mlp.gate_proj", inter), part("mlp.up_proj", inter)],
                "mlp.down_proj",
            ),
        };
        linear(
            &mut out,
            &format!("{p}.mlp.up_proj"),
            &up,
            c,
            cfg.mlp_bias(),
        );
        linear(
            &mut out,
            &format!("{p}.mlp.down_proj"),
            &[part(down, c)],
            inter,
            cfg.mlp_bias(),
        );
    }
    let final_norm = match cfg.model_type {
        ModelType::Phi => "model.final_layernorm",
        ModelType::Phi3 | ModelType::Llama | ModelType::Qwen2 => "model.norm",
    };
    norm(&mut out, "model.norm", final_norm, c, norm_kind);
    match cfg.head()? {
        HeadKind::CausalLm if cfg.tie_word_embeddings => {}
        HeadKind::CausalLm => linear(
            &mut out,
            "lm_head",
            &[("lm_head".into(), v)],
            c,
            cfg.lm_head_bias(),
        ),
        HeadKind::SequenceClassification { num_labels } => {
            linear(&mut out, "score", &[("score".into(), num_labels)], c, false)
        }
    }
    Ok(out)
}

/// Checkpoint tensors that carry no parameter and are skipped on load (old rotary caches).
pub fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".masked_bias")
        || name.ends_with("attn.bias")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Preset;

    /// The checkpoint names must be exactly transformers' (`model.layers.0.self_attn.dense.weight` in
    /// `modeling_phi.py`, `qkv_proj` and `gate_up_proj` in `modeling_phi3.py`, separate q/k/v and
    /// gate/up in `modeling_llama.py`); listed here from those files.
    #[test]
    fn checkpoint_names_follow_transformers() {
        let hf_names = |preset: Preset| -> Vec<String> {
            let cfg = PhiConfig::preset(preset);
            parameter_table(&cfg)
                .unwrap()
                .into_iter()
                .flat_map(|p| p.parts.into_iter().map(|(n, _)| n))
                .filter(|n| n.starts_with("model.layers.0.") || !n.starts_with("model.layers."))
                .collect()
        };
        let phi = hf_names(Preset::TinyPhi);
        for name in [
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.bias",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.dense.weight",
            "model.layers.0.mlp.fc1.weight",
            "model.layers.0.mlp.fc2.bias",
            "model.final_layernorm.weight",
            "lm_head.bias",
        ] {
            assert!(phi.contains(&name.to_string()), "phi lacks {name}: {phi:?}");
        }
        let phi3 = hf_names(Preset::TinyPhi3);
        for name in [
            "model.layers.0.self_attn.qkv_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.mlp.gate_up_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert!(
                phi3.contains(&name.to_string()),
                "phi3 lacks {name}: {phi3:?}"
            );
        }
        assert!(
            !phi3.iter().any(|n| n.ends_with(".bias")),
            "phi-3 has no biases"
        );
        let llama = hf_names(Preset::TinyLlama);
        assert!(llama.contains(&"model.layers.0.mlp.gate_proj.weight".to_string()));
        assert!(
            !llama.iter().any(|n| n.starts_with("lm_head")),
            "tied embeddings have no lm_head"
        );
    }
}

//! `PhiConfig`: one config for every decoder phigen runs. Field names are the Hugging Face
//! `config.json` keys of `PhiConfig` / `Phi3Config` / `LlamaConfig` (transformers 4.x and 5.x:
//! the rotary settings are read from `rope_parameters` or from the older `rope_theta` +
//! `rope_scaling` + `partial_rotary_factor`), so a checkpoint's config loads as is. Keys phigen does
//! not use are kept in `extra` and written back unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Which Hugging Face modeling file a checkpoint follows; decides names and block structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// `PhiForCausalLM` (phi-1, phi-1.5, phi-2): parallel block, LayerNorm, GELU MLP, biases.
    Phi,
    /// `Phi3ForCausalLM`: sequential block, RMSNorm, fused qkv, SwiGLU, GQA, long-context RoPE.
    Phi3,
    /// `LlamaForCausalLM` (SmolLM2, TinyLlama): the phi-3 block with separate q/k/v and gate/up.
    Llama,
    /// `Qwen2ForCausalLM` (Qwen2.5, Qwen2.5-Coder): the llama block with biases on q, k and v (not
    /// on the output projection).
    Qwen2,
}

/// Attention and MLP side by side on one normalised input (phi-1/1.5/2), or one after the other
/// with a norm before each (phi-3, llama).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockLayout {
    Parallel,
    Sequential,
}

/// LayerNorm (mean and variance, with bias) or RMSNorm (root mean square, no bias).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    Layer,
    Rms,
}

/// `fc1 → act → fc2` (phi) or `down(act(gate) * up)` (phi-3, llama).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpKind {
    Plain,
    Gated,
}

/// The `hidden_act` values of the supported checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    /// exact GELU with erf.
    #[serde(rename = "gelu")]
    Gelu,
    #[serde(rename = "silu", alias = "swish")]
    Silu,
    #[serde(rename = "relu")]
    Relu,
}

/// What sits on top of the decoder, from `architectures` (`*ForCausalLM`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadKind {
    CausalLm,
    /// One label per sequence, read at the last non-pad token.
    SequenceClassification {
        num_labels: usize,
    },
}

/// The rotary frequencies after resolving every spelling of the settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Rotary {
    pub theta: f64,
    /// Rotated dimensions per head (`head_dim * partial_rotary_factor`, even).
    pub dim: usize,
    pub scaling: RopeScaling,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Phi-3 LongRoPE (`longrope`, formerly `su`): per-frequency factors, the long set used for a
    /// forward pass whose last position is beyond `original_max`; cos/sin scaled by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max: usize,
        attention_factor: f64,
    },
}

/// `rope_parameters` (transformers 5) / `rope_scaling` (transformers 4): the same keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// transformers 4 wrote `type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_factor: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_factor: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
}

impl RopeParameters {
    fn kind(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.legacy_type.as_deref())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhiConfig {
    pub model_type: ModelType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_norm_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub qk_layernorm: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub embd_pdrop: f64,
    #[serde(default)]
    pub resid_pdrop: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// Written as `null` when unset: transformers would otherwise fill in its own default.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Written as `null` when unset: transformers would otherwise fill in its own default.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Written as `null` when unset: transformers would otherwise fill in its own default.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Class names of a classification head, `{"0": "LABEL_0", …}` as transformers writes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Keys phigen does not read (`transformers_version`, `use_cache`, …), written back as found.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// `eos_token_id` is one id or a list of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_initializer_range() -> f64 {
    0.02
}

/// The named sizes `phigen init --preset` and a training recipe's `model.preset` accept. Each is
/// spelled as in [`Preset::name`] in both places (and in a recipe written back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum Preset {
    Phi1,
    Phi1Small,
    Phi1_5,
    Phi2,
    Phi3Mini,
    TinyPhi,
    TinyPhi3,
    TinyLlama,
}

impl Preset {
    pub const ALL: [Preset; 8] = [
        Preset::Phi1,
        Preset::Phi1Small,
        Preset::Phi1_5,
        Preset::Phi2,
        Preset::Phi3Mini,
        Preset::TinyPhi,
        Preset::TinyPhi3,
        Preset::TinyLlama,
    ];

    /// The preset's name, as `--preset` and recipes spell it.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Phi1 => "phi-1",
            Preset::Phi1Small => "phi-1-small",
            Preset::Phi1_5 => "phi-1.5",
            Preset::Phi2 => "phi-2",
            Preset::Phi3Mini => "phi-3-mini",
            Preset::TinyPhi => "tiny-phi",
            Preset::TinyPhi3 => "tiny-phi3",
            Preset::TinyLlama => "tiny-llama",
        }
    }

    /// Every name, comma-separated, for error messages.
    fn names() -> String {
        Preset::ALL.map(Preset::name).join(", ")
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A preset name that is not one of [`Preset::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown preset `{found}`: expected one of {}; use one of these, or give a checkpoint's config.json instead", Preset::names())]
pub struct UnknownPreset {
    pub found: String,
}

impl std::str::FromStr for Preset {
    type Err = UnknownPreset;

    fn from_str(s: &str) -> Result<Self, UnknownPreset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPreset { found: s.into() })
    }
}

impl TryFrom<String> for Preset {
    type Error = UnknownPreset;

    fn try_from(s: String) -> Result<Self, UnknownPreset> {
        s.parse()
    }
}

impl From<Preset> for &'static str {
    fn from(p: Preset) -> Self {
        p.name()
    }
}

/// `--preset`'s choices are the names of [`Preset::ALL`] (written by hand rather than derived, so
/// the names are spelled once, in [`Preset::name`]).
impl clap::ValueEnum for Preset {
    fn value_variants<'a>() -> &'a [Self] {
        &Preset::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

impl PhiConfig {
    /// A phi-1 style config (`PhiForCausalLM`, GPT-2/codegen vocabulary padded to 51,200, rotary
    /// dimension 32 of head dimension 64, context 2,048); sizes from the phi-1 model card.
    fn phi(hidden: usize, layers: usize, heads: usize, partial_rotary: f64) -> Self {
        PhiConfig {
            model_type: ModelType::Phi,
            architectures: Some(vec!["PhiForCausalLM".into()]),
            vocab_size: 51_200,
            hidden_size: hidden,
            intermediate_size: 4 * hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(heads),
            head_dim: None,
            hidden_act: Activation::GeluTanh,
            max_position_embeddings: 2048,
            original_max_position_embeddings: None,
            rope_theta: Some(10_000.0),
            partial_rotary_factor: Some(partial_rotary),
            rope_scaling: None,
            rope_parameters: None,
            layer_norm_eps: Some(1e-5),
            rms_norm_eps: None,
            qk_layernorm: false,
            tie_word_embeddings: false,
            sliding_window: None,
            attention_bias: None,
            mlp_bias: None,
            embd_pdrop: 0.0,
            resid_pdrop: 0.0,
            attention_dropout: 0.0,
            initializer_range: 0.02,
            bos_token_id: Some(50_256),
            eos_token_id: Some(TokenIds::One(50_256)),
            pad_token_id: None,
            id2label: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Phi-3 style (`Phi3ForCausalLM`); the sizes of Phi-3-mini-4k.
    fn phi3(
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        PhiConfig {
            model_type: ModelType::Phi3,
            architectures: Some(vec!["Phi3ForCausalLM".into()]),
            vocab_size: 32_064,
            intermediate_size: intermediate,
            num_key_value_heads: Some(kv_heads),
            hidden_act: Activation::Silu,
            max_position_embeddings: 4096,
            original_max_position_embeddings: Some(4096),
            partial_rotary_factor: None,
            layer_norm_eps: None,
            rms_norm_eps: Some(1e-5),
            sliding_window: Some(2047),
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(32_000)),
            pad_token_id: Some(32_000),
            ..Self::phi(hidden, layers, heads, 1.0)
        }
    }

    /// The config of a named preset.
    pub fn preset(preset: Preset) -> Self {
        match preset {
            // phi-1 and phi-1.5 share the 1.3B shape: 24 layers, d 2048, 32 heads of 64, MLP 8192.
            Preset::Phi1 | Preset::Phi1_5 => Self::phi(2048, 24, 32, 0.5),
            // phi-1-small: 350M, 20 layers, d 1024, 16 heads of 64, MLP 4096.
            Preset::Phi1Small => Self::phi(1024, 20, 16, 0.5),
            // phi-2: 2.7B, 32 layers, d 2560, 32 heads of 80, rotary 32 (0.4), residual dropout 0.1.
            Preset::Phi2 => PhiConfig {
                resid_pdrop: 0.1,
                ..Self::phi(2560, 32, 32, 0.4)
            },
            Preset::Phi3Mini => Self::phi3(3072, 8192, 32, 32, 32),
            // Test sizes: a few hundred thousand parameters, every feature of the layout switched on.
            Preset::TinyPhi => PhiConfig {
                vocab_size: 512,
                max_position_embeddings: 256,
                bos_token_id: None,
                eos_token_id: None,
                ..Self::phi(64, 2, 4, 0.5)
            },
            Preset::TinyPhi3 => PhiConfig {
                vocab_size: 512,
                max_position_embeddings: 256,
                original_max_position_embeddings: Some(256),
                sliding_window: None,
                bos_token_id: None,
                eos_token_id: None,
                pad_token_id: None,
                ..Self::phi3(64, 128, 2, 4, 2)
            },
            Preset::TinyLlama => PhiConfig {
                model_type: ModelType::Llama,
                architectures: Some(vec!["LlamaForCausalLM".into()]),
                tie_word_embeddings: true,
                ..Self::preset(Preset::TinyPhi3)
            },
        }
    }

    pub fn layout(&self) -> BlockLayout {
        match self.model_type {
            ModelType::Phi => BlockLayout::Parallel,
            ModelType::Phi3 | ModelType::Llama | ModelType::Qwen2 => BlockLayout::Sequential,
        }
    }

    pub fn norm_kind(&self) -> NormKind {
        match self.model_type {
            ModelType::Phi => NormKind::Layer,
            ModelType::Phi3 | ModelType::Llama | ModelType::Qwen2 => NormKind::Rms,
        }
    }

    pub fn mlp_kind(&self) -> MlpKind {
        match self.model_type {
            ModelType::Phi => MlpKind::Plain,
            ModelType::Phi3 | ModelType::Llama | ModelType::Qwen2 => MlpKind::Gated,
        }
    }

    pub fn norm_eps(&self) -> f64 {
        match self.norm_kind() {
            NormKind::Layer => self.layer_norm_eps.unwrap_or(1e-5),
            NormKind::Rms => self.rms_norm_eps.unwrap_or(1e-6),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The attention window decoding applies: `sliding_window`, unless `use_sliding_window` is
    /// false (Qwen2 configs give a window they do not use).
    pub fn window(&self) -> Option<usize> {
        let unused = self.extra.get("use_sliding_window") == Some(&serde_json::Value::Bool(false));
        self.sliding_window.filter(|_| !unused)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Biases of q/k/v.
    pub fn attention_bias(&self) -> bool {
        match self.model_type {
            ModelType::Phi | ModelType::Qwen2 => true,
            ModelType::Phi3 => false,
            ModelType::Llama => self.attention_bias.unwrap_or(false),
        }
    }

    /// The bias of the attention output projection (Qwen2 has q/k/v biases but none here).
    pub fn attention_out_bias(&self) -> bool {
        self.model_type != ModelType::Qwen2 && self.attention_bias()
    }

    pub fn mlp_bias(&self) -> bool {
        match self.model_type {
            ModelType::Phi => true,
            ModelType::Phi3 => false,
            ModelType::Llama => self.mlp_bias.unwrap_or(false),
            ModelType::Qwen2 => false,
        }
    }

    /// Phi's `lm_head` has a bias; phi-3's and llama's do not.
    pub fn lm_head_bias(&self) -> bool {
        self.model_type == ModelType::Phi
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// The head named by `architectures[0]` (a causal LM when there is none).
    pub fn head(&self) -> Result<HeadKind, ModelError> {
        let Some(arch) = self.architectures.as_ref().and_then(|a| a.first()) else {
            return Ok(HeadKind::CausalLm);
        };
        let num_labels = self.id2label.as_ref().map_or(2, BTreeMap::len);
        if arch.ends_with("ForCausalLM") {
            Ok(HeadKind::CausalLm)
        } else if arch.ends_with("ForSequenceClassification") {
            Ok(HeadKind::SequenceClassification { num_labels })
        } else {
            Err(ModelError::UnsupportedArchitecture {
                found: arch.clone(),
            })
        }
    }

    /// The rotary settings from whichever keys the file used.
    pub fn rotary(&self) -> Result<Rotary, ModelError> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = params
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        let default_partial = if self.model_type == ModelType::Phi {
            0.5
        } else {
            1.0
        };
        let partial = params
            .and_then(|p| p.partial_rotary_factor)
            .or(self.partial_rotary_factor)
            .unwrap_or(default_partial);
        let head_dim = self.head_dim();
        let dim = (head_dim as f64 * partial) as usize;
        if dim == 0 || !dim.is_multiple_of(2) || dim > head_dim {
            return Err(ModelError::InvalidConfig {
                key: "partial_rotary_factor",
                expected: format!("a factor that gives an even number of rotary dimensions within 2..={head_dim} (head_dim {head_dim})"),
                found: format!("{partial}, which gives {dim}"),
            });
        }
        let scaling = match params.and_then(RopeParameters::kind) {
            None | Some("default") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: params.and_then(|p| p.factor).unwrap_or(1.0),
            },
            Some("longrope") | Some("su") => {
                let p = params.expect("a rope type was read from these parameters");
                let original_max = p
                    .original_max_position_embeddings
                    .or(self.original_max_position_embeddings)
                    .unwrap_or(self.max_position_embeddings);
                let (Some(short_factor), Some(long_factor)) =
                    (p.short_factor.clone(), p.long_factor.clone())
                else {
                    return Err(ModelError::InvalidConfig {
                        key: "rope_scaling",
                        expected: "both `short_factor` and `long_factor` for rope type `longrope`"
                            .into(),
                        found: format!(
                            "short_factor {}, long_factor {}",
                            if p.short_factor.is_some() {
                                "set"
                            } else {
                                "missing"
                            },
                            if p.long_factor.is_some() {
                                "set"
                            } else {
                                "missing"
                            }
                        ),
                    });
                };
                for (name, factors) in [
                    ("short_factor", &short_factor),
                    ("long_factor", &long_factor),
                ] {
                    if factors.len() != dim / 2 {
                        return Err(ModelError::InvalidConfig {
                            key: name,
                            expected: format!(
                                "{} values (half the rotary dimension {dim})",
                                dim / 2
                            ),
                            found: format!("{} values", factors.len()),
                        });
                    }
                }
                let factor = p
                    .factor
                    .unwrap_or(self.max_position_embeddings as f64 / original_max as f64);
                let attention_factor = p.attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (original_max as f64).ln()).sqrt()
                });
                RopeScaling::LongRope {
                    short_factor,
                    long_factor,
                    original_max,
                    attention_factor,
                }
            }
            Some(other) => {
                return Err(ModelError::UnsupportedRope {
                    found: other.to_string(),
                })
            }
        };
        Ok(Rotary {
            theta,
            dim,
            scaling,
        })
    }

    /// Checks the sizes fit together; called once when a config is loaded or built.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |key, expected: &str, found: String| {
            Err(ModelError::InvalidConfig {
                key,
                expected: expected.to_string(),
                found,
            })
        };
        if self.num_attention_heads == 0 {
            return bad("num_attention_heads", "at least 1", "0".into());
        }
        if self.kv_heads() == 0 {
            return bad("num_key_value_heads", "at least 1", "0".into());
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "hidden_size",
                "a multiple of num_attention_heads (or an explicit head_dim)",
                format!(
                    "hidden_size {} with num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return bad(
                "num_key_value_heads",
                "a divisor of num_attention_heads",
                format!(
                    "num_attention_heads {} with num_key_value_heads {}",
                    self.num_attention_heads,
                    self.kv_heads()
                ),
            );
        }
        if self.qk_layernorm && self.model_type != ModelType::Phi {
            return bad(
                "qk_layernorm",
                "false unless model_type is `phi` (a PhiForCausalLM option)",
                format!("true with model_type {:?}", self.model_type),
            );
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window", "at least 1, or absent", "0".into());
        }
        for (name, p) in [
            ("embd_pdrop", self.embd_pdrop),
            ("resid_pdrop", self.resid_pdrop),
            ("attention_dropout", self.attention_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(name, "a probability in [0, 1)", p.to_string());
            }
        }
        self.rotary()?;
        self.head()?;
        Ok(())
    }

    /// Parameters of the decoder with its head (the count in `phigen sample` logs and the trainer's MFU).
    pub fn parameter_count(&self) -> usize {
        super::names::parameter_table(self)
            .map(|t| t.iter().map(|p| p.shape.iter().product::<usize>()).sum())
            .unwrap_or(0)
    }

    /// The config as transformers 5 writes it, with the transformers 4 rotary keys beside
    /// `rope_parameters` so either version reads the same model.
    pub fn to_hf_json(&self) -> Result<serde_json::Value, ModelError> {
        let rotary = self.rotary()?;
        let mut out = self.clone();
        let head_dim = self.head_dim();
        let partial = rotary.dim as f64 / head_dim as f64;
        let mut params = RopeParameters {
            rope_theta: Some(rotary.theta),
            partial_rotary_factor: Some(partial),
            ..RopeParameters::default()
        };
        let kind = match &rotary.scaling {
            RopeScaling::None => "default",
            RopeScaling::Linear { factor } => {
                params.factor = Some(*factor);
                "linear"
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max,
                attention_factor,
            } => {
                params.short_factor = Some(short_factor.clone());
                params.long_factor = Some(long_factor.clone());
                params.original_max_position_embeddings = Some(*original_max);
                params.attention_factor = Some(*attention_factor);
                out.original_max_position_embeddings = Some(*original_max);
                "longrope"
            }
        };
        params.rope_type = Some(kind.into());
        out.rope_theta = Some(rotary.theta);
        out.partial_rotary_factor = Some(partial);
        out.rope_scaling = (kind != "default").then(|| RopeParameters {
            legacy_type: Some(kind.into()),
            rope_type: Some(kind.into()),
            rope_theta: None,
            partial_rotary_factor: None,
            ..params.clone()
        });
        out.rope_parameters = Some(params);
        serde_json::to_value(&out).map_err(|source| ModelError::ConfigJson { source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameter counts against the published sizes: phi-1 1.3B, phi-1-small 350M, phi-2 2.7B,
    /// Phi-3-mini 3.8B (model cards and papers; rounded as they round).
    /// Qwen2.5's config.json names a window it does not use (`use_sliding_window: false`, as
    /// transformers' Qwen2 reads it): no window then; with the flag absent or true, the window.
    #[test]
    fn an_unused_sliding_window_is_no_window() {
        let base = r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":16,"intermediate_size":32,
            "num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":64,
            "hidden_act":"silu","sliding_window":6"#;
        let read =
            |tail: &str| -> PhiConfig { serde_json::from_str(&format!("{base}{tail}}}")).unwrap() };
        assert_eq!(read(r#","use_sliding_window":false"#).window(), None);
        assert_eq!(read(r#","use_sliding_window":true"#).window(), Some(6));
        assert_eq!(read("").window(), Some(6));
    }

    #[test]
    fn presets_have_the_published_sizes() {
        let billions =
            |name: &str| PhiConfig::preset(name.parse().unwrap()).parameter_count() as f64 / 1e9;
        assert!(
            (billions("phi-1") - 1.42).abs() < 0.05,
            "phi-1 {}",
            billions("phi-1")
        );
        assert!(
            (billions("phi-1-small") - 0.36).abs() < 0.02,
            "{}",
            billions("phi-1-small")
        );
        assert!(
            (billions("phi-2") - 2.78).abs() < 0.05,
            "phi-2 {}",
            billions("phi-2")
        );
        assert!(
            (billions("phi-3-mini") - 3.82).abs() < 0.05,
            "phi-3 {}",
            billions("phi-3-mini")
        );
        for preset in Preset::ALL {
            PhiConfig::preset(preset).validate().unwrap();
        }
    }

    /// transformers 5 writes `rope_parameters`; transformers 4 wrote `rope_theta`,
    /// `partial_rotary_factor` and `rope_scaling` with `type: su`. Both must read the same.
    #[test]
    fn both_rope_spellings_resolve_alike() {
        let v5 = r#"{"model_type":"phi3","vocab_size":10,"hidden_size":16,"intermediate_size":32,
            "num_hidden_layers":1,"num_attention_heads":2,"hidden_act":"silu","max_position_embeddings":64,
            "rope_parameters":{"rope_type":"longrope","rope_theta":500.0,"partial_rotary_factor":0.5,
            "short_factor":[1.0,1.0],"long_factor":[2.0,4.0],"original_max_position_embeddings":16}}"#;
        let v4 = r#"{"model_type":"phi3","vocab_size":10,"hidden_size":16,"intermediate_size":32,
            "num_hidden_layers":1,"num_attention_heads":2,"hidden_act":"silu","max_position_embeddings":64,
            "original_max_position_embeddings":16,"rope_theta":500.0,"partial_rotary_factor":0.5,
            "rope_scaling":{"type":"su","short_factor":[1.0,1.0],"long_factor":[2.0,4.0]},"use_cache":true}"#;
        let a: PhiConfig = serde_json::from_str(v5).unwrap();
        let b: PhiConfig = serde_json::from_str(v4).unwrap();
        assert_eq!(a.rotary().unwrap(), b.rotary().unwrap());
        let r = a.rotary().unwrap();
        assert_eq!((r.theta, r.dim), (500.0, 4));
        // transformers: factor = 64 / 16 = 4; attention_factor = sqrt(1 + ln 4 / ln 16) = sqrt(1.5).
        let RopeScaling::LongRope {
            attention_factor, ..
        } = r.scaling
        else {
            panic!()
        };
        assert!((attention_factor - 1.5f64.sqrt()).abs() < 1e-12);
        // Unknown keys survive a round trip.
        assert_eq!(
            b.extra.get("use_cache"),
            Some(&serde_json::Value::Bool(true))
        );
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let mut c = PhiConfig::preset(Preset::TinyPhi3);
        c.num_key_value_heads = Some(3);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads 3"));
        let mut c = PhiConfig::preset(Preset::TinyPhi);
        c.partial_rotary_factor = Some(0.1);
        assert!(c.validate().unwrap_err().to_string().contains("even"));
        let mut c = PhiConfig::preset(Preset::TinyPhi);
        c.architectures = Some(vec!["PhiForMaskedLM".into()]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("PhiForMaskedLM"));
        // A NaN spread cannot seed a normal distribution (rand_distr refuses it); the key is named.
        let mut c = PhiConfig::preset(Preset::TinyPhi);
        c.initializer_range = f64::NAN;
        let err = crate::model::Decoder::init_weights(
            &c,
            0,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::InvalidConfig {
                    key: "initializer_range",
                    ..
                }
            ),
            "{err}"
        );
    }

    /// Every preset's name parses back to it (through `FromStr`, serde and clap alike), and an
    /// unknown name is refused with the list of known ones.
    #[test]
    fn preset_names_round_trip() {
        use clap::ValueEnum;
        for preset in Preset::ALL {
            let name = preset.to_string();
            assert_eq!(name.parse::<Preset>(), Ok(preset));
            assert_eq!(
                serde_json::from_value::<Preset>(serde_json::json!(name)).unwrap(),
                preset
            );
            assert_eq!(
                serde_json::to_value(preset).unwrap(),
                serde_json::json!(name)
            );
            assert_eq!(Preset::from_str(&name, false), Ok(preset));
        }
        let err = "phi-9".parse::<Preset>().unwrap_err().to_string();
        assert!(
            err.contains("`phi-9`") && err.contains("phi-1-small, phi-1.5"),
            "{err}"
        );
    }
}

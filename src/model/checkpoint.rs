//! Checkpoints in the Hugging Face layout: `config.json` + `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), tensor names exactly as transformers writes them, so
//! `from_pretrained` reads what phigen saves and phigen reads what transformers saves.
//!
//! Reads: `DIR/config.json`, `DIR/model.safetensors` | `DIR/model.safetensors.index.json` + shards.
//! Writes: the same (one file), each written to a temp name then renamed.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::PhiConfig;
use super::decoder::{Decoder, QuantizedWeights, Weights};
use super::names::{is_ignorable, parameter_table};
use super::tokenizer::{Encoding, Tokenizer, TokenizerSpec};
use super::ModelError;
use crate::artifact::atomic;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn read_config(dir: &Path) -> Result<PhiConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let cfg: PhiConfig = serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
        path: path.clone(),
        reason: format!("not a phi / phi3 / llama config.json: {e}"),
    })?;
    cfg.validate().map_err(|e| ModelError::BadFile {
        path,
        reason: e.to_string(),
    })?;
    Ok(cfg)
}

/// The safetensors files of a checkpoint directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(ModelError::BadFile {
            path: dir.to_path_buf(),
            reason: format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} is here; is this a Hugging Face checkpoint directory?"),
        });
    }
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(&index).map_err(io_error(&index))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
        path: index.clone(),
        reason: format!("expected {{\"weight_map\": {{tensor: file}}}}: {e}"),
    })?;
    let files: BTreeSet<String> = parsed.weight_map.into_values().collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Loads the config and every parameter (converted to `dtype`) of the checkpoint in `dir`.
pub fn load_weights(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(PhiConfig, Weights), ModelError> {
    let cfg = read_config(dir)?;
    let files = weight_files(dir)?;
    // SAFETY: the files are mapped read-only for the duration of this function; phigen never
    // writes a checkpoint in place (saves go to a temp name and are renamed over).
    let st =
        unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
            ModelError::BadFile {
                path: dir.to_path_buf(),
                reason: format!("unreadable safetensors: {e}"),
            }
        })?;
    let available: HashMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    let weights = assemble(&cfg, dir, &available, |name| {
        Ok(st.load(name, device)?.to_dtype(dtype)?)
    })?;
    Ok((cfg, weights))
}

/// Every parameter of `cfg` from the Hugging Face tensors a checkpoint at `origin` has
/// (`available`: name → shape; `load` reads one), checking names and shapes first.
pub fn assemble(
    cfg: &PhiConfig,
    origin: &Path,
    available: &HashMap<String, Vec<usize>>,
    mut load: impl FnMut(&str) -> Result<Tensor, ModelError>,
) -> Result<Weights, ModelError> {
    let mut used = BTreeSet::new();
    let mut weights = Weights::new();
    for param in parameter_table(cfg)? {
        let mut parts = Vec::with_capacity(param.parts.len());
        for (name, rows) in &param.parts {
            let mut expected = param.shape.clone();
            expected[0] = *rows;
            match available.get(name) {
                None => {
                    return Err(ModelError::MissingTensor {
                        path: origin.to_path_buf(),
                        name: name.clone(),
                        model_type: format!("{:?}", cfg.model_type).to_lowercase(),
                    })
                }
                Some(found) if *found != expected => {
                    return Err(ModelError::ShapeMismatch {
                        path: origin.to_path_buf(),
                        name: name.clone(),
                        expected,
                        found: found.clone(),
                    })
                }
                Some(_) => {}
            }
            parts.push(load(name)?);
            used.insert(name.clone());
        }
        let tensor = if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(&parts, 0)?
        };
        weights.insert(param.name, tensor);
    }
    let unused: Vec<&String> = available
        .keys()
        .filter(|n| !used.contains(*n) && !is_ignorable(n))
        .collect();
    if !unused.is_empty() {
        tracing::warn!(
            "{}: {} tensors are not used by a {:?} model, e.g. {:?}",
            origin.display(),
            unused.len(),
            cfg.model_type,
            unused.iter().take(3).collect::<Vec<_>>()
        );
    }
    Ok(weights)
}

/// Loads a checkpoint directory as a ready decoder (inference only; train from
/// [`load_weights`]).
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Decoder, ModelError> {
    let (cfg, weights) = load_weights(dir, dtype, device)?;
    Decoder::frozen(&cfg, weights, Default::default())
}

/// [`load`] in float32 for decoding fast: each projection whose rows are whole 32-value blocks
/// also gets an 8-bit copy (Q8_0, as a GGUF file's projections keep their quantized types), which
/// decoding reads instead of the float32 panels: a quarter of the bytes, the packed int8 kernel
/// where the CPU has VNNI, and the batched slot path of the local teacher. A tied head reads the
/// 8-bit copy of the embedding table.
pub fn load_quantized(dir: &Path, device: &Device) -> Result<Decoder, ModelError> {
    let (cfg, weights) = load_weights(dir, DType::F32, device)?;
    let q8 = |t: &Tensor| -> Result<Arc<QTensor>, ModelError> {
        Ok(Arc::new(QTensor::quantize(t, GgmlDType::Q8_0)?))
    };
    let mut quantized = QuantizedWeights::new();
    for param in parameter_table(&cfg)? {
        let projection = param.shape.len() == 2 && param.name != "model.embed_tokens.weight";
        if projection && param.shape[1] % GgmlDType::Q8_0.block_size() == 0 {
            quantized.insert(param.name.clone(), q8(&weights[&param.name])?);
        }
    }
    if let Some(table) = weights.get("model.embed_tokens.weight") {
        if cfg.tie_word_embeddings && table.dim(1)? % GgmlDType::Q8_0.block_size() == 0 {
            quantized.insert("lm_head.weight".into(), q8(table)?);
        }
    }
    Decoder::frozen(&cfg, weights, quantized)
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// How many ids `tokenizer` produces: its largest id + 1, special tokens included. A model needs
/// at least this many token embeddings (`vocab_size`) to take every text as input.
pub fn tokenizer_size(tokenizer: &Tokenizer) -> usize {
    match tokenizer {
        Tokenizer::Tiktoken(encoding) => {
            // tiktoken-rs has no size accessor. The special tokens sit at or near the top of
            // every encoding; ordinary ranks may go on above them (p50k_base's whitespace runs).
            let bpe = encoding.bpe();
            let top = bpe
                .special_tokens()
                .iter()
                .filter_map(|s| bpe.encode_with_special_tokens(s).first().copied())
                .max()
                .unwrap_or(0);
            let mut size = top + 1;
            while bpe.decode_bytes(&[size]).is_ok() {
                size += 1;
            }
            size as usize
        }
        Tokenizer::HuggingFace(t) => t
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1),
    }
}

/// The name `--tokenizer` takes for `encoding`.
pub fn tokenizer_name(encoding: Encoding) -> String {
    encoding.name()
}

/// Writes a randomly initialised checkpoint of `cfg` (weights drawn with `seed`, stored in
/// `dtype`) that records the tiktoken `encoding` as its tokenizer: `phigen init`, and tests.
pub fn save_random(
    dir: &Path,
    cfg: &PhiConfig,
    seed: u64,
    dtype: DType,
    encoding: Encoding,
) -> Result<(), ModelError> {
    let weights = Decoder::init_weights(cfg, seed, DType::F32, &Device::Cpu)?;
    save(dir, cfg, &weights, dtype)?;
    super::tokenizer::write_phigen_file(dir, &TokenizerSpec::Tiktoken(encoding))
}

/// Writes `config.json` + `model.safetensors` in the transformers layout (fused tensors split
/// back into the names of `cfg.model_type`), in `dtype`. Each file goes to a temp name first.
pub fn save(
    dir: &Path,
    cfg: &PhiConfig,
    weights: &Weights,
    dtype: DType,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for param in parameter_table(cfg)? {
        let tensor = weights
            .get(&param.name)
            .ok_or_else(|| ModelError::MissingParameter(param.name.clone()))?
            .to_dtype(dtype)?;
        let mut row = 0;
        for (name, rows) in param.parts {
            tensors.push((name, tensor.narrow(0, row, rows)?.contiguous()?));
            row += rows;
        }
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let path = dir.join(WEIGHTS_FILE);
    let tmp = atomic::temp_path(&path);
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        &tmp,
    )
    .map_err(|e| ModelError::BadFile {
        path: tmp.clone(),
        reason: format!("writing safetensors: {e}"),
    })?;
    std::fs::rename(&tmp, &path).map_err(io_error(&path))?;
    let mut config = cfg.to_hf_json()?;
    if let Some(obj) = config.as_object_mut() {
        obj.insert("torch_dtype".into(), dtype_name(dtype).into());
        obj.insert("dtype".into(), dtype_name(dtype).into());
    }
    let config_path = dir.join(CONFIG_FILE);
    atomic::write_json(&config_path, &config).map_err(io_error(&config_path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes are tiktoken's own `n_vocab` (Python: `tiktoken.get_encoding(name).n_vocab`):
    /// r50k_base 50,257, p50k_base 50,281 (ordinary ranks above `<|endoftext|>`), cl100k_base
    /// 100,277, o200k_base 200,019.
    #[test]
    fn tokenizer_sizes_match_tiktoken() {
        let sizes: Vec<usize> = [
            Encoding::Gpt2,
            Encoding::P50kBase,
            Encoding::Cl100kBase,
            Encoding::O200kBase,
        ]
        .into_iter()
        .map(|e| tokenizer_size(&Tokenizer::Tiktoken(e)))
        .collect();
        assert_eq!(sizes, [50_257, 50_281, 100_277, 200_019]);
        assert_eq!(tokenizer_name(Encoding::P50kBase), "p50k_base");
    }
}

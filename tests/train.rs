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

/// Token shards of a small story corpus, made by `phigen tokenize` in `dir/tok`.
fn story_tokens(dir: &Path) {
    let stories = dir.join("corpus");
    std::fs::create_dir_all(&stories).unwrap();
    let mut lines = String::new();
    for i in 0..400 {
        let (who, what) = (
            ["Tom", "Lily", "Sue"][i % 3],
            ["ball", "kite", "boat", "cat"][i % 4],
        );
        lines.push_str(&serde_json::json!({"id": format!("s{i}"), "text": format!("{who} had a {what}. {who} liked the {what} a lot. One day the {what} was gone, and {who} looked for it.")}).to_string());
        lines.push('\n');
    }
    std::fs::write(stories.join("stories.jsonl"), lines).unwrap();
    let out = phigen_in(
        dir,
        &[
            "--quiet",
            "tokenize",
            "--input",
            "corpus",
            "--out",
            "tok",
            "--val-fraction",
            "0.1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `phigen train` on the tiny recipe in `dir`, into `out`, with `ranks` processes launched the way
/// torchrun or srun does (`env(rank)` gives each its variables), each on one thread.
fn train_ranks(
    dir: &Path,
    out: &str,
    steps: &str,
    env: impl Fn(usize) -> Vec<(String, String)>,
    ranks: usize,
) -> Vec<std::process::Child> {
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/tinystories-tiny.toml");
    (0..ranks)
        .map(|rank| {
            let mut cmd = Command::new(BIN);
            cmd.args([
                "--quiet",
                "train",
                "--recipe",
                recipe.to_str().unwrap(),
                "--out",
                out,
            ]);
            for set in [
                "stage.0.data=[{path=\"tok\"}]".to_string(),
                "stage.0.seq_len=32".into(),
                "stage.0.micro_batch=2".into(),
                "stage.0.grad_accum=4".into(),
                format!("stage.0.steps={steps}"),
                "stage.0.warmup=2".into(),
                "stage.0.eval_every=5".into(),
                "stage.0.eval_batches=3".into(),
                "stage.0.checkpoint_every=5".into(),
            ] {
                cmd.args(["--set", &set]);
            }
            cmd.current_dir(dir)
                .env("RAYON_NUM_THREADS", "1")
                .envs(env(rank))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn losses(path: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|m| {
            let loss = m.get("train_loss").or(m.get("val_loss")).unwrap();
            (m["step"].as_u64().unwrap(), loss.as_f64().unwrap())
        })
        .collect()
}

/// Issue 28: two processes with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) train the
/// one-process curve (within 1e-5 relative: the fp32 gradient sums are added in another order),
/// only rank 0 writing; with srun's variables (SLURM_PROCID, SLURM_STEP_NUM_TASKS), killing one rank makes
/// the other exit non-zero within 60 s, naming the lost rank, instead of waiting in the sum.
#[test]
fn torchrun_and_srun_ranks_train_together_and_fail_together() {
    let tmp = tempfile::tempdir().unwrap();
    story_tokens(tmp.path());
    let wait = |children: Vec<std::process::Child>| -> Vec<std::process::Output> {
        children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect()
    };
    let single = wait(train_ranks(tmp.path(), "single", "12", |_| Vec::new(), 1));
    assert!(single[0].status.success(), "{}", stderr(&single[0]));
    let torchrun = |rank: usize| {
        [("RANK", rank), ("WORLD_SIZE", 2), ("LOCAL_RANK", rank)]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .to_vec()
    };
    let pair = wait(train_ranks(tmp.path(), "pair", "12", torchrun, 2));
    for o in &pair {
        assert!(o.status.success(), "{}", stderr(o));
    }
    let (a, b) = (
        losses(&tmp.path().join("single/metrics.jsonl")),
        losses(&tmp.path().join("pair/metrics.jsonl")),
    );
    assert_eq!(a.len(), 12 + 3, "12 steps and 3 evaluations: {a:?}");
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    for ((s, x), (t, y)) in a.iter().zip(&b) {
        assert_eq!(s, t);
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step {s}: {x} vs {y}");
    }
    assert!(tmp
        .path()
        .join("pair/pretrain/step-000012/model.safetensors")
        .is_file());

    let srun = |rank: usize| {
        [
            ("SLURM_PROCID", rank),
            ("SLURM_STEP_NUM_TASKS", 2),
            ("SLURM_LOCALID", rank),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec()
    };
    let mut ranks = train_ranks(tmp.path(), "killed", "100000", srun, 2);
    let metrics = tmp.path().join("killed/metrics.jsonl");
    let started = std::time::Instant::now();
    while losses(&metrics).len() < 3 {
        assert!(started.elapsed().as_secs() < 120, "the ranks never trained");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ranks[1].kill().unwrap();
    let killed_at = std::time::Instant::now();
    let survivor = ranks.remove(0).wait_with_output().unwrap();
    assert!(killed_at.elapsed().as_secs() < 60);
    assert!(!survivor.status.success());
    assert!(
        stderr(&survivor).contains("lost rank 1"),
        "{}",
        stderr(&survivor)
    );
    let _ = ranks[0].wait();
}

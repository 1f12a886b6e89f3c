//! `phigen eval` through the binary: HumanEval pass@1 of a samples file, story grades from the
//! loopback mock teacher, and the sandbox holding hostile samples (issue 23) as root and as
//! `nobody`.

use std::process::Command;
use std::sync::atomic::Ordering;

use phigen::teacher::mock::Faults;

mod common;
use common::{mock, run, stderr, BIN};

/// `phigen eval humaneval --samples` through the binary on problems written here: pass@1 is the
/// share of correct samples per problem, averaged (1/2 and 0/2 → 0.25), and the per-sample results
/// say why each failed.
#[test]
fn eval_humaneval_scores_a_samples_file() {
    let tmp = tempfile::tempdir().unwrap();
    let problems = tmp.path().join("problems.jsonl");
    let rows = [
        serde_json::json!({"task_id": "X/0", "prompt": "def inc(x):\n", "canonical_solution": "    return x + 1\n", "test": "def check(f):\n    assert f(1) == 2\n", "entry_point": "inc"}),
        serde_json::json!({"task_id": "X/1", "prompt": "def neg(x):\n", "canonical_solution": "    return -x\n", "test": "def check(f):\n    assert f(3) == -3\n", "entry_point": "neg"}),
    ];
    std::fs::write(
        &problems,
        rows.iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let samples = tmp.path().join("samples.jsonl");
    let s =
        |id: &str, c: &str| serde_json::json!({"task_id": id, "completion": c}).to_string() + "\n";
    std::fs::write(
        &samples,
        [
            s("X/0", "    return x + 1\n"),
            s("X/0", "    return x\n"),
            s("X/1", "    return x\n"),
            s("X/1", "    raise KeyError('k')\n"),
        ]
        .concat(),
    )
    .unwrap();
    let out = tmp.path().join("eval");
    let eval = |extra: &[&str]| {
        Command::new(BIN)
            .args(["--quiet", "eval", "humaneval"])
            .args(["--problems", problems.to_str().unwrap()])
            .args(["--samples", samples.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = eval(&["--k", "1,2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["pass_at_k"]["pass@1"].as_f64(), Some(0.25));
    // pass@2 with n = 2: a problem passes if either sample does → (1 + 0) / 2.
    assert_eq!(summary["pass_at_k"]["pass@2"].as_f64(), Some(0.5));
    let results: Vec<serde_json::Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let verdicts: Vec<&str> = results
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts[0], "passed");
    assert!(
        verdicts[1].starts_with("failed: AssertionError"),
        "{verdicts:?}"
    );
    assert!(verdicts[3].contains("KeyError"), "{verdicts:?}");
    // A sample for a task that is not in the problems file is an error that names it.
    std::fs::write(&samples, s("Y/9", "    pass\n")).unwrap();
    let o = eval(&[]);
    assert!(
        !o.status.success() && stderr(&o).contains("Y/9"),
        "{}",
        stderr(&o)
    );
}

/// `phigen eval stories` through the binary: a tiny random model continues the 20 shipped
/// beginnings, the mock teacher grades them (grades from a hash, 1–10, see `src/teacher/mock.rs`),
/// and `stories.json` has a mean and interval per metric. A re-run reuses every grade (no request).
#[tokio::test(flavor = "multi_thread")]
async fn eval_stories_grades_continuations_and_reuses_grades() {
    use phigen::model::{checkpoint, tokenizer::Encoding, PhiConfig, Preset};
    let server = mock(Faults::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("tiny");
    let cfg = PhiConfig {
        vocab_size: 50304,
        ..PhiConfig::preset(Preset::TinyPhi)
    };
    checkpoint::save_random(&ckpt, &cfg, 1, candle_core::DType::F32, Encoding::Gpt2).unwrap();
    let out = tmp.path().join("stories");
    let cmd = || {
        let mut c = Command::new(BIN);
        c.args([
            "--quiet",
            "eval",
            "stories",
            "--checkpoint",
            ckpt.to_str().unwrap(),
        ])
        .args(["--out", out.to_str().unwrap(), "--max-new-tokens", "16"])
        .args(["--base-url", &server.base_url(), "--model", "mock"])
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("PHIGEN_MODEL");
        c
    };
    let o = run(cmd()).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("stories.json")).unwrap()).unwrap();
    assert_eq!(
        (s["stories"].as_u64(), s["graded"].as_u64()),
        (Some(20), Some(20))
    );
    for m in ["grammar", "creativity", "consistency", "plot"] {
        let mean = s["metrics"][m]["mean"].as_f64().unwrap();
        assert!((1.0..=10.0).contains(&mean), "{m}: {mean}");
        assert!(s["metrics"][m]["ci95"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(s["judge"], "mock");
    let sent = server.log.requests.load(Ordering::SeqCst);
    assert_eq!(sent, 20);
    let o = run(cmd()).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        server.log.requests.load(Ordering::SeqCst),
        sent,
        "grades are reused"
    );
}

/// The sandbox attacks of issue 23 through `phigen eval humaneval`, as root and as `nobody`
/// (setpriv; CI runs as root): each hostile sample is *correct* only if its attack works — it
/// reads the API key from another process's environment, reads a file outside, or reaches a
/// loopback listener — so any leak shows up as a pass. Samples that exit 0 before `check` runs
/// fail, as in the reference harness. Without bubblewrap on PATH the command refuses, naming the
/// package and `--unsafe-sandbox`; with that flag it runs and summary.json records it.
#[test]
fn eval_sandbox_attacks_fail_as_root_and_as_nobody() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let problems = tmp.path().join("problems.jsonl");
    let row = serde_json::json!({"task_id": "X/0", "prompt": "def inc(x):\n", "canonical_solution": "    return x + 1\n", "test": "def check(f):\n    assert f(1) == 2\n", "entry_point": "inc"});
    std::fs::write(&problems, row.to_string() + "\n").unwrap();
    let secret_file = tmp.path().join("id_rsa");
    std::fs::write(&secret_file, "PRIVATE").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let key = "sk-phigen-sandbox-test-4f1c";
    let if_leaks = |cond: &str| {
        format!(
            "    import os, glob, socket\n    leaked = {cond}\n    return x + 1 if leaked else x\n"
        )
    };
    let completions = [
        "    return x + 1\n".to_string(),
        "    return x\nimport sys; sys.exit(0)\n".into(),
        "    return x\nimport os; os._exit(0)\n".into(),
        if_leaks(&format!("any(b'{key}' in open(p, 'rb').read() for p in glob.glob('/proc/*/environ') if os.access(p, os.R_OK))")),
        if_leaks(&format!("os.path.exists({:?})", secret_file.to_str().unwrap())),
        if_leaks(&format!("socket.socket().connect_ex(('127.0.0.1', {port})) == 0")),
    ];
    let samples = tmp.path().join("samples.jsonl");
    let body: String = completions
        .iter()
        .map(|c| serde_json::json!({"task_id": "X/0", "completion": c}).to_string() + "\n")
        .collect();
    std::fs::write(&samples, body).unwrap();
    let setpriv = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    // `nobody` cannot reach the build directory (under root's home): run a copy.
    let bin = tmp.path().join("phigen");
    std::fs::copy(BIN, &bin).unwrap();
    let as_root = unsafe { libc::geteuid() } == 0;
    for (i, nobody) in [false, true].into_iter().enumerate() {
        if nobody && !as_root {
            continue; // already unprivileged
        }
        let out = tmp.path().join(format!("eval-{i}"));
        let mut c = Command::new(if nobody { "setpriv" } else { BIN });
        if nobody {
            c.args(setpriv).arg(&bin);
            std::fs::create_dir(&out).unwrap();
            std::os::unix::fs::chown(&out, Some(65534), Some(65534)).unwrap();
        }
        let o = c
            .args(["--quiet", "eval", "humaneval"])
            .args(["--problems", problems.to_str().unwrap()])
            .args(["--samples", samples.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .env("OPENAI_API_KEY", key)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "nobody={nobody}: {}", stderr(&o));
        let results: Vec<serde_json::Value> = std::fs::read_to_string(out.join("results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let passed: Vec<bool> = results.iter().map(|r| r["passed"] == true).collect();
        assert_eq!(
            passed,
            [true, false, false, false, false, false],
            "nobody={nobody}: {results:#?}"
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["sandbox_isolation"], "namespaces");
    }
    // No bubblewrap: a refusal that says what to do, and nothing is run.
    let bare = tmp.path().join("bare-path");
    std::fs::create_dir(&bare).unwrap();
    let eval_without_bwrap = |extra: &[&str]| {
        Command::new(BIN)
            .args(["--quiet", "eval", "humaneval"])
            .args(["--problems", problems.to_str().unwrap()])
            .args(["--samples", samples.to_str().unwrap()])
            .args(["--out", tmp.path().join("eval-bare").to_str().unwrap()])
            .args(extra)
            .env("PATH", &bare)
            .output()
            .unwrap()
    };
    let o = eval_without_bwrap(&[]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("apt-get install bubblewrap") && err.contains("--unsafe-sandbox"),
        "{err}"
    );
    assert!(!tmp.path().join("eval-bare/results.jsonl").exists());
    let o = eval_without_bwrap(&["--unsafe-sandbox"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("eval-bare/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["sandbox_isolation"], "unsafe");
}

/// `phigen eval stories --instruct` through the binary (issue 30 item 3): instruct records made
/// by `phigen stories --instruct` with the mock teacher, a tiny random model continuing their
/// prefixes, and the mock judging (answers from a hash, see `src/teacher/mock.rs`).
/// `instruct.json` counts what was asked: every record is a completion, `Words:` prefixes are the
/// word checks, and the judge is asked once per record with a `Summary:` or a feature other than
/// dialogue (the expected counts are read from the records themselves). A re-run reuses every
/// continuation and verdict.
#[tokio::test(flavor = "multi_thread")]
async fn eval_stories_instruct_checks_what_each_prefix_asks() {
    use phigen::artifact::table;
    use phigen::model::{checkpoint, tokenizer::Encoding, PhiConfig, Preset};
    let server = mock(Faults::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let records = tmp.path().join("instruct");
    let o = run(common::stories_cmd(&server, &records, 10, &["--instruct"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let generated = server.log.requests.load(Ordering::SeqCst);
    let part = records.join("part-00000.parquet");
    let df = table::read_columns(&part, &["fields", "features"]).unwrap();
    let lists = |name: &str| -> Vec<Vec<String>> {
        df.column(name)
            .unwrap()
            .list()
            .unwrap()
            .series_iter()
            .map(|c| {
                c.map(|s| {
                    s.str()
                        .unwrap()
                        .iter()
                        .flatten()
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
            })
            .collect()
    };
    let (fields, features) = (lists("fields"), lists("features"));
    let has = |i: usize, f: &str| fields[i].iter().any(|x| x == f);
    let words_asked = (0..10).filter(|&i| has(i, "Words")).count();
    let summaries = (0..10).filter(|&i| has(i, "Summary")).count();
    let judged = (0..10)
        .filter(|&i| {
            has(i, "Summary") || (has(i, "Features") && features[i].iter().any(|f| f != "dialogue"))
        })
        .count();

    let ckpt = tmp.path().join("tiny");
    let cfg = PhiConfig {
        vocab_size: 50304,
        ..PhiConfig::preset(Preset::TinyPhi)
    };
    checkpoint::save_random(&ckpt, &cfg, 1, candle_core::DType::F32, Encoding::Gpt2).unwrap();
    let out = tmp.path().join("eval");
    let cmd = || {
        let mut c = Command::new(BIN);
        c.args(["--quiet", "eval", "stories", "--instruct"])
            .arg(&records)
            .arg("--checkpoint")
            .arg(&ckpt)
            .args(["--out", out.to_str().unwrap(), "--max-new-tokens", "16"])
            .args(["--base-url", &server.base_url(), "--model", "mock"])
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("PHIGEN_MODEL");
        c
    };
    let o = run(cmd()).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("instruct.json")).unwrap()).unwrap();
    assert_eq!(s["completions"], 10);
    assert_eq!(s["words_asked"], words_asked);
    assert_eq!(
        s["consistency"]["n"].as_u64().unwrap_or(0),
        summaries as u64
    );
    let sent = server.log.requests.load(Ordering::SeqCst);
    assert_eq!(
        sent - generated,
        judged as u64,
        "one verdict per judged story"
    );
    for (name, f) in s["features"].as_object().unwrap() {
        let by = if name == "dialogue" { "rule" } else { "judge" };
        assert_eq!(f["by"], by, "{name}");
    }
    let o = run(cmd()).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        server.log.requests.load(Ordering::SeqCst),
        sent,
        "verdicts are reused"
    );
}

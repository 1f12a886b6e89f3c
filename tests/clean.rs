//! The cleaning stages through the binary: `phigen filter` (phi-1's classifier recipe, the ratings
//! from the loopback mock teacher), then `dedup`, `decontaminate` and `tokenize` chained on their
//! outputs.

use std::process::Command;
use std::sync::atomic::Ordering;

use phigen::teacher::mock::Faults;

mod common;
use common::{mock, run, stats, stderr, BIN};

/// The cleaning stages chain through the binary: `dedup` drops a copy, `decontaminate` drops a
/// document holding an MBPP solution, and `tokenize` reads the result without mistaking the
/// reports written next to the data (removed.parquet, contaminated.parquet, *.json) for documents.
#[test]
fn dedup_then_decontaminate_then_tokenize() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s);
    std::fs::create_dir_all(p("raw")).unwrap();
    let solution = "def remove_odd_numbers(values):\n    kept = []\n    for value in values:\n        if value % 2 == 0:\n            kept.append(value)\n    return kept\n";
    let docs = [
        (
            "a",
            "Once upon a time a small dog found a red ball in the tall green grass by the river.",
        ),
        (
            "b",
            "Once upon a time a small dog found a red ball in the tall green grass by the river.",
        ),
        (
            "c",
            "A cat sat on the warm mat and watched the rain fall on the quiet street all day long.",
        ),
        ("d", solution),
    ];
    let jsonl: String = docs
        .iter()
        .map(|(id, t)| serde_json::json!({"id": id, "text": t}).to_string() + "\n")
        .collect();
    std::fs::write(p("raw/part.jsonl"), jsonl).unwrap();
    let mbpp = serde_json::json!({"task_id": 7, "text": "Write a function to remove odd numbers from a list.", "code": solution, "test_list": []});
    std::fs::write(p("mbpp.jsonl"), mbpp.to_string() + "\n").unwrap();
    let phigen = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("--quiet")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    };
    let s = |path: std::path::PathBuf| path.to_str().unwrap().to_string();
    phigen(&["dedup", "--input", &s(p("raw")), "--out", &s(p("dedup"))]);
    phigen(&[
        "decontaminate",
        "--input",
        &s(p("dedup")),
        "--bench",
        &s(p("mbpp.jsonl")),
        "--out",
        &s(p("clean")),
    ]);
    let kept = std::fs::read_to_string(p("clean/dedup/raw/part.jsonl")).unwrap();
    let ids: Vec<String> = kept
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["a", "c"]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("clean/contamination.json")).unwrap())
            .unwrap();
    assert_eq!(report["benchmarks"]["mbpp"]["documents_per_task"]["7"], 1);
    phigen(&[
        "tokenize",
        "--input",
        &s(p("clean")),
        "--out",
        &s(p("tok")),
        "--val-fraction",
        "0",
    ]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("tok/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["splits"]["train"]["documents"], 2);
    let bad = Command::new(BIN)
        .args([
            "--quiet",
            "decontaminate",
            "--input",
            &s(p("raw")),
            "--bench",
            &s(p("nope.jsonl")),
            "--out",
            &s(p("x")),
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("nope.jsonl"), "{}", stderr(&bad));
}

/// `phigen filter --input stack/` with no classifier runs phi-1's recipe through the binary: the
/// mock teacher rates a sample (4 for a documented function, 0 for data, see `src/teacher/mock.rs`),
/// a forest learns the ratings, every file is scored. Documented files are kept and data files are
/// not (the truth is how each file was written); a re-run sends no request and redoes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn filter_recipe_rates_trains_and_scores_through_the_binary() {
    let server = mock(Faults::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let stack = tmp.path().join("stack");
    std::fs::create_dir_all(&stack).unwrap();
    for i in 0..300 {
        let text = if i % 2 == 0 {
            format!("def add_{i}(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    # Add them.\n    return a + b\n")
        } else {
            format!(
                "DATA_{i} = [{}]\n",
                (0..60)
                    .map(|k| (k * i % 997).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        std::fs::write(stack.join(format!("f{i:03}.py")), text).unwrap();
    }
    let out = tmp.path().join("filtered");
    let cmd = || {
        let mut c = Command::new(BIN);
        c.args(["--quiet", "filter", "--input", stack.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap(), "--sample", "80"])
            .args(["--base-url", &server.base_url(), "--teacher-model", "mock"])
            .args(["--price-input", "0", "--price-output", "0", "--trees", "30"])
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("PHIGEN_MODEL");
        c
    };
    let o = run(cmd()).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let stats = stats(&out);
    assert_eq!(
        (stats["files"].as_u64(), stats["kept"].as_u64()),
        (Some(300), Some(150))
    );
    let kept =
        phigen::artifact::table::read_frame(&out.join("kept/stack/files-00000.parquet"), None)
            .unwrap();
    let ids = phigen::artifact::table::text_column(&kept, &out, "id").unwrap();
    assert!(ids.iter().all(|id| {
        let n: usize = id
            .as_ref()
            .unwrap()
            .trim_start_matches("stack/f")
            .trim_end_matches(".py")
            .parse()
            .unwrap();
        n.is_multiple_of(2)
    }));
    let sent = server.log.requests.load(Ordering::SeqCst);
    let o = run(cmd()).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sent, 80);
    assert_eq!(
        server.log.requests.load(Ordering::SeqCst),
        sent,
        "a re-run rates nothing again"
    );
}

/// Every file below `dir` (its path relative to `dir`) with its bytes.
fn tree_bytes(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(
        root: &std::path::Path,
        d: &std::path::Path,
        out: &mut std::collections::BTreeMap<String, Vec<u8>>,
    ) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Issue 27's contract for decontamination: 3 Slurm array tasks write, between them, the same
/// kept files byte for byte as one run (the oracle: a whole run of the same binary on the same
/// inputs), `phigen merge` first names the unfinished task, then reports the same counts; a
/// relaunched finished task does nothing.
#[test]
fn decontamination_as_an_array_equals_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s);
    let solution = "def remove_odd_numbers(values):\n    kept = []\n    for value in values:\n        if value % 2 == 0:\n            kept.append(value)\n    return kept\n";
    let mbpp = serde_json::json!({"task_id": 7, "text": "Write a function to remove odd numbers from a list.", "code": solution, "test_list": []});
    std::fs::write(p("mbpp.jsonl"), mbpp.to_string() + "\n").unwrap();
    std::fs::create_dir_all(p("raw")).unwrap();
    for f in 0..5 {
        let mut jsonl = String::new();
        for d in 0..4 {
            let text = if (f + d) % 3 == 0 {
                format!("Exercise {f}.{d}:\n{solution}")
            } else {
                format!("Section {f}.{d}: the river ran past the mill where {d} children played.")
            };
            jsonl +=
                &(serde_json::json!({"id": format!("{f}-{d}"), "text": text}).to_string() + "\n");
        }
        std::fs::write(p(&format!("raw/part-{f}.jsonl")), jsonl).unwrap();
    }
    let decon = |out: &str, task: Option<usize>| {
        let mut c = Command::new(BIN);
        c.args(["--quiet", "decontaminate", "--input"])
            .arg(p("raw"))
            .arg("--bench")
            .arg(p("mbpp.jsonl"))
            .arg("--out")
            .arg(p(out));
        if let Some(k) = task {
            c.env("SLURM_ARRAY_TASK_ID", k.to_string())
                .env("SLURM_ARRAY_TASK_COUNT", "3");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let merge = |out: &str| {
        Command::new(BIN)
            .args(["merge"])
            .arg(p(out))
            .output()
            .unwrap()
    };
    decon("whole", None);
    decon("three", Some(2));
    decon("three", Some(0));
    let o = merge("three");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("tasks 1;"), "{}", stderr(&o));
    decon("three", Some(1));
    let o = merge("three");
    assert!(o.status.success(), "{}", stderr(&o));

    // The kept documents: each file once, under its task's directory, with the whole run's bytes.
    let whole = tree_bytes(&p("whole/raw"));
    let mut sharded = std::collections::BTreeMap::new();
    for k in 0..3 {
        let dir = p(&format!("three/tasks/{k:05}/raw"));
        sharded.extend(tree_bytes(&dir));
    }
    assert_eq!(whole.len(), 5);
    assert_eq!(sharded, whole);
    let report = |out: &str| -> serde_json::Value {
        let mut r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(p(out).join("contamination.json")).unwrap())
                .unwrap();
        r.as_object_mut().unwrap().remove("seconds");
        r
    };
    assert_eq!(report("three"), report("whole"));
    assert_eq!(report("whole")["contaminated_documents"], 7);
    // Relaunched after it finished: nothing is rewritten.
    let kept = p("three/tasks/00001/raw/part-1.jsonl");
    let before = std::fs::metadata(&kept).unwrap().modified().unwrap();
    decon("three", Some(1));
    assert_eq!(
        std::fs::metadata(&kept).unwrap().modified().unwrap(),
        before
    );
}

/// Issue 27's contract for tokenize: the shards and meta.json an array of N tasks writes through
/// `phigen merge` are byte-identical to one run's (the oracle: a whole run of the same binary),
/// for N = 1, 3 and 7, in input and id order, with two tasks whose marker and one output file
/// were lost (tasks killed mid-write) relaunched.
#[test]
fn tokenize_as_an_array_writes_the_bytes_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s);
    std::fs::create_dir_all(p("raw")).unwrap();
    for f in 0..8 {
        let jsonl: String = (0..25)
            .map(|d| {
                let text = format!(
                    "Document {d} of file {f}: the {} fox jumps over {} lazy dogs.",
                    ["quick", "slow", "red"][d % 3],
                    d * f
                );
                serde_json::json!({"id": format!("{f}-{d}"), "text": text}).to_string() + "\n"
            })
            .collect();
        std::fs::write(p(&format!("raw/part-{f}.jsonl")), jsonl).unwrap();
    }
    let tokenize = |out: &str, order: &str, env: &[(&str, String)]| {
        let mut c = Command::new(BIN);
        c.args(["--quiet", "tokenize", "--input"])
            .arg(p("raw"))
            .arg("--out")
            .arg(p(out))
            .args([
                "--val-fraction",
                "0.2",
                "--shard-tokens",
                "700",
                "--order",
                order,
            ]);
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let merge = |out: &str| {
        let o = Command::new(BIN).arg("merge").arg(p(out)).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    };
    // The shards and meta.json of `out` (the task directories and markers left out).
    let outputs = |out: &str| -> std::collections::BTreeMap<String, Vec<u8>> {
        tree_bytes(&p(out))
            .into_iter()
            .filter(|(rel, _)| rel.ends_with(".bin") && !rel.contains('/') || rel == "meta.json")
            .collect()
    };
    for order in ["input", "id"] {
        let whole = format!("whole-{order}");
        tokenize(&whole, order, &[]);
        let expected = outputs(&whole);
        assert!(expected.len() >= 4, "{:?}", expected.keys());
        for n in [1usize, 3, 7] {
            let out = format!("tasks-{order}-{n}");
            let slurm = |k: usize| {
                vec![
                    ("SLURM_ARRAY_TASK_ID", k.to_string()),
                    ("SLURM_ARRAY_TASK_COUNT", n.to_string()),
                ]
            };
            for k in (0..n).rev() {
                tokenize(&out, order, &slurm(k));
            }
            if n > 1 {
                // Tasks 0 and N-1 "killed": the marker and the first file of each gone (task K
                // writes docs-K.bin first: it owns input files K, K+N, …); both relaunched.
                let killed = [0, n - 1];
                for k in killed {
                    let task = p(&out).join(format!("tasks/{k:05}"));
                    std::fs::remove_file(p(&out).join(format!("completions/{k:05}"))).unwrap();
                    std::fs::remove_file(task.join(format!("docs-{k:06}.bin"))).unwrap();
                }
                for k in killed {
                    tokenize(&out, order, &slurm(k));
                }
            }
            merge(&out);
            assert_eq!(outputs(&out), expected, "{order} order, {n} tasks");
        }
    }
}

/// A story of 150 words drawn from `seed` (a fixed LCG, so the corpus is the same on every run),
/// with word `10 + variant` changed for `variant > 0`: one word of 150 changed keeps the 5-gram
/// Jaccard near 0.94, which 14 × 8 MinHash-LSH catches with probability ≈ 1.
fn story(seed: u64, variant: usize) -> String {
    let words = [
        "the", "fox", "ran", "over", "a", "hill", "and", "saw", "bright", "stars",
    ];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out: Vec<String> = (0..150)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!(
                "{}{}",
                words[(x >> 33) as usize % words.len()],
                (x >> 40) % 500
            )
        })
        .collect();
    if variant > 0 {
        out[10 + variant] = format!("changed{variant}");
    }
    out.join(" ")
}

/// Every file below `dir` but the stage directories, control files and stats.json (timings).
fn dedup_outputs(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let stage_dirs = ["signatures", "buckets", "clusters", "filter"];
    tree_bytes(dir)
        .into_iter()
        .filter(|(rel, _)| {
            let top = rel.split('/').next().unwrap_or("");
            !stage_dirs.contains(&top) && !rel.starts_with(".phigen") && rel != "stats.json"
        })
        .collect()
}

/// `phigen dedup --stage …` run as Slurm array tasks (separate processes, `SLURM_ARRAY_TASK_ID`
/// and `SLURM_ARRAY_TASK_COUNT` set; the buckets as a Kubernetes Indexed Job with
/// `JOB_COMPLETION_INDEX` and `--shards 2`) writes byte for byte the kept files and
/// removed.parquet of one `phigen dedup` over the same input, for 1, 3 and 7 signature and filter
/// tasks. Two signature tasks and two filter tasks are "killed" (marker and output gone, a torn
/// temp file left): the next stage refuses to start and names them, and relaunching the array
/// redoes exactly those. The near and exact copies sit in other files than their originals, so
/// the pairs cross task boundaries.
#[test]
fn dedup_array_tasks_write_what_one_run_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let mut files: Vec<String> = vec![String::new(); 12];
    for s in 0..240u64 {
        let mut put = |file: u64, id: String, text: String| {
            files[file as usize % 12] +=
                &(serde_json::json!({"id": id, "text": text}).to_string() + "\n");
        };
        put(s, format!("s{s}"), story(s, 0));
        if s % 3 == 0 {
            put(s + 5, format!("s{s}-near"), story(s, 1 + s as usize % 4));
        }
        if s % 8 == 0 {
            put(s + 7, format!("s{s}-copy"), story(s, 0));
        }
    }
    for (i, text) in files.iter().enumerate() {
        std::fs::write(corpus.join(format!("part-{i:02}.jsonl")), text).unwrap();
    }
    let dedup = |out: &std::path::Path, args: &[&str], env: &[(&str, String)]| {
        let mut c = Command::new(BIN);
        c.args(["--quiet", "dedup", "--input", corpus.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .args(args);
        for var in [
            "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_TASK_COUNT",
            "SLURM_ARRAY_TASK_MIN",
            "JOB_COMPLETION_INDEX",
        ] {
            c.env_remove(var);
        }
        c.envs(env.iter().map(|(k, v)| (k, v)));
        c.output().unwrap()
    };
    let ok = |o: std::process::Output| assert!(o.status.success(), "{}", stderr(&o));
    let whole = tmp.path().join("whole");
    ok(dedup(&whole, &[], &[]));
    let expected = dedup_outputs(&whole);
    assert_eq!(expected.len(), 13, "twelve kept files and removed.parquet");
    let removed = stats(&whole);
    assert!(
        removed["removed_near"].as_u64() > Some(60) && removed["removed_exact"].as_u64() > Some(20)
    );
    for n in [1usize, 3, 7] {
        let out = tmp.path().join(format!("array-{n}"));
        let slurm = |stage: &str, k: usize| {
            let env = [
                ("SLURM_ARRAY_TASK_ID", k.to_string()),
                ("SLURM_ARRAY_TASK_COUNT", n.to_string()),
            ];
            dedup(&out, &["--stage", stage], &env)
        };
        let array = |stage: &str| (0..n).rev().for_each(|k| ok(slurm(stage, k)));
        let buckets = || {
            (0..2).map(|k| {
                let env = [("JOB_COMPLETION_INDEX", k.to_string())];
                dedup(&out, &["--stage", "buckets", "--shards", "2"], &env)
            })
        };
        let kill = |stage: &str, k: usize, output: std::path::PathBuf| {
            std::fs::remove_file(out.join(format!("{stage}/completions/{k:05}"))).unwrap();
            std::fs::remove_file(&output).unwrap();
            let mut torn = output.into_os_string();
            torn.push(".tmp");
            std::fs::write(torn, b"torn").unwrap();
        };
        array("signatures");
        let killed = [0, n - 1];
        if n > 1 {
            for k in killed {
                kill("signatures", k, out.join(format!("signatures/{k:05}.bin")));
            }
            let refused = buckets().next().unwrap();
            let named = format!("tasks 0, {} of {n}", n - 1);
            assert!(
                !refused.status.success() && stderr(&refused).contains(&named),
                "{}",
                stderr(&refused)
            );
            array("signatures");
        }
        buckets().for_each(ok);
        ok(dedup(&out, &["--stage", "clusters"], &[]));
        array("filter");
        assert_eq!(dedup_outputs(&out), expected, "{n} tasks");
        if n > 1 {
            std::fs::remove_file(out.join("stats.json")).unwrap();
            for k in killed {
                kill("filter", k, out.join(format!("corpus/part-{k:02}.jsonl")));
            }
            ok(slurm("filter", n - 1));
            assert!(
                !out.join("stats.json").exists(),
                "task 0 has not finished again yet"
            );
            ok(slurm("filter", 0));
        }
        assert_eq!(dedup_outputs(&out), expected, "{n} tasks, two relaunched");
        assert_eq!(stats(&out)["kept"], removed["kept"]);
    }
}

/// Issue 27's contract for `phigen annotate`: 3 Slurm array tasks rate, between them, exactly the
/// sample one run rates, each file once with the same score (the oracle: a whole run of the same
/// binary against the same mock teacher, whose score depends only on the file); `phigen merge`
/// first names the unfinished task; a relaunched finished task sends nothing; `phigen classify
/// train --labels` reads the array's ratings like the whole run's.
#[tokio::test(flavor = "multi_thread")]
async fn annotate_as_slurm_array_tasks_rates_the_sample_of_one_run() {
    let server = mock(Faults::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let stack = tmp.path().join("stack");
    std::fs::create_dir_all(&stack).unwrap();
    for i in 0..60 {
        let text = if i % 2 == 0 {
            format!("def add_{i}(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n")
        } else {
            format!(
                "DATA_{i} = [{}]\n",
                (0..40)
                    .map(|k| (k * i).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        std::fs::write(stack.join(format!("f{i:03}.py")), text).unwrap();
    }
    let annotate = |out: &std::path::Path, task: Option<usize>| {
        let mut c = Command::new(BIN);
        c.args(["--quiet", "annotate", "--input", stack.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap(), "--sample", "25"])
            .args(["--base-url", &server.base_url(), "--model", "mock"])
            .args(["--price-input", "0", "--price-output", "0"])
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("PHIGEN_MODEL");
        if let Some(k) = task {
            c.env("SLURM_ARRAY_TASK_ID", k.to_string())
                .env("SLURM_ARRAY_TASK_COUNT", "3");
        }
        c
    };
    // (file_id, score) of every rating under `dir`, sorted.
    let ratings = |dir: &std::path::Path| {
        let mut all = Vec::new();
        for (rel, _) in tree_bytes(dir) {
            let name = rel.rsplit('/').next().unwrap();
            if name.starts_with("part-") && name.ends_with(".parquet") {
                let df = phigen::artifact::table::read_frame(&dir.join(&rel), None).unwrap();
                let ids = phigen::artifact::table::text_column(&df, dir, "file_id").unwrap();
                let scores = phigen::artifact::table::int_column(&df, dir, "score").unwrap();
                all.extend(
                    ids.into_iter()
                        .zip(scores)
                        .map(|(i, s)| (i.unwrap(), s.unwrap())),
                );
            }
        }
        all.sort();
        all
    };
    let whole = tmp.path().join("whole");
    let o = run(annotate(&whole, None)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let expected = ratings(&whole);
    assert_eq!(expected.len(), 25);

    let arr = tmp.path().join("array");
    for k in [0, 2] {
        let o = run(annotate(&arr, Some(k))).await;
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let merge = || {
        let mut c = Command::new(BIN);
        c.args(["--quiet", "merge", arr.to_str().unwrap()]);
        c
    };
    let o = run(merge()).await;
    assert!(
        !o.status.success() && stderr(&o).contains("tasks 1;"),
        "{}",
        stderr(&o)
    );
    let o = run(annotate(&arr, Some(1))).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let sent = server.log.requests.load(Ordering::SeqCst);
    let o = run(annotate(&arr, Some(1))).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        server.log.requests.load(Ordering::SeqCst),
        sent,
        "a finished task sends nothing"
    );
    let o = run(merge()).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(ratings(&arr), expected);
    assert_eq!(stats(&arr)["kept"], stats(&whole)["kept"]);
    let labels = phigen::classify::annotate::load_labels(&arr).unwrap();
    assert_eq!(labels.len(), 25);
}

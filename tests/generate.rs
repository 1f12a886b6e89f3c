//! The corpus generators (`phigen stories`, `textbooks`, `exercises`) through the binary against a
//! loopback mock of an OpenAI-compatible server. No network, no key.
//!
//! Expected values come from the issue's contract (N good records, exactly-once ids, 401 stops at
//! once, --max-cost is never exceeded, --dry-run sends nothing) and from the mock's deterministic
//! behaviour documented in `src/teacher/mock.rs`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use phigen::artifact::table;
use phigen::teacher::mock::Faults;

mod common;
use common::{
    durable_prompts, generate_cmd, mock, run, shard_records, stats, stderr, stories_cmd, BIN,
};

fn assert_exactly_slots(out: &Path, n: i64) {
    let records = shard_records(out);
    let ids: HashSet<&String> = records.iter().map(|r| &r.0).collect();
    let mut slots: Vec<i64> = records.iter().map(|r| r.1).collect();
    slots.sort();
    assert_eq!(ids.len(), records.len(), "ids must be unique");
    assert_eq!(
        slots,
        (0..n).collect::<Vec<_>>(),
        "exactly one record per slot 0..{n}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_good_records_despite_every_kind_of_fault() {
    let server = mock(Faults {
        rate_429: 0.08,
        retry_after_secs: 0.01,
        rate_500: 0.05,
        rate_503: 0.05,
        rate_malformed: 0.05,
        rate_drop: 0.05,
        rate_slow: 0.03,
        slow_secs: 2.0,
        rate_length: 0.05,
        rate_refuse: 0.05,
        rate_duplicate: 0.1,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stories");
    let o = run(stories_cmd(
        &server,
        &out,
        60,
        &[
            "--concurrency",
            "8",
            "--shard-size",
            "16",
            "--timeout",
            "0.5",
            "--max-attempts",
            "8",
        ],
    ))
    .await;
    assert!(o.status.success(), "exit {:?}: {}", o.status, stderr(&o));
    assert_exactly_slots(&out, 60);
    let s = stats(&out);
    assert_eq!(s["complete"], true);
    assert_eq!(s["records"], 60);
    let run = &s["run"];
    for counter in [
        "throttled",
        "server_errors",
        "timeouts",
        "connection_errors",
        "malformed",
    ] {
        assert!(
            run["requests"][counter].as_u64().unwrap() > 0,
            "the mock injected {counter}: {run}"
        );
    }
    for reason in ["truncated", "refused", "duplicate"] {
        assert!(
            run["dropped"][reason].as_u64().unwrap_or(0) > 0,
            "expected {reason} drops: {run}"
        );
    }
    // Every drop is auditable in rejects.parquet with its reason.
    let rejects = table::read_columns(&out.join("rejects.parquet"), &["reason"]).unwrap();
    let reasons: HashSet<String> = table::text_column(&rejects, &out, "reason")
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    assert!(
        reasons.contains("truncated") && reasons.contains("refused"),
        "{reasons:?}"
    );
    // TinyStories verification is summarised: the mock quotes the three words except in its one
    // fixed "duplicate" answer, which is kept once.
    let share = s["corpus"]["words_used_share"].as_f64().unwrap();
    assert!((share - 59.0 / 60.0).abs() < 1e-12, "{share}");
    assert!(s["corpus"]["top_openings"].as_array().unwrap().len() <= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_then_rerun_gives_exactly_n_and_resends_nothing_written() {
    let server = mock(Faults {
        latency_ms: 15,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stories");
    let args = ["--concurrency", "4", "--shard-size", "7"];
    let mut child = stories_cmd(&server, &out, 200, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.log.answered.load(Ordering::SeqCst) < 60 {
        assert!(Instant::now() < deadline, "the first run made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let written_before = durable_prompts(&out);
    let sent_before: HashMap<String, u64> = server.log.per_prompt.lock().unwrap().clone();
    assert!(
        written_before.len() >= 40,
        "only {} records survived the kill",
        written_before.len()
    );

    let o = run(stories_cmd(&server, &out, 200, &args)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_exactly_slots(&out, 200);
    let sent_after = server.log.per_prompt.lock().unwrap().clone();
    for p in &written_before {
        assert_eq!(
            sent_after[p], sent_before[p],
            "a prompt whose record was written was sent again"
        );
    }
    // Only requests in flight at the kill may have been answered twice.
    let twice = sent_after.values().filter(|&&c| c > 1).count();
    assert!(
        twice <= 8,
        "{twice} prompts were sent twice; at most the in-flight ones may be"
    );
    assert!(
        !out.join("records.journal.jsonl").exists()
            || std::fs::metadata(out.join("records.journal.jsonl"))
                .unwrap()
                .len()
                == 0
    );
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_str()
        .unwrap()
        .ends_with(".tmp")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_sends_nothing_and_a_larger_n_sends_only_the_missing() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    assert!(run(stories_cmd(&server, &out, 10, &[]))
        .await
        .status
        .success());
    assert_eq!(server.log.requests.load(Ordering::SeqCst), 10);
    assert!(run(stories_cmd(&server, &out, 10, &[]))
        .await
        .status
        .success());
    assert_eq!(
        server.log.requests.load(Ordering::SeqCst),
        10,
        "a complete directory needs no request"
    );
    assert!(run(stories_cmd(&server, &out, 15, &[]))
        .await
        .status
        .success());
    assert_eq!(server.log.requests.load(Ordering::SeqCst), 15);
    assert_exactly_slots(&out, 15);
}

/// Record ids must not change between phigen versions: an existing directory is resumed by id.
/// These were written by commit 4609303 (whose ids went through `serde_json::Value`) for the
/// flags below; they change only with the built-in prompt or word lists, and then the manifest's
/// template hash refuses the old directory anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_ids_are_those_earlier_versions_wrote() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let flags = ["--seed", "7", "--temperature", "0.7", "--top-p", "0.9"];
    let o = run(stories_cmd(&server, &out, 2, &flags)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let mut ids: Vec<(i64, String)> = shard_records(&out)
        .into_iter()
        .map(|(id, slot, _)| (slot, id))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            (0, "30cb8700c581e1a6c6386d611e5c1aa4".to_string()),
            (1, "56a8131cb7d0bc90f5370fed97da41bc".to_string())
        ]
    );
}

/// stats.json is derived from the scan at the start of a run plus the run's own counters; this
/// checks it against what the directory really holds (the Parquet rows, read back here) after two
/// runs with drops, failed requests and a resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_after_a_resumed_run_count_what_the_directory_holds() {
    let server = mock(Faults {
        rate_500: 0.3,
        rate_refuse: 0.1,
        rate_duplicate: 0.15,
        rate_length: 0.1,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    // One retry only, so some requests fail for good (request_failed rejects).
    let flags = ["--retries", "1", "--shard-size", "7", "--concurrency", "4"];
    for n in [20, 35] {
        let o = run(stories_cmd(&server, &out, n, &flags)).await;
        // 0, or 4 when some slot's request failed for good (it is sent again by the next run).
        assert!(matches!(o.status.code(), Some(0 | 4)), "{}", stderr(&o));
    }
    let s = stats(&out);
    let records = shard_records(&out);
    assert_eq!(s["records"].as_u64().unwrap(), records.len() as u64);
    let done: HashSet<i64> = records.iter().map(|r| r.1).filter(|&s| s < 35).collect();
    assert_eq!(s["complete"], done.len() == 35, "{s}");
    let path = out.join("rejects.parquet");
    let df = table::read_columns(&path, &["reason"]).unwrap();
    let mut by_reason: HashMap<String, u64> = HashMap::new();
    for reason in table::text_column(&df, &path, "reason").unwrap() {
        *by_reason.entry(reason.unwrap()).or_default() += 1;
    }
    for reason in ["request_failed", "refused", "duplicate", "truncated"] {
        assert!(by_reason.contains_key(reason), "no {reason}: {by_reason:?}");
    }
    let total: HashMap<String, u64> = s["rejects_total"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    assert_eq!(total, by_reason);
    let checked =
        records.len() as u64 + by_reason.values().sum::<u64>() - by_reason["request_failed"];
    assert_eq!(s["answers_checked"].as_u64().unwrap(), checked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_cost_stops_cleanly_without_exceeding_it_and_a_higher_limit_continues() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    // $1000 per 1M tokens: one request (~60 prompt + ≤200 output tokens) costs at most ~$0.27.
    let price = [
        "--price-input",
        "1000",
        "--price-output",
        "1000",
        "--max-tokens",
        "200",
        "--concurrency",
        "2",
    ];
    let o = run(stories_cmd(
        &server,
        &out,
        50,
        &[&price[..], &["--max-cost", "1.0"]].concat(),
    ))
    .await;
    assert_eq!(
        o.status.code(),
        Some(4),
        "an early stop is exit code 4: {}",
        stderr(&o)
    );
    let s = stats(&out);
    assert_eq!(s["stopped"], "budget");
    let spent = s["run"]["cost_usd"].as_f64().unwrap();
    // It stops only when even with nothing in flight the next worst case (~$0.27) would not fit.
    assert!(spent <= 1.0 && spent > 0.6, "spent ${spent}");
    let kept = s["records"].as_u64().unwrap();
    assert!(kept > 0 && kept < 50);
    let o = run(stories_cmd(
        &server,
        &out,
        50,
        &[&price[..], &["--max-cost", "100"]].concat(),
    ))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_exactly_slots(&out, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_stops_at_once_naming_the_variable_but_never_the_key() {
    let server = mock(Faults {
        unauthorized: true,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let mut cmd = stories_cmd(
        &server,
        &out,
        100,
        &["--api-key-env", "PHIGEN_TEST_KEY", "--concurrency", "4"],
    );
    cmd.env("PHIGEN_TEST_KEY", "sk-test-secret-123");
    let o = run(cmd).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("PHIGEN_TEST_KEY") && err.contains("401"),
        "{err}"
    );
    assert!(!err.contains("sk-test-secret"), "the key leaked: {err}");
    let sent = server.log.requests.load(Ordering::SeqCst);
    assert!(
        sent <= 8,
        "401 must stop the run at once, yet {sent} requests were sent"
    );
    for entry in std::fs::read_dir(&out).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("sk-test-secret"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_counts_prompts_and_sends_and_writes_nothing() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let o = run(stories_cmd(
        &server,
        &out,
        20,
        &["--dry-run", "--model", "gpt-4o-mini"],
    ))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("prompts to send          20"), "{stdout}");
    assert!(
        stdout.contains('$'),
        "gpt-4o-mini has a default price: {stdout}"
    );
    assert_eq!(server.log.requests.load(Ordering::SeqCst), 0);
    assert!(!out.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_made_with_other_settings_is_refused_and_left_intact() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    assert!(run(stories_cmd(&server, &out, 5, &[]))
        .await
        .status
        .success());
    let before = std::fs::read(out.join("part-00000.parquet")).unwrap();
    let o = run(stories_cmd(&server, &out, 5, &["--seed", "9"])).await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("manifest.json") && err.contains("seed") && err.contains("--out"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("part-00000.parquet")).unwrap(),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_word_lists_and_templates_are_clear_errors() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let words = dir.path().join("words");
    std::fs::create_dir(&words).unwrap();
    for f in ["verbs.txt", "adjectives.txt", "function_words.txt"] {
        std::fs::write(words.join(f), "run\n").unwrap();
    }
    std::fs::write(words.join("nouns.txt"), "# nothing here\n").unwrap();
    std::fs::write(words.join("features.txt"), "dialogue | have a dialogue\n").unwrap();
    let o = run(stories_cmd(
        &server,
        &dir.path().join("o"),
        5,
        &["--words", words.to_str().unwrap()],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("nouns.txt") && stderr(&o).contains("empty"),
        "{}",
        stderr(&o)
    );

    let prompt = dir.path().join("p.txt");
    std::fs::write(&prompt, "id: x\nversion: 1\nvars: verb noun adjective features\n---\n{verb} {noun} {adjective} {features} {colour}\n").unwrap();
    let o = run(stories_cmd(
        &server,
        &dir.path().join("o"),
        5,
        &["--prompt", prompt.to_str().unwrap()],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("p.txt") && stderr(&o).contains("{colour}"),
        "{}",
        stderr(&o)
    );
    assert_eq!(server.log.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn textbooks_keep_only_sections_whose_code_parses() {
    let server = mock(Faults {
        rate_bad_code: 0.2,
        rate_no_code: 0.1,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tb");
    let topics = concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/topics.txt");
    let o = run(generate_cmd(
        "textbooks",
        &server,
        &out,
        30,
        &["--topics", topics, "--max-attempts", "8"],
    ))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_exactly_slots(&out, 30);
    let s = stats(&out);
    assert_eq!(s["kind"], "textbook");
    for reason in ["syntax_error", "no_code"] {
        assert!(
            s["run"]["dropped"][reason].as_u64().unwrap_or(0) > 0,
            "expected {reason} drops: {}",
            s["run"]
        );
    }
    let per_topic: u64 = s["corpus"]["per_topic"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(per_topic, 30);
    assert!(s["corpus"]["per_audience"].as_object().unwrap().len() > 1);
}

/// `--run-code`: a third of the mock's sections hold a program that raises (ZeroDivisionError);
/// those are dropped as `code_failed` with the error, and every kept section's program runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn textbooks_with_run_code_keep_only_sections_whose_program_runs() {
    let server = mock(Faults {
        rate_failing_tests: 0.3,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tb");
    let topics = concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/topics.txt");
    let args = ["--topics", topics, "--max-attempts", "10", "--run-code"];
    let o = run(generate_cmd("textbooks", &server, &out, 12, &args)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_exactly_slots(&out, 12);
    let s = stats(&out);
    assert!(
        s["run"]["dropped"]["code_failed"].as_u64().unwrap_or(0) > 0,
        "{}",
        s["run"]
    );
    assert_eq!(s["corpus"]["run_code"], true);
    assert_eq!(s["corpus"]["sandbox_isolation"], "namespaces");
    let rejects = table::read_columns(&out.join("rejects.parquet"), &["reason", "detail"]).unwrap();
    let details = table::text_column(&rejects, &out, "detail").unwrap();
    assert!(
        details
            .iter()
            .flatten()
            .any(|d| d.contains("ZeroDivisionError")),
        "{details:?}"
    );
    // Every kept section is one the mock wrote without the failing line.
    let p = out.join("part-00000.parquet");
    let df = table::read_columns(&p, &["text"]).unwrap();
    for text in table::text_column(&df, &p, "text")
        .unwrap()
        .into_iter()
        .flatten()
    {
        assert!(!text.contains("/ 0)"), "{text}");
    }
    // The manifest records the check: the directory is not continued without it (its sections
    // would be a mix of checked and unchecked ones), and the error names the field.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["checks"], "run_code");
    let unchecked = ["--topics", topics, "--max-attempts", "10"];
    let o = run(generate_cmd("textbooks", &server, &out, 14, &unchecked)).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("`checks` = run_code") && stderr(&o).contains("the default checks"),
        "{}",
        stderr(&o)
    );
    // A manifest written before the checks were recorded does not say which ran: it resumes.
    let mut old = manifest.clone();
    old.as_object_mut().unwrap().remove("checks");
    std::fs::write(out.join("manifest.json"), old.to_string()).unwrap();
    let o = run(generate_cmd("textbooks", &server, &out, 12, &args)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    // Prose sections have no program to run: the pair is refused before any request.
    let prose = ["--topics", topics, "--style", "prose", "--run-code"];
    let o = run(generate_cmd(
        "textbooks",
        &server,
        &dir.path().join("p"),
        2,
        &prose,
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--run-code"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_empty_topics_file_is_a_clear_error() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt");
    let o = run(generate_cmd(
        "textbooks",
        &server,
        &dir.path().join("o"),
        5,
        &["--topics", missing.to_str().unwrap()],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nope.txt"), "{}", stderr(&o));
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "# only comments\n\n").unwrap();
    let o = run(generate_cmd(
        "textbooks",
        &server,
        &dir.path().join("o"),
        5,
        &["--topics", empty.to_str().unwrap()],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("empty.txt") && stderr(&o).contains("no entries"),
        "{}",
        stderr(&o)
    );
    assert_eq!(server.log.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exercises_are_kept_only_when_their_asserts_pass_in_the_sandbox() {
    let server = mock(Faults {
        rate_bad_code: 0.1,
        rate_no_code: 0.1,
        rate_failing_tests: 0.2,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ex");
    let o = run(generate_cmd(
        "exercises",
        &server,
        &out,
        20,
        &["--max-attempts", "10"],
    ))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_exactly_slots(&out, 20);
    let s = stats(&out);
    assert_eq!(s["kind"], "exercise");
    for reason in ["syntax_error", "no_code", "tests_failed"] {
        assert!(
            s["run"]["dropped"][reason].as_u64().unwrap_or(0) > 0,
            "expected {reason} drops: {}",
            s["run"]
        );
    }
    // The pass rate is what was kept of what was checked (no request failed here).
    let checked = s["answers_checked"].as_u64().unwrap();
    let dropped: u64 = s["rejects_total"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(checked, 20 + dropped);
    assert!((s["keep_rate"].as_f64().unwrap() - 20.0 / checked as f64).abs() < 1e-12);
    // Every kept record defines its required function and passed.
    let p = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_str().unwrap().ends_with("part-00000.parquet"))
        .unwrap();
    let df = table::read_columns(&p, &["function_name", "code", "outcome"]).unwrap();
    let names = table::text_column(&df, &p, "function_name").unwrap();
    let codes = table::text_column(&df, &p, "code").unwrap();
    let outcomes = table::text_column(&df, &p, "outcome").unwrap();
    for i in 0..df.height() {
        assert!(codes[i]
            .as_ref()
            .unwrap()
            .contains(&format!("def {}(", names[i].as_ref().unwrap())));
        assert_eq!(outcomes[i].as_deref(), Some("passed"));
    }
    // The failing asserts are auditable in the rejects with the sandbox's verdict and error.
    let rejects = table::read_columns(&out.join("rejects.parquet"), &["reason", "detail"]).unwrap();
    let details = table::text_column(&rejects, &out, "detail").unwrap();
    assert!(
        details
            .iter()
            .flatten()
            .any(|d| d.starts_with("failed: AssertionError")),
        "{details:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exercises_without_a_usable_python_fail_at_start_up() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let o = run(generate_cmd(
        "exercises",
        &server,
        &dir.path().join("o"),
        5,
        &["--python", "/nonexistent/python3"],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/python3") && stderr(&o).contains("install Python 3"),
        "{}",
        stderr(&o)
    );
    assert_eq!(server.log.requests.load(Ordering::SeqCst), 0);
}

/// A server whose 400 answer echoes the request headers, as some proxies and debug servers do:
/// raw in a JSON string and as a JSON object. Answers every connection on `listener` until the
/// test ends.
fn echo_headers_with_400(listener: std::net::TcpListener) {
    use std::io::{BufRead, BufReader, Read, Write};
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut head, mut headers, mut length) = (String::new(), serde_json::Map::new(), 0);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.trim_end().split_once(": ") {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.parse().unwrap();
                    }
                    headers.insert(name.to_string(), value.into());
                }
                head.push_str(&line);
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let answer = serde_json::json!({
                "error": {"message": "invalid request", "type": "invalid_request_error"},
                "request": head,
                "headers": headers,
            })
            .to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
}

/// Issue 23: a 4xx body that echoes the request put `Bearer sk-…` into `rejects.parquet`. With
/// a real loopback server echoing every header, the stored errors, the debug log and every file
/// of the output keep the failure (HTTP 400, the server's message) but neither the key nor the
/// bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_body_echoing_the_key_is_redacted_in_rejects_and_logs() {
    const KEY: &str = "sk-test-secret-4567";
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    echo_headers_with_400(listener);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let mut cmd = Command::new(BIN);
    cmd.args([
        "-v",
        "stories",
        "--base-url",
        &url,
        "--model",
        "m",
        "--n",
        "3",
    ])
    .args(["--out", out.to_str().unwrap(), "--concurrency", "1"])
    .args(["--api-key-env", "PHIGEN_TEST_ECHO_KEY"])
    .env("PHIGEN_TEST_ECHO_KEY", KEY)
    .env_remove("OPENAI_API_KEY")
    .env_remove("OPENAI_BASE_URL");
    let o = run(cmd).await;
    let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    // 4: incomplete, every request was rejected (a 400 is not retried, nor fatal).
    assert_eq!(o.status.code(), Some(4), "{log}");
    let leaked = |text: &str| text.contains("secret-4567") || text.contains("Bearer sk-");
    assert!(
        log.contains("HTTP 400") && log.contains("[redacted]"),
        "{log}"
    );
    assert!(!leaked(&log), "the key leaked into the log: {log}");
    let path = out.join("rejects.parquet");
    let df = table::read_columns(&path, &["reason", "detail"]).unwrap();
    let details = table::text_column(&df, &path, "detail").unwrap();
    assert_eq!(details.len(), 3, "one failed request per record");
    for detail in details.iter().flatten() {
        assert!(
            detail.contains("HTTP 400") && detail.contains("invalid request"),
            "{detail}"
        );
        assert!(
            !leaked(detail),
            "the key leaked into rejects.parquet: {detail}"
        );
    }
    for entry in std::fs::read_dir(&out).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!leaked(&String::from_utf8_lossy(&bytes)));
    }
}

/// Two `phigen stories` runs on one --out wrote 138 duplicate ids. Now, while run A holds the
/// directory (its answers are slow, so it is still running), run B exits at once with an error
/// naming the directory and A's PID; A finishes with exactly its N records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_one_out_fails_at_once_naming_the_first() {
    let server = mock(Faults {
        rate_slow: 1.0,
        slow_secs: 2.0,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stories");
    let first = stories_cmd(&server, &out, 3, &["--concurrency", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = first.id();
    let lock = out.join(".phigen.lock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&lock)
        .ok()
        .map(|s| s.trim().to_string())
        != Some(pid.to_string())
    {
        assert!(Instant::now() < deadline, "run A never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let second = run(stories_cmd(&server, &out, 3, &[])).await;
    assert!(!second.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "B must not wait"
    );
    let err = stderr(&second);
    assert!(
        err.contains(&format!("another phigen run (pid {pid}) is writing"))
            && err.contains(out.to_str().unwrap()),
        "{err}"
    );
    let first = tokio::task::spawn_blocking(move || first.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    assert_exactly_slots(&out, 3);
}

/// Issue 25 item 3: a run that keeps under 20% of its answers after 50 warns once, naming the
/// cause its drop reasons point to. The mock cuts 90% of answers short (`finish_reason: length`,
/// dropped as `truncated`), so about 100 answers fill 10 slots: the warning must appear exactly
/// once (even with --quiet) and name --max-tokens, and stats.json keeps the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_keep_rate_warns_once_naming_the_flag_and_a_good_run_does_not() {
    let server = mock(Faults {
        rate_length: 0.9,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cut");
    let o = run(stories_cmd(&server, &out, 10, &["--max-attempts", "80"])).await;
    let err = stderr(&o);
    assert_eq!(err.matches("warning: after").count(), 1, "{err}");
    let line = err.lines().find(|l| l.contains("warning: after")).unwrap();
    assert!(
        line.contains("truncated") && line.contains("raise --max-tokens"),
        "{line}"
    );
    let s = stats(&out);
    assert_eq!(s["low_keep"]["cause"], "max_tokens", "{s}");
    assert!(s["low_keep"]["answers"].as_u64().unwrap() >= 50);

    // A good run: no warning, and the summary (not --quiet) states the keep rate and reasons.
    let good = mock(Faults {
        rate_refuse: 0.1,
        ..Faults::default()
    })
    .await;
    let out = dir.path().join("good");
    let mut cmd = stories_cmd(&good, &out, 60, &[]);
    let args: Vec<String> = cmd
        .get_args()
        .filter(|a| *a != "--quiet")
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut plain = Command::new(BIN);
    plain
        .args(&args)
        .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))));
    for (k, v) in cmd.get_envs() {
        if v.is_none() {
            plain.env_remove(k);
        }
    }
    cmd = plain;
    let o = run(cmd).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning: after"), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let s = stats(&out);
    assert!(s.get("low_keep").is_none(), "{s}");
    let kept = 100.0 * s["keep_rate"].as_f64().unwrap();
    let refused = s["rejects_total"]["refused"].as_u64().unwrap();
    assert!(
        stdout.contains(&format!(
            "keep rate {kept:.1}% of {} answers checked; top reject reasons: refused {refused}",
            s["answers_checked"]
        )),
        "{stdout}"
    );
}

/// (id, slot, prompt) of every record an array's tasks wrote below `out/tasks/`.
fn task_records(out: &Path) -> Vec<(String, i64, String)> {
    let mut all = Vec::new();
    for task in std::fs::read_dir(out.join("tasks")).unwrap() {
        all.extend(shard_records(&task.unwrap().path()));
    }
    all.sort();
    all
}

/// Issue 27's contract for generation: N array tasks, told who they are by Slurm's or
/// Kubernetes' variables, write exactly the records of one run (the same ids, slots and
/// prompts: the oracle is a whole run against the same deterministic mock); the merge names the
/// tasks that have not finished; two tasks killed mid-run and relaunched resume; a relaunched
/// finished task sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_tasks_write_the_records_of_one_run() {
    let server = mock(Faults {
        latency_ms: 10,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let n = 42;
    let args = ["--concurrency", "2", "--shard-size", "5"];
    let whole = dir.path().join("whole");
    let o = run(stories_cmd(&server, &whole, n, &args)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let mut expected = shard_records(&whole);
    expected.sort();
    assert_eq!(expected.len(), n as usize);

    let slurm = |out: &Path, k: usize, tasks: usize| {
        let mut c = stories_cmd(&server, out, n, &args);
        c.env("SLURM_ARRAY_TASK_ID", k.to_string())
            .env("SLURM_ARRAY_TASK_COUNT", tasks.to_string());
        c
    };
    let merge = |out: &Path| {
        let mut c = Command::new(BIN);
        c.args(["merge", out.to_str().unwrap()]);
        c
    };

    // Three Slurm tasks; tasks 0 and 1 are killed mid-run.
    let three = dir.path().join("three");
    let answered = server.log.answered.load(Ordering::SeqCst);
    let mut killed: Vec<_> = (0..2)
        .map(|k| {
            slurm(&three, k, 3)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.log.answered.load(Ordering::SeqCst) < answered + 8 {
        assert!(Instant::now() < deadline, "the tasks made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for child in &mut killed {
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let o = run(slurm(&three, 2, 3)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(merge(&three)).await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("2 of 3 tasks") && stderr(&o).contains("tasks 0-1"),
        "{}",
        stderr(&o)
    );
    for k in 0..2 {
        let o = run(slurm(&three, k, 3)).await;
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = run(merge(&three)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(task_records(&three), expected);
    let merged = stats(&three);
    assert_eq!(
        (&merged["records"], &merged["tasks"], &merged["requested"]),
        (
            &serde_json::json!(n),
            &serde_json::json!(3),
            &serde_json::json!(n)
        )
    );
    // A relaunched task that finished sends nothing.
    let sent = server.log.requests.load(Ordering::SeqCst);
    let o = run(slurm(&three, 1, 3)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.log.requests.load(Ordering::SeqCst), sent);

    // Seven Kubernetes Indexed Job pods (the index from the environment, N from --shards), and
    // one task as the degenerate array.
    for tasks in [7, 1] {
        let out = dir.path().join(format!("k8s-{tasks}"));
        for k in 0..tasks {
            let mut c = stories_cmd(&server, &out, n, &args);
            c.args(["--shards", &tasks.to_string()])
                .env("JOB_COMPLETION_INDEX", k.to_string());
            let o = run(c).await;
            assert!(o.status.success(), "{}", stderr(&o));
        }
        let o = run(merge(&out)).await;
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(task_records(&out), expected, "{tasks} tasks");
    }
}

/// The text and prefix columns of every instruct record in `out`, by slot.
fn instruct_records(out: &Path) -> Vec<(i64, String, String, Vec<String>)> {
    let mut rows = Vec::new();
    for p in std::fs::read_dir(out).unwrap().map(|e| e.unwrap().path()) {
        let name = p.file_name().unwrap().to_str().unwrap();
        if !(name.starts_with("part-") && name.ends_with(".parquet")) {
            continue;
        }
        let df = table::read_columns(&p, &["id", "slot", "text", "fields", "features"]).unwrap();
        let ids = table::text_column(&df, &p, "id").unwrap();
        let slots = table::int_column(&df, &p, "slot").unwrap();
        let texts = table::text_column(&df, &p, "text").unwrap();
        let features = df.column("features").unwrap().list().unwrap().clone();
        for (i, cell) in features.series_iter().enumerate() {
            let f: Vec<String> = cell
                .map(|s| {
                    s.str()
                        .unwrap()
                        .iter()
                        .flatten()
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            rows.push((
                slots[i].unwrap(),
                ids[i].clone().unwrap(),
                texts[i].clone().unwrap(),
                f,
            ));
        }
    }
    rows.sort();
    rows
}

/// Issue 30 item 3 through the binary: `phigen stories --instruct`. The first run loses every
/// summary request (the mock answers 500 to prompts containing the summary prompt's words, with
/// no retries); the second, against a mock without that fault, sends only those summaries — not
/// one story request again — and then every story is written with exactly the prefix fields the
/// seeded draw (`instruct::draw`, by story id) gave it, in the paper's order, and `tokenize`
/// packs each record as one document (the work directories are not read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instruct_stories_carry_their_drawn_prefix_and_a_lost_summary_is_sent_alone() {
    use phigen::generate::instruct::draw;
    const SUMMARY: &str = "Summarize the following story";
    let lossy = mock(Faults {
        fail_containing: Some(SUMMARY.into()),
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("instruct");
    let flags = ["--instruct", "--retries", "0"];
    let o = run(stories_cmd(&lossy, &out, 12, &flags)).await;
    assert_eq!(o.status.code(), Some(4), "incomplete: {}", stderr(&o));
    let sent = lossy.log.per_prompt.lock().unwrap().clone();
    let story_prompts = sent.keys().filter(|p| !p.contains(SUMMARY)).count();
    let summary_prompts = sent.keys().filter(|p| p.contains(SUMMARY)).count();
    assert_eq!(story_prompts, 12, "one request per story");
    assert!(sent.values().all(|&n| n == 1), "{sent:?}");
    assert!(summary_prompts > 0, "some prefix draws Summary");
    let first = instruct_records(&out);
    assert_eq!(
        first.len(),
        12 - summary_prompts,
        "stories without a summary wait"
    );

    let good = mock(Faults::default()).await;
    let o = run(stories_cmd(&good, &out, 12, &flags)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let resent = good.log.per_prompt.lock().unwrap().clone();
    assert_eq!(resent.len(), summary_prompts, "{:?}", resent.keys());
    assert!(
        resent.keys().all(|p| p.contains(SUMMARY)),
        "no story request is sent again"
    );

    let records = instruct_records(&out);
    assert_eq!(records.len(), 12);
    assert_eq!(stats(&out)["kind"], "tinystories_instruct");
    for (_, id, text, features) in &records {
        let (fields, _) = draw(0, id, !features.is_empty());
        let (prefix, story) = text.split_once("\nStory: ").unwrap_or(("", text));
        let labels: Vec<&str> = prefix
            .lines()
            .map(|l| l.split_once(": ").unwrap().0)
            .collect();
        let expected: Vec<&str> = fields.iter().map(|f| f.label()).collect();
        assert_eq!(labels, expected, "{text}");
        assert!(!story.is_empty());
        for line in prefix.lines() {
            let (label, value) = line.split_once(": ").unwrap();
            match label {
                "Sentence" => assert!(story.contains(value), "{value} is of the story"),
                "Features" => assert_eq!(value.split(", ").count(), features.len()),
                "Words" => assert_eq!(value.split(", ").count(), 3),
                "Summary" => assert!(!value.is_empty()),
                other => panic!("unexpected field {other}"),
            }
        }
    }

    let tok = dir.path().join("tok");
    let o = std::process::Command::new(BIN)
        .args(["--quiet", "tokenize", "--input"])
        .arg(&out)
        .arg("--out")
        .arg(&tok)
        .args(["--val-fraction", "0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tok.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["splits"]["train"]["documents"], 12);
}

/// Issue 30 item 2 through the binary: `phigen textbooks --style prose` with the shipped prose
/// topics plus one that names Python, and a `--web` jsonl. The mock writes code only for prompts
/// that mention Python (`src/teacher/mock.rs`), so that topic's sections carry a code block and
/// the others are plain prose: all are kept, each record keeps its topic path and the id of the
/// web snippet its prompt quoted, and `--web` without `--style prose` is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prose_textbooks_keep_prose_and_code_sections_with_topic_path_and_snippet_id() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let topics = dir.path().join("topics.txt");
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/seeds/prose-topics.txt"
    ))
    .unwrap();
    std::fs::write(
        &topics,
        format!("{shipped}\ncomputers > counting with Python\n"),
    )
    .unwrap();
    let web = dir.path().join("web.jsonl");
    std::fs::write(
        &web,
        "{\"id\": \"w1\", \"text\": \"Clouds form when warm air rises and cools.\"}\n\
         {\"id\": \"w2\", \"text\": \"A good breakfast gives children energy for school.\"}\n",
    )
    .unwrap();
    let out = dir.path().join("prose");
    let (topics, web) = (topics.to_str().unwrap(), web.to_str().unwrap());
    let flags = [
        "--topics",
        topics,
        "--style",
        "prose",
        "--web",
        web,
        "--max-attempts",
        "8",
    ];
    let o = run(generate_cmd("textbooks", &server, &out, 40, &flags)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_exactly_slots(&out, 40);
    let s = stats(&out);
    assert_eq!(s["kind"], "textbook_prose");
    let with_code = s["corpus"]["sections_with_code"].as_u64().unwrap();
    assert!(with_code > 0 && with_code < 40, "{}", s["corpus"]);
    assert_eq!(s["corpus"]["sections_with_web_snippet"], 40);
    for p in std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()) {
        if !p.to_str().unwrap().ends_with(".parquet") || p.ends_with("rejects.parquet") {
            continue;
        }
        let df = table::read_columns(&p, &["topic_path", "snippet_id", "code_blocks"]).unwrap();
        let paths = table::text_column(&df, &p, "topic_path").unwrap();
        let snippets = table::text_column(&df, &p, "snippet_id").unwrap();
        let code = table::int_column(&df, &p, "code_blocks").unwrap();
        for i in 0..df.height() {
            let path = paths[i].as_deref().unwrap();
            assert!(shipped.contains(path) || path == "computers > counting with Python");
            assert_eq!(code[i].unwrap() > 0, path.contains("Python"), "{path}");
            assert!(["w1", "w2"].contains(&snippets[i].as_deref().unwrap()));
        }
    }
    let o = run(generate_cmd(
        "textbooks",
        &server,
        &dir.path().join("code"),
        1,
        &["--topics", topics, "--web", web],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--web") && stderr(&o).contains("--style prose"),
        "{}",
        stderr(&o)
    );
}

/// `--max-cost` bounds a whole `stories --instruct` run, summaries included: with a limit
/// 0.0001 USD above what the stories cost (measured by a plain `phigen stories` run of the same
/// prompts, as the mock answers them the same way), the summaries get only that remainder, less
/// than one summary request may cost (prompt of 100+ tokens and 100 output tokens at 1 USD per 1M),
/// so none is sent and the run stops on the budget without exceeding the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_cost_bounds_stories_and_summaries_together() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let price = [
        "--price-input",
        "1",
        "--price-output",
        "1",
        "--max-tokens",
        "100",
    ];
    let plain = dir.path().join("plain");
    let o = run(stories_cmd(&server, &plain, 6, &price)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let stories_cost = stats(&plain)["run"]["cost_usd"].as_f64().unwrap();
    let limit = stories_cost + 0.0001;
    let before = server.log.requests.load(Ordering::SeqCst);
    let out = dir.path().join("instruct");
    let max_cost = limit.to_string();
    let flags = [&price[..], &["--instruct", "--max-cost", &max_cost]].concat();
    let o = run(stories_cmd(&server, &out, 6, &flags)).await;
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let s = stats(&out);
    assert_eq!(s["stopped"], "budget", "{s}");
    assert!(s["run"]["cost_usd"].as_f64().unwrap() <= limit, "{s}");
    assert_eq!(
        server.log.requests.load(Ordering::SeqCst) - before,
        6,
        "the stories only"
    );
}

/// Four seed subjects for `phigen topics`, with a comment and a blank line.
const TOPIC_SEEDS: &str = "# seeds\nscience\nhistory\n\ncooking\ntheory of mind\n";

/// The topic lines of a `topics.txt` (comments left out), each split into its path.
fn topic_lines(out: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(out.join("topics.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(" > ").map(str::to_string).collect())
        .collect()
}

/// The word 2-grams of a topic, computed here independently of phigen: words are maximal runs
/// of ASCII letters and digits, `_` and non-ASCII characters, lowercased; a one-word topic is
/// its one word (the definition `--max-similarity` states).
fn bigrams(topic: &str) -> HashSet<String> {
    let words: Vec<String> = topic
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii()))
        .filter(|w| !w.is_empty())
        .map(|w| w.to_ascii_lowercase())
        .collect();
    if words.len() < 2 {
        return words.into_iter().collect();
    }
    words.windows(2).map(|w| w.join(" ")).collect()
}

/// `phigen topics` against `server` into `out`, with `extra` flags.
fn topics_cmd(
    server: &phigen::teacher::mock::MockServer,
    seeds: &Path,
    out: &Path,
    n: u64,
    extra: &[&str],
) -> Command {
    let flags = [
        &["--seeds", seeds.to_str().unwrap(), "--subtopics", "5"][..],
        &["--leaves", "8"][..],
        extra,
    ]
    .concat();
    generate_cmd("topics", server, out, n, &flags)
}

/// Issue 30 item 1 through the binary: `phigen topics` reaches `--n` topics, every one a
/// `subject > subtopic > leaf` line under a seed subject, every seed subject covered; no two kept
/// leaves are near duplicates at the default threshold 0.5, checked here by the exact Jaccard of
/// their word 2-grams (computed in this test, not by phigen's filter); the mock writes every
/// fourth item as the one before plus "basics" (`src/teacher/mock.rs`: Jaccard 2/3), so
/// near duplicates were met and removed, as stats.json says. `textbooks --topics` reads the file
/// in both styles and its prompts are about the leaf, with the path above it as context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_reach_n_without_near_duplicates_and_textbooks_read_them() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let seeds = dir.path().join("seeds.txt");
    std::fs::write(&seeds, TOPIC_SEEDS).unwrap();
    let out = dir.path().join("topics");
    let o = run(topics_cmd(
        &server,
        &seeds,
        &out,
        150,
        &["--concurrency", "4"],
    ))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = topic_lines(&out);
    assert_eq!(lines.len(), 150);
    let subjects = ["science", "history", "cooking", "theory of mind"];
    for l in &lines {
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(subjects.contains(&l[0].as_str()), "{l:?}");
    }
    let grams: Vec<HashSet<String>> = lines.iter().map(|l| bigrams(&l[2])).collect();
    for i in 0..grams.len() {
        for j in 0..i {
            let common = grams[i].intersection(&grams[j]).count();
            let union = grams[i].union(&grams[j]).count();
            assert!(
                (common as f64) < 0.5 * union as f64,
                "near duplicates kept: {:?} and {:?}",
                lines[i][2],
                lines[j][2]
            );
        }
    }
    let s = stats(&out);
    assert_eq!(
        (s["kind"].as_str(), s["records"].as_u64()),
        (Some("topics"), Some(150))
    );
    assert_eq!(s["complete"], true, "{s}");
    let c = &s["corpus"];
    assert_eq!(c["near_duplicates"]["max_similarity"], 0.5);
    let removed = c["near_duplicates"]["removed"].as_u64().unwrap();
    let share = c["near_duplicates"]["share_removed"].as_f64().unwrap();
    assert!(removed > 0 && share > 0.0 && share < 1.0, "{c}");
    let per_subject = c["per_subject"].as_object().unwrap();
    assert_eq!(per_subject.len(), 4);
    assert!(per_subject.values().all(|v| v.as_u64().unwrap() > 0), "{c}");
    let total: u64 = per_subject.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 150);
    let records: Vec<serde_json::Value> = std::fs::read_to_string(out.join("topics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 150);
    let ids: HashSet<&str> = records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 150);
    assert_eq!(records[0]["path"], lines[0].join(" > "));

    let topics = out.join("topics.txt");
    for style in ["code", "prose"] {
        let books = dir.path().join(format!("books-{style}"));
        let flags = ["--topics", topics.to_str().unwrap(), "--style", style];
        let o = run(generate_cmd("textbooks", &server, &books, 4, &flags)).await;
        assert!(o.status.success(), "{style}: {}", stderr(&o));
        let records = shard_records(&books);
        assert_eq!(records.len(), 4);
        for (_, _, prompt) in records {
            let line = lines.iter().find(|l| {
                prompt.contains(&format!("about {} (part of {} > {})", l[2], l[0], l[1]))
            });
            assert!(line.is_some(), "{style}: {prompt}");
        }
    }
}

/// A `phigen topics` killed with SIGKILL in the middle and run again writes the same list, byte
/// for byte, as one uninterrupted run — with another `--concurrency` too, since every level is a
/// function of the records of the level before, read in slot order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_killed_mid_run_then_rerun_give_the_list_of_an_uninterrupted_run() {
    let server = mock(Faults {
        latency_ms: 40,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let seeds = dir.path().join("seeds.txt");
    std::fs::write(&seeds, TOPIC_SEEDS).unwrap();
    let whole = dir.path().join("whole");
    let o = run(topics_cmd(
        &server,
        &seeds,
        &whole,
        150,
        &["--concurrency", "1"],
    ))
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let requests = server.log.answered.load(Ordering::SeqCst);
    assert!(requests >= 20, "{requests} requests");

    let killed = dir.path().join("killed");
    let flags = ["--concurrency", "3"];
    let before = server.log.answered.load(Ordering::SeqCst);
    let mut child = topics_cmd(&server, &seeds, &killed, 150, &flags)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Past the subtopics level (8 requests), in the middle of the leaves.
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.log.answered.load(Ordering::SeqCst) < before + 14 {
        assert!(Instant::now() < deadline, "the first run made no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("topics.txt").exists(), "killed before the end");
    let o = run(topics_cmd(&server, &seeds, &killed, 150, &flags)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    for file in ["topics.txt", "topics.jsonl"] {
        assert_eq!(
            std::fs::read_to_string(killed.join(file)).unwrap(),
            std::fs::read_to_string(whole.join(file)).unwrap(),
            "{file}"
        );
    }
    assert_eq!(
        stats(&killed)["corpus"]["per_subject"],
        stats(&whole)["corpus"]["per_subject"]
    );
}

/// Bad input is refused before anything is sent, naming the file or flag: a seed file with no
/// subjects, `--n 0`, a non-finite or out-of-range `--max-similarity`, and `--shard`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_refuse_bad_input_by_name() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "# only a comment\n\n").unwrap();
    let seeds = dir.path().join("seeds.txt");
    std::fs::write(&seeds, TOPIC_SEEDS).unwrap();
    let out = dir.path().join("topics");
    let o = run(topics_cmd(&server, &empty, &out, 10, &[])).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("empty.txt") && stderr(&o).contains("no entries"),
        "{}",
        stderr(&o)
    );
    let o = run(topics_cmd(&server, &seeds, &out, 0, &[])).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--n"), "{}", stderr(&o));
    for bad in ["nan", "inf", "0", "1.5"] {
        let o = run(topics_cmd(
            &server,
            &seeds,
            &out,
            10,
            &["--max-similarity", bad],
        ))
        .await;
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
        assert!(stderr(&o).contains("--max-similarity"), "{}", stderr(&o));
    }
    let o = run(topics_cmd(&server, &seeds, &out, 10, &["--shard", "0/2"])).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--shard"), "{}", stderr(&o));
    assert_eq!(
        server.log.requests.load(Ordering::SeqCst),
        0,
        "nothing was sent"
    );
}

/// Issue 30 in a whole-run recipe: a `kind = "topics"` step, then a textbooks step that reads its
/// list with `from = ["topics"]`; the textbooks step's prompts are about the topics step's leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipe_runs_topics_then_textbooks_reading_its_list() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let seeds = dir.path().join("seeds.txt");
    std::fs::write(&seeds, TOPIC_SEEDS).unwrap();
    let recipe = dir.path().join("topics.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"name = "topics-demo"
seed = 0

[teacher]
teacher = "http"
base_url = "{}"
model = "mock"
price_input = 1.0
price_output = 2.0
max_cost = 100.0

[[data]]
name = "topics"
kind = "topics"
n = 40
seeds = "{}"
subtopics = 5
leaves = 8

[[data]]
name = "books"
kind = "textbooks"
from = ["topics"]
style = "prose"
n = 6

[[data]]
name = "tok"
kind = "tokenize"
from = ["books"]

[model]
preset = "tiny-phi"
vocab_size = 50304

[[stage]]
name = "pretrain"
data = [{{ step = "tok" }}]
seq_len = 32
micro_batch = 2
steps = 2
lr = 1e-3
"#,
            server.base_url(),
            seeds.display()
        ),
    )
    .unwrap();
    let out = dir.path().join("run");
    let mut c = Command::new(BIN);
    c.args(["--quiet", "train", "--recipe", recipe.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap(), "--until", "books"])
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("PHIGEN_TEACHER")
        .env_remove("PHIGEN_MODEL");
    let o = run(c).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let step_dir = |step: &str| {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("steps").join(format!("{step}.json"))).unwrap(),
        )
        .unwrap();
        std::path::PathBuf::from(m["dir"].as_str().unwrap())
    };
    let lines = topic_lines(&step_dir("topics"));
    assert_eq!(lines.len(), 40);
    let records = shard_records(&step_dir("books"));
    assert_eq!(records.len(), 6);
    for (_, _, prompt) in records {
        assert!(
            lines
                .iter()
                .any(|l| prompt.contains(&format!("about {} (part of {} > {})", l[2], l[0], l[1]))),
            "{prompt}"
        );
    }
}

/// `phigen prefs` (a tiny random student, the mock judge) killed with SIGKILL while the judge
/// answers slowly, then run again, writes the pairs of an uninterrupted run byte for byte and
/// sends at most the one judge request in flight at the kill twice: the samples journal and the
/// judging engine's journal resume. The samples are drawn from per-sample seeds, so both runs
/// judge the same responses; the mock's verdicts are a function of the prompt. `--input` then
/// imports those pairs again, all of them valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefs_killed_while_judging_resumes_to_the_same_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("tiny");
    let o = Command::new(BIN)
        .args(["init", "--preset", "tiny-phi", "--tokenizer", "gpt2"])
        .args(["--out", ckpt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let prompts = dir.path().join("prompts.txt");
    let lines: Vec<String> = (0..8)
        .map(|i| format!("Name a toy, please ({i})."))
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let cmd = |server: &phigen::teacher::mock::MockServer, out: &Path| {
        let mut c = Command::new(BIN);
        c.args(["--quiet", "prefs", "--teacher", "http", "--model", "mock"])
            .args(["--base-url", &server.base_url(), "--concurrency", "1"])
            .args(["--prompts", prompts.to_str().unwrap()])
            .args(["--student", ckpt.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap(), "--max-new-tokens", "8"])
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("PHIGEN_MODEL");
        c
    };
    let fast = mock(Faults::default()).await;
    let clean = dir.path().join("clean");
    let o = run(cmd(&fast, &clean)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let expected = std::fs::read_to_string(clean.join("pairs.jsonl")).unwrap();
    assert!(expected.lines().count() >= 4, "{expected}");

    let slow = mock(Faults {
        latency_ms: 300,
        ..Faults::default()
    })
    .await;
    let out = dir.path().join("killed");
    let mut child = cmd(&slow, &out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while slow.log.answered.load(Ordering::SeqCst) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the judge was never asked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!out.join("pairs.jsonl").exists(), "killed before the end");
    let o = run(cmd(&slow, &out)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("pairs.jsonl")).unwrap(),
        expected
    );
    let per_prompt = slow.log.per_prompt.lock().unwrap().clone();
    assert_eq!(per_prompt.len(), fast.log.per_prompt.lock().unwrap().len());
    let twice = per_prompt.values().filter(|&&n| n > 1).count();
    assert!(twice <= 1, "{twice} judge prompts were sent again");

    let imported = dir.path().join("imported");
    let o = Command::new(BIN)
        .args([
            "--quiet",
            "prefs",
            "--input",
            clean.join("pairs.jsonl").to_str().unwrap(),
        ])
        .args(["--out", imported.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(imported.join("prefs.json")).unwrap()).unwrap();
    assert_eq!(
        stats["pairs"].as_u64(),
        Some(expected.lines().count() as u64)
    );
    assert_eq!(stats["dropped"], serde_json::json!({}));
}

/// Issue 31 item 2 through the binary: `phigen chat-data --n 20` against the mock (whose
/// conversations are well formed, sometimes with a Python block, and broken Python with
/// `--rate-bad-code`): 20 records, every one `messages` in OpenAI form with exactly the drawn
/// number of exchanges; a broken code block is a `syntax_error` drop; the output re-imports as it
/// is with `--input` (the Parquet `messages` column read back the way an SFT stage reads it); and
/// a run with --concurrency 1 keeps the same conversations (each is a function of its slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_data_writes_valid_messages_that_reimport_and_sft_reads() {
    let faulty = mock(Faults {
        rate_bad_code: 0.3,
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("chat");
    let args = [
        "--concurrency",
        "6",
        "--max-attempts",
        "10",
        "--max-turns",
        "3",
    ];
    let o = run(generate_cmd("chat-data", &faulty, &out, 20, &args)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stats(&out);
    assert_eq!(
        (s["kind"].as_str(), s["records"].as_u64()),
        (Some("chat"), Some(20))
    );
    assert!(
        s["run"]["dropped"]["syntax_error"].as_u64().unwrap_or(0) > 0,
        "{}",
        s["run"]
    );
    // Every record: messages alternate from the user to the assistant, and the user speaks
    // `turns` times (the drawn exchanges, 1..=3).
    let mut turns_seen = HashSet::new();
    let mut parts: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("part-")
        })
        .collect();
    parts.sort();
    let mut texts = Vec::new();
    for p in &parts {
        let df = table::read_frame(p, None).unwrap();
        let turns = table::int_column(&df, p, "turns").unwrap();
        texts.extend(table::text_column(&df, p, "text").unwrap());
        let messages = df.column("messages").unwrap().list().unwrap().clone();
        for (row, m) in messages.series_iter().enumerate() {
            let m = m.unwrap();
            let m = m.struct_().unwrap();
            let (roles, contents) = (
                m.field_by_name("role").unwrap(),
                m.field_by_name("content").unwrap(),
            );
            let roles: Vec<String> = roles
                .str()
                .unwrap()
                .iter()
                .map(|r| r.unwrap().to_string())
                .collect();
            let contents = contents.str().unwrap();
            assert!(contents.iter().all(|c| !c.unwrap().trim().is_empty()));
            let t = turns[row].unwrap() as usize;
            turns_seen.insert(t);
            let expected: Vec<&str> = (0..t).flat_map(|_| ["user", "assistant"]).collect();
            assert_eq!(roles, expected);
        }
    }
    assert!(
        turns_seen.len() >= 2,
        "single and multi-turn: {turns_seen:?}"
    );
    assert!(s["corpus"]["conversations_with_code"].as_u64().unwrap() > 0);
    // The output re-imports as it is: all 20 kept.
    let again = dir.path().join("again");
    let mut c = Command::new(BIN);
    c.args(["--quiet", "chat-data", "--input", out.to_str().unwrap()])
        .args(["--out", again.to_str().unwrap()]);
    let o = run(c).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let imported = stats(&again);
    assert_eq!(
        (imported["rows"].as_u64(), imported["records"].as_u64()),
        (Some(20), Some(20))
    );
    // Concurrency 1 against a fault-free mock, twice as many workers: the same conversations.
    let clean = |out: std::path::PathBuf, concurrency: &'static str| async move {
        let server = mock(Faults::default()).await;
        let o = run(generate_cmd(
            "chat-data",
            &server,
            &out,
            12,
            &["--concurrency", concurrency],
        ))
        .await;
        assert!(o.status.success(), "{}", stderr(&o));
        let mut r: Vec<(String, i64, String)> = shard_records(&out);
        r.sort();
        r
    };
    let one = clean(dir.path().join("c1"), "1").await;
    let eight = clean(dir.path().join("c8"), "8").await;
    assert_eq!(one.len(), 12);
    assert_eq!(one, eight);
}

/// `phigen chat-data --input` on a jsonl file and a Parquet file with bad rows: good rows are kept
/// with their source file and row, each bad one is counted by reason and its detail names the file
/// and line (jsonl) or row (Parquet). The second Parquet file is the Hugging Face-style fixture
/// (written by pyarrow, tests/fixtures/dpo/make_parquet.py): its two conversations are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_data_imports_jsonl_and_parquet_dropping_bad_rows_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("mixed.jsonl");
    let conv = |q: &str, a: &str| serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]});
    let lines = [
        conv("Name three primary colours.", "Red, yellow and blue.").to_string(),
        "this is not json".to_string(),
        conv("Say hi", "").to_string(),
        serde_json::json!({"messages": [{"role": "assistant", "content": "Hello"}]}).to_string(),
    ];
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    let parquet = dir.path().join("bad.parquet");
    let schema: table::Schema = vec![("messages", table::Kind::Messages)];
    let rows = vec![
        vec![
            serde_json::json!([{"role": "user", "content": "What is 6 times 7?"}, {"role": "assistant", "content": "6 times 7 is 42."}]),
        ],
        vec![serde_json::json!([{"role": "user", "content": "Unanswered question"}])],
        vec![serde_json::Value::Null],
        vec![
            serde_json::json!([{"role": "user", "content": "Code?"}, {"role": "assistant", "content": "```python\nprint(\n```"}]),
        ],
    ];
    table::write_parquet(&parquet, &schema, &rows).unwrap();
    let fixture = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dpo/chat.parquet"
    ));
    let out = dir.path().join("out");
    let mut c = Command::new(BIN);
    c.args(["--quiet", "chat-data", "--input"])
        .args([&jsonl, &parquet, fixture].map(|p| p.to_str().unwrap().to_string()))
        .args(["--out", out.to_str().unwrap()]);
    let o = run(c).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stats(&out);
    assert_eq!(
        (s["rows"].as_u64(), s["records"].as_u64()),
        (Some(10), Some(4))
    );
    assert_eq!(
        s["rejects_total"],
        serde_json::json!({"empty_turn": 1, "syntax_error": 1, "unparseable": 4})
    );
    let df = table::read_frame(&out.join("part-00000.parquet"), None).unwrap();
    let sources = table::text_column(&df, &out, "source_file").unwrap();
    let source_rows = table::int_column(&df, &out, "source_row").unwrap();
    assert_eq!(
        sources
            .iter()
            .zip(&source_rows)
            .map(|(f, r)| (
                Path::new(f.as_deref().unwrap())
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string(),
                r.unwrap()
            ))
            .collect::<Vec<_>>(),
        vec![
            ("mixed.jsonl".to_string(), 0),
            ("bad.parquet".into(), 0),
            ("chat.parquet".into(), 0),
            ("chat.parquet".into(), 1)
        ]
    );
    let rejects = table::read_frame(&out.join("rejects.parquet"), None).unwrap();
    let details: Vec<String> = table::text_column(&rejects, &out, "detail")
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    for expected in [
        "mixed.jsonl:2: not JSON",
        "mixed.jsonl:3: message 2 (assistant) is empty",
        "mixed.jsonl:4: message 1 is `assistant`",
        "bad.parquet: row 1: ends with message 1",
        "bad.parquet: row 2: no `messages`",
        "bad.parquet: row 3: message 2 (assistant), python block 1",
    ] {
        assert!(
            details.iter().any(|d| d.contains(expected)),
            "{expected}: {details:#?}"
        );
    }
    // A file of another kind is refused by name.
    let csv = dir.path().join("x.csv");
    std::fs::write(&csv, "a,b\n").unwrap();
    let mut c = Command::new(BIN);
    c.args(["--quiet", "chat-data", "--input", csv.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()]);
    let o = run(c).await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("x.csv") && stderr(&o).contains(".jsonl"),
        "{}",
        stderr(&o)
    );
}

/// Issue 31 item 2 in a whole-run recipe: a `kind = "chat-data"` step the mock teacher writes and
/// one that imports a jsonl file (`paths`), both read by an `objective = "sft"` stage with
/// `{ step = "NAME" }`, which trains on them (two steps of tiny-phi). A pretrain stage naming a
/// chat-data step is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipe_makes_chat_data_and_an_sft_stage_trains_on_it() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("existing.jsonl");
    let line = |q: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            .to_string()
    };
    std::fs::write(
        &existing,
        [
            line("What colour is the sky?", "The sky is blue on a clear day."),
            line("What is 2 plus 2?", "2 plus 2 is 4."),
        ]
        .join("\n"),
    )
    .unwrap();
    let recipe = |objective: &str| {
        format!(
            r#"name = "chat-demo"
seed = 0

[teacher]
teacher = "http"
base_url = "{}"
model = "mock"
price_input = 1.0
price_output = 2.0
max_cost = 100.0

[[data]]
name = "chat"
kind = "chat-data"
n = 8
max_turns = 2

[[data]]
name = "imported"
kind = "chat-data"
paths = ["{}"]

[model]
preset = "tiny-phi"
vocab_size = 50304
max_position_embeddings = 128

[[stage]]
name = "sft"
objective = "{objective}"
chat_template = "phi-3"
data = [{{ step = "chat" }}, {{ step = "imported" }}]
seq_len = 96
micro_batch = 2
steps = 2
lr = 1e-3
"#,
            server.base_url(),
            existing.display()
        )
    };
    let path = dir.path().join("chat.toml");
    let out = dir.path().join("run");
    let train = |path: &Path| {
        let mut c = Command::new(BIN);
        c.args(["--quiet", "train", "--recipe", path.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("PHIGEN_TEACHER")
            .env_remove("PHIGEN_MODEL");
        c
    };
    std::fs::write(&path, recipe("sft")).unwrap();
    let o = run(train(&path)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let manifest = |step: &str| -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(out.join("steps").join(format!("{step}.json"))).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(
        manifest("chat")["summary"]["records"],
        8,
        "{}",
        manifest("chat")
    );
    assert_eq!(manifest("imported")["summary"]["records"], 2);
    let train_dir = std::path::PathBuf::from(manifest("train")["dir"].as_str().unwrap());
    assert!(train_dir.join("sft").is_dir(), "{}", train_dir.display());
    // A pretrain stage reads token shards, not conversations.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        recipe("pretrain").replace("chat_template = \"phi-3\"\n", ""),
    )
    .unwrap();
    let o = run(train(&bad)).await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("chat-data step") && stderr(&o).contains("objective = \"sft\""),
        "{}",
        stderr(&o)
    );
}

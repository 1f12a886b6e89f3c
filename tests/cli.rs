//! The command line through the binary: flag values outside their documented ranges are usage
//! errors before any work (issue 23).

mod common;
use common::{phigen_in, stderr};

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
            stories(&["--min-tokens=-1"]),
            "--min-tokens",
            "-1",
            "must be an integer in [0, 10000000]",
        ),
        (
            stories(&["--min-tokens", "1.5"]),
            "--min-tokens",
            "1.5",
            "must be an integer in [0, 10000000]",
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

/// `--min-tokens` above the output limit is refused before any request (the base URL is a closed
/// port), naming the flag, the value and the limit: `--max-tokens` when given, else the corpus's
/// default (1024 for stories). Equal to the limit is allowed (then checked no further here: the
/// run fails on the closed port, not on the flag).
#[test]
fn min_tokens_above_the_output_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stories = |flags: &[&str]| {
        let mut a = vec![
            "stories",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
        ];
        a.extend_from_slice(flags);
        a.extend_from_slice(&["--n", "1", "--retries", "0", "--timeout", "2"]);
        phigen_in(dir.path(), &a)
    };
    for (flags, expected) in [
        (
            &["--min-tokens", "20", "--max-tokens", "10"][..],
            "--min-tokens 20: must be at most the output limit, 10 (--max-tokens)",
        ),
        (
            &["--min-tokens", "1025"][..],
            "--min-tokens 1025: must be at most the output limit, 1024 (this corpus's default --max-tokens)",
        ),
    ] {
        let o = stories(flags);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{flags:?}: {err}");
        assert!(err.contains(expected), "{flags:?}: {err}");
    }
    let o = stories(&["--min-tokens", "1024"]);
    assert!(!stderr(&o).contains("--min-tokens"), "{}", stderr(&o));
}

/// `phigen tokenize --tokenizer` through the binary (issue 31): an unknown name is a usage error
/// listing the encodings and saying a path is accepted; a checkpoint directory holding the
/// Llama-style tokenizer.json of tests/fixtures/tokenizers tokenizes, `shards inspect` names the
/// file and its eos `</s>` (id 2, from its tokenizer_config.json), and `shards decode` gives the
/// text back with the `</s>` that ends each document.
#[test]
fn tokenize_with_a_hugging_face_tokenizer_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"id\": \"a\", \"text\": \"Once upon a time <|user|> 猫\"}\n",
    )
    .unwrap();
    let args = |tokenizer: &'static str| {
        vec![
            "tokenize",
            "--input",
            "docs.jsonl",
            "--out",
            "tok",
            "--val-fraction",
            "0",
            "--tokenizer",
            tokenizer,
        ]
    };
    let o = phigen_in(dir.path(), &args("gpt-5"));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("gpt2, p50k_base, cl100k_base, o200k_base") && err.contains("tokenizer.json"),
        "{err}"
    );
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tokenizers/llama_style"
    );
    let o = phigen_in(dir.path(), &args(fixture));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = phigen_in(dir.path(), &["shards", "inspect", "tok"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains("llama_style/tokenizer.json") && out.contains("end-of-text 2"),
        "{out}"
    );
    let o = phigen_in(dir.path(), &["shards", "decode", "tok", "--len", "100"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(
        out.trim_end(),
        "Once upon a time <|user|> 猫</s>",
        "{}",
        stderr(&o)
    );
}

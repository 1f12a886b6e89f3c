use std::collections::BTreeSet;
use std::io::Write;

use super::decontaminate::{self, DecontaminateOptions, Mode};
use super::minhash::{Normalize, Params, Shingles};
use super::*;
use crate::artifact::outdir::DirLock;
use serde_json::json;

fn write_jsonl(path: &Path, docs: &[(String, String)]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let text: String = docs
        .iter()
        .map(|(id, t)| json!({"id": id, "text": t}).to_string() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

fn options(inputs: Vec<PathBuf>, out: PathBuf) -> DedupOptions {
    DedupOptions {
        inputs,
        out,
        params: Params::default(),
        exact: Normalize {
            whitespace: true,
            case: true,
        },
        verify_jaccard: None,
        index: None,
        stage: None,
        shard: None,
        follow_symlinks: false,
        keep: Keep::First,
    }
}

fn done(opts: &DedupOptions) -> Stats {
    match run(opts, &|_| ()).unwrap() {
        Outcome::Done(s) => s,
        _ => panic!("expected a finished run"),
    }
}

/// (removed id → kept id) of a finished run, read from its rejects file.
fn removed(out: &Path) -> BTreeMap<String, String> {
    let path = out.join(REMOVED_FILE);
    let df = table::read_columns(&path, &["id", "kept_id"]).unwrap();
    let ids = table::text_column(&df, &path, "id").unwrap();
    let kept = table::text_column(&df, &path, "kept_id").unwrap();
    ids.into_iter()
        .zip(kept)
        .map(|(id, kept)| (id.unwrap(), kept.unwrap()))
        .collect()
}

use std::collections::BTreeMap;

/// Pairs of planted documents with known Jaccard J are caught at the rate LSH theory gives,
/// 1 − (1 − J^rows)^bands (computed here from the settings, not by the code under test). Each
/// document is 100 distinct one-word shingles; the pair shares k of them, so J = k / (200 − k).
#[test]
fn planted_pairs_follow_the_s_curve() {
    let dir = tempfile::tempdir().unwrap();
    let pairs_per_level = 250;
    let levels = [50usize, 64, 75, 82, 90]; // k shared of 100 → J = 0.333, 0.471, 0.6, 0.695, 0.818
    let mut docs = Vec::new();
    for (l, &k) in levels.iter().enumerate() {
        for p in 0..pairs_per_level {
            let word = |i: usize| format!("l{l}p{p}w{i}");
            let a: Vec<String> = (0..100).map(word).collect();
            let b: Vec<String> = (0..100)
                .map(|i| if i < k { word(i) } else { word(100 + i) })
                .collect();
            docs.push((format!("l{l}p{p}a"), a.join(" ")));
            docs.push((format!("l{l}p{p}b"), b.join(" ")));
        }
    }
    write_jsonl(&dir.path().join("in/docs.jsonl"), &docs);
    let mut opts = options(vec![dir.path().join("in")], dir.path().join("out"));
    opts.params.shingles = Shingles::Words(1);
    done(&opts);
    let removed = removed(&opts.out);
    for (l, &k) in levels.iter().enumerate() {
        let j = k as f64 / (200 - k) as f64;
        let p = 1.0 - (1.0 - j.powi(8)).powi(14);
        let caught = (0..pairs_per_level)
            .filter(|p| removed.get(&format!("l{l}p{p}b")) == Some(&format!("l{l}p{p}a")))
            .count();
        let rate = caught as f64 / pairs_per_level as f64;
        let sigma = (p * (1.0 - p) / pairs_per_level as f64).sqrt();
        assert!(
            (rate - p).abs() <= 4.0 * sigma + 0.01,
            "J = {j:.3}: caught {rate:.3}, theory {p:.3} ± {sigma:.3}"
        );
    }
    assert!(
        removed.keys().all(|id| id.ends_with('b')),
        "the first of each pair is the one kept"
    );
}

fn story(seed: usize, variant: usize) -> String {
    use rand::{Rng, SeedableRng};
    let words = [
        "the", "cat", "sat", "on", "a", "warm", "mat", "and", "dreamed", "of", "fish", "under",
        "blue", "sky",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed as u64);
    let mut out: Vec<String> = (0..120)
        .map(|_| {
            format!(
                "{}{}",
                words[rng.random_range(0..words.len())],
                rng.random_range(0..1000)
            )
        })
        .collect();
    if variant > 0 {
        out[10 + variant] = format!("changed{variant}");
    }
    out.join(" ")
}

/// A corpus of unique stories, near copies (one word changed) and exact copies in two files.
fn messy_corpus(dir: &Path) -> Vec<PathBuf> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for s in 0..60 {
        a.push((format!("s{s}"), story(s, 0)));
        if s % 3 == 0 {
            b.push((format!("s{s}-near"), story(s, 1)));
        }
        if s % 5 == 0 {
            b.push((format!("s{s}-copy"), story(s, 0).to_uppercase()));
        }
    }
    write_jsonl(&dir.join("a/part.jsonl"), &a);
    write_jsonl(&dir.join("b/part.jsonl"), &b);
    vec![dir.join("b"), dir.join("a")]
}

/// The same documents are removed for the same representatives whatever the thread count, the
/// order of --input, or whether signatures were computed in --shard slices.
#[test]
fn result_is_independent_of_threads_order_and_slicing() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = messy_corpus(dir.path());
    let mut results = Vec::new();
    for (threads, reverse, slices) in [(1, false, 0), (3, true, 0), (2, false, 2)] {
        let out = dir.path().join(format!("out-{threads}-{reverse}-{slices}"));
        let mut ins = inputs.clone();
        if reverse {
            ins.reverse();
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut opts = options(ins, out.clone());
            for k in 0..slices {
                opts.shard = Some(Task { k, n: slices });
                assert!(matches!(run(&opts, &|_| ()).unwrap(), Outcome::Task(_)));
            }
            opts.shard = None;
            done(&opts);
        });
        let kept_b = std::fs::read_to_string(out.join("b/part.jsonl")).unwrap();
        results.push((removed(&out), kept_b));
    }
    // Files sort as a/ before b/: every copy in b/ is removed in favour of its original in a/.
    let expected: BTreeMap<String, String> = (0..60)
        .flat_map(|s| {
            let near = (s % 3 == 0).then(|| (format!("s{s}-near"), format!("s{s}")));
            let copy = (s % 5 == 0).then(|| (format!("s{s}-copy"), format!("s{s}")));
            near.into_iter().chain(copy)
        })
        .collect();
    assert_eq!(results[0].0, expected);
    assert!(results.iter().all(|r| r == &results[0]));
    assert_eq!(results[0].1, "", "b/ holds only copies");
}

/// Exact duplicates are found through the configured normalisation; a second run of the same
/// inputs is recognised as done.
#[test]
fn exact_duplicates_and_reruns() {
    let dir = tempfile::tempdir().unwrap();
    let docs = vec![
        ("x".to_string(), "Hello  World".to_string()),
        ("y".to_string(), "hello world".to_string()),
    ];
    write_jsonl(&dir.path().join("in/d.jsonl"), &docs);
    let opts = options(vec![dir.path().join("in")], dir.path().join("out"));
    let stats = done(&opts);
    assert_eq!(
        (stats.removed_exact, stats.removed_near, stats.kept),
        (1, 0, 1)
    );
    assert!(matches!(run(&opts, &|_| ()).unwrap(), Outcome::UpToDate(_)));
    let mut raw = options(vec![dir.path().join("in")], dir.path().join("out-raw"));
    raw.exact = Normalize::default();
    let stats = done(&raw);
    assert_eq!(
        (stats.removed_exact, stats.removed_near),
        (0, 1),
        "same shingles, different bytes"
    );
}

/// --verify-jaccard rejects candidates below the threshold and records exact similarities.
#[test]
fn verification_uses_true_jaccard() {
    let dir = tempfile::tempdir().unwrap();
    let base: Vec<String> = (0..100).map(|i| format!("w{i}")).collect();
    let with = |k: usize| -> String {
        (0..100)
            .map(|i| {
                if i < k {
                    base[i].clone()
                } else {
                    format!("v{k}x{i}")
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    // J(base, k shared) = k / (200 - k): 90 → 0.818, 70 → 0.538.
    let docs = vec![
        ("a".into(), with(100)),
        ("b".into(), with(90)),
        ("c".into(), with(70)),
    ];
    write_jsonl(&dir.path().join("in/d.jsonl"), &docs);
    let mut opts = options(vec![dir.path().join("in")], dir.path().join("out"));
    opts.params = Params {
        shingles: Shingles::Words(1),
        bands: 40,
        rows: 1,
        seed: 3,
    };
    opts.verify_jaccard = Some(0.75);
    let stats = done(&opts);
    assert_eq!(
        removed(&opts.out).into_iter().collect::<Vec<_>>(),
        [("b".to_string(), "a".to_string())]
    );
    assert!(
        stats.rejected_by_verify > 0,
        "c was a candidate (40 one-row bands) and was rejected"
    );
    let path = opts.out.join(REMOVED_FILE);
    let df = table::read_columns(&path, &["exact_similarity"]).unwrap();
    let sim = df
        .column("exact_similarity")
        .unwrap()
        .f64()
        .unwrap()
        .get(0)
        .unwrap();
    assert!((sim - 90.0 / 110.0).abs() < 1e-9, "{sim}");
}

/// A later run with the same --index removes documents that duplicate earlier runs' kept ones.
#[test]
fn index_carries_over_between_runs() {
    let dir = tempfile::tempdir().unwrap();
    write_jsonl(
        &dir.path().join("one/d.jsonl"),
        &[("old".into(), story(1, 0)), ("other".into(), story(2, 0))],
    );
    write_jsonl(
        &dir.path().join("two/d.jsonl"),
        &[
            ("new".into(), story(1, 2)),
            ("fresh".into(), story(3, 0)),
            ("fresh2".into(), story(3, 0)),
        ],
    );
    let index = dir.path().join("index");
    let mut first = options(vec![dir.path().join("one")], dir.path().join("out1"));
    first.index = Some(index.clone());
    assert_eq!(done(&first).index_generation, Some(1));
    let mut second = options(vec![dir.path().join("two")], dir.path().join("out2"));
    second.index = Some(index.clone());
    let stats = done(&second);
    assert_eq!((stats.index_documents, stats.removed_by_index), (2, 1));
    let expected = BTreeMap::from([
        ("new".to_string(), "old".to_string()),
        ("fresh2".to_string(), "fresh".to_string()),
    ]);
    assert_eq!(removed(&second.out), expected);
    let meta: TableMeta = read_json(&index.join("index.json")).unwrap();
    assert_eq!((meta.generation, meta.docs), (2, 3));
    assert!(
        !index.join("index-1.bin").exists(),
        "older generations are removed"
    );
    let mut other = options(vec![dir.path().join("two")], dir.path().join("out3"));
    other.index = Some(index);
    other.params.bands = 7;
    assert!(run(&other, &|_| ())
        .unwrap_err()
        .to_string()
        .contains("other MinHash settings"));
}

/// The case `dedup --input P/corpus --out P` rewrote the input in place: an --out equal
/// to, inside or above an input is refused before anything is written, and the input is unchanged.
#[test]
fn output_inside_equal_to_or_above_the_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("p/corpus");
    let docs = [("a".into(), "text".into()), ("b".into(), "text".into())];
    write_jsonl(&corpus.join("d.jsonl"), &docs);
    let before = std::fs::read(corpus.join("d.jsonl")).unwrap();
    for (out, relation) in [
        (corpus.join("out"), "inside --input"),
        (corpus.clone(), "the same directory as --input"),
        (dir.path().join("p"), "above (a parent of) --input"),
    ] {
        let err = run(&options(vec![corpus.clone()], out.clone()), &|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(relation), "{err}");
        assert!(
            !out.join(".phigen.lock").exists(),
            "nothing written in {out:?}"
        );
        // Decontaminate shares the check (it comes before the benchmark is read).
        let decon = DecontaminateOptions {
            inputs: vec![corpus.clone()],
            out,
            benchmarks: vec![dir.path().join("unread.jsonl")],
            ngram: 13,
            identifier_ngram: None,
            identifier_share: 0.8,
            mode: Mode::Drop,
            follow_symlinks: false,
            task: None,
        };
        let err = decontaminate::run(&decon, &|_| ()).unwrap_err().to_string();
        assert!(err.contains(relation), "{err}");
    }
    assert_eq!(std::fs::read(corpus.join("d.jsonl")).unwrap(), before);
    let names: BTreeSet<String> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, BTreeSet::from(["d.jsonl".to_string()]));
}

/// A second run on a directory another run holds fails at once, naming that run's PID (here this
/// process's, which holds the lock); a file in --out that phigen did not write is never replaced.
#[test]
fn a_held_directory_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_jsonl(
        &dir.path().join("in/d.jsonl"),
        &[("a".into(), "text".into())],
    );
    let out = dir.path().join("out");
    let opts = options(vec![dir.path().join("in")], out.clone());
    let held = DirLock::exclusive(&out).unwrap();
    let err = run(&opts, &|_| ()).unwrap_err().to_string();
    assert!(
        err.contains(&format!("pid {}", std::process::id())) && err.contains("another phigen run"),
        "{err}"
    );
    drop(held);
    std::fs::create_dir_all(out.join("in")).unwrap();
    std::fs::write(out.join("in/d.jsonl"), "theirs").unwrap();
    let err = run(&opts, &|_| ()).unwrap_err().to_string();
    assert!(err.contains("not written by phigen"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("in/d.jsonl")).unwrap(),
        "theirs"
    );
    std::fs::remove_file(out.join("in/d.jsonl")).unwrap();
    done(&opts);
    // Its own outputs it may rewrite: a changed input is deduplicated again into the same --out.
    write_jsonl(
        &dir.path().join("in/d.jsonl"),
        &[("a".into(), "text".into()), ("b".into(), "other".into())],
    );
    assert_eq!(done(&opts).kept, 2);
}

fn humaneval_file(dir: &Path) -> PathBuf {
    // Three problems in the HumanEval layout, written for this test.
    let tasks = [
        ("Test/0", "def running_max(numbers):\n    \"\"\" Return the list of maxima of every prefix of numbers.\n    >>> running_max([1, 3, 2])\n    [1, 3, 3]\n    \"\"\"\n",
         "    result = []\n    best = None\n    for value in numbers:\n        if best is None or value > best:\n            best = value\n        result.append(best)\n    return result\n"),
        ("Test/1", "def count_vowels(word):\n    \"\"\" Count the vowels a, e, i, o, u in a lowercase word.\n    >>> count_vowels('banana')\n    3\n    \"\"\"\n",
         "    total = 0\n    for letter in word:\n        if letter in 'aeiou':\n            total += 1\n    return total\n"),
        ("Test/2", "def pairwise_sums(xs, ys):\n    \"\"\" Sum two lists element by element.\n    >>> pairwise_sums([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7])\n    [2, 4, 6, 8, 10, 12, 14]\n    \"\"\"\n",
         "    return [x + y for x, y in zip(xs, ys)]\n"),
    ];
    let path = dir.join("HumanEval.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::default(),
    );
    for (id, prompt, solution) in tasks {
        let line = json!({"task_id": id, "prompt": prompt, "canonical_solution": solution, "test": "", "entry_point": ""});
        writeln!(gz, "{line}").unwrap();
    }
    gz.finish().unwrap();
    path
}

/// Verbatim, re-indented and identifier-renamed copies of a solution are caught; unrelated code
/// is not, even where it shares a 14-token list literal with a problem's docstring.
#[test]
fn decontamination_catches_copies_and_spares_unrelated_code() {
    let dir = tempfile::tempdir().unwrap();
    let bench = humaneval_file(dir.path());
    let verbatim = "Here is a neat trick.\n\ndef running_max(numbers):\n    result = []\n    best = None\n    for value in numbers:\n        if best is None or value > best:\n            best = value\n        result.append(best)\n    return result\n";
    let reindented = "def running_max(numbers):\n  result = []\n  best = None\n  for value in numbers:\n    if best is None or value > best: best = value\n    result.append(best)\n  return result";
    let renamed = "def prefix_peaks(seq):\n    out = []\n    top = None\n    for item in seq:\n        if top is None or item > top:\n            top = item\n        out.append(top)\n    return out\n";
    let unrelated = "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n    return total / len(values)\n\nprint(mean([1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7]))\n";
    let docs: Vec<(String, String)> = [
        ("verbatim", verbatim),
        ("reindented", reindented),
        ("renamed", renamed),
        ("unrelated", unrelated),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    write_jsonl(&dir.path().join("in/d.jsonl"), &docs);
    let opts = DecontaminateOptions {
        inputs: vec![dir.path().join("in")],
        out: dir.path().join("out"),
        benchmarks: vec![bench],
        ngram: 13,
        identifier_ngram: Some(10),
        identifier_share: 0.8,
        mode: Mode::Drop,
        follow_symlinks: false,
        task: None,
    };
    let report = decontaminate::run(&opts, &|_| ()).unwrap();
    let path = opts.out.join(decontaminate::HITS_FILE);
    let df = table::read_columns(&path, &["id", "task_id", "check"]).unwrap();
    let rows: BTreeSet<(String, String, String)> = table::text_column(&df, &path, "id")
        .unwrap()
        .into_iter()
        .zip(table::text_column(&df, &path, "task_id").unwrap())
        .zip(table::text_column(&df, &path, "check").unwrap())
        .map(|((a, b), c)| (a.unwrap(), b.unwrap(), c.unwrap()))
        .collect();
    let expected: BTreeSet<(String, String, String)> = [
        ("verbatim", "ngram"),
        ("reindented", "ngram"),
        ("renamed", "identifiers"),
    ]
    .iter()
    .map(|(id, check)| (id.to_string(), "Test/0".to_string(), check.to_string()))
    .collect();
    assert_eq!(rows, expected);
    assert_eq!(report.contaminated_documents, 3);
    assert_eq!(
        report.benchmarks["HumanEval"].documents_per_task["Test/0"],
        3
    );
    let kept = std::fs::read_to_string(opts.out.join("in/d.jsonl")).unwrap();
    assert!(
        kept.contains("unrelated") && !kept.contains("verbatim"),
        "{kept}"
    );
    // The copy staged during the scan (not wanted: the file had hits) left nothing behind.
    let out_files: BTreeSet<String> = std::fs::read_dir(opts.out.join("in"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(out_files, BTreeSet::from(["d.jsonl".to_string()]));
}

#[test]
fn unknown_benchmark_format_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.jsonl");
    std::fs::write(&path, "{\"task_id\": 1, \"question\": \"?\"}\n").unwrap();
    let err = decontaminate::load_benchmark(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bench.jsonl")
            && err.contains("line 1")
            && err.contains("canonical_solution")
            && err.contains("question"),
        "{err}"
    );
}

/// `removed.parquet` keeps the columns (names, types, order) it had when its rows were built by
/// column name, so readers of earlier runs read new ones alike.
#[test]
fn removed_table_keeps_its_columns() {
    use crate::artifact::table::Kind;
    assert_eq!(
        Removed::COLUMNS,
        [
            ("id", Kind::Text),
            ("file", Kind::Text),
            ("row", Kind::Int),
            ("cluster", Kind::Int),
            ("kept_id", Kind::Text),
            ("reason", Kind::Text),
            ("estimated_similarity", Kind::Float),
            ("exact_similarity", Kind::Float),
        ]
    );
}

/// `--keep least-id` keeps the document with the least id whatever file and row it sits in; the
/// default keeps the first by (file, row). The pair is one exact duplicate written in two files:
/// `a.jsonl` holds id "z1", `b.jsonl` id "a1" (expected survivors by the rules as stated).
#[test]
fn keep_least_id_does_not_depend_on_where_a_document_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let text = "the same words in the same order, twice over, to be one exact duplicate pair";
    write_jsonl(
        &dir.path().join("in/a.jsonl"),
        &[("z1".into(), text.into())],
    );
    write_jsonl(
        &dir.path().join("in/b.jsonl"),
        &[("a1".into(), text.into())],
    );
    let mut first = options(vec![dir.path().join("in")], dir.path().join("first"));
    done(&first);
    let dropped: Vec<String> = removed(&first.out).into_keys().collect();
    assert_eq!(dropped, ["a1"], "the first by (file, row) is kept");
    first.out = dir.path().join("least");
    first.keep = Keep::LeastId;
    done(&first);
    let dropped: Vec<(String, String)> = removed(&first.out).into_iter().collect();
    assert_eq!(dropped, [("z1".to_string(), "a1".to_string())]);
}

/// Nine files (jsonl, one gzipped) of stories whose near copies (one word changed) and exact
/// copies sit in other files, so duplicate pairs cross every task boundary.
fn cross_file_corpus(dir: &Path) -> PathBuf {
    let root = dir.join("corpus");
    let mut files: Vec<Vec<(String, String)>> = vec![Vec::new(); 9];
    for s in 0..180 {
        files[s % 9].push((format!("s{s}"), story(s, 0)));
        if s % 4 == 0 {
            files[(s + 4) % 9].push((format!("s{s}-near"), story(s, 1 + s % 3)));
        }
        if s % 7 == 0 {
            files[(s + 2) % 9].push((format!("s{s}-copy"), story(s, 0)));
        }
    }
    for (i, docs) in files.iter().enumerate() {
        write_jsonl(&root.join(format!("part-{i}.jsonl")), docs);
    }
    // One gzipped file: its kept copy is written gzipped too.
    let plain = std::fs::read(root.join("part-8.jsonl")).unwrap();
    std::fs::remove_file(root.join("part-8.jsonl")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(root.join("part-8.jsonl.gz")).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(&plain).unwrap();
    gz.finish().unwrap();
    root
}

/// Every file below `dir` (relative path → bytes), leaving out the stage directories, the control
/// files and stats.json (its timings differ between runs).
fn output_bytes(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let skip = [
        stages::SIGNATURES,
        stages::BUCKETS,
        stages::CLUSTERS,
        stages::FILTER,
        STATS_FILE,
    ];
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(dir).unwrap().to_path_buf();
            let name = rel.to_string_lossy().to_string();
            if skip.iter().any(|s| name == *s) || name.starts_with(".phigen") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                found.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    found
}

/// Runs task k of n of `stage` (a library call, as one process of the array would).
fn stage_task(opts: &DedupOptions, stage: Stage, k: usize, n: usize) -> TaskOutcome {
    let mut opts = DedupOptions {
        inputs: opts.inputs.clone(),
        out: opts.out.clone(),
        index: None,
        ..*opts
    };
    opts.stage = Some(stage);
    opts.shard = Some(Task { k, n });
    match run(&opts, &|_| ()) {
        Ok(Outcome::Task(t)) => t,
        other => panic!("{stage} {k}/{n}: {other:?}"),
    }
}

/// The four array stages, each run as N tasks in an unusual order, write byte for byte the kept
/// files and removed.parquet of one whole run, for every task count and both --keep rules; the
/// expected bytes are the whole run's (`output_bytes`), which the other tests check for content.
/// A stage started before the previous one finished names the missing tasks; stats.json appears
/// only when the last filter task finishes, with the whole run's counts.
#[test]
fn array_stages_write_what_one_run_writes() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = cross_file_corpus(dir.path());
    for keep in [Keep::First, Keep::LeastId] {
        let mut whole = options(
            vec![corpus.clone()],
            dir.path().join(format!("whole-{keep:?}")),
        );
        whole.keep = keep;
        let expected_stats = done(&whole);
        let expected = output_bytes(&whole.out);
        assert!(expected_stats.removed_near > 20 && expected_stats.removed_exact > 20);
        assert_eq!(expected.len(), 10, "nine kept files and removed.parquet");
        for (signatures, buckets, filters) in [(1, 1, 1), (3, 2, 3), (7, 5, 7)] {
            let mut opts = options(
                vec![corpus.clone()],
                dir.path()
                    .join(format!("{keep:?}-{signatures}-{buckets}-{filters}")),
            );
            opts.keep = keep;
            for k in (0..signatures).rev().filter(|k| k % 2 == 0) {
                assert!(!stage_task(&opts, Stage::Signatures, k, signatures).skipped);
            }
            if signatures > 1 {
                let mut early = DedupOptions {
                    inputs: opts.inputs.clone(),
                    out: opts.out.clone(),
                    index: None,
                    ..opts
                };
                early.stage = Some(Stage::Buckets);
                let err = run(&early, &|_| ()).unwrap_err().to_string();
                let odd: Vec<usize> = (1..signatures).step_by(2).collect();
                let named = crate::artifact::task::id_list(&odd);
                assert!(
                    err.contains(&format!("tasks {named} of {signatures}")),
                    "{err}"
                );
            }
            for k in (0..signatures).filter(|k| k % 2 == 1) {
                stage_task(&opts, Stage::Signatures, k, signatures);
            }
            for k in (0..buckets).rev() {
                stage_task(&opts, Stage::Buckets, k, buckets);
            }
            stage_task(&opts, Stage::Clusters, 0, 1);
            for k in (0..filters).rev() {
                let t = stage_task(&opts, Stage::Filter, k, filters);
                assert_eq!(
                    t.merged.is_some(),
                    k == 0,
                    "only the last task writes stats.json"
                );
                assert_eq!(opts.out.join(STATS_FILE).exists(), k == 0);
            }
            assert_eq!(
                output_bytes(&opts.out),
                expected,
                "{signatures}/{buckets}/{filters} tasks"
            );
            let stats: Stats = read_json(&opts.out.join(STATS_FILE)).unwrap();
            let counts = |s: &Stats| {
                (
                    s.documents,
                    s.kept,
                    s.removed_exact,
                    s.removed_near,
                    s.clusters,
                    s.candidate_pairs,
                )
            };
            assert_eq!(counts(&stats), counts(&expected_stats));
            // A relaunched task skips itself; a whole run over the same inputs is up to date.
            assert!(stage_task(&opts, Stage::Buckets, 0, buckets).skipped);
            assert!(matches!(run(&opts, &|_| ()).unwrap(), Outcome::UpToDate(_)));
        }
    }
}

/// A killed task leaves at most a temp file and no marker: its relaunch (and only its) redoes the
/// work, writing over the temp file, and the result is still one run's. Files the stages did not
/// write are left alone.
#[test]
fn a_killed_task_is_redone_by_its_relaunch() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = cross_file_corpus(dir.path());
    let whole = options(vec![corpus.clone()], dir.path().join("whole"));
    done(&whole);
    let opts = options(vec![corpus], dir.path().join("array"));
    let n = 3;
    let all = |stage: Stage, n: usize| -> Vec<bool> {
        (0..n)
            .map(|k| stage_task(&opts, stage, k, n).skipped)
            .collect()
    };
    all(Stage::Signatures, n);
    // Task 1 "killed" mid-write: its marker and files gone, a torn temp file left.
    let sig = opts.out.join(stages::SIGNATURES);
    std::fs::remove_file(sig.join("completions/00001")).unwrap();
    std::fs::remove_file(sig.join("00001.bin")).unwrap();
    std::fs::write(sig.join("00001.bin.tmp"), b"torn").unwrap();
    std::fs::write(opts.out.join("notes.txt"), b"mine").unwrap();
    assert_eq!(all(Stage::Signatures, n), [true, false, true]);
    assert!(!sig.join("00001.bin.tmp").exists());
    // Relaunched as an array of 7, then of 2: the complete set of 2 is the one read (the old
    // markers of tasks 2-6 of 7 outnumber it).
    all(Stage::Signatures, 7);
    all(Stage::Signatures, 2);
    all(Stage::Buckets, 2);
    all(Stage::Clusters, 1);
    all(Stage::Filter, n);
    // Filter task 2 killed after writing a file but before its marker; stats.json not yet there.
    std::fs::remove_file(opts.out.join("filter/completions/00002")).unwrap();
    std::fs::remove_file(opts.out.join(STATS_FILE)).unwrap();
    let t = stage_task(&opts, Stage::Filter, 2, n);
    assert!(!t.skipped && t.merged.is_some());
    // The stages after signatures need one process for --verify-jaccard (and --index).
    let mut verify = options(opts.inputs.clone(), opts.out.clone());
    verify.verify_jaccard = Some(0.8);
    verify.stage = Some(Stage::Filter);
    let err = run(&verify, &|_| ()).unwrap_err().to_string();
    assert!(
        err.contains("--verify-jaccard") && err.contains("without --stage"),
        "{err}"
    );
    let mut kept = output_bytes(&opts.out);
    assert_eq!(
        kept.remove(Path::new("notes.txt")).as_deref(),
        Some(&b"mine"[..])
    );
    assert_eq!(kept, output_bytes(&whole.out));
}

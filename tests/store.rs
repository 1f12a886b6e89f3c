//! Object storage through the binary (issue 27, item 3): stages read `s3://` inputs and write
//! `s3://` outputs of a real S3-compatible server on loopback, moto's server mode (`.ci/run`
//! installs `moto[server]` and names its folder in PHIGEN_MOTO_PYTHONPATH; where it is missing
//! the tests fail under CI and are skipped, saying so, elsewhere). The objects are put and read
//! back with boto3 (which moto depends on), not with phigen's client, and the expected outputs
//! are those of the same stage run on local paths.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{run, stderr, BIN};

/// The credentials the tests give the client. moto accepts any; the secret must never show up
/// in phigen's output.
const KEY_ID: &str = "AKIAPHIGENTESTKEY";
const SECRET: &str = "phigen-test-secret-d0-not-print";

/// For a test whose fixture is missing: under CI (`CI` set and not `false` or `0`) it fails with
/// `missing`; elsewhere it prints `skipped: {missing}` and the caller returns (the same policy
/// as the library's test-only `artifact::skip_unless_ci`).
fn skip_unless_ci(missing: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    assert!(
        !ci,
        "{missing} (CI is set: a test whose data is missing fails in CI)"
    );
    eprintln!("skipped: {missing}");
}

/// moto's S3 server on a free loopback port, its request log in `log`; killed when dropped.
struct Moto {
    child: Child,
    addr: SocketAddr,
    pythonpath: String,
    log: PathBuf,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts the server, or says why it cannot (see [`skip_unless_ci`]) and returns `None`.
    fn start(dir: &Path) -> Option<Moto> {
        let pythonpath = std::env::var("PHIGEN_MOTO_PYTHONPATH").unwrap_or_default();
        let has_moto = Command::new("python3")
            .args(["-c", "import moto.server, boto3"])
            .env("PYTHONPATH", &pythonpath)
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_moto {
            skip_unless_ci(&format!(
                "moto's S3 server not found: python3 cannot import `moto.server` with \
                 PHIGEN_MOTO_PYTHONPATH={pythonpath:?}. `.ci/run` installs it; do the same \
                 (python3 -m pip install --target ~/.cache/phigen-py-moto \"moto[server]==5.1.22\", \
                 then set PHIGEN_MOTO_PYTHONPATH=~/.cache/phigen-py-moto)"
            ));
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("moto.log");
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("PYTHONPATH", &pythonpath)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto did not listen on {addr} within 60 s: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Moto {
            child,
            addr,
            pythonpath,
            log,
        })
    }

    /// boto3 against the server: `mb BUCKET`, `put BUCKET PREFIX DIR` (every file below DIR),
    /// `put-public BUCKET KEY FILE` (readable without credentials), `get BUCKET PREFIX DIR`
    /// (every object below PREFIX).
    fn boto(&self, args: &[&str]) {
        let script = r#"
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="k", aws_secret_access_key="s")
op, bucket = sys.argv[2], sys.argv[3]
if op == "mb":
    s3.create_bucket(Bucket=bucket)
elif op == "put":
    prefix, root = sys.argv[4], sys.argv[5]
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            s3.upload_file(path, bucket, prefix + "/" + os.path.relpath(path, root))
elif op == "put-public":
    key, path = sys.argv[4], sys.argv[5]
    s3.upload_file(path, bucket, key, ExtraArgs={"ACL": "public-read"})
elif op == "get":
    prefix, root = sys.argv[4], sys.argv[5]
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            path = os.path.join(root, o["Key"][len(prefix) + 1:])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.download_file(bucket, o["Key"], path)
"#;
        let out = Command::new("python3")
            .args(["-c", script, &format!("http://{}", self.addr)])
            .args(args)
            .env("PYTHONPATH", &self.pythonpath)
            .output()
            .unwrap();
        assert!(out.status.success(), "boto3 {args:?}: {}", stderr(&out));
    }

    /// (method, path, query) of every request moto answered, in order, from its request log.
    fn requests(&self) -> Vec<(String, String, String)> {
        let log = std::fs::read_to_string(&self.log).unwrap();
        log.lines()
            .filter_map(|l| {
                let mut parts = l.split('"').nth(1)?.split(' ');
                let (method, target) = (parts.next()?, parts.next()?);
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                Some((method.to_string(), path.to_string(), query.to_string()))
            })
            .collect()
    }

    /// The objects that became visible, in order: a plain PUT, or the POST that completes a
    /// multipart upload (marked `true`).
    fn committed_keys(&self) -> Vec<(String, bool)> {
        self.requests()
            .into_iter()
            .filter_map(|(method, path, query)| match method.as_str() {
                "PUT" if query.is_empty() => Some((path, false)),
                "POST" if query.starts_with("uploadId=") => Some((path, true)),
                _ => None,
            })
            .collect()
    }
}

/// `phigen ARGS` talking to the S3 endpoint `endpoint`, with its cache below `cache`.
fn phigen_s3(endpoint: SocketAddr, cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("AWS_ENDPOINT_URL", format!("http://{endpoint}"))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("PHIGEN_STORE_CACHE", cache)
        .env("RUST_LOG", "phigen=info")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN");
    c
}

/// A TCP proxy on loopback in front of `upstream`: each of the first `fail_first` connections
/// gets its request answered with `status` (e.g. `503 Service Unavailable`) and a body that
/// echoes `echo` (as a careless server might echo a credential), the later ones are passed
/// through. Returns its address and the count of
/// connections so far.
async fn flaky_proxy(
    upstream: SocketAddr,
    fail_first: usize,
    status: &'static str,
    echo: &str,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let body = format!("<Error><Code>SlowDown</Code><Message>echo {echo}</Message></Error>");
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            tokio::spawn(async move {
                if n < fail_first {
                    read_request(&mut conn).await;
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                    let _ = conn.shutdown().await;
                } else if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    (addr, count)
}

/// Reads one HTTP/1.1 request (head and a Content-Length body) so that the answer is not sent
/// into a half-read request.
async fn read_request(conn: &mut tokio::net::TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Every file below `dir` (by relative path) with its bytes.
fn tree_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
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
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// (id, kept id, reason) of every row of a dedup's removed.parquet. Its `file` column names the
/// local file read, which for an s3:// input is the mirror in the cache, so it is left out.
fn removed_rows(dir: &Path) -> Vec<(String, String, String)> {
    let path = dir.join("removed.parquet");
    let df = phigen::artifact::table::read_columns(&path, &["id", "kept_id", "reason"]).unwrap();
    let col = |name| phigen::artifact::table::text_column(&df, &path, name).unwrap();
    let (ids, kept, reason) = (col("id"), col("kept_id"), col("reason"));
    let mut rows: Vec<_> = (0..df.height())
        .map(|i| {
            (
                ids[i].clone().unwrap(),
                kept[i].clone().unwrap(),
                reason[i].clone().unwrap(),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// A corpus of 12 small jsonl files holding exact and near copies of each other's stories, and
/// one file of about 12 MB of distinct stories (larger than phigen's 8 MiB ranged-read chunk and
/// multipart threshold, so it is read in ranges and its kept copy uploaded in parts).
fn write_corpus(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let story = |seed: u64, changed: Option<usize>| {
        let mut x = seed.wrapping_mul(6364136223846793005) ^ 0x9e37_79b9_7f4a_7c15;
        let mut words: Vec<String> = (0..150)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                format!("w{}", (x >> 40) % 5000)
            })
            .collect();
        if let Some(i) = changed {
            words[10 + i] = format!("changed{i}");
        }
        words.join(" ")
    };
    let line =
        |id: String, text: String| serde_json::json!({"id": id, "text": text}).to_string() + "\n";
    let mut small = vec![String::new(); 12];
    for s in 0..120u64 {
        small[s as usize % 12] += &line(format!("s{s}"), story(s, None));
        if s % 3 == 0 {
            small[(s as usize + 5) % 12] += &line(format!("s{s}-near"), story(s, Some(1)));
        }
        if s % 8 == 0 {
            small[(s as usize + 7) % 12] += &line(format!("s{s}-copy"), story(s, None));
        }
    }
    for (i, text) in small.iter().enumerate() {
        std::fs::write(dir.join(format!("part-{i:02}.jsonl")), text).unwrap();
    }
    let big: String = (0..12_000u64)
        .map(|s| line(format!("big{s}"), story(1_000_000 + s, None)))
        .collect();
    assert!(big.len() > 10 << 20, "{} bytes", big.len());
    std::fs::write(dir.join("big.jsonl"), big).unwrap();
}

/// `phigen dedup` from s3:// to s3:// writes what the same dedup on local paths writes: the kept
/// files byte for byte and the same removed documents, even though the server answers its first
/// three connections with 503 (retried within the bounds). Data objects become visible before
/// stats.json and the ledger (moto's request log gives the order). A re-run uploads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_from_s3_to_s3_equals_the_local_run() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(moto) = Moto::start(tmp.path()) else {
        return;
    };
    let p = |s: &str| tmp.path().join(s);
    write_corpus(&p("corpus"));
    moto.boto(&["mb", "phigen"]);
    moto.boto(&["put", "phigen", "corpus", p("corpus").to_str().unwrap()]);

    let local = Command::new(BIN)
        .args(["--quiet", "dedup", "--input", p("corpus").to_str().unwrap()])
        .args(["--out", p("local").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(local.status.success(), "{}", stderr(&local));

    let (proxy, connections) =
        flaky_proxy(moto.addr, 3, "503 Service Unavailable", "nothing").await;
    let dedup = || {
        phigen_s3(
            proxy,
            &p("cache"),
            &[
                "dedup",
                "--input",
                "s3://phigen/corpus",
                "--out",
                "s3://phigen/dedup",
            ],
        )
    };
    let remote = run(dedup()).await;
    assert!(remote.status.success(), "{}", stderr(&remote));
    assert!(connections.load(Ordering::SeqCst) > 3, "the proxy was used");

    moto.boto(&["get", "phigen", "dedup", p("fetched").to_str().unwrap()]);
    let data = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
        tree_bytes(dir)
            .into_iter()
            .filter(|(rel, _)| rel.ends_with(".jsonl"))
            .collect()
    };
    let expected = data(&p("local"));
    assert_eq!(expected.len(), 13, "twelve small files and the big one");
    assert_eq!(data(&p("fetched")), expected);
    assert_eq!(removed_rows(&p("fetched")), removed_rows(&p("local")));
    assert!(!removed_rows(&p("local")).is_empty());
    let stats = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("stats.json")).unwrap()).unwrap()
    };
    assert_eq!(stats(&p("fetched"))["kept"], stats(&p("local"))["kept"]);
    assert!(
        !tree_bytes(&p("fetched"))
            .keys()
            .any(|k| k.ends_with(".lock") || k.ends_with(".tmp")),
        "locks and temp files stay local"
    );

    let committed = moto.committed_keys();
    let order: Vec<&str> = committed.iter().map(|(k, _)| k.as_str()).collect();
    let position = |suffix: &str| {
        order
            .iter()
            .rposition(|k| k.starts_with("/phigen/dedup/") && k.ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix} in {order:?}"))
    };
    let last_data = [".jsonl", "removed.parquet"]
        .map(position)
        .into_iter()
        .max();
    let first_meta = order
        .iter()
        .position(|k| k.ends_with("/stats.json") || k.ends_with("/.phigen.written"))
        .unwrap();
    assert!(
        last_data < Some(first_meta),
        "data before manifests: {order:?}"
    );

    assert!(
        committed.contains(&("/phigen/dedup/corpus/big.jsonl".to_string(), true)),
        "the big kept file was a multipart upload: {committed:?}"
    );
    let big_reads = moto
        .requests()
        .into_iter()
        .filter(|(m, path, _)| m == "GET" && path == "/phigen/corpus/big.jsonl")
        .count();
    assert!(
        big_reads >= 2,
        "the big input was read in ranges: {big_reads} GETs"
    );

    let again = run(dedup()).await;
    assert!(again.status.success(), "{}", stderr(&again));
    let told = stderr(&again);
    assert!(
        told.contains("s3://phigen/dedup: uploaded 0 files"),
        "{told}"
    );
    assert!(
        told.contains("s3://phigen/corpus: 0 objects fetched"),
        "{told}"
    );
}

/// Against a server that always answers 503 the stage fails after the bounded retries (2 here:
/// 3 connections in all), naming the URL; the key and the secret (echoed back in the error body
/// by the proxy) are not in the output. Denied access (403) names the credential variables, and a
/// missing bucket is named as such, for inputs and outputs alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_denied_access_and_missing_bucket_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(moto) = Moto::start(tmp.path()) else {
        return;
    };
    let p = |s: &str| tmp.path().join(s);
    moto.boto(&["mb", "phigen"]);
    std::fs::create_dir_all(p("corpus")).unwrap();
    std::fs::write(p("corpus/a.jsonl"), "{\"text\": \"one document\"}\n").unwrap();

    let (proxy, connections) = flaky_proxy(
        moto.addr,
        usize::MAX,
        "503 Service Unavailable",
        &format!("{KEY_ID} {SECRET}"),
    )
    .await;
    let dedup_via = |proxy| {
        phigen_s3(
            proxy,
            &p("cache"),
            &[
                "dedup",
                "--input",
                "s3://phigen/corpus",
                "--out",
                p("out").to_str().unwrap(),
            ],
        )
    };
    let mut cmd = dedup_via(proxy);
    cmd.env("PHIGEN_STORE_RETRIES", "2");
    let failed: Output = run(cmd).await;
    let told = stderr(&failed);
    assert!(!failed.status.success());
    assert!(
        told.contains("s3://phigen/corpus") && told.contains("2 retries"),
        "{told}"
    );
    assert!(!told.contains(SECRET) && !told.contains(KEY_ID), "{told}");
    assert!(
        told.contains("echo [redacted]"),
        "the body was shown, scrubbed: {told}"
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        3,
        "one request and two retries"
    );

    // 403 is not retried: it cannot succeed later.
    let (proxy, connections) =
        flaky_proxy(moto.addr, usize::MAX, "403 Forbidden", "AccessDenied").await;
    let denied = run(dedup_via(proxy)).await;
    let told = stderr(&denied);
    assert!(!denied.status.success());
    assert!(
        told.contains("s3://phigen/corpus: access denied")
            && told.contains("credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"),
        "{told}"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 1, "no retry of a 403");

    let missing_in = run(phigen_s3(
        moto.addr,
        &p("cache"),
        &[
            "dedup",
            "--input",
            "s3://no-such-bucket/corpus",
            "--out",
            p("out").to_str().unwrap(),
        ],
    ))
    .await;
    let told = stderr(&missing_in);
    assert!(!missing_in.status.success());
    assert!(
        told.contains("s3://no-such-bucket/corpus: the bucket `no-such-bucket` does not exist"),
        "{told}"
    );

    let missing_out = run(phigen_s3(
        moto.addr,
        &p("cache"),
        &[
            "dedup",
            "--input",
            p("corpus").to_str().unwrap(),
            "--out",
            "s3://no-such-bucket/out",
        ],
    ))
    .await;
    let told = stderr(&missing_out);
    assert!(!missing_out.status.success());
    assert!(
        told.contains("s3://no-such-bucket/out: the bucket `no-such-bucket` does not exist"),
        "{told}"
    );
}

/// An http:// input is one file, fetched without credentials (moto serves a public-read object
/// over plain HTTP): `phigen dedup` of it writes what the same dedup of the local file writes, and
/// a second run fetches nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_of_an_http_file_equals_the_local_run() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(moto) = Moto::start(tmp.path()) else {
        return;
    };
    let p = |s: &str| tmp.path().join(s);
    let text = "{\"id\": \"a\", \"text\": \"the same story twice\"}\n\
                {\"id\": \"b\", \"text\": \"the same story twice\"}\n\
                {\"id\": \"c\", \"text\": \"another story\"}\n";
    std::fs::write(p("docs.jsonl"), text).unwrap();
    moto.boto(&["mb", "public"]);
    moto.boto(&[
        "put-public",
        "public",
        "x/docs.jsonl",
        p("docs.jsonl").to_str().unwrap(),
    ]);
    let local = Command::new(BIN)
        .args([
            "--quiet",
            "dedup",
            "--input",
            p("docs.jsonl").to_str().unwrap(),
        ])
        .args(["--out", p("local").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(local.status.success(), "{}", stderr(&local));
    let url = format!("http://{}/public/x/docs.jsonl", moto.addr);
    let dedup = |out: &str| {
        let mut c = Command::new(BIN);
        c.args(["dedup", "--input", &url, "--out", p(out).to_str().unwrap()])
            .env("PHIGEN_STORE_CACHE", p("cache"))
            .env("RUST_LOG", "phigen=info");
        c
    };
    let remote = run(dedup("remote")).await;
    assert!(remote.status.success(), "{}", stderr(&remote));
    assert_eq!(
        std::fs::read(p("remote/docs.jsonl")).unwrap(),
        std::fs::read(p("local/docs.jsonl")).unwrap()
    );
    let again = run(dedup("again")).await;
    assert!(
        stderr(&again).contains(&format!("{url}: 0 objects fetched")),
        "{}",
        stderr(&again)
    );
}

/// `phigen tokenize` as an array of 3 tasks on 3 "machines" (each its own cache) sharing one
/// s3:// output, then `phigen merge` of that URL on a fourth, writes the token shards of one
/// local run byte for byte: each task fetches what the prefix holds, adds its part and uploads it
/// before its completion marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_array_on_three_machines_into_s3_equals_one_local_run() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(moto) = Moto::start(tmp.path()) else {
        return;
    };
    let p = |s: &str| tmp.path().join(s);
    std::fs::create_dir_all(p("raw")).unwrap();
    for f in 0..6 {
        let jsonl: String = (0..25)
            .map(|d| {
                let text = format!(
                    "Document {d} of file {f}: the fox jumps over {} dogs.",
                    d * f
                );
                serde_json::json!({"id": format!("{f}-{d}"), "text": text}).to_string() + "\n"
            })
            .collect();
        std::fs::write(p(&format!("raw/part-{f}.jsonl")), jsonl).unwrap();
    }
    moto.boto(&["mb", "phigen"]);
    moto.boto(&["put", "phigen", "raw", p("raw").to_str().unwrap()]);
    let settings = ["--val-fraction", "0.2", "--shard-tokens", "700"];
    let local = Command::new(BIN)
        .args(["--quiet", "tokenize", "--input", p("raw").to_str().unwrap()])
        .args(["--out", p("local").to_str().unwrap()])
        .args(settings)
        .output()
        .unwrap();
    assert!(local.status.success(), "{}", stderr(&local));
    for k in 0..3 {
        let shard = format!("{k}/3");
        let mut args = vec![
            "tokenize",
            "--input",
            "s3://phigen/raw",
            "--out",
            "s3://phigen/tok",
        ];
        args.extend(settings);
        args.extend(["--shard", &shard]);
        let task = run(phigen_s3(moto.addr, &p(&format!("machine-{k}")), &args)).await;
        assert!(task.status.success(), "task {k}: {}", stderr(&task));
    }
    let merged = run(phigen_s3(
        moto.addr,
        &p("machine-merge"),
        &["merge", "s3://phigen/tok"],
    ))
    .await;
    assert!(merged.status.success(), "{}", stderr(&merged));
    moto.boto(&["get", "phigen", "tok", p("fetched").to_str().unwrap()]);
    let shards = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
        tree_bytes(dir)
            .into_iter()
            .filter(|(rel, _)| rel.ends_with(".bin") && !rel.contains('/'))
            .collect()
    };
    let expected = shards(&p("local"));
    assert!(expected.len() >= 3, "{:?}", expected.keys());
    assert_eq!(shards(&p("fetched")), expected);

    // Each task's marker became visible after every object of its part.
    let order: Vec<String> = moto.committed_keys().into_iter().map(|(k, _)| k).collect();
    for k in 0..3 {
        let marker = order
            .iter()
            .position(|o| o == &format!("/phigen/tok/completions/{k:05}"))
            .unwrap_or_else(|| panic!("no marker {k} in {order:?}"));
        let part = format!("/phigen/tok/tasks/{k:05}/");
        let last_part = order.iter().rposition(|o| o.starts_with(&part)).unwrap();
        assert!(last_part < marker, "task {k}: {order:?}");
    }
}

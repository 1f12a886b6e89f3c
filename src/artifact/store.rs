//! Object storage for the data stages: an `--input` or `--out` may be `s3://BUCKET/PREFIX`,
//! `gs://BUCKET/PREFIX`, `az://CONTAINER/PREFIX`, `https://HOST/PATH` (one file, read only) or a
//! local path. The stages themselves only ever see local paths; [`Staged`] puts remote data there
//! and back:
//!
//! - A remote input is mirrored into the local cache (`$PHIGEN_STORE_CACHE`, else
//!   `~/.cache/phigen/store`, under `in/SCHEME/BUCKET/PREFIX`): objects already fetched whole (same
//!   size and etag as listed) are skipped, big ones are read in ranged chunks, files the prefix no
//!   longer holds are removed from the mirror. The stage then reads the mirror with the local
//!   readers ([`super::docs`]).
//! - A remote `--out` runs in a persistent local staging directory (`out/SCHEME/BUCKET/PREFIX`
//!   under the cache), first filled with what the prefix already holds, so a killed or relaunched
//!   run resumes (on this machine or another). [`Staged::commit`] then uploads what is new or
//!   changed: data objects first (multipart when large), then the JSON manifests and stats, then
//!   the `completions/` markers. S3 has no atomic rename, so a reader that trusts only what a
//!   manifest or marker lists never sees a partial output. Nothing remote is ever deleted.
//!
//! Clients are configured from the standard environment variables (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`; `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP=true` for S3-compatible servers). Requests
//! that may succeed later (5xx, 429, timeouts, dropped connections) are retried a bounded number
//! of times (`PHIGEN_STORE_RETRIES`, default 10). Credentials are never logged or written: the
//! text of every error is scrubbed of the credential variables' values and of URL query strings
//! (SAS tokens, presigned signatures) before it is shown.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::path::Path as Key;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig, WriteMultipart,
};
use serde::{Deserialize, Serialize};

use super::atomic;
use super::task::COMPLETIONS;

/// Objects up to this size are fetched with one request, larger ones in ranges of this size.
pub const CHUNK: u64 = 8 << 20;
/// Files above this size are uploaded in parts (S3 wants parts of at least 5 MiB).
pub const MULTIPART_THRESHOLD: u64 = 8 << 20;
/// Parts uploaded or objects fetched at once.
const CONCURRENCY: usize = 4;
/// S3 and GCS allow at most 10,000 parts; parts grow beyond 8 MiB so big files stay below that.
const MAX_PARTS: u64 = 9_000;
/// What this module keeps in a mirror or staging directory (its lock, its record of what was
/// synced); the `.phigen` prefix makes every stage pass over them as control files.
const RECORD_FILE: &str = ".phigen-store.json";
const LOCK_FILE: &str = ".phigen-store.lock";
/// The environment variable that bounds the retries of one request.
pub const RETRIES_VAR: &str = "PHIGEN_STORE_RETRIES";
/// The environment variable naming the local cache of mirrors and staging directories.
pub const CACHE_VAR: &str = "PHIGEN_STORE_CACHE";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{url}: {why}; expected s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX, https://HOST/PATH (inputs only) or a local path")]
    BadUrl { url: String, why: String },
    #[error("--out {url}: http(s) locations can only be read; write to s3://, gs://, az:// or a local path")]
    ReadOnly { url: String },
    #[error("{url}: the {service} client could not be set up: {detail}; check the {vars} environment variables")]
    Config {
        url: String,
        service: &'static str,
        vars: &'static str,
        detail: String,
    },
    #[error("{var}={found}: expected a whole number of retries (0 to 100)")]
    Retries { var: &'static str, found: String },
    #[error("no local cache for object storage: {CACHE_VAR}, XDG_CACHE_HOME and HOME are all unset; set {CACHE_VAR} to a directory with room for the inputs and outputs")]
    NoCache,
    #[error("{url}: the bucket `{bucket}` does not exist (or this endpoint does not serve it): {detail}; create it, or fix the URL or the endpoint ({vars})")]
    NoBucket {
        url: String,
        bucket: String,
        vars: &'static str,
        detail: String,
    },
    #[error("{url}: access denied: {detail}; check that {who} may {op} it")]
    Denied {
        url: String,
        op: &'static str,
        who: &'static str,
        detail: String,
    },
    #[error("{url}: could not {op} after at most {retries} retries: {detail}; check the network, the endpoint and the service's status, then re-run: what was transferred is kept and the run resumes")]
    Failed {
        url: String,
        op: &'static str,
        retries: usize,
        detail: String,
    },
    #[error("{url}: no objects under this prefix (or no object of this name); check the URL")]
    Empty { url: String },
    #[error("{url}: object key `{key}` cannot be a local file name; rename the object")]
    BadKey { url: String, key: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The storage services, by URL scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    S3,
    Gcs,
    Azure,
    /// `http://` or `https://`: one file, read only.
    Http,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::S3 => "S3",
            Service::Gcs => "Google Cloud Storage",
            Service::Azure => "Azure Blob Storage",
            Service::Http => "HTTP",
        }
    }

    /// Who is refused access, for error messages.
    fn who(self) -> &'static str {
        match self {
            Service::S3 => {
                "the credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)"
            }
            Service::Gcs => {
                "the service account in GOOGLE_SERVICE_ACCOUNT/GOOGLE_APPLICATION_CREDENTIALS"
            }
            Service::Azure => {
                "the credentials in AZURE_STORAGE_ACCOUNT_KEY (or the other AZURE_* variables)"
            }
            Service::Http => {
                "anyone (http(s) inputs are read without credentials: the URL must be public)"
            }
        }
    }

    /// The environment variables that configure the client, for error messages.
    fn vars(self) -> &'static str {
        match self {
            Service::S3 => "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_REGION/AWS_ENDPOINT_URL",
            Service::Gcs => "GOOGLE_SERVICE_ACCOUNT/GOOGLE_APPLICATION_CREDENTIALS",
            Service::Azure => "AZURE_STORAGE_ACCOUNT_NAME/AZURE_STORAGE_ACCOUNT_KEY",
            Service::Http => "(none: the URL must be readable as is)",
        }
    }
}

/// A prefix (or one object) in object storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// As given, without a trailing `/`.
    pub url: String,
    pub service: Service,
    /// The bucket or container; for http(s), `SCHEME://HOST[:PORT]`.
    pub bucket: String,
    pub prefix: Key,
    /// `SCHEME/BUCKET/PREFIX`: where its mirror or staging directory sits below the cache.
    cache_rel: PathBuf,
}

/// Where a stage reads or writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    Remote(Remote),
}

impl Location {
    /// A path with a `SCHEME://` in front is a URL; anything else is a local path.
    pub fn parse(path: &Path) -> Result<Location, StoreError> {
        let Some((scheme, rest)) = path.to_str().and_then(|s| s.split_once("://")) else {
            return Ok(Location::Local(path.to_path_buf()));
        };
        let url = path.to_str().expect("split above").trim_end_matches('/');
        let bad = |why: &str| StoreError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let service = match scheme {
            "s3" | "s3a" => Service::S3,
            "gs" => Service::Gcs,
            "az" | "azure" => Service::Azure,
            "http" | "https" => Service::Http,
            other => return Err(bad(&format!("unknown scheme `{other}://`"))),
        };
        let rest = rest.trim_end_matches('/');
        let (host, key) = rest.split_once('/').unwrap_or((rest, ""));
        if host.is_empty() {
            return Err(bad("no bucket or host after the scheme"));
        }
        if rest.contains('?') || rest.contains('#') {
            let why =
                "query strings and fragments are not supported (credentials go in the environment)";
            return Err(bad(why));
        }
        let prefix = Key::parse(key).map_err(|e| bad(&format!("bad object path: {e}")))?;
        if service == Service::Http && key.is_empty() {
            return Err(bad("an http(s) input must name a file"));
        }
        let mut cache_rel = PathBuf::from(scheme).join(host);
        cache_rel.extend(prefix.parts().map(|p| p.as_ref().to_string()));
        Ok(Location::Remote(Remote {
            url: url.to_string(),
            service,
            bucket: if service == Service::Http {
                format!("{scheme}://{host}")
            } else {
                host.to_string()
            },
            prefix,
            cache_rel,
        }))
    }
}

/// The retries of one request: `PHIGEN_STORE_RETRIES` (default 10), within 3 minutes, with
/// exponential backoff from 100 ms to 15 s (object_store's defaults but the count).
fn retry_config() -> Result<RetryConfig, StoreError> {
    let mut retry = RetryConfig::default();
    if let Ok(found) = std::env::var(RETRIES_VAR) {
        retry.max_retries =
            found
                .trim()
                .parse()
                .ok()
                .filter(|n| *n <= 100)
                .ok_or(StoreError::Retries {
                    var: RETRIES_VAR,
                    found,
                })?;
    }
    Ok(retry)
}

/// The client of `remote`'s bucket, configured from the environment.
fn client(remote: &Remote, retry: &RetryConfig) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let retry = retry.clone();
    let built: object_store::Result<Arc<dyn ObjectStore>> = match remote.service {
        Service::S3 => AmazonS3Builder::from_env()
            .with_bucket_name(&remote.bucket)
            .with_retry(retry)
            .build()
            .map(|s| Arc::new(s) as _),
        Service::Gcs => GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(&remote.bucket)
            .with_retry(retry)
            .build()
            .map(|s| Arc::new(s) as _),
        Service::Azure => MicrosoftAzureBuilder::from_env()
            .with_container_name(&remote.bucket)
            .with_retry(retry)
            .build()
            .map(|s| Arc::new(s) as _),
        Service::Http => HttpBuilder::new()
            .with_url(&remote.bucket)
            .with_retry(retry)
            .with_client_options(
                ClientOptions::new().with_allow_http(remote.bucket.starts_with("http://")),
            )
            .build()
            .map(|s| Arc::new(s) as _),
    };
    built.map_err(|e| StoreError::Config {
        url: remote.url.clone(),
        service: remote.service.name(),
        vars: remote.service.vars(),
        detail: redact(&e.to_string()),
    })
}

/// What a request was for, to say what failed and to tell a missing bucket from a missing object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    List,
    Read,
    Write,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::List => "list",
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

/// `e` as the error a user can act on: listing or writing a prefix only finds nothing when the
/// bucket is missing; denied access names the credential variables; anything else has already
/// been retried.
fn classify(remote: &Remote, op: Op, retries: usize, e: object_store::Error) -> StoreError {
    let text = e.to_string();
    // object_store gives list errors (and some others) as `Generic`, with the HTTP status only
    // in the text of a private error type: read it from there.
    let status = text
        .split_once("status code: ")
        .and_then(|(_, rest)| rest.get(..3)?.parse::<u16>().ok());
    // Error bodies are often multi-line XML: one line reads better in a message.
    let detail = redact(&text)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let missing = matches!(e, object_store::Error::NotFound { .. }) || status == Some(404);
    let denied = matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || matches!(status, Some(401 | 403));
    let url = remote.url.clone();
    if missing && op != Op::Read {
        StoreError::NoBucket {
            url,
            bucket: remote.bucket.clone(),
            vars: remote.service.vars(),
            detail,
        }
    } else if denied {
        StoreError::Denied {
            url,
            op: op.verb(),
            who: remote.service.who(),
            detail,
        }
    } else {
        StoreError::Failed {
            url,
            op: op.verb(),
            retries,
            detail,
        }
    }
}

/// Whether the environment variable `name` holds a credential (its value is scrubbed from errors).
fn is_credential_var(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    ["AWS_", "GOOGLE_", "AZURE_"]
        .iter()
        .any(|p| name.starts_with(p))
        && ["KEY", "SECRET", "TOKEN", "PASSWORD", "SAS", "CREDENTIAL"]
            .iter()
            .any(|w| name.contains(w))
}

/// `text` without the values of credential variables and without URL query strings: a server
/// may echo a key back in an error body, and presigned or SAS URLs carry signatures.
pub fn redact(text: &str) -> String {
    let mut out = text.to_string();
    for (name, value) in std::env::vars_os() {
        let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else {
            continue;
        };
        if is_credential_var(name) && value.len() >= 4 {
            out = out.replace(value, "[redacted]");
        }
    }
    let mut scrubbed = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find("://") {
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '>' || c == '<')
            .map_or(rest.len(), |e| at + e);
        let url = &rest[..end];
        match url[at..].find('?') {
            Some(q) => {
                scrubbed.push_str(&url[..at + q]);
                scrubbed.push_str("?[redacted]");
            }
            None => scrubbed.push_str(url),
        }
        rest = &rest[end..];
    }
    scrubbed.push_str(rest);
    scrubbed
}

/// The local root of mirrors and staging directories.
fn cache_root() -> Result<PathBuf, StoreError> {
    let var = |v: &str| {
        std::env::var_os(v)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    var(CACHE_VAR)
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("phigen/store")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/phigen/store")))
        .ok_or(StoreError::NoCache)
}

/// What was moved between a remote prefix and its local directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    pub files: usize,
    pub bytes: u64,
    /// Files already in place on the other side, not moved again.
    pub skipped: usize,
}

impl Transfer {
    fn add(&mut self, other: Transfer) {
        self.files += other.files;
        self.bytes += other.bytes;
        self.skipped += other.skipped;
    }
}

/// A file as last synced: its local size and modification time, and the etag of the object it
/// was fetched from or uploaded as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Synced {
    size: u64,
    mtime_ns: u64,
    etag: Option<String>,
}

/// `path`'s size and modification time, as [`Synced`] records them.
fn local_state(path: &Path) -> Option<(u64, u64)> {
    let meta = fs::metadata(path).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some((meta.len(), mtime.as_nanos() as u64))
}

impl Synced {
    /// Whether `path` is still the file this record describes.
    fn matches_local(&self, path: &Path) -> bool {
        local_state(path) == Some((self.size, self.mtime_ns))
    }
}

/// Whether a local directory follows its prefix exactly (an input's mirror), holds single objects
/// fetched by name, or holds a stage's work (a staging `--out`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Mirror,
    Files,
    Staging,
}

/// A local directory kept in step with a remote prefix: its record of what was synced, and a lock
/// that other phigen processes on this machine wait for while it is being synced. It is not held
/// while the stage runs, so that array tasks on one machine run side by side (a stage's own
/// output lock keeps them apart, and every file is put in place by rename).
struct SyncDir {
    remote: Remote,
    store: Arc<dyn ObjectStore>,
    retries: usize,
    role: Role,
    dir: PathBuf,
    record: BTreeMap<String, Synced>,
    lock: File,
}

/// Why moving one file failed, before it is told as a [`StoreError`] for its URL.
enum TransferError {
    Store(object_store::Error),
    Io(PathBuf, std::io::Error),
}

impl From<object_store::Error> for TransferError {
    fn from(e: object_store::Error) -> Self {
        TransferError::Store(e)
    }
}

fn tio(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |e| TransferError::Io(path.to_path_buf(), e)
}

impl SyncDir {
    /// Locks `dir` (waiting while another process on this machine syncs it) and reads its record.
    fn open(
        remote: &Remote,
        store: Arc<dyn ObjectStore>,
        retries: usize,
        role: Role,
        dir: PathBuf,
    ) -> Result<SyncDir, StoreError> {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        let mut synced = SyncDir {
            remote: remote.clone(),
            store,
            retries,
            role,
            dir,
            record: BTreeMap::new(),
            lock,
        };
        synced.lock()?;
        Ok(synced)
    }

    /// Waits for the lock, then reads the record (another process may have synced meanwhile).
    fn lock(&mut self) -> Result<(), StoreError> {
        flock(&self.lock, libc::LOCK_EX).map_err(io_err(&self.dir.join(LOCK_FILE)))?;
        // An unreadable record only costs transferring again, so it counts as empty.
        self.record = fs::read(self.dir.join(RECORD_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(())
    }

    /// Lets other processes sync the directory, now that it is in step.
    fn unlock(&self) -> Result<(), StoreError> {
        flock(&self.lock, libc::LOCK_UN).map_err(io_err(&self.dir.join(LOCK_FILE)))
    }

    fn save(&self) -> Result<(), StoreError> {
        let path = self.dir.join(RECORD_FILE);
        atomic::write_json(&path, &self.record).map_err(io_err(&path))
    }

    fn error(&self, op: Op, e: TransferError) -> StoreError {
        match e {
            TransferError::Store(e) => classify(&self.remote, op, self.retries, e),
            TransferError::Io(path, source) => StoreError::Io { path, source },
        }
    }

    /// Every object under the prefix, by its `/`-separated path relative to the prefix.
    async fn list(&self) -> Result<BTreeMap<String, ObjectMeta>, StoreError> {
        let listed: Vec<ObjectMeta> = self
            .store
            .list(Some(&self.remote.prefix))
            .try_collect()
            .await
            .map_err(|e| classify(&self.remote, Op::List, self.retries, e))?;
        let mut objects = BTreeMap::new();
        for meta in listed {
            let rel: Vec<String> = meta
                .location
                .prefix_match(&self.remote.prefix)
                .map(|parts| parts.map(|p| p.as_ref().to_string()).collect())
                .unwrap_or_default();
            if rel.is_empty() {
                continue; // the prefix itself, as a zero-byte "directory" object
            }
            if rel.iter().any(|p| p == "." || p == "..") {
                return Err(StoreError::BadKey {
                    url: self.remote.url.clone(),
                    key: meta.location.to_string(),
                });
            }
            objects.insert(rel.join("/"), meta);
        }
        Ok(objects)
    }

    /// The key of the file `rel` below the prefix.
    fn key(&self, rel: &str) -> Key {
        self.remote
            .prefix
            .parts()
            .map(|p| p.as_ref().to_string())
            .chain(rel.split('/').map(str::to_string))
            .collect()
    }

    /// Fetches the `objects` (relative path → listing) not already here, [`CONCURRENCY`] at a
    /// time, and records them.
    async fn fetch(
        &mut self,
        objects: &BTreeMap<String, ObjectMeta>,
    ) -> Result<Transfer, StoreError> {
        let mut done = Transfer::default();
        let mut todo = Vec::new();
        for (rel, meta) in objects {
            let path = self.dir.join(rel);
            let recorded = self.record.get(rel);
            let same_object = recorded
                .is_some_and(|r| r.etag.is_some() && r.etag == meta.e_tag && r.size == meta.size);
            let untouched = recorded.is_some_and(|r| r.matches_local(&path));
            let wanted = if rel == super::outdir::WRITTEN_FILE && self.role == Role::Staging {
                false // merged with the local ledger below, never replaced
            } else if !path.exists() {
                true
            } else if self.role == Role::Staging {
                // Local work not yet uploaded wins; a file untouched since it was synced follows
                // the object when another machine has replaced it.
                untouched && !same_object
            } else {
                !(untouched && same_object)
            };
            if wanted {
                todo.push((rel.clone(), meta, path));
            } else {
                done.skipped += 1;
            }
        }
        let store = self.store.as_ref();
        let fetched: Vec<(String, Synced)> = futures::stream::iter(todo)
            .map(|(rel, meta, path)| async move {
                download(store, meta, &path).await?;
                let (size, mtime_ns) = local_state(&path).unwrap_or((meta.size, 0));
                let etag = meta.e_tag.clone();
                Ok((
                    rel,
                    Synced {
                        size,
                        mtime_ns,
                        etag,
                    },
                ))
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await
            .map_err(|e| self.error(Op::Read, e))?;
        for (rel, synced) in fetched {
            done.files += 1;
            done.bytes += synced.size;
            self.record.insert(rel, synced);
        }
        self.save()?;
        Ok(done)
    }

    /// Removes the files of a mirror that the prefix no longer holds.
    fn prune(&mut self, objects: &BTreeMap<String, ObjectMeta>) -> Result<(), StoreError> {
        for rel in files_under(&self.dir)? {
            if !objects.contains_key(&rel) {
                let path = self.dir.join(&rel);
                fs::remove_file(&path).map_err(io_err(&path))?;
                self.record.remove(&rel);
            }
        }
        self.save()
    }

    /// Adds the lines of the remote ledger of files phigen wrote ([`super::outdir::WRITTEN_FILE`])
    /// that the local one lacks: tasks on other machines wrote them, and a stage here may replace
    /// only what a ledger lists.
    async fn merge_ledger(
        &mut self,
        objects: &BTreeMap<String, ObjectMeta>,
    ) -> Result<(), StoreError> {
        let name = super::outdir::WRITTEN_FILE;
        let Some(meta) = objects.get(name) else {
            return Ok(());
        };
        if self.record.get(name).is_some_and(|r| r.etag == meta.e_tag) {
            return Ok(());
        }
        let remote = self
            .store
            .get(&meta.location)
            .await
            .map_err(|e| classify(&self.remote, Op::Read, self.retries, e))?
            .bytes()
            .await
            .map_err(|e| classify(&self.remote, Op::Read, self.retries, e))?;
        let path = self.dir.join(name);
        let mut lines: Vec<String> = fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        for line in String::from_utf8_lossy(&remote).lines() {
            if !line.trim().is_empty() && !lines.iter().any(|l| l == line) {
                lines.push(line.to_string());
            }
        }
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        atomic::write_bytes(&path, text.as_bytes()).map_err(io_err(&path))?;
        // The merged ledger holds the remote one: recorded as such so it is fetched no more, and
        // as changed here (its mtime moved) so the commit uploads the union.
        self.record.insert(
            name.to_string(),
            Synced {
                size: 0,
                mtime_ns: 0,
                etag: meta.e_tag.clone(),
            },
        );
        self.save()
    }

    /// Uploads the files that are new or changed since they were last synced: data first, then
    /// the JSON manifests and stats, then the completion markers, each group whole before the next.
    async fn upload(&mut self) -> Result<Transfer, StoreError> {
        self.lock()?;
        let objects = self.list().await?;
        self.merge_ledger(&objects).await?;
        let mut done = Transfer::default();
        let mut groups: [Vec<String>; 3] = Default::default();
        for rel in files_under(&self.dir)? {
            let path = self.dir.join(&rel);
            let current = self.record.get(&rel).is_some_and(|r| {
                r.matches_local(&path) && objects.get(&rel).is_some_and(|m| m.e_tag == r.etag)
            });
            if local_only(&rel) {
                continue;
            } else if current {
                done.skipped += 1;
            } else {
                groups[commit_order(&rel)].push(rel);
            }
        }
        for group in groups {
            let store = self.store.as_ref();
            let this = &*self;
            let uploaded: Vec<(String, Synced)> = futures::stream::iter(group)
                .map(|rel| async move {
                    let path = this.dir.join(&rel);
                    let before = local_state(&path);
                    let put = upload(store, &this.key(&rel), &path).await?;
                    let (size, mtime_ns) = before.unwrap_or_default();
                    let synced = Synced {
                        size,
                        mtime_ns,
                        etag: put.e_tag,
                    };
                    Ok((rel, synced))
                })
                .buffer_unordered(CONCURRENCY)
                .try_collect()
                .await
                .map_err(|e| self.error(Op::Write, e))?;
            for (rel, synced) in uploaded {
                done.files += 1;
                done.bytes += synced.size;
                self.record.insert(rel, synced);
            }
            self.save()?;
        }
        Ok(done)
    }
}

/// Files of a staging directory that stay on this machine: this module's record and lock, the
/// stages' locks, and temp files a killed write left.
fn local_only(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name == RECORD_FILE
        || name == LOCK_FILE
        || (name.starts_with(".phigen") && name.ends_with(".lock"))
        || name.ends_with(".tmp")
}

/// When a file is uploaded: 0 data, 1 manifests and stats (JSON, the ledger), 2 the completion
/// markers, so that what a manifest or marker lists is always there already.
fn commit_order(rel: &str) -> usize {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if rel.split('/').any(|p| p == COMPLETIONS) {
        2
    } else if name.ends_with(".json") || name == super::outdir::WRITTEN_FILE {
        1
    } else {
        0
    }
}

/// The regular files below `dir` but this module's own, as `/`-separated relative paths.
fn files_under(dir: &Path) -> Result<Vec<String>, StoreError> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), StoreError> {
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let kind = entry.file_type().map_err(io_err(&entry.path()))?;
            if kind.is_dir() {
                walk(&entry.path(), &child, out)?;
            } else if kind.is_file()
                && !(rel.is_empty() && (name == RECORD_FILE || name == LOCK_FILE))
            {
                out.push(child);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// `flock(2)` on `file`, waiting for it.
fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Fetches the object `meta` names into `dest` through its temp name (so `dest` is whole or
/// absent): in one request up to [`CHUNK`] bytes, else in ranges of [`CHUNK`], each pinned to the
/// listed etag so that an object replaced meanwhile fails instead of mixing two versions.
async fn download(
    store: &dyn ObjectStore,
    meta: &ObjectMeta,
    dest: &Path,
) -> Result<(), TransferError> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).map_err(tio(dir))?;
    }
    let tmp = atomic::temp_path(dest);
    let mut file = File::create(&tmp).map_err(tio(&tmp))?;
    let mut start = 0;
    loop {
        let end = (start + CHUNK).min(meta.size);
        let opts = GetOptions {
            if_match: meta.e_tag.clone(),
            range: (meta.size > CHUNK).then_some(GetRange::Bounded(start..end)),
            ..Default::default()
        };
        let bytes = store.get_opts(&meta.location, opts).await?.bytes().await?;
        file.write_all(&bytes).map_err(tio(&tmp))?;
        start = end;
        if start >= meta.size {
            break;
        }
    }
    file.sync_all().map_err(tio(&tmp))?;
    fs::rename(&tmp, dest).map_err(tio(dest))?;
    Ok(())
}

/// Uploads the file `path` as `key`: in one request up to [`MULTIPART_THRESHOLD`] bytes, else in
/// parts of at least that size, [`CONCURRENCY`] at a time (an upload that fails is aborted, so
/// its parts are not left behind).
async fn upload(
    store: &dyn ObjectStore,
    key: &Key,
    path: &Path,
) -> Result<object_store::PutResult, TransferError> {
    let size = fs::metadata(path).map_err(tio(path))?.len();
    if size <= MULTIPART_THRESHOLD {
        let bytes = fs::read(path).map_err(tio(path))?;
        return Ok(store.put(key, PutPayload::from(bytes)).await?);
    }
    let part = size.div_ceil(MAX_PARTS).max(MULTIPART_THRESHOLD) as usize;
    let mut writer = WriteMultipart::new_with_chunk_size(store.put_multipart(key).await?, part);
    let mut file = File::open(path).map_err(tio(path))?;
    let mut buf = vec![0; part];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(TransferError::Io(path.to_path_buf(), e));
            }
        };
        if let Err(e) = writer.wait_for_capacity(CONCURRENCY).await {
            let _ = writer.abort().await;
            return Err(e.into());
        }
        writer.write(&buf[..n]);
    }
    Ok(writer.finish().await?)
}

/// The inputs and output of one stage run, as local paths: remote inputs mirrored into the cache,
/// a remote `--out` replaced by its staging directory.
pub struct Staged {
    /// The inputs to give the stage, in the order given.
    pub inputs: Vec<PathBuf>,
    /// The output directory to give the stage.
    pub out: PathBuf,
    /// What was fetched for the inputs and the staging directory.
    pub fetched: Transfer,
    staging: Option<SyncDir>,
}

impl Staged {
    /// Fetches remote `inputs` and what a remote `out` already holds; local paths pass through
    /// untouched (and then nothing is configured or read from the environment).
    pub async fn open(inputs: &[PathBuf], out: &Path) -> Result<Staged, StoreError> {
        let mut staged = Staged {
            inputs: Vec::with_capacity(inputs.len()),
            out: out.to_path_buf(),
            fetched: Transfer::default(),
            staging: None,
        };
        let mut setup = None;
        let mut setup = || -> Result<(PathBuf, RetryConfig), StoreError> {
            if setup.is_none() {
                setup = Some((cache_root()?, retry_config()?));
            }
            Ok(setup.clone().expect("set above"))
        };
        for input in inputs {
            let remote = match Location::parse(input)? {
                Location::Local(path) => {
                    staged.inputs.push(path);
                    continue;
                }
                Location::Remote(remote) => remote,
            };
            let (root, retry) = setup()?;
            let (path, dir, fetched) = fetch_input(&remote, &root, &retry).await?;
            tracing::info!(
                "{}: {} objects fetched ({:.1} MB), {} already in {}",
                remote.url,
                fetched.files,
                fetched.bytes as f64 / 1e6,
                fetched.skipped,
                dir.display()
            );
            staged.fetched.add(fetched);
            staged.inputs.push(path);
        }
        if let Location::Remote(remote) = Location::parse(out)? {
            if remote.service == Service::Http {
                return Err(StoreError::ReadOnly { url: remote.url });
            }
            let (root, retry) = setup()?;
            let store = client(&remote, &retry)?;
            let dir = root.join("out").join(&remote.cache_rel);
            let mut dir = SyncDir::open(&remote, store, retry.max_retries, Role::Staging, dir)?;
            let objects = dir.list().await?;
            staged.fetched.add(dir.fetch(&objects).await?);
            dir.merge_ledger(&objects).await?;
            dir.unlock()?;
            staged.out = dir.dir.clone();
            staged.staging = Some(dir);
        }
        Ok(staged)
    }

    /// The remote `--out`, if it is one.
    pub fn remote_out(&self) -> Option<&str> {
        self.staging.as_ref().map(|s| s.remote.url.as_str())
    }

    /// Uploads what the stage wrote to a remote `--out` (see the module doc for the order); `None`
    /// for a local one. Call it once the stage has returned: a re-run uploads only what is missing.
    pub async fn commit(mut self) -> Result<Option<Transfer>, StoreError> {
        match self.staging.as_mut() {
            Some(dir) => dir.upload().await.map(Some),
            None => Ok(None),
        }
    }
}

/// Mirrors the remote input `remote` below `root`: a prefix as a directory, else one object as a
/// file (always so for http(s), which cannot list). Returns the local path, the directory it is
/// in (the mirror) and what was fetched.
async fn fetch_input(
    remote: &Remote,
    root: &Path,
    retry: &RetryConfig,
) -> Result<(PathBuf, PathBuf, Transfer), StoreError> {
    let store = client(remote, retry)?;
    if remote.service != Service::Http {
        let dir = root.join("in").join(&remote.cache_rel);
        let mut dir = SyncDir::open(remote, store.clone(), retry.max_retries, Role::Mirror, dir)?;
        let objects = dir.list().await?;
        if !objects.is_empty() {
            let fetched = dir.fetch(&objects).await?;
            dir.prune(&objects)?;
            dir.unlock()?;
            return Ok((dir.dir.clone(), dir.dir, fetched));
        }
    }
    let meta = store.head(&remote.prefix).await.map_err(|e| match e {
        object_store::Error::NotFound { .. } => StoreError::Empty {
            url: remote.url.clone(),
        },
        e => classify(remote, Op::Read, retry.max_retries, e),
    })?;
    let name = remote
        .prefix
        .filename()
        .expect("a single object has a name")
        .to_string();
    let parent = remote
        .cache_rel
        .parent()
        .expect("the scheme and bucket come first");
    let dir = root.join("files").join(parent);
    let mut dir = SyncDir::open(remote, store, retry.max_retries, Role::Files, dir)?;
    // Listed as its own name below its parent, the directory the file is fetched into.
    let objects = BTreeMap::from([(name.clone(), meta)]);
    let fetched = dir.fetch(&objects).await?;
    dir.unlock()?;
    Ok((dir.dir.join(name), dir.dir, fetched))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// URLs parse into service, bucket, prefix and cache path as the module doc describes; local
    /// paths and `file`-less http URLs are told apart.
    #[test]
    fn locations_parse() {
        let remote = |s: &str| match Location::parse(Path::new(s)).unwrap() {
            Location::Remote(r) => r,
            Location::Local(p) => panic!("{s} parsed as the local path {}", p.display()),
        };
        let r = remote("s3://bkt/corpus/raw/");
        assert_eq!((r.service, r.bucket.as_str()), (Service::S3, "bkt"));
        assert_eq!(r.prefix.as_ref(), "corpus/raw");
        assert_eq!(r.url, "s3://bkt/corpus/raw");
        assert_eq!(r.cache_rel, Path::new("s3/bkt/corpus/raw"));
        let r = remote("gs://b");
        assert_eq!((r.service, r.prefix.as_ref()), (Service::Gcs, ""));
        assert_eq!(remote("az://c/p").service, Service::Azure);
        let r = remote("https://host:8443/data/a.jsonl");
        assert_eq!(r.bucket, "https://host:8443");
        assert_eq!(r.prefix.as_ref(), "data/a.jsonl");
        assert_eq!(
            Location::parse(Path::new("data/raw")).unwrap(),
            Location::Local(PathBuf::from("data/raw"))
        );
        for bad in [
            "ftp://x/y",
            "s3:///y",
            "https://host",
            "s3://b/a//b",
            "s3://b/x?sig=1",
        ] {
            let err = Location::parse(Path::new(bad)).unwrap_err().to_string();
            assert!(err.starts_with(bad.trim_end_matches('/')), "{bad}: {err}");
        }
    }

    /// The values of credential variables and URL query strings are scrubbed; other text stays.
    /// (The variable is set here only: no other test in this crate reads it.)
    #[test]
    fn redact_scrubs_credentials_and_queries() {
        std::env::set_var("AWS_SECRET_ACCESS_KEY_PHIGEN_REDACT_TEST", "s3cr3t-value");
        let text = "GET https://h/b/k?X-Amz-Signature=abc&x=1 failed: echo s3cr3t-value, body <x>";
        assert_eq!(
            redact(text),
            "GET https://h/b/k?[redacted] failed: echo [redacted], body <x>"
        );
        std::env::remove_var("AWS_SECRET_ACCESS_KEY_PHIGEN_REDACT_TEST");
        assert!(
            is_credential_var("AZURE_STORAGE_ACCOUNT_KEY")
                && is_credential_var("AWS_SESSION_TOKEN")
        );
        assert!(!is_credential_var("AWS_REGION") && !is_credential_var("PHIGEN_SECRET"));
    }

    /// Data goes first, then manifests/stats/the ledger, then markers; locks, temp files and
    /// this module's own files are never uploaded.
    #[test]
    fn upload_order_and_local_files() {
        assert_eq!(commit_order("corpus/part-00.jsonl"), 0);
        assert_eq!(commit_order("signatures/00001.bin"), 0);
        assert_eq!(commit_order("stats.json"), 1);
        assert_eq!(commit_order("meta.json"), 1);
        assert_eq!(commit_order(".phigen.written"), 1);
        assert_eq!(commit_order("filter/completions/00002"), 2);
        assert_eq!(commit_order("completions/00000"), 2);
        for local in [
            ".phigen.lock",
            ".phigen-1-of-3.lock",
            "x/part-1.parquet.tmp",
            RECORD_FILE,
            LOCK_FILE,
        ] {
            assert!(local_only(local), "{local}");
        }
        assert!(!local_only(".phigen.written") && !local_only("removed.parquet"));
    }
}

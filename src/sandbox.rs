//! Runs untrusted Python (generated exercises, model completions) in a separate, limited process.
//!
//! One `python3 -I -B main.py` process per program, in a fresh temp directory that is removed
//! afterwards, with an empty environment and closed stdin. Limits (setrlimit): CPU seconds,
//! address space, file size, open files, no core dumps; a wall-clock timeout kills the whole
//! process group. When phigen runs as root (CI, containers) the child also gets its own network
//! namespace (no network at all, not even loopback), its own mount namespace with `/` remounted
//! read-only except the temp directory, and drops to the `nobody` user, so the process-count limit
//! applies and it cannot delete or change anyone's files. Without root only the rlimits, the
//! process group and the temp directory apply; [`Sandbox::isolation`] says which, and the README
//! documents both.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock time before the process group is killed (the HumanEval harness uses 3 s).
    pub wall: Duration,
    /// CPU seconds per process.
    pub cpu_secs: u64,
    /// Address space per process.
    pub memory_bytes: u64,
    /// Bytes of stdout and of stderr kept; the rest is discarded.
    pub max_output: usize,
    /// Largest file the program may write.
    pub max_file_bytes: u64,
    /// Processes of the sandbox user at once (only enforced when not running as root, i.e. after
    /// the drop to `nobody`).
    pub max_processes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall: Duration::from_secs(3),
            cpu_secs: 3,
            memory_bytes: 1 << 30,
            max_output: 64 << 10,
            max_file_bytes: 16 << 20,
            max_processes: 64,
        }
    }
}

/// What protects the machine from the program, beyond rlimits, process group and temp dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Own network and mount namespaces, read-only `/`, user `nobody`.
    Namespaces,
    /// Not root: rlimits, process group and temp dir only; the program can reach the network.
    RlimitsOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Exit status 0.
    Passed,
    /// Exited non-zero: an exception, a failed assert.
    Failed,
    /// Killed for running past the wall-clock or CPU limit.
    TimedOut,
    /// Killed by another signal (e.g. a segfault, or writing past the output cap).
    Crashed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Execution {
    pub verdict: Verdict,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The last line of stderr for a failure (e.g. `AssertionError: …`), empty otherwise.
    pub error: String,
    pub stdout: String,
    pub stderr: String,
    pub wall_seconds: f64,
    /// Process (and process group) id of the run; the group is empty once `run` returns.
    pub pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no usable python3 for the sandbox (tried {tried}): install Python 3 (`apt-get install python3`) or pass its path with --python")]
    NoPython { tried: String },
    #[error("sandbox: the user `nobody` kept {limit} or more processes for {waited} s, so no program could start: look for processes of `nobody` left on this machine (`ps -u nobody`) or raise the process limit")]
    NoProcessRoom { limit: u64, waited: u64 },
    #[error("sandbox: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
    isolation: Isolation,
    workers: Semaphore,
}

const NOBODY: libc::uid_t = 65534;

impl Sandbox {
    /// Finds a Python 3 that runs in the sandbox (`python` if given, else `python3` on PATH, then
    /// `/usr/bin/python3`) and allows `workers` programs at once.
    pub async fn new(
        python: Option<&Path>,
        limits: Limits,
        workers: usize,
    ) -> Result<Sandbox, SandboxError> {
        // SAFETY: geteuid has no preconditions.
        let isolation = if unsafe { libc::geteuid() } == 0 {
            Isolation::Namespaces
        } else {
            Isolation::RlimitsOnly
        };
        let candidates: Vec<PathBuf> = match python {
            Some(p) => vec![p.to_path_buf()],
            None => {
                let mut c = Vec::new();
                if let Ok(out) = std::process::Command::new("python3")
                    .args(["-c", "import sys; print(sys.executable)"])
                    .output()
                {
                    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if out.status.success() && !path.is_empty() {
                        c.push(PathBuf::from(path));
                    }
                }
                c.push(PathBuf::from("/usr/bin/python3"));
                c
            }
        };
        let mut tried = Vec::new();
        for candidate in &candidates {
            let sandbox = Sandbox {
                python: candidate.clone(),
                limits,
                isolation,
                workers: Semaphore::new(workers.max(1)),
            };
            let why = match sandbox
                .run("import sys; assert sys.version_info >= (3, 8); print('ok')")
                .await
            {
                Ok(e) if e.verdict == Verdict::Passed && e.stdout.trim() == "ok" => {
                    return Ok(sandbox)
                }
                Ok(e) => format!(
                    "{:?}: {}",
                    e.verdict,
                    e.stderr.lines().last().unwrap_or_default()
                ),
                Err(e) => e.to_string(),
            };
            tried.push(format!("{} ({why})", candidate.display()));
        }
        let tried = tried.join(", ");
        Err(SandboxError::NoPython { tried })
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    pub fn python(&self) -> &Path {
        &self.python
    }

    /// Runs `program` as `main.py` and waits for it (or for the wall-clock limit).
    pub async fn run(&self, program: &str) -> Result<Execution, SandboxError> {
        let _slot = self
            .workers
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let dir = tempfile::Builder::new()
            .prefix("phigen-sandbox-")
            .tempdir()?;
        std::fs::write(dir.path().join("main.py"), program)?;
        if self.isolation == Isolation::Namespaces {
            // SAFETY: plain chown calls on paths we just created.
            for p in [dir.path().to_path_buf(), dir.path().join("main.py")] {
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
                    .map_err(std::io::Error::other)?;
                if unsafe { libc::chown(c.as_ptr(), NOBODY, NOBODY) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
            }
        }
        let mut cmd = std::process::Command::new(&self.python);
        cmd.args(["-I", "-B", "main.py"])
            .current_dir(dir.path())
            .env_clear()
            .env("HOME", dir.path())
            .env("TMPDIR", dir.path())
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let limits = self.limits;
        let isolation = self.isolation;
        let dir_c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
        // system calls (setsid, unshare, mount, setrlimit, setgroups, setgid, setuid) on data
        // prepared before the fork.
        unsafe {
            cmd.pre_exec(move || confine(&limits, isolation, &dir_c));
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        // The process-count limit is per user, and every sandboxed program runs as `nobody`: while
        // another program (a fork bomb, say) holds all of its processes, exec fails with EAGAIN.
        // That program is killed within its wall-clock limit, so wait for room rather than fail.
        let waiting_since = Instant::now();
        let mut child = loop {
            match cmd.spawn() {
                Ok(child) => break child,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if waiting_since.elapsed() > 2 * limits.wall + Duration::from_secs(2) {
                        return Err(SandboxError::NoProcessRoom {
                            limit: limits.max_processes,
                            waited: waiting_since.elapsed().as_secs(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let started = Instant::now();
        let pid = child.id().expect("a just-spawned child has a pid");
        let out = read_capped(
            child.stdout.take().expect("stdout is piped"),
            limits.max_output,
        );
        let err = read_capped(
            child.stderr.take().expect("stderr is piped"),
            limits.max_output,
        );
        let waited = tokio::time::timeout(limits.wall, async {
            let (out, err) = tokio::join!(out, err);
            (child.wait().await, out, err)
        })
        .await;
        if waited.is_err() {
            // Reap the killed child first: a zombie still counts as a member of its group, so
            // waiting for an empty group before reaping it would wait in vain.
            // SAFETY: a signal to our own child's process group.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait().await;
        }
        // Whatever happened, nothing of the program outlives this call.
        kill_group(pid).await;
        let (status, stdout, stderr, timed_out) = match waited {
            Ok((status, out, err)) => (Some(status?), out, err, false),
            Err(_) => (None, String::new(), String::new(), true),
        };
        use std::os::unix::process::ExitStatusExt;
        let exit_code = status.and_then(|s| s.code());
        let signal = status.and_then(|s| s.signal());
        let verdict = match (timed_out, exit_code, signal) {
            (true, _, _) => Verdict::TimedOut,
            (_, Some(0), _) => Verdict::Passed,
            (_, Some(_), _) => Verdict::Failed,
            (_, None, Some(libc::SIGXCPU | libc::SIGKILL)) => Verdict::TimedOut,
            _ => Verdict::Crashed,
        };
        let error = if verdict == Verdict::Failed {
            stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .to_string()
        } else {
            String::new()
        };
        Ok(Execution {
            verdict,
            exit_code,
            signal,
            error,
            stdout,
            stderr,
            wall_seconds: started.elapsed().as_secs_f64(),
            pid,
        })
    }
}

/// Kills the process group `pgid` and waits (up to 2 s) until none of its processes is left.
async fn kill_group(pgid: u32) {
    let pgid = pgid as libc::pid_t;
    for _ in 0..200 {
        // SAFETY: signals to our own child's process group.
        let alive = unsafe { libc::kill(-pgid, libc::SIGKILL) } == 0;
        if !alive {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(
        pgid,
        "processes of a sandboxed program are still exiting after 2 s"
    );
}

/// Reads at most `cap` bytes, then closes the pipe (a program writing more gets SIGPIPE).
async fn read_capped(pipe: impl tokio::io::AsyncRead + Unpin, cap: usize) -> String {
    let mut buf = Vec::new();
    let _ = pipe.take(cap as u64).read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// In the child, between fork and exec.
fn confine(limits: &Limits, isolation: Isolation, dir: &std::ffi::CStr) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: async-signal-safe system calls with valid, pre-built arguments.
    unsafe {
        check(if libc::setsid() < 0 { -1 } else { 0 })?;
        if isolation == Isolation::Namespaces {
            check(libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS))?;
            let none = std::ptr::null();
            let root = c"/".as_ptr();
            check(libc::mount(
                none,
                root,
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            // The temp dir becomes its own mount so it stays writable when `/` goes read-only.
            check(libc::mount(
                dir.as_ptr(),
                dir.as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                none,
                root,
                none,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ))?;
            // World-writable places that are mounts of their own stay writable under a read-only
            // `/`: make them read-only too (EINVAL where one is not a mount point is fine). The temp
            // dir is a separate mount below them and stays writable.
            for place in [c"/dev/shm", c"/tmp", c"/var/tmp", c"/run/lock"] {
                let _ = libc::mount(
                    none,
                    place.as_ptr(),
                    none,
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                );
            }
            // std changed directory before this hook ran, i.e. into the old (now read-only) mount.
            check(libc::chdir(dir.as_ptr()))?;
        }
        let limit = |resource, value: u64| {
            check(libc::setrlimit(
                resource,
                &libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                },
            ))
        };
        limit(libc::RLIMIT_CPU, limits.cpu_secs)?;
        limit(libc::RLIMIT_AS, limits.memory_bytes)?;
        limit(libc::RLIMIT_FSIZE, limits.max_file_bytes)?;
        limit(libc::RLIMIT_NOFILE, 64)?;
        limit(libc::RLIMIT_CORE, 0)?;
        limit(libc::RLIMIT_NPROC, limits.max_processes)?;
        if isolation == Isolation::Namespaces {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(NOBODY))?;
            check(libc::setuid(NOBODY))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sandbox() -> Sandbox {
        Sandbox::new(
            None,
            Limits {
                wall: Duration::from_secs(3),
                cpu_secs: 2,
                ..Limits::default()
            },
            2,
        )
        .await
        .unwrap()
    }

    fn group_is_gone(pid: u32) -> bool {
        // SAFETY: signal 0 only checks for existence.
        unsafe {
            libc::kill(-(pid as i32), 0) == -1
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        }
    }

    #[tokio::test]
    async fn verdicts_follow_exit_status_and_limits() {
        let s = sandbox().await;
        let e = s.run("assert 1 + 1 == 2\nprint('hi')").await.unwrap();
        assert_eq!((e.verdict, e.stdout.as_str()), (Verdict::Passed, "hi\n"));
        let e = s
            .run("def f(): return 1\nassert f() == 2, 'f is wrong'")
            .await
            .unwrap();
        assert_eq!(e.verdict, Verdict::Failed);
        assert_eq!(e.error, "AssertionError: f is wrong");
        let e = s.run("while True:\n    pass").await.unwrap();
        assert_eq!(e.verdict, Verdict::TimedOut);
        assert!(e.wall_seconds < 10.0);
        let e = s
            .run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
            .await
            .unwrap();
        assert_eq!(
            (e.verdict, e.signal),
            (Verdict::Crashed, Some(libc::SIGSEGV))
        );
    }

    #[tokio::test]
    async fn huge_allocations_and_floods_only_hurt_the_program() {
        let s = sandbox().await;
        let e = s.run("x = bytearray(10 * 1024**3)").await.unwrap();
        assert_eq!(e.verdict, Verdict::Failed);
        assert!(e.error.contains("MemoryError"), "{}", e.error);
        let e = s
            .run("import sys\nfor _ in range(10**6): sys.stdout.write('x' * 1000)")
            .await
            .unwrap();
        assert!(e.stdout.len() <= Limits::default().max_output);
        assert_ne!(e.verdict, Verdict::Passed);
    }

    #[tokio::test]
    async fn a_fork_bomb_leaves_nothing_behind_and_only_delays_others() {
        let s = sandbox().await;
        let bomb = s.run("import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)");
        // Four programs start while the bomb holds every process `nobody` may have. The first
        // takes the kernel past the limit (root forks, then drops to `nobody`), so exec fails with
        // EAGAIN for the others: they wait for room and pass (CI once failed here).
        let others = Sandbox::new(None, Limits::default(), 4).await.unwrap();
        let others = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let run = |_| others.run("import time; time.sleep(0.3); print('ok')");
            futures::future::join_all((0..4).map(run)).await
        };
        let (e, others) = tokio::join!(bomb, others);
        let e = e.unwrap();
        assert_eq!(e.verdict, Verdict::TimedOut);
        assert!(group_is_gone(e.pid), "processes of the fork bomb survived");
        for other in others {
            let other = other.unwrap();
            assert_eq!(other.verdict, Verdict::Passed, "{other:?}");
            assert_eq!(other.stdout.trim(), "ok");
        }
    }

    #[tokio::test]
    async fn the_environment_is_empty_and_the_directory_is_private() {
        std::env::set_var("PHIGEN_SANDBOX_SECRET", "sk-should-not-leak");
        let s = sandbox().await;
        let e = s.run("import os\nassert 'PHIGEN_SANDBOX_SECRET' not in os.environ, dict(os.environ)\nopen('scratch.txt', 'w').write('ok')\nprint(os.getcwd())").await.unwrap();
        assert_eq!(e.verdict, Verdict::Passed, "{}", e.stderr);
        assert!(
            !Path::new(e.stdout.trim()).exists(),
            "the temp dir must be removed afterwards"
        );
    }

    #[tokio::test]
    async fn files_outside_and_the_network_are_out_of_reach_when_isolated() {
        let s = sandbox().await;
        if s.isolation() != Isolation::Namespaces {
            eprintln!("not root: namespaces unavailable, skipping the isolation checks");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, "keep me").unwrap();
        let e = s
            .run(&format!(
                "import os\nos.remove({:?})",
                victim.to_str().unwrap()
            ))
            .await
            .unwrap();
        assert_eq!(e.verdict, Verdict::Failed);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        let outside = dir.path().join("new.txt");
        let e = s
            .run(&format!(
                "open({:?}, 'w').write('x')",
                outside.to_str().unwrap()
            ))
            .await
            .unwrap();
        assert_eq!(e.verdict, Verdict::Failed);
        assert!(!outside.exists());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let e = s
            .run(&format!(
                "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
            ))
            .await
            .unwrap();
        assert_eq!(
            e.verdict,
            Verdict::Failed,
            "the program reached the network"
        );
    }

    #[tokio::test]
    async fn a_missing_python_is_a_clear_error() {
        let err = Sandbox::new(
            Some(Path::new("/nonexistent/python3")),
            Limits::default(),
            1,
        )
        .await
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("/nonexistent/python3")
                && err.to_string().contains("install Python 3"),
            "{err}"
        );
    }
}

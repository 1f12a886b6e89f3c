//! Data parallel training: N processes (ranks), each holding the whole model, each computing the
//! gradients of its share of a step's micro-batches; the gradients are summed over the ranks, so
//! every rank takes the same optimizer step.
//!
//! The launchers users already have start the ranks: `torchrun --no-python --nproc-per-node N
//! phigen train …` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) or `srun phigen train …` (`SLURM_PROCID`,
//! `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`). [`World::from_env`] reads them; without them the world
//! is one process. Slurm's job size (`SLURM_NTASKS`) is not the step's: a batch script of a job
//! with `--ntasks 8` is one process until it runs `srun`, which sets `SLURM_STEP_NUM_TASKS`.
//!
//! Rank r takes micro-batches r, r + N, r + 2N … of each step, and a step's micro-batches are a
//! function of (seed, stage, step) alone, so the global batch, and so the curve, does not depend on
//! N: a run resumed on another number of processes goes on where it was. Rank 0 alone writes
//! checkpoints, metrics and plots.
//!
//! Two backends do the sums ([`Comm`]):
//! - NCCL (the CUDA build): the one for real scale. Rank 0 makes the NCCL unique id and hands it to
//!   the others over the same rendezvous socket the CPU backend uses, not `MASTER_PORT`, which
//!   torchrun's agent owns.
//! - Local IPC (CPU): a test and laptop backend. Rank 0 listens on an abstract Unix socket named
//!   after the run directory and the launch; the others connect. An all-reduce sends each rank's
//!   buffer to rank 0, which adds them in rank order (so the sum is the same in every run) and
//!   sends the sum back. All ranks must be on one machine.
//!
//! A rank that dies closes its sockets: the others get an error at their next collective and
//! exit, instead of waiting for it. A rank that hangs is given up on after the timeout
//! (`PHIGEN_DIST_TIMEOUT`, seconds, default 1800).

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

/// The ranks of a run, from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The rank's index on its machine: its GPU.
    pub local_rank: usize,
    /// What tells this launch apart from an earlier one on the same run directory (torchrun's run
    /// id and restart count, Slurm's job and step); empty when the launcher gives none.
    pub launch: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{var}={value}: expected a whole number; the launcher (torchrun or srun) sets it")]
    BadVar { var: &'static str, value: String },
    #[error("{set} is set but {missing} is not: data parallel training needs both (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; srun sets SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID); unset {set} to train in one process")]
    MissingVar {
        set: &'static str,
        missing: &'static str,
    },
    #[error("{rank_var}={rank} is not below {size_var}={size}: the rank must be in 0..{size}")]
    RankOutOfRange {
        rank_var: &'static str,
        rank: usize,
        size_var: &'static str,
        size: usize,
    },
    #[error("rank {rank} of {size}: the ranks did not all meet within {secs} s (rank 0 listens on the rendezvous socket for {dir}; the others connect to it). Start all {size} ranks with the same --out on one machine (the CPU backend is local; NCCL spans machines), or raise PHIGEN_DIST_TIMEOUT")]
    Rendezvous {
        rank: usize,
        size: usize,
        secs: u64,
        dir: String,
    },
    #[error("rank {rank}: {what} (the other ranks run with another WORLD_SIZE, recipe or resume point); launch every rank with the same command")]
    Mismatch { rank: usize, what: String },
    #[error("rank {rank}: lost rank {peer} ({source}): it died or stopped answering within PHIGEN_DIST_TIMEOUT; the whole job stops, and `--resume` continues from the last checkpoint (on any number of ranks)")]
    PeerLost {
        rank: usize,
        peer: usize,
        source: std::io::Error,
    },
    #[error("PHIGEN_DIST_TIMEOUT={0}: expected a number of seconds above 0")]
    BadTimeout(String),
    #[error("data parallel training on {device:?}: {what}")]
    Backend { device: Device, what: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl World {
    /// One process.
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            launch: String::new(),
        }
    }

    /// The world torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) or srun (`SLURM_PROCID`,
    /// `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`) describes, torchrun's first; one process without
    /// either. A Slurm batch script has `SLURM_PROCID` but no step size: one process.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<World, DistError> {
        let num = |name: &'static str| -> Result<Option<usize>, DistError> {
            var(name)
                .map(|v| {
                    v.trim().parse().map_err(|_| DistError::BadVar {
                        var: name,
                        value: v.clone(),
                    })
                })
                .transpose()
        };
        let launchers: [(&str, &str, &str, [&str; 2]); 2] = [
            (
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                ["TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"],
            ),
            (
                "SLURM_PROCID",
                "SLURM_STEP_NUM_TASKS",
                "SLURM_LOCALID",
                ["SLURM_JOB_ID", "SLURM_STEP_ID"],
            ),
        ];
        for (rank_var, size_var, local_var, launch_vars) in launchers {
            match (num(rank_var)?, num(size_var)?) {
                (None, None) => continue,
                (Some(_), None) if rank_var == "SLURM_PROCID" => continue,
                (Some(_), None) => {
                    return Err(DistError::MissingVar {
                        set: rank_var,
                        missing: size_var,
                    })
                }
                (None, Some(_)) => {
                    return Err(DistError::MissingVar {
                        set: size_var,
                        missing: rank_var,
                    })
                }
                (Some(rank), Some(size)) => {
                    if rank >= size {
                        return Err(DistError::RankOutOfRange {
                            rank_var,
                            rank,
                            size_var,
                            size,
                        });
                    }
                    let launch = launch_vars
                        .iter()
                        .map(|v| var(v).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join("/");
                    return Ok(World {
                        rank,
                        size,
                        local_rank: num(local_var)?.unwrap_or(0),
                        launch,
                    });
                }
            }
        }
        Ok(World::single())
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// The items of `0..n` this rank computes (a step's micro-batches, the validation batches):
    /// every N-th from its rank.
    pub fn my_share(&self, n: usize) -> impl Iterator<Item = usize> {
        (self.rank..n).step_by(self.size)
    }
}

/// Seconds a rank waits for the others (to meet, or in a collective) before giving up.
fn timeout() -> Result<Duration, DistError> {
    match std::env::var("PHIGEN_DIST_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(1800)),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
            _ => Err(DistError::BadTimeout(v)),
        },
    }
}

/// How the ranks sum their gradients.
pub enum Comm {
    /// One process: sums are the rank's own values.
    Single,
    /// Sockets to rank 0 (the CPU backend, and the rendezvous of NCCL's).
    Ipc(Ipc),
    #[cfg(feature = "cuda")]
    Nccl(nccl::Nccl),
}

impl Comm {
    /// Connects the ranks of `world` training into run directory `out` on `device`: NCCL on a
    /// CUDA device, local IPC on the CPU.
    pub fn connect(world: &World, out: &Path, device: &Device) -> Result<Comm, DistError> {
        if world.size == 1 {
            return Ok(Comm::Single);
        }
        let ipc = Ipc::connect(world, out)?;
        match device {
            Device::Cpu => Ok(Comm::Ipc(ipc)),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(Comm::Nccl(nccl::Nccl::connect(ipc, device)?)),
            other => Err(DistError::Backend {
                device: other.clone(),
                what: "no collective backend for this device (CPU: local IPC; CUDA: NCCL, in the build with --features cuda)".into(),
            }),
        }
    }

    /// `t` (1-D f32) summed over the ranks, on every rank, added in rank order.
    pub fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor, DistError> {
        match self {
            Comm::Single => Ok(t.clone()),
            Comm::Ipc(ipc) => {
                let mut values = t.to_vec1::<f32>()?;
                ipc.all_reduce_sum(&mut values)?;
                Ok(Tensor::from_vec(values, t.dims(), t.device())?)
            }
            #[cfg(feature = "cuda")]
            Comm::Nccl(n) => n.all_reduce_sum(t),
        }
    }

    /// The sockets between the ranks (NCCL's rendezvous carries the host sums too); `None` in
    /// one process.
    fn ipc(&mut self) -> Option<&mut Ipc> {
        match self {
            Comm::Single => None,
            Comm::Ipc(ipc) => Some(ipc),
            #[cfg(feature = "cuda")]
            Comm::Nccl(n) => Some(&mut n.ipc),
        }
    }

    /// Sums a few host numbers over the ranks (losses, counts, flags).
    pub fn sum_host(&mut self, values: &mut [f32]) -> Result<(), DistError> {
        self.ipc().map_or(Ok(()), |ipc| ipc.all_reduce_sum(values))
    }

    /// Rank 0 tells the others whether to train (`go`): a whole-run recipe's other ranks wait
    /// here, for as long as its data steps take, until rank 0 reaches the training step or ends
    /// without one ([`Comm::await_root`]).
    pub fn signal(&mut self, go: bool) -> Result<(), DistError> {
        self.sum_host(&mut [f32::from(u8::from(go))])
    }

    /// The other side of [`Comm::signal`], without a timeout: the wait ends when rank 0 signals,
    /// or with an error when it dies.
    pub fn await_root(&mut self) -> Result<bool, DistError> {
        let Some(ipc) = self.ipc() else {
            return Ok(true);
        };
        let mut go = [0f32];
        ipc.patient(|ipc| ipc.all_reduce_sum(&mut go))?;
        Ok(go[0] > 0.0)
    }

    /// Errors unless every rank passes the same `values` (where the run starts, the batch
    /// layout): ranks that disagree would sum gradients of different steps.
    pub fn agree(&mut self, what: &str, values: &[f32]) -> Result<(), DistError> {
        let Some(ipc) = self.ipc() else {
            return Ok(());
        };
        let (rank, ranks) = (ipc.rank, ipc.size as f32);
        // Every rank has the same v ⇔ the sum is n·v and the sum of squares n·v².
        let mut sums: Vec<f32> = values.iter().chain(values).copied().collect();
        let n = values.len();
        for s in &mut sums[n..] {
            *s *= *s;
        }
        ipc.all_reduce_sum(&mut sums)?;
        let close = |sum: f32, v: f32| (sum - ranks * v).abs() <= 1e-3 * v.abs().max(1.0);
        if values
            .iter()
            .enumerate()
            .all(|(i, &v)| close(sums[i], v) && close(sums[n + i], v * v))
        {
            Ok(())
        } else {
            Err(DistError::Mismatch {
                rank,
                what: format!("{what} differs between the ranks (this rank: {values:?})"),
            })
        }
    }
}

/// The local IPC backend: rank 0 holds a socket to every other rank.
pub struct Ipc {
    rank: usize,
    size: usize,
    /// Rank 0: the sockets of ranks 1..size, in rank order. Others: the one to rank 0.
    peers: Vec<UnixStream>,
}

/// The first bytes of every hello, so a stray connection is told apart.
const MAGIC: &[u8; 8] = b"phigenDP";

impl Ipc {
    fn connect(world: &World, out: &Path) -> Result<Ipc, DistError> {
        let limit = timeout()?;
        let dir = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
        let key =
            blake3::hash(format!("{}\n{}\n{}", dir.display(), world.launch, world.size).as_bytes());
        let name = format!("phigen-dp-{}", &key.to_hex()[..32]);
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("short abstract name");
        let rendezvous = || DistError::Rendezvous {
            rank: world.rank,
            size: world.size,
            secs: limit.as_secs(),
            dir: dir.display().to_string(),
        };
        let lost = |peer: usize| {
            move |source: std::io::Error| DistError::PeerLost {
                rank: world.rank,
                peer,
                source,
            }
        };
        let deadline = Instant::now() + limit;
        let mut peers: Vec<Option<UnixStream>> = Vec::new();
        if world.is_root() {
            let listener = UnixListener::bind_addr(&addr).map_err(|_| rendezvous())?;
            listener.set_nonblocking(true).map_err(lost(0))?;
            peers.resize_with(world.size - 1, || None);
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(lost(0))?;
                        s.set_read_timeout(Some(limit)).map_err(lost(0))?;
                        let mut hello = [0u8; 24];
                        if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                            continue;
                        }
                        let rank = u64::from_le_bytes(hello[8..16].try_into().expect("8")) as usize;
                        let size =
                            u64::from_le_bytes(hello[16..24].try_into().expect("8")) as usize;
                        if size != world.size
                            || rank == 0
                            || rank >= size
                            || peers[rank - 1].is_some()
                        {
                            return Err(DistError::Mismatch {
                                rank: 0,
                                what: format!(
                                    "a rank said it is rank {rank} of {size}, this is rank 0 of {}",
                                    world.size
                                ),
                            });
                        }
                        peers[rank - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(rendezvous());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(lost(0)(e)),
                }
            }
        } else {
            let mut s = loop {
                match UnixStream::connect_addr(&addr) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => return Err(rendezvous()),
                }
            };
            s.set_read_timeout(Some(limit)).map_err(lost(0))?;
            let mut hello = MAGIC.to_vec();
            hello.extend((world.rank as u64).to_le_bytes());
            hello.extend((world.size as u64).to_le_bytes());
            s.write_all(&hello).map_err(lost(0))?;
            peers.push(Some(s));
        }
        Ok(Ipc {
            rank: world.rank,
            size: world.size,
            peers: peers
                .into_iter()
                .map(|p| p.expect("every rank met"))
                .collect(),
        })
    }

    /// Runs `f` with no read timeout on the sockets.
    fn patient(
        &mut self,
        f: impl FnOnce(&mut Ipc) -> Result<(), DistError>,
    ) -> Result<(), DistError> {
        let limit = self
            .peers
            .first()
            .and_then(|s| s.read_timeout().ok().flatten());
        let set = |ipc: &mut Ipc, t: Option<Duration>| -> Result<(), DistError> {
            for (i, s) in ipc.peers.iter().enumerate() {
                s.set_read_timeout(t)
                    .map_err(|source| DistError::PeerLost {
                        rank: ipc.rank,
                        peer: if ipc.rank == 0 { i + 1 } else { 0 },
                        source,
                    })?;
            }
            Ok(())
        };
        set(self, None)?;
        f(self)?;
        set(self, limit)
    }

    /// Sums `values` over the ranks in place: the others send theirs to rank 0, which adds them
    /// in rank order and sends the sum back.
    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), DistError> {
        let rank = self.rank;
        if rank == 0 {
            let mut buf = vec![0u8; values.len() * 4];
            for (i, peer) in self.peers.iter_mut().enumerate() {
                read_floats(peer, &mut buf).map_err(|source| DistError::PeerLost {
                    rank,
                    peer: i + 1,
                    source,
                })?;
                for (v, b) in values.iter_mut().zip(buf.chunks_exact(4)) {
                    *v += f32::from_le_bytes(b.try_into().expect("4 bytes"));
                }
            }
            let sum = floats_to_bytes(values);
            for (i, peer) in self.peers.iter_mut().enumerate() {
                write_floats(peer, &sum).map_err(|source| DistError::PeerLost {
                    rank,
                    peer: i + 1,
                    source,
                })?;
            }
        } else {
            let lost = |source| DistError::PeerLost {
                rank,
                peer: 0,
                source,
            };
            let peer = &mut self.peers[0];
            write_floats(peer, &floats_to_bytes(values)).map_err(lost)?;
            let mut buf = vec![0u8; values.len() * 4];
            read_floats(peer, &mut buf).map_err(lost)?;
            for (v, b) in values.iter_mut().zip(buf.chunks_exact(4)) {
                *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        Ok(())
    }
}

fn floats_to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A length-prefixed message, so ranks that disagree on the size fail instead of misreading.
fn write_floats(s: &mut UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)
}

fn read_floats(s: &mut UnixStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len) as usize;
    if len != buf.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of {len} bytes where {} were expected", buf.len()),
        ));
    }
    s.read_exact(buf)
}

#[cfg(feature = "cuda")]
mod nccl {
    //! The NCCL backend: gradients are summed on the GPUs.
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::cuda_backend::CudaStorageSlice;
    use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

    use super::{DistError, Ipc};

    pub struct Nccl {
        /// The rendezvous, kept for host sums and agreement checks.
        pub ipc: Ipc,
        comm: Arc<Comm>,
    }

    impl Nccl {
        /// Rank 0 makes the unique id and sends it to the others over the rendezvous sockets
        /// (as 128 floats holding one byte each, through the same sum: the others add zeros).
        pub fn connect(mut ipc: Ipc, device: &Device) -> Result<Nccl, DistError> {
            let backend = |what: String| DistError::Backend {
                device: device.clone(),
                what,
            };
            let Device::Cuda(dev) = device else {
                unreachable!("NCCL is chosen for CUDA devices only")
            };
            let mut bytes = [0f32; 128];
            if ipc.rank == 0 {
                let id = Id::new().map_err(|e| backend(format!("ncclGetUniqueId: {e:?} (is libnccl.so.2 on LD_LIBRARY_PATH? PyTorch ships it in nvidia/nccl/lib)")))?;
                for (b, c) in bytes.iter_mut().zip(id.internal()) {
                    *b = *c as u8 as f32;
                }
            }
            ipc.all_reduce_sum(&mut bytes)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            for (c, b) in internal.iter_mut().zip(bytes) {
                *c = b as u8 as std::ffi::c_char;
            }
            let comm = Comm::from_rank(dev.cuda_stream(), ipc.rank, ipc.size, Id::uninit(internal))
                .map_err(|e| backend(format!("ncclCommInitRank: {e:?}")))?;
            Ok(Nccl {
                ipc,
                comm: Arc::new(comm),
            })
        }

        pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, DistError> {
            Ok(t.contiguous()?
                .apply_op1_no_bwd(&AllReduce(Arc::clone(&self.comm)))?)
        }
    }

    // SAFETY: the communicator moves with its owner between threads (a recipe's steps run on
    // threads of their own) but is used by one thread at a time, as NCCL requires.
    unsafe impl Send for Nccl {}

    struct AllReduce(Arc<Comm>);

    // SAFETY (Send/Sync): the communicator is used from the training thread only.
    unsafe impl Send for AllReduce {}
    unsafe impl Sync for AllReduce {}

    impl CustomOp1 for AllReduce {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL all-reduce of a CPU tensor")
        }

        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
            let (start, end) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("all-reduce of a strided tensor".into()))?;
            let CudaStorageSlice::F32(src) = &s.slice else {
                candle_core::bail!("NCCL all-reduce: gradients are summed in f32");
            };
            let src = src.slice(start..end);
            let dev = s.device.clone();
            // SAFETY: every element is written by the all-reduce before it is read.
            let mut dst = unsafe { dev.alloc::<f32>(end - start) }?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
            Ok((
                candle_core::CudaStorage::wrap_cuda_slice(dst, dev),
                l.shape().clone(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// The world comes from torchrun's variables, else srun's; a Slurm batch script (SLURM_PROCID
    /// and the job's SLURM_NTASKS, no step size) and no launcher are one process; half a pair,
    /// a rank past the size and a non-number are errors naming the variable. (Variable names from
    /// torchrun's and srun's documentation.)
    #[test]
    fn the_world_comes_from_the_launcher() {
        let w = World::from_env(env(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "0"),
            ("TORCHELASTIC_RUN_ID", "abc"),
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "1"),
        ]))
        .unwrap();
        assert_eq!((w.rank, w.size, w.local_rank), (2, 4, 0));
        assert_eq!(w.launch, "abc/");
        let w = World::from_env(env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_ID", "77"),
            ("SLURM_STEP_ID", "0"),
        ]))
        .unwrap();
        assert_eq!(
            (w.rank, w.size, w.local_rank, w.launch.as_str()),
            (5, 8, 1, "77/0")
        );
        let batch = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_JOB_ID", "77"),
        ]);
        assert_eq!(World::from_env(batch).unwrap(), World::single());
        assert_eq!(World::from_env(env(&[])).unwrap(), World::single());
        let err = |vars: &[(&str, &str)]| World::from_env(env(vars)).unwrap_err().to_string();
        assert!(err(&[("RANK", "1")]).contains("WORLD_SIZE"));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("0..2"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=x"));
    }

    /// Each rank takes every N-th micro-batch: together exactly the step's, each once.
    #[test]
    fn ranks_share_out_the_micro_batches() {
        let mut all: Vec<usize> = (0..3)
            .flat_map(|rank| {
                World {
                    rank,
                    size: 3,
                    local_rank: rank,
                    launch: String::new(),
                }
                .my_share(8)
                .collect::<Vec<_>>()
            })
            .collect();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
    }
}

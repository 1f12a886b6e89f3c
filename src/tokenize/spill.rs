//! Documents in id order without holding the corpus in memory: tokenized documents are spilled
//! into buckets by the hash of their id, then each bucket is sorted and replayed.
//!
//! The order is a function of the documents alone (their ids, then their tokens for equal ids),
//! not of which file or position a record landed in. Generation writes records in the order the
//! teacher answers, so two runs that made the same records (one killed and resumed, one not)
//! tokenize to the same bytes. Hash order also shuffles documents across sources.
//!
//! A bucket file holds records `key u64 | id_len u32 | id | split u8 | n u32 | n × u32 tokens`
//! (little endian); the buckets live in `OUT/.phigen.spill/` and are removed when replayed.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::Split;

/// Largest bucket, bytes of spilled tokens (what one sort holds in memory).
const BUCKET_BYTES: u64 = 256 << 20;
/// Most buckets (open files at once).
const MAX_BUCKETS: u64 = 256;

pub struct Spill {
    dir: PathBuf,
    buckets: Vec<BufWriter<File>>,
    /// Bits the key is shifted right by to give its bucket.
    shift: u32,
}

/// The sort key of a document id: its hash's first 8 bytes.
fn key(id: &str) -> u64 {
    u64::from_le_bytes(
        blake3::hash(id.as_bytes()).as_bytes()[..8]
            .try_into()
            .expect("8 bytes"),
    )
}

impl Spill {
    /// Buckets for about `input_bytes` of text (tokens take about as many bytes as the text).
    pub fn create(dir: &Path, input_bytes: u64) -> std::io::Result<Spill> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?; // a killed run's buckets: this stage's own scratch
        }
        std::fs::create_dir_all(dir)?;
        let n = input_bytes
            .div_ceil(BUCKET_BYTES)
            .clamp(1, MAX_BUCKETS)
            .next_power_of_two();
        let buckets = (0..n)
            .map(|i| File::create(dir.join(format!("{i:03}"))).map(BufWriter::new))
            .collect::<std::io::Result<_>>()?;
        Ok(Spill {
            dir: dir.to_path_buf(),
            buckets,
            shift: 64 - n.trailing_zeros(),
        })
    }

    pub fn push(&mut self, id: &str, split: Split, ids: &[u32]) -> std::io::Result<()> {
        let k = key(id);
        let b = if self.shift == 64 {
            0
        } else {
            (k >> self.shift) as usize
        };
        let w = &mut self.buckets[b];
        w.write_all(&k.to_le_bytes())?;
        w.write_all(&(id.len() as u32).to_le_bytes())?;
        w.write_all(id.as_bytes())?;
        w.write_all(&[matches!(split, Split::Val) as u8])?;
        w.write_all(&(ids.len() as u32).to_le_bytes())?;
        for t in ids {
            w.write_all(&t.to_le_bytes())?;
        }
        Ok(())
    }

    /// Calls `each` with every document in (key, id, tokens) order, then removes the buckets.
    /// An I/O error of the buckets becomes an `E` through `io`.
    pub fn drain<E>(
        self,
        io: impl Fn(std::io::Error) -> E,
        mut each: impl FnMut(Split, &[u32]) -> Result<(), E>,
    ) -> Result<(), E> {
        let paths: Vec<PathBuf> = (0..self.buckets.len())
            .map(|i| self.dir.join(format!("{i:03}")))
            .collect();
        for w in self.buckets {
            w.into_inner().map_err(|e| io(e.into_error()))?;
        }
        for path in &paths {
            let mut docs = read_bucket(path).map_err(&io)?;
            docs.sort_unstable();
            for (_, _, split, ids) in &docs {
                each(*split, ids)?;
            }
            std::fs::remove_file(path).map_err(&io)?;
        }
        std::fs::remove_dir(&self.dir).map_err(io)
    }
}

type Doc = (u64, Vec<u8>, Split, Vec<u32>);

fn read_bucket(path: &Path) -> std::io::Result<Vec<Doc>> {
    let mut r = BufReader::new(File::open(path)?);
    let mut docs = Vec::new();
    let mut u64b = [0u8; 8];
    let mut u32b = [0u8; 4];
    loop {
        match r.read_exact(&mut u64b) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(docs),
            Err(e) => return Err(e),
        }
        let k = u64::from_le_bytes(u64b);
        r.read_exact(&mut u32b)?;
        let mut id = vec![0u8; u32::from_le_bytes(u32b) as usize];
        r.read_exact(&mut id)?;
        let mut split = [0u8; 1];
        r.read_exact(&mut split)?;
        r.read_exact(&mut u32b)?;
        let mut raw = vec![0u8; 4 * u32::from_le_bytes(u32b) as usize];
        r.read_exact(&mut raw)?;
        let ids = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let split = if split[0] == 1 {
            Split::Val
        } else {
            Split::Train
        };
        docs.push((k, id, split, ids));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replay order depends on the documents only: pushing the same documents in two orders,
    /// into one bucket or many, replays them identically, sorted by the hash of their ids.
    #[test]
    fn replay_order_is_independent_of_push_order_and_bucket_count() {
        let docs: Vec<(String, Vec<u32>)> = (0..200)
            .map(|i| (format!("doc-{i}"), vec![i as u32; (i % 7) + 1]))
            .collect();
        let replay = |order: &[usize], input_bytes: u64| {
            let dir = tempfile::tempdir().unwrap();
            let spill_dir = dir.path().join(".phigen.spill");
            let mut s = Spill::create(&spill_dir, input_bytes).unwrap();
            for &i in order {
                let split = if i % 5 == 0 { Split::Val } else { Split::Train };
                s.push(&docs[i].0, split, &docs[i].1).unwrap();
            }
            let mut out = Vec::new();
            s.drain(
                |e| e,
                |split, ids| {
                    out.push((split, ids.to_vec()));
                    Ok(())
                },
            )
            .unwrap();
            assert!(!spill_dir.exists(), "the buckets are removed");
            out
        };
        let forward: Vec<usize> = (0..docs.len()).collect();
        let backward: Vec<usize> = forward.iter().rev().copied().collect();
        let a = replay(&forward, 1);
        assert_eq!(a, replay(&backward, 1));
        assert_eq!(a, replay(&backward, 40 * BUCKET_BYTES)); // 64 buckets
                                                             // The expected order, computed independently: sort by the ids' hash prefix.
        let mut expected: Vec<usize> = forward.clone();
        expected.sort_by_key(|&i| key(&docs[i].0));
        let ids: Vec<Vec<u32>> = a.into_iter().map(|(_, ids)| ids).collect();
        let want: Vec<Vec<u32>> = expected.iter().map(|&i| docs[i].1.clone()).collect();
        assert_eq!(ids, want);
    }
}

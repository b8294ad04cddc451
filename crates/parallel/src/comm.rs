//! The [`Communicator`] trait: point-to-point messages of tensors, and the collectives every
//! mode needs, built once on top of them so that every implementation agrees bit for bit.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Tag of the collectives' messages; user tags must stay below it.
pub(crate) const TAG_COLLECTIVE: u16 = 30_000;
/// Tag of the failure notices [`Communicator::abort`] sends.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) const TAG_ABORT: u16 = 32_000;

/// Traffic a communicator has sent so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommStats {
    /// Messages sent.
    pub messages: u64,
    /// Tensor payload bytes sent (elements × element size; headers excluded).
    pub bytes: u64,
}

/// A group of `size` workers, each knowing its `rank`, that exchange tensors.
///
/// Messages between two ranks under one tag arrive in the order they were sent (MPI's
/// non-overtaking rule); different tags are independent. Every receive waits at most
/// [`Communicator::timeout`] and fails with [`Error::PeerFailed`] as soon as any worker calls
/// [`Communicator::abort`]. The collectives are provided methods built on `send`/`recv`:
/// reductions sum in rank order at rank 0 and broadcast the result, so every rank gets the
/// same bits whatever the timing.
pub trait Communicator {
    /// This worker's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of workers.
    fn size(&self) -> usize;
    /// How long a receive (or a send's delivery) waits before [`Error::Timeout`].
    fn timeout(&self) -> Duration;
    /// A short name for reports (`threads`, `mpi`).
    fn kind(&self) -> &'static str;
    /// Sends `tensors` to rank `to` under `tag` (below 30000). Returns once the message is
    /// handed over; delivery completes in the background.
    fn send(&self, to: usize, tag: u16, tensors: &[Tensor]) -> Result<()>;
    /// Receives the next message from rank `from` under `tag`.
    fn recv(&self, from: usize, tag: u16) -> Result<Vec<Tensor>>;
    /// Tells every other worker that this one failed with `reason`.
    fn abort(&self, reason: &str);
    /// Traffic sent so far by this worker.
    fn stats(&self) -> CommStats;

    /// Fails unless `rank` names a worker.
    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.size() {
            return Err(Error::config("rank", format!("a rank below the world size {}", self.size()), peer));
        }
        Ok(())
    }

    /// Fails unless `peer` names a worker other than this one (point-to-point messages go to
    /// others).
    fn check_other(&self, peer: usize) -> Result<()> {
        self.check_peer(peer)?;
        if peer == self.rank() {
            return Err(Error::config("peer", "a rank other than this worker's own", peer));
        }
        Ok(())
    }

    /// Waits until every worker has reached the barrier.
    fn barrier(&self) -> Result<()> {
        self.gather(0, &[])?;
        self.broadcast(0, &[])?;
        Ok(())
    }

    /// Rank `root`'s `tensors` on every rank (other ranks' `tensors` are ignored).
    fn broadcast(&self, root: usize, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        self.check_peer(root)?;
        if self.rank() == root {
            for r in (0..self.size()).filter(|&r| r != root) {
                self.send(r, TAG_COLLECTIVE, tensors)?;
            }
            Ok(tensors.to_vec())
        } else {
            self.recv(root, TAG_COLLECTIVE)
        }
    }

    /// Every rank's `tensors`, in rank order, at `root` (`None` elsewhere).
    fn gather(&self, root: usize, tensors: &[Tensor]) -> Result<Option<Vec<Vec<Tensor>>>> {
        self.check_peer(root)?;
        if self.rank() != root {
            self.send(root, TAG_COLLECTIVE, tensors)?;
            return Ok(None);
        }
        let mut all = Vec::with_capacity(self.size());
        for r in 0..self.size() {
            all.push(if r == root { tensors.to_vec() } else { self.recv(r, TAG_COLLECTIVE)? });
        }
        Ok(Some(all))
    }

    /// The element-wise sum of every rank's `t` (same shape everywhere), on every rank.
    /// Summed in rank order at rank 0, so all ranks hold identical bits.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let gathered = self.gather(0, std::slice::from_ref(t))?;
        let sum = match gathered {
            Some(all) => {
                let mut parts = all.into_iter().enumerate().map(|(r, mut v)| match v.len() {
                    1 => Ok(v.remove(0)),
                    n => Err(Error::Protocol {
                        rank: 0,
                        peer: r,
                        detail: format!("all-reduce expects 1 tensor per rank, found {n}"),
                    }),
                });
                let mut acc = parts.next().expect("a world has rank 0")?;
                for (r, p) in parts.enumerate() {
                    let p = p?;
                    if p.dims() != acc.dims() {
                        return Err(Error::Protocol {
                            rank: 0,
                            peer: r + 1,
                            detail: format!("all-reduce shape {:?}, expected {:?}", p.dims(), acc.dims()),
                        });
                    }
                    acc = (acc + p)?;
                }
                vec![acc]
            }
            None => Vec::new(),
        };
        let mut out = self.broadcast(0, &sum)?;
        match out.len() {
            1 => Ok(out.remove(0)),
            n => Err(Error::Protocol {
                rank: self.rank(),
                peer: 0,
                detail: format!("all-reduce result holds {n} tensors, expected 1"),
            }),
        }
    }

    /// Checks that every rank passes the same `values` (model shapes, a stage plan, the world
    /// size it was set up for) before work starts; the error names the first rank that
    /// differs from rank 0 and both values.
    fn check_agreement(&self, what: &'static str, values: &[u32]) -> Result<()> {
        let mine = Tensor::new(values, &Device::Cpu)?;
        let all = self.all_gather(&mine)?;
        let root = all[0].to_vec1::<u32>()?;
        for (r, t) in all.iter().enumerate().skip(1) {
            let theirs = t.to_vec1::<u32>()?;
            if theirs != root {
                return Err(Error::Config {
                    what,
                    expected: format!("the same on every rank, {root:?} at rank 0"),
                    found: format!("{theirs:?} at rank {r}"),
                });
            }
        }
        Ok(())
    }

    /// Every rank's `t`, in rank order, on every rank.
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let gathered = self.gather(0, std::slice::from_ref(t))?;
        let flat: Vec<Tensor> = gathered.map(|all| all.into_iter().flatten().collect()).unwrap_or_default();
        let out = self.broadcast(0, &flat)?;
        if out.len() != self.size() {
            return Err(Error::Protocol {
                rank: self.rank(),
                peer: 0,
                detail: format!("all-gather returned {} tensors for {} ranks", out.len(), self.size()),
            });
        }
        Ok(out)
    }
}

/// Payload bytes of `tensors` (elements × element size).
pub(crate) fn payload_bytes(tensors: &[Tensor]) -> u64 {
    tensors.iter().map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum()
}

const MAGIC: &[u8; 4] = b"PRT1";

fn dtype_code(d: DType) -> Option<u8> {
    Some(match d {
        DType::F32 => 0,
        DType::U32 => 1,
        DType::I64 => 2,
        DType::U8 => 3,
        _ => return None,
    })
}

/// Encodes `tensors` for the wire: magic, count, then per tensor its dtype, rank, dims and
/// little-endian data. Supports f32, u32, i64 and u8 (activations, token ids, masks).
pub fn encode_tensors(tensors: &[Tensor]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(16 + payload_bytes(tensors) as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    for t in tensors {
        let code = dtype_code(t.dtype()).ok_or_else(|| {
            Error::config("tensor dtype on the wire", "f32, u32, i64 or u8", format!("{:?}", t.dtype()))
        })?;
        out.push(code);
        out.push(t.rank() as u8);
        for &d in t.dims() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        let flat = t.flatten_all()?;
        match t.dtype() {
            DType::F32 => flat.to_vec1::<f32>()?.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DType::U32 => flat.to_vec1::<u32>()?.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DType::I64 => flat.to_vec1::<i64>()?.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            _ => out.extend_from_slice(&flat.to_vec1::<u8>()?),
        }
    }
    Ok(out)
}

/// Decodes [`encode_tensors`]' bytes onto `device`; a truncated or malformed message is an
/// error naming what was wrong (`peer` and `rank` only label it).
pub fn decode_tensors(bytes: &[u8], device: &Device, rank: usize, peer: usize) -> Result<Vec<Tensor>> {
    let bad = |detail: String| Error::Protocol { rank, peer, detail };
    let mut pos = 0usize;
    let mut take = |n: usize| -> Result<&[u8]> {
        let end = pos.checked_add(n).filter(|&e| e <= bytes.len()).ok_or_else(|| {
            bad(format!("message of {} bytes ends before byte {}", bytes.len(), pos.saturating_add(n)))
        })?;
        let s = &bytes[pos..end];
        pos = end;
        Ok(s)
    };
    if take(4)? != MAGIC {
        return Err(bad("missing the PRT1 header".into()));
    }
    let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
    let mut out = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let (code, rank_t) = {
            let h = take(2)?;
            (h[0], h[1] as usize)
        };
        let mut dims = Vec::with_capacity(rank_t);
        for _ in 0..rank_t {
            dims.push(u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize);
        }
        let n = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {dims:?} overflows")))?;
        let t = match code {
            0..=3 => {
                let size = [4, 4, 8, 1][code as usize];
                let data = take(n.checked_mul(size).ok_or_else(|| bad(format!("shape {dims:?} overflows")))?)?;
                match code {
                    0 => Tensor::from_vec(
                        data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect::<Vec<_>>(),
                        dims,
                        device,
                    )?,
                    1 => Tensor::from_vec(
                        data.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4"))).collect::<Vec<_>>(),
                        dims,
                        device,
                    )?,
                    2 => Tensor::from_vec(
                        data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect::<Vec<_>>(),
                        dims,
                        device,
                    )?,
                    _ => Tensor::from_vec(data.to_vec(), dims, device)?,
                }
            }
            c => return Err(bad(format!("unknown dtype code {c}"))),
        };
        out.push(t);
    }
    if pos != bytes.len() {
        return Err(bad(format!("{} trailing bytes after {count} tensors", bytes.len() - pos)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_wire_format_round_trips(rows in 0usize..5, cols in 1usize..7, seed in 0u32..1000) {
            let dev = Device::Cpu;
            let f: Vec<f32> = (0..rows * cols).map(|i| (i as f32 + seed as f32) * 0.37 - 3.0).collect();
            let u: Vec<u32> = (0..cols as u32).map(|i| i * 7 + seed).collect();
            let ts = vec![
                Tensor::from_vec(f.clone(), (rows, cols), &dev).unwrap(),
                Tensor::from_vec(u.clone(), cols, &dev).unwrap(),
            ];
            let bytes = encode_tensors(&ts).unwrap();
            let back = decode_tensors(&bytes, &dev, 0, 1).unwrap();
            prop_assert_eq!(back.len(), 2);
            prop_assert_eq!(back[0].dims(), &[rows, cols]);
            prop_assert_eq!(back[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(), f);
            prop_assert_eq!(back[1].to_vec1::<u32>().unwrap(), u);
            // Every strict prefix is rejected, never read out of bounds.
            for cut in [0, 3, bytes.len() / 2, bytes.len() - 1] {
                prop_assert!(decode_tensors(&bytes[..cut], &dev, 0, 1).is_err());
            }
        }
    }

    #[test]
    fn unsupported_dtypes_and_garbage_are_named() {
        let t = Tensor::zeros(3, DType::F16, &Device::Cpu).unwrap();
        let e = encode_tensors(&[t]).unwrap_err().to_string();
        assert!(e.contains("F16"), "{e}");
        let e = decode_tensors(b"NOPE\0\0\0\0", &Device::Cpu, 1, 0).unwrap_err().to_string();
        assert!(e.contains("PRT1") && e.contains("rank 0"), "{e}");
    }
}

//! In-process workers on threads: [`ThreadComm`] passes tensors through channels (no copies)
//! and [`run_threads`] runs one SPMD function per rank.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::comm::{CommStats, Communicator, payload_bytes};
use crate::{Error, Result};

struct Packet {
    tag: u16,
    tensors: Vec<Tensor>,
}

/// The channel from one peer, with the messages already taken off it under other tags.
type Inbox = Mutex<(Receiver<Packet>, VecDeque<Packet>)>;

#[derive(Default)]
struct Failure {
    failed: AtomicBool,
    first: Mutex<Option<(usize, String)>>,
}

/// One rank of a group of in-process workers; make the group with [`ThreadComm::world`].
pub struct ThreadComm {
    rank: usize,
    size: usize,
    timeout: Duration,
    to: Vec<Option<Sender<Packet>>>,
    from: Vec<Option<Inbox>>,
    failure: Arc<Failure>,
    messages: AtomicU64,
    bytes: AtomicU64,
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadComm {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

impl ThreadComm {
    /// `size` connected communicators, one per rank, whose receives wait at most `timeout`.
    pub fn world(size: usize, timeout: Duration) -> Result<Vec<ThreadComm>> {
        if size == 0 {
            return Err(Error::config("world size", "at least 1 worker", 0));
        }
        let failure = Arc::new(Failure::default());
        let mut to: Vec<Vec<Option<Sender<Packet>>>> = (0..size).map(|_| (0..size).map(|_| None).collect()).collect();
        let mut from: Vec<Vec<Option<Inbox>>> = (0..size).map(|_| (0..size).map(|_| None).collect()).collect();
        for a in 0..size {
            for b in (0..size).filter(|&b| b != a) {
                let (tx, rx) = channel();
                to[a][b] = Some(tx);
                from[b][a] = Some(Mutex::new((rx, VecDeque::new())));
            }
        }
        Ok(to
            .into_iter()
            .zip(from)
            .enumerate()
            .map(|(rank, (to, from))| ThreadComm {
                rank,
                size,
                timeout,
                to,
                from,
                failure: failure.clone(),
                messages: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            })
            .collect())
    }

    fn peer_failure(&self) -> Option<Error> {
        if !self.failure.failed.load(Ordering::Acquire) {
            return None;
        }
        let first = self.failure.first.lock().unwrap_or_else(|p| p.into_inner());
        match &*first {
            Some((peer, reason)) if *peer != self.rank => {
                Some(Error::PeerFailed { rank: self.rank, peer: *peer, reason: reason.clone() })
            }
            _ => None,
        }
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn kind(&self) -> &'static str {
        "threads"
    }

    fn send(&self, to: usize, tag: u16, tensors: &[Tensor]) -> Result<()> {
        self.check_other(to)?;
        if let Some(e) = self.peer_failure() {
            return Err(e);
        }
        let tx = self.to[to].as_ref().expect("a channel to every other rank");
        tx.send(Packet { tag, tensors: tensors.to_vec() }).map_err(|_| {
            self.peer_failure().unwrap_or(Error::PeerFailed {
                rank: self.rank,
                peer: to,
                reason: "its worker has ended".into(),
            })
        })?;
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(payload_bytes(tensors), Ordering::Relaxed);
        Ok(())
    }

    fn recv(&self, from: usize, tag: u16) -> Result<Vec<Tensor>> {
        self.check_other(from)?;
        let mut slot = self.from[from]
            .as_ref()
            .expect("a channel from every other rank")
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (rx, pending) = &mut *slot;
        if let Some(i) = pending.iter().position(|p| p.tag == tag) {
            return Ok(pending.remove(i).expect("position is in range").tensors);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(e) = self.peer_failure() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout { rank: self.rank, op: "recv", peer: from, after: self.timeout });
            }
            match rx.recv_timeout((deadline - now).min(Duration::from_millis(20))) {
                Ok(p) if p.tag == tag => return Ok(p.tensors),
                Ok(p) => pending.push_back(p),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.peer_failure().unwrap_or(Error::PeerFailed {
                        rank: self.rank,
                        peer: from,
                        reason: "its worker ended before sending the message".into(),
                    }));
                }
            }
        }
    }

    fn abort(&self, reason: &str) {
        let mut first = self.failure.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some((self.rank, reason.to_string()));
        }
        self.failure.failed.store(true, Ordering::Release);
    }

    fn stats(&self) -> CommStats {
        CommStats { messages: self.messages.load(Ordering::Relaxed), bytes: self.bytes.load(Ordering::Relaxed) }
    }
}

/// Runs `f` on `size` in-process workers, one thread each, and returns each rank's result.
///
/// A worker that returns an error or panics aborts the group: every other worker's pending
/// and later communication fails with [`Error::PeerFailed`] naming it, so none hangs.
pub fn run_threads<T: Send>(
    size: usize,
    timeout: Duration,
    f: impl Fn(&ThreadComm) -> Result<T> + Sync,
) -> Result<Vec<Result<T>>> {
    let comms = ThreadComm::world(size, timeout)?;
    let f = &f;
    Ok(std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                std::thread::Builder::new()
                    .name(format!("pare-worker-{}", comm.rank))
                    .spawn_scoped(s, move || {
                        let out = match catch_unwind(AssertUnwindSafe(|| f(&comm))) {
                            Ok(r) => r,
                            Err(p) => {
                                let message = p
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| p.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "a panic without a message".into());
                                Err(Error::Panicked { rank: comm.rank, message })
                            }
                        };
                        if let Err(e) = &out {
                            comm.abort(&e.to_string());
                        }
                        out
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker panics are caught")).collect()
    }))
}

/// All ranks' values, or the root cause when any failed: the first error that is not just a
/// report of another worker's failure ([`Error::is_consequence`]), else the first error.
pub fn first_error<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    let mut ok = Vec::with_capacity(results.len());
    let mut consequence = None;
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) if e.is_consequence() => {
                consequence.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    match consequence {
        Some(e) => Err(e),
        None => Ok(ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    #[test]
    fn collectives_agree_on_every_rank() {
        let out = run_threads(3, Duration::from_secs(5), |c| {
            let r = c.rank() as f32;
            let sum = c.all_reduce_sum(&t(&[r, 10.0 * r]))?.to_vec1::<f32>()?;
            let all = c.all_gather(&t(&[r]))?.iter().map(|x| x.to_vec1::<f32>().unwrap()[0]).collect::<Vec<_>>();
            let b = c.broadcast(2, &[t(&[r + 100.0])])?[0].to_vec1::<f32>()?;
            c.barrier()?;
            Ok((sum, all, b))
        })
        .unwrap();
        for r in first_error(out).unwrap() {
            assert_eq!(r.0, vec![3.0, 30.0]);
            assert_eq!(r.1, vec![0.0, 1.0, 2.0]);
            assert_eq!(r.2, vec![102.0]);
        }
    }

    #[test]
    fn tags_are_independent_queues() {
        let out = run_threads(2, Duration::from_secs(5), |c| {
            if c.rank() == 0 {
                c.send(1, 1, &[t(&[1.0])])?;
                c.send(1, 2, &[t(&[2.0])])?;
                c.send(1, 1, &[t(&[3.0])])?;
                Ok(vec![])
            } else {
                let a = c.recv(0, 2)?[0].to_vec1::<f32>()?[0];
                let b = c.recv(0, 1)?[0].to_vec1::<f32>()?[0];
                let d = c.recv(0, 1)?[0].to_vec1::<f32>()?[0];
                Ok(vec![a, b, d])
            }
        })
        .unwrap();
        assert_eq!(first_error(out).unwrap()[1], vec![2.0, 1.0, 3.0]);
    }

    #[test]
    fn a_failing_worker_fails_the_others_quickly() {
        let start = Instant::now();
        let out = run_threads(3, Duration::from_secs(30), |c| {
            if c.rank() == 1 {
                return Err(Error::config("test", "nothing", "a deliberate failure"));
            }
            c.recv(1, 0)?;
            Ok(())
        })
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
        for (r, res) in out.iter().enumerate() {
            let e = res.as_ref().unwrap_err().to_string();
            if r != 1 {
                assert!(e.contains("rank 1 failed") && e.contains("deliberate"), "{e}");
            }
        }
        assert!(first_error(out).unwrap_err().to_string().contains("deliberate"));
    }

    #[test]
    fn a_panicking_worker_is_reported_not_propagated() {
        let out = run_threads(2, Duration::from_secs(30), |c| {
            if c.rank() == 0 {
                panic!("worker 0 exploded");
            }
            c.recv(0, 0)?;
            Ok(())
        })
        .unwrap();
        let e = first_error(out).unwrap_err().to_string();
        assert!(e.contains("rank 0 panicked: worker 0 exploded"), "{e}");
    }

    #[test]
    fn a_hung_worker_times_out() {
        let start = Instant::now();
        let out = run_threads(2, Duration::from_millis(300), |c| {
            if c.rank() == 1 {
                std::thread::sleep(Duration::from_millis(1500));
                return Ok(());
            }
            c.recv(1, 0)?;
            Ok(())
        })
        .unwrap();
        let e = out[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("timed out after 300ms") && e.contains("rank 1"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn bad_ranks_are_errors() {
        assert!(ThreadComm::world(0, Duration::from_secs(1)).is_err());
        let w = ThreadComm::world(2, Duration::from_secs(1)).unwrap();
        let e = w[0].send(5, 0, &[]).unwrap_err().to_string();
        assert!(e.contains("world size 2") && e.contains("found 5"), "{e}");
        assert!(w[0].recv(0, 0).is_err());
    }
}

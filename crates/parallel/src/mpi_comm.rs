//! [`MpiComm`]: the communicator over MPI (the `mpi` crate over Open MPI), for processes on
//! one machine or many, started with `mpirun -np N`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::request::{Request, StaticScope};
use mpi::topology::{Communicator as _, SimpleCommunicator};

use crate::comm::{CommStats, Communicator, TAG_ABORT, decode_tensors, encode_tensors, payload_bytes};
use crate::{Error, Result};

/// A send in flight: MPI owns the buffer until the request completes.
struct InFlight {
    request: Request<'static, [u8], StaticScope>,
    buffer: *mut [u8],
    to: usize,
}

/// One MPI process's communicator over `MPI_COMM_WORLD`.
///
/// Sends are non-blocking (`MPI_Isend`) and complete in the background; receives poll with
/// `MPI_Improbe` so that they honour the timeout and notice failure notices (a reserved tag)
/// from any rank. Dropping the communicator waits (up to the timeout) for sends in flight,
/// then finalises MPI.
pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    device: Device,
    in_flight: RefCell<Vec<InFlight>>,
    /// The first failure notice received: (rank, reason).
    failed: RefCell<Option<(usize, String)>>,
    messages: AtomicU64,
    bytes: AtomicU64,
    // Declared last: dropped (MPI_Finalize) after everything above.
    _universe: mpi::environment::Universe,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiComm {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

impl MpiComm {
    /// Initialises MPI (once per process) and returns this process's communicator, whose
    /// receives wait at most `timeout`. Received tensors are created on `device`.
    pub fn init(timeout: Duration, device: Device) -> Result<Self> {
        let universe =
            mpi::initialize().ok_or_else(|| Error::Mpi("MPI is already initialised in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        tracing::debug!(rank, size, "MPI initialised");
        Ok(Self {
            world,
            rank,
            size,
            timeout,
            device,
            in_flight: RefCell::new(Vec::new()),
            failed: RefCell::new(None),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            _universe: universe,
        })
    }

    /// Ends the whole MPI job at once (`MPI_Abort`) with exit code `code`: for a process that
    /// has failed and must not leave peers waiting in MPI.
    pub fn abort_job(&self, code: i32) -> ! {
        mpi::topology::Communicator::abort(&self.world, code)
    }

    /// Posts a non-blocking send of `bytes`.
    fn post(&self, to: usize, tag: u16, bytes: Vec<u8>) {
        let buffer: *mut [u8] = Box::into_raw(bytes.into_boxed_slice());
        // SAFETY: `buffer` comes from `Box::into_raw` and is freed only in `complete` after
        // MPI reports the request finished (or leaked if it never does), so the `'static`
        // borrow MPI holds stays valid for as long as MPI may read it.
        let data: &'static [u8] = unsafe { &*buffer };
        let request = self.world.process_at_rank(to as i32).immediate_send_with_tag(StaticScope, data, tag as i32);
        self.in_flight.borrow_mut().push(InFlight { request, buffer, to });
    }

    /// Completes the sends that have finished; with `wait`, waits for all of them (up to the
    /// timeout, after which it fails naming the peer that did not take its message).
    fn complete(&self, wait: bool) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let pending = std::mem::take(&mut *self.in_flight.borrow_mut());
            let mut left = Vec::new();
            for f in pending {
                match f.request.test() {
                    Ok(_) => {
                        // SAFETY: the request finished, so MPI no longer reads the buffer; it
                        // came from `Box::into_raw` in `post` and is freed exactly once here.
                        drop(unsafe { Box::from_raw(f.buffer) });
                    }
                    Err(request) => left.push(InFlight { request, ..f }),
                }
            }
            let blocked = left.first().map(|f| f.to);
            self.in_flight.borrow_mut().extend(left);
            match blocked {
                None => return Ok(()),
                Some(_) if !wait => return Ok(()),
                Some(peer) => {
                    if let Some(e) = self.poll_abort() {
                        return Err(e);
                    }
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout { rank: self.rank, op: "send", peer, after: self.timeout });
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }

    /// A failure notice from any rank, if one has arrived (or arrived before: a failed group
    /// stays failed, so every later operation reports it too).
    fn poll_abort(&self) -> Option<Error> {
        if self.failed.borrow().is_none()
            && let Some((msg, status)) = self.world.any_process().immediate_matched_probe_with_tag(TAG_ABORT as i32)
        {
            let (bytes, _) = (msg, status).matched_receive_vec::<u8>();
            *self.failed.borrow_mut() =
                Some((status.source_rank() as usize, String::from_utf8_lossy(&bytes).into_owned()));
        }
        let failed = self.failed.borrow();
        let (peer, reason) = failed.as_ref()?;
        Some(Error::PeerFailed { rank: self.rank, peer: *peer, reason: reason.clone() })
    }
}

impl Communicator for MpiComm {
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
        "mpi"
    }

    fn send(&self, to: usize, tag: u16, tensors: &[Tensor]) -> Result<()> {
        self.check_other(to)?;
        if let Some(e) = self.poll_abort() {
            return Err(e);
        }
        self.complete(false)?;
        self.post(to, tag, encode_tensors(tensors)?);
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(payload_bytes(tensors), Ordering::Relaxed);
        Ok(())
    }

    fn recv(&self, from: usize, tag: u16) -> Result<Vec<Tensor>> {
        self.check_other(from)?;
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        loop {
            if let Some(found) = self.world.process_at_rank(from as i32).immediate_matched_probe_with_tag(tag as i32) {
                let (bytes, _) = found.matched_receive_vec::<u8>();
                return decode_tensors(&bytes, &self.device, self.rank, from);
            }
            if let Some(e) = self.poll_abort() {
                return Err(e);
            }
            self.complete(false)?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout { rank: self.rank, op: "recv", peer: from, after: self.timeout });
            }
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn abort(&self, reason: &str) {
        for r in (0..self.size).filter(|&r| r != self.rank) {
            self.post(r, TAG_ABORT, reason.as_bytes().to_vec());
        }
    }

    fn stats(&self) -> CommStats {
        CommStats { messages: self.messages.load(Ordering::Relaxed), bytes: self.bytes.load(Ordering::Relaxed) }
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if let Err(e) = self.complete(true) {
            tracing::warn!("rank {}: sends still in flight at shutdown: {e}", self.rank);
            // MPI may still read these buffers: leak them rather than free memory in use.
            for f in self.in_flight.borrow_mut().drain(..) {
                std::mem::forget(f.request);
            }
        }
    }
}

//! Data parallelism: every worker holds the whole model and takes a contiguous slice of the
//! batch; the root gathers the rows back in order. Each row is computed by the same kernels
//! on the same inputs as on one worker, so the result is bit-identical to one worker's as
//! long as the model treats rows independently (pad token batches once, at the root).
//!
//! [`DynamicBatcher`] groups single requests into batches, waiting at most a maximum queue
//! delay for a batch to fill — Triton's dynamic batching — so a server gets a batch's
//! throughput without holding any request back for long.

use std::ops::Range;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::{Communicator, Error, Result};

/// Tag of data-parallel messages.
const TAG_DATA: u16 = 100;

/// `n` rows split over `world` workers: contiguous ranges in rank order whose sizes differ by
/// at most one (the first `n % world` ranks take one more).
pub fn split_rows(n: usize, world: usize) -> Vec<Range<usize>> {
    let (base, extra) = (n / world.max(1), n % world.max(1));
    let mut start = 0;
    (0..world)
        .map(|r| {
            let len = base + usize::from(r < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// One data-parallel forward, called by every worker. At `root`, `inputs` are the batch —
/// tensors sharing their first dimension (token ids, types, mask; or pixels) — and the result
/// is `Some` of every worker's `forward` output for its rows, concatenated in rank order; the
/// other ranks pass `&[]` and get `None`. A worker whose share is empty (a batch smaller
/// than the world) runs nothing.
pub fn data_parallel(
    comm: &dyn Communicator,
    root: usize,
    inputs: &[Tensor],
    forward: &mut dyn FnMut(&[Tensor]) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    comm.check_peer(root)?;
    let mine = if comm.rank() == root {
        let n = batch_rows(inputs)?;
        let ranges = split_rows(n, comm.size());
        let mut mine = Vec::new();
        for (r, range) in ranges.iter().enumerate() {
            let chunk = inputs
                .iter()
                .map(|t| t.narrow(0, range.start, range.len()))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let chunk = if range.is_empty() { Vec::new() } else { chunk };
            if r == root {
                mine = chunk;
            } else {
                comm.send(r, TAG_DATA, &chunk)?;
            }
        }
        mine
    } else {
        comm.recv(root, TAG_DATA)?
    };
    let out = if mine.is_empty() { Vec::new() } else { vec![forward(&mine)?] };
    let gathered = comm.gather(root, &out)?;
    match gathered {
        None => Ok(None),
        Some(parts) => {
            let parts: Vec<Tensor> = parts.into_iter().flatten().collect();
            Ok(Some(Tensor::cat(&parts, 0)?))
        }
    }
}

/// The shared first dimension of a batch's tensors.
fn batch_rows(inputs: &[Tensor]) -> Result<usize> {
    let first =
        inputs.first().ok_or_else(|| Error::config("data-parallel batch", "at least one input tensor", "none"))?;
    let n = first
        .dims()
        .first()
        .copied()
        .ok_or_else(|| Error::config("data-parallel batch", "tensors with a batch dimension", "a scalar"))?;
    if n == 0 {
        return Err(Error::config("data-parallel batch", "at least one row", "an empty batch"));
    }
    for (i, t) in inputs.iter().enumerate() {
        if t.dims().first() != Some(&n) {
            return Err(Error::config(
                "data-parallel batch",
                format!("every input with {n} rows (input 0 has {n})"),
                format!("input {i} of shape {:?}", t.dims()),
            ));
        }
    }
    Ok(n)
}

/// How [`DynamicBatcher`] groups requests.
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Largest batch handed to the handler.
    pub max_batch: usize,
    /// Longest a request waits in the queue for its batch to fill, counted from the arrival
    /// of the batch's first request.
    pub max_delay: Duration,
}

/// What a [`DynamicBatcher`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatcherStats {
    /// Batches run.
    pub batches: usize,
    /// Requests served.
    pub requests: usize,
    /// Batches of each size (index = size).
    pub sizes: Vec<usize>,
}

impl BatcherStats {
    /// Mean requests per batch.
    pub fn mean_batch(&self) -> f64 {
        self.requests as f64 / self.batches.max(1) as f64
    }
}

type Job<Req, Resp> = (Req, Sender<Result<Resp>>);

/// Groups single requests into batches for a handler running on its own thread.
pub struct DynamicBatcher<Req, Resp> {
    tx: Option<Sender<Job<Req, Resp>>>,
    worker: Option<JoinHandle<BatcherStats>>,
}

/// A submitted request's answer, to wait for.
#[derive(Debug)]
pub struct Ticket<Resp>(Receiver<Result<Resp>>);

impl<Resp> Ticket<Resp> {
    /// Waits for the answer.
    pub fn wait(self) -> Result<Resp> {
        self.0.recv().map_err(|_| Error::Batch("the batcher stopped before answering".into()))?
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> DynamicBatcher<Req, Resp> {
    /// Starts the batcher: `handler` gets each batch of requests in arrival order and returns
    /// one response per request, in the same order. A handler error fails every request of
    /// that batch (and only those).
    pub fn start(
        config: BatcherConfig,
        mut handler: impl FnMut(Vec<Req>) -> Result<Vec<Resp>> + Send + 'static,
    ) -> Result<Self> {
        if config.max_batch == 0 {
            return Err(Error::config("dynamic batcher max_batch", "at least 1", 0));
        }
        let (tx, rx) = channel::<Job<Req, Resp>>();
        let worker = std::thread::Builder::new()
            .name("pare-batcher".into())
            .spawn(move || {
                let mut stats = BatcherStats { sizes: vec![0; config.max_batch + 1], ..Default::default() };
                while let Ok(first) = rx.recv() {
                    let deadline = Instant::now() + config.max_delay;
                    let mut jobs = vec![first];
                    while jobs.len() < config.max_batch {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        match rx.recv_timeout(deadline - now) {
                            Ok(j) => jobs.push(j),
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                        }
                    }
                    let n = jobs.len();
                    stats.batches += 1;
                    stats.requests += n;
                    stats.sizes[n] += 1;
                    let (reqs, replies): (Vec<Req>, Vec<Sender<Result<Resp>>>) = jobs.into_iter().unzip();
                    match handler(reqs) {
                        Ok(resps) if resps.len() == n => {
                            for (reply, resp) in replies.into_iter().zip(resps) {
                                let _ = reply.send(Ok(resp));
                            }
                        }
                        Ok(resps) => {
                            let why = format!("the handler returned {} responses for {n} requests", resps.len());
                            replies.into_iter().for_each(|r| drop(r.send(Err(Error::Batch(why.clone())))));
                        }
                        Err(e) => {
                            let why = e.to_string();
                            replies.into_iter().for_each(|r| drop(r.send(Err(Error::Batch(why.clone())))));
                        }
                    }
                }
                stats
            })
            .map_err(|e| Error::Batch(format!("cannot start the batcher thread: {e}")))?;
        Ok(Self { tx: Some(tx), worker: Some(worker) })
    }

    /// Queues `req`; the ticket yields its response.
    pub fn submit(&self, req: Req) -> Result<Ticket<Resp>> {
        let (reply, answer) = channel();
        self.tx
            .as_ref()
            .expect("present until shutdown")
            .send((req, reply))
            .map_err(|_| Error::Batch("the batcher has stopped".into()))?;
        Ok(Ticket(answer))
    }

    /// Serves the requests already queued, stops, and says what it did.
    pub fn shutdown(mut self) -> Result<BatcherStats> {
        drop(self.tx.take());
        self.worker
            .take()
            .expect("present until shutdown")
            .join()
            .map_err(|_| Error::Batch("the batch handler panicked".into()))
    }
}

impl<Req, Resp> Drop for DynamicBatcher<Req, Resp> {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{first_error, run_threads};
    use candle_core::Device;

    #[test]
    fn rows_split_evenly_and_in_order() {
        assert_eq!(split_rows(7, 3), vec![0..3, 3..5, 5..7]);
        assert_eq!(split_rows(1, 3), vec![0..1, 1..1, 1..1]);
        for n in 0..40 {
            for w in 1..6 {
                let r = split_rows(n, w);
                assert_eq!(r.len(), w);
                assert_eq!(r.iter().map(|x| x.len()).sum::<usize>(), n);
                assert!(r.windows(2).all(|p| p[0].end == p[1].start));
            }
        }
    }

    #[test]
    fn data_parallel_gathers_rows_in_order_even_when_some_workers_idle() {
        for (rows, world) in [(10usize, 3usize), (2, 3), (1, 2)] {
            let x = Tensor::arange(0f32, (rows * 2) as f32, &Device::Cpu).unwrap().reshape((rows, 2)).unwrap();
            let out = run_threads(world, Duration::from_secs(5), |c| {
                let inputs = if c.rank() == 0 { vec![x.clone()] } else { vec![] };
                data_parallel(c, 0, &inputs, &mut |b| Ok((&b[0] * 2.0)?))
            })
            .unwrap();
            let got = first_error(out).unwrap().remove(0).unwrap();
            assert_eq!(got.to_vec2::<f32>().unwrap(), (&x * 2.0).unwrap().to_vec2::<f32>().unwrap());
        }
    }

    #[test]
    fn a_ragged_batch_is_refused_before_work() {
        let a = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let out = run_threads(2, Duration::from_secs(5), |c| {
            let inputs = if c.rank() == 0 { vec![a.clone(), b.clone()] } else { vec![] };
            data_parallel(c, 0, &inputs, &mut |x| Ok(x[0].clone()))
        })
        .unwrap();
        let e = first_error(out).unwrap_err().to_string();
        assert!(e.contains("input 1 of shape [4, 2]") && e.contains("3 rows"), "{e}");
    }

    #[test]
    fn the_batcher_groups_requests_and_answers_each() {
        let b = DynamicBatcher::start(
            BatcherConfig { max_batch: 4, max_delay: Duration::from_millis(200) },
            |reqs: Vec<u32>| Ok(reqs.iter().map(|r| r * 10).collect()),
        )
        .unwrap();
        let tickets: Vec<_> = (0..10u32).map(|i| b.submit(i).unwrap()).collect();
        let got: Vec<u32> = tickets.into_iter().map(|t| t.wait().unwrap()).collect();
        assert_eq!(got, (0..10).map(|i| i * 10).collect::<Vec<_>>());
        let stats = b.shutdown().unwrap();
        assert_eq!(stats.requests, 10);
        assert!(stats.batches <= 4, "{stats:?}");
        assert!(stats.sizes.iter().enumerate().all(|(s, &c)| c == 0 || s <= 4));
    }

    #[test]
    fn a_failed_batch_fails_only_its_requests() {
        let b = DynamicBatcher::start(BatcherConfig { max_batch: 1, max_delay: Duration::ZERO }, |reqs: Vec<i32>| {
            if reqs[0] < 0 { Err(Error::config("request", "non-negative", reqs[0])) } else { Ok(reqs) }
        })
        .unwrap();
        assert_eq!(b.submit(3).unwrap().wait().unwrap(), 3);
        let e = b.submit(-1).unwrap().wait().unwrap_err().to_string();
        assert!(e.contains("batch holding this request failed") && e.contains("-1"), "{e}");
        assert_eq!(b.submit(4).unwrap().wait().unwrap(), 4);
        assert!(
            DynamicBatcher::<u8, u8>::start(BatcherConfig { max_batch: 0, max_delay: Duration::ZERO }, Ok).is_err()
        );
    }
}

//! pare-parallel: data, pipeline and tensor parallel inference over a [`Communicator`].
//!
//! Every mode is written once as an SPMD function — each worker calls the same function with
//! its own communicator — so the same code runs on in-process threads ([`ThreadComm`], for
//! one machine and tests), on MPI processes started by `mpirun` (`MpiComm`, feature `mpi`)
//! and, later, across GPUs (NCCL, feature `nccl`; see [`nccl`]).
//!
//! - [`data`]: split a batch across workers and gather the rows in order (bit-identical to one
//!   worker); [`data::DynamicBatcher`] groups single requests into batches with a maximum
//!   queue delay, as Triton's dynamic batcher does.
//! - [`pipeline`]: cut a model's units into stages by measured cost, stream micro-batches
//!   through them with the GPipe or 1F1B schedule, and measure the bubble.
//! - [`tensor`]: Megatron-style column- then row-parallel linears with one all-reduce per
//!   block, attention heads split across workers, for the digits MLP and BERT encoders.
//!
//! Failures are never silent: a worker that returns an error or panics tells every other
//! worker, whose pending and later communication fails with [`Error::PeerFailed`]; a worker
//! that hangs or dies makes the others fail with [`Error::Timeout`] after the communicator's
//! timeout. No mode reports a partial result as complete.

mod comm;
pub mod data;
mod error;
#[cfg(feature = "mpi")]
mod mpi_comm;
pub mod nccl;
pub mod pipeline;
pub mod tensor;
mod threads;

pub use comm::{CommStats, Communicator, decode_tensors, encode_tensors};
pub use error::{Error, Result};
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiComm;
pub use threads::{ThreadComm, first_error, run_threads};

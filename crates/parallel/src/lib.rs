//! pare-parallel: parallel inference.
//!
//! This crate will hold the `Communicator` trait (threads in process, MPI across processes
//! and machines, NCCL across GPUs) and data, pipeline (GPipe, 1F1B) and tensor (Megatron
//! column/row) parallel execution of pare models. It is filled by issue 8; nothing is
//! implemented yet.

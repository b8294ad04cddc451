//! NCCL across GPUs.
//!
//! Not implemented in this build: no machine with several NVIDIA GPUs and the CUDA toolkit
//! has been available to build and test it on, and pare does not ship code it has not run.
//! [`NcclComm::init`] returns [`Error::NotCompiled`] without the `nccl` feature and
//! [`Error::Unsupported`] with it,
//! so a caller gets a clear error, never a silent CPU fallback. Use [`crate::ThreadComm`] on
//! one machine or `MpiComm` (feature `mpi`) across processes and machines.

use crate::{Error, Result};

/// The NCCL communicator (see the module docs: not available in this build).
#[derive(Debug)]
pub struct NcclComm {
    _private: (),
}

impl NcclComm {
    /// Would join an NCCL group of `world` GPUs as `rank`; returns [`Error::NotCompiled`].
    pub fn init(rank: usize, world: usize) -> Result<Self> {
        let _ = (rank, world);
        if cfg!(feature = "nccl") {
            Err(Error::Unsupported {
                what: "the NCCL communicator",
                detail: "the `nccl` feature is reserved; NCCL is not implemented yet (no multi-GPU machine \
                         to build and test it on). Use threads or MPI"
                    .into(),
            })
        } else {
            Err(Error::NotCompiled { what: "NCCL", feature: "nccl" })
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nccl_says_it_is_not_there() {
        let e = super::NcclComm::init(0, 2).unwrap_err().to_string();
        assert!(e.contains("NCCL") && e.contains("not compiled"), "{e}");
    }
}

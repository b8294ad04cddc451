//! `GpuError`: what a GPU runtime reports, naming the device and the limit or format at fault.
//! It reaches callers of the `Runtime` trait inside `pare_core_tensor::Error::Runtime`.

/// A GPU runtime's failure, with the device and the expected vs found value where one applies.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// The crate was built without the feature that runtime needs.
    #[error("pare-runtime-gpu is not compiled with the `{feature}` feature (rebuild with `--features {feature}`)")]
    NotCompiled {
        /// `wgpu` or `cuda`.
        feature: &'static str,
    },

    /// The feature is compiled but no usable device was found.
    #[error("no usable {backend}: {}", found_list(.found))]
    NoDevice {
        /// What was asked for (`wgpu compute adapter`, `CUDA device 0`).
        backend: String,
        /// What was found instead (adapters and why each was refused, or the driver's error).
        found: Vec<String>,
    },

    /// A buffer, binding or dispatch over one of the device's limits.
    #[error("`{device}`: {what} needs {needed} but the device's `{limit}` is {max}")]
    Limit {
        /// The adapter's name and backend.
        device: String,
        /// What needed it (`linear `enc.fc` weight`, `dispatch of 70000 workgroups`).
        what: String,
        /// The limit's name in wgpu's `Limits`.
        limit: &'static str,
        /// What the work needs.
        needed: u64,
        /// What the device allows.
        max: u64,
    },

    /// A WGSL shader failed to compile or validate.
    #[error("`{device}`: shader `{shader}` failed to compile: {message}")]
    Shader {
        /// The adapter's name and backend.
        device: String,
        /// The shader's key (op and weight format).
        shader: String,
        /// The compiler's message.
        message: String,
    },

    /// A weight format or option this runtime does not run.
    #[error("`{device}`: {what} is not supported by the {runtime} runtime{}", hint_suffix(.hint))]
    Unsupported {
        /// The runtime (`wgpu`, `cuda`).
        runtime: &'static str,
        /// The adapter's name and backend.
        device: String,
        /// The layer and format or option refused.
        what: String,
        /// How to get it to run anyway (an opt-in fallback), if there is one.
        hint: Option<String>,
    },

    /// The device reported an error while running work (validation, out of memory, lost).
    #[error("`{device}`: {op} failed: {message}")]
    Device {
        /// The adapter's name and backend.
        device: String,
        /// The op that was running.
        op: String,
        /// The driver's message.
        message: String,
    },
}

fn found_list(found: &[String]) -> String {
    if found.is_empty() { "found none".to_string() } else { format!("found {}", found.join("; ")) }
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
}

impl From<GpuError> for pare_core_tensor::Error {
    fn from(e: GpuError) -> Self {
        let runtime = match &e {
            GpuError::NotCompiled { feature } => feature,
            GpuError::Unsupported { runtime, .. } => runtime,
            GpuError::NoDevice { backend, .. } if backend.starts_with("CUDA") => "cuda",
            _ => "wgpu",
        };
        pare_core_tensor::Error::Runtime { runtime, cause: Box::new(e) }
    }
}

/// The typed GPU error inside a core-tensor error, if that is what it carries.
pub fn gpu_error(e: &pare_core_tensor::Error) -> Option<&GpuError> {
    match e {
        pare_core_tensor::Error::Runtime { cause, .. } => cause.downcast_ref::<GpuError>(),
        _ => None,
    }
}

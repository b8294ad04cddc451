//! pare-tests: workspace integration tests (in `tests/pare/`) and the helpers they share.

use std::path::PathBuf;

// README's Rust examples compile and run as doctests, so the tour cannot drift from the code.
#[doc = include_str!("../../README.md")]
mod readme {}

/// The MiniLM folder from `PARE_MINILM_DIR`, or `None` with a message on stderr saying why the
/// calling test is skipped. When `PARE_REQUIRE_MINILM` is set (CI sets it), a missing folder
/// is an error instead, so CI can never pass by skipping.
pub fn minilm_dir(test: &str) -> anyhow::Result<Option<PathBuf>> {
    match std::env::var_os("PARE_MINILM_DIR") {
        Some(d) if PathBuf::from(&d).join("model.safetensors").is_file() => Ok(Some(PathBuf::from(d))),
        other => {
            let why = match other {
                Some(d) => format!("PARE_MINILM_DIR={} holds no model.safetensors", PathBuf::from(d).display()),
                None => "PARE_MINILM_DIR is not set".to_string(),
            };
            if std::env::var_os("PARE_REQUIRE_MINILM").is_some() {
                anyhow::bail!("{test}: {why}, and PARE_REQUIRE_MINILM forbids skipping");
            }
            eprintln!(
                "SKIPPED {test}: {why}; fetch the model with ../shared/tools/fetch-minilm.sh DIR and export PARE_MINILM_DIR=DIR"
            );
            Ok(None)
        }
    }
}

/// The workspace root (for `data/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

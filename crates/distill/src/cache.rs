//! The teacher's outputs, computed once and cached on disk.
//!
//! A frozen teacher gives the same logits (or embeddings) for the same inputs every epoch, so
//! they are computed once — in inference batches, on whatever runtime the teacher was prepared
//! for — and, when a cache file is given, stored there as safetensors keyed by a
//! [`Fingerprint`] of the teacher's weights, the inputs and the settings. A later run with the
//! same key reads them back; a different key (another teacher, other data) recomputes and
//! replaces the cache atomically. The cache is never the only copy of anything.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::io::{load_weights, save_weights};
use pare_core_tensor::{Error, Module, Result, Weight};

/// Metadata key under which a cache file records the fingerprint it was computed for.
pub const META_KEY: &str = "pare.distill.teacher_key";
const OUTPUTS: &str = "teacher_outputs";

/// A 64-bit FNV-1a digest over the bytes fed to it: a stable fingerprint (the same on every
/// machine and Rust release, unlike std's `DefaultHasher`) of a teacher and its inputs.
#[derive(Debug, Clone, Copy)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    /// Feeds raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    /// Feeds a string (length-prefixed, so `"ab","c"` and `"a","bc"` differ).
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(&(s.len() as u64).to_le_bytes()).bytes(s.as_bytes())
    }
    /// Feeds a tensor's shape and its values as f32.
    pub fn tensor(&mut self, t: &Tensor) -> Result<&mut Self> {
        for d in t.dims() {
            self.bytes(&(*d as u64).to_le_bytes());
        }
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for x in v {
            self.bytes(&x.to_le_bytes());
        }
        Ok(self)
    }
    /// Feeds every parameter of `model` (name, format and dequantized values).
    pub fn model(&mut self, model: &dyn Module) -> Result<&mut Self> {
        for (name, w) in model.named_weights() {
            self.str(&name).str(&w.describe());
            let dense = w.to_dense(&Device::Cpu)?;
            self.tensor(&dense)?;
        }
        Ok(self)
    }
    /// The digest as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Where the teacher's outputs came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Computed by running the teacher (and written to the cache file, if one was given).
    Computed,
    /// Read from a cache file whose key matched.
    Cached,
}

/// Returns the `[n, d]` teacher outputs for `key`: read from `cache` when it exists and holds
/// outputs for the same key and `n` rows, otherwise computed by `compute` (and, with a cache
/// path, saved there atomically). Outputs with NaN or ±∞ are refused.
pub fn teacher_outputs(
    cache: Option<&Path>,
    key: &Fingerprint,
    n: usize,
    device: &Device,
    compute: impl FnOnce() -> Result<Tensor>,
) -> Result<(Tensor, Source)> {
    if let Some(path) = cache.filter(|p| p.is_file()) {
        match load_weights(path, device) {
            Ok((mut w, meta)) if meta.get(META_KEY) == Some(&key.hex()) => {
                if let Some(Weight::Dense(t)) = w.remove(OUTPUTS)
                    && t.dim(0)? == n
                {
                    tracing::info!(cache = %path.display(), "teacher outputs read from the cache");
                    return Ok((t, Source::Cached));
                }
            }
            Ok(_) => {
                tracing::info!(cache = %path.display(), "teacher cache is for another teacher or data; recomputing")
            }
            Err(e) => tracing::warn!(cache = %path.display(), error = %e, "unreadable teacher cache; recomputing"),
        }
    }
    let t = compute()?.to_dtype(DType::F32)?.contiguous()?;
    if t.rank() != 2 || t.dim(0)? != n {
        return Err(Error::Shape { name: "teacher outputs".into(), expected: vec![n, 0], found: t.dims().to_vec() });
    }
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    if let Some(first) = values.iter().position(|x| !x.is_finite()) {
        let count = values.iter().filter(|x| !x.is_finite()).count();
        return Err(Error::NonFinite { name: "teacher outputs".into(), count, first });
    }
    if let Some(path) = cache {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create folder", dir, e))?;
        }
        let weights = BTreeMap::from([(OUTPUTS.to_string(), Weight::Dense(t.clone()))]);
        save_weights(path, &weights, &BTreeMap::from([(META_KEY.to_string(), key.hex())]), &[])?;
    }
    Ok((t, Source::Computed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs(v: f32) -> Tensor {
        Tensor::from_vec(vec![v, 1.0, 2.0, 3.0, 4.0, 5.0], (3, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn outputs_are_computed_once_then_read_back_while_the_key_matches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/teacher.safetensors");
        let mut key = Fingerprint::default();
        key.str("teacher a");
        let (a, src) = teacher_outputs(Some(&path), &key, 3, &Device::Cpu, || Ok(outputs(0.5))).unwrap();
        assert_eq!(src, Source::Computed);
        let (b, src) = teacher_outputs(Some(&path), &key, 3, &Device::Cpu, || panic!("must not recompute")).unwrap();
        assert_eq!(src, Source::Cached);
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        // Another teacher: recomputed, and the cache now holds its outputs.
        let mut other = Fingerprint::default();
        other.str("teacher b");
        let (c, src) = teacher_outputs(Some(&path), &other, 3, &Device::Cpu, || Ok(outputs(9.0))).unwrap();
        assert_eq!((src, c.to_vec2::<f32>().unwrap()[0][0]), (Source::Computed, 9.0));
        // The same key but another row count (other data) also recomputes.
        let (_, src) =
            teacher_outputs(Some(&path), &other, 2, &Device::Cpu, || Ok(outputs(9.0).narrow(0, 0, 2)?)).unwrap();
        assert_eq!(src, Source::Computed);
    }

    #[test]
    fn non_finite_or_misshapen_outputs_are_refused_and_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let key = Fingerprint::default();
        let bad = Tensor::from_vec(vec![1.0f32, f32::NAN, 0.0, f32::INFINITY], (2, 2), &Device::Cpu).unwrap();
        let e = teacher_outputs(Some(&path), &key, 2, &Device::Cpu, || Ok(bad)).unwrap_err().to_string();
        assert!(e.contains("teacher outputs") && e.contains('2'), "{e}");
        let e = teacher_outputs(Some(&path), &key, 4, &Device::Cpu, || Ok(outputs(0.0))).unwrap_err().to_string();
        assert!(e.contains("[4, 0]") && e.contains("[3, 2]"), "{e}");
        assert!(!path.exists());
    }

    #[test]
    fn fingerprints_separate_what_they_are_fed() {
        let h = |parts: &[&str]| {
            let mut f = Fingerprint::default();
            for p in parts {
                f.str(p);
            }
            f.hex()
        };
        assert_eq!(h(&["ab", "c"]), h(&["ab", "c"]));
        assert_ne!(h(&["ab", "c"]), h(&["a", "bc"]));
        assert_eq!(h(&[]), "cbf29ce484222325");
    }
}

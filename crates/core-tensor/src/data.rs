//! Real data: the UCI handwritten digits (shipped in `data/digits.csv.gz`, embedded in the
//! binary), a seeded stratified train/validation/test split, batching, and a sentence loader.

use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// The digits data set, gzip-compressed CSV (64 pixels of 0..16, then the label), embedded so
/// the demo runs with no files beside the binary. Provenance: `data/README.md`.
pub const DIGITS_CSV_GZ: &[u8] = include_bytes!("../../../data/digits.csv.gz");

/// Pixels per digit image (8 × 8).
pub const DIGITS_PIXELS: usize = 64;
/// Number of digit classes.
pub const DIGITS_CLASSES: usize = 10;

/// Labelled examples: `x` is `[n, 64]` f32 pixels scaled to 0..1, `y` is `[n]` u32 labels.
#[derive(Debug, Clone)]
pub struct Examples {
    /// Inputs, one row per example.
    pub x: Tensor,
    /// Class labels.
    pub y: Tensor,
}

impl Examples {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.y.dims()[0]
    }
    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The examples at `indices`, in that order.
    pub fn select(&self, indices: &[u32]) -> Result<Examples> {
        let idx = Tensor::from_slice(indices, indices.len(), self.x.device())?;
        Ok(Examples { x: self.x.index_select(&idx, 0)?, y: self.y.index_select(&idx, 0)? })
    }
    /// Consecutive batches of at most `size` examples, in order.
    pub fn batches(&self, size: usize) -> Result<Vec<Examples>> {
        let n = self.len();
        let size = size.max(1);
        (0..n.div_ceil(size))
            .map(|b| {
                let len = size.min(n - b * size);
                Ok(Examples { x: self.x.narrow(0, b * size, len)?, y: self.y.narrow(0, b * size, len)? })
            })
            .collect()
    }
}

/// The digits split three ways.
#[derive(Debug, Clone)]
pub struct DigitsSplit {
    /// About 70% of each class.
    pub train: Examples,
    /// About 15% of each class, for early stopping and model selection.
    pub validation: Examples,
    /// About 15% of each class, for the reported figures only.
    pub test: Examples,
}

/// Parses the digits CSV (gzip or plain) into `(pixels, labels)`, checking every row.
pub fn parse_digits(bytes: &[u8], source: &str) -> Result<(Vec<f32>, Vec<u32>)> {
    let mut text = String::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| Error::Data { name: source.into(), detail: format!("cannot decompress: {e}") })?;
    } else {
        text = String::from_utf8(bytes.to_vec())
            .map_err(|e| Error::Data { name: source.into(), detail: format!("not UTF-8: {e}") })?;
    }
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |detail: String| Error::Data { name: source.into(), detail: format!("line {}: {detail}", i + 1) };
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != DIGITS_PIXELS + 1 {
            return Err(bad(format!("expected {} fields, found {}", DIGITS_PIXELS + 1, fields.len())));
        }
        for f in &fields[..DIGITS_PIXELS] {
            let v: f32 = f.trim().parse().map_err(|_| bad(format!("pixel `{f}` is not a number")))?;
            if !(0.0..=16.0).contains(&v) {
                return Err(bad(format!("pixel {v} outside 0..=16")));
            }
            pixels.push(v / 16.0);
        }
        let label: u32 = fields[DIGITS_PIXELS].trim().parse().map_err(|_| bad("label is not an integer".into()))?;
        if label as usize >= DIGITS_CLASSES {
            return Err(bad(format!("label {label} outside 0..{DIGITS_CLASSES}")));
        }
        labels.push(label);
    }
    if labels.is_empty() {
        return Err(Error::Data { name: source.into(), detail: "no examples".into() });
    }
    Ok((pixels, labels))
}

/// The embedded digits, split with a stratified, seeded 70/15/15 partition: each class's
/// examples are shuffled with `seed` and cut in the same proportions, so every split holds
/// every class. The same seed gives the same split on every machine.
pub fn digits(seed: u64, device: &Device) -> Result<DigitsSplit> {
    let (pixels, labels) = parse_digits(DIGITS_CSV_GZ, "embedded digits")?;
    split_stratified(&pixels, &labels, seed, device)
}

fn split_stratified(pixels: &[f32], labels: &[u32], seed: u64, device: &Device) -> Result<DigitsSplit> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut train, mut val, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for class in 0..DIGITS_CLASSES as u32 {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        idx.shuffle(&mut rng);
        let n = idx.len();
        let n_val = (n as f64 * 0.15).round() as usize;
        let n_test = (n as f64 * 0.15).round() as usize;
        test.extend_from_slice(&idx[..n_test]);
        val.extend_from_slice(&idx[n_test..n_test + n_val]);
        train.extend_from_slice(&idx[n_test + n_val..]);
    }
    let mut take = |idx: &mut Vec<usize>| -> Result<Examples> {
        idx.shuffle(&mut rng);
        let x: Vec<f32> =
            idx.iter().flat_map(|&i| pixels[i * DIGITS_PIXELS..(i + 1) * DIGITS_PIXELS].iter().copied()).collect();
        let y: Vec<u32> = idx.iter().map(|&i| labels[i]).collect();
        Ok(Examples {
            x: Tensor::from_vec(x, (idx.len(), DIGITS_PIXELS), device)?,
            y: Tensor::from_vec(y, idx.len(), device)?.to_dtype(DType::U32)?,
        })
    };
    Ok(DigitsSplit { train: take(&mut train)?, validation: take(&mut val)?, test: take(&mut test)? })
}

/// Reads one sentence per non-empty line of a UTF-8 text file.
pub fn sentences(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    let out: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if out.is_empty() {
        return Err(Error::Data { name: path.display().to_string(), detail: "no non-empty lines".into() });
    }
    Ok(out)
}

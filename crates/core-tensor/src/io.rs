//! safetensors I/O: a memory-mapped reader that validates the whole file before any tensor is
//! used, an atomic writer (temp file in the same folder, fsync, rename, fsync the folder) that
//! refuses to write over an input, and the encoding of every [`Weight`] format in the file.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

use crate::{Error, QuantScheme, QuantizedTensor, Result, SparseLayout, SparseTensor, Weight};

/// The largest header pare accepts (the safetensors reference limit).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Metadata key holding pare's version.
pub const META_VERSION: &str = "pare.version";
/// Metadata key holding the recipe (TOML or JSON text) that produced the file.
pub const META_RECIPE: &str = "pare.recipe";
const META_QUANT: &str = "pare.quant.";
const META_SPARSE: &str = "pare.sparse.";

/// Element types a safetensors file may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // the names are the safetensors spec's own
pub enum StDtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    F16,
    Bf16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
    F8E4M3,
    F8E5M2,
}

impl StDtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BOOL" => Self::Bool,
            "U8" => Self::U8,
            "I8" => Self::I8,
            "I16" => Self::I16,
            "U16" => Self::U16,
            "F16" => Self::F16,
            "BF16" => Self::Bf16,
            "I32" => Self::I32,
            "U32" => Self::U32,
            "F32" => Self::F32,
            "F64" => Self::F64,
            "I64" => Self::I64,
            "U64" => Self::U64,
            "F8_E4M3" => Self::F8E4M3,
            "F8_E5M2" => Self::F8E5M2,
            _ => return None,
        })
    }
    /// The spec's name (`F32`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::I16 => "I16",
            Self::U16 => "U16",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::I32 => "I32",
            Self::U32 => "U32",
            Self::F32 => "F32",
            Self::F64 => "F64",
            Self::I64 => "I64",
            Self::U64 => "U64",
            Self::F8E4M3 => "F8_E4M3",
            Self::F8E5M2 => "F8_E5M2",
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::Bool | Self::U8 | Self::I8 | Self::F8E4M3 | Self::F8E5M2 => 1,
            Self::I16 | Self::U16 | Self::F16 | Self::Bf16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::F64 | Self::I64 | Self::U64 => 8,
        }
    }
    fn candle(self) -> Option<DType> {
        Some(match self {
            Self::U8 => DType::U8,
            Self::U32 => DType::U32,
            Self::I64 => DType::I64,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
            _ => return None,
        })
    }
    fn from_candle(d: DType) -> Result<Self> {
        Ok(match d {
            DType::U8 => Self::U8,
            DType::U32 => Self::U32,
            DType::I64 => Self::I64,
            DType::F16 => Self::F16,
            DType::BF16 => Self::Bf16,
            DType::F32 => Self::F32,
            DType::F64 => Self::F64,
            other => {
                return Err(Error::invalid("safetensors dtype", format!("cannot store candle dtype {other:?}")));
            }
        })
    }
}

/// One tensor's entry in a validated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: StDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub range: (usize, usize),
}

impl TensorInfo {
    /// Size of the tensor's data in bytes.
    pub fn bytes(&self) -> usize {
        self.range.1 - self.range.0
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header, parsed with duplicate keys rejected (serde_json would keep the last silently).
struct RawHeader {
    metadata: BTreeMap<String, String>,
    tensors: Vec<(String, RawInfo)>,
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
                let mut seen = HashSet::new();
                let mut out = RawHeader { metadata: BTreeMap::new(), tensors: Vec::new() };
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!("duplicate tensor name `{key}`")));
                    }
                    if key == "__metadata__" {
                        out.metadata = map.next_value()?;
                    } else {
                        let info: RawInfo =
                            map.next_value().map_err(|e| de::Error::custom(format!("entry `{key}`: {e}")))?;
                        out.tensors.push((key, info));
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Files currently mapped by a [`SafeTensorsFile`] in this process, as (device, inode): saves
/// refuse to write over them. An entry lives exactly as long as its mapping (one per open), so
/// a deleted file's recycled inode number cannot block an unrelated save later.
static OPENED_INPUTS: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A validated, memory-mapped safetensors file.
pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: Mmap,
    id: Option<(u64, u64)>,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for SafeTensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafeTensorsFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl Drop for SafeTensorsFile {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut opened = OPENED_INPUTS.lock().expect("input registry poisoned");
            if let Some(i) = opened.iter().position(|x| *x == id) {
                opened.swap_remove(i);
            }
        }
    }
}

impl SafeTensorsFile {
    /// Maps `path` and validates the whole file: header length within the file and under
    /// [`MAX_HEADER_BYTES`], JSON with no duplicate names, known dtypes, shape × dtype equal to
    /// each byte span, spans inside the data section and not overlapping. Nothing is
    /// allocated beyond the header's size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
        let len = file.metadata().map_err(|e| Error::io("stat", &path, e))?.len();
        let bad = |what: String| Error::Malformed { path: path.clone(), what };
        if len < 8 {
            return Err(bad(format!("file is {len} bytes, shorter than the 8-byte header length")));
        }
        // SAFETY: the map is read-only; pare never writes to files it has open for reading (saves
        // refuse them and go through rename), so the mapped bytes do not change under us.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("mmap", &path, e))?;
        let n = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER_BYTES {
            return Err(bad(format!(
                "header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes (is this a safetensors file?)"
            )));
        }
        if n > len - 8 {
            return Err(bad(format!("header length {n} runs past the end of the file ({} bytes follow)", len - 8)));
        }
        let data_start = 8 + n as usize;
        let header = &mmap[8..data_start];
        let raw: RawHeader =
            serde_json::from_slice(header).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let data_len = mmap.len() - data_start;
        let mut tensors = BTreeMap::new();
        for (name, info) in raw.tensors {
            let dtype = StDtype::parse(&info.dtype)
                .ok_or_else(|| bad(format!("tensor `{name}`: unknown dtype `{}`", info.dtype)))?;
            let [begin, end] = info.data_offsets;
            if begin > end || end > data_len as u64 {
                return Err(bad(format!(
                    "tensor `{name}`: data_offsets [{begin}, {end}] out of range of the {data_len}-byte data section"
                )));
            }
            let numel = info.shape.iter().try_fold(1u64, |a, d| a.checked_mul(*d));
            let bytes = numel.and_then(|n| n.checked_mul(dtype.size() as u64));
            if bytes != Some(end - begin) {
                return Err(bad(format!(
                    "tensor `{name}`: shape {:?} of {} needs {} bytes but data_offsets span {}",
                    info.shape,
                    dtype.name(),
                    bytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
                    end - begin
                )));
            }
            let shape = info.shape.iter().map(|d| *d as usize).collect();
            tensors.insert(name, TensorInfo { dtype, shape, range: (begin as usize, end as usize) });
        }
        let mut spans: Vec<(&String, &TensorInfo)> = tensors.iter().filter(|(_, t)| t.bytes() > 0).collect();
        spans.sort_by_key(|(_, t)| t.range);
        for w in spans.windows(2) {
            if w[1].1.range.0 < w[0].1.range.1 {
                return Err(bad(format!(
                    "tensors `{}` {:?} and `{}` {:?} overlap",
                    w[0].0, w[0].1.range, w[1].0, w[1].1.range
                )));
            }
        }
        let id = file_id(&path);
        if let Some(id) = id {
            OPENED_INPUTS.lock().expect("input registry poisoned").push(id);
        }
        Ok(Self { path, mmap, id, data_start, tensors, metadata: raw.metadata })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Every tensor's entry, by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }
    /// The `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// The raw little-endian bytes of tensor `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info(name)?;
        Ok(&self.mmap[self.data_start + info.range.0..self.data_start + info.range.1])
    }
    /// The entry of tensor `name`.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| Error::unknown("tensor", name, self.tensors.keys().map(String::as_str)))
    }

    /// Tensor `name` as a candle tensor on `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let info = self.info(name)?;
        let dtype = info.dtype.candle().ok_or_else(|| Error::DType {
            name: name.to_string(),
            expected: "one of U8, U32, I64, F16, BF16, F32, F64".into(),
            found: info.dtype.name().into(),
        })?;
        // from_raw_buffer copies, so the mmap's alignment does not matter.
        Ok(Tensor::from_raw_buffer(self.bytes(name)?, dtype, &info.shape, device)?)
    }

    fn vec_u32(&self, name: &str) -> Result<Vec<u32>> {
        self.typed(name, StDtype::U32, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn vec_i32(&self, name: &str) -> Result<Vec<i32>> {
        self.typed(name, StDtype::I32, |b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn vec_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.typed(name, StDtype::F32, |b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn typed<T>(&self, name: &str, want: StDtype, f: impl Fn(&[u8]) -> T) -> Result<Vec<T>> {
        let info = self.info(name)?;
        if info.dtype != want {
            return Err(Error::DType {
                name: name.into(),
                expected: want.name().into(),
                found: info.dtype.name().into(),
            });
        }
        Ok(self.bytes(name)?.chunks_exact(want.size()).map(f).collect())
    }
}

/// One tensor to write: raw little-endian bytes with their dtype and shape.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// Element type.
    pub dtype: StDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian data, `product(shape) · dtype.size()` bytes.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Copies a candle tensor's data.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let dtype = StDtype::from_candle(t.dtype())?;
        let shape = t.dims().to_vec();
        let t = t.to_device(&Device::Cpu)?.flatten_all()?;
        let data = match t.dtype() {
            DType::U8 => t.to_vec1::<u8>()?,
            DType::U32 => t.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            _ => unreachable!("from_candle accepted it"),
        };
        Ok(Self { dtype, shape, data })
    }
    fn u8s(v: &[u8]) -> Self {
        Self { dtype: StDtype::U8, shape: vec![v.len()], data: v.to_vec() }
    }
    fn u32s(v: &[u32]) -> Self {
        Self { dtype: StDtype::U32, shape: vec![v.len()], data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }
    fn i32s(v: &[i32]) -> Self {
        Self { dtype: StDtype::I32, shape: vec![v.len()], data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }
    fn f32s(v: &[f32]) -> Self {
        Self { dtype: StDtype::F32, shape: vec![v.len()], data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }
}

/// Refuses `dest` when it is the same file as any of `inputs` or as any file this process
/// holds open as a [`SafeTensorsFile`].
fn check_not_input(dest: &Path, inputs: &[&Path]) -> Result<()> {
    let Some(id) = file_id(dest) else {
        return Ok(());
    };
    let opened = OPENED_INPUTS.lock().expect("input registry poisoned").contains(&id);
    if opened || inputs.iter().any(|p| file_id(p) == Some(id)) {
        return Err(Error::OverwriteInput { path: dest.to_path_buf() });
    }
    Ok(())
}

/// Writes `tensors` and `metadata` to `dest` atomically: a temp file in the same folder is
/// written, fsynced and renamed over `dest`, then the folder is fsynced. An interrupted save
/// leaves `dest` as it was. Writing onto any of `inputs` (the files the run read) or onto a
/// file currently open as a [`SafeTensorsFile`] is refused. pare's version is always recorded under [`META_VERSION`].
pub fn save_tensors(
    dest: impl AsRef<Path>,
    tensors: &BTreeMap<String, RawTensor>,
    metadata: &BTreeMap<String, String>,
    inputs: &[&Path],
) -> Result<()> {
    let dest = dest.as_ref();
    check_not_input(dest, inputs)?;
    for (name, t) in tensors {
        let need = t.shape.iter().product::<usize>() * t.dtype.size();
        if t.data.len() != need {
            return Err(Error::invalid(
                format!("tensor `{name}`"),
                format!("shape {:?} of {} needs {need} bytes, found {}", t.shape, t.dtype.name(), t.data.len()),
            ));
        }
    }
    let mut meta = metadata.clone();
    meta.insert(META_VERSION.into(), env!("CARGO_PKG_VERSION").into());
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(&meta).expect("strings serialise"));
    let mut offset = 0usize;
    for (name, t) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + t.data.len()]}),
        );
        offset += t.data.len();
    }
    let mut header = serde_json::to_vec(&header).expect("JSON map serialises");
    // Pad the header with spaces so the data section starts 8-byte aligned, as the spec advises.
    while !(8 + header.len()).is_multiple_of(8) {
        header.push(b' ');
    }

    write_atomic_with(dest, |f| {
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for t in tensors.values() {
            w.write_all(&t.data)?;
        }
        w.flush()
    })?;
    tracing::debug!(path = %dest.display(), bytes = offset, "saved safetensors");
    Ok(())
}

/// Writes `data` to `dest` atomically (temp file in the same folder, fsync, rename, fsync the
/// folder): an interrupted write leaves `dest` as it was.
pub fn write_file_atomic(dest: impl AsRef<Path>, data: &[u8]) -> Result<()> {
    write_atomic_with(dest.as_ref(), |mut f| f.write_all(data))
}

/// The one atomic-write path: `write` fills a temp file in `dest`'s folder, which is given the
/// mode of the file it replaces (or 0644: temp files start private), fsynced, renamed over
/// `dest`, and the folder fsynced.
fn write_atomic_with(dest: &Path, write: impl FnOnce(&File) -> std::io::Result<()>) -> Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| Error::io("create a temp file in", &dir, e))?;
    write(tmp.as_file()).map_err(|e| Error::io("write", tmp.path(), e))?;
    let mode = std::fs::metadata(dest).map(|m| m.permissions()).unwrap_or_else(|_| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::Permissions::from_mode(0o644)
    });
    tmp.as_file().set_permissions(mode).map_err(|e| Error::io("set permissions of", tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io("fsync", tmp.path(), e))?;
    tmp.persist(dest).map_err(|e| Error::io("rename the temp file onto", dest, e.error))?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("fsync folder", &dir, e))?;
    Ok(())
}

/// Encodes every weight in its own format: dense tensors under their name; quantized ones as
/// `NAME.__q.codes` (packed U8), `NAME.__q.scales` (F32), `NAME.__q.zero_points` (I32),
/// `NAME.__q.codebook` (F32) with the scheme, shape and dtype in metadata `pare.quant.NAME`;
/// sparse ones as `NAME.__sparse.*` with metadata `pare.sparse.NAME`.
pub fn encode_weights(
    weights: &BTreeMap<String, Weight>,
) -> Result<(BTreeMap<String, RawTensor>, BTreeMap<String, String>)> {
    let mut tensors = BTreeMap::new();
    let mut meta = BTreeMap::new();
    for (name, w) in weights {
        match w {
            Weight::Dense(t) => {
                tensors.insert(name.clone(), RawTensor::from_tensor(t)?);
            }
            Weight::Quantized(q) => {
                tensors.insert(format!("{name}.__q.codes"), RawTensor::u8s(q.packed_codes()));
                tensors.insert(format!("{name}.__q.scales"), RawTensor::f32s(q.scales()));
                if let Some(z) = q.zero_points() {
                    tensors.insert(format!("{name}.__q.zero_points"), RawTensor::i32s(z));
                }
                if let Some(c) = q.codebook() {
                    tensors.insert(format!("{name}.__q.codebook"), RawTensor::f32s(c));
                }
                let m = serde_json::json!({"scheme": q.scheme(), "shape": q.shape(), "dtype": q.dtype().as_str()});
                meta.insert(format!("{META_QUANT}{name}"), m.to_string());
            }
            Weight::Sparse(s) => {
                let p = |k: &str| format!("{name}.__sparse.{k}");
                let layout = match s.layout() {
                    SparseLayout::Csr { row_ptr, col_idx, values } => {
                        tensors.insert(p("row_ptr"), RawTensor::u32s(row_ptr));
                        tensors.insert(p("col_idx"), RawTensor::u32s(col_idx));
                        tensors.insert(p("values"), RawTensor::f32s(values));
                        serde_json::json!({"kind": "csr"})
                    }
                    SparseLayout::NM { n, m, values, indices } => {
                        tensors.insert(p("values"), RawTensor::f32s(values));
                        tensors.insert(p("indices"), RawTensor::u8s(indices));
                        serde_json::json!({"kind": "nm", "n": n, "m": m})
                    }
                    SparseLayout::Block { block_rows, block_cols, row_ptr, col_idx, values } => {
                        tensors.insert(p("row_ptr"), RawTensor::u32s(row_ptr));
                        tensors.insert(p("col_idx"), RawTensor::u32s(col_idx));
                        tensors.insert(p("values"), RawTensor::f32s(values));
                        serde_json::json!({"kind": "block", "block_rows": block_rows, "block_cols": block_cols})
                    }
                };
                let m = serde_json::json!({"layout": layout, "shape": s.shape(), "dtype": s.dtype().as_str()});
                meta.insert(format!("{META_SPARSE}{name}"), m.to_string());
            }
        }
    }
    Ok((tensors, meta))
}

/// Saves a model's weights (any mix of formats) atomically with `metadata` (recipe, config).
pub fn save_weights(
    dest: impl AsRef<Path>,
    weights: &BTreeMap<String, Weight>,
    metadata: &BTreeMap<String, String>,
    inputs: &[&Path],
) -> Result<()> {
    let (tensors, mut meta) = encode_weights(weights)?;
    meta.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    save_tensors(dest, &tensors, &meta, inputs)
}

#[derive(Deserialize)]
struct QuantMeta {
    scheme: QuantScheme,
    shape: Vec<usize>,
    dtype: String,
}

#[derive(Deserialize)]
struct SparseMeta {
    layout: serde_json::Value,
    shape: Vec<usize>,
    dtype: String,
}

fn parse_dtype(file: &SafeTensorsFile, name: &str, s: &str) -> Result<DType> {
    s.parse::<DType>().map_err(|_| Error::Malformed {
        path: file.path.clone(),
        what: format!("weight `{name}`: unknown logical dtype `{s}`"),
    })
}

/// Loads every weight of a file written by [`save_weights`] (or any plain safetensors file,
/// whose tensors all load as dense), returning the weights and the file's metadata.
pub fn load_weights(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<(BTreeMap<String, Weight>, BTreeMap<String, String>)> {
    let file = SafeTensorsFile::open(path)?;
    let bad = |what: String| Error::Malformed { path: file.path.clone(), what };
    let mut out = BTreeMap::new();
    let mut claimed = HashSet::new();
    for (key, value) in file.metadata() {
        if let Some(name) = key.strip_prefix(META_QUANT) {
            let m: QuantMeta = serde_json::from_str(value)
                .map_err(|e| bad(format!("metadata `{key}` is not a quant description: {e}")))?;
            let get = |k: &str| format!("{name}.__q.{k}");
            let zero = if file.tensors.contains_key(&get("zero_points")) {
                Some(file.vec_i32(&get("zero_points"))?)
            } else {
                None
            };
            let codebook =
                if file.tensors.contains_key(&get("codebook")) { Some(file.vec_f32(&get("codebook"))?) } else { None };
            let codes_info = file.info(&get("codes"))?;
            if codes_info.dtype != StDtype::U8 {
                return Err(bad(format!("`{}` must be U8, found {}", get("codes"), codes_info.dtype.name())));
            }
            let q = QuantizedTensor::new(
                file.bytes(&get("codes"))?.to_vec(),
                m.scheme,
                file.vec_f32(&get("scales"))?,
                zero,
                codebook,
                m.shape,
                parse_dtype(&file, name, &m.dtype)?,
            )
            .map_err(|e| bad(format!("weight `{name}`: {e}")))?;
            for k in ["codes", "scales", "zero_points", "codebook"] {
                claimed.insert(get(k));
            }
            out.insert(name.to_string(), Weight::Quantized(q));
        } else if let Some(name) = key.strip_prefix(META_SPARSE) {
            let m: SparseMeta = serde_json::from_str(value)
                .map_err(|e| bad(format!("metadata `{key}` is not a sparse description: {e}")))?;
            let get = |k: &str| format!("{name}.__sparse.{k}");
            let usize_of = |k: &str| m.layout.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
            let layout = match m.layout.get("kind").and_then(|k| k.as_str()) {
                Some("csr") => SparseLayout::Csr {
                    row_ptr: file.vec_u32(&get("row_ptr"))?,
                    col_idx: file.vec_u32(&get("col_idx"))?,
                    values: file.vec_f32(&get("values"))?,
                },
                Some("nm") => SparseLayout::NM {
                    n: usize_of("n").ok_or_else(|| bad(format!("`{key}`: missing n")))?,
                    m: usize_of("m").ok_or_else(|| bad(format!("`{key}`: missing m")))?,
                    values: file.vec_f32(&get("values"))?,
                    indices: file.typed(&get("indices"), StDtype::U8, |b| b[0])?,
                },
                Some("block") => SparseLayout::Block {
                    block_rows: usize_of("block_rows").ok_or_else(|| bad(format!("`{key}`: missing block_rows")))?,
                    block_cols: usize_of("block_cols").ok_or_else(|| bad(format!("`{key}`: missing block_cols")))?,
                    row_ptr: file.vec_u32(&get("row_ptr"))?,
                    col_idx: file.vec_u32(&get("col_idx"))?,
                    values: file.vec_f32(&get("values"))?,
                },
                other => return Err(bad(format!("`{key}`: unknown sparse layout {other:?}"))),
            };
            let s = SparseTensor::new(m.shape, parse_dtype(&file, name, &m.dtype)?, layout)
                .map_err(|e| bad(format!("weight `{name}`: {e}")))?;
            for k in ["row_ptr", "col_idx", "values", "indices"] {
                claimed.insert(get(k));
            }
            out.insert(name.to_string(), Weight::Sparse(s));
        }
    }
    for name in file.tensors.keys() {
        if !claimed.contains(name) {
            if name.contains(".__q.") || name.contains(".__sparse.") {
                return Err(bad(format!("tensor `{name}` belongs to a packed weight with no metadata entry")));
            }
            out.insert(name.clone(), Weight::Dense(file.tensor(name, device)?));
        }
    }
    let meta = file.metadata().clone();
    Ok((out, meta))
}

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Whether `path` starts with the GGUF magic.
pub fn is_gguf(path: impl AsRef<Path>) -> bool {
    let mut head = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok()
        && &head == GGUF_MAGIC
}

/// Loads a GGUF file (llama.cpp's format, as pare's GGUF export writes it) and its
/// string-valued metadata: 2-D Q8_0 and Q4_0 tensors become pare's signed int8/int4 codes in
/// groups of 32 exactly (their f16 scales as f32), every other tensor is dequantized by candle
/// to a dense f32 weight. A malformed
/// file is an [`Error::Malformed`] naming it.
pub fn load_gguf(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<(BTreeMap<String, Weight>, BTreeMap<String, String>)> {
    use candle_core::quantized::gguf_file;
    let path = path.as_ref();
    let bad = |what: String| Error::Malformed { path: path.to_path_buf(), what };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| bad(format!("not a GGUF file: {e}")))?;
    let mut weights = BTreeMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut f, name, device).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        // Q8_0 and Q4_0 blocks are pare's signed int8/int4 in groups of 32: kept as codes.
        use candle_core::quantized::GgmlDType;
        let w = match (q.dtype(), q.shape().dims()) {
            (GgmlDType::Q8_0 | GgmlDType::Q4_0, &[rows, cols]) => {
                let data = q.data().map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
                Weight::Quantized(crate::QuantizedTensor::from_ggml_blocks(
                    name,
                    q.dtype(),
                    &data,
                    &[rows, cols],
                    candle_core::DType::F32,
                )?)
            }
            _ => Weight::Dense(q.dequantize(device)?),
        };
        weights.insert(name.clone(), w);
    }
    let meta =
        content.metadata.iter().filter_map(|(k, v)| v.to_string().ok().map(|s| (k.clone(), s.clone()))).collect();
    Ok((weights, meta))
}

pub mod compressed_tensors;

#[cfg(test)]
mod tests;

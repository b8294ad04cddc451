//! Sparse weight formats: CSR for unstructured sparsity, N:M semi-structured (2:4, 4:8) with
//! per-value position metadata, and block-sparse (BSR). Each has `to_dense()` as its
//! reference semantics. A tensor of any rank is viewed as `[shape[0], product(shape[1..])]`.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The storage layout of a [`SparseTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum SparseLayout {
    /// Compressed sparse rows: row `r`'s values are `values[row_ptr[r]..row_ptr[r+1]]` at
    /// columns `col_idx[..]` (strictly increasing within a row).
    Csr {
        /// `rows + 1` offsets into `col_idx`/`values`, non-decreasing, starting at 0.
        row_ptr: Vec<u32>,
        /// Column of each stored value.
        col_idx: Vec<u32>,
        /// The stored values.
        values: Vec<f32>,
    },
    /// N:M: every run of `m` consecutive columns of a row keeps exactly `n` slots; slot `k`
    /// of group `g` holds `values[g·n + k]` at position `indices[g·n + k]` (`< m`, strictly
    /// increasing within a group). A kept slot may hold zero.
    NM {
        /// Values kept per group.
        n: usize,
        /// Group length.
        m: usize,
        /// `rows · cols/m · n` values.
        values: Vec<f32>,
        /// The position of each value within its group.
        indices: Vec<u8>,
    },
    /// Block sparse rows: dense `block_rows × block_cols` blocks; block-row `r` holds blocks
    /// at block-columns `col_idx[row_ptr[r]..row_ptr[r+1]]`, each block's values row-major.
    Block {
        /// Rows per block (divides the row count).
        block_rows: usize,
        /// Columns per block (divides the column count).
        block_cols: usize,
        /// `rows/block_rows + 1` offsets into `col_idx`.
        row_ptr: Vec<u32>,
        /// Block-column of each stored block, strictly increasing within a block-row.
        col_idx: Vec<u32>,
        /// `col_idx.len() · block_rows · block_cols` values.
        values: Vec<f32>,
    },
}

/// A sparse tensor: a logical shape and dtype plus a [`SparseLayout`] over its 2-D view.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseTensor {
    shape: Vec<usize>,
    dtype: DType,
    layout: SparseLayout,
}

fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [r, rest @ ..] => (*r, rest.iter().product()),
    }
}

fn dense_2d(t: &Tensor, name: &str) -> Result<(Vec<usize>, usize, usize, Vec<f32>)> {
    let shape = t.dims().to_vec();
    let (rows, cols) = rows_cols(&shape);
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        let count = v.iter().filter(|x| !x.is_finite()).count();
        return Err(Error::NonFinite { name: name.to_string(), count, first: i });
    }
    Ok((shape, rows, cols, v))
}

fn check_ptr(what: &str, row_ptr: &[u32], rows: usize, len: usize) -> Result<()> {
    if row_ptr.len() != rows + 1 {
        return Err(Error::invalid(what, format!("row_ptr needs {} entries, found {}", rows + 1, row_ptr.len())));
    }
    if row_ptr[0] != 0 || row_ptr.windows(2).any(|w| w[0] > w[1]) || row_ptr[rows] as usize != len {
        return Err(Error::invalid(
            what,
            format!("row_ptr must rise from 0 to {len}, found {:?}..{:?}", row_ptr.first(), row_ptr.last()),
        ));
    }
    Ok(())
}

fn check_sorted_cols(what: &str, row_ptr: &[u32], col_idx: &[u32], limit: usize) -> Result<()> {
    for (r, w) in row_ptr.windows(2).enumerate() {
        let cols = &col_idx[w[0] as usize..w[1] as usize];
        if cols.windows(2).any(|c| c[0] >= c[1]) {
            return Err(Error::invalid(what, format!("row {r}: column indices not strictly increasing")));
        }
        if let Some(c) = cols.iter().find(|c| **c as usize >= limit) {
            return Err(Error::invalid(what, format!("row {r}: column {c} out of range 0..{limit}")));
        }
    }
    Ok(())
}

impl SparseTensor {
    /// Builds a sparse tensor from its parts, checking every invariant of the layout.
    pub fn new(shape: Vec<usize>, dtype: DType, layout: SparseLayout) -> Result<Self> {
        let what = format!("sparse tensor of shape {shape:?}");
        if crate::checked_numel(&shape).is_none() {
            return Err(Error::invalid(&what, "element count overflows"));
        }
        let (rows, cols) = rows_cols(&shape);
        match &layout {
            SparseLayout::Csr { row_ptr, col_idx, values } => {
                if col_idx.len() != values.len() {
                    return Err(Error::invalid(
                        &what,
                        format!("{} column indices for {} values", col_idx.len(), values.len()),
                    ));
                }
                check_ptr(&what, row_ptr, rows, values.len())?;
                check_sorted_cols(&what, row_ptr, col_idx, cols)?;
            }
            SparseLayout::NM { n, m, values, indices } => {
                if *m == 0 || *n > *m || *m > 255 || cols % m != 0 {
                    return Err(Error::invalid(
                        &what,
                        format!("N:M needs 0 ≤ n ≤ m ≤ 255 with m dividing {cols} columns, found {n}:{m}"),
                    ));
                }
                let need = rows * cols / m * n;
                if values.len() != need || indices.len() != need {
                    return Err(Error::invalid(
                        &what,
                        format!(
                            "{n}:{m} needs {need} values and indices, found {} and {}",
                            values.len(),
                            indices.len()
                        ),
                    ));
                }
                if *n > 0 {
                    for (g, idx) in indices.chunks(*n).enumerate() {
                        if idx.iter().any(|i| usize::from(*i) >= *m) || idx.windows(2).any(|w| w[0] >= w[1]) {
                            return Err(Error::invalid(
                                &what,
                                format!("group {g}: positions {idx:?} must be strictly increasing and < {m}"),
                            ));
                        }
                    }
                }
            }
            SparseLayout::Block { block_rows, block_cols, row_ptr, col_idx, values } => {
                if *block_rows == 0 || *block_cols == 0 || rows % block_rows != 0 || cols % block_cols != 0 {
                    return Err(Error::invalid(
                        &what,
                        format!("block {block_rows}×{block_cols} must divide the {rows}×{cols} view"),
                    ));
                }
                check_ptr(&what, row_ptr, rows / block_rows, col_idx.len())?;
                check_sorted_cols(&what, row_ptr, col_idx, cols / block_cols)?;
                if values.len() != col_idx.len() * block_rows * block_cols {
                    return Err(Error::invalid(
                        &what,
                        format!(
                            "{} blocks of {block_rows}×{block_cols} need {} values, found {}",
                            col_idx.len(),
                            col_idx.len() * block_rows * block_cols,
                            values.len()
                        ),
                    ));
                }
            }
        }
        Ok(Self { shape, dtype, layout })
    }

    /// CSR holding exactly the non-zero entries of `dense`.
    pub fn csr_from_dense(dense: &Tensor, name: &str) -> Result<Self> {
        let (shape, rows, cols, v) = dense_2d(dense, name)?;
        let mut row_ptr = Vec::with_capacity(rows + 1);
        let (mut col_idx, mut values) = (Vec::new(), Vec::new());
        row_ptr.push(0u32);
        for r in 0..rows {
            for c in 0..cols {
                let x = v[r * cols + c];
                if x != 0.0 {
                    col_idx.push(c as u32);
                    values.push(x);
                }
            }
            row_ptr.push(values.len() as u32);
        }
        Self::new(shape, dense.dtype(), SparseLayout::Csr { row_ptr, col_idx, values })
    }

    /// N:M storage of `dense`, which must already have at most `n` non-zeros in every group of
    /// `m` consecutive columns (a pruner makes it so). Unused slots take the lowest free positions.
    pub fn nm_from_dense(dense: &Tensor, n: usize, m: usize, name: &str) -> Result<Self> {
        let (shape, _, cols, v) = dense_2d(dense, name)?;
        if m == 0 || n > m || m > 255 || cols % m != 0 {
            return Err(Error::invalid(
                format!("N:M for `{name}`"),
                format!("need 0 ≤ n ≤ m ≤ 255 with m dividing {cols} columns, found {n}:{m}"),
            ));
        }
        let (mut values, mut indices) = (Vec::with_capacity(v.len() / m * n), Vec::with_capacity(v.len() / m * n));
        for (g, group) in v.chunks(m).enumerate() {
            let nz: Vec<usize> = (0..m).filter(|&i| group[i] != 0.0).collect();
            if nz.len() > n {
                return Err(Error::invalid(
                    format!("N:M for `{name}`"),
                    format!(
                        "row {} columns {}..{} hold {} non-zeros, more than n = {n}",
                        g * m / cols,
                        (g * m) % cols,
                        (g * m) % cols + m,
                        nz.len()
                    ),
                ));
            }
            let mut keep = nz.clone();
            keep.extend((0..m).filter(|i| !nz.contains(i)).take(n - nz.len()));
            keep.sort_unstable();
            for i in keep {
                values.push(group[i]);
                indices.push(i as u8);
            }
        }
        Self::new(shape, dense.dtype(), SparseLayout::NM { n, m, values, indices })
    }

    /// Block-sparse storage of `dense`, keeping every block that holds a non-zero.
    pub fn block_from_dense(dense: &Tensor, block_rows: usize, block_cols: usize, name: &str) -> Result<Self> {
        let (shape, rows, cols, v) = dense_2d(dense, name)?;
        if block_rows == 0 || block_cols == 0 || rows % block_rows != 0 || cols % block_cols != 0 {
            return Err(Error::invalid(
                format!("block-sparse `{name}`"),
                format!("block {block_rows}×{block_cols} must divide the {rows}×{cols} view"),
            ));
        }
        let mut row_ptr = vec![0u32];
        let (mut col_idx, mut values) = (Vec::new(), Vec::new());
        for br in 0..rows / block_rows {
            for bc in 0..cols / block_cols {
                let block: Vec<f32> = (0..block_rows)
                    .flat_map(|i| {
                        let start = (br * block_rows + i) * cols + bc * block_cols;
                        v[start..start + block_cols].iter().copied()
                    })
                    .collect();
                if block.iter().any(|x| *x != 0.0) {
                    col_idx.push(bc as u32);
                    values.extend(block);
                }
            }
            row_ptr.push(col_idx.len() as u32);
        }
        Self::new(shape, dense.dtype(), SparseLayout::Block { block_rows, block_cols, row_ptr, col_idx, values })
    }

    /// The layout.
    pub fn layout(&self) -> &SparseLayout {
        &self.layout
    }
    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The logical dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The number of stored values (including explicit zeros in N:M slots and blocks).
    pub fn stored(&self) -> usize {
        match &self.layout {
            SparseLayout::Csr { values, .. } | SparseLayout::NM { values, .. } | SparseLayout::Block { values, .. } => {
                values.len()
            }
        }
    }
    /// Bytes in storage: values as f32 plus index metadata.
    pub fn storage_bytes(&self) -> usize {
        match &self.layout {
            SparseLayout::Csr { row_ptr, col_idx, values } => 4 * (row_ptr.len() + col_idx.len() + values.len()),
            SparseLayout::NM { values, indices, .. } => 4 * values.len() + indices.len(),
            SparseLayout::Block { row_ptr, col_idx, values, .. } => 4 * (row_ptr.len() + col_idx.len() + values.len()),
        }
    }

    /// The dense values in row-major order: the reference semantics.
    pub fn to_dense_f32(&self) -> Vec<f32> {
        let (rows, cols) = rows_cols(&self.shape);
        let mut out = vec![0f32; rows * cols];
        match &self.layout {
            SparseLayout::Csr { row_ptr, col_idx, values } => {
                for r in 0..rows {
                    for k in row_ptr[r] as usize..row_ptr[r + 1] as usize {
                        out[r * cols + col_idx[k] as usize] = values[k];
                    }
                }
            }
            SparseLayout::NM { n, m, values, indices } => {
                for (k, (v, i)) in values.iter().zip(indices).enumerate() {
                    out[k / n * m + usize::from(*i)] = *v;
                }
            }
            SparseLayout::Block { block_rows, block_cols, row_ptr, col_idx, values } => {
                let size = block_rows * block_cols;
                for (br, span) in row_ptr.windows(2).enumerate() {
                    for (k, &bc) in col_idx.iter().enumerate().take(span[1] as usize).skip(span[0] as usize) {
                        let bc = bc as usize;
                        for i in 0..*block_rows {
                            let dst = (br * block_rows + i) * cols + bc * block_cols;
                            let src = k * size + i * block_cols;
                            out[dst..dst + block_cols].copy_from_slice(&values[src..src + block_cols]);
                        }
                    }
                }
            }
        }
        out
    }

    /// The dense tensor of the logical shape and dtype on `device`.
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        let t = Tensor::from_vec(self.to_dense_f32(), self.shape.as_slice(), device)?;
        Ok(if self.dtype == DType::F32 { t } else { t.to_dtype(self.dtype)? })
    }
}

#[cfg(test)]
mod tests;

//! 2-D convolution as im2col + pare's linear kernels: each output position's receptive field
//! becomes a row, so the weight (`[out, in·kh·kw]`) runs through the same kernels as a linear
//! layer — f32, FP16/BF16 and weight-only quantized panels in the GEMM, pruned filters below the
//! density crossover in the sparse kernel.

use std::sync::Arc;

use candle_core::Tensor;
use pare_core_tensor::{Conv2dParams, Error, PreparedOp, Result};

use crate::linear::LinearKernel;
use crate::simd::SimdLevel;

/// A prepared convolution (one group) over packed weights.
#[derive(Debug)]
pub struct Conv2dOp {
    layer: String,
    w: LinearKernel,
    bias: Option<Vec<f32>>,
    cin: usize,
    kh: usize,
    kw: usize,
    p: Conv2dParams,
    level: SimdLevel,
    pool: Arc<rayon::ThreadPool>,
}

impl Conv2dOp {
    /// Wraps weights prepared from `[out, cin·kh·kw]`; `params.groups` must be 1.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layer: &str,
        w: LinearKernel,
        bias: Option<&Tensor>,
        (cin, kh, kw): (usize, usize, usize),
        params: Conv2dParams,
        level: SimdLevel,
        pool: Arc<rayon::ThreadPool>,
    ) -> Result<Self> {
        if params.groups != 1 || w.k() != cin * kh * kw || params.stride == 0 || params.dilation == 0 {
            return Err(Error::invalid(
                format!("conv2d `{layer}`"),
                format!("the im2col kernel takes one group, stride and dilation ≥ 1; found {params:?}"),
            ));
        }
        let bias = crate::linear::bias_values(layer, bias, w.n())?;
        Ok(Self { layer: layer.to_string(), w, bias, cin, kh, kw, p: params, level, pool })
    }
}

impl PreparedOp for Conv2dOp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Ok((b, c, h, wd)) = x.dims4() else {
            return Err(Error::Shape {
                name: format!("input of `{}`", self.layer),
                expected: vec![0, self.cin, 0, 0],
                found: x.dims().to_vec(),
            });
        };
        if c != self.cin {
            return Err(Error::Shape {
                name: format!("input of `{}` (channels)", self.layer),
                expected: vec![self.cin],
                found: vec![c],
            });
        }
        let Conv2dParams { padding: pad, stride, dilation: dil, .. } = self.p;
        let span = |n: usize, k: usize| (n + 2 * pad).checked_sub(dil * (k - 1) + 1).map(|v| v / stride + 1);
        let (Some(oh), Some(ow)) = (span(h, self.kh), span(wd, self.kw)) else {
            return Err(Error::invalid(
                format!("input of `{}`", self.layer),
                format!("{h}×{wd} is smaller than the {}×{} kernel's dilated extent", self.kh, self.kw),
            ));
        };
        let (n, k, m) = (self.w.n(), self.w.k(), b * oh * ow);
        let y = crate::linear::with_input(&self.layer, &self.pool, &x.flatten_from(1)?, c * h * wd, |v| {
            // im2col: row (batch, oy, ox) holds the receptive field in (channel, ky, kx) order,
            // the order of the weight's reduction axis; padding reads as zero.
            let mut cols = vec![0f32; m * k];
            for bi in 0..b {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let row = &mut cols[((bi * oh + oy) * ow + ox) * k..][..k];
                        for ci in 0..c {
                            for ky in 0..self.kh {
                                let iy = (oy * stride + ky * dil) as isize - pad as isize;
                                if iy < 0 || iy >= h as isize {
                                    continue;
                                }
                                for kx in 0..self.kw {
                                    let ix = (ox * stride + kx * dil) as isize - pad as isize;
                                    if ix >= 0 && ix < wd as isize {
                                        row[(ci * self.kh + ky) * self.kw + kx] =
                                            v[((bi * c + ci) * h + iy as usize) * wd + ix as usize];
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let y = self.w.run(self.level, &self.pool, &cols, self.bias.as_deref(), None).0;
            // [b, oh·ow, n] → [b, n, oh·ow]
            let mut out = vec![0f32; m * n];
            let hw = oh * ow;
            for bi in 0..b {
                crate::simd::transpose(
                    self.level,
                    &y[bi * hw * n..(bi + 1) * hw * n],
                    n,
                    hw,
                    n,
                    &mut out[bi * n * hw..(bi + 1) * n * hw],
                    hw,
                );
            }
            out
        })?;
        Ok(Tensor::from_vec(y, (b, n, oh, ow), x.device())?.to_dtype(x.dtype())?)
    }
}

#[cfg(test)]
mod tests;

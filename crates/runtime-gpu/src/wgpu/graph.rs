//! The resident executor: a whole [`Graph`] on the adapter in one command buffer — inputs
//! uploaded once, every step's output left in a device buffer for the next, outputs read back
//! once — instead of one upload and one read-back per op.
//!
//! Every step runs the same kernel with the same parameters as the op-by-op path, so the two
//! give the same values. A reshape is free: its value shares its input's buffer. A graph with a
//! step the adapter cannot take here (an op prepared by another runtime, ids computed inside
//! the graph, an empty tensor) runs op by op.

use std::rc::Rc;

use candle_core::{DType, Tensor};
use pare_core_tensor::{Error, Graph, Result, Step};

use super::shaders::MAX_HEAD;
use super::{ConvOp, EmbeddingOp, LinearOp, Pooled, WgpuRuntime, f32_input, output};

/// What the executor knows of a value before anything runs.
struct Planned {
    dims: Vec<usize>,
    /// The last step that reads it (`usize::MAX` for graph outputs).
    last: usize,
}

impl WgpuRuntime {
    /// Runs `g` on the adapter, or returns `None` when a step cannot run there (the caller
    /// then interprets it op by op). Shapes are checked before anything is uploaded.
    pub(super) fn run_resident(&self, g: &Graph, inputs: &[Tensor]) -> Result<Option<Vec<Tensor>>> {
        if inputs.len() != g.inputs() {
            return Err(Error::invalid("graph inputs", format!("expected {}, found {}", g.inputs(), inputs.len())));
        }
        let Some(mut plan) = self.plan_graph(g, inputs)? else { return Ok(None) };
        for (i, step) in g.steps().iter().enumerate() {
            for v in step.reads() {
                plan[v].last = i;
            }
        }
        for &v in g.outputs() {
            plan[v].last = usize::MAX;
        }
        let ctx = &self.ctx;
        let numel = |v: usize| plan[v].dims.iter().product::<usize>();
        // Inputs: ids as u32 words (checked against every table that reads them), the rest f32.
        let mut bufs: Vec<Option<Rc<Pooled<'_>>>> = Vec::with_capacity(plan.len());
        for (i, t) in inputs.iter().enumerate() {
            let words = if t.dtype().is_float() {
                f32_input(t)?
            } else {
                let mut words = None;
                for step in g.steps() {
                    if let Step::Op { op, x } = step
                        && *x == i
                        && let Some(e) = op.as_any().and_then(|a| a.downcast_ref::<EmbeddingOp>())
                    {
                        words = Some(e.ids(t)?);
                    }
                }
                // An integer input no embedding reads is never read at all.
                words.unwrap_or_default()
            };
            bufs.push(Some(Rc::new(ctx.upload("graph input", &words)?)));
        }
        let scopes = ctx.scopes();
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("graph") });
        // Small per-run uploads (layer-norm parameters) live until the submission.
        let mut keep: Vec<Pooled<'_>> = Vec::new();
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        for (i, step) in g.steps().iter().enumerate() {
            let v = g.inputs() + i;
            if let Step::Reshape { x, .. } = step {
                bufs.push(bufs[*x].clone());
            } else {
                let out = ctx.acquire("graph value", 4 * numel(v) as u64, storage)?;
                {
                    let at = |x: usize, slot: u32| bufs[x].as_ref().expect("live until its last reader").at(slot);
                    let o = (out.buffer(), out.len);
                    match step {
                        Step::Op { op, x } => {
                            let any = op.as_any().expect("planned");
                            if let Some(l) = any.downcast_ref::<LinearOp>() {
                                let (name, kernel, p, grid) = l.plan(numel(*x) / l.k)?;
                                let bound = WgpuRuntime::weight_slots(at(*x, 1), &l.w.0, l.bias.as_ref());
                                ctx.encode(&mut enc, &name, &kernel, &p, &bound, grid, o);
                            } else if let Some(c) = any.downcast_ref::<ConvOp>() {
                                let (name, kernel, p, grid) = c.plan(&plan[*x].dims, &plan[v].dims)?;
                                let bound = WgpuRuntime::weight_slots(at(*x, 1), &c.w.0, c.bias.as_ref());
                                ctx.encode(&mut enc, &name, &kernel, &p, &bound, grid, o);
                            } else {
                                let e = any.downcast_ref::<EmbeddingOp>().expect("planned");
                                let (name, kernel, p, grid) = e.plan(numel(*x))?;
                                let bound = WgpuRuntime::weight_slots(at(*x, 1), &e.w.0, None);
                                ctx.encode(&mut enc, &name, &kernel, &p, &bound, grid, o);
                            }
                        }
                        Step::Add { a, b } => {
                            let (name, kernel, p, grid) = self.add_plan(numel(v))?;
                            ctx.encode(&mut enc, &name, &kernel, &p, &[at(*a, 1), at(*b, 3)], grid, o);
                        }
                        Step::Activation { act, x } => {
                            let (name, kernel, p, grid) = self.act_plan(*act, numel(v))?;
                            ctx.encode(&mut enc, &name, &kernel, &p, &[at(*x, 1)], grid, o);
                        }
                        Step::MaxPool2d { x, size } => {
                            let d = &plan[v].dims;
                            let (name, kernel, p, grid) = self.pool_plan(&plan[*x].dims, *size, (d[2], d[3]))?;
                            ctx.encode(&mut enc, &name, &kernel, &p, &[at(*x, 1)], grid, o);
                        }
                        Step::Reshape { .. } => unreachable!("aliased above"),
                        Step::LayerNorm { x, residual, gamma, beta, eps } => {
                            let n = *plan[v].dims.last().expect("checked");
                            let (name, kernel, p, grid) = self.norm_plan(numel(v) / n, n, residual.is_some(), *eps)?;
                            let (gb, bb) =
                                (ctx.upload(&name, &f32_input(gamma)?)?, ctx.upload(&name, &f32_input(beta)?)?);
                            let mut bound = vec![at(*x, 1), gb.at(4), bb.at(5)];
                            bound.extend(residual.map(|r| at(r, 3)));
                            ctx.encode(&mut enc, &name, &kernel, &p, &bound, grid, o);
                            keep.extend([gb, bb]);
                        }
                        Step::Attention { q, k, v: val, heads, mask, scale } => {
                            let d = &plan[*q].dims;
                            let (name, kernel, p, grid) =
                                self.attention_plan((d[0], d[1], d[2]), *heads, mask.is_some(), *scale)?;
                            let mut bound = vec![at(*q, 1), at(*k, 3), at(*val, 4)];
                            bound.extend(mask.map(|m| at(m, 5)));
                            ctx.encode(&mut enc, &name, &kernel, &p, &bound, grid, o);
                        }
                    }
                }
                bufs.push(Some(Rc::new(out)));
            }
            // Step outputs no later step reads go back to the pool: a later step may write
            // them (wgpu orders the passes). Uploaded buffers stay taken until the end: the
            // queue writes every upload before the first pass runs, so a recycled one would be
            // overwritten before its reader ran.
            for r in step.reads() {
                if r >= g.inputs() && plan[r].last == i {
                    bufs[r] = None;
                }
            }
        }
        let outs: Vec<(&wgpu::Buffer, usize)> =
            g.outputs().iter().map(|&v| (bufs[v].as_ref().expect("outputs stay live").buffer(), numel(v))).collect();
        let data = ctx.finish("graph", enc, scopes, &outs)?;
        drop(keep);
        drop(bufs);
        data.into_iter()
            .zip(g.outputs())
            .map(|(d, &v)| output(d, &plan[v].dims, DType::F32))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Every value's shape, checked as the op-by-op path checks it; `None` where a step
    /// cannot run resident.
    fn plan_graph(&self, g: &Graph, inputs: &[Tensor]) -> Result<Option<Vec<Planned>>> {
        let mut plan: Vec<Planned> = inputs.iter().map(|t| Planned { dims: t.dims().to_vec(), last: 0 }).collect();
        let shape_err = |name: &str, expected: &[usize], found: &[usize]| Error::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        };
        for (i, step) in g.steps().iter().enumerate() {
            // Integer values exist only as inputs, and only embeddings read them.
            let reads_ids = step.reads().iter().any(|&r| r < inputs.len() && !inputs[r].dtype().is_float());
            let dims = match step {
                Step::Op { op, x } => {
                    let Some(any) = op.as_any() else { return Ok(None) };
                    let xd = &plan[*x].dims;
                    if let Some(l) = any.downcast_ref::<LinearOp>() {
                        if reads_ids {
                            return Ok(None);
                        }
                        if xd.last() != Some(&l.k) {
                            return Err(shape_err(&format!("input of `{}`", l.layer), &[l.k], xd));
                        }
                        let mut d = xd.clone();
                        *d.last_mut().expect("checked") = l.n;
                        d
                    } else if let Some(c) = any.downcast_ref::<ConvOp>() {
                        if reads_ids {
                            return Ok(None);
                        }
                        c.out_dims(xd)?
                    } else if let Some(e) = any.downcast_ref::<EmbeddingOp>() {
                        if *x >= inputs.len() || e.dtype != DType::F32 {
                            return Ok(None);
                        }
                        let mut d = xd.clone();
                        d.push(e.dim);
                        d
                    } else {
                        return Ok(None);
                    }
                }
                _ if reads_ids => return Ok(None),
                Step::Add { a, b } => {
                    if plan[*a].dims != plan[*b].dims {
                        return Err(shape_err("graph addition", &plan[*a].dims, &plan[*b].dims));
                    }
                    plan[*a].dims.clone()
                }
                Step::Activation { x, .. } => plan[*x].dims.clone(),
                Step::Reshape { x, dims } => {
                    let from = &plan[*x].dims;
                    if dims.iter().product::<usize>() != from.iter().product::<usize>() {
                        return Err(shape_err("graph reshape (same element count)", dims, from));
                    }
                    dims.clone()
                }
                Step::MaxPool2d { x, size } => {
                    let d = &plan[*x].dims;
                    if d.len() != 4 || *size == 0 || d[2] < *size || d[3] < *size {
                        return Err(Error::invalid(
                            "max pooling",
                            format!("expected [batch, channels, h, w] of at least {size}×{size}, found {d:?}"),
                        ));
                    }
                    vec![d[0], d[1], d[2] / size, d[3] / size]
                }
                Step::LayerNorm { x, residual, gamma, beta, .. } => {
                    let d = plan[*x].dims.clone();
                    let n = d.last().copied().unwrap_or(0);
                    if let Some(r) = residual
                        && plan[*r].dims != d
                    {
                        return Err(shape_err("layer norm residual", &d, &plan[*r].dims));
                    }
                    for (name, t) in [("layer norm gamma", gamma), ("layer norm beta", beta)] {
                        if t.dims() != [n] {
                            return Err(shape_err(name, &[n], t.dims()));
                        }
                    }
                    d
                }
                Step::Attention { q, k, v, heads, mask, .. } => {
                    let d = plan[*q].dims.clone();
                    if d.len() != 3 || *heads == 0 || !d[2].is_multiple_of(*heads) {
                        return Err(Error::invalid(
                            "attention",
                            format!("expected [batch, seq, heads·head_dim] with {heads} heads, found {d:?}"),
                        ));
                    }
                    for x in [k, v] {
                        if plan[*x].dims != d {
                            return Err(shape_err("attention keys/values", &d, &plan[*x].dims));
                        }
                    }
                    if let Some(m) = mask
                        && plan[*m].dims != d[..2]
                    {
                        return Err(shape_err("attention mask", &d[..2], &plan[*m].dims));
                    }
                    if d[2] / heads > MAX_HEAD as usize {
                        return Ok(None);
                    }
                    d
                }
            };
            if dims.iter().product::<usize>() == 0 {
                return Ok(None);
            }
            plan.push(Planned { dims, last: i });
        }
        if plan.iter().any(|p| p.dims.iter().product::<usize>() == 0) {
            return Ok(None);
        }
        Ok(Some(plan))
    }
}

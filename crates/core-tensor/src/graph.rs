//! A model's forward as one straight-line program of runtime calls, so a runtime whose
//! activations can stay on its device ([`Runtime::resident`]) runs the whole model at once:
//! inputs uploaded once, every step on the device, outputs read back once.
//!
//! Values are numbered: the graph's inputs first (`0..inputs`), then each step's output in
//! order. [`Graph::interpret`] runs the steps one by one through a runtime's per-op calls —
//! the default [`Runtime::run_graph`], and the semantics every resident executor must match.

use std::sync::Arc;

use candle_core::Tensor;

use crate::runtime::{PreparedOp, Runtime};
use crate::{Activation, Error, Result};

/// A value of a [`Graph`]: an input or a step's output.
pub type Value = usize;

/// One step of a [`Graph`].
#[derive(Debug, Clone)]
pub enum Step {
    /// A prepared layer (linear, convolution, embedding) on `x`.
    Op {
        /// The layer's op, prepared on the runtime that runs the graph.
        op: Arc<dyn PreparedOp>,
        /// Its input.
        x: Value,
    },
    /// `a + b`, element-wise (same shapes).
    Add {
        /// Left operand.
        a: Value,
        /// Right operand.
        b: Value,
    },
    /// [`Runtime::activation`].
    Activation {
        /// Which activation.
        act: Activation,
        /// Its input.
        x: Value,
    },
    /// [`Runtime::layer_norm`] of `x (+ residual)`.
    LayerNorm {
        /// Input.
        x: Value,
        /// Added to `x` before normalising.
        residual: Option<Value>,
        /// Scale `[n]`.
        gamma: Tensor,
        /// Shift `[n]`.
        beta: Tensor,
        /// Variance epsilon.
        eps: f64,
    },
    /// The same values in another shape (same element count), as `Tensor::reshape`.
    Reshape {
        /// Input.
        x: Value,
        /// The new shape.
        dims: Vec<usize>,
    },
    /// Max pooling of `[batch, channels, h, w]` over `size × size` windows with stride `size`
    /// (the rest cut off), as `Tensor::max_pool2d(size)`.
    MaxPool2d {
        /// Input.
        x: Value,
        /// Window side and stride.
        size: usize,
    },
    /// [`Runtime::attention`].
    Attention {
        /// Queries `[batch, seq, heads·head_dim]`.
        q: Value,
        /// Keys.
        k: Value,
        /// Values.
        v: Value,
        /// Number of heads.
        heads: usize,
        /// Additive mask over keys `[batch, seq]`.
        mask: Option<Value>,
        /// Score scale.
        scale: f64,
    },
}

impl Step {
    /// The values the step reads.
    pub fn reads(&self) -> Vec<Value> {
        match self {
            Step::Op { x, .. } | Step::Activation { x, .. } | Step::Reshape { x, .. } | Step::MaxPool2d { x, .. } => {
                vec![*x]
            }
            Step::Add { a, b } => vec![*a, *b],
            Step::LayerNorm { x, residual, .. } => std::iter::once(*x).chain(*residual).collect(),
            Step::Attention { q, k, v, mask, .. } => [*q, *k, *v].into_iter().chain(*mask).collect(),
        }
    }
}

/// A straight-line program over tensors: inputs, steps, outputs.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    inputs: usize,
    steps: Vec<Step>,
    outputs: Vec<Value>,
}

impl Graph {
    /// An empty graph of `inputs` inputs (values `0..inputs`).
    pub fn new(inputs: usize) -> Self {
        Self { inputs, steps: Vec::new(), outputs: Vec::new() }
    }

    /// Appends `step` and returns its output value. Every value it reads must exist already.
    pub fn push(&mut self, step: Step) -> Result<Value> {
        let next = self.inputs + self.steps.len();
        if let Some(bad) = step.reads().into_iter().find(|&v| v >= next) {
            return Err(Error::invalid("graph step", format!("reads value {bad}, but only 0..{next} exist")));
        }
        self.steps.push(step);
        Ok(next)
    }

    /// Marks `v` as an output (outputs come back in the order marked).
    pub fn output(&mut self, v: Value) -> Result<()> {
        let count = self.inputs + self.steps.len();
        if v >= count {
            return Err(Error::invalid("graph output", format!("value {v} does not exist (0..{count})")));
        }
        self.outputs.push(v);
        Ok(())
    }

    /// Number of inputs.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The output values, in order.
    pub fn outputs(&self) -> &[Value] {
        &self.outputs
    }

    /// Runs the steps one by one through `rt`'s per-op calls.
    pub fn interpret<R: Runtime + ?Sized>(&self, rt: &R, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        if inputs.len() != self.inputs {
            return Err(Error::invalid("graph inputs", format!("expected {}, found {}", self.inputs, inputs.len())));
        }
        let mut vals: Vec<Tensor> = inputs.to_vec();
        for step in &self.steps {
            let y = match step {
                Step::Op { op, x } => op.forward(&vals[*x])?,
                Step::Add { a, b } => (&vals[*a] + &vals[*b])?,
                Step::Activation { act, x } => rt.activation(*act, &vals[*x])?,
                Step::Reshape { x, dims } => vals[*x].reshape(dims.as_slice())?,
                Step::MaxPool2d { x, size } => vals[*x].max_pool2d(*size)?,
                Step::LayerNorm { x, residual, gamma, beta, eps } => {
                    rt.layer_norm(&vals[*x], residual.map(|r| &vals[r]), gamma, beta, *eps)?
                }
                Step::Attention { q, k, v, heads, mask, scale } => {
                    rt.attention(&vals[*q], &vals[*k], &vals[*v], *heads, mask.map(|m| &vals[m]), *scale)?
                }
            };
            vals.push(y);
        }
        Ok(self.outputs.iter().map(|&v| vals[v].clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::{Linear, ReferenceRuntime, Weight};

    #[test]
    fn interpreting_a_graph_makes_the_calls_in_order_and_bad_values_are_refused() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec((0..12).map(|i| i as f32 * 0.1 - 0.5).collect::<Vec<_>>(), (3, 4), &dev).unwrap();
        let fc = Linear::new("fc", Weight::Dense(w), None).unwrap();
        let x = Tensor::from_vec((0..8).map(|i| i as f32 * 0.3 - 1.0).collect::<Vec<_>>(), (2, 4), &dev).unwrap();
        let (g1, b1) = (
            Tensor::ones(3, candle_core::DType::F32, &dev).unwrap(),
            Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap(),
        );
        let mut g = Graph::new(1);
        let y = g.push(Step::Op { op: fc.op().clone(), x: 0 }).unwrap();
        let a = g.push(Step::Activation { act: Activation::Gelu, x: y }).unwrap();
        let s = g.push(Step::Add { a, b: y }).unwrap();
        let n = g
            .push(Step::LayerNorm { x: s, residual: Some(y), gamma: g1.clone(), beta: b1.clone(), eps: 1e-5 })
            .unwrap();
        g.output(n).unwrap();
        g.output(y).unwrap();
        let rt = ReferenceRuntime::cpu();
        let got = rt.run_graph(&g, std::slice::from_ref(&x)).unwrap();
        let y_want = fc.forward(&x).unwrap();
        let a_want = rt.activation(Activation::Gelu, &y_want).unwrap();
        let want = rt.layer_norm(&(&a_want + &y_want).unwrap(), Some(&y_want), &g1, &b1, 1e-5).unwrap();
        assert_eq!(crate::testing::max_abs_diff(&got[0], &want).unwrap(), 0.0);
        assert_eq!(crate::testing::max_abs_diff(&got[1], &y_want).unwrap(), 0.0);
        assert!(g.push(Step::Add { a: 0, b: 9 }).unwrap_err().to_string().contains("reads value 9"));
        assert!(g.output(17).is_err());
        assert!(rt.run_graph(&g, &[]).unwrap_err().to_string().contains("expected 1, found 0"));
    }
}

//! Calibration hooks: observers that see each named layer's input and output during a
//! forward pass (min/max ranges, histograms, Hessians, activation norms, MAC counts).

use candle_core::Tensor;

use crate::Result;

/// What kind of layer an observation comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// A [`crate::Linear`] layer.
    Linear,
    /// A [`crate::Conv2d`] layer.
    Conv2d,
    /// An [`crate::Embedding`] lookup.
    Embedding,
    /// A [`crate::LayerNorm`].
    LayerNorm,
}

/// The place in a model an observation comes from.
#[derive(Debug, Clone, Copy)]
pub struct Site<'a> {
    /// The layer's parameter path (`encoder.layer.3.attention.self.query`).
    pub path: &'a str,
    /// The layer's kind.
    pub kind: LayerKind,
    /// The logical shape of the layer's weight.
    pub weight_shape: &'a [usize],
}

/// Sees the input and output of every layer a forward pass runs through.
pub trait Observer {
    /// Called after `site` computed `output` from `input`.
    fn observe(&mut self, site: &Site<'_>, input: &Tensor, output: &Tensor) -> Result<()>;
}

/// The observers carried by one forward pass. `Hooks::none()` costs nothing.
#[derive(Default)]
pub struct Hooks<'a> {
    observers: Vec<&'a mut dyn Observer>,
}

impl<'a> Hooks<'a> {
    /// No observers.
    pub fn none() -> Self {
        Self { observers: Vec::new() }
    }
    /// One observer.
    pub fn with(observer: &'a mut dyn Observer) -> Self {
        Self { observers: vec![observer] }
    }
    /// Adds an observer.
    pub fn push(&mut self, observer: &'a mut dyn Observer) {
        self.observers.push(observer);
    }
    /// Whether no observer is attached.
    pub fn is_empty(&self) -> bool {
        self.observers.is_empty()
    }
    /// Reports one layer's input and output to every observer.
    pub fn emit(&mut self, site: &Site<'_>, input: &Tensor, output: &Tensor) -> Result<()> {
        for o in &mut self.observers {
            o.observe(site, input, output)?;
        }
        Ok(())
    }
}

/// An observer that records, per layer path, the running min and max of inputs and outputs.
#[derive(Debug, Default, Clone)]
pub struct MinMaxObserver {
    /// `path → (input min, input max, output min, output max, calls)`.
    pub ranges: std::collections::BTreeMap<String, RangeStats>,
}

/// Running range statistics of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RangeStats {
    /// Smallest input value seen.
    pub input_min: f32,
    /// Largest input value seen.
    pub input_max: f32,
    /// Smallest output value seen.
    pub output_min: f32,
    /// Largest output value seen.
    pub output_max: f32,
    /// Number of forward calls observed.
    pub calls: usize,
}

impl Observer for MinMaxObserver {
    fn observe(&mut self, site: &Site<'_>, input: &Tensor, output: &Tensor) -> Result<()> {
        let f = |t: &Tensor| -> Result<(f32, f32)> {
            let t = t.to_dtype(candle_core::DType::F32)?.flatten_all()?;
            Ok((t.min(0)?.to_scalar::<f32>()?, t.max(0)?.to_scalar::<f32>()?))
        };
        let (imin, imax) = f(input)?;
        let (omin, omax) = f(output)?;
        let e = self.ranges.entry(site.path.to_string()).or_insert(RangeStats {
            input_min: f32::INFINITY,
            input_max: f32::NEG_INFINITY,
            output_min: f32::INFINITY,
            output_max: f32::NEG_INFINITY,
            calls: 0,
        });
        e.input_min = e.input_min.min(imin);
        e.input_max = e.input_max.max(imax);
        e.output_min = e.output_min.min(omin);
        e.output_max = e.output_max.max(omax);
        e.calls += 1;
        Ok(())
    }
}

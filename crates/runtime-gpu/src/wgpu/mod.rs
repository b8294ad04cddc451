//! The wgpu runtime: core-tensor's `Runtime` on Vulkan / Metal / DX12 compute shaders.
//!
//! Weights are uploaded once at `prepare` in their stored format (f32, f16/bf16 pairs, packed
//! 1–8-bit codes with scales, zero points and codebooks, or CSR rows) and dequantized inside the
//! shaders. A whole-model [`pare_core_tensor::Graph`] runs resident (`graph`): one command
//! buffer, activations left on the adapter. Single ops take candle CPU tensors: each uploads
//! its input into a pooled buffer, runs, and reads its output back.

mod graph;
mod shaders;

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use pare_core_tensor::{
    Activation, Conv2dParams, Error, Granularity, Mapping, PreparedOp, Result, Runtime, SparseLayout, SparseTensor,
    Weight, check_attention,
};
use wgpu::util::DeviceExt;

use crate::GpuError;
use shaders::{BLOCK, MAX_HEAD, PARAM_WORDS, WFormat};

/// How [`WgpuRuntime::with_options`] picks and uses an adapter.
#[derive(Debug, Clone, Default)]
pub struct WgpuOptions {
    /// Use the first adapter whose name contains this (case-insensitive), e.g. `nvidia` or
    /// `llvmpipe`. Default: the `PARE_WGPU_ADAPTER` variable, else the best adapter (discrete,
    /// then integrated, virtual, and software rasterisers last).
    pub adapter: Option<String>,
    /// Run sparse embedding tables as dense ones (exact, but their memory saving is lost).
    /// Sparse linear and convolution weights run as CSR on the device without it.
    pub sparse_as_dense: bool,
    /// Caps the largest buffer below the adapter's own limit, to check that a model fits a
    /// smaller device (a phone's GPU) before shipping it there.
    pub max_buffer_bytes: Option<u64>,
}

/// What a binding slot holds.
#[derive(Clone, Copy)]
enum Slot {
    Uniform,
    Read,
    Write,
}

const WEIGHT_SLOTS: [Slot; 8] =
    [Slot::Uniform, Slot::Read, Slot::Write, Slot::Read, Slot::Read, Slot::Read, Slot::Read, Slot::Read];
const UNARY_SLOTS: [Slot; 3] = [Slot::Uniform, Slot::Read, Slot::Write];
const BINARY_SLOTS: [Slot; 4] = [Slot::Uniform, Slot::Read, Slot::Write, Slot::Read];
const NORM_SLOTS: [Slot; 6] = [Slot::Uniform, Slot::Read, Slot::Write, Slot::Read, Slot::Read, Slot::Read];

/// One dispatch, ready to encode: the op's name (for errors), its kernel, its parameters and
/// its workgroup grid.
type Dispatch = (String, Arc<Kernel>, Params, (u32, u32));

struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    slots: u32,
}

/// The device, its queue, compiled kernels and a pool of activation buffers.
struct Ctx {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// `name (backend, type)`, for every message.
    name: String,
    software: bool,
    limits: wgpu::Limits,
    kernels: Mutex<HashMap<String, Arc<Kernel>>>,
    pool: Mutex<HashMap<(u64, u32), Vec<wgpu::Buffer>>>,
    dummy: wgpu::Buffer,
    /// Command buffers submitted (each ends in a wait for its outputs).
    submits: std::sync::atomic::AtomicU64,
}

/// core-tensor's `Runtime` on a wgpu adapter. Cheap to clone (the device is shared).
#[derive(Clone)]
pub struct WgpuRuntime {
    ctx: Arc<Ctx>,
    cpu: Device,
    sparse_as_dense: bool,
}

impl fmt::Debug for WgpuRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WgpuRuntime").field("adapter", &self.ctx.name).finish()
    }
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

impl WgpuRuntime {
    /// The best adapter (or the one `PARE_WGPU_ADAPTER` names), with default options.
    pub fn new() -> std::result::Result<Self, GpuError> {
        Self::with_options(WgpuOptions::default())
    }

    /// An adapter chosen by `options`; [`GpuError::NoDevice`] lists every adapter found and
    /// why none was usable.
    pub fn with_options(options: WgpuOptions) -> std::result::Result<Self, GpuError> {
        let wanted = options.adapter.clone().or_else(|| std::env::var("PARE_WGPU_ADAPTER").ok());
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
        adapters.sort_by_key(|a| rank(a.get_info().device_type));
        let mut found = Vec::new();
        for adapter in adapters {
            let info = adapter.get_info();
            let name = describe(&info);
            if let Some(w) = &wanted
                && !info.name.to_lowercase().contains(&w.to_lowercase())
            {
                found.push(format!("{name}: does not match `{w}`"));
                continue;
            }
            let desc =
                wgpu::DeviceDescriptor { label: Some("pare"), required_limits: adapter.limits(), ..Default::default() };
            match pollster::block_on(adapter.request_device(&desc)) {
                Ok((device, queue)) => return Ok(Self::from_device(device, queue, &info, &options)),
                Err(e) => found.push(format!("{name}: {e}")),
            }
        }
        let backend = match &wanted {
            Some(w) => format!("wgpu compute adapter matching `{w}`"),
            None => "wgpu compute adapter (Vulkan, Metal or DX12)".to_string(),
        };
        Err(GpuError::NoDevice { backend, found })
    }

    fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: &wgpu::AdapterInfo, options: &WgpuOptions) -> Self {
        let name = describe(info);
        let software = info.device_type == wgpu::DeviceType::Cpu;
        if software {
            tracing::warn!(adapter = %name, "wgpu runs on a software rasteriser: correct, but no faster than the CPU");
        } else {
            tracing::info!(adapter = %name, "wgpu adapter");
        }
        // Errors are caught by the error scope around every call; anything that escapes one is
        // logged rather than aborting the process (wgpu's default handler panics).
        let label = name.clone();
        device.on_uncaptured_error(Arc::new(move |e| tracing::error!(adapter = %label, "uncaptured wgpu error: {e}")));
        let mut limits = device.limits();
        if let Some(cap) = options.max_buffer_bytes {
            limits.max_buffer_size = limits.max_buffer_size.min(cap);
            limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap);
        }
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("pare.dummy"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: false,
        });
        let ctx = Ctx {
            device,
            queue,
            name,
            software,
            limits,
            kernels: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            dummy,
            submits: Default::default(),
        };
        WgpuRuntime { ctx: Arc::new(ctx), cpu: Device::Cpu, sparse_as_dense: options.sparse_as_dense }
    }

    /// The adapter's name, backend and type, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)`.
    pub fn adapter(&self) -> &str {
        &self.ctx.name
    }

    /// Whether the adapter is a software rasteriser (Mesa's lavapipe / llvmpipe, WARP).
    pub fn is_software(&self) -> bool {
        self.ctx.software
    }

    /// Command buffers this runtime has submitted and waited for: one per op run op by op,
    /// one per whole graph run resident (see [`pare_core_tensor::Runtime::run_graph`]).
    pub fn submissions(&self) -> u64 {
        self.ctx.submits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The device's limits (with [`WgpuOptions::max_buffer_bytes`] applied).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.ctx.limits
    }

    /// Compiles a WGSL compute shader (entry point `main`, bindings as pare's weight ops use
    /// them) on this adapter, as pare does for each of its kernels: a [`GpuError::Shader`] with
    /// the compiler's message when the driver refuses it.
    pub fn compile(&self, name: &str, wgsl: &str) -> std::result::Result<(), GpuError> {
        self.ctx.kernel(&format!("user:{name}"), &WEIGHT_SLOTS, || wgsl.to_string()).map(|_| ())
    }
}

/// The uniform parameters ([`shaders`]' `Params`), built field by field.
#[derive(Default, Clone, Copy)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    bits: u32,
    q_min: i32,
    sdiv: u32,
    smod: u32,
    has_zero: u32,
    codebook: u32,
    act: u32,
    extra: u32,
    batch: u32,
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    kh: u32,
    kw: u32,
    oh: u32,
    ow: u32,
    pad: u32,
    stride: u32,
    dil: u32,
    cin_g: u32,
    cout_g: u32,
    heads: u32,
    scale: f32,
}

impl Params {
    fn words(&self) -> [u32; PARAM_WORDS] {
        [
            self.m,
            self.n,
            self.k,
            self.has_bias,
            self.bits,
            self.q_min as u32,
            self.sdiv,
            self.smod,
            self.has_zero,
            self.codebook,
            self.act,
            self.extra,
            self.batch,
            self.cin,
            self.h,
            self.w,
            self.cout,
            self.kh,
            self.kw,
            self.oh,
            self.ow,
            self.pad,
            self.stride,
            self.dil,
            self.cin_g,
            self.cout_g,
            self.heads,
            self.scale.to_bits(),
        ]
    }
}

fn u32_of(v: usize, what: &str, device: &str) -> std::result::Result<u32, GpuError> {
    u32::try_from(v).map_err(|_| GpuError::Limit {
        device: device.to_string(),
        what: what.to_string(),
        limit: "u32 indexing",
        needed: v as u64,
        max: u64::from(u32::MAX),
    })
}

/// A buffer handed out by the pool, returned to it on drop.
struct Pooled<'a> {
    ctx: &'a Ctx,
    key: (u64, u32),
    buf: Option<wgpu::Buffer>,
    /// Bytes the op uses (the buffer may be larger).
    len: u64,
}

impl Pooled<'_> {
    fn buffer(&self) -> &wgpu::Buffer {
        self.buf.as_ref().expect("present until drop")
    }

    /// This buffer bound to `slot` (the bytes the op uses).
    fn at(&self, slot: u32) -> (u32, &wgpu::Buffer, u64) {
        (slot, self.buffer(), self.len)
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take()
            && let Ok(mut pool) = self.ctx.pool.lock()
        {
            pool.entry(self.key).or_default().push(b);
        }
    }
}

impl Ctx {
    fn check_size(&self, what: &str, bytes: u64) -> std::result::Result<(), GpuError> {
        let l = &self.limits;
        let (limit, max) = if l.max_storage_buffer_binding_size < l.max_buffer_size {
            ("max_storage_buffer_binding_size", l.max_storage_buffer_binding_size)
        } else {
            ("max_buffer_size", l.max_buffer_size)
        };
        if bytes > max {
            return Err(GpuError::Limit {
                device: self.name.clone(),
                what: format!("{what} ({bytes} bytes)"),
                limit,
                needed: bytes,
                max,
            });
        }
        Ok(())
    }

    /// A buffer of at least `bytes` (rounded up to a power of two, so sizes recur) from the pool.
    fn acquire(&self, what: &str, bytes: u64, usage: wgpu::BufferUsages) -> std::result::Result<Pooled<'_>, GpuError> {
        let len = bytes.max(4).next_multiple_of(4);
        self.check_size(what, len)?;
        let size = len.next_power_of_two().max(256).min(self.limits.max_buffer_size.max(len));
        let key = (size, usage.bits());
        let reused = self.pool.lock().ok().and_then(|mut p| p.get_mut(&key).and_then(Vec::pop));
        let buf = reused.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage,
                mapped_at_creation: false,
            })
        });
        Ok(Pooled { ctx: self, key, buf: Some(buf), len })
    }

    /// Uploads `words` into a pooled storage buffer.
    fn upload(&self, what: &str, words: &[u32]) -> std::result::Result<Pooled<'_>, GpuError> {
        let bytes: &[u8] = bytemuck::cast_slice(words);
        let b = self.acquire(what, bytes.len() as u64, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST)?;
        if !bytes.is_empty() {
            self.queue.write_buffer(b.buffer(), 0, bytes);
        }
        Ok(b)
    }

    /// A storage buffer holding `words` for the life of a prepared op (weights, biases).
    fn resident(&self, what: &str, words: &[u32]) -> std::result::Result<wgpu::Buffer, GpuError> {
        let mut data: Vec<u32> = words.to_vec();
        if data.is_empty() {
            data.push(0);
        }
        self.check_size(what, 4 * data.len() as u64)?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(what),
            contents: bytemuck::cast_slice(&data),
            usage: wgpu::BufferUsages::STORAGE,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Device {
                device: self.name.clone(),
                op: format!("uploading {what}"),
                message: e.to_string(),
            });
        }
        Ok(buf)
    }

    /// The compiled kernel `key`, compiling `source()` the first time.
    fn kernel(
        &self,
        key: &str,
        slots: &[Slot],
        source: impl FnOnce() -> String,
    ) -> std::result::Result<Arc<Kernel>, GpuError> {
        if let Some(k) = self.kernels.lock().ok().and_then(|m| m.get(key).cloned()) {
            return Ok(k);
        }
        let entries: Vec<wgpu::BindGroupLayoutEntry> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match s {
                        Slot::Uniform => wgpu::BufferBindingType::Uniform,
                        Slot::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Slot::Write => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(key),
            source: wgpu::ShaderSource::Wgsl(source().into()),
        });
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(key), entries: &entries });
        let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(key),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key),
            layout: Some(&pl),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Shader {
                device: self.name.clone(),
                shader: key.to_string(),
                message: e.to_string(),
            });
        }
        let k = Arc::new(Kernel { pipeline, layout, slots: slots.len() as u32 });
        if let Ok(mut m) = self.kernels.lock() {
            m.insert(key.to_string(), k.clone());
        }
        Ok(k)
    }

    /// Workgroup counts `(x, y)` for `groups` workgroups of a flat kernel.
    fn grid(&self, op: &str, groups: u64) -> std::result::Result<(u32, u32), GpuError> {
        let max = u64::from(self.limits.max_compute_workgroups_per_dimension);
        let x = groups.clamp(1, max);
        let y = groups.div_ceil(x).max(1);
        if y > max {
            return Err(GpuError::Limit {
                device: self.name.clone(),
                what: format!("{op}: a dispatch of {groups} workgroups"),
                limit: "max_compute_workgroups_per_dimension (squared)",
                needed: groups,
                max: max * max,
            });
        }
        Ok((x as u32, y as u32))
    }

    /// Records `kernel` over `grid` into `enc` with `params` in slot 0, `bound` buffers in
    /// their slots (the first `len` bytes of each) and the output `out` (its first `out_len`
    /// bytes) in slot 2. Slots nothing is bound to get a dummy.
    #[allow(clippy::too_many_arguments)]
    fn encode(
        &self,
        enc: &mut wgpu::CommandEncoder,
        op: &str,
        kernel: &Kernel,
        params: &Params,
        bound: &[(u32, &wgpu::Buffer, u64)],
        grid: (u32, u32),
        (out, out_len): (&wgpu::Buffer, u64),
    ) {
        let uniform = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("pare.params"),
            contents: bytemuck::cast_slice(&params.words()),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![
            wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 2, resource: bind(out, out_len) },
        ];
        for &(slot, b, len) in bound {
            entries.push(wgpu::BindGroupEntry { binding: slot, resource: bind(b, len) });
        }
        for slot in 0..kernel.slots {
            if !entries.iter().any(|e| e.binding == slot) {
                entries.push(wgpu::BindGroupEntry { binding: slot, resource: self.dummy.as_entire_binding() });
            }
        }
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(op),
            layout: &kernel.layout,
            entries: &entries,
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(op), timestamp_writes: None });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(grid.0, grid.1, 1);
    }

    /// Submits `enc` after copying each of `outs` (a buffer and the floats it holds) into a
    /// staging buffer, waits, and reads them back; any validation or out-of-memory error the
    /// device raised while `enc` was built or run is returned as `op`'s.
    fn finish(
        &self,
        op: &str,
        mut enc: wgpu::CommandEncoder,
        scopes: (wgpu::ErrorScopeGuard, wgpu::ErrorScopeGuard),
        outs: &[(&wgpu::Buffer, usize)],
    ) -> std::result::Result<Vec<Vec<f32>>, GpuError> {
        let mut staging = Vec::with_capacity(outs.len());
        for &(b, floats) in outs {
            let bytes = 4 * floats as u64;
            let s = self.acquire(op, bytes, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST)?;
            enc.copy_buffer_to_buffer(b, 0, s.buffer(), 0, s.len);
            staging.push((s, floats));
        }
        self.queue.submit([enc.finish()]);
        self.submits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (validation, oom) = scopes;
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = v.or(o) {
            return Err(GpuError::Device { device: self.name.clone(), op: op.to_string(), message: e.to_string() });
        }
        let failed = |message: String| GpuError::Device { device: self.name.clone(), op: op.to_string(), message };
        let (tx, rx) = std::sync::mpsc::channel();
        for (s, _) in &staging {
            let tx = tx.clone();
            s.buffer().map_async(wgpu::MapMode::Read, 0..s.len, move |r| {
                let _ = tx.send(r);
            });
        }
        drop(tx);
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| failed(e.to_string()))?;
        for _ in &staging {
            rx.recv().map_err(|e| failed(e.to_string()))?.map_err(|e| failed(e.to_string()))?;
        }
        let mut data = Vec::with_capacity(staging.len());
        for (s, floats) in &staging {
            {
                let view = s.buffer().get_mapped_range(0..s.len).map_err(|e| failed(e.to_string()))?;
                data.push(bytemuck::cast_slice::<u8, f32>(&view)[..*floats].to_vec());
            }
            s.buffer().unmap();
        }
        Ok(data)
    }

    /// The error scopes [`Ctx::finish`] pops (validation, then out of memory).
    fn scopes(&self) -> (wgpu::ErrorScopeGuard, wgpu::ErrorScopeGuard) {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        (validation, oom)
    }

    /// Runs `kernel` over `grid` with `params` in slot 0, `bound` buffers in their slots and an
    /// output of `out_len` floats in slot 2, and reads the output back.
    fn run(
        &self,
        op: &str,
        kernel: &Kernel,
        params: &Params,
        bound: &[(u32, &wgpu::Buffer, u64)],
        grid: (u32, u32),
        out_len: usize,
    ) -> std::result::Result<Vec<f32>, GpuError> {
        let out = self.acquire(op, 4 * out_len as u64, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC)?;
        let scopes = self.scopes();
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(op) });
        self.encode(&mut enc, op, kernel, params, bound, grid, (out.buffer(), out.len));
        Ok(self.finish(op, enc, scopes, &[(out.buffer(), out_len)])?.pop().expect("one output"))
    }
}

/// The first `len` bytes of `b` as a binding.
fn bind(b: &wgpu::Buffer, len: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: b, offset: 0, size: NonZeroU64::new(len.max(4)) })
}

/// A weight on the device in its stored format, with the uniform fields that decode it.
struct DevWeight {
    format: WFormat,
    words: [Option<wgpu::Buffer>; 4],
    params: Params,
}

fn f32_words(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

impl WgpuRuntime {
    fn gpu_err(&self, what: String, hint: Option<String>) -> Error {
        GpuError::Unsupported { runtime: "wgpu", device: self.ctx.name.clone(), what, hint }.into()
    }

    /// Uploads `weight` (viewed as `[rows, cols]`, rows first) for ops that read it through
    /// `w_at` or, for sparse formats where `csr_ok`, as CSR rows.
    fn upload_weight(&self, layer: &str, weight: &Weight, csr_ok: bool) -> Result<DevWeight> {
        let shape = weight.shape();
        let rows = shape.first().copied().unwrap_or(1);
        let cols: usize = shape.iter().skip(1).product();
        let ctx = &self.ctx;
        let up = |what: &str, words: &[u32]| ctx.resident(&format!("`{layer}` {what}"), words);
        let mut p = Params::default();
        let (format, words) = match weight {
            Weight::Dense(t) => match t.dtype() {
                DType::F16 | DType::BF16 => {
                    let bits: Vec<u16> = match t.dtype() {
                        DType::F16 => t.flatten_all()?.to_vec1::<half::f16>()?.iter().map(|h| h.to_bits()).collect(),
                        _ => t.flatten_all()?.to_vec1::<half::bf16>()?.iter().map(|h| h.to_bits()).collect(),
                    };
                    let words: Vec<u32> = bits
                        .chunks(2)
                        .map(|c| u32::from(c[0]) | (u32::from(c.get(1).copied().unwrap_or(0)) << 16))
                        .collect();
                    let f = if t.dtype() == DType::F16 { WFormat::F16 } else { WFormat::Bf16 };
                    (f, [Some(up("weight", &words)?), None, None, None])
                }
                _ => {
                    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    (WFormat::F32, [Some(up("weight", &f32_words(&v))?), None, None, None])
                }
            },
            Weight::Quantized(q) => {
                let s = q.scheme();
                let packed = q.packed_codes();
                let mut words = vec![0u32; packed.len().div_ceil(4) + 1];
                bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..packed.len()].copy_from_slice(packed);
                let n_scales = q.scales().len();
                let (sdiv, smod) = match s.granularity {
                    Granularity::PerTensor => (1, 1),
                    Granularity::PerChannel { axis } => {
                        (shape[axis + 1..].iter().product::<usize>().max(1), shape[axis])
                    }
                    Granularity::PerGroup { size } => (size, n_scales),
                    Granularity::PerToken => (shape.last().copied().unwrap_or(1).max(1), n_scales),
                };
                let dev = &ctx.name;
                p.bits = u32::from(s.bits);
                p.q_min = s.q_min();
                p.sdiv = u32_of(sdiv, "scale group", dev)?;
                p.smod = u32_of(smod.max(1), "scale count", dev)?;
                p.codebook = u32::from(s.mapping == Mapping::Codebook);
                let zeros = q.zero_points().map(|z| z.iter().map(|&v| v as u32).collect::<Vec<u32>>());
                p.has_zero = u32::from(zeros.is_some());
                let cb = q.codebook().map(f32_words);
                (
                    WFormat::Quant,
                    [
                        Some(up("codes", &words)?),
                        Some(up("scales", &f32_words(q.scales()))?),
                        zeros.map(|z| up("zero points", &z)).transpose()?,
                        cb.map(|c| up("codebook", &c)).transpose()?,
                    ],
                )
            }
            Weight::Sparse(s) if csr_ok => {
                let (row_ptr, col_idx, values) = match s.layout() {
                    SparseLayout::Csr { row_ptr, col_idx, values } if row_ptr.len() == rows + 1 => {
                        (row_ptr.clone(), col_idx.clone(), values.clone())
                    }
                    _ => csr_of(s.to_dense_f32(), rows, cols, layer)?,
                };
                (
                    WFormat::Csr,
                    [
                        Some(up("row pointers", &row_ptr)?),
                        Some(up("column indices", &col_idx)?),
                        Some(up("values", &f32_words(&values))?),
                        None,
                    ],
                )
            }
            Weight::Sparse(s) if self.sparse_as_dense => {
                (WFormat::F32, [Some(up("weight (densified)", &f32_words(&s.to_dense_f32()))?), None, None, None])
            }
            Weight::Sparse(_) => {
                return Err(self.gpu_err(
                    format!("`{layer}`: a {} weight here", weight.describe()),
                    Some("set WgpuOptions::sparse_as_dense to run it dense".into()),
                ));
            }
        };
        Ok(DevWeight { format, words, params: p })
    }

    fn bias(&self, layer: &str, bias: Option<&Tensor>, out: usize) -> Result<Option<wgpu::Buffer>> {
        pare_core_tensor::check_bias(layer, bias, out)?;
        let Some(b) = bias else { return Ok(None) };
        let v = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(Some(self.ctx.resident(&format!("`{layer}` bias"), &f32_words(&v))?))
    }

    /// The weight's words in slots 3–6, the bias in 7, and `x` (bound to slot 1) first.
    fn weight_slots<'a>(
        x: (u32, &'a wgpu::Buffer, u64),
        w: &'a DevWeight,
        bias: Option<&'a wgpu::Buffer>,
    ) -> Vec<(u32, &'a wgpu::Buffer, u64)> {
        let mut v = vec![x];
        v.extend(w.words.iter().enumerate().filter_map(|(i, b)| b.as_ref().map(|b| (3 + i as u32, b, b.size()))));
        if let Some(b) = bias {
            v.push((7, b, b.size()));
        }
        v
    }
}

/// CSR arrays of a dense row-major `[rows, cols]` matrix, keeping its nonzeros.
fn csr_of(dense: Vec<f32>, rows: usize, cols: usize, layer: &str) -> Result<(Vec<u32>, Vec<u32>, Vec<f32>)> {
    let t = Tensor::from_vec(dense, (rows, cols), &Device::Cpu)?;
    match SparseTensor::csr_from_dense(&t, layer)?.layout() {
        SparseLayout::Csr { row_ptr, col_idx, values } => Ok((row_ptr.clone(), col_idx.clone(), values.clone())),
        _ => unreachable!("csr_from_dense builds CSR"),
    }
}

fn f32_input(x: &Tensor) -> Result<Vec<u32>> {
    Ok(f32_words(&x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
}

fn output(data: Vec<f32>, dims: &[usize], dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(data, dims, &Device::Cpu)?;
    Ok(if dtype == DType::F32 { t } else { t.to_dtype(dtype)? })
}

#[derive(Debug)]
struct LinearOp {
    rt: WgpuRuntime,
    layer: String,
    w: DevWeightBox,
    bias: Option<wgpu::Buffer>,
    n: usize,
    k: usize,
}

/// `DevWeight` with a `Debug` that does not print buffers.
struct DevWeightBox(DevWeight);

impl fmt::Debug for DevWeightBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} weight", self.0.format.key())
    }
}

impl PreparedOp for LinearOp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.last() != Some(&self.k) {
            return Err(Error::Shape {
                name: format!("input of `{}`", self.layer),
                expected: vec![self.k],
                found: dims.to_vec(),
            });
        }
        let ctx = &self.rt.ctx;
        let m = x.elem_count() / self.k.max(1);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked") = self.n;
        if m == 0 || self.n == 0 {
            return Ok(Tensor::zeros(out_dims, x.dtype(), &Device::Cpu)?);
        }
        let (op, kernel, p, grid) = self.plan(m)?;
        let xb = ctx.upload(&op, &f32_input(x)?)?;
        let bound = WgpuRuntime::weight_slots(xb.at(1), &self.w.0, self.bias.as_ref());
        let y = ctx.run(&op, &kernel, &p, &bound, grid, m * self.n)?;
        output(y, &out_dims, x.dtype())
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl LinearOp {
    /// The op's name, kernel, parameters and grid for `m` input rows.
    fn plan(&self, m: usize) -> Result<Dispatch> {
        let ctx = &self.rt.ctx;
        let f = self.w.0.format;
        let key = format!("linear-{}", f.key());
        let kernel = ctx.kernel(&key, &WEIGHT_SLOTS, || shaders::linear(f))?;
        let mut p = self.w.0.params;
        let dev = &ctx.name;
        p.m = u32_of(m, "linear rows", dev)?;
        p.n = u32_of(self.n, "linear outputs", dev)?;
        p.k = u32_of(self.k, "linear inputs", dev)?;
        u32_of(m * self.n, "linear output", dev)?;
        p.has_bias = u32::from(self.bias.is_some());
        let op = format!("linear `{}`", self.layer);
        let invocations = if f == WFormat::Csr {
            m * self.n
        } else {
            let b = BLOCK as usize;
            m.div_ceil(b) * self.n.div_ceil(b)
        };
        let grid = ctx.grid(&op, invocations.div_ceil(64) as u64)?;
        Ok((op, kernel, p, grid))
    }
}

#[derive(Debug)]
struct ConvOp {
    rt: WgpuRuntime,
    layer: String,
    w: DevWeightBox,
    bias: Option<wgpu::Buffer>,
    shape: [usize; 4],
    params: Conv2dParams,
}

impl PreparedOp for ConvOp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.out_dims(x.dims())?;
        if out.iter().product::<usize>() == 0 {
            return Ok(Tensor::zeros(out, x.dtype(), &Device::Cpu)?);
        }
        let ctx = &self.rt.ctx;
        let (op, kernel, p, grid) = self.plan(x.dims(), &out)?;
        let xb = ctx.upload(&op, &f32_input(x)?)?;
        let bound = WgpuRuntime::weight_slots(xb.at(1), &self.w.0, self.bias.as_ref());
        let y = ctx.run(&op, &kernel, &p, &bound, grid, out.iter().product())?;
        output(y, &out, x.dtype())
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl ConvOp {
    /// The output `[b, cout, oh, ow]` for an input of `dims`, checked.
    fn out_dims(&self, dims: &[usize]) -> Result<Vec<usize>> {
        let [cout, cin_g, kh, kw] = self.shape;
        let cp = self.params;
        let &[b, cin, h, w] = dims else {
            return Err(Error::Shape {
                name: format!("input of `{}`", self.layer),
                expected: vec![0, cin_g * cp.groups, 0, 0],
                found: dims.to_vec(),
            });
        };
        if cin != cin_g * cp.groups {
            return Err(Error::Shape {
                name: format!("input of `{}` (channels)", self.layer),
                expected: vec![b, cin_g * cp.groups, h, w],
                found: dims.to_vec(),
            });
        }
        let span = |size: usize, k: usize| -> Result<usize> {
            let need = cp.dilation * (k - 1) + 1;
            if size + 2 * cp.padding < need {
                return Err(Error::invalid(
                    format!("conv2d `{}`", self.layer),
                    format!(
                        "a {k}-wide kernel (dilation {}) needs {need} padded pixels, found {}",
                        cp.dilation,
                        size + 2 * cp.padding
                    ),
                ));
            }
            Ok((size + 2 * cp.padding - need) / cp.stride + 1)
        };
        Ok(vec![b, cout, span(h, kh)?, span(w, kw)?])
    }

    /// The dispatch for an input of `dims` (checked by [`ConvOp::out_dims`]) giving `out`.
    fn plan(&self, dims: &[usize], out: &[usize]) -> Result<Dispatch> {
        let [cout, cin_g, kh, kw] = self.shape;
        let cp = self.params;
        let (b, cin, h, w) = (dims[0], dims[1], dims[2], dims[3]);
        let (oh, ow) = (out[2], out[3]);
        let total = b * cout * oh * ow;
        let ctx = &self.rt.ctx;
        let f = self.w.0.format;
        let kernel = ctx.kernel(&format!("conv2d-{}", f.key()), &WEIGHT_SLOTS, || shaders::conv2d(f))?;
        let dev = &ctx.name;
        let mut p = self.w.0.params;
        let u = |v: usize| u32_of(v, "conv2d size", dev);
        u32_of(total, "conv2d output", dev)?;
        u32_of(b * cin * h * w, "conv2d input", dev)?;
        (p.batch, p.cin, p.h, p.w, p.cout, p.kh, p.kw, p.oh, p.ow) =
            (u(b)?, u(cin)?, u(h)?, u(w)?, u(cout)?, u(kh)?, u(kw)?, u(oh)?, u(ow)?);
        (p.pad, p.stride, p.dil, p.cin_g, p.cout_g) =
            (u(cp.padding)?, u(cp.stride)?, u(cp.dilation)?, u(cin_g)?, u(cout / cp.groups)?);
        p.has_bias = u32::from(self.bias.is_some());
        let op = format!("conv2d `{}`", self.layer);
        let grid = ctx.grid(&op, total.div_ceil(64) as u64)?;
        Ok((op, kernel, p, grid))
    }
}

#[derive(Debug)]
struct EmbeddingOp {
    rt: WgpuRuntime,
    layer: String,
    w: DevWeightBox,
    vocab: usize,
    dim: usize,
    dtype: DType,
}

impl PreparedOp for EmbeddingOp {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let words = self.ids(ids)?;
        let mut dims = ids.dims().to_vec();
        dims.push(self.dim);
        let total = words.len() * self.dim;
        if total == 0 {
            return Ok(Tensor::zeros(dims, self.dtype, &Device::Cpu)?);
        }
        let ctx = &self.rt.ctx;
        let (op, kernel, p, grid) = self.plan(words.len())?;
        let xb = ctx.upload(&op, &words)?;
        let bound = WgpuRuntime::weight_slots(xb.at(1), &self.w.0, None);
        let y = ctx.run(&op, &kernel, &p, &bound, grid, total)?;
        output(y, &dims, self.dtype)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl EmbeddingOp {
    /// `ids` as the kernel's u32 words, each checked to lie inside the table.
    fn ids(&self, ids: &Tensor) -> Result<Vec<u32>> {
        if ids.dtype().is_float() {
            return Err(Error::DType {
                name: format!("ids of `{}`", self.layer),
                expected: "an integer type".into(),
                found: format!("{:?}", ids.dtype()).to_lowercase(),
            });
        }
        let flat = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        if let Some((i, &id)) = flat.iter().enumerate().find(|(_, id)| **id < 0 || **id as usize >= self.vocab) {
            return Err(Error::invalid(
                format!("embedding `{}`", self.layer),
                format!("id {id} at flat index {i} is outside the table of {} rows", self.vocab),
            ));
        }
        Ok(flat.iter().map(|&i| i as u32).collect())
    }

    /// The op's name, kernel, parameters and grid for `ids` lookups.
    fn plan(&self, ids: usize) -> Result<Dispatch> {
        let ctx = &self.rt.ctx;
        let f = self.w.0.format;
        let kernel = ctx.kernel(&format!("embedding-{}", f.key()), &WEIGHT_SLOTS, || shaders::embedding(f))?;
        let dev = &ctx.name;
        let total = ids * self.dim;
        let mut p = self.w.0.params;
        p.m = u32_of(ids, "embedding ids", dev)?;
        p.n = u32_of(self.dim, "embedding width", dev)?;
        u32_of(self.vocab * self.dim, "embedding table", dev)?;
        u32_of(total, "embedding output", dev)?;
        let op = format!("embedding `{}`", self.layer);
        let grid = ctx.grid(&op, total.div_ceil(64) as u64)?;
        Ok((op, kernel, p, grid))
    }
}

impl WgpuRuntime {
    /// The activation kernel over `n` values.
    fn act_plan(&self, act: Activation, n: usize) -> Result<Dispatch> {
        let ctx = &self.ctx;
        let kernel = ctx.kernel("activation", &UNARY_SLOTS, shaders::activation)?;
        let p = Params { m: u32_of(n, "activation input", &ctx.name)?, act: act_code(act), ..Default::default() };
        let op = format!("{act:?}").to_lowercase();
        let grid = ctx.grid(&op, n.div_ceil(64) as u64)?;
        Ok((op, kernel, p, grid))
    }

    /// The element-wise sum of two buffers of `n` values.
    fn add_plan(&self, n: usize) -> Result<Dispatch> {
        let ctx = &self.ctx;
        let kernel = ctx.kernel("add", &BINARY_SLOTS, shaders::add)?;
        let p = Params { m: u32_of(n, "addition", &ctx.name)?, ..Default::default() };
        let op = "add".to_string();
        let grid = ctx.grid(&op, n.div_ceil(64) as u64)?;
        Ok((op, kernel, p, grid))
    }

    /// Max pooling of `[b, c, h, w]` (`dims`) over `size × size` windows into `[b, c, oh, ow]`.
    fn pool_plan(&self, dims: &[usize], size: usize, (oh, ow): (usize, usize)) -> Result<Dispatch> {
        let ctx = &self.ctx;
        let kernel = ctx.kernel("max_pool", &UNARY_SLOTS, shaders::max_pool)?;
        let dev = &ctx.name;
        let u = |v: usize| u32_of(v, "max pool size", dev);
        let total = dims[0] * dims[1] * oh * ow;
        u32_of(dims.iter().product(), "max pool input", dev)?;
        let p = Params {
            batch: u(dims[0])?,
            cin: u(dims[1])?,
            h: u(dims[2])?,
            w: u(dims[3])?,
            oh: u(oh)?,
            ow: u(ow)?,
            kh: u(size)?,
            ..Default::default()
        };
        let op = "max pool".to_string();
        let grid = ctx.grid(&op, total.div_ceil(64) as u64)?;
        Ok((op, kernel, p, grid))
    }

    /// Layer norm over `rows` rows of `n` (with a residual when `residual`).
    fn norm_plan(&self, rows: usize, n: usize, residual: bool, eps: f64) -> Result<Dispatch> {
        let ctx = &self.ctx;
        let kernel = ctx.kernel("layer_norm", &NORM_SLOTS, shaders::layer_norm)?;
        let dev = &ctx.name;
        let p = Params {
            m: u32_of(rows, "layer norm rows", dev)?,
            n: u32_of(n, "layer norm width", dev)?,
            extra: u32::from(residual),
            scale: eps as f32,
            ..Default::default()
        };
        u32_of(rows * n, "layer norm input", dev)?;
        let op = "layer norm".to_string();
        let grid = ctx.grid(&op, rows as u64)?;
        Ok((op, kernel, p, grid))
    }

    /// Attention over `[b, t, hidden]` projections in `heads` heads.
    fn attention_plan(
        &self,
        (b, t, hidden): (usize, usize, usize),
        heads: usize,
        mask: bool,
        scale: f64,
    ) -> Result<Dispatch> {
        let ctx = &self.ctx;
        let kernel = ctx.kernel("attention", &NORM_SLOTS, shaders::attention)?;
        let dev = &ctx.name;
        u32_of(b * t * hidden, "attention input", dev)?;
        let p = Params {
            batch: b as u32,
            m: t as u32,
            n: hidden as u32,
            k: (hidden / heads) as u32,
            heads: heads as u32,
            extra: u32::from(mask),
            scale: scale as f32,
            ..Default::default()
        };
        let op = "attention".to_string();
        let grid = ctx.grid(&op, (b * heads * t).div_ceil(64) as u64)?;
        Ok((op, kernel, p, grid))
    }
}

fn act_code(a: Activation) -> u32 {
    match a {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
        Activation::Tanh => 3,
        Activation::Sigmoid => 4,
        Activation::Silu => 5,
        Activation::Identity => 6,
    }
}

impl Runtime for WgpuRuntime {
    fn name(&self) -> &str {
        "wgpu"
    }

    /// Activations live on the CPU between ops; weights live on the adapter.
    fn device(&self) -> &Device {
        &self.cpu
    }

    /// Models hand the adapter whole graphs: activations stay on it from the first op to the
    /// last.
    fn resident(&self) -> bool {
        true
    }

    fn run_graph(&self, graph: &pare_core_tensor::Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        match self.run_resident(graph, inputs)? {
            Some(out) => Ok(out),
            None => {
                tracing::debug!("graph has a step the adapter cannot take resident; running it op by op");
                graph.interpret(self, inputs)
            }
        }
    }

    fn prepare_linear(&self, layer: &str, weight: &Weight, bias: Option<&Tensor>) -> Result<Arc<dyn PreparedOp>> {
        let shape = weight.shape();
        if shape.len() != 2 {
            return Err(Error::invalid(
                format!("linear layer `{layer}`"),
                format!("weight must be 2-D, found {shape:?}"),
            ));
        }
        let bias = self.bias(layer, bias, shape[0])?;
        let w = DevWeightBox(self.upload_weight(layer, weight, true)?);
        Ok(Arc::new(LinearOp { rt: self.clone(), layer: layer.to_string(), w, bias, n: shape[0], k: shape[1] }))
    }

    fn prepare_conv2d(
        &self,
        layer: &str,
        weight: &Weight,
        bias: Option<&Tensor>,
        params: Conv2dParams,
    ) -> Result<Arc<dyn PreparedOp>> {
        let shape = weight.shape();
        let [cout, cin_g, kh, kw] = shape[..] else {
            return Err(Error::invalid(
                format!("conv2d layer `{layer}`"),
                format!("weight must be 4-D, found {shape:?}"),
            ));
        };
        if params.groups == 0 || params.stride == 0 || params.dilation == 0 || !cout.is_multiple_of(params.groups) {
            return Err(Error::invalid(
                format!("conv2d layer `{layer}`"),
                format!(
                    "groups, stride and dilation must be ≥ 1 and groups must divide {cout} outputs, found {params:?}"
                ),
            ));
        }
        let bias = self.bias(layer, bias, cout)?;
        let w = DevWeightBox(self.upload_weight(layer, weight, true)?);
        Ok(Arc::new(ConvOp {
            rt: self.clone(),
            layer: layer.to_string(),
            w,
            bias,
            shape: [cout, cin_g, kh, kw],
            params,
        }))
    }

    fn prepare_embedding(&self, layer: &str, weight: &Weight) -> Result<Arc<dyn PreparedOp>> {
        let shape = weight.shape();
        if shape.len() != 2 {
            return Err(Error::invalid(format!("embedding `{layer}`"), format!("weight must be 2-D, found {shape:?}")));
        }
        let w = DevWeightBox(self.upload_weight(layer, weight, false)?);
        Ok(Arc::new(EmbeddingOp {
            rt: self.clone(),
            layer: layer.to_string(),
            w,
            vocab: shape[0],
            dim: shape[1],
            dtype: weight.dtype(),
        }))
    }

    fn activation(&self, act: Activation, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        if n == 0 || act == Activation::Identity {
            return Ok(x.clone());
        }
        let ctx = &self.ctx;
        let (op, kernel, p, grid) = self.act_plan(act, n)?;
        let xb = ctx.upload(&op, &f32_input(x)?)?;
        let y = ctx.run(&op, &kernel, &p, &[xb.at(1)], grid, n)?;
        output(y, x.dims(), x.dtype())
    }

    fn layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        let n = x.dims().last().copied().unwrap_or(0);
        if let Some(r) = residual
            && r.dims() != x.dims()
        {
            return Err(Error::Shape {
                name: "layer norm residual".into(),
                expected: x.dims().to_vec(),
                found: r.dims().to_vec(),
            });
        }
        for (name, t) in [("layer norm gamma", gamma), ("layer norm beta", beta)] {
            if t.dims() != [n] {
                return Err(Error::Shape { name: name.into(), expected: vec![n], found: t.dims().to_vec() });
            }
        }
        let rows = x.elem_count() / n.max(1);
        if rows == 0 || n == 0 {
            return Ok(x.clone());
        }
        let ctx = &self.ctx;
        let (op, kernel, p, grid) = self.norm_plan(rows, n, residual.is_some(), eps)?;
        let op = op.as_str();
        let xb = ctx.upload(op, &f32_input(x)?)?;
        let rb = residual.map(|r| f32_input(r).and_then(|w| Ok(ctx.upload(op, &w)?))).transpose()?;
        let gb = ctx.upload(op, &f32_input(gamma)?)?;
        let bb = ctx.upload(op, &f32_input(beta)?)?;
        let mut bound = vec![xb.at(1), gb.at(4), bb.at(5)];
        bound.extend(rb.as_ref().map(|r| r.at(3)));
        let y = ctx.run(op, &kernel, &p, &bound, grid, x.elem_count())?;
        output(y, x.dims(), x.dtype())
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        mask: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        check_attention(q, k, v, heads, mask)?;
        let (b, t, hidden) = q.dims3()?;
        let hs = hidden / heads;
        if hs > MAX_HEAD as usize {
            return Err(self.gpu_err(format!("attention with head size {hs} (at most {MAX_HEAD})"), None));
        }
        if q.elem_count() == 0 {
            return Ok(q.clone());
        }
        let ctx = &self.ctx;
        let (op, kernel, p, grid) = self.attention_plan((b, t, hidden), heads, mask.is_some(), scale)?;
        let op = op.as_str();
        let qb = ctx.upload(op, &f32_input(q)?)?;
        let kb = ctx.upload(op, &f32_input(k)?)?;
        let vb = ctx.upload(op, &f32_input(v)?)?;
        let mb = mask.map(|m| f32_input(m).and_then(|w| Ok(ctx.upload(op, &w)?))).transpose()?;
        let mut bound = vec![qb.at(1), kb.at(3), vb.at(4)];
        bound.extend(mb.as_ref().map(|m| m.at(5)));
        let y = ctx.run(op, &kernel, &p, &bound, grid, q.elem_count())?;
        output(y, q.dims(), q.dtype())
    }
}

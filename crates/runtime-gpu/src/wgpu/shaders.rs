//! WGSL sources. Ops that read weights are one template each, with the weight format's
//! `w_at(i)` (the dense value of flat weight element `i`) spliced in, so every format is
//! dequantized in the shader and float weights are never materialised on the device.
//!
//! Every weight op binds the same seven slots: `P` (the uniform parameters below), `x` (input),
//! `y` (output), `w0`..`w3` (the format's words) and `bias`. Unused slots get a 4-byte dummy.

/// How a weight's words are laid out on the device (`w0`..`w3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum WFormat {
    /// `w0`: f32 bits.
    F32,
    /// `w0`: IEEE half pairs (element `2i` in the low half of word `i`).
    F16,
    /// `w0`: bfloat16 pairs, same packing.
    Bf16,
    /// `w0`: the little-endian code stream (`pare_core_tensor::pack_codes`), `w1`: f32 scales,
    /// `w2`: i32 zero points, `w3`: f32 codebook.
    Quant,
    /// `w0`: row pointers, `w1`: column indices, `w2`: f32 values (CSR over `[out, in]`).
    Csr,
}

impl WFormat {
    pub(crate) fn key(self) -> &'static str {
        match self {
            WFormat::F32 => "f32",
            WFormat::F16 => "f16",
            WFormat::Bf16 => "bf16",
            WFormat::Quant => "quant",
            WFormat::Csr => "csr",
        }
    }

    /// `w_at(i)`, the dense value of flat element `i` (not for CSR).
    fn w_at(self) -> &'static str {
        match self {
            WFormat::F32 => "fn w_at(i: u32) -> f32 { return bitcast<f32>(w0[i]); }",
            WFormat::F16 => {
                "fn w_at(i: u32) -> f32 {
    let p = unpack2x16float(w0[i >> 1u]);
    return select(p.x, p.y, (i & 1u) == 1u);
}"
            }
            WFormat::Bf16 => {
                "fn w_at(i: u32) -> f32 {
    let word = w0[i >> 1u];
    let h = select(word & 0xffffu, word >> 16u, (i & 1u) == 1u);
    return bitcast<f32>(h << 16u);
}"
            }
            WFormat::Quant => {
                "fn w_at(i: u32) -> f32 {
    let bit = i * P.bits;
    let word = bit >> 5u;
    let sh = bit & 31u;
    var c = w0[word] >> sh;
    if (sh + P.bits > 32u) {
        c = c | (w0[word + 1u] << (32u - sh));
    }
    c = c & ((1u << P.bits) - 1u);
    let s = (i / P.sdiv) % P.smod;
    let scale = bitcast<f32>(w1[s]);
    if (P.codebook == 1u) {
        return scale * bitcast<f32>(w3[c]);
    }
    var z = 0i;
    if (P.has_zero == 1u) {
        z = bitcast<i32>(w2[s]);
    }
    return scale * f32(i32(c) + P.q_min - z);
}"
            }
            WFormat::Csr => "",
        }
    }
}

/// The uniform block every op uses (28 words; fields an op does not need are 0).
const PARAMS: &str = "
struct Params {
    m: u32, n: u32, k: u32, has_bias: u32,
    bits: u32, q_min: i32, sdiv: u32, smod: u32,
    has_zero: u32, codebook: u32, act: u32, extra: u32,
    batch: u32, cin: u32, h: u32, w: u32,
    cout: u32, kh: u32, kw: u32, oh: u32,
    ow: u32, pad: u32, stride: u32, dil: u32,
    cin_g: u32, cout_g: u32, heads: u32, scale: f32,
}
@group(0) @binding(0) var<uniform> P: Params;
";

/// Number of 32-bit words in [`PARAMS`].
pub(crate) const PARAM_WORDS: usize = 28;

const WEIGHT_BINDINGS: &str = "
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> w0: array<u32>;
@group(0) @binding(4) var<storage, read> w1: array<u32>;
@group(0) @binding(5) var<storage, read> w2: array<u32>;
@group(0) @binding(6) var<storage, read> w3: array<u32>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
";

/// Flat invocation index of a 1-D kernel dispatched as a 2-D grid of 64-wide workgroups (the
/// grid is 2-D so more than 65535 workgroups fit).
const FLAT: &str = "
fn flat(g: vec3<u32>, nw: vec3<u32>) -> u32 { return g.y * nw.x * 64u + g.x; }
";

/// Output rows and columns one invocation of the linear kernel computes.
pub(crate) const BLOCK: u32 = 4;

/// `y[m, n] = Σ_k x[m, k]·W[n, k] + bias[n]`, a 4 × 4 register block per invocation.
pub(crate) fn linear(f: WFormat) -> String {
    if f == WFormat::Csr {
        return format!(
            "{PARAMS}{WEIGHT_BINDINGS}{FLAT}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {{
    let idx = flat(g, nw);
    if (idx >= P.m * P.n) {{ return; }}
    let row = idx / P.n;
    let col = idx % P.n;
    var acc = 0.0;
    for (var p = w0[col]; p < w0[col + 1u]; p = p + 1u) {{
        acc = acc + x[row * P.k + w1[p]] * bitcast<f32>(w2[p]);
    }}
    if (P.has_bias == 1u) {{ acc = acc + bias[col]; }}
    y[idx] = acc;
}}
"
        );
    }
    // Each invocation computes a 4 × 4 block of outputs in registers: per step along k, four
    // weights (one per output column) and four inputs (one per row) feed 16 multiply-adds. No
    // workgroup memory or barriers, which software rasterisers run slowly; indices past the
    // edge are clamped and their results dropped.
    format!(
        "{PARAMS}{WEIGHT_BINDINGS}{FLAT}{}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {{
    let idx = flat(g, nw);
    let nb = (P.n + 3u) / 4u;
    if (idx >= nb * ((P.m + 3u) / 4u)) {{ return; }}
    let r0 = (idx / nb) * 4u;
    let c0 = (idx % nb) * 4u;
    let xr = vec4<u32>(min(r0, P.m - 1u), min(r0 + 1u, P.m - 1u), min(r0 + 2u, P.m - 1u), min(r0 + 3u, P.m - 1u)) * P.k;
    let wr = vec4<u32>(min(c0, P.n - 1u), min(c0 + 1u, P.n - 1u), min(c0 + 2u, P.n - 1u), min(c0 + 3u, P.n - 1u)) * P.k;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < P.k; kk = kk + 1u) {{
        let w = vec4<f32>(w_at(wr.x + kk), w_at(wr.y + kk), w_at(wr.z + kk), w_at(wr.w + kk));
        a0 = fma(vec4<f32>(x[xr.x + kk]), w, a0);
        a1 = fma(vec4<f32>(x[xr.y + kk]), w, a1);
        a2 = fma(vec4<f32>(x[xr.z + kk]), w, a2);
        a3 = fma(vec4<f32>(x[xr.w + kk]), w, a3);
    }}
    var b = vec4<f32>(0.0);
    if (P.has_bias == 1u) {{
        b = vec4<f32>(bias[min(c0, P.n - 1u)], bias[min(c0 + 1u, P.n - 1u)], bias[min(c0 + 2u, P.n - 1u)], bias[min(c0 + 3u, P.n - 1u)]);
    }}
    let acc = array<vec4<f32>, 4>(a0 + b, a1 + b, a2 + b, a3 + b);
    for (var r = 0u; r < 4u; r = r + 1u) {{
        let row = r0 + r;
        if (row >= P.m) {{ break; }}
        for (var c = 0u; c < 4u; c = c + 1u) {{
            if (c0 + c < P.n) {{ y[row * P.n + c0 + c] = acc[r][c]; }}
        }}
    }}
}}
",
        f.w_at()
    )
}

/// Direct 2-D convolution, one output element per invocation, any groups/stride/dilation.
pub(crate) fn conv2d(f: WFormat) -> String {
    // For CSR the loop runs over the stored entries of output channel `co`'s row.
    let body = if f == WFormat::Csr {
        "    for (var p = w0[co]; p < w0[co + 1u]; p = p + 1u) {
        let col = w1[p];
        let ci = col / (P.kh * P.kw);
        let r = col % (P.kh * P.kw);
        let ky = r / P.kw;
        let kx = r % P.kw;
        let iy = i32(oy * P.stride + ky * P.dil) - i32(P.pad);
        let ix = i32(ox * P.stride + kx * P.dil) - i32(P.pad);
        if (iy >= 0 && iy < i32(P.h) && ix >= 0 && ix < i32(P.w)) {
            let xi = ((b * P.cin + g * P.cin_g + ci) * P.h + u32(iy)) * P.w + u32(ix);
            acc = acc + x[xi] * bitcast<f32>(w2[p]);
        }
    }"
    } else {
        "    let row = P.cin_g * P.kh * P.kw;
    for (var ci = 0u; ci < P.cin_g; ci = ci + 1u) {
        for (var ky = 0u; ky < P.kh; ky = ky + 1u) {
            let iy = i32(oy * P.stride + ky * P.dil) - i32(P.pad);
            if (iy < 0 || iy >= i32(P.h)) { continue; }
            for (var kx = 0u; kx < P.kw; kx = kx + 1u) {
                let ix = i32(ox * P.stride + kx * P.dil) - i32(P.pad);
                if (ix < 0 || ix >= i32(P.w)) { continue; }
                let xi = ((b * P.cin + g * P.cin_g + ci) * P.h + u32(iy)) * P.w + u32(ix);
                acc = acc + x[xi] * w_at(co * row + (ci * P.kh + ky) * P.kw + kx);
            }
        }
    }"
    };
    format!(
        "{PARAMS}{WEIGHT_BINDINGS}{FLAT}{}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {{
    let idx = flat(gid, nw);
    if (idx >= P.batch * P.cout * P.oh * P.ow) {{ return; }}
    let ox = idx % P.ow;
    let oy = (idx / P.ow) % P.oh;
    let co = (idx / (P.ow * P.oh)) % P.cout;
    let b = idx / (P.ow * P.oh * P.cout);
    let g = co / P.cout_g;
    var acc = 0.0;
{body}
    if (P.has_bias == 1u) {{ acc = acc + bias[co]; }}
    y[idx] = acc;
}}
",
        f.w_at()
    )
}

/// Embedding lookup: `y[i, d] = W[ids[i], d]`; the ids arrive as f32-bit-cast u32 in `x`.
pub(crate) fn embedding(f: WFormat) -> String {
    format!(
        "{PARAMS}{WEIGHT_BINDINGS}{FLAT}{}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {{
    let idx = flat(g, nw);
    if (idx >= P.m * P.n) {{ return; }}
    let id = bitcast<u32>(x[idx / P.n]);
    y[idx] = w_at(id * P.n + idx % P.n);
}}
",
        f.w_at()
    )
}

const ERF: &str = "
// erf to ~1.5e-7 absolute (Abramowitz & Stegun 7.1.26); WGSL has no erf.
fn erf_(v: f32) -> f32 {
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let r = 1.0 - poly * exp(-a * a);
    return select(r, -r, v < 0.0);
}
fn tanh_(v: f32) -> f32 { return tanh(clamp(v, -15.0, 15.0)); }
fn sigmoid_(v: f32) -> f32 { return 1.0 / (1.0 + exp(-v)); }
";

/// Activation codes shared with [`crate::wgpu`]'s `act_code`.
pub(crate) fn activation() -> String {
    format!(
        "{PARAMS}
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
{FLAT}{ERF}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {{
    let idx = flat(g, nw);
    if (idx >= P.m) {{ return; }}
    let v = x[idx];
    var r = v;
    switch P.act {{
        case 0u: {{ r = max(v, 0.0); }}
        case 1u: {{ r = 0.5 * v * (1.0 + erf_(v * 0.70710678118654752)); }}
        case 2u: {{ r = 0.5 * v * (1.0 + tanh_(0.7978845608028654 * (v + 0.044715 * v * v * v))); }}
        case 3u: {{ r = tanh_(v); }}
        case 4u: {{ r = sigmoid_(v); }}
        case 5u: {{ r = v * sigmoid_(v); }}
        default: {{ r = v; }}
    }}
    y[idx] = r;
}}
"
    )
}

/// `y = x + b` element-wise over `P.m` values.
pub(crate) fn add() -> String {
    format!(
        "{PARAMS}
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
{FLAT}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {{
    let idx = flat(g, nw);
    if (idx >= P.m) {{ return; }}
    y[idx] = x[idx] + b[idx];
}}
"
    )
}

/// Max pooling `[batch, cin, h, w]` → `[batch, cin, oh, ow]` over `kh × kh` windows with
/// stride `kh`, one output per invocation.
pub(crate) fn max_pool() -> String {
    format!(
        "{PARAMS}
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
{FLAT}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {{
    let idx = flat(g, nw);
    if (idx >= P.batch * P.cin * P.oh * P.ow) {{ return; }}
    let ox = idx % P.ow;
    let oy = (idx / P.ow) % P.oh;
    let plane = idx / (P.ow * P.oh);
    let base = plane * P.h * P.w;
    var m = x[base + oy * P.kh * P.w + ox * P.kh];
    for (var i = 0u; i < P.kh; i++) {{
        for (var j = 0u; j < P.kh; j++) {{
            m = max(m, x[base + (oy * P.kh + i) * P.w + ox * P.kh + j]);
        }}
    }}
    y[idx] = m;
}}
"
    )
}

/// Workgroup width of the layer-norm kernel (one workgroup per row).
pub(crate) const LN_WG: u32 = 64;

/// `(s − mean)/sqrt(var + eps)·γ + β` per row of `s = x (+ residual)`, `P.m` rows of `P.n`.
pub(crate) fn layer_norm() -> String {
    format!(
        "{PARAMS}
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> res: array<f32>;
@group(0) @binding(4) var<storage, read> gamma: array<f32>;
@group(0) @binding(5) var<storage, read> beta: array<f32>;
var<workgroup> part: array<f32, {LN_WG}>;
fn s_at(i: u32) -> f32 {{
    var v = x[i];
    if (P.extra == 1u) {{ v = v + res[i]; }}
    return v;
}}
fn reduce(l: u32) -> f32 {{
    for (var s = {LN_WG}u / 2u; s > 0u; s = s / 2u) {{
        if (l < s) {{ part[l] = part[l] + part[l + s]; }}
        workgroupBarrier();
    }}
    let r = part[0];
    workgroupBarrier();
    return r;
}}
@compute @workgroup_size({LN_WG})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {{
    let row = wg.y * nw.x + wg.x;
    let l = lid.x;
    if (row >= P.m) {{ return; }}
    let base = row * P.n;
    var acc = 0.0;
    for (var i = l; i < P.n; i = i + {LN_WG}u) {{ acc = acc + s_at(base + i); }}
    part[l] = acc;
    workgroupBarrier();
    let mean = reduce(l) / f32(P.n);
    acc = 0.0;
    for (var i = l; i < P.n; i = i + {LN_WG}u) {{ let d = s_at(base + i) - mean; acc = acc + d * d; }}
    part[l] = acc;
    workgroupBarrier();
    let var_ = reduce(l) / f32(P.n);
    let inv = 1.0 / sqrt(var_ + P.scale);
    for (var i = l; i < P.n; i = i + {LN_WG}u) {{
        y[base + i] = (s_at(base + i) - mean) * inv * gamma[i] + beta[i];
    }}
}}
"
    )
}

/// Largest head size the attention kernel holds in registers.
pub(crate) const MAX_HEAD: u32 = 128;

/// Multi-head attention, one (batch, head, query) per invocation, online softmax over keys.
/// `q`, `k`, `v`: `[batch, seq, heads·hs]` (`P.batch`, `P.m` = seq, `P.n` = hidden, `P.k` = hs).
pub(crate) fn attention() -> String {
    format!(
        "{PARAMS}
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> kk: array<f32>;
@group(0) @binding(4) var<storage, read> vv: array<f32>;
@group(0) @binding(5) var<storage, read> mask: array<f32>;
{FLAT}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {{
    let idx = flat(g, nw);
    let t = P.m;
    if (idx >= P.batch * P.heads * t) {{ return; }}
    let i = idx % t;
    let h = (idx / t) % P.heads;
    let b = idx / (t * P.heads);
    let hs = P.k;
    let qo = (b * t + i) * P.n + h * hs;
    var acc: array<f32, {MAX_HEAD}>;
    for (var d = 0u; d < hs; d = d + 1u) {{ acc[d] = 0.0; }}
    var mx = -3.4028234e38;
    var l = 0.0;
    for (var j = 0u; j < t; j = j + 1u) {{
        let ko = (b * t + j) * P.n + h * hs;
        var s = 0.0;
        for (var d = 0u; d < hs; d = d + 1u) {{ s = s + q[qo + d] * kk[ko + d]; }}
        s = s * P.scale;
        if (P.extra == 1u) {{ s = s + mask[b * t + j]; }}
        let mn = max(mx, s);
        let corr = exp(mx - mn);
        let e = exp(s - mn);
        l = l * corr + e;
        for (var d = 0u; d < hs; d = d + 1u) {{ acc[d] = acc[d] * corr + e * vv[ko + d]; }}
        mx = mn;
    }}
    for (var d = 0u; d < hs; d = d + 1u) {{ y[qo + d] = acc[d] / l; }}
}}
"
    )
}

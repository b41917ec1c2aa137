//! Whisper's decode step for the rows of a stacked decode, as kernels over preallocated
//! buffers replayed as one CUDA graph per batch-size bucket.
//!
//! Why: the candle step launches ~80 small kernels (four layers of norms, projections,
//! cache writes and two attentions), each with the host's allocation and launch cost,
//! so a step of a few rows took ~1.1 ms on an H200 whose arithmetic and weight reads
//! take a tenth of that. Here a step is one graph launch: per layer LayerNorm, the
//! fused q/k/v GEMM and bias, the key/value append, split-K self-attention over each
//! row's cache, the out projection with bias, residual and the next LayerNorm in one
//! pass, the cross-attention over each row's window, the MLP; then the final norm,
//! the vocabulary GEMM, the logit rules' suppression row and the argmax with its
//! log-probability. Only the picks come back (the one sync).
//!
//! Rows are named by a row table and a pointer table that the host rewrites before
//! each step (see `kernels.cu`), so the graph of a bucket serves any stacked state.

use super::decode::{enqueue_argmax, ArgmaxArgs, DEC_SPLITS};
use super::linear::gemm_t;
use super::{capture_graph, dev_ptr, func, read_rows, BucketGraphs, Graph};
use crate::ops::fast::{WhisperStepRows, WhisperStepWeights};
use candle_core::cuda::cudarc::driver::{result, CudaFunction, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDevice, WrapErr};
use candle_core::{DType, Result, Tensor};

/// Head dimension the attention kernels are written for (every Whisper size).
const HEAD_DIM: usize = 64;
/// Entries per row of the row table (`W_ROW_INTS` of `kernels.cu`).
const ROW_INTS: usize = 8;
/// Pointers per row and layer: self keys, self values, cross keys, cross values.
const PTRS: usize = 4;
/// Blocks per row of the first argmax pass.
const ARGMAX_PARTS: usize = 32;
/// The most rows one step takes.
pub(crate) const MAX_ROWS: usize = 1024;

/// `[out, in]` weight and `[out]` bias of a projection; γ and β of a LayerNorm.
type Pair = (u64, u64);

struct Layer {
    self_norm: Pair,
    self_qkv: Pair,
    self_out: Pair,
    cross_norm: Pair,
    cross_q: Pair,
    cross_out: Pair,
    mlp_norm: Pair,
    fc1: Pair,
    fc2: Pair,
}

struct Funcs {
    embed: CudaFunction,
    norm: CudaFunction,
    bias: CudaFunction,
    bias_res_norm: CudaFunction,
    bias_gelu: CudaFunction,
    bias_res: CudaFunction,
    append: CudaFunction,
    attn_part: CudaFunction,
    attn_comb: CudaFunction,
    suppress: CudaFunction,
    am_part: CudaFunction,
    am_final: CudaFunction,
}

/// Scratch for up to `rows` rows.
struct Buffers {
    rows: usize,
    x: Tensor,
    xn: Tensor,
    qkv: Tensor,
    q: Tensor,
    attn: Tensor,
    y: Tensor,
    h: Tensor,
    logits: Tensor,
    part_m: Tensor,
    part_l: Tensor,
    part_o: Tensor,
    am_max: Tensor,
    am_idx: Tensor,
    am_sum: Tensor,
    table: Tensor,
    ptrs: Tensor,
    lp: Tensor,
}

pub(crate) struct WhisperStepEngine {
    dev: CudaDevice,
    /// The weights, kept alive while their pointers are in use.
    _weights: WhisperStepWeights,
    embed: u64,
    positions: u64,
    n_ctx: usize,
    layers: Vec<Layer>,
    final_norm: Pair,
    eps: f32,
    d: usize,
    heads: usize,
    ffn: usize,
    vocab: usize,
    f: Funcs,
    bufs: Option<Buffers>,
    /// One position of keys and values for every head (padding rows' caches and
    /// windows).
    pad: Tensor,
    /// The logit rules' suppression row `[V]` f32, copied in before each step (the
    /// graphs name this buffer, not the caller's).
    suppress: Tensor,
    graphs: BucketGraphs,
    last_rows: usize,
}

fn pair(w: &Tensor, b: &Tensor) -> Result<Pair> {
    Ok((dev_ptr(w)?, dev_ptr(b)?))
}

fn bf16_ok(t: &Tensor, dims: &[usize]) -> bool {
    t.dtype() == DType::BF16 && t.is_contiguous() && t.dims() == dims
}

impl WhisperStepEngine {
    /// An engine for `w`, or `None` when the kernels do not cover it (not bf16 on a
    /// CUDA device, a head dimension other than 64, shapes that do not fit).
    pub(crate) fn new(w: &WhisperStepWeights) -> Result<Option<Self>> {
        let candle_core::Device::Cuda(dev) = w.token_embedding.device() else {
            return Ok(None);
        };
        let (vocab, d) = w.token_embedding.dims2()?;
        let heads = w.heads;
        if heads == 0 || d != heads * HEAD_DIM || d % 8 != 0 || d > 2048 {
            return Ok(None);
        }
        let n_ctx = w.positions.dim(0)?;
        let ffn = match w.layers.first() {
            Some(l) => l.fc1.0.dim(0)?,
            None => return Ok(None),
        };
        let v = |t: &Tensor| bf16_ok(t, &[d]);
        let lin = |p: &(Tensor, Tensor), o: usize, i: usize| {
            bf16_ok(&p.0, &[o, i]) && bf16_ok(&p.1, &[o])
        };
        let norm = |p: &(Tensor, Tensor)| v(&p.0) && v(&p.1);
        let shapes_ok = bf16_ok(&w.token_embedding, &[vocab, d])
            && bf16_ok(&w.positions, &[n_ctx, d])
            && norm(&w.final_norm)
            && w.layers.iter().all(|l| {
                norm(&l.self_norm)
                    && lin(&l.self_qkv, 3 * d, d)
                    && lin(&l.self_out, d, d)
                    && norm(&l.cross_norm)
                    && lin(&l.cross_q, d, d)
                    && lin(&l.cross_out, d, d)
                    && norm(&l.mlp_norm)
                    && lin(&l.fc1, ffn, d)
                    && lin(&l.fc2, d, ffn)
            });
        if !shapes_ok {
            return Ok(None);
        }
        let p2 = |p: &(Tensor, Tensor)| pair(&p.0, &p.1);
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    self_norm: p2(&l.self_norm)?,
                    self_qkv: p2(&l.self_qkv)?,
                    self_out: p2(&l.self_out)?,
                    cross_norm: p2(&l.cross_norm)?,
                    cross_q: p2(&l.cross_q)?,
                    cross_out: p2(&l.cross_out)?,
                    mlp_norm: p2(&l.mlp_norm)?,
                    fc1: p2(&l.fc1)?,
                    fc2: p2(&l.fc2)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let f = Funcs {
            embed: func(dev, "whisper_embed_rows")?,
            norm: func(dev, "layernorm_bf16")?,
            bias: func(dev, "bias_add_bf16")?,
            bias_res_norm: func(dev, "bias_residual_layernorm_bf16")?,
            bias_gelu: func(dev, "bias_gelu_bf16")?,
            bias_res: func(dev, "bias_residual_bf16")?,
            append: func(dev, "whisper_kv_append_rows")?,
            attn_part: func(dev, "whisper_attn_partial_rows")?,
            attn_comb: func(dev, "whisper_attn_combine_rows")?,
            suppress: func(dev, "add_row_bias_f32")?,
            am_part: func(dev, "argmax_partial")?,
            am_final: func(dev, "argmax_final")?,
        };
        let pad = Tensor::zeros(2 * d, DType::BF16, w.token_embedding.device())?;
        let suppress = Tensor::zeros(vocab, DType::F32, w.token_embedding.device())?;
        Ok(Some(Self {
            dev: dev.clone(),
            embed: dev_ptr(&w.token_embedding)?,
            positions: dev_ptr(&w.positions)?,
            n_ctx,
            final_norm: p2(&w.final_norm)?,
            eps: w.eps,
            layers,
            d,
            heads,
            ffn,
            vocab,
            f,
            bufs: None,
            pad,
            suppress,
            graphs: BucketGraphs::default(),
            last_rows: 0,
            _weights: w.clone(),
        }))
    }

    /// Whether this engine was built for `w` (same weight buffers).
    pub(crate) fn serves(&self, w: &WhisperStepWeights) -> bool {
        dev_ptr(&w.token_embedding).is_ok_and(|p| p == self.embed)
            && w.layers.len() == self.layers.len()
    }

    fn ensure_rows(&mut self, rows: usize) -> Result<()> {
        if self.bufs.as_ref().is_some_and(|b| b.rows >= rows) {
            return Ok(());
        }
        self.graphs.clear();
        self.bufs = None;
        let device = candle_core::Device::Cuda(self.dev.clone());
        let zeros = |n: usize, dt: DType| Tensor::zeros(n, dt, &device);
        let (d, parts) = (self.d, rows * self.heads * DEC_SPLITS);
        self.bufs = Some(Buffers {
            rows,
            x: zeros(rows * d, DType::BF16)?,
            xn: zeros(rows * d, DType::BF16)?,
            qkv: zeros(rows * 3 * d, DType::BF16)?,
            q: zeros(rows * d, DType::BF16)?,
            attn: zeros(rows * d, DType::BF16)?,
            y: zeros(rows * d, DType::BF16)?,
            h: zeros(rows * self.ffn, DType::BF16)?,
            logits: zeros(rows * self.vocab, DType::F32)?,
            part_m: zeros(parts, DType::F32)?,
            part_l: zeros(parts, DType::F32)?,
            part_o: zeros(parts * HEAD_DIM, DType::F32)?,
            am_max: zeros(rows * ARGMAX_PARTS, DType::F32)?,
            am_idx: zeros(rows * ARGMAX_PARTS, DType::U32)?,
            am_sum: zeros(rows * ARGMAX_PARTS, DType::F32)?,
            table: zeros(rows * ROW_INTS, DType::U32)?,
            ptrs: zeros(rows * self.layers.len() * PTRS, DType::I64)?,
            lp: zeros(rows, DType::F32)?,
        });
        Ok(())
    }

    /// One step of every row of `r`: each row's token goes in at its learned position,
    /// its key and value to column `r.column` of its cache; the greedy next token under
    /// `r.suppress` and its log-probability come back per row.
    pub(crate) fn step(
        &mut self,
        r: &WhisperStepRows<'_>,
        use_graph: bool,
    ) -> Result<Vec<(u32, f32)>> {
        let n = r.tokens.len();
        let layers = self.layers.len();
        if n == 0
            || n > MAX_ROWS
            || r.positions.len() != n
            || r.first.len() != n
            || r.self_kv.len() != layers
            || r.cross.len() != layers
        {
            candle_core::bail!(
                "fused Whisper step: {n} tokens, {} positions, {} rows' first columns, {} and {} layers of caches for a {layers}-layer decoder (1..={MAX_ROWS} rows)",
                r.positions.len(),
                r.first.len(),
                r.self_kv.len(),
                r.cross.len()
            );
        }
        if r.suppress.dtype() != DType::F32 || r.suppress.elem_count() != self.vocab {
            candle_core::bail!(
                "fused Whisper step: the suppression row is not {} f32 values",
                self.vocab
            );
        }
        // Every layer's caches must be [n, heads, capacity, 64] and windows [n, heads, T, 64].
        let (_, _, capacity, _) = r.self_kv[0].0.dims4()?;
        let (_, _, window, _) = r.cross[0].0.dims4()?;
        let self_dims = [n, self.heads, capacity, HEAD_DIM];
        let cross_dims = [n, self.heads, window, HEAD_DIM];
        let ok = r
            .self_kv
            .iter()
            .all(|(k, v)| bf16_ok(k, &self_dims) && bf16_ok(v, &self_dims))
            && r.cross
                .iter()
                .all(|(k, v)| bf16_ok(k, &cross_dims) && bf16_ok(v, &cross_dims));
        if !ok || r.column >= capacity || window == 0 {
            candle_core::bail!(
                "fused Whisper step: caches or windows not [{n}, {}, ·, {HEAD_DIM}] bf16, or column {} past {capacity}",
                self.heads,
                r.column
            );
        }
        let bucket = n.next_power_of_two();
        self.ensure_rows(bucket)?;
        let mut table = vec![0u32; bucket * ROW_INTS];
        let mut ptrs = vec![0u64; bucket * layers * PTRS];
        let bf = DType::BF16.size_in_bytes() as u64;
        let row_self = (self.heads * capacity * HEAD_DIM) as u64 * bf;
        let row_cross = (self.heads * window * HEAD_DIM) as u64 * bf;
        let self_base: Vec<(u64, u64)> = r
            .self_kv
            .iter()
            .map(|(k, v)| Ok((dev_ptr(k)?, dev_ptr(v)?)))
            .collect::<Result<_>>()?;
        let cross_base: Vec<(u64, u64)> = r
            .cross
            .iter()
            .map(|(k, v)| Ok((dev_ptr(k)?, dev_ptr(v)?)))
            .collect::<Result<_>>()?;
        for b in 0..n {
            let (token, pos, first) = (r.tokens[b], r.positions[b], r.first[b]);
            if token as usize >= self.vocab || pos as usize >= self.n_ctx || first > r.column {
                candle_core::bail!(
                    "fused Whisper step: token {token} at position {pos} from column {first} (vocabulary {}, {} positions, column {})",
                    self.vocab,
                    self.n_ctx,
                    r.column
                );
            }
            let index = r.column - first;
            table[b * ROW_INTS..b * ROW_INTS + 5].copy_from_slice(&[
                token,
                pos,
                index as u32,
                capacity as u32,
                window as u32,
            ]);
            let skip = first as u64 * HEAD_DIM as u64 * bf;
            for l in 0..layers {
                let at = PTRS * (b * layers + l);
                ptrs[at] = self_base[l].0 + b as u64 * row_self + skip;
                ptrs[at + 1] = self_base[l].1 + b as u64 * row_self + skip;
                ptrs[at + 2] = cross_base[l].0 + b as u64 * row_cross;
                ptrs[at + 3] = cross_base[l].1 + b as u64 * row_cross;
            }
        }
        // Padding rows: token 0 at position 0 over one position of zeros (keys and
        // values of every head one position apart: a stride of 1).
        let pad_k = dev_ptr(&self.pad)?;
        let pad_v = pad_k + (self.d as u64) * bf;
        for b in n..bucket {
            table[b * ROW_INTS..b * ROW_INTS + 5].copy_from_slice(&[0, 0, 0, 1, 1]);
            for l in 0..layers {
                let at = PTRS * (b * layers + l);
                ptrs[at..at + PTRS].copy_from_slice(&[pad_k, pad_v, pad_k, pad_v]);
            }
        }
        let suppress = dev_ptr(&self.suppress)?;
        let bufs = self.bufs.as_ref().expect("ensure_rows");
        let (table_ptr, lp_ptr) = (dev_ptr(&bufs.table)?, dev_ptr(&bufs.lp)?);
        let stream = self.dev.cuda_stream();
        // SAFETY: the tables fit the buffers sized for `bucket` rows; a copy from
        // pageable host memory has read it when the call returns.
        unsafe {
            result::memcpy_htod_async(table_ptr, &table, stream.cu_stream()).w()?;
            result::memcpy_htod_async(dev_ptr(&bufs.ptrs)?, &ptrs, stream.cu_stream()).w()?;
            let bytes = self.vocab * DType::F32.size_in_bytes();
            result::memcpy_dtod_async(suppress, dev_ptr(r.suppress)?, bytes, stream.cu_stream())
                .w()?;
        }
        let mut graphs = std::mem::take(&mut self.graphs);
        let ran = graphs.run(
            bucket,
            use_graph,
            "fused Whisper step",
            || self.capture(bucket),
            || self.enqueue(bucket),
        );
        self.graphs = graphs;
        ran?;
        let lp = read_rows(&self.dev, &mut table, table_ptr, lp_ptr, n, ROW_INTS)?;
        self.last_rows = n;
        Ok((0..n).map(|b| (table[b * ROW_INTS], lp[b])).collect())
    }

    /// The final-norm hidden states `[rows, d]` of the last step's rows (a copy).
    pub(crate) fn last_hidden(&self) -> Result<Tensor> {
        match &self.bufs {
            Some(b) if self.last_rows > 0 => {
                b.xn.narrow(0, 0, self.last_rows * self.d)?
                    .reshape((self.last_rows, self.d))?
                    .copy()
            }
            _ => candle_core::bail!("fused Whisper step: no step yet"),
        }
    }

    fn capture(&self, rows: usize) -> Result<Graph> {
        let graph = capture_graph(&self.dev, || self.enqueue(rows))?;
        tracing::debug!(
            rows,
            "captured the fused Whisper decode step as a CUDA graph"
        );
        Ok(graph)
    }

    /// A kernel `(y, bias, n, cols)` over `rows` rows of `cols` (bias add or + GELU).
    fn epilogue(
        &self,
        f: &CudaFunction,
        y: u64,
        bias: u64,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (n, c) = ((rows * cols) as i64, cols as i32);
        let stream = self.dev.cuda_stream();
        let mut b = stream.launch_builder(f);
        b.arg(&y).arg(&bias).arg(&n).arg(&c);
        // SAFETY: y holds rows × cols values, bias cols.
        unsafe { b.launch(elementwise(rows * cols)) }.w()?;
        Ok(())
    }

    /// `x = x + (y + bias)` and `xn = LayerNorm(x)` per row.
    fn residual_norm(
        &self,
        y: u64,
        bias: u64,
        x: u64,
        norm: Pair,
        xn: u64,
        rows: usize,
    ) -> Result<()> {
        let (r, c) = (rows as i32, self.d as i32);
        let stream = self.dev.cuda_stream();
        let mut b = stream.launch_builder(&self.f.bias_res_norm);
        b.arg(&y)
            .arg(&bias)
            .arg(&x)
            .arg(&x)
            .arg(&norm.0)
            .arg(&norm.1)
            .arg(&xn)
            .arg(&r)
            .arg(&c)
            .arg(&self.eps);
        // SAFETY: y, x, xn [rows, d]; bias, γ, β [d]. Each warp reads its row of x
        // before writing it back.
        unsafe { b.launch(rows_per_warp(rows)) }.w()?;
        Ok(())
    }

    fn layer_norm(&self, x: u64, norm: Pair, out: u64, rows: usize) -> Result<()> {
        let (r, c) = (rows as i32, self.d as i32);
        let stream = self.dev.cuda_stream();
        let mut b = stream.launch_builder(&self.f.norm);
        b.arg(&x)
            .arg(&norm.0)
            .arg(&norm.1)
            .arg(&out)
            .arg(&r)
            .arg(&c)
            .arg(&self.eps);
        // SAFETY: x, out [rows, d]; γ, β [d].
        unsafe { b.launch(rows_per_warp(rows)) }.w()?;
        Ok(())
    }

    /// Attention of the rows' queries (`q`, rows `q_stride` apart) over their own
    /// caches (`cross` false) or windows, into `bufs.attn`.
    fn attend(
        &self,
        bufs: &Buffers,
        q: u64,
        q_stride: usize,
        layer: usize,
        cross: bool,
        rows: usize,
    ) -> Result<()> {
        let stream = self.dev.cuda_stream();
        let p = dev_ptr;
        let (pm, pl, po) = (p(&bufs.part_m)?, p(&bufs.part_l)?, p(&bufs.part_o)?);
        let (table, ptrs, attn) = (p(&bufs.table)?, p(&bufs.ptrs)?, p(&bufs.attn)?);
        let (qs, li, nl, cr, nh) = (
            q_stride as i32,
            layer as i32,
            self.layers.len() as i32,
            i32::from(cross),
            self.heads as i32,
        );
        let scale_log2 = (HEAD_DIM as f32).powf(-0.5) * std::f32::consts::LOG2_E;
        let mut b = stream.launch_builder(&self.f.attn_part);
        b.arg(&q)
            .arg(&qs)
            .arg(&table)
            .arg(&ptrs)
            .arg(&li)
            .arg(&nl)
            .arg(&cr)
            .arg(&nh)
            .arg(&scale_log2)
            .arg(&pm)
            .arg(&pl)
            .arg(&po);
        let cfg = LaunchConfig {
            grid_dim: (self.heads as u32, DEC_SPLITS as u32, rows as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each row's table entry names buffers of its length and stride
        // (checked by `step`); partials hold rows × heads × DEC_SPLITS.
        unsafe { b.launch(cfg) }.w()?;
        let mut b = stream.launch_builder(&self.f.attn_comb);
        b.arg(&pm).arg(&pl).arg(&po).arg(&nh).arg(&attn);
        let cfg = LaunchConfig {
            grid_dim: (self.heads as u32, rows as u32, 1),
            block_dim: (HEAD_DIM as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; attn [rows, d].
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// Enqueues a step of `rows` rows on the device's stream.
    fn enqueue(&self, rows: usize) -> Result<()> {
        let bufs = self.bufs.as_ref().expect("ensure_rows before enqueue");
        let stream = self.dev.cuda_stream();
        let p = dev_ptr;
        let (x, xn, qkv, q) = (p(&bufs.x)?, p(&bufs.xn)?, p(&bufs.qkv)?, p(&bufs.q)?);
        let (attn, y, h, logits) = (p(&bufs.attn)?, p(&bufs.y)?, p(&bufs.h)?, p(&bufs.logits)?);
        let (table, ptrs, suppress) = (p(&bufs.table)?, p(&bufs.ptrs)?, p(&self.suppress)?);
        let d = self.d;
        {
            let d_i = d as i32;
            let mut b = stream.launch_builder(&self.f.embed);
            b.arg(&self.embed)
                .arg(&self.positions)
                .arg(&table)
                .arg(&d_i)
                .arg(&x);
            let cfg = LaunchConfig {
                grid_dim: (d.div_ceil(256) as u32, rows as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: tokens and positions were checked against the tables' rows.
            unsafe { b.launch(cfg) }.w()?;
        }
        let (nl, nh) = (self.layers.len() as i32, self.heads as i32);
        for (li, l) in self.layers.iter().enumerate() {
            self.layer_norm(x, l.self_norm, xn, rows)?;
            gemm_t(&self.dev, l.self_qkv.0, xn, qkv, rows, 3 * d, d, false)?;
            self.epilogue(&self.f.bias, qkv, l.self_qkv.1, rows, 3 * d)?;
            {
                let li = li as i32;
                let mut b = stream.launch_builder(&self.f.append);
                b.arg(&qkv)
                    .arg(&table)
                    .arg(&ptrs)
                    .arg(&li)
                    .arg(&nl)
                    .arg(&nh);
                let cfg = LaunchConfig {
                    grid_dim: (self.heads as u32, rows as u32, 1),
                    block_dim: (HEAD_DIM as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: each row's index < its cache's stride (checked by `step`).
                unsafe { b.launch(cfg) }.w()?;
            }
            self.attend(bufs, qkv, 3 * d, li, false, rows)?;
            gemm_t(&self.dev, l.self_out.0, attn, y, rows, d, d, false)?;
            self.residual_norm(y, l.self_out.1, x, l.cross_norm, xn, rows)?;
            gemm_t(&self.dev, l.cross_q.0, xn, q, rows, d, d, false)?;
            self.epilogue(&self.f.bias, q, l.cross_q.1, rows, d)?;
            self.attend(bufs, q, d, li, true, rows)?;
            gemm_t(&self.dev, l.cross_out.0, attn, y, rows, d, d, false)?;
            self.residual_norm(y, l.cross_out.1, x, l.mlp_norm, xn, rows)?;
            gemm_t(&self.dev, l.fc1.0, xn, h, rows, self.ffn, d, false)?;
            self.epilogue(&self.f.bias_gelu, h, l.fc1.1, rows, self.ffn)?;
            gemm_t(&self.dev, l.fc2.0, h, y, rows, d, self.ffn, false)?;
            {
                let (n, c) = ((rows * d) as i64, d as i32);
                let mut b = stream.launch_builder(&self.f.bias_res);
                b.arg(&y).arg(&l.fc2.1).arg(&x).arg(&x).arg(&n).arg(&c);
                // SAFETY: y, x [rows, d], bias [d]; each element read before written.
                unsafe { b.launch(elementwise(rows * d)) }.w()?;
            }
        }
        self.layer_norm(x, self.final_norm, xn, rows)?;
        gemm_t(&self.dev, self.embed, xn, logits, rows, self.vocab, d, true)?;
        {
            let (n, v) = ((rows * self.vocab) as i64, self.vocab as i32);
            let mut b = stream.launch_builder(&self.f.suppress);
            b.arg(&logits).arg(&suppress).arg(&n).arg(&v);
            // SAFETY: logits [rows, V] f32, the suppression row [V] f32.
            unsafe { b.launch(elementwise(rows * self.vocab)) }.w()?;
        }
        enqueue_argmax(
            &self.dev,
            self.vocab,
            &self.f.am_part,
            &self.f.am_final,
            &ArgmaxArgs {
                logits,
                rows,
                parts: ARGMAX_PARTS,
                am_max: p(&bufs.am_max)?,
                am_idx: p(&bufs.am_idx)?,
                am_sum: p(&bufs.am_sum)?,
                io: table,
                io_stride: ROW_INTS as i32,
                lp: p(&bufs.lp)?,
                accumulate: false,
            },
        )
    }
}

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).min(132 * 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, 8 rows a block (the LayerNorm kernels).
fn rows_per_warp(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

//! The decode step of B streams at once over the same Qwen2-shaped decoder as
//! [`super::decode`], each stream over its own KV cache.
//!
//! Why: a decode step streams the whole decoder's weights (~14 GB for Step-Audio 2 mini)
//! whatever the batch, so B streams in one step cost little more than one. The
//! projections are GEMMs over the B rows (cuBLAS, f32 out; at B = 1 the batch-1 GEMV,
//! which streams the weights faster than a GEMM of one row); RMSNorm with the residual
//! add, RoPE with the KV append and the argmax are per-row kernels. Attention shares
//! reads where it can: a step's rows (one a stream) from [`GROUPED_STEP_ROWS`] streams
//! by kv head (its query heads read each key and value once, a lane a position for the
//! scores), a prefill's rows of one stream in tiles (their products on tensor cores);
//! else one block per query head and row.
//!
//! The KV caches stay the streams' own buffers (each stream's length and capacity, a
//! partial's rollback still a length change): a device row table names, per row, its
//! input token, position, cache capacity and every layer's key/value buffers. The host
//! rewrites the table before each step, so one CUDA graph per batch-size bucket (powers
//! of two; rows past the batch point at a one-position scratch cache) replays for any
//! streams. The argmax kernel advances each row's token and position in the table,
//! which the host reads back with the rows' log-probabilities: the step's one sync.

use super::decode::{ArgmaxArgs, ModelPtrs, DEC_SPLITS};
use super::linear::gemm_t;
use super::{capture_graph, dev_ptr, func, read_rows, BucketGraphs, Graph};
use crate::ops::fast::{fast_paths, DecodeCache, DecodeWeights, RowsKernel};
use candle_core::cuda::cudarc::driver::{
    result, CudaFunction, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::CudaDevice;
use candle_core::cuda::WrapErr;
use candle_core::{DType, Result, Tensor};

/// The largest batch one step takes (the row table and scratch buffers grow to the
/// bucket in use, up to this).
pub(crate) const MAX_ROWS: usize = 1024;
/// Blocks per row of the first argmax pass (the vocabulary split in this many slices).
const ARGMAX_PARTS: usize = 32;
/// Entries per row of the row table.
const ROW_INTS: usize = 4;
/// Rows of one prefill pass at most; a longer prefill runs in slices, in order, of
/// equal sizes (not full slices and a remainder: a slice of a few rows reads all the
/// weights for them, while ~200 rows or more a slice keep the GEMMs compute-bound).
const PREFILL_SLICE: usize = 512;
/// Query vectors of one tile of the tiled attention (`TILE_Q` in the kernel): the
/// query heads of one kv head, of as many rows of one stream as fit.
const TILE_QUERIES: usize = 32;
/// Positions of one chunk of the tiled attention (`TILE_CH` in the kernel).
const TILE_POSITIONS: usize = 32;
/// Query vectors of one tile of the tensor-core tiled attention (`MMA_Q` in the
/// kernel): 9 rows of a 7-head group.
const MMA_QUERIES: usize = 64;
/// Positions of one chunk of the tensor-core tiled attention (`MMA_CH`).
const MMA_POSITIONS: usize = 64;
/// Blocks the tiled attention aims at before it splits the positions (two waves of
/// an H100/H200's 132 multiprocessors).
const TILED_BLOCKS: usize = 264;
/// Rows (a bucket) from which a step's attention is tiled. A step has one row per
/// stream, so a tile shares only the kv head's reads among its query heads; below this
/// the per-row kernel's many short blocks finish sooner (H200, 512 positions a stream:
/// tiled 5.01 / 6.02 / 6.68 ms at 1 / 16 / 32 streams against 4.60 / 5.79 / 6.65 per
/// row, 8.00 / 11.18 / 18.96 ms at 64 / 128 / 256 against 8.48 / 12.35 / 21.95).
const TILED_STEP_ROWS: usize = 64;

/// Query heads of one kv head that the grouped step attention takes (`GQA_MAX` in
/// the kernel).
const GROUPED_HEADS: usize = 8;
/// Blocks the grouped step attention aims at with its splits; a split covers at least
/// 4 chunks of positions (`GQA_MIN_CHUNKS`), so short caches use fewer.
const GROUPED_BLOCKS: usize = 2048;
/// Splits of the grouped step attention at most (its partials are 8 a row and head).
const GROUPED_SPLITS: usize = 8;
/// Rows (a bucket) from which a step's attention is grouped. Below, its few blocks
/// (kv heads × rows × splits) leave most multiprocessors idle and the per-row kernel's
/// many short blocks finish sooner (H200, 512 positions a stream, a step grouped
/// against per row: 4.72–4.79 against 4.59–4.61 ms at 1 stream, 5.25–5.32 against 5.28
/// at 8, 5.96–5.98 against 6.42–6.45 at 32).
const GROUPED_STEP_ROWS: usize = 8;

/// How a step's or prefill's attention runs.
#[derive(Clone, Copy, Debug)]
enum AttnPlan {
    /// One block per query head, row and split (`attn_decode_partial_rows`).
    PerRow,
    /// One block per kv head, row and split, its query heads sharing each read
    /// (`attn_step_gqa`): a step's rows.
    Grouped { splits: usize },
    /// `attn_rows_tiled` (or `attn_rows_mma`) over `tiles` tiles (from the buffers'
    /// tile table, or one row each), the positions in `splits` splits.
    Tiled {
        table: bool,
        tiles: usize,
        splits: usize,
        kernel: TileKernel,
    },
}

/// The two kernels over tiles of a stream's rows: the same arguments and outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TileKernel {
    /// `attn_rows_tiled`: scores and output in f32 on the CUDA cores, a lane a
    /// position.
    Lanes,
    /// `attn_rows_mma`: scores and output as bf16 tensor-core products (f32
    /// accumulators), a prefill's rows only (it needs the tile table).
    Mma,
}

impl TileKernel {
    /// Query vectors (rows × a kv head's query heads) a tile holds at most.
    fn queries(self) -> usize {
        match self {
            TileKernel::Lanes => TILE_QUERIES,
            TileKernel::Mma => MMA_QUERIES,
        }
    }

    /// Positions of one chunk.
    fn positions(self) -> usize {
        match self {
            TileKernel::Lanes => TILE_POSITIONS,
            TileKernel::Mma => MMA_POSITIONS,
        }
    }
}

/// Splits of the grouped step attention for `rows` rows of `nkv` kv heads.
fn grouped_splits(rows: usize, nkv: usize) -> usize {
    (GROUPED_BLOCKS / (rows * nkv).max(1)).clamp(1, GROUPED_SPLITS)
}

/// Splits of the tiled attention's positions for `blocks` blocks of tiles and kv heads
/// and tiles of at most `len` positions (unknown: any) in chunks of `chunk`, so that
/// about [`TILED_BLOCKS`] blocks run.
fn tiled_splits(blocks: usize, len: Option<usize>, chunk: usize) -> usize {
    let chunks = len.map_or(DEC_SPLITS, |l| l.div_ceil(chunk));
    TILED_BLOCKS
        .div_ceil(blocks.max(1))
        .min(chunks)
        .clamp(1, DEC_SPLITS)
}

struct Funcs {
    embed: CudaFunction,
    norm: CudaFunction,
    rope: CudaFunction,
    attn: AttnKernels,
    silu: CudaFunction,
    am_part: CudaFunction,
    am_final: CudaFunction,
}

/// Scratch buffers for up to `rows` rows.
struct Buffers {
    rows: usize,
    x: Tensor,
    xn: Tensor,
    qkv: Tensor,
    q: Tensor,
    attn: Tensor,
    y: Tensor,
    gu: Tensor,
    act: Tensor,
    logits: Tensor,
    part_m: Tensor,
    part_l: Tensor,
    part_o: Tensor,
    am_max: Tensor,
    am_idx: Tensor,
    am_sum: Tensor,
    table: Tensor,
    /// The tiled attention's tiles `[first row, rows]` (a prefill's).
    tiles: Tensor,
    kv: Tensor,
    lp: Tensor,
}

impl Buffers {
    /// Scratch for `rows` rows; `head`: with the vocabulary logits and the argmax's
    /// buffers (a step), without them (a prefill, which returns hidden states).
    fn new(m: &ModelPtrs, rows: usize, head: bool) -> Result<Self> {
        let device = candle_core::Device::Cuda(m.dev.clone());
        let zeros = |n: usize, dt: DType| Tensor::zeros(n, dt, &device);
        let (h, nh, hd) = (m.hidden, m.nh, m.hd);
        let parts = rows * nh * DEC_SPLITS;
        let head_rows = if head { rows } else { 0 };
        Ok(Buffers {
            rows,
            x: zeros(rows * h, DType::BF16)?,
            xn: zeros(rows * h, DType::BF16)?,
            qkv: zeros(rows * m.qkv_rows(), DType::F32)?,
            q: zeros(rows * nh * hd, DType::BF16)?,
            attn: zeros(rows * nh * hd, DType::BF16)?,
            y: zeros(rows * h, DType::F32)?,
            gu: zeros(rows * 2 * m.inter, DType::F32)?,
            act: zeros(rows * m.inter, DType::BF16)?,
            logits: zeros(head_rows * m.vocab, DType::F32)?,
            part_m: zeros(parts, DType::F32)?,
            part_l: zeros(parts, DType::F32)?,
            part_o: zeros(parts * hd, DType::F32)?,
            am_max: zeros(head_rows * ARGMAX_PARTS, DType::F32)?,
            am_idx: zeros(head_rows * ARGMAX_PARTS, DType::U32)?,
            am_sum: zeros(head_rows * ARGMAX_PARTS, DType::F32)?,
            table: zeros(rows * ROW_INTS, DType::U32)?,
            tiles: zeros(rows * 2, DType::U32)?,
            kv: zeros(rows * m.layers.len() * 2, DType::I64)?,
            lp: zeros(head_rows, DType::F32)?,
        })
    }
}

pub(crate) struct BatchDecodeEngine {
    m: ModelPtrs,
    f: Funcs,
    bufs: Option<Buffers>,
    /// Scratch of a prefill slice (no logits; apart from `bufs`, whose graphs it
    /// would otherwise drop).
    prefill_bufs: Option<Buffers>,
    /// The one-position cache `[nkv, 1, hd]` (keys, then values) of padding rows.
    pad_kv: Tensor,
    graphs: BucketGraphs,
    /// Rows of the last step (for [`Self::logits`]).
    last_rows: usize,
}

impl BatchDecodeEngine {
    /// An engine for the decoder `llm`, or `None` when the kernels do not cover it.
    pub fn new(llm: &DecodeWeights) -> Result<Option<Self>> {
        let Some(m) = ModelPtrs::new(llm)? else {
            return Ok(None);
        };
        let dev = &m.dev;
        let f = Funcs {
            embed: func(dev, "embed_rows")?,
            norm: func(dev, "residual_rmsnorm_rows")?,
            rope: func(dev, "rope_kv_append_rows")?,
            attn: AttnKernels::new(dev)?,
            silu: func(dev, "silu_gate_rows")?,
            am_part: func(dev, "argmax_partial")?,
            am_final: func(dev, "argmax_final")?,
        };
        let pad_kv = Tensor::zeros(2 * m.nkv * m.hd, DType::BF16, llm.device())?;
        Ok(Some(Self {
            m,
            f,
            bufs: None,
            prefill_bufs: None,
            pad_kv,
            graphs: BucketGraphs::default(),
            last_rows: 0,
        }))
    }

    /// Whether this engine was built for `llm` (same weight buffers).
    pub(crate) fn serves(&self, llm: &DecodeWeights) -> bool {
        self.m.serves(llm)
    }

    /// Scratch for `rows` rows; growing drops the captured graphs (they name the old
    /// buffers).
    fn ensure_rows(&mut self, rows: usize) -> Result<()> {
        if self.bufs.as_ref().is_some_and(|b| b.rows >= rows) {
            return Ok(());
        }
        self.graphs.clear();
        self.bufs = None;
        self.bufs = Some(Buffers::new(&self.m, rows, true)?);
        Ok(())
    }

    /// One decode step of `states.len()` streams: `tokens[i]` goes in at position
    /// `states[i].positions()`, its key and value are appended to `states[i]`, and the
    /// greedy next token and its log-probability come back per stream (the one sync).
    pub(crate) fn step<S: DecodeCache>(
        &mut self,
        tokens: &[u32],
        states: &mut [&mut S],
        use_graph: bool,
    ) -> Result<Vec<(u32, f32)>> {
        let n = states.len();
        if n == 0 || tokens.len() != n || n > MAX_ROWS {
            candle_core::bail!(
                "batched decode: {} tokens for {n} streams (1..={MAX_ROWS})",
                tokens.len()
            );
        }
        let bucket = n.next_power_of_two();
        self.ensure_rows(bucket)?;
        let layers = self.m.layers.len();
        let mut table = vec![0u32; bucket * ROW_INTS];
        let mut kv = vec![0u64; bucket * layers * 2];
        let mut positions = Vec::with_capacity(n);
        for (b, (state, &token)) in states.iter_mut().zip(tokens).enumerate() {
            let pos = state.positions();
            if token as usize >= self.m.vocab || pos >= self.m.max_positions {
                candle_core::bail!(
                    "batched decode: token {token} at position {pos} (vocabulary {}, {} positions)",
                    self.m.vocab,
                    self.m.max_positions
                );
            }
            state.reserve(pos + 1)?;
            let (caches, cap) = self.m.cache_ptrs(&**state)?;
            set_row(
                &mut table,
                &mut kv,
                b,
                [token, pos as u32, cap as u32],
                &caches,
            );
            positions.push(pos);
        }
        let pad_k = dev_ptr(&self.pad_kv)?;
        let pad_v = pad_k + (self.m.nkv * self.m.hd * 2) as u64; // bf16 bytes of the keys
        let pad = vec![(pad_k, pad_v); layers];
        for b in n..bucket {
            // token 0 at position 0 of the one-position scratch cache
            set_row(&mut table, &mut kv, b, [0, 0, 1], &pad);
        }
        let bufs = self.bufs.as_ref().expect("ensure_rows");
        let (table_ptr, lp_ptr) = (dev_ptr(&bufs.table)?, dev_ptr(&bufs.lp)?);
        upload(bufs, &table, &kv)?;
        let mut graphs = std::mem::take(&mut self.graphs);
        let ran = graphs.run(
            bucket,
            use_graph,
            "batched decode",
            || self.capture(bucket),
            || self.enqueue(bucket),
        );
        self.graphs = graphs;
        ran?;
        let lp = read_rows(&self.m.dev, &mut table, table_ptr, lp_ptr, n, ROW_INTS)?;
        self.last_rows = n;
        let mut out = Vec::with_capacity(n);
        for (b, state) in states.iter_mut().enumerate() {
            state.advance(1)?;
            let row = &table[b * ROW_INTS..];
            if row[1] as usize != positions[b] + 1 {
                candle_core::bail!(
                    "batched decode: row {b} at position {} after a step at {}",
                    row[1],
                    positions[b]
                );
            }
            out.push((row[0], lp[b]));
        }
        Ok(out)
    }

    /// Several streams' new positions as one batch of rows: `embeds[i]` `[1, n_i, H]`
    /// goes in at positions `states[i].positions()..` of its own cache, every row
    /// attending to its cache up to itself (so causal within a stream's rows), the
    /// keys and values appended. Returns each stream's final-norm hidden states
    /// `[1, n_i, H]` (bf16). Rows run in equal slices of at most [`PREFILL_SLICE`] (a
    /// stream's later rows after its earlier ones); the caches' lengths move only
    /// when every slice was enqueued.
    pub(crate) fn prefill<S: DecodeCache>(
        &mut self,
        embeds: &[Tensor],
        states: &mut [&mut S],
    ) -> Result<Vec<Tensor>> {
        if embeds.len() != states.len() || embeds.is_empty() {
            candle_core::bail!(
                "batched prefill of {} inputs for {} streams",
                embeds.len(),
                states.len()
            );
        }
        let (h, layers) = (self.m.hidden, self.m.layers.len());
        // Per row: its stream and position.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut caches = Vec::with_capacity(states.len());
        for (i, (e, state)) in embeds.iter().zip(states.iter_mut()).enumerate() {
            let (one, n, width) = e.dims3()?;
            let past = state.positions();
            if one != 1 || width != h || past + n > self.m.max_positions {
                candle_core::bail!(
                    "batched prefill: input {:?} at position {past} (hidden {h}, {} positions)",
                    e.dims(),
                    self.m.max_positions
                );
            }
            state.reserve(past + n)?;
            caches.push(self.m.cache_ptrs(&**state)?);
            rows.extend((past..past + n).map(|p| (i, p)));
        }
        let x = Tensor::cat(embeds, 1)?
            .to_dtype(DType::BF16)?
            .contiguous()?;
        let out = Tensor::zeros((rows.len(), h), DType::BF16, x.device())?;
        if self.prefill_bufs.is_none() {
            self.prefill_bufs = Some(Buffers::new(&self.m, PREFILL_SLICE, false)?);
        }
        let bufs = self.prefill_bufs.as_ref().expect("made above");
        let stream = self.m.dev.cuda_stream();
        let row_bytes = h * DType::BF16.size_in_bytes();
        let (x_ptr, out_ptr) = (dev_ptr(&x)?, dev_ptr(&out)?);
        let (bx, bxn) = (dev_ptr(&bufs.x)?, dev_ptr(&bufs.xn)?);
        let slices = rows.len().div_ceil(PREFILL_SLICE).max(1);
        let per = rows.len().div_ceil(slices).max(1);
        for (s, slice) in rows.chunks(per).enumerate() {
            let mut table = vec![0u32; slice.len() * ROW_INTS];
            let mut kv = vec![0u64; slice.len() * layers * 2];
            for (b, &(i, pos)) in slice.iter().enumerate() {
                let (ptrs, cap) = &caches[i];
                set_row(&mut table, &mut kv, b, [0, pos as u32, *cap as u32], ptrs);
            }
            upload(bufs, &table, &kv)?;
            let attn = self.prefill_attention(bufs, slice)?;
            let (offset, bytes) = ((s * per * row_bytes) as u64, slice.len() * row_bytes);
            // SAFETY: x and out hold every row; the slice buffers hold PREFILL_SLICE rows.
            unsafe { result::memcpy_dtod_async(bx, x_ptr + offset, bytes, stream.cu_stream()) }
                .w()?;
            self.enqueue_layers(bufs, slice.len(), attn)?;
            // SAFETY: as above.
            unsafe { result::memcpy_dtod_async(out_ptr + offset, bxn, bytes, stream.cu_stream()) }
                .w()?;
        }
        let mut hidden = Vec::with_capacity(embeds.len());
        let mut offset = 0;
        for (e, state) in embeds.iter().zip(states.iter_mut()) {
            let n = e.dim(1)?;
            state.advance(n)?;
            hidden.push(out.narrow(0, offset, n)?.unsqueeze(0)?);
            offset += n;
        }
        Ok(hidden)
    }

    /// The logits `[rows, V]` (f32) of the last step's streams; a copy.
    pub(crate) fn logits(&self) -> Result<Tensor> {
        match &self.bufs {
            Some(b) if self.last_rows > 0 => b
                .logits
                .narrow(0, 0, self.last_rows * self.m.vocab)?
                .reshape((self.last_rows, self.m.vocab))?
                .copy(),
            _ => candle_core::bail!("batched decode: no step yet"),
        }
    }

    /// Whether the tiled attention serves this model (128-dim heads, a kv head's query
    /// heads within one tile) and is switched on.
    fn tiled(&self) -> bool {
        fast_paths().tiled && tiles_fit(self.m.nh, self.m.nkv, self.m.hd)
    }

    /// A step's attention: grouped from [`GROUPED_STEP_ROWS`] rows where the kernel
    /// serves the model and is switched on; else every row (a stream) its own tile,
    /// from [`TILED_STEP_ROWS`] rows; else per row.
    fn step_attention(&self, rows: usize) -> AttnPlan {
        let (nh, nkv, hd) = (self.m.nh, self.m.nkv, self.m.hd);
        if rows >= GROUPED_STEP_ROWS && fast_paths().grouped && grouped_fits(nh, nkv, hd) {
            return AttnPlan::Grouped {
                splits: grouped_splits(rows, nkv),
            };
        }
        if rows < TILED_STEP_ROWS || !self.tiled() {
            return AttnPlan::PerRow;
        }
        AttnPlan::Tiled {
            table: false,
            tiles: rows,
            splits: tiled_splits(rows * self.m.nkv, None, TILE_POSITIONS),
            kernel: TileKernel::Lanes,
        }
    }

    /// A prefill slice's attention: each stream's consecutive rows in tiles of as
    /// many as fit the tile kernel's queries (on tensor cores where the kernel serves
    /// the model and `mma` is on, else `tiled`'s), the tile table uploaded to `bufs`.
    fn prefill_attention(&self, bufs: &Buffers, slice: &[(usize, usize)]) -> Result<AttnPlan> {
        let (nh, nkv, hd) = (self.m.nh, self.m.nkv, self.m.hd);
        let kernel = if fast_paths().mma && mma_fits(nh, nkv, hd) {
            TileKernel::Mma
        } else if self.tiled() {
            TileKernel::Lanes
        } else {
            return Ok(AttnPlan::PerRow);
        };
        let (tiles, longest) = tiles_of(slice, kernel.queries() / (nh / nkv));
        let stream = self.m.dev.cuda_stream();
        // SAFETY: at most one tile per row, and the buffer holds two ints per row; a
        // copy from pageable host memory has read it when the call returns.
        unsafe { result::memcpy_htod_async(dev_ptr(&bufs.tiles)?, &tiles, stream.cu_stream()) }
            .w()?;
        Ok(tiled_plan(&tiles, longest, nkv, kernel))
    }

    /// The attention launch of `rows` rows over `bufs` (queries in `bufs.q`, after RoPE
    /// and the cache append; out to `bufs.attn`), for layer 0 until set.
    fn attn_launch(&self, bufs: &Buffers, rows: usize) -> Result<AttnLaunch> {
        let m = &self.m;
        let p = dev_ptr;
        Ok(AttnLaunch {
            q: p(&bufs.q)?,
            out: p(&bufs.attn)?,
            table: p(&bufs.table)?,
            kv: p(&bufs.kv)?,
            tiles: p(&bufs.tiles)?,
            part: [p(&bufs.part_m)?, p(&bufs.part_l)?, p(&bufs.part_o)?],
            nh: m.nh,
            nkv: m.nkv,
            hd: m.hd,
            layers: m.layers.len(),
            layer: 0,
            rows,
        })
    }

    fn capture(&self, rows: usize) -> Result<Graph> {
        let graph = capture_graph(&self.m.dev, || self.enqueue(rows))?;
        tracing::debug!(rows, "captured the batched decode step as a CUDA graph");
        Ok(graph)
    }

    /// `out [rows, n] (f32) = x [rows, k] · W^T` for W `[n, k]`.
    fn project(&self, w: u64, x: u64, out: u64, rows: usize, n: usize, k: usize) -> Result<()> {
        if rows == 1 {
            self.m.gemv(w, x, 0, 0, out, n, k, 3)
        } else {
            gemm_t(&self.m.dev, w, x, out, rows, n, k, true)
        }
    }

    /// `x += y` (unless `y` is 0) and `xn = RMSNorm(x) · w`, per row.
    fn norm(&self, x: u64, y: u64, w: u64, xn: u64, rows: usize) -> Result<()> {
        let stream = self.m.dev.cuda_stream();
        let (eps, h) = (self.m.eps, self.m.hidden as i32);
        let mut b = stream.launch_builder(&self.f.norm);
        b.arg(&x).arg(&y).arg(&w).arg(&eps).arg(&h).arg(&xn);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x, xn [rows, h] bf16, y [rows, h] f32 or null, w [h].
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// Enqueues the kernels of one step of `rows` rows on the device's stream: the
    /// rows' token embeddings, the decoder, `lm_head` and the argmax.
    fn enqueue(&self, rows: usize) -> Result<()> {
        let m = &self.m;
        let bufs = self.bufs.as_ref().expect("ensure_rows before enqueue");
        let stream = m.dev.cuda_stream();
        let p = dev_ptr;
        let (x, xn, logits) = (p(&bufs.x)?, p(&bufs.xn)?, p(&bufs.logits)?);
        let (table, lp) = (p(&bufs.table)?, p(&bufs.lp)?);
        let h_i = m.hidden as i32;
        {
            let mut b = stream.launch_builder(&self.f.embed);
            b.arg(&m.embed).arg(&table).arg(&h_i).arg(&x);
            let cfg = LaunchConfig {
                grid_dim: ((m.hidden / 8).div_ceil(256) as u32, rows as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: every row's token was checked < V; x holds `rows` rows of h.
            unsafe { b.launch(cfg) }.w()?;
        }
        self.enqueue_layers(bufs, rows, self.step_attention(rows))?;
        self.project(m.lm_head, xn, logits, rows, m.vocab, m.hidden)?;
        m.argmax(
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
                lp,
                accumulate: false,
            },
        )?;
        Ok(())
    }

    /// Enqueues the decoder over the `rows` input rows in `bufs.x` (positions and
    /// caches from `bufs`' row table), leaving the final-norm hidden states in
    /// `bufs.xn`.
    fn enqueue_layers(&self, bufs: &Buffers, rows: usize, attn_plan: AttnPlan) -> Result<()> {
        let m = &self.m;
        let stream = m.dev.cuda_stream();
        let (h, nh, nkv, hd, inter) = (m.hidden, m.nh, m.nkv, m.hd, m.inter);
        let p = dev_ptr;
        let (x, xn, qkv, q, attn) = (
            p(&bufs.x)?,
            p(&bufs.xn)?,
            p(&bufs.qkv)?,
            p(&bufs.q)?,
            p(&bufs.attn)?,
        );
        let (y, gu, act) = (p(&bufs.y)?, p(&bufs.gu)?, p(&bufs.act)?);
        let (table, kv) = (p(&bufs.table)?, p(&bufs.kv)?);
        let n_layers = m.layers.len() as i32;
        let (nh_i, nkv_i, hd_i) = (nh as i32, nkv as i32, hd as i32);
        let r = rows as u32;
        let first_norm = m.layers.first().map_or(m.final_norm, |l| l.in_norm);
        let mut attn_launch = self.attn_launch(bufs, rows)?;
        self.norm(x, 0, first_norm, xn, rows)?;
        for (li, l) in m.layers.iter().enumerate() {
            let layer = li as i32;
            self.project(l.qkv_w, xn, qkv, rows, m.qkv_rows(), h)?;
            {
                let mut b = stream.launch_builder(&self.f.rope);
                b.arg(&qkv)
                    .arg(&l.qkv_b)
                    .arg(&m.cos)
                    .arg(&m.sin)
                    .arg(&table)
                    .arg(&kv)
                    .arg(&layer)
                    .arg(&n_layers)
                    .arg(&nh_i)
                    .arg(&nkv_i)
                    .arg(&hd_i)
                    .arg(&q);
                let cfg = LaunchConfig {
                    grid_dim: ((nh + nkv) as u32, r, 1),
                    block_dim: ((hd / 2) as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: each row's position < its cache capacity (reserved by `step`)
                // and < the RoPE table (checked by `step`).
                unsafe { b.launch(cfg) }.w()?;
            }
            attn_launch.layer = layer;
            self.f.attn.enqueue(&m.dev, &attn_launch, attn_plan)?;
            self.project(l.o_w, attn, y, rows, h, nh * hd)?;
            self.norm(x, y, l.post_norm, xn, rows)?;
            self.project(l.gate_up_w, xn, gu, rows, 2 * inter, h)?;
            {
                let (i_i, r_i) = (inter as i32, rows as i32);
                let mut b = stream.launch_builder(&self.f.silu);
                b.arg(&gu).arg(&i_i).arg(&r_i).arg(&act);
                let cfg = LaunchConfig {
                    grid_dim: ((rows * inter).div_ceil(256).min(132 * 16) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: gu [rows, 2 inter] f32, act [rows, inter] bf16.
                unsafe { b.launch(cfg) }.w()?;
            }
            self.project(l.down_w, act, y, rows, h, inter)?;
            let next_norm = m.layers.get(li + 1).map_or(m.final_norm, |n| n.in_norm);
            self.norm(x, y, next_norm, xn, rows)?;
        }
        Ok(())
    }
}

/// Whether the tiled attention serves `nh` query heads over `nkv` kv heads of `hd`
/// dims: 128-dim heads, a kv head's query heads within one tile.
fn tiles_fit(nh: usize, nkv: usize, hd: usize) -> bool {
    hd == 128 && nkv > 0 && nh.is_multiple_of(nkv) && nh / nkv <= TILE_QUERIES
}

/// Whether the tensor-core tiled attention serves `nh` query heads over `nkv` kv heads
/// of `hd` dims: 128-dim heads, a kv head's query heads within one tile.
fn mma_fits(nh: usize, nkv: usize, hd: usize) -> bool {
    hd == 128 && nkv > 0 && nh.is_multiple_of(nkv) && nh / nkv <= MMA_QUERIES
}

/// Whether the grouped step attention serves `nh` query heads over `nkv` kv heads of
/// `hd` dims.
fn grouped_fits(nh: usize, nkv: usize, hd: usize) -> bool {
    hd == 128 && nkv > 0 && nh.is_multiple_of(nkv) && nh / nkv <= GROUPED_HEADS
}

/// The tiles of `rows` (stream, position): each stream's consecutive rows, at most
/// `per_tile` a tile, as `[first row, rows]` pairs; and the longest length a tile
/// attends to (its last position + 1).
fn tiles_of(rows: &[(usize, usize)], per_tile: usize) -> (Vec<u32>, usize) {
    let mut tiles = Vec::new();
    let mut longest = 0;
    let mut b = 0;
    while b < rows.len() {
        let stream = rows[b].0;
        let n = rows[b..]
            .iter()
            .take(per_tile.max(1))
            .take_while(|r| r.0 == stream)
            .count();
        tiles.extend([b as u32, n as u32]);
        longest = longest.max(rows[b + n - 1].1 + 1);
        b += n;
    }
    (tiles, longest)
}

/// The tiled attention by `kernel` over the tile table `tiles` ([`tiles_of`]) of tiles
/// at most `longest` positions long, for `nkv` kv heads.
fn tiled_plan(tiles: &[u32], longest: usize, nkv: usize, kernel: TileKernel) -> AttnPlan {
    let count = tiles.len() / 2;
    AttnPlan::Tiled {
        table: true,
        tiles: count,
        splits: tiled_splits(count * nkv, Some(longest), kernel.positions()),
        kernel,
    }
}

/// The attention kernels of the batched step and prefill.
struct AttnKernels {
    part: CudaFunction,
    comb: CudaFunction,
    tiled: CudaFunction,
    mma: CudaFunction,
    tiled_comb: CudaFunction,
    grouped: CudaFunction,
}

/// One attention launch: device pointers of the queries `[rows, nh, hd]`, the output
/// `[rows, nh * hd]` (bf16), the row table, the key/value pointer table (`layers` per
/// row), the tile table and the split partials (max, sum, output), and the shape.
struct AttnLaunch {
    q: u64,
    out: u64,
    table: u64,
    kv: u64,
    tiles: u64,
    part: [u64; 3],
    nh: usize,
    nkv: usize,
    hd: usize,
    layers: usize,
    layer: i32,
    rows: usize,
}

/// The arguments the split attention kernels (f32 and tensor-core tiles, grouped)
/// take after their pointers: the layer, the shape, the softmax scale, the splits of
/// the positions, the partials and the output.
struct SplitArgs {
    layer: i32,
    layers: i32,
    nh: i32,
    nkv: i32,
    scale_log2: f32,
    splits: i32,
    part: [u64; 3],
    out: u64,
}

impl SplitArgs {
    fn new(a: &AttnLaunch, splits: usize) -> Self {
        Self {
            layer: a.layer,
            layers: a.layers as i32,
            nh: a.nh as i32,
            nkv: a.nkv as i32,
            scale_log2: (a.hd as f32).powf(-0.5) * std::f32::consts::LOG2_E,
            splits: splits as i32,
            part: a.part,
            out: a.out,
        }
    }

    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        let [pm, pl, po] = &self.part;
        b.arg(&self.layer)
            .arg(&self.layers)
            .arg(&self.nh)
            .arg(&self.nkv)
            .arg(&self.scale_log2)
            .arg(&self.splits)
            .arg(pm)
            .arg(pl)
            .arg(po)
            .arg(&self.out);
    }
}

impl AttnKernels {
    fn new(dev: &CudaDevice) -> Result<Self> {
        Ok(Self {
            part: func(dev, "attn_decode_partial_rows")?,
            comb: func(dev, "attn_decode_combine_rows")?,
            tiled: func(dev, "attn_rows_tiled")?,
            mma: func(dev, "attn_rows_mma")?,
            tiled_comb: func(dev, "attn_rows_tiled_combine")?,
            grouped: func(dev, "attn_step_gqa")?,
        })
    }

    /// Enqueues `a` on the device's stream as `plan` says.
    fn enqueue(&self, dev: &CudaDevice, a: &AttnLaunch, plan: AttnPlan) -> Result<()> {
        let stream = dev.cuda_stream();
        let [pm, pl, po] = a.part;
        let r = a.rows as u32;
        let block = |grid_dim| LaunchConfig {
            grid_dim,
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let splits = match plan {
            AttnPlan::PerRow => {
                let s = SplitArgs::new(a, 1);
                let mut b = stream.launch_builder(&self.part);
                b.arg(&a.q)
                    .arg(&a.table)
                    .arg(&a.kv)
                    .arg(&s.layer)
                    .arg(&s.layers)
                    .arg(&s.nh)
                    .arg(&s.nkv)
                    .arg(&s.scale_log2)
                    .arg(&pm)
                    .arg(&pl)
                    .arg(&po);
                // SAFETY: reads cache rows 0..=position of each row's kv heads.
                unsafe { b.launch(block((a.nh as u32, DEC_SPLITS as u32, r))) }.w()?;
                let mut b = stream.launch_builder(&self.comb);
                b.arg(&pm).arg(&pl).arg(&po).arg(&s.nh).arg(&a.out);
                // SAFETY: partials of `rows` rows × nh heads × DEC_SPLITS.
                unsafe { b.launch(block((a.nh as u32, r, 1))) }.w()?;
                return Ok(());
            }
            AttnPlan::Tiled {
                table,
                tiles,
                splits,
                kernel,
            } => {
                let tiles_ptr = if table { a.tiles } else { 0 };
                if kernel == TileKernel::Mma && !table {
                    candle_core::bail!("the tensor-core attention needs a tile table");
                }
                let s = SplitArgs::new(a, splits);
                let mut b = stream.launch_builder(match kernel {
                    TileKernel::Lanes => &self.tiled,
                    TileKernel::Mma => &self.mma,
                });
                b.arg(&a.q).arg(&a.table).arg(&a.kv).arg(&tiles_ptr);
                s.push(&mut b);
                // SAFETY: every tile's rows are one stream's (its kv pointers), each
                // reading its cache rows 0..=position; splits <= DEC_SPLITS, so the
                // partials fit `rows` rows × nh heads × DEC_SPLITS; a tile holds at
                // most the kernel's queries (`tiles_of`).
                unsafe { b.launch(block((a.nkv as u32, tiles as u32, splits as u32))) }.w()?;
                splits
            }
            AttnPlan::Grouped { splits } => {
                let s = SplitArgs::new(a, splits);
                let mut b = stream.launch_builder(&self.grouped);
                b.arg(&a.q).arg(&a.table).arg(&a.kv);
                s.push(&mut b);
                // SAFETY: each row reads its own cache rows 0..=position; splits <=
                // GROUPED_SPLITS <= DEC_SPLITS, so the partials fit as above.
                unsafe { b.launch(block((a.nkv as u32, r, splits as u32))) }.w()?;
                splits
            }
        };
        if splits > 1 {
            let s = SplitArgs::new(a, splits);
            let mut b = stream.launch_builder(&self.tiled_comb);
            b.arg(&pm)
                .arg(&pl)
                .arg(&po)
                .arg(&s.nh)
                .arg(&s.splits)
                .arg(&a.out);
            // SAFETY: partials of `rows` rows × nh heads × `splits`.
            unsafe { b.launch(block((a.nh as u32, r, 1))) }.w()?;
        }
        Ok(())
    }
}

/// The batched step's and prefill's attention alone, for checks against a reference:
/// `q` `[rows, nh, 128]` (bf16, after RoPE); row `r` is stream `rows[r].0`'s query at
/// position `rows[r].1` over that stream's `caches` entry (keys, values, each
/// `[nkv, capacity, 128]` bf16) up to and including that position; one stream's rows
/// consecutive. Tiled as a prefill tiles them, or per row. Returns `[rows, nh * 128]`
/// (bf16).
pub(crate) fn rows_attention(
    q: &Tensor,
    rows: &[(usize, usize)],
    caches: &[(Tensor, Tensor)],
    kernel: RowsKernel,
) -> Result<Tensor> {
    let (n, nh, hd) = q.dims3()?;
    let dev = match q.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => candle_core::bail!("rows attention: q off the GPU"),
    };
    let Some((k0, _)) = caches.first() else {
        candle_core::bail!("rows attention: no caches")
    };
    let nkv = k0.dim(0)?;
    if n != rows.len() || n == 0 || !tiles_fit(nh, nkv, hd) || q.dtype() != DType::BF16 {
        candle_core::bail!(
            "rows attention: q {:?} for {} rows, {nkv} kv heads",
            q.dims(),
            rows.len()
        );
    }
    let mut table = vec![0u32; n * ROW_INTS];
    let mut kv = vec![0u64; n * 2];
    for (b, &(i, pos)) in rows.iter().enumerate() {
        let Some((k, v)) = caches.get(i) else {
            candle_core::bail!("rows attention: row {b} of stream {i}, of {}", caches.len())
        };
        let (kh, cap, khd) = k.dims3()?;
        if (kh, khd) != (nkv, hd) || v.dims() != k.dims() || pos >= cap {
            candle_core::bail!("rows attention: cache {:?} for position {pos}", k.dims());
        }
        set_row(
            &mut table,
            &mut kv,
            b,
            [0, pos as u32, cap as u32],
            &[(dev_ptr(k)?, dev_ptr(v)?)],
        );
    }
    let device = q.device();
    let zeros = |len: usize, dt: DType| Tensor::zeros(len, dt, device);
    let parts = n * nh * DEC_SPLITS;
    let (table_t, kv_t) = (
        zeros(table.len(), DType::U32)?,
        zeros(kv.len(), DType::I64)?,
    );
    let tile_kernel = match kernel {
        RowsKernel::Mma => TileKernel::Mma,
        _ => TileKernel::Lanes,
    };
    let (tiles, longest) = tiles_of(rows, tile_kernel.queries() / (nh / nkv));
    let tiles_t = zeros(tiles.len(), DType::U32)?;
    let part = [
        zeros(parts, DType::F32)?,
        zeros(parts, DType::F32)?,
        zeros(parts * hd, DType::F32)?,
    ];
    let out = zeros(n * nh * hd, DType::BF16)?;
    let q = q.contiguous()?;
    let stream = dev.cuda_stream();
    // SAFETY: each buffer was made to the length copied into it; a copy from pageable
    // host memory has read it when the call returns.
    unsafe {
        result::memcpy_htod_async(dev_ptr(&table_t)?, &table, stream.cu_stream()).w()?;
        result::memcpy_htod_async(dev_ptr(&kv_t)?, &kv, stream.cu_stream()).w()?;
        result::memcpy_htod_async(dev_ptr(&tiles_t)?, &tiles, stream.cu_stream()).w()?;
    }
    let plan = match kernel {
        RowsKernel::Tiled | RowsKernel::Mma => tiled_plan(&tiles, longest, nkv, tile_kernel),
        RowsKernel::PerRow => AttnPlan::PerRow,
        RowsKernel::Grouped => AttnPlan::Grouped {
            splits: grouped_splits(n, nkv),
        },
    };
    let launch = AttnLaunch {
        q: dev_ptr(&q)?,
        out: dev_ptr(&out)?,
        table: dev_ptr(&table_t)?,
        kv: dev_ptr(&kv_t)?,
        tiles: dev_ptr(&tiles_t)?,
        part: [dev_ptr(&part[0])?, dev_ptr(&part[1])?, dev_ptr(&part[2])?],
        nh,
        nkv,
        hd,
        layers: 1,
        layer: 0,
        rows: n,
    };
    AttnKernels::new(&dev)?.enqueue(&dev, &launch, plan)?;
    out.reshape((n, nh * hd))
}

/// Row `b` of the host row table (`[token, position, cache capacity]`) and of the
/// key/value pointer table (every layer's buffers).
fn set_row(table: &mut [u32], kv: &mut [u64], b: usize, row: [u32; 3], caches: &[(u64, u64)]) {
    table[b * ROW_INTS..b * ROW_INTS + 3].copy_from_slice(&row);
    let layers = caches.len();
    for (l, &(k, v)) in caches.iter().enumerate() {
        kv[2 * (b * layers + l)] = k;
        kv[2 * (b * layers + l) + 1] = v;
    }
}

/// Copies the host row and pointer tables into `bufs` (on the device's stream).
fn upload(bufs: &Buffers, table: &[u32], kv: &[u64]) -> Result<()> {
    if table.len() > bufs.rows * ROW_INTS || kv.len() > bufs.kv.elem_count() {
        candle_core::bail!("batched decode: row table larger than its buffer");
    }
    let stream = match bufs.table.device() {
        candle_core::Device::Cuda(d) => d.cuda_stream(),
        _ => candle_core::bail!("batched decode: tables off the GPU"),
    };
    // SAFETY: the tables fit the buffers (checked above); a copy from pageable
    // host memory has read it when the call returns.
    unsafe {
        result::memcpy_htod_async(dev_ptr(&bufs.table)?, table, stream.cu_stream()).w()?;
        result::memcpy_htod_async(dev_ptr(&bufs.kv)?, kv, stream.cu_stream()).w()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_hold_one_streams_consecutive_rows_up_to_the_tile_size() {
        // (stream, position): 6 rows of stream 0, 1 of stream 1, 3 of stream 2
        let rows: Vec<(usize, usize)> = (10..16)
            .map(|p| (0, p))
            .chain([(1, 700)])
            .chain((0..3).map(|p| (2, p)))
            .collect();
        let (tiles, longest) = tiles_of(&rows, 4);
        assert_eq!(tiles, [0, 4, 4, 2, 6, 1, 7, 3]);
        assert_eq!(longest, 701);
        // Every row in exactly one tile, in order.
        let covered: usize = tiles.chunks(2).map(|t| t[1] as usize).sum();
        assert_eq!(covered, rows.len());
        assert_eq!(tiles_of(&[], 4), (vec![], 0));
    }

    #[test]
    fn positions_split_only_while_blocks_are_few_and_never_past_the_chunks() {
        // Plenty of blocks: no split.
        assert_eq!(tiled_splits(TILED_BLOCKS, None, TILE_POSITIONS), 1);
        assert_eq!(tiled_splits(4 * 256, None, TILE_POSITIONS), 1);
        // Few blocks: as many splits as bring them to TILED_BLOCKS, at most DEC_SPLITS.
        assert_eq!(tiled_splits(66, None, TILE_POSITIONS), 4);
        assert_eq!(tiled_splits(4, None, TILE_POSITIONS), DEC_SPLITS);
        // Never more splits than chunks of positions (a split of none is wasted).
        assert_eq!(tiled_splits(4, Some(3 * TILE_POSITIONS), TILE_POSITIONS), 3);
        assert_eq!(tiled_splits(4, Some(1), TILE_POSITIONS), 1);
    }

    #[test]
    fn the_tile_kernels_serve_128_dim_heads_whose_groups_fit_a_tile() {
        assert!(tiles_fit(28, 4, 128));
        assert!(!tiles_fit(28, 4, 64));
        assert!(!tiles_fit(28, 3, 128));
        assert!(!tiles_fit(64, 1, 128));
        assert!(!tiles_fit(28, 0, 128));
        // The tensor-core tiles hold 9 rows of Step-Audio 2's 7-head groups.
        assert!(mma_fits(28, 4, 128));
        assert!(mma_fits(64, 1, 128));
        assert!(!mma_fits(28, 4, 64));
        assert!(!mma_fits(130, 2, 128));
        assert_eq!(TileKernel::Mma.queries() / 7, 9);
    }
}

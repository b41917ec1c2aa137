// CUDA kernels of stepaudio-live's GPU hot paths, compiled to PTX by build.rs
// (only with the `cuda` feature) and loaded through candle's custom-module API.
//
//   * log-mel:            one block per STFT frame (windowed DFT against a twiddle
//                         table, power, sparse Slaney filterbank, log10, global max),
//                         then one elementwise pass for the (max - 8) clamp.
//   * flash attention:    bf16 tensor-core (mma.sync m16n8k16) attention with an
//                         online softmax in f32; scores never reach device memory.
//                         Strided Q/K/V so it reads the fused qkv projection or the
//                         KV cache in place; GQA, causal offset, additive key bias.
//   * batch-1 decode:     the kernels of one Qwen2 decode step over preallocated
//                         buffers (bf16 GEMV with fused RMSNorm / bias / residual /
//                         SiLU-gate epilogues, RoPE + KV-cache append, split-K decode
//                         attention, argmax + log-probability), so that the whole step
//                         can be captured once into a CUDA graph. Position and token
//                         live in device memory, which is what makes a graph replayable.
//   * batched decode:     the same step for B streams (the projections as cuBLAS GEMMs
//                         between these kernels), each stream a row of a device table
//                         that names its token, position and KV-cache buffers.
//
// Everything accumulates in f32; bf16 values are rounded once when stored.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define NEG_BIG (-1.0e30f)

__device__ __forceinline__ float bf_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Ordered-int encoding of a float, so atomicMax on ints is a max on floats.
__device__ __forceinline__ int float_to_ordered(float f) {
    int i = __float_as_int(f);
    return i >= 0 ? i : i ^ 0x7fffffff;
}
__device__ __forceinline__ float ordered_to_float(int i) {
    return __int_as_float(i >= 0 ? i : i ^ 0x7fffffff);
}

// =====================================================================================
// Log-mel
// =====================================================================================

#define MEL_NFFT 400
#define MEL_HOP 160
#define MEL_NBINS 201

__device__ __forceinline__ int reflect_index(int i, int len) {
    if (len == 1) return 0;
    int period = 2 * (len - 1);
    int j = i % period;
    if (j < 0) j += period;
    if (j >= len) j = period - j;
    return j;
}

// One block (256 threads) per frame t < n_frames. The signal is `audio` (n_audio
// samples) followed by `tail_zeros` zeros; the centred STFT reflects it at both ends.
// twiddle: cos[400] then sin[400] of 2*pi*k/400; window[400]; the mel filters are
// stored sparsely: filter m covers bins fb_first[m] .. fb_first[m] + fb_len[m] - 1 with
// weights fb_w[fb_off[m] + j]. Writes log10(max(mel, 1e-10)) to out[m * n_frames + t]
// and folds the block's max into *gmax (ordered int).
extern "C" __global__ void logmel_frames(const float* __restrict__ audio, int n_audio,
                                         int tail_zeros, const float* __restrict__ window,
                                         const float* __restrict__ twiddle,
                                         const int* __restrict__ fb_first,
                                         const int* __restrict__ fb_len,
                                         const int* __restrict__ fb_off,
                                         const float* __restrict__ fb_w, int n_mels,
                                         int n_frames, float* __restrict__ out,
                                         int* __restrict__ gmax) {
    __shared__ float xw[MEL_NFFT];
    __shared__ float tw_cos[MEL_NFFT];
    __shared__ float tw_sin[MEL_NFFT];
    __shared__ float power[MEL_NBINS + 3];
    __shared__ float red[8];
    const int t = blockIdx.x;
    if (t >= n_frames) return;
    const int len = n_audio + tail_zeros;
    const int start = t * MEL_HOP - MEL_NFFT / 2;
    for (int i = threadIdx.x; i < MEL_NFFT; i += blockDim.x) {
        int j = reflect_index(start + i, len);
        float s = j < n_audio ? audio[j] : 0.0f;
        xw[i] = s * window[i];
        tw_cos[i] = twiddle[i];
        tw_sin[i] = twiddle[MEL_NFFT + i];
    }
    __syncthreads();
    for (int k = threadIdx.x; k < MEL_NBINS; k += blockDim.x) {
        float re = 0.0f, im = 0.0f;
        int idx = 0;  // (k * n) mod 400, stepped without a division
        for (int n = 0; n < MEL_NFFT; ++n) {
            float x = xw[n];
            re = fmaf(x, tw_cos[idx], re);
            im = fmaf(x, tw_sin[idx], im);
            idx += k;
            if (idx >= MEL_NFFT) idx -= MEL_NFFT;
        }
        power[k] = re * re + im * im;
    }
    __syncthreads();
    float local_max = -INFINITY;
    for (int m = threadIdx.x; m < n_mels; m += blockDim.x) {
        const int first = fb_first[m], n = fb_len[m], off = fb_off[m];
        float acc = 0.0f;
        for (int j = 0; j < n; ++j) acc = fmaf(power[first + j], fb_w[off + j], acc);
        float v = log10f(fmaxf(acc, 1e-10f));
        out[(size_t)m * n_frames + t] = v;
        local_max = fmaxf(local_max, v);
    }
    local_max = warp_max(local_max);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) red[warp] = local_max;
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = red[0];
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) m = fmaxf(m, red[w]);
        atomicMax(gmax, float_to_ordered(m));
    }
}

// (max(x, gmax - 8) + 4) / 4 in place; optionally also a bf16 copy for the encoder.
extern "C" __global__ void logmel_normalize(float* __restrict__ mel, int n,
                                            const int* __restrict__ gmax,
                                            bf16* __restrict__ out_bf16) {
    const float floor_v = ordered_to_float(*gmax) - 8.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = (fmaxf(mel[i], floor_v) + 4.0f) * 0.25f;
        mel[i] = v;
        if (out_bf16) out_bf16[i] = __float2bfloat16_rn(v);
    }
}

// =====================================================================================
// Flash attention (prefill and encoder), bf16 in/out, f32 softmax
// =====================================================================================

__device__ __forceinline__ void mma_bf16_16816(float* c, const uint32_t* a, uint32_t b0,
                                               uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#define FA_BK 64      // keys per tile

struct AttnParams {
    const bf16* q;
    const bf16* k;
    const bf16* v;
    bf16* o;
    const float* key_bias;  // [B, key_bias_stride] added to the scaled scores, or null
    long long q_bs, q_hs, q_rs;  // strides in elements: batch, head, row
    long long k_bs, k_hs, k_rs;
    long long v_bs, v_hs, v_rs;
    long long o_bs, o_hs, o_rs;
    long long key_bias_stride;
    int nq, nk, heads, kv_group;  // kv head = head / kv_group
    int causal;                   // query i sees key j iff j <= i + causal_offset
    int causal_offset;
    float scale_log2;             // softmax scale * log2(e)
};

// grid (ceil(nq / 64), heads, batch), 128 threads. Each warp owns 16 query rows; the
// S = Q K^T accumulator fragments are reused directly as the A operand of P V (the
// m16n8k16 C and A register layouts line up), so P never leaves registers.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const uint32_t sa = (uint32_t)__cvta_generic_to_shared(smem);
    const int n = valid ? 16 : 0;  // 0 source bytes: the 16 smem bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The warp's 16 query rows' scores over BK keys: s[j] (keys j * 8 … j * 8 + 7, the
// m16n8k16 C layout) = Q K^T, Q as A fragments `qa` over the head dimension, the keys
// row-major in shared memory with rows padded to HD + 8 (the 8 rows a fragment load touches
// fall in 8 bank groups).
template <int HD, int BK>
__device__ __forceinline__ void mma_scores(float (&s)[BK / 8][4], const uint32_t (&qa)[HD / 16][4],
                                           const bf16* ks, int lane) {
    constexpr int KPAD = HD + 8;
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            const bf16* kr = &ks[(j * 8 + g) * KPAD + kk * 16 + tq * 2];
            mma_bf16_16816(s[j], qa[kk], *reinterpret_cast<const uint32_t*>(kr),
                           *reinterpret_cast<const uint32_t*>(kr + 8));
        }
    }
}

// The output fragments' rows (a0: the thread's first row, a1: its second) rescaled by
// their running max's change.
template <int HD>
__device__ __forceinline__ void mma_rescale(float (&o)[HD / 8][4], float a0, float a1) {
#pragma unroll
    for (int d = 0; d < HD / 8; ++d) {
        o[d][0] *= a0;
        o[d][1] *= a0;
        o[d][2] *= a1;
        o[d][3] *= a1;
    }
}

// O += P V over BK keys, P taken straight from the score fragments `s` (the m16n8k16 C
// and A register layouts line up, so P never leaves registers), the values row-major in
// shared memory with rows padded to HD + 8.
template <int HD, int BK>
__device__ __forceinline__ void mma_pv(float (&o)[HD / 8][4], const float (&s)[BK / 8][4],
                                       const bf16* vs, int lane) {
    constexpr int KPAD = HD + 8;
#pragma unroll
    for (int kc = 0; kc < BK / 16; ++kc) {
        uint32_t pa[4];
        pa[0] = pack_bf16x2(s[2 * kc][0], s[2 * kc][1]);
        pa[1] = pack_bf16x2(s[2 * kc][2], s[2 * kc][3]);
        pa[2] = pack_bf16x2(s[2 * kc + 1][0], s[2 * kc + 1][1]);
        pa[3] = pack_bf16x2(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
        for (int d = 0; d < HD / 8; ++d) {
            // B fragment (16 keys x 8 dims) = two transposed 8x8 tiles of row-major V:
            // lanes 0-15 name the 16 key rows (lanes 16-31 repeat them, unused).
            const bf16* vr = &vs[(kc * 16 + (lane & 15)) * KPAD + d * 8];
            const uint32_t addr = (uint32_t)__cvta_generic_to_shared(vr);
            uint32_t b0, b1;
            asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                         : "=r"(b0), "=r"(b1)
                         : "r"(addr));
            mma_bf16_16816(o[d], pa, b0, b1);
        }
    }
}

// STAGES = 2: the next K/V tile is copied (cp.async, no registers) while the current
// one is used, hiding the L2/HBM latency that a synchronous load exposes once per tile.
template <int HD, int STAGES, int WARPS>
__device__ void flash_attn_impl(const AttnParams& p) {
    constexpr int BQ = 16 * WARPS;        // query rows per block
    constexpr int NTHREADS = 32 * WARPS;
    constexpr int KCH = HD / 16;   // k-chunks of the QK^T product
    constexpr int NT_O = HD / 8;   // n-tiles of the output
    constexpr int NT_S = FA_BK / 8;
    // Padded smem rows (16 bytes): the 8 rows a fragment load touches fall in 8
    // different bank groups, for the 32-bit K loads and for ldmatrix on V alike.
    constexpr int KPAD = HD + 8;
    __shared__ __align__(16) bf16 Ks_all[STAGES][FA_BK * KPAD];
    __shared__ __align__(16) bf16 Vs_all[STAGES][FA_BK * KPAD];

    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / p.kv_group;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;
    const bf16* qbase = p.q + b * p.q_bs + h * p.q_hs;
    const bf16* kbase = p.k + b * p.k_bs + kvh * p.k_hs;
    const bf16* vbase = p.v + b * p.v_bs + kvh * p.v_hs;
    const float* kbias = p.key_bias ? p.key_bias + b * p.key_bias_stride : nullptr;

    const int row0 = qb * BQ + warp * 16 + g;  // this thread's rows: row0, row0 + 8
    const int row1 = row0 + 8;

    // Q fragments for the whole head dimension, kept in registers.
    uint32_t qa[KCH][4];
#pragma unroll
    for (int kk = 0; kk < KCH; ++kk) {
        const int c = kk * 16 + tq * 2;
        qa[kk][0] = row0 < p.nq ? *reinterpret_cast<const uint32_t*>(qbase + row0 * p.q_rs + c) : 0u;
        qa[kk][1] = row1 < p.nq ? *reinterpret_cast<const uint32_t*>(qbase + row1 * p.q_rs + c) : 0u;
        qa[kk][2] = row0 < p.nq ? *reinterpret_cast<const uint32_t*>(qbase + row0 * p.q_rs + c + 8) : 0u;
        qa[kk][3] = row1 < p.nq ? *reinterpret_cast<const uint32_t*>(qbase + row1 * p.q_rs + c + 8) : 0u;
    }

    float o[NT_O][4];
#pragma unroll
    for (int d = 0; d < NT_O; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m0 = NEG_BIG, m1 = NEG_BIG, l0 = 0.0f, l1 = 0.0f;

    int k_end = p.nk;
    if (p.causal) {
        const int last_q = min(p.nq - 1, qb * BQ + BQ - 1);
        k_end = min(p.nk, last_q + p.causal_offset + 1);
    }
    // K and V tiles row-major; rows past nk are zero (0 * garbage could be NaN).
    constexpr int VEC_PER_ROW = HD / 8;
    auto load_tile = [&](int kt, int stage) {
        for (int i = tid; i < FA_BK * VEC_PER_ROW; i += NTHREADS) {
            const int r = i / VEC_PER_ROW, c = (i % VEC_PER_ROW) * 8;
            const bool ok = kt + r < p.nk;
            const long long row = ok ? kt + r : 0;
            if (STAGES > 1) {
                cp_async16(&Ks_all[stage][r * KPAD + c], kbase + row * p.k_rs + c, ok);
                cp_async16(&Vs_all[stage][r * KPAD + c], vbase + row * p.v_rs + c, ok);
            } else {
                uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
                if (ok) {
                    kv4 = *reinterpret_cast<const uint4*>(kbase + row * p.k_rs + c);
                    vv4 = *reinterpret_cast<const uint4*>(vbase + row * p.v_rs + c);
                }
                *reinterpret_cast<uint4*>(&Ks_all[stage][r * KPAD + c]) = kv4;
                *reinterpret_cast<uint4*>(&Vs_all[stage][r * KPAD + c]) = vv4;
            }
        }
        if (STAGES > 1) cp_async_commit();
    };
    if (STAGES > 1) load_tile(0, 0);
    for (int kt = 0, it = 0; kt < k_end; kt += FA_BK, ++it) {
        const int stage = STAGES > 1 ? (it & 1) : 0;
        if (STAGES > 1) {
            if (kt + FA_BK < k_end) {
                // the other buffer was last read in the previous iteration, which ended
                // with a barrier
                load_tile(kt + FA_BK, stage ^ 1);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
        } else {
            load_tile(kt, 0);
        }
        __syncthreads();
        const bf16* Ks = Ks_all[stage];
        const bf16* Vs = Vs_all[stage];

        float s[NT_S][4];
        mma_scores<HD, FA_BK>(s, qa, Ks, lane);
        // scale, mask, row max
        float mx0 = NEG_BIG, mx1 = NEG_BIG;
#pragma unroll
        for (int j = 0; j < NT_S; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kt + j * 8 + tq * 2 + (e & 1);
                const int row = (e < 2) ? row0 : row1;
                float v = s[j][e] * p.scale_log2;
                if (kbias && key < p.nk) v += kbias[key] * 1.4426950408889634f;
                bool masked = key >= p.nk || (p.causal && key > row + p.causal_offset);
                v = masked ? NEG_BIG : v;
                s[j][e] = v;
                if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float a0 = exp2f(m0 - mn0), a1 = exp2f(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int j = 0; j < NT_S; ++j) {
            // a masked entry is NEG_BIG below the max: exp2 underflows to exactly 0
            s[j][0] = exp2f(s[j][0] - mn0);
            s[j][1] = exp2f(s[j][1] - mn0);
            s[j][2] = exp2f(s[j][2] - mn1);
            s[j][3] = exp2f(s[j][3] - mn1);
            ps0 += s[j][0] + s[j][1];
            ps1 += s[j][2] + s[j][3];
        }
        l0 = l0 * a0 + ps0;
        l1 = l1 * a1 + ps1;
        mma_rescale<HD>(o, a0, a1);
        mma_pv<HD, FA_BK>(o, s, Vs, lane);
        __syncthreads();  // all warps are done with this stage before it is refilled
    }
    // the row sums were kept per thread (its 16 of 64 columns): add the quad's parts
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
    const float inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    bf16* obase = p.o + b * p.o_bs + h * p.o_hs;
#pragma unroll
    for (int d = 0; d < NT_O; ++d) {
        const int c = d * 8 + tq * 2;
        if (row0 < p.nq)
            *reinterpret_cast<uint32_t*>(obase + row0 * p.o_rs + c) =
                pack_bf16x2(o[d][0] * inv0, o[d][1] * inv0);
        if (row1 < p.nq)
            *reinterpret_cast<uint32_t*>(obase + row1 * p.o_rs + c) =
                pack_bf16x2(o[d][2] * inv1, o[d][3] * inv1);
    }
}

extern "C" __global__ void __launch_bounds__(128) flash_attn_hd64(AttnParams p) {
    flash_attn_impl<64, 2, 4>(p);
}
extern "C" __global__ void __launch_bounds__(128) flash_attn_hd64_1stage(AttnParams p) {
    flash_attn_impl<64, 1, 4>(p);
}
// 128 query rows per block: each K/V tile brought into shared memory serves twice the
// rows (half the L2 → SM traffic and barrier waits per FLOP).
extern "C" __global__ void __launch_bounds__(256) flash_attn_hd64_w8(AttnParams p) {
    flash_attn_impl<64, 2, 8>(p);
}
// hd 128 with two stages would need 70 KB of shared memory (an opt-in launch); the
// prefill it serves is a small part of the time, so it keeps one stage.
extern "C" __global__ void __launch_bounds__(128) flash_attn_hd128(AttnParams p) {
    flash_attn_impl<128, 1, 4>(p);
}

// y += bias (rows of `cols`), in place: candle's broadcast add walks a strided index per
// element and took ~100 us for the 30 s encoder's qkv projection.
extern "C" __global__ void bias_add_bf16(bf16* __restrict__ y, const bf16* __restrict__ bias,
                                         long long n, int cols) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + __bfloat162float(bias[i % cols]));
}

// =====================================================================================
// Elementwise epilogues of the encoder's linear layers (bf16, rows of `cols`)
// =====================================================================================

// y = gelu_erf(y + bias) in place.
extern "C" __global__ void bias_gelu_bf16(bf16* __restrict__ y, const bf16* __restrict__ bias,
                                          long long n, int cols) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        // round after the bias add, as a separate add kernel would
        const float v = __bfloat162float(__float2bfloat16_rn(__bfloat162float(y[i]) +
                                                             __bfloat162float(bias[i % cols])));
        y[i] = __float2bfloat16_rn(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
    }
}

// out = resid + (y + bias), rounded like the two separate adds.
extern "C" __global__ void bias_residual_bf16(const bf16* __restrict__ y,
                                              const bf16* __restrict__ bias,
                                              const bf16* __restrict__ resid,
                                              bf16* __restrict__ out, long long n, int cols) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float yb = __bfloat162float(__float2bfloat16_rn(__bfloat162float(y[i]) +
                                                              __bfloat162float(bias[i % cols])));
        out[i] = __float2bfloat16_rn(__bfloat162float(resid[i]) + yb);
    }
}

// =====================================================================================
// Batch-1 decode step
// =====================================================================================

// Streaming 16-byte load that does not allocate in L1: weights are read exactly once.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
    float a = bf_lo(w.x) * bf_lo(x.x);
    a = fmaf(bf_hi(w.x), bf_hi(x.x), a);
    a = fmaf(bf_lo(w.y), bf_lo(x.y), a);
    a = fmaf(bf_hi(w.y), bf_hi(x.y), a);
    a = fmaf(bf_lo(w.z), bf_lo(x.z), a);
    a = fmaf(bf_hi(w.z), bf_hi(x.z), a);
    a = fmaf(bf_lo(w.w), bf_lo(x.w), a);
    a = fmaf(bf_hi(w.w), bf_hi(x.w), a);
    return a;
}

// Dot product of one weight row (K bf16, 16-byte aligned) with the staged input, by one
// warp; four 16-byte loads in flight per lane.
__device__ __forceinline__ float warp_row_dot(const bf16* __restrict__ wrow,
                                              const uint4* __restrict__ xs, int nvec,
                                              int lane) {
    const uint4* w4 = reinterpret_cast<const uint4*>(wrow);
    float acc = 0.0f;
    int c = lane;
    for (; c + 96 < nvec; c += 128) {
        uint4 w0 = ld_stream(w4 + c), w1 = ld_stream(w4 + c + 32);
        uint4 w2 = ld_stream(w4 + c + 64), w3 = ld_stream(w4 + c + 96);
        acc += dot8(w0, xs[c]);
        acc += dot8(w1, xs[c + 32]);
        acc += dot8(w2, xs[c + 64]);
        acc += dot8(w3, xs[c + 96]);
    }
    for (; c < nvec; c += 32) acc += dot8(ld_stream(w4 + c), xs[c]);
    return warp_sum(acc);
}

// rsqrt(mean(x^2) + eps) of a row of K from each thread's partial sum of squares, for the
// whole block (the one reduction order both decode steps use).
__device__ __forceinline__ float block_rstd(float ss, int K, float eps) {
    __shared__ float red[32];
    __shared__ float rstd_s;
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += red[w];
        rstd_s = rsqrtf(t / (float)K + eps);
    }
    __syncthreads();
    return rstd_s;
}

// Values of a row each thread keeps in registers while the block reduces its norm (a
// Qwen2.5-7B row of 3 584 with 256 threads: 14).
#define NORM_KEPT 16

// First pass of an RMSNorm over a row of K: x += y where y is given (f32, rounded once as
// the batch-1 GEMV's residual mode, written back to xw), and rsqrt(mean(x^2) + eps) for
// the whole block. Thread t sums positions t, t + blockDim.x, … in order — the one
// reduction order of both decode steps, so they see the same normalised input — and keeps
// its first NORM_KEPT values in `kept` for norm_store, their loads issued together (a
// loop that re-read x and waited on each load took ~12 us for a few KB).
// (x and xw may be the same row: neither is __restrict__.)
__device__ __forceinline__ float norm_rstd(const bf16* x, const float* __restrict__ y, bf16* xw,
                                           int K, float eps, float (&kept)[NORM_KEPT]) {
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_KEPT; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        kept[k] = 0.0f;
        if (i < K) {
            float v = __bfloat162float(x[i]);
            if (y) {
                const bf16 nv = __float2bfloat16_rn(v + y[i]);
                xw[i] = nv;
                v = __bfloat162float(nv);
            }
            kept[k] = v;
            ss = fmaf(v, v, ss);
        }
    }
    for (int i = threadIdx.x + NORM_KEPT * blockDim.x; i < K; i += blockDim.x) {
        float v = __bfloat162float(x[i]);
        if (y) {
            const bf16 nv = __float2bfloat16_rn(v + y[i]);
            xw[i] = nv;
            v = __bfloat162float(nv);
        }
        ss = fmaf(v, v, ss);
    }
    return block_rstd(ss, K, eps);
}

// Second pass: out = bf16(x * rstd * w), from `kept` and past it from x (as updated).
__device__ __forceinline__ void norm_store(const bf16* x, const bf16* __restrict__ w,
                                           float rstd, int K, const float (&kept)[NORM_KEPT],
                                           bf16* __restrict__ out) {
#pragma unroll
    for (int k = 0; k < NORM_KEPT; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < K) out[i] = __float2bfloat16_rn(kept[k] * rstd * __bfloat162float(w[i]));
    }
    for (int i = threadIdx.x + NORM_KEPT * blockDim.x; i < K; i += blockDim.x)
        out[i] = __float2bfloat16_rn(__bfloat162float(x[i]) * rstd * __bfloat162float(w[i]));
}

// Stages the GEMV input in shared memory as bf16: either x itself or
// bf16(x * rsqrt(mean(x^2) + eps) * norm_w), which is what the RMSNorm kernel would have
// written to memory.
__device__ __forceinline__ void stage_input(const bf16* __restrict__ x,
                                            const bf16* __restrict__ norm_w, float eps,
                                            int K, bf16* xs) {
    if (norm_w) {
        float kept[NORM_KEPT];
        const float rstd = norm_rstd(x, nullptr, nullptr, K, eps, kept);
        norm_store(x, norm_w, rstd, K, kept, xs);
    } else {
        const uint4* x4 = reinterpret_cast<const uint4*>(x);
        uint4* s4 = reinterpret_cast<uint4*>(xs);
        for (int i = threadIdx.x; i < K / 8; i += blockDim.x) s4[i] = x4[i];
    }
    __syncthreads();
}

// GEMV modes (y = W x, W row-major [N, K] as stored in the checkpoint):
//   0: out_bf16[i] = y_i + bias_i (bias may be null)
//   1: out_bf16[i] += y_i                       (residual add, in place)
//   2: out_bf16[i] = silu(y_i) * y_{i + N}      (gate/up fused; W has 2N rows)
//   3: out_f32[i]  = y_i                        (logits)
// 8 warps per block, one output row per warp per pass; the grid may be smaller than
// N / 8 (blocks then loop), so the input is staged once per block.
extern "C" __global__ void __launch_bounds__(256) gemv_bf16(
    const bf16* __restrict__ W, const bf16* __restrict__ x, const bf16* __restrict__ norm_w,
    float eps, const bf16* __restrict__ bias, void* __restrict__ out, int N, int K, int mode) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* xs = reinterpret_cast<bf16*>(smem_raw);
    stage_input(x, norm_w, eps, K, xs);
    const uint4* xs4 = reinterpret_cast<const uint4*>(xs);
    const int nvec = K / 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int row = blockIdx.x * 8 + warp; row < N; row += gridDim.x * 8) {
        if (mode == 2) {
            const float gte = warp_row_dot(W + (size_t)row * K, xs4, nvec, lane);
            const float up = warp_row_dot(W + (size_t)(row + N) * K, xs4, nvec, lane);
            if (lane == 0) {
                const float silu = gte / (1.0f + __expf(-gte));
                reinterpret_cast<bf16*>(out)[row] = __float2bfloat16_rn(silu * up);
            }
        } else {
            const float y = warp_row_dot(W + (size_t)row * K, xs4, nvec, lane);
            if (lane == 0) {
                if (mode == 0) {
                    const float bb = bias ? __bfloat162float(bias[row]) : 0.0f;
                    reinterpret_cast<bf16*>(out)[row] = __float2bfloat16_rn(y + bb);
                } else if (mode == 1) {
                    bf16* o = reinterpret_cast<bf16*>(out);
                    o[row] = __float2bfloat16_rn(__bfloat162float(o[row]) + y);
                } else {
                    reinterpret_cast<float*>(out)[row] = y;
                }
            }
        }
    }
}

// io[0] = token id to embed, io[1] = its position. x[H] = embed[io[0]].
extern "C" __global__ void embed_row(const bf16* __restrict__ embed, const int* __restrict__ io,
                                     int H, bf16* __restrict__ x) {
    const uint4* src = reinterpret_cast<const uint4*>(embed + (size_t)io[0] * H);
    uint4* dst = reinterpret_cast<uint4*>(x);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < H / 8; i += gridDim.x * blockDim.x)
        dst[i] = src[i];
}

// RoPE on the q and k heads of the fused qkv projection at position io[1], and the
// KV-cache append of k and v there. One block per q head and per kv head (grid
// nh + nkv), hd / 2 threads: thread i rotates the pair (i, i + hd/2) with the bf16
// cos/sin table row of that position (non-interleaved halves, as Qwen2).
// Cache layout [nkv, cap, hd].
extern "C" __global__ void rope_kv_append(const bf16* __restrict__ qkv,
                                          const bf16* __restrict__ cos_t,
                                          const bf16* __restrict__ sin_t,
                                          const int* __restrict__ io, int nh, int nkv, int hd,
                                          int cap, bf16* __restrict__ q_out,
                                          bf16* __restrict__ kcache,
                                          bf16* __restrict__ vcache) {
    const int pos = io[1];
    const int half = hd / 2;
    const int i = threadIdx.x;
    const int head = blockIdx.x;
    const float c = __bfloat162float(cos_t[(size_t)pos * half + i]);
    const float s = __bfloat162float(sin_t[(size_t)pos * half + i]);
    const bf16* src = qkv + (size_t)head * hd;  // q heads, then k heads: contiguous
    const float x1 = __bfloat162float(src[i]), x2 = __bfloat162float(src[i + half]);
    const bf16 r1 = __float2bfloat16_rn(x1 * c - x2 * s);
    const bf16 r2 = __float2bfloat16_rn(x2 * c + x1 * s);
    if (head < nh) {
        q_out[(size_t)head * hd + i] = r1;
        q_out[(size_t)head * hd + i + half] = r2;
    } else {
        const int kvh = head - nh;
        bf16* kd = kcache + ((size_t)kvh * cap + pos) * hd;
        kd[i] = r1;
        kd[i + half] = r2;
        const bf16* vsrc = qkv + (size_t)(nh + nkv + kvh) * hd;
        bf16* vd = vcache + ((size_t)kvh * cap + pos) * hd;
        vd[i] = vsrc[i];
        vd[i + half] = vsrc[i + half];
    }
}

#define DEC_SPLITS 16

// Split-K attention of one query head over cache positions 0..len-1 of a cache
// [nkv, cap, 128]: the split `sp` of head `h` writes its running max (log2 domain), sum
// and unnormalised output to part_*[h * DEC_SPLITS + sp]. 128 threads; each lane holds
// 4 dims.
__device__ __forceinline__ void attn_partial_body(
    const bf16* __restrict__ q, const bf16* __restrict__ kcache,
    const bf16* __restrict__ vcache, int len, int cap, int h, int sp, int nh, int nkv,
    float scale_log2, float* __restrict__ part_m, float* __restrict__ part_l,
    float* __restrict__ part_o) {
    constexpr int HD = 128;
    const int kvh = h / (nh / nkv);
    const int chunk = (len + DEC_SPLITS - 1) / DEC_SPLITS;
    const int beg = sp * chunk, end = min(len, beg + chunk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint2 qv = *reinterpret_cast<const uint2*>(q + (size_t)h * HD + lane * 4);
    const float q0 = bf_lo(qv.x) * scale_log2, q1 = bf_hi(qv.x) * scale_log2;
    const float q2 = bf_lo(qv.y) * scale_log2, q3 = bf_hi(qv.y) * scale_log2;
    float m = NEG_BIG, l = 0.0f, a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    const bf16* kb = kcache + (size_t)kvh * cap * HD + lane * 4;
    const bf16* vb = vcache + (size_t)kvh * cap * HD + lane * 4;
    for (int j = beg + warp; j < end; j += 4) {
        const uint2 kv = *reinterpret_cast<const uint2*>(kb + (size_t)j * HD);
        const uint2 vv = *reinterpret_cast<const uint2*>(vb + (size_t)j * HD);
        float sdot = q0 * bf_lo(kv.x) + q1 * bf_hi(kv.x) + q2 * bf_lo(kv.y) + q3 * bf_hi(kv.y);
        sdot = warp_sum(sdot);
        const float mn = fmaxf(m, sdot);
        const float alpha = exp2f(m - mn), pj = exp2f(sdot - mn);
        l = l * alpha + pj;
        a0 = a0 * alpha + pj * bf_lo(vv.x);
        a1 = a1 * alpha + pj * bf_hi(vv.x);
        a2 = a2 * alpha + pj * bf_lo(vv.y);
        a3 = a3 * alpha + pj * bf_hi(vv.y);
        m = mn;
    }
    __shared__ float sm[4], sl[4];
    __shared__ float so[4][HD];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
    so[warp][lane * 4 + 0] = a0;
    so[warp][lane * 4 + 1] = a1;
    so[warp][lane * 4 + 2] = a2;
    so[warp][lane * 4 + 3] = a3;
    __syncthreads();
    const float M = fmaxf(fmaxf(sm[0], sm[1]), fmaxf(sm[2], sm[3]));
    const int d = threadIdx.x;  // 128 threads = HD
    float acc = 0.0f, L = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        const float f = exp2f(sm[w] - M);
        acc += so[w][d] * f;
        L += sl[w] * f;
    }
    const size_t idx = (size_t)h * DEC_SPLITS + sp;
    part_o[idx * HD + d] = acc;
    if (d == 0) {
        part_m[idx] = M;
        part_l[idx] = L;
    }
}

// Merges the splits of head h into out[h * 128 + d] (bf16); 128 threads.
__device__ __forceinline__ void attn_combine_body(const float* __restrict__ part_m,
                                                  const float* __restrict__ part_l,
                                                  const float* __restrict__ part_o, int h,
                                                  bf16* __restrict__ out) {
    constexpr int HD = 128;
    const int d = threadIdx.x;
    float M = NEG_BIG;
    for (int s = 0; s < DEC_SPLITS; ++s) M = fmaxf(M, part_m[h * DEC_SPLITS + s]);
    float L = 0.0f, acc = 0.0f;
    for (int s = 0; s < DEC_SPLITS; ++s) {
        const size_t idx = (size_t)h * DEC_SPLITS + s;
        const float f = exp2f(part_m[idx] - M);
        L += part_l[idx] * f;
        acc += part_o[idx * HD + d] * f;
    }
    out[h * HD + d] = __float2bfloat16_rn(acc / L);
}

// Batch 1: the query at position io[1] over cache positions 0..io[1]. grid (nh, DEC_SPLITS).
extern "C" __global__ void __launch_bounds__(128) attn_decode_partial(
    const bf16* __restrict__ q, const bf16* __restrict__ kcache,
    const bf16* __restrict__ vcache, const int* __restrict__ io, int nh, int nkv, int cap,
    float scale_log2, float* __restrict__ part_m, float* __restrict__ part_l,
    float* __restrict__ part_o) {
    attn_partial_body(q, kcache, vcache, io[1] + 1, cap, blockIdx.x, blockIdx.y, nh, nkv,
                      scale_log2, part_m, part_l, part_o);
}

// grid nh, 128 threads.
extern "C" __global__ void __launch_bounds__(128) attn_decode_combine(
    const float* __restrict__ part_m, const float* __restrict__ part_l,
    const float* __restrict__ part_o, bf16* __restrict__ out) {
    attn_combine_body(part_m, part_l, part_o, blockIdx.x, out);
}

#define AM_THREADS 256

// Per-block argmax (first index on ties) and sum of exp(logit - block max) over a slice
// of row blockIdx.y of `logits` [rows, V]; the partials of a row are gridDim.x apart.
extern "C" __global__ void __launch_bounds__(AM_THREADS) argmax_partial(
    const float* __restrict__ logits, int V, float* __restrict__ pmax,
    int* __restrict__ pidx, float* __restrict__ psum) {
    __shared__ float smax[AM_THREADS];
    __shared__ int sidx[AM_THREADS];
    __shared__ float ssum[AM_THREADS];
    logits += (size_t)blockIdx.y * V;
    const int part = blockIdx.y * gridDim.x + blockIdx.x;
    const int per = (V + gridDim.x - 1) / gridDim.x;
    const int beg = blockIdx.x * per, end = min(V, beg + per);
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = beg + threadIdx.x; i < end; i += AM_THREADS) {
        const float v = logits[i];
        if (v > best) {  // i increases per thread: keeps the first index of a tie
            best = v;
            bi = i;
        }
    }
    smax[threadIdx.x] = best;
    sidx[threadIdx.x] = bi;
    __syncthreads();
    for (int s = AM_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float o = smax[threadIdx.x + s];
            const int oi = sidx[threadIdx.x + s];
            if (o > smax[threadIdx.x] || (o == smax[threadIdx.x] && oi < sidx[threadIdx.x])) {
                smax[threadIdx.x] = o;
                sidx[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    const float bmax = smax[0];
    float sum = 0.0f;
    for (int i = beg + threadIdx.x; i < end; i += AM_THREADS) sum += __expf(logits[i] - bmax);
    ssum[threadIdx.x] = sum;
    __syncthreads();
    for (int s = AM_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) ssum[threadIdx.x] += ssum[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        pmax[part] = bmax;
        pidx[part] = sidx[0];
        psum[part] = ssum[0];
    }
}

// One block per row (blockIdx.x): merges the row's `nparts` partials. The row's io entry
// (io + row * io_stride) becomes {argmax, position + 1}: the next step's input token
// and its position. log p(argmax) is added to lp[row] (accumulate != 0) or stored there.
extern "C" __global__ void __launch_bounds__(AM_THREADS) argmax_final(
    const float* __restrict__ pmax, const int* __restrict__ pidx,
    const float* __restrict__ psum, int nparts, int* __restrict__ io, int io_stride,
    float* __restrict__ lp, int accumulate) {
    __shared__ float smax[AM_THREADS];
    __shared__ int sidx[AM_THREADS];
    __shared__ float ssum[AM_THREADS];
    const int row = blockIdx.x;
    pmax += (size_t)row * nparts;
    pidx += (size_t)row * nparts;
    psum += (size_t)row * nparts;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < nparts; i += AM_THREADS) {
        const float v = pmax[i];
        const int vi = pidx[i];
        if (v > best || (v == best && vi < bi)) {
            best = v;
            bi = vi;
        }
    }
    smax[threadIdx.x] = best;
    sidx[threadIdx.x] = bi;
    __syncthreads();
    for (int s = AM_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float o = smax[threadIdx.x + s];
            const int oi = sidx[threadIdx.x + s];
            if (o > smax[threadIdx.x] || (o == smax[threadIdx.x] && oi < sidx[threadIdx.x])) {
                smax[threadIdx.x] = o;
                sidx[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    const float M = smax[0];
    float sum = 0.0f;
    for (int i = threadIdx.x; i < nparts; i += AM_THREADS) sum += psum[i] * __expf(pmax[i] - M);
    ssum[threadIdx.x] = sum;
    __syncthreads();
    for (int s = AM_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) ssum[threadIdx.x] += ssum[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        int* r = io + (size_t)row * io_stride;
        r[0] = sidx[0];
        r[1] = r[1] + 1;
        const float l = -logf(ssum[0]);
        lp[row] = accumulate ? lp[row] + l : l;
    }
}

// =====================================================================================
// Batched decode step: B streams, one token each, each over its own KV cache
// =====================================================================================
//
// The projections are GEMMs (cuBLAS, f32 out) between these kernels. Every stream is a
// row with its own entry in a row table that the host rewrites before each step, so a
// step captured as a CUDA graph replays for any streams of its batch-size bucket:
//   rows[4 b .. 4 b + 3] = {input token, its position, cache capacity, unused}
//   kv[2 (b L + l) + {0, 1}] = key / value cache of row b, layer l: [nkv, cap, hd] bf16
// (argmax_final advances rows[4 b], rows[4 b + 1] like the batch-1 io pair).

// x[b] = embed[token of row b]; grid (ceil(H / 8 / 256), B).
extern "C" __global__ void embed_rows(const bf16* __restrict__ embed, const int* __restrict__ rows,
                                      int H, bf16* __restrict__ x) {
    const int b = blockIdx.y;
    const uint4* src = reinterpret_cast<const uint4*>(embed + (size_t)rows[4 * b] * H);
    uint4* dst = reinterpret_cast<uint4*>(x + (size_t)b * H);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < H / 8; i += gridDim.x * blockDim.x)
        dst[i] = src[i];
}

// Row b = blockIdx.x: x += y (y f32, the projection; skipped when null; rounded once, as
// the batch-1 GEMV's residual mode), then out = bf16(x * rsqrt(mean(x^2) + eps) * w) with
// the reduction of the batch-1 GEMV's staging, so both see the same normalised input.
// 256 threads.
extern "C" __global__ void __launch_bounds__(256) residual_rmsnorm_rows(
    bf16* __restrict__ x, const float* __restrict__ y, const bf16* __restrict__ w, float eps,
    int H, bf16* __restrict__ out) {
    const size_t base = (size_t)blockIdx.x * H;
    float kept[NORM_KEPT];
    const float rstd = norm_rstd(x + base, y ? y + base : nullptr, x + base, H, eps, kept);
    norm_store(x + base, w, rstd, H, kept, out + base);
}

// The fused q/k/v projection of row b = blockIdx.y (f32, bias not yet added): bias added
// and rounded to bf16 (as the batch-1 GEMV stores it), RoPE on q and k at the row's
// position, q to q_out [B, nh * hd], k and v appended to the row's layer-`layer` cache.
// grid (nh + nkv, B), hd / 2 threads.
extern "C" __global__ void rope_kv_append_rows(
    const float* __restrict__ qkv, const bf16* __restrict__ bias,
    const bf16* __restrict__ cos_t, const bf16* __restrict__ sin_t,
    const int* __restrict__ rows, const unsigned long long* __restrict__ kv, int layer,
    int layers, int nh, int nkv, int hd, bf16* __restrict__ q_out) {
    const int b = blockIdx.y, head = blockIdx.x, i = threadIdx.x;
    const int pos = rows[4 * b + 1], cap = rows[4 * b + 2];
    const int half = hd / 2;
    const float* src = qkv + (size_t)b * (nh + 2 * nkv) * hd;
    auto biased = [&](int j) {
        return __bfloat162float(__float2bfloat16_rn(src[j] + __bfloat162float(bias[j])));
    };
    const float c = __bfloat162float(cos_t[(size_t)pos * half + i]);
    const float s = __bfloat162float(sin_t[(size_t)pos * half + i]);
    const int j = head * hd + i;
    const float x1 = biased(j), x2 = biased(j + half);
    const bf16 r1 = __float2bfloat16_rn(x1 * c - x2 * s);
    const bf16 r2 = __float2bfloat16_rn(x2 * c + x1 * s);
    if (head < nh) {
        bf16* qd = q_out + (size_t)b * nh * hd + (size_t)head * hd;
        qd[i] = r1;
        qd[i + half] = r2;
    } else {
        const int kvh = head - nh;
        const unsigned long long* p = kv + 2 * ((size_t)b * layers + layer);
        bf16* kd = reinterpret_cast<bf16*>(p[0]) + ((size_t)kvh * cap + pos) * hd;
        bf16* vd = reinterpret_cast<bf16*>(p[1]) + ((size_t)kvh * cap + pos) * hd;
        kd[i] = r1;
        kd[i + half] = r2;
        const int vj = (nh + nkv + kvh) * hd + i;
        vd[i] = __float2bfloat16_rn(biased(vj));
        vd[i + half] = __float2bfloat16_rn(biased(vj + half));
    }
}

// Row b = blockIdx.z over its own cache (positions 0..pos). grid (nh, DEC_SPLITS, B);
// partials [B, nh, DEC_SPLITS].
extern "C" __global__ void __launch_bounds__(128) attn_decode_partial_rows(
    const bf16* __restrict__ q, const int* __restrict__ rows,
    const unsigned long long* __restrict__ kv, int layer, int layers, int nh, int nkv,
    float scale_log2, float* __restrict__ part_m, float* __restrict__ part_l,
    float* __restrict__ part_o) {
    constexpr int HD = 128;
    const int b = blockIdx.z;
    const unsigned long long* p = kv + 2 * ((size_t)b * layers + layer);
    const size_t parts = (size_t)b * nh * DEC_SPLITS;
    attn_partial_body(q + (size_t)b * nh * HD, reinterpret_cast<const bf16*>(p[0]),
                      reinterpret_cast<const bf16*>(p[1]), rows[4 * b + 1] + 1, rows[4 * b + 2],
                      blockIdx.x, blockIdx.y, nh, nkv, scale_log2, part_m + parts,
                      part_l + parts, part_o + parts * HD);
}

// grid (nh, B), 128 threads: out [B, nh * 128].
extern "C" __global__ void __launch_bounds__(128) attn_decode_combine_rows(
    const float* __restrict__ part_m, const float* __restrict__ part_l,
    const float* __restrict__ part_o, int nh, bf16* __restrict__ out) {
    const size_t b = blockIdx.y, parts = b * nh * DEC_SPLITS;
    attn_combine_body(part_m + parts, part_l + parts, part_o + parts * 128, blockIdx.x,
                      out + b * nh * 128);
}

#define TILE_CH 32
#define TILE_Q 32

// Attention of a tile of rows over their stream's cache, for one kv head: every query
// head sharing that kv head, of up to TILE_Q / (nh / nkv) consecutive rows of one stream
// (ascending positions; each row attends to 0..its position), reads each key and value
// once from a shared-memory chunk of TILE_CH positions, where the per-row kernel above
// reads them once per query head and row (7 × rows times for Step-Audio 2's heads).
// grid (nkv, tiles, splits), 128 threads; tiles[2 t] = first row, tiles[2 t + 1] = rows
// (null: tile t = row t). Split sp takes its share of the chunks up to the tile's last
// position; with one split the result goes to out [rows, nh * 128] (bf16), else the
// running max (log2 domain), sum and unnormalised output to part_* [rows, nh, splits].
// Warp w owns the queries w, w + 4, …: lane = position for the scores, lane = 4 dims
// for the output.
extern "C" __global__ void __launch_bounds__(128) attn_rows_tiled(
    const bf16* __restrict__ q, const int* __restrict__ rows,
    const unsigned long long* __restrict__ kv, const int* __restrict__ tiles, int layer,
    int layers, int nh, int nkv, float scale_log2, int splits, float* __restrict__ part_m,
    float* __restrict__ part_l, float* __restrict__ part_o, bf16* __restrict__ out) {
    constexpr int HD = 128, CH = TILE_CH, KP = HD + 8, JM = TILE_Q / 4;
    __shared__ float qs[TILE_Q][HD];
    __shared__ __align__(16) bf16 ks[CH][KP];
    __shared__ __align__(16) bf16 vs[CH][HD];
    __shared__ float ps[TILE_Q][CH];
    __shared__ int qpos[TILE_Q];
    const int kvh = blockIdx.x, sp = blockIdx.z, g = nh / nkv;
    const int r0 = tiles ? tiles[2 * blockIdx.y] : blockIdx.y;
    const int nr = tiles ? tiles[2 * blockIdx.y + 1] : 1;
    const int qn = nr * g;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int len = 0;
    for (int r = 0; r < nr; ++r) len = max(len, rows[4 * (r0 + r) + 1] + 1);
    const int cap = rows[4 * r0 + 2];
    const unsigned long long* p = kv + 2 * ((size_t)r0 * layers + layer);
    const bf16* kc = reinterpret_cast<const bf16*>(p[0]) + (size_t)kvh * cap * HD;
    const bf16* vc = reinterpret_cast<const bf16*>(p[1]) + (size_t)kvh * cap * HD;
    for (int i = threadIdx.x; i < qn * HD; i += blockDim.x) {
        const int qi = i / HD, d = i % HD;
        const int row = r0 + qi / g, head = kvh * g + qi % g;
        qs[qi][d] = __bfloat162float(q[((size_t)row * nh + head) * HD + d]) * scale_log2;
    }
    if (threadIdx.x < qn) qpos[threadIdx.x] = rows[4 * (r0 + threadIdx.x / g) + 1];
    const int chunks = (len + CH - 1) / CH, per = (chunks + splits - 1) / splits;
    const int beg = min(len, sp * per * CH), end = min(len, beg + per * CH);
    float m[JM], l[JM], acc[JM][4];
#pragma unroll
    for (int j = 0; j < JM; ++j) {
        m[j] = NEG_BIG;
        l[j] = 0.0f;
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    }
    for (int c0 = beg; c0 < end; c0 += CH) {
        __syncthreads();  // the last chunk's keys, values and weights are used up
        for (int i = threadIdx.x; i < CH * (HD / 8); i += blockDim.x) {
            const int c = i / (HD / 8), d = (i % (HD / 8)) * 8;
            uint4 kk = make_uint4(0, 0, 0, 0), vv = kk;
            if (c0 + c < end) {
                kk = *reinterpret_cast<const uint4*>(kc + (size_t)(c0 + c) * HD + d);
                vv = *reinterpret_cast<const uint4*>(vc + (size_t)(c0 + c) * HD + d);
            }
            *reinterpret_cast<uint4*>(&ks[c][d]) = kk;
            *reinterpret_cast<uint4*>(&vs[c][d]) = vv;
        }
        __syncthreads();
        float s[JM];
#pragma unroll
        for (int j = 0; j < JM; ++j) s[j] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < HD; d += 8) {
            const uint4 kk = *reinterpret_cast<const uint4*>(&ks[lane][d]);
            const float k0 = bf_lo(kk.x), k1 = bf_hi(kk.x), k2 = bf_lo(kk.y), k3 = bf_hi(kk.y);
            const float k4 = bf_lo(kk.z), k5 = bf_hi(kk.z), k6 = bf_lo(kk.w), k7 = bf_hi(kk.w);
#pragma unroll
            for (int j = 0; j < JM; ++j) {
                const int qi = warp + 4 * j;
                if (qi < qn) {
                    const float4 a = *reinterpret_cast<const float4*>(&qs[qi][d]);
                    const float4 b = *reinterpret_cast<const float4*>(&qs[qi][d + 4]);
                    s[j] += a.x * k0 + a.y * k1 + a.z * k2 + a.w * k3 + b.x * k4 + b.y * k5 +
                            b.z * k6 + b.w * k7;
                }
            }
        }
        const int pos = c0 + lane;
#pragma unroll
        for (int j = 0; j < JM; ++j) {
            const int qi = warp + 4 * j;
            if (qi < qn) {
                const bool ok = pos < end && pos <= qpos[qi];
                const float mx = warp_max(ok ? s[j] : NEG_BIG);
                const float mn = fmaxf(m[j], mx);
                const float alpha = exp2f(m[j] - mn);
                const float pj = ok ? exp2f(s[j] - mn) : 0.0f;
                l[j] = l[j] * alpha + warp_sum(pj);
                acc[j][0] *= alpha;
                acc[j][1] *= alpha;
                acc[j][2] *= alpha;
                acc[j][3] *= alpha;
                m[j] = mn;
                ps[qi][lane] = pj;
            }
        }
        __syncwarp();
        const int cn = min(CH, end - c0);
        for (int c = 0; c < cn; ++c) {
            const uint2 vv = *reinterpret_cast<const uint2*>(&vs[c][lane * 4]);
            const float v0 = bf_lo(vv.x), v1 = bf_hi(vv.x), v2 = bf_lo(vv.y), v3 = bf_hi(vv.y);
#pragma unroll
            for (int j = 0; j < JM; ++j) {
                const int qi = warp + 4 * j;
                if (qi < qn) {
                    const float pj = ps[qi][c];
                    acc[j][0] += pj * v0;
                    acc[j][1] += pj * v1;
                    acc[j][2] += pj * v2;
                    acc[j][3] += pj * v3;
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < JM; ++j) {
        const int qi = warp + 4 * j;
        if (qi >= qn) continue;
        const size_t rh = (size_t)(r0 + qi / g) * nh + kvh * g + qi % g;
        if (splits == 1) {
            const float inv = 1.0f / l[j];
            *reinterpret_cast<uint2*>(out + rh * HD + lane * 4) =
                make_uint2(pack_bf16x2(acc[j][0] * inv, acc[j][1] * inv),
                           pack_bf16x2(acc[j][2] * inv, acc[j][3] * inv));
        } else {
            const size_t idx = rh * splits + sp;
            *reinterpret_cast<float4*>(part_o + idx * HD + lane * 4) =
                make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
            if (lane == 0) {
                part_m[idx] = m[j];
                part_l[idx] = l[j];
            }
        }
    }
}

#define GQA_MAX 8
#define GQA_MIN_CHUNKS 4

// A batched step's attention (one query row per stream): one block per kv head, row and
// split, the kv head's g = nh / nkv <= GQA_MAX query heads sharing every key and value
// read. Warp w takes the split's chunks of TILE_CH positions w, w + 4, … on its own: for
// the scores lane = position, a lane reading its key row straight into registers (no
// shuffle per position as in attn_decode_partial_rows, no block-wide barrier per chunk
// as in attn_rows_tiled); for the output lane = 4 dims.
// A split covers at least GQA_MIN_CHUNKS chunks (one per warp), so of `splits` blocks
// only as many as the row's length needs do work (the graph of a step fixes `splits`
// before the lengths are known); the others write an empty partial (max NEG_BIG, sum
// 0). The warps' running max, sum and output are merged at the end; with one split the
// result goes to out [rows, nh * 128] (bf16), else to part_* [rows, nh, splits] as
// attn_rows_tiled writes them, for attn_rows_tiled_combine.
extern "C" __global__ void __launch_bounds__(128, 4) attn_step_gqa(
    const bf16* __restrict__ q, const int* __restrict__ rows,
    const unsigned long long* __restrict__ kv, int layer, int layers, int nh, int nkv,
    float scale_log2, int splits, float* __restrict__ part_m, float* __restrict__ part_l,
    float* __restrict__ part_o, bf16* __restrict__ out) {
    constexpr int HD = 128, CH = TILE_CH, G = GQA_MAX;
    __shared__ __align__(16) float qs[G][HD];
    __shared__ __align__(16) float ps[4][CH][G];
    __shared__ __align__(16) float wo[4][G][HD];
    __shared__ float wm[4][G], wl[4][G];
    const int kvh = blockIdx.x, row = blockIdx.y, sp = blockIdx.z, g = nh / nkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int len = rows[4 * row + 1] + 1;
    const int cap = rows[4 * row + 2];
    const unsigned long long* p = kv + 2 * ((size_t)row * layers + layer);
    const bf16* kc = reinterpret_cast<const bf16*>(p[0]) + (size_t)kvh * cap * HD;
    const bf16* vc = reinterpret_cast<const bf16*>(p[1]) + (size_t)kvh * cap * HD;
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
        const int j = i / HD, d = i % HD;
        qs[j][d] = j < g ? __bfloat162float(q[((size_t)row * nh + kvh * g + j) * HD + d]) *
                               scale_log2
                         : 0.0f;
    }
    __syncthreads();
    const int chunks = (len + CH - 1) / CH;
    const int per = max(GQA_MIN_CHUNKS, (chunks + splits - 1) / splits);
    const int c_beg = min(chunks, sp * per), c_end = min(chunks, c_beg + per);
    float m[G], l[G], acc[G][4];
#pragma unroll
    for (int j = 0; j < G; ++j) {
        m[j] = NEG_BIG;
        l[j] = 0.0f;
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    }
    for (int c = c_beg + warp; c < c_end; c += 4) {
        const int p0 = c * CH, pos = p0 + lane, cn = min(CH, len - p0);
        const bool ok = lane < cn;
        const uint4* krow = reinterpret_cast<const uint4*>(kc + (size_t)(ok ? pos : p0) * HD);
        float s[G];
#pragma unroll
        for (int j = 0; j < G; ++j) s[j] = 0.0f;
#pragma unroll
        for (int d0 = 0; d0 < HD / 8; d0 += 4) {
            uint4 kk[4];
#pragma unroll
            for (int t = 0; t < 4; ++t) kk[t] = krow[d0 + t];
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const float k0 = bf_lo(kk[t].x), k1 = bf_hi(kk[t].x);
                const float k2 = bf_lo(kk[t].y), k3 = bf_hi(kk[t].y);
                const float k4 = bf_lo(kk[t].z), k5 = bf_hi(kk[t].z);
                const float k6 = bf_lo(kk[t].w), k7 = bf_hi(kk[t].w);
                const int d = (d0 + t) * 8;
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    const float4 a = *reinterpret_cast<const float4*>(&qs[j][d]);
                    const float4 b = *reinterpret_cast<const float4*>(&qs[j][d + 4]);
                    s[j] += a.x * k0 + a.y * k1 + a.z * k2 + a.w * k3 + b.x * k4 + b.y * k5 +
                            b.z * k6 + b.w * k7;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < G; ++j) {
            const float sj = ok ? s[j] : NEG_BIG;
            const float mn = fmaxf(m[j], warp_max(sj));
            const float alpha = exp2f(m[j] - mn);
            const float pj = ok ? exp2f(sj - mn) : 0.0f;
            l[j] = l[j] * alpha + warp_sum(pj);
            acc[j][0] *= alpha;
            acc[j][1] *= alpha;
            acc[j][2] *= alpha;
            acc[j][3] *= alpha;
            m[j] = mn;
            ps[warp][lane][j] = pj;
        }
        __syncwarp();
        for (int t0 = 0; t0 < cn; t0 += 8) {
            uint2 vv[8];
#pragma unroll
            for (int t = 0; t < 8; ++t)
                vv[t] = t0 + t < cn
                            ? *reinterpret_cast<const uint2*>(vc + (size_t)(p0 + t0 + t) * HD + lane * 4)
                            : make_uint2(0, 0);
#pragma unroll
            for (int t = 0; t < 8; ++t) {
                const float v0 = bf_lo(vv[t].x), v1 = bf_hi(vv[t].x);
                const float v2 = bf_lo(vv[t].y), v3 = bf_hi(vv[t].y);
                const float4 pa = *reinterpret_cast<const float4*>(&ps[warp][t0 + t][0]);
                const float4 pb = *reinterpret_cast<const float4*>(&ps[warp][t0 + t][4]);
                const float pw[G] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    acc[j][0] += pw[j] * v0;
                    acc[j][1] += pw[j] * v1;
                    acc[j][2] += pw[j] * v2;
                    acc[j][3] += pw[j] * v3;
                }
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int j = 0; j < G; ++j) {
        if (lane == 0) {
            wm[warp][j] = m[j];
            wl[warp][j] = l[j];
        }
        *reinterpret_cast<float4*>(&wo[warp][j][lane * 4]) =
            make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    }
    __syncthreads();
    const int d = threadIdx.x;
    for (int j = 0; j < g; ++j) {
        float M = NEG_BIG;
        for (int w = 0; w < 4; ++w) M = fmaxf(M, wm[w][j]);
        float L = 0.0f, o = 0.0f;
        for (int w = 0; w < 4; ++w) {
            const float f = exp2f(wm[w][j] - M);
            L += wl[w][j] * f;
            o += wo[w][j][d] * f;
        }
        const size_t rh = (size_t)row * nh + kvh * g + j;
        if (splits == 1) {
            out[rh * HD + d] = __float2bfloat16_rn(o / L);
        } else {
            const size_t idx = rh * splits + sp;
            part_o[idx * HD + d] = o;
            if (d == 0) {
                part_m[idx] = M;
                part_l[idx] = L;
            }
        }
    }
}

// Query vectors (rows × a kv head's query heads) of one block of attn_rows_mma: 4 warps
// of 16, the M of the m16n8k16 products.
#define MMA_Q 64
// Positions of one key/value chunk of attn_rows_mma.
#define MMA_CH 64

// The batched prefill's attention on tensor cores: attn_rows_tiled's tiles, arguments
// and outputs (partials included), but a tile holds up to MMA_Q query vectors (9 rows
// of a 7-head group) and the scores and the output are mma.sync products over chunks of
// MMA_CH positions, as flash_attn_impl does for one contiguous sequence. Query vector
// qi = (row qi / g, head qi % g of kv head blockIdx.x); each of the warp's 16 vectors
// masks the positions past its own row's. grid (nkv, tiles, splits), 128 threads.
extern "C" __global__ void __launch_bounds__(128) attn_rows_mma(
    const bf16* __restrict__ q, const int* __restrict__ rows,
    const unsigned long long* __restrict__ kv, const int* __restrict__ tiles, int layer,
    int layers, int nh, int nkv, float scale_log2, int splits, float* __restrict__ part_m,
    float* __restrict__ part_l, float* __restrict__ part_o, bf16* __restrict__ out) {
    constexpr int HD = 128, CH = MMA_CH, KPAD = HD + 8;
    constexpr int KCH = HD / 16, NT_O = HD / 8, NT_S = CH / 8, VEC = HD / 8;
    __shared__ __align__(16) bf16 ks[CH * KPAD];
    __shared__ __align__(16) bf16 vs[CH * KPAD];
    const int kvh = blockIdx.x, sp = blockIdx.z, g = nh / nkv;
    const int r0 = tiles[2 * blockIdx.y], nr = tiles[2 * blockIdx.y + 1];
    const int qn = nr * g;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gl = lane >> 2, tq = lane & 3;
    // this thread's two query vectors (fragment rows gl and gl + 8 of the warp's 16)
    const int qv[2] = {warp * 16 + gl, warp * 16 + gl + 8};
    int qpos[2];
    size_t qrh[2];  // row * nh + head of each
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const bool ok = qv[i] < qn;
        const int row = r0 + (ok ? qv[i] / g : 0);
        qpos[i] = ok ? rows[4 * row + 1] : -1;
        qrh[i] = (size_t)row * nh + kvh * g + (ok ? qv[i] % g : 0);
    }
    int len = 0;
    for (int r = 0; r < nr; ++r) len = max(len, rows[4 * (r0 + r) + 1] + 1);
    const int cap = rows[4 * r0 + 2];
    const unsigned long long* p = kv + 2 * ((size_t)r0 * layers + layer);
    const bf16* kc = reinterpret_cast<const bf16*>(p[0]) + (size_t)kvh * cap * HD;
    const bf16* vc = reinterpret_cast<const bf16*>(p[1]) + (size_t)kvh * cap * HD;

    uint32_t qa[KCH][4];
#pragma unroll
    for (int kk = 0; kk < KCH; ++kk) {
        const int c = kk * 16 + tq * 2;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = e & 1, cc = c + (e >> 1) * 8;
            qa[kk][e] = qpos[i] >= 0 ? *reinterpret_cast<const uint32_t*>(q + qrh[i] * HD + cc) : 0u;
        }
    }
    float o[NT_O][4];
#pragma unroll
    for (int d = 0; d < NT_O; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m[2] = {NEG_BIG, NEG_BIG}, l[2] = {0.0f, 0.0f};

    const int chunks = (len + CH - 1) / CH, per = (chunks + splits - 1) / splits;
    const int beg = min(len, sp * per * CH), end = min(len, beg + per * CH);
    for (int c0 = beg; c0 < end; c0 += CH) {
        __syncthreads();  // the last chunk's keys and values are used up
        for (int i = tid; i < CH * VEC; i += blockDim.x) {
            const int r = i / VEC, c = (i % VEC) * 8;
            uint4 kk = make_uint4(0, 0, 0, 0), vv = kk;
            if (c0 + r < end) {
                kk = *reinterpret_cast<const uint4*>(kc + (size_t)(c0 + r) * HD + c);
                vv = *reinterpret_cast<const uint4*>(vc + (size_t)(c0 + r) * HD + c);
            }
            *reinterpret_cast<uint4*>(&ks[r * KPAD + c]) = kk;
            *reinterpret_cast<uint4*>(&vs[r * KPAD + c]) = vv;
        }
        __syncthreads();
        float s[NT_S][4];
        mma_scores<HD, CH>(s, qa, ks, lane);
        // scale and mask (element e of s[j]: vector e < 2 ? 0 : 1, position
        // c0 + j * 8 + tq * 2 + (e & 1)), then each vector's max over the quad
        float mx[2] = {NEG_BIG, NEG_BIG};
#pragma unroll
        for (int j = 0; j < NT_S; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = c0 + j * 8 + tq * 2 + (e & 1), i = e >> 1;
                const bool ok = key < end && key <= qpos[i];
                s[j][e] = ok ? s[j][e] * scale_log2 : NEG_BIG;
                mx[i] = fmaxf(mx[i], s[j][e]);
            }
        }
        float alpha[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            const float mn = fmaxf(m[i], mx[i]);
            alpha[i] = exp2f(m[i] - mn);
            m[i] = mn;
        }
#pragma unroll
        for (int j = 0; j < NT_S; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                // explicit: a vector with no position yet in this split has max NEG_BIG
                const int i = e >> 1;
                s[j][e] = s[j][e] == NEG_BIG ? 0.0f : exp2f(s[j][e] - m[i]);
                sum[i] += s[j][e];
            }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) l[i] = l[i] * alpha[i] + sum[i];
        mma_rescale<HD>(o, alpha[0], alpha[1]);
        mma_pv<HD, CH>(o, s, vs, lane);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (qpos[i] < 0) continue;
        if (splits == 1) {
            const float inv = 1.0f / l[i];
#pragma unroll
            for (int d = 0; d < NT_O; ++d)
                *reinterpret_cast<uint32_t*>(out + qrh[i] * HD + d * 8 + tq * 2) =
                    pack_bf16x2(o[d][2 * i] * inv, o[d][2 * i + 1] * inv);
        } else {
            const size_t idx = qrh[i] * splits + sp;
#pragma unroll
            for (int d = 0; d < NT_O; ++d)
                *reinterpret_cast<float2*>(part_o + idx * HD + d * 8 + tq * 2) =
                    make_float2(o[d][2 * i], o[d][2 * i + 1]);
            if (tq == 0) {
                part_m[idx] = m[i];
                part_l[idx] = l[i];
            }
        }
    }
}

// Merges attn_rows_tiled's splits: grid (nh, rows), 128 threads; out [rows, nh * 128].
extern "C" __global__ void __launch_bounds__(128) attn_rows_tiled_combine(
    const float* __restrict__ part_m, const float* __restrict__ part_l,
    const float* __restrict__ part_o, int nh, int splits, bf16* __restrict__ out) {
    const size_t rh = (size_t)blockIdx.y * nh + blockIdx.x;
    const int d = threadIdx.x;
    float M = NEG_BIG;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, part_m[rh * splits + s]);
    float L = 0.0f, acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const size_t idx = rh * splits + s;
        const float f = exp2f(part_m[idx] - M);
        L += part_l[idx] * f;
        acc += part_o[idx * 128 + d] * f;
    }
    out[rh * 128 + d] = __float2bfloat16_rn(acc / L);
}

// act[b, j] = silu(gu[b, j]) * gu[b, I + j] from the fused gate/up projection (f32),
// rounded once, as the batch-1 GEMV's mode 2.
extern "C" __global__ void silu_gate_rows(const float* __restrict__ gu, int I, int B,
                                          bf16* __restrict__ act) {
    const long long n = (long long)B * I;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long b = idx / I, j = idx % I;
        const float g = gu[b * 2 * I + j], u = gu[b * 2 * I + I + j];
        act[idx] = __float2bfloat16_rn(g / (1.0f + __expf(-g)) * u);
    }
}

// LayerNorm of rows of `cols` (cols % 8 == 0, cols <= 2048): one warp per row, the row
// kept in registers, mean and variance in f32 (two passes over the registers), output
// rounded once. Optionally first forms the row as resid + (y + bias) (rounded like two
// separate adds) and stores it to x_out: the residual add and the next LayerNorm of an
// encoder block in one read of the row.
template <bool RESID>
__device__ void layernorm_row(const bf16* __restrict__ y, const bf16* __restrict__ bias,
                              const bf16* __restrict__ resid, bf16* __restrict__ x_out,
                              const bf16* __restrict__ gamma, const bf16* __restrict__ beta,
                              bf16* __restrict__ out, int rows, int cols, float eps) {
    constexpr int MAXV = 8;  // 16-byte vectors per lane: cols <= 32 * 8 * 8
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= rows) return;
    const int nvec = cols / 8;
    const size_t base = (size_t)warp * cols;
    float v[MAXV][8];
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < MAXV; ++j) {
        const int c = lane + 32 * j;
        if (c < nvec) {
            const uint4 a = *reinterpret_cast<const uint4*>(y + base + c * 8);
            const uint32_t* aw = reinterpret_cast<const uint32_t*>(&a);
            if (RESID) {
                const uint4 bb = *reinterpret_cast<const uint4*>(bias + c * 8);
                const uint4 rr = *reinterpret_cast<const uint4*>(resid + base + c * 8);
                const uint32_t* bw = reinterpret_cast<const uint32_t*>(&bb);
                const uint32_t* rw = reinterpret_cast<const uint32_t*>(&rr);
                uint4 o;
                uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float lo = __bfloat162float(__float2bfloat16_rn(bf_lo(aw[e]) + bf_lo(bw[e])));
                    const float hi = __bfloat162float(__float2bfloat16_rn(bf_hi(aw[e]) + bf_hi(bw[e])));
                    ow[e] = pack_bf16x2(bf_lo(rw[e]) + lo, bf_hi(rw[e]) + hi);
                    v[j][2 * e] = bf_lo(ow[e]);
                    v[j][2 * e + 1] = bf_hi(ow[e]);
                }
                *reinterpret_cast<uint4*>(x_out + base + c * 8) = o;
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    v[j][2 * e] = bf_lo(aw[e]);
                    v[j][2 * e + 1] = bf_hi(aw[e]);
                }
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) sum += v[j][e];
        }
    }
    const float mean = warp_sum(sum) / (float)cols;
    float sq = 0.0f;
#pragma unroll
    for (int j = 0; j < MAXV; ++j) {
        if (lane + 32 * j < nvec) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float d = v[j][e] - mean;
                sq = fmaf(d, d, sq);
            }
        }
    }
    const float rstd = rsqrtf(warp_sum(sq) / (float)cols + eps);
#pragma unroll
    for (int j = 0; j < MAXV; ++j) {
        const int c = lane + 32 * j;
        if (c < nvec) {
            const uint4 gg = *reinterpret_cast<const uint4*>(gamma + c * 8);
            const uint4 be = *reinterpret_cast<const uint4*>(beta + c * 8);
            const uint32_t* gw = reinterpret_cast<const uint32_t*>(&gg);
            const uint32_t* bw = reinterpret_cast<const uint32_t*>(&be);
            uint4 o;
            uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float lo = (v[j][2 * e] - mean) * rstd * bf_lo(gw[e]) + bf_lo(bw[e]);
                const float hi = (v[j][2 * e + 1] - mean) * rstd * bf_hi(gw[e]) + bf_hi(bw[e]);
                ow[e] = pack_bf16x2(lo, hi);
            }
            *reinterpret_cast<uint4*>(out + base + c * 8) = o;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) layernorm_bf16(
    const bf16* __restrict__ x, const bf16* __restrict__ gamma, const bf16* __restrict__ beta,
    bf16* __restrict__ out, int rows, int cols, float eps) {
    layernorm_row<false>(x, nullptr, nullptr, nullptr, gamma, beta, out, rows, cols, eps);
}

extern "C" __global__ void __launch_bounds__(256) bias_residual_layernorm_bf16(
    const bf16* __restrict__ y, const bf16* __restrict__ bias, const bf16* __restrict__ resid,
    bf16* __restrict__ x_out, const bf16* __restrict__ gamma, const bf16* __restrict__ beta,
    bf16* __restrict__ out, int rows, int cols, float eps) {
    layernorm_row<true>(y, bias, resid, x_out, gamma, beta, out, rows, cols, eps);
}

// =====================================================================================
// Whisper's batched decode step (rows of one stacked decode, each its own window)
// =====================================================================================
//
// Every row is an entry of a row table the host rewrites before each step, so one CUDA
// graph per batch-size bucket replays for any rows:
//   rows[8 b .. 8 b + 7] = {input token, its learned position, the index its key and
//                           value go to, the self-attention cache's head stride
//                           (positions), the cross-attention window's positions, 0, 0, 0}
//   ptrs[4 (b L + l) + {0, 1, 2, 3}] = row b, layer l: self-attention keys, values
//       ([heads, stride, 64] bf16, already offset to the row's first key), the window's
//       cross-attention keys, values ([heads, window, 64] bf16)
// (argmax_final writes the picked token to rows[8 b]).
#define W_ROW_INTS 8

// x[b] = token_embedding[token] + positions[position], rounded once; grid (ceil(D / 256), B).
extern "C" __global__ void whisper_embed_rows(const bf16* __restrict__ tok,
                                              const bf16* __restrict__ pos,
                                              const int* __restrict__ rows, int D,
                                              bf16* __restrict__ x) {
    const int b = blockIdx.y;
    const bf16* t = tok + (size_t)rows[W_ROW_INTS * b] * D;
    const bf16* p = pos + (size_t)rows[W_ROW_INTS * b + 1] * D;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < D; i += gridDim.x * blockDim.x)
        x[(size_t)b * D + i] = __float2bfloat16_rn(__bfloat162float(t[i]) + __bfloat162float(p[i]));
}

// The key and value of row b (from its fused projection qkv [B, 3 D], bias added) into
// its layer-`layer` cache at the row's index. grid (heads, B), 64 threads.
extern "C" __global__ void whisper_kv_append_rows(const bf16* __restrict__ qkv,
                                                  const int* __restrict__ rows,
                                                  const unsigned long long* __restrict__ ptrs,
                                                  int layer, int layers, int heads) {
    constexpr int HD = 64;
    const int b = blockIdx.y, h = blockIdx.x, i = threadIdx.x;
    const int D = heads * HD;
    const int idx = rows[W_ROW_INTS * b + 2], stride = rows[W_ROW_INTS * b + 3];
    const unsigned long long* p = ptrs + 4 * ((size_t)b * layers + layer);
    const bf16* src = qkv + (size_t)b * 3 * D + (size_t)h * HD + i;
    const size_t at = ((size_t)h * stride + idx) * HD + i;
    reinterpret_cast<bf16*>(p[0])[at] = src[D];
    reinterpret_cast<bf16*>(p[1])[at] = src[2 * D];
}

// Split-K attention of query head h of row b = blockIdx.z over the row's self-attention
// keys 0..index (cross == 0) or its window's keys (cross != 0); q rows are `q_stride`
// apart. Head dim 64: 4 warps, each lane holding 2 dims; partials [B, heads, DEC_SPLITS].
// grid (heads, DEC_SPLITS, B), 128 threads.
extern "C" __global__ void __launch_bounds__(128) whisper_attn_partial_rows(
    const bf16* __restrict__ q, int q_stride, const int* __restrict__ rows,
    const unsigned long long* __restrict__ ptrs, int layer, int layers, int cross, int heads,
    float scale_log2, float* __restrict__ part_m, float* __restrict__ part_l,
    float* __restrict__ part_o) {
    constexpr int HD = 64;
    const int b = blockIdx.z, h = blockIdx.x, sp = blockIdx.y;
    const int* r = rows + W_ROW_INTS * b;
    const int len = cross ? r[4] : r[2] + 1;
    const int stride = cross ? r[4] : r[3];
    const unsigned long long* p = ptrs + 4 * ((size_t)b * layers + layer) + (cross ? 2 : 0);
    const int chunk = (len + DEC_SPLITS - 1) / DEC_SPLITS;
    const int beg = sp * chunk, end = min(len, beg + chunk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint32_t qv =
        *reinterpret_cast<const uint32_t*>(q + (size_t)b * q_stride + (size_t)h * HD + lane * 2);
    const float q0 = bf_lo(qv) * scale_log2, q1 = bf_hi(qv) * scale_log2;
    float m = NEG_BIG, l = 0.0f, a0 = 0.0f, a1 = 0.0f;
    const bf16* kb = reinterpret_cast<const bf16*>(p[0]) + (size_t)h * stride * HD + lane * 2;
    const bf16* vb = reinterpret_cast<const bf16*>(p[1]) + (size_t)h * stride * HD + lane * 2;
    for (int j = beg + warp; j < end; j += 4) {
        const uint32_t kv = *reinterpret_cast<const uint32_t*>(kb + (size_t)j * HD);
        const uint32_t vv = *reinterpret_cast<const uint32_t*>(vb + (size_t)j * HD);
        const float s = warp_sum(q0 * bf_lo(kv) + q1 * bf_hi(kv));
        const float mn = fmaxf(m, s);
        const float alpha = exp2f(m - mn), pj = exp2f(s - mn);
        l = l * alpha + pj;
        a0 = a0 * alpha + pj * bf_lo(vv);
        a1 = a1 * alpha + pj * bf_hi(vv);
        m = mn;
    }
    __shared__ float sm[4], sl[4];
    __shared__ float so[4][HD];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
    so[warp][lane * 2] = a0;
    so[warp][lane * 2 + 1] = a1;
    __syncthreads();
    const int d = threadIdx.x;
    if (d >= HD) return;
    const float M = fmaxf(fmaxf(sm[0], sm[1]), fmaxf(sm[2], sm[3]));
    float acc = 0.0f, L = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        const float f = exp2f(sm[w] - M);
        acc += so[w][d] * f;
        L += sl[w] * f;
    }
    const size_t idx = ((size_t)b * heads + h) * DEC_SPLITS + sp;
    part_o[idx * HD + d] = acc;
    if (d == 0) {
        part_m[idx] = M;
        part_l[idx] = L;
    }
}

// Merges the splits: out [B, heads * 64] bf16. grid (heads, B), 64 threads.
extern "C" __global__ void __launch_bounds__(64) whisper_attn_combine_rows(
    const float* __restrict__ part_m, const float* __restrict__ part_l,
    const float* __restrict__ part_o, int heads, bf16* __restrict__ out) {
    constexpr int HD = 64;
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const size_t base = ((size_t)b * heads + h) * DEC_SPLITS;
    float M = NEG_BIG;
    for (int s = 0; s < DEC_SPLITS; ++s) M = fmaxf(M, part_m[base + s]);
    float L = 0.0f, acc = 0.0f;
    for (int s = 0; s < DEC_SPLITS; ++s) {
        const float f = exp2f(part_m[base + s] - M);
        L += part_l[base + s] * f;
        acc += part_o[(base + s) * HD + d] * f;
    }
    out[((size_t)b * heads + h) * HD + d] = __float2bfloat16_rn(acc / L);
}

// logits[b, i] += bias[i] (f32, rows of V): the logit rules' suppression row.
extern "C" __global__ void add_row_bias_f32(float* __restrict__ logits,
                                            const float* __restrict__ bias, long long n, int V) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        logits[i] += bias[i % V];
}

// =====================================================================================
// Whisper encoder: one batch's keys and values spliced for attention
// =====================================================================================
//
// Row r = blockIdx.z / 2 of a batch attends to its head's c keys (audio encoded
// earlier), its own n new keys (from the block's fused projection qkv [R, t, 3 D]),
// then its padding-only window's keys from c + n to T. Writes out [R, H, T, hd] for the
// keys (blockIdx.z even) and the values (odd), 16-byte vectors; hd % 8 == 0.
//   table[8 r ..] = {head keys, head values, window keys, window values (pointers, each
//                    [H, ·, hd] with the given head stride), c, n, head stride, window
//                    stride (elements between heads)}
// grid (ceil(T hd / 8 / 256), H, 2 R), 256 threads.
extern "C" __global__ void splice_rows_kv(const long long* __restrict__ table,
                                          const bf16* __restrict__ qkv, int t, int H, int T,
                                          int hd, bf16* __restrict__ out_k,
                                          bf16* __restrict__ out_v) {
    const int r = blockIdx.z >> 1, which = blockIdx.z & 1, h = blockIdx.y;
    const long long* row = table + 8 * (size_t)r;
    const int c = (int)row[4], n = (int)row[5];
    const long long head_hs = row[6], whole_hs = row[7];
    const int vecs = hd / 8, D = H * hd;
    const bf16* head = reinterpret_cast<const bf16*>(row[which]) + (size_t)h * head_hs;
    const bf16* whole = reinterpret_cast<const bf16*>(row[2 + which]) + (size_t)h * whole_hs;
    const bf16* own = qkv + (size_t)r * t * 3 * D + (size_t)(1 + which) * D + (size_t)h * hd;
    bf16* out = (which ? out_v : out_k) + ((size_t)r * H + h) * T * hd;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < T * vecs; i += gridDim.x * blockDim.x) {
        const int j = i / vecs, e = (i % vecs) * 8;
        const bf16* src = j < c ? head + (size_t)j * hd + e
                        : j < c + n ? own + (size_t)(j - c) * 3 * D + e
                                    : whole + (size_t)j * hd + e;
        *reinterpret_cast<uint4*>(out + (size_t)j * hd + e) = *reinterpret_cast<const uint4*>(src);
    }
}

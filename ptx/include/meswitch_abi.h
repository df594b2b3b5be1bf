/*
 * meswitch_abi.h: the contract between the CUDA kernels (the .cu files in ptx/kernels),
 * the launch code in meswitch-ops, and Rust (bindgen output in ptx/src/abi.rs).
 *
 * Plain C, no C++: it is included by NVRTC (device code), by the host C++ test
 * shim (ptx/host/unpack_host.cpp) and parsed by bindgen. Every kernel takes ONE
 * parameter: its param struct, by value. Device addresses are uint64_t so the
 * struct layout is the same on every side (no pointer-width or address-space
 * questions); the kernel casts them to typed pointers.
 *
 * The packed delta layout is defined in reference/src/layout.rs; the constants
 * below restate the parts a kernel relies on, and ptx/tests/abi.rs asserts that
 * they agree with it.
 */
#ifndef MESWITCH_ABI_H
#define MESWITCH_ABI_H

#ifdef __CUDACC_RTC__
/* NVRTC has no libc headers; the fixed-width types are all we need. */
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

/* ---- packed delta layout (mirror of reference/src/layout.rs) ------------- */

/* Bits per code of the quantized part. A 32-bit word holds 32/bits codes, low
 * bits first: column c of a row is at word c*bits/32, bit (c*bits) % 32. */
#define MESWITCH_BITS_1 1u
#define MESWITCH_BITS_2 2u
#define MESWITCH_BITS_4 4u
#define MESWITCH_WORD_BITS 32u

/* Group sizes (input columns sharing one FP16 scale and offset). */
#define MESWITCH_GROUP_32 32u
#define MESWITCH_GROUP_64 64u
#define MESWITCH_GROUP_128 128u
/* Kernel-variant tag for "one group per row" (layout group_size == in_features).
 * Never a real group size: it only selects the kernel and means n_groups = 1. */
#define MESWITCH_GROUP_ROW 0u

/* Row marker in row_expert[]: this batch row uses the base weight only. */
#define MESWITCH_NO_EXPERT 0xFFFFFFFFu

/* Largest decode batch a GEMV launch accepts (8 mma n-tiles of 8 rows). */
#define MESWITCH_MAX_BATCH 64u

/* ---- GEMV tiling ---------------------------------------------------------- */

/* Output rows per thread block: the M of one mma.m16n8k16 tile. */
#define MESWITCH_GEMV_ROWS_PER_BLOCK 16u
/* Batch rows per mma tile (the N of m16n8k16). */
#define MESWITCH_GEMV_BATCH_TILE 8u
/* Warps per block; they split the input dimension of the block's 16 rows
 * (intra-block split-K, reduced through shared memory in a fixed order).
 * A 4096-row matrix gives only 256 blocks (two per SM on an H100), so the
 * warps that hide memory latency have to come from inside the block: 8 warps
 * with at most 128 registers each let two blocks share an SM. */
#define MESWITCH_GEMV_WARPS 8u
#define MESWITCH_GEMV_THREADS (MESWITCH_GEMV_WARPS * 32u)
/* Input columns one warp consumes per step: 4 lanes per row x 32 columns each,
 * so every lane reads whole 16-byte vectors of base, x and codes, and a lane's
 * 32 columns lie in one group for every group size. GEMV kernels require
 * in_features % MESWITCH_GEMV_K_CHUNK == 0 (true of every Llama/Qwen/Mistral
 * hidden and intermediate size); the launcher must check it. */
#define MESWITCH_GEMV_K_CHUNK 128u
/* Grid of a GEMV launch: x = ceil(out_features / MESWITCH_GEMV_ROWS_PER_BLOCK),
 * y = z = 1, block = MESWITCH_GEMV_THREADS, no dynamic shared memory. */
/* Each GEMV variant exists for 1, 2, 4 and 8 mma n-tiles (entry suffix _t1,
 * _t2, _t4, _t8): the accumulators of unused tiles would otherwise cost
 * registers, and registers bound how many warps an SM holds. A launch of
 * batch B uses the smallest variant with TILES x 8 >= B. */
#define MESWITCH_GEMV_MAX_TILES (MESWITCH_MAX_BATCH / MESWITCH_GEMV_BATCH_TILE)
/* Wide GEMV variant (kernels/gemv_wide.cuh, modules *_gemv_wide): a delta item
 * is MESWITCH_WIDE_LANE_CODE_BYTES of codes per lane and row for each of the
 * MESWITCH_WIDE_LANES_PER_ROW lanes of a row, i.e. 128/256/512 input columns
 * for 4/2/1 bits; it requires in_features % (512 / bits) == 0. Same launch
 * shape and parameters as the 128-column kernels. */
#define MESWITCH_WIDE_LANE_CODE_BYTES 16u
#define MESWITCH_WIDE_LANES_PER_ROW 4u

/* ---- dequantize tiling ---------------------------------------------------- */

/* One block per output row; threads stride over its columns. Any in_features. */
#define MESWITCH_DEQUANT_THREADS 256u

/* ---- parameter structs ---------------------------------------------------- */

/* One expert's packed delta for one weight matrix, all in device memory.
 * Shapes as in layout.rs, with salient_index widened to u32 on the device. */
typedef struct MeswitchExpertDelta {
    uint64_t codes;          /* const uint32_t [out][words_per_row]          */
    uint64_t scales;         /* const __half   [out][n_groups]               */
    uint64_t offsets;        /* const __half   [out][n_groups]               */
    uint64_t salient_index;  /* const uint32_t [n_salient], sorted, < in     */
    uint64_t salient_values; /* const __half   [out][n_salient]              */
    uint32_t n_salient;
    uint32_t reserved;       /* zero; keeps the struct 8-byte aligned         */
} MeswitchExpertDelta;

/* multi_expert_gemv and delta_gemv:
 *   multi_expert_gemv  y[b,:]  = x[b,:]·W_baseᵀ + x[b,:]·Δ̂_{e(b)}ᵀ   (writes every row b)
 *   delta_gemv         y[b,:] += x[b,:]·Δ̂_{e(b)}ᵀ   (rows with MESWITCH_NO_EXPERT untouched;
 *                                                  base is ignored and may be 0)
 * FP32 accumulation, result rounded to FP16 once. All experts of one launch
 * share the kernel's bits and group variant; the launcher splits otherwise.
 * row_expert[b] >= n_experts (other than NO_EXPERT) is treated as NO_EXPERT
 * by the kernel (the launcher rejects it before launching). */
typedef struct MeswitchGemvParams {
    uint64_t base;         /* const __half [out][in], 16-byte aligned          */
    uint64_t experts;      /* const MeswitchExpertDelta [n_experts]           */
    uint64_t row_expert;   /* const uint32_t [batch]                          */
    uint64_t x;            /* const __half [batch][in], 16-byte aligned        */
    uint64_t y;            /* __half [batch][out]                             */
    uint32_t out_features;
    uint32_t in_features;  /* multiple of MESWITCH_GEMV_K_CHUNK               */
    uint32_t batch;        /* 1 ..= MESWITCH_MAX_BATCH                        */
    uint32_t n_experts;
} MeswitchGemvParams;

/* dequantize: out = Δ̂ (base == 0) or W_base + Δ̂, dense FP16 [out][in].
 * Bit-identical to meswitch_reference::dequantize_f16 (same f32 operations in
 * the same order, no FMA contraction, one rounding to FP16). */
typedef struct MeswitchDequantParams {
    MeswitchExpertDelta delta;
    uint64_t base;         /* const __half [out][in], or 0                    */
    uint64_t out;          /* __half [out][in]                                */
    uint32_t out_features;
    uint32_t in_features;
    uint32_t group_size;   /* the layout's group_size (in_features for ROW)   */
    uint32_t reserved;
} MeswitchDequantParams;

/* ---- transformer layer kernels (norm.cu, rope.cu, activation.cu, attention.cu)
 * FP16 storage, f32 math. Every kernel reads and writes only the rows/elements
 * its params name; the launcher checks lengths before launching. */

/* Threads of a row-wise layer kernel (rms_norm, rope, embed, kv_append): one
 * block per row, threads stride over the row's columns. */
#define MESWITCH_ROW_THREADS 256u
/* Elementwise kernels (swiglu, add_residual): threads per block; the grid is
 * ceil(n / MESWITCH_ELEMENTWISE_THREADS) blocks, capped at
 * MESWITCH_ELEMENTWISE_MAX_BLOCKS (the kernels loop over the rest). */
#define MESWITCH_ELEMENTWISE_THREADS 256u
#define MESWITCH_ELEMENTWISE_MAX_BLOCKS 65535u
/* Attention: one block per (query head, row), grid = (n_heads, rows). Its
 * MESWITCH_ATTN_WARPS warps take the row's key positions round-robin, each
 * keeping an online-softmax state, merged through shared memory at the end. */
#define MESWITCH_ATTN_WARPS 4u
#define MESWITCH_ATTN_THREADS (MESWITCH_ATTN_WARPS * 32u)
/* Largest head_dim the attention kernel holds in registers (each lane holds
 * head_dim / 64 half2 pairs of q and of the accumulator). head_dim must be even. */
#define MESWITCH_ATTN_MAX_HEAD_DIM 256u
/* Grid y (rows of one launch) is limited by CUDA to 65535. */
#define MESWITCH_MAX_GRID_Y 65535u
/* sliding_window value for "no window". */
#define MESWITCH_NO_WINDOW 0u

/* rms_norm: y[r,:] = x[r,:] / sqrt(mean(x[r,:]^2) + eps) * weight, one block per row. */
typedef struct MeswitchRmsNormParams {
    uint64_t x;            /* const float  [rows][n]                          */
    uint64_t weight;       /* const float  [n]                                */
    uint64_t y;            /* __half       [rows][n]                          */
    uint32_t rows;
    uint32_t n;
    float eps;
    uint32_t reserved;
} MeswitchRmsNormParams;

/* rope: in place, HF rotate-half pairing (i, i + head_dim/2) in every head.
 * positions[r] >= max_positions: the row is set to NaN (never read out of the
 * tables); the launcher's callers validate positions on the host. */
typedef struct MeswitchRopeParams {
    uint64_t x;            /* __half [rows][n_heads * head_dim]               */
    uint64_t positions;    /* const uint32_t [rows]                           */
    uint64_t cos;          /* const float [max_positions][head_dim / 2]       */
    uint64_t sin;          /* const float [max_positions][head_dim / 2]       */
    uint32_t rows;
    uint32_t n_heads;
    uint32_t head_dim;     /* even                                            */
    uint32_t max_positions;
} MeswitchRopeParams;

/* swiglu: out[i] = silu(gate[i]) * up[i];  add_residual: h[i] += y[i]. */
typedef struct MeswitchElementwiseParams {
    uint64_t a;            /* swiglu: const __half gate[n]; add_residual: float h[n] */
    uint64_t b;            /* swiglu: const __half up[n];   add_residual: const __half y[n] */
    uint64_t out;          /* swiglu: __half out[n];        add_residual: unused (0) */
    uint32_t n;
    uint32_t reserved;
} MeswitchElementwiseParams;

/* embed: out[r,:] = float(table[tokens[r],:]); tokens[r] >= vocab: row set to NaN. */
typedef struct MeswitchEmbedParams {
    uint64_t table;        /* const __half [vocab][hidden]                    */
    uint64_t tokens;       /* const uint32_t [rows]                           */
    uint64_t out;          /* float [rows][hidden]                            */
    uint32_t rows;
    uint32_t hidden;
    uint32_t vocab;
    uint32_t reserved;
} MeswitchEmbedParams;

/* One query row of an attention step: where its sequence's cache lives and
 * which position the row is. A cache is [n_layers][2 (K, V)][capacity][kv_dim]
 * __half; row r's key at layer l, position p is at
 *   kv + ((l * 2 + 0) * capacity + p) * kv_dim   (value: + 1 instead of + 0). */
typedef struct MeswitchAttnRow {
    uint64_t kv;           /* __half cache of the row's sequence              */
    uint32_t capacity;     /* positions the cache holds; pos < capacity       */
    uint32_t pos;
} MeswitchAttnRow;

/* kv_append: writes k[r,:], v[r,:] at (layer, rows[r].pos) of rows[r]'s cache. */
typedef struct MeswitchKvAppendParams {
    uint64_t k;            /* const __half [n_rows][kv_dim]                   */
    uint64_t v;            /* const __half [n_rows][kv_dim]                   */
    uint64_t rows;         /* const MeswitchAttnRow [n_rows]                  */
    uint32_t n_rows;
    uint32_t kv_dim;
    uint32_t layer;
    uint32_t reserved;
} MeswitchKvAppendParams;

/* attention: out[r, h*d..(h+1)*d] = softmax(q_h · K[lo..=pos]^T / sqrt(d)) · V[lo..=pos],
 * K, V of KV head h / (n_heads / n_kv_heads) at `layer` of rows[r]'s cache,
 * lo = pos + 1 - sliding_window clamped at 0 (0 with MESWITCH_NO_WINDOW). */
typedef struct MeswitchAttentionParams {
    uint64_t q;            /* const __half [n_rows][n_heads * head_dim]       */
    uint64_t rows;         /* const MeswitchAttnRow [n_rows]                  */
    uint64_t out;          /* __half [n_rows][n_heads * head_dim]             */
    uint32_t n_rows;
    uint32_t n_heads;
    uint32_t n_kv_heads;   /* divides n_heads                                 */
    uint32_t head_dim;     /* even, <= MESWITCH_ATTN_MAX_HEAD_DIM             */
    uint32_t layer;
    uint32_t sliding_window; /* MESWITCH_NO_WINDOW or the window              */
    float scale;           /* 1 / sqrt(head_dim)                              */
    uint32_t reserved;
} MeswitchAttentionParams;

/* ---- kernel entry points ---------------------------------------------------
 * Module "multi_expert_gemv": meswitch_multi_expert_gemv_b{1,2,4}_g{32,64,128,row}
 * Module "delta_gemv":        meswitch_delta_gemv_b{1,2,4}_g{32,64,128,row}
 * Module "dequantize":        meswitch_dequantize_b{1,2,4}
 * Modules "multi_expert_gemv_wide", "delta_gemv_wide": as the two above with
 *                             "_wide" after "gemv" (wide delta items)
 * Module "norm":              meswitch_rms_norm
 * Module "rope":              meswitch_rope
 * Module "activation":        meswitch_swiglu, meswitch_add_residual, meswitch_embed
 * Module "attention":         meswitch_kv_append, meswitch_attention
 * (extern "C", so the names are unmangled.) The macros build a name from the
 * variant's tokens, e.g. MESWITCH_GEMV_NAME(4, 128) = "meswitch_multi_expert_gemv_b4_g128",
 * MESWITCH_DELTA_GEMV_NAME(2, row) = "meswitch_delta_gemv_b2_grow". */
#define MESWITCH_STR_(s) #s
#define MESWITCH_STR(s) MESWITCH_STR_(s)
#define MESWITCH_GEMV_NAME(bits, group) "meswitch_multi_expert_gemv_b" MESWITCH_STR(bits) "_g" MESWITCH_STR(group)
#define MESWITCH_DELTA_GEMV_NAME(bits, group) "meswitch_delta_gemv_b" MESWITCH_STR(bits) "_g" MESWITCH_STR(group)
#define MESWITCH_DEQUANT_NAME(bits) "meswitch_dequantize_b" MESWITCH_STR(bits)
#define MESWITCH_MODULE_MULTI_EXPERT_GEMV "multi_expert_gemv"
#define MESWITCH_MODULE_DELTA_GEMV "delta_gemv"
#define MESWITCH_MODULE_MULTI_EXPERT_GEMV_WIDE "multi_expert_gemv_wide"
#define MESWITCH_MODULE_DELTA_GEMV_WIDE "delta_gemv_wide"
#define MESWITCH_MODULE_DEQUANTIZE "dequantize"
#define MESWITCH_MODULE_NORM "norm"
#define MESWITCH_MODULE_ROPE "rope"
#define MESWITCH_MODULE_ACTIVATION "activation"
#define MESWITCH_MODULE_ATTENTION "attention"
#define MESWITCH_GEMV_PREFIX "meswitch_multi_expert_gemv_"
#define MESWITCH_DELTA_GEMV_PREFIX "meswitch_delta_gemv_"
#define MESWITCH_DEQUANT_PREFIX "meswitch_dequantize_"

#endif /* MESWITCH_ABI_H */

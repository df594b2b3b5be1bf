// unpack_host.cpp: host C++ build of the kernels' shared helpers
// (kernels/delta_unpack.cuh, compiled without __CUDACC__) behind extern "C"
// functions, for the Rust tests in ptx/tests/ to compare with
// meswitch-reference. Built by ptx/build.rs with -ffp-contract=off.
//
// meswitch_host_gemv is a host emulation of gemv_core.cuh: the same lane
// geometry, code conversion, x re-pairing and fragment assembly, with the
// mma.m16n8k16 instruction replaced by an emulator that follows the PTX ISA
// fragment layout. It checks the part of the kernel most likely to be wrong
// (which column meets which weight inside the mma) without a GPU. It cannot
// check the instruction itself, the memory system, or the compiler.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "delta_unpack.cuh"
#include "gemv_wide_geometry.cuh"

namespace {

// IEEE binary16 <-> binary32, round to nearest even (what __float2half_rn does).
float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    float v;
    if (exp == 0) {
        v = ldexpf((float)man, -24);  // subnormal (or zero)
    } else if (exp == 31) {
        v = man ? NAN : INFINITY;
    } else {
        v = ldexpf((float)(man | 0x400), (int)exp - 25);
    }
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits |= sign;
    memcpy(&v, &bits, 4);
    return v;
}

uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    float a = fabsf(f);
    if (isnan(f)) return sign | 0x7E00;
    if (a >= 65520.0f) return sign | 0x7C00;  // rounds to infinity
    if (a < ldexpf(1.0f, -14)) {
        // Subnormal range: the value in units of 2^-24, rounded to nearest even.
        float units = a * 16777216.0f;  // exact: power-of-two scaling
        return sign | (uint16_t)nearbyintf(units);
    }
    int e;
    frexpf(a, &e);  // a = m·2^e, m in [0.5, 1)
    float scaled = ldexpf(a, 11 - e);  // 11 significant bits in [1024, 2048)
    uint32_t m = (uint32_t)nearbyintf(scaled);
    if (m == 2048) { m = 1024; e += 1; }
    uint32_t exp = (uint32_t)(e - 1 + 15);
    if (exp >= 31) return sign | 0x7C00;
    return sign | (uint16_t)((exp << 10) | (m & 0x3FF));
}

float lo_half(uint32_t r) { return half_to_float((uint16_t)(r & 0xFFFF)); }
float hi_half(uint32_t r) { return half_to_float((uint16_t)(r >> 16)); }

// mma.m16n8k16.row.col f32 += f16·f16 over a warp, fragment layout as in
// gemv_core.cuh (lane = 4g + t).
void mma_emulate(float c[32][4], const uint32_t a[32][4], const uint32_t b[32][2]) {
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        int g = lane / 4, t = lane % 4;
        A[g][2 * t] = lo_half(a[lane][0]);
        A[g][2 * t + 1] = hi_half(a[lane][0]);
        A[g + 8][2 * t] = lo_half(a[lane][1]);
        A[g + 8][2 * t + 1] = hi_half(a[lane][1]);
        A[g][2 * t + 8] = lo_half(a[lane][2]);
        A[g][2 * t + 9] = hi_half(a[lane][2]);
        A[g + 8][2 * t + 8] = lo_half(a[lane][3]);
        A[g + 8][2 * t + 9] = hi_half(a[lane][3]);
        B[2 * t][g] = lo_half(b[lane][0]);
        B[2 * t + 1][g] = hi_half(b[lane][0]);
        B[2 * t + 8][g] = lo_half(b[lane][1]);
        B[2 * t + 9][g] = hi_half(b[lane][1]);
    }
    for (int lane = 0; lane < 32; ++lane) {
        int g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; ++i) {
            int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
            double s = 0;
            for (int k = 0; k < 16; ++k) s += (double)A[row][k] * (double)B[k][col];
            c[lane][i] += (float)s;
        }
    }
}

// __hfma2(q, scale, offset) on each half: one rounding of the exact
// q·scale + offset (double holds the product of two halves exactly).
uint32_t dequant_q_half2(uint32_t q, uint16_t scale, uint16_t offset) {
    float s = half_to_float(scale), o = half_to_float(offset);
    uint16_t va = float_to_half((float)((double)lo_half(q) * s + o));
    uint16_t vb = float_to_half((float)((double)hi_half(q) * s + o));
    return (uint32_t)va | ((uint32_t)vb << 16);
}

// Twin of gemv_core.cuh's meswitch_dequant_pair: the unbias fma
// (1024 + 2^p·q)·2^-p + (-2^(10-p)) as an f32 fma rounded once to FP16 (the
// same value as the FP16 fma, because the exact result q is representable),
// then the dequantization fma.
uint32_t unbias_half2(uint32_t magic, uint32_t mul, uint32_t add) {
    uint16_t qa = float_to_half(fmaf(lo_half(magic), lo_half(mul), lo_half(add)));
    uint16_t qb = float_to_half(fmaf(hi_half(magic), hi_half(mul), hi_half(add)));
    return (uint32_t)qa | ((uint32_t)qb << 16);
}

uint32_t dequant_pair(uint32_t magic, uint32_t mul, uint32_t add, uint16_t scale, uint16_t offset) {
    return dequant_q_half2(unbias_half2(magic, mul, add), scale, offset);
}

// ---- the conversion before the shift-free one, kept to compare bit for bit ----
//
// Octet field f (8·bits bits, code j at bit j·bits), then v = f | f << (16 −
// 4·bits) puts c4 at bit 16, and pair j = lop3((v >> j·bits) & mask | 0x6400)
// = (1024 + c_j, 1024 + c_{j+4}); the wide items shifted each pair's word by
// j·bits the same way. Then hsub2(·, 1024) and hfma2(q, scale, offset).
namespace legacy {

uint32_t octet_field(const uint32_t* lane_words, uint32_t q, uint32_t bits) {
    uint32_t octets_per_word = MESWITCH_WORD_BITS / (8u * bits);  // 1, 2, 4
    uint32_t word = lane_words[q / octets_per_word];
    uint32_t shift = (q % octets_per_word) * 8u * bits;
    return bits == 4u ? word : (word >> shift) & ((1u << (8u * bits)) - 1u);
}

uint32_t octet_pair(uint32_t field, uint32_t j, uint32_t bits) {
    uint32_t v = bits == 4u ? field : field | (field << (16u - 4u * bits));
    uint32_t mask = ((1u << bits) - 1u) * 0x00010001u;
    return meswitch_and_or(v >> (j * bits), mask, MESWITCH_FP16_1024_X2);
}

uint32_t wide_pair(const uint32_t* words, uint32_t p, uint32_t bits) {
    const uint32_t d = meswitch_wide_pair_distance(bits);
    const uint32_t mask = ((1u << bits) - 1u) * 0x00010001u;
    return meswitch_and_or(words[p / d] >> ((p % d) * bits), mask, MESWITCH_FP16_1024_X2);
}

// hsub2(magic, 1024) (exact), then the dequantization fma.
uint32_t dequant(uint32_t magic, uint16_t scale, uint16_t offset) {
    uint16_t qa = float_to_half(lo_half(magic) - 1024.0f), qb = float_to_half(hi_half(magic) - 1024.0f);
    return dequant_q_half2((uint32_t)qa | ((uint32_t)qb << 16), scale, offset);
}

}  // namespace legacy

void load4(const uint16_t* p, uint32_t v[4]) { memcpy(v, p, 16); }

}  // namespace

namespace {

// The wide delta items of one warp (gemv_wide.cuh): items k = warp,
// warp + WARPS, ... of (active expert i, item c), lane geometry from
// gemv_wide_geometry.cuh, each 32-column sub-block converted and multiplied
// like a 128-column item. Adds into acc[n-tile][lane][4].
void host_wide_delta_items(const MeswitchExpertDelta* experts, const std::vector<uint32_t>& active,
                           const std::vector<unsigned long long>& rows, uint32_t warp, uint32_t r0,
                           uint32_t out, uint32_t in, uint32_t batch, uint32_t bits, uint32_t group,
                           const uint16_t* x, float (*acc)[32][4]) {
    const uint32_t n_tiles = (batch + 7) / 8, n_per = in / meswitch_wide_item_cols(bits);
    const uint32_t words_per_row = in * bits / 32, n_groups = group == MESWITCH_GROUP_ROW ? 1 : in / group;
    const uint32_t n_items = (uint32_t)active.size() * n_per, G = meswitch_wide_lane_groups(bits, group);
    // The kernel's item walk (no division), checked against k / n_per.
    uint32_t i = 0, c = 0;
    meswitch_item_advance(i, c, warp, n_per);
    for (uint32_t k = warp; k < n_items; k += MESWITCH_GEMV_WARPS, meswitch_item_advance(i, c, MESWITCH_GEMV_WARPS, n_per)) {
        if (i != k / n_per || c != k % n_per) abort();
        const MeswitchExpertDelta& d = experts[active[i]];
        const uint16_t* sc = (const uint16_t*)d.scales;
        const uint16_t* of = (const uint16_t*)d.offsets;
        const uint32_t* codes = (const uint32_t*)d.codes;
        for (uint32_t s = 0; s < meswitch_wide_subblocks(bits); ++s) {
            for (uint32_t m = 0; m < MESWITCH_WIDE_PAIRS / 2; ++m) {
                for (uint32_t nt = 0; nt < n_tiles; ++nt) {
                    if (((rows[i] >> (nt * 8)) & 0xFF) == 0) continue;
                    uint32_t a[2][32][4], bb[2][32][2];
                    for (uint32_t lane = 0; lane < 32; ++lane) {
                        uint32_t g = lane / 4, t = lane % 4, b = nt * 8 + g;
                        uint32_t r[2] = {r0 + g < out ? r0 + g : out - 1, r0 + g + 8 < out ? r0 + g + 8 : out - 1};
                        uint32_t word = meswitch_wide_lane_word(c, t), grp = meswitch_wide_lane_group0(c, t, bits, group);
                        uint32_t half[2][2];  // [row lo/hi][pair 2m, 2m+1]
                        for (int h = 0; h < 2; ++h) {
                            uint32_t w[4];
                            memcpy(w, codes + (size_t)r[h] * words_per_row + word, 16);
                            // The lane's G scale / offset halves of this row, one load each.
                            uint32_t sv[2] = {0, 0}, ov[2] = {0, 0};
                            memcpy(sv, sc + (size_t)r[h] * n_groups + grp, 2 * G);
                            memcpy(ov, of + (size_t)r[h] * n_groups + grp, 2 * G);
                            uint32_t j = meswitch_wide_local_group(s, bits, group);
                            for (uint32_t e = 0; e < 2; ++e) {
                                const uint32_t p = 2 * m + e;
                                half[h][e] = dequant_pair(meswitch_wide_pair_code(w + s * bits, p, bits),
                                                          meswitch_wide_unbias_mul(p, bits),
                                                          meswitch_wide_unbias_add(p, bits),
                                                          (uint16_t)meswitch_wide_param_bits(sv[0], sv[1], j),
                                                          (uint16_t)meswitch_wide_param_bits(ov[0], ov[1], j));
                            }
                        }
                        // The sub-block's 32 x values as 16 words (4 octets).
                        uint32_t col = meswitch_wide_lane_col0(c, t, bits) + s * MESWITCH_WIDE_SUBBLOCK_COLS;
                        uint32_t xw[16] = {0};
                        if ((rows[i] >> b) & 1ull) {
                            for (int o = 0; o < 4; ++o) load4(x + (size_t)b * in + col + 8 * o, xw + 4 * o);
                        }
                        uint32_t a0[4] = {half[0][0], half[1][0], half[0][1], half[1][1]};
                        memcpy(a[0][lane], a0, 16);
                        bb[0][lane][0] = meswitch_wide_pair_x(xw, 2 * m, bits);
                        bb[0][lane][1] = meswitch_wide_pair_x(xw, 2 * m + 1, bits);
                    }
                    mma_emulate(acc[nt], a[0], bb[0]);
                }
            }
        }
    }
}

}  // namespace

extern "C" {

uint32_t meswitch_host_unpack_code(const uint32_t* row_words, uint32_t col, uint32_t bits) {
    return meswitch_unpack_code(row_words, col, bits);
}

uint32_t meswitch_host_words_per_row(uint32_t in_features, uint32_t bits) {
    return meswitch_words_per_row(in_features, bits);
}

uint32_t meswitch_host_octet_field(const uint32_t* lane_words, uint32_t q, uint32_t bits) {
    return legacy::octet_field(lane_words, q, bits);
}

uint32_t meswitch_host_octet_spread(const uint32_t* lane_words, uint32_t q, uint32_t bits) {
    return meswitch_octet_spread(lane_words, q, bits);
}

// Pair j of a spread octet: magic half2, its mantissa position p, and the
// unbias fma's constants (mul, add).
void meswitch_host_octet_pair(uint32_t spread, uint32_t j, uint32_t bits, uint32_t out[4]) {
    out[0] = meswitch_octet_pair_magic(spread, j, bits);
    out[1] = meswitch_octet_pair_pos(j, bits);
    out[2] = meswitch_octet_unbias_mul(j, bits);
    out[3] = meswitch_octet_unbias_add(j, bits);
}

// The same for pair p of a wide sub-block's words.
void meswitch_host_wide_pair(const uint32_t* words, uint32_t p, uint32_t bits, uint32_t out[4]) {
    out[0] = meswitch_wide_pair_code(words, p, bits);
    out[1] = meswitch_wide_pair_pos(p, bits);
    out[2] = meswitch_wide_unbias_mul(p, bits);
    out[3] = meswitch_wide_unbias_add(p, bits);
}

// The 4 dequantized half2 of octet q (pairs j = 0..3), by the kernels' path
// (legacy = 0) or by the conversion before it (legacy = 1).
void meswitch_host_octet_dequant(const uint32_t* lane_words, uint32_t q, uint32_t bits, uint16_t scale,
                                 uint16_t offset, int use_legacy, uint32_t out[4]) {
    const uint32_t v = meswitch_octet_spread(lane_words, q, bits);
    for (uint32_t j = 0; j < 4; ++j) {
        out[j] = use_legacy ? legacy::dequant(legacy::octet_pair(legacy::octet_field(lane_words, q, bits), j, bits),
                                              scale, offset)
                            : dequant_pair(meswitch_octet_pair_magic(v, j, bits), meswitch_octet_unbias_mul(j, bits),
                                           meswitch_octet_unbias_add(j, bits), scale, offset);
    }
}

// The 16 dequantized half2 of a wide sub-block, either way.
void meswitch_host_wide_dequant(const uint32_t* words, uint32_t bits, uint16_t scale, uint16_t offset,
                                int use_legacy, uint32_t out[MESWITCH_WIDE_PAIRS]) {
    for (uint32_t p = 0; p < MESWITCH_WIDE_PAIRS; ++p) {
        out[p] = use_legacy ? legacy::dequant(legacy::wide_pair(words, p, bits), scale, offset)
                            : dequant_pair(meswitch_wide_pair_code(words, p, bits), meswitch_wide_unbias_mul(p, bits),
                                           meswitch_wide_unbias_add(p, bits), scale, offset);
    }
}

void meswitch_host_pair_x_octet(const uint32_t x[4], uint32_t out[4]) { meswitch_pair_x_octet(x, out); }

uint32_t meswitch_host_prmt(uint32_t a, uint32_t b, uint32_t sel) { return meswitch_prmt(a, b, sel); }

uint16_t meswitch_host_float_to_half(float f) { return float_to_half(f); }

// One row of Δ̂ in f32, as the dequantize kernel computes it (before the
// base add and the FP16 rounding): the same helpers, the same order.
void meswitch_host_dequantize_row(const MeswitchExpertDelta* d, uint32_t r, uint32_t in_features, uint32_t bits,
                                  uint32_t group_size, float* out) {
    const uint32_t n_groups = meswitch_n_groups(in_features, group_size);
    const uint32_t* words = (const uint32_t*)d->codes + (size_t)r * meswitch_words_per_row(in_features, bits);
    const uint16_t* scales = (const uint16_t*)d->scales;
    const uint16_t* offsets = (const uint16_t*)d->offsets;
    for (uint32_t c = 0; c < in_features; ++c) {
        size_t gi = (size_t)r * n_groups + c / group_size;
        out[c] = meswitch_dequant_f32(half_to_float(scales[gi]), half_to_float(offsets[gi]),
                                      meswitch_unpack_code(words, c, bits));
    }
    const uint32_t* sidx = (const uint32_t*)d->salient_index;
    const uint16_t* sval = (const uint16_t*)d->salient_values + (size_t)r * d->n_salient;
    for (uint32_t i = 0; i < d->n_salient; ++i) out[sidx[i]] += half_to_float(sval[i]);
}

// Host emulation of meswitch_gemv_core<bits, group, with_base, tiles, wide>
// over the whole grid; the addresses in *p are host pointers. With wide != 0
// the delta items follow gemv_wide.cuh's geometry (gemv_wide_geometry.cuh:
// lane columns, code words, grouped scale/offset loads, sub-blocks).
// Returns 0, or 1 when the shape is outside what the kernel accepts.
int meswitch_host_gemv_variant(const MeswitchGemvParams* p, uint32_t bits, uint32_t group, int with_base,
                               int wide) {
    const uint32_t out = p->out_features, in = p->in_features, batch = p->batch;
    if (in % MESWITCH_GEMV_K_CHUNK != 0 || batch == 0 || batch > MESWITCH_MAX_BATCH || out == 0) return 1;
    if (wide && !meswitch_wide_supports(in, bits)) return 1;
    const uint32_t* row_expert = (const uint32_t*)p->row_expert;
    const MeswitchExpertDelta* experts = (const MeswitchExpertDelta*)p->experts;
    const uint16_t* x = (const uint16_t*)p->x;
    const uint16_t* base = (const uint16_t*)p->base;
    uint16_t* y = (uint16_t*)p->y;

    // Active experts and their row masks (thread 0 of every block).
    std::vector<uint32_t> active;
    std::vector<unsigned long long> rows;
    for (uint32_t b = 0; b < batch; ++b) {
        uint32_t e = row_expert[b];
        if (e >= p->n_experts) continue;
        size_t i = 0;
        while (i < active.size() && active[i] != e) ++i;
        if (i == active.size()) { active.push_back(e); rows.push_back(0); }
        rows[i] |= 1ull << b;
    }
    const uint32_t n_tiles = (batch + 7) / 8, n_chunks = in / MESWITCH_GEMV_K_CHUNK;
    const uint32_t words_per_row = in * bits / 32, n_groups = group == MESWITCH_GROUP_ROW ? 1 : in / group;
    const uint32_t n_blocks = (out + MESWITCH_GEMV_ROWS_PER_BLOCK - 1) / MESWITCH_GEMV_ROWS_PER_BLOCK;

    // Per call, not static: the Rust tests call this from several threads.
    std::vector<float> part_store(MESWITCH_GEMV_WARPS * 16 * MESWITCH_MAX_BATCH);
    float (*s_part)[16][MESWITCH_MAX_BATCH] = (float (*)[16][MESWITCH_MAX_BATCH])part_store.data();
    for (uint32_t blk = 0; blk < n_blocks; ++blk) {
        const uint32_t r0 = blk * MESWITCH_GEMV_ROWS_PER_BLOCK;
        for (uint32_t warp = 0; warp < MESWITCH_GEMV_WARPS; ++warp) {
            float acc[8][32][4] = {};
            for (uint32_t chunk = warp; chunk < n_chunks; chunk += MESWITCH_GEMV_WARPS) {
                if (with_base) {
                    for (uint32_t q = 0; q < 4; ++q) {
                        for (uint32_t nt = 0; nt < n_tiles; ++nt) {
                            uint32_t a[2][32][4], bb[2][32][2];
                            for (uint32_t lane = 0; lane < 32; ++lane) {
                                uint32_t g = lane / 4, t = lane % 4;
                                uint32_t r_lo = r0 + g < out ? r0 + g : out - 1;
                                uint32_t r_hi = r0 + g + 8 < out ? r0 + g + 8 : out - 1;
                                uint32_t c = chunk * 128 + 32 * t + 8 * q, b = nt * 8 + g;
                                uint32_t lo[4], hi[4], xv[4] = {0, 0, 0, 0};
                                load4(base + (size_t)r_lo * in + c, lo);
                                load4(base + (size_t)r_hi * in + c, hi);
                                if (b < batch) load4(x + (size_t)b * in + c, xv);
                                uint32_t a0[4] = {lo[0], hi[0], lo[1], hi[1]}, a1[4] = {lo[2], hi[2], lo[3], hi[3]};
                                memcpy(a[0][lane], a0, 16); memcpy(a[1][lane], a1, 16);
                                bb[0][lane][0] = xv[0]; bb[0][lane][1] = xv[1];
                                bb[1][lane][0] = xv[2]; bb[1][lane][1] = xv[3];
                            }
                            mma_emulate(acc[nt], a[0], bb[0]);
                            mma_emulate(acc[nt], a[1], bb[1]);
                        }
                    }
                }
                for (size_t i = 0; i < active.size() && !wide; ++i) {
                    const MeswitchExpertDelta& d = experts[active[i]];
                    for (uint32_t q = 0; q < 4; ++q) {
                        for (uint32_t nt = 0; nt < n_tiles; ++nt) {
                            if (((rows[i] >> (nt * 8)) & 0xFF) == 0) continue;
                            uint32_t a[2][32][4], bb[2][32][2];
                            for (uint32_t lane = 0; lane < 32; ++lane) {
                                uint32_t g = lane / 4, t = lane % 4;
                                uint32_t r_lo = r0 + g < out ? r0 + g : out - 1;
                                uint32_t r_hi = r0 + g + 8 < out ? r0 + g + 8 : out - 1;
                                uint32_t col0 = chunk * 128 + 32 * t, c = col0 + 8 * q, b = nt * 8 + g;
                                uint32_t grp = meswitch_lane_group(chunk, t, group);
                                const uint16_t* sc = (const uint16_t*)d.scales;
                                const uint16_t* of = (const uint16_t*)d.offsets;
                                const uint32_t* codes = (const uint32_t*)d.codes;
                                uint32_t w_lo[4] = {0, 0, 0, 0}, w_hi[4] = {0, 0, 0, 0};
                                memcpy(w_lo, codes + (size_t)r_lo * words_per_row + col0 * bits / 32, 4 * bits);
                                memcpy(w_hi, codes + (size_t)r_hi * words_per_row + col0 * bits / 32, 4 * bits);
                                uint32_t a_lo[4], a_hi[4];
                                const uint32_t v_lo = meswitch_octet_spread(w_lo, q, bits);
                                const uint32_t v_hi = meswitch_octet_spread(w_hi, q, bits);
                                for (uint32_t j = 0; j < 4; ++j) {
                                    const uint32_t mul = meswitch_octet_unbias_mul(j, bits);
                                    const uint32_t add = meswitch_octet_unbias_add(j, bits);
                                    a_lo[j] = dequant_pair(meswitch_octet_pair_magic(v_lo, j, bits), mul, add,
                                                           sc[(size_t)r_lo * n_groups + grp],
                                                           of[(size_t)r_lo * n_groups + grp]);
                                    a_hi[j] = dequant_pair(meswitch_octet_pair_magic(v_hi, j, bits), mul, add,
                                                           sc[(size_t)r_hi * n_groups + grp],
                                                           of[(size_t)r_hi * n_groups + grp]);
                                }
                                uint32_t xv[4] = {0, 0, 0, 0}, xp[4];
                                if ((rows[i] >> b) & 1ull) load4(x + (size_t)b * in + c, xv);
                                meswitch_pair_x_octet(xv, xp);
                                uint32_t a0[4] = {a_lo[0], a_hi[0], a_lo[1], a_hi[1]};
                                uint32_t a1[4] = {a_lo[2], a_hi[2], a_lo[3], a_hi[3]};
                                memcpy(a[0][lane], a0, 16); memcpy(a[1][lane], a1, 16);
                                bb[0][lane][0] = xp[0]; bb[0][lane][1] = xp[1];
                                bb[1][lane][0] = xp[2]; bb[1][lane][1] = xp[3];
                            }
                            mma_emulate(acc[nt], a[0], bb[0]);
                            mma_emulate(acc[nt], a[1], bb[1]);
                        }
                    }
                }
            }
            if (wide) {
                host_wide_delta_items(experts, active, rows, warp, r0, out, in, batch, bits, group, x, acc);
            }
            for (uint32_t nt = 0; nt < n_tiles; ++nt) {
                for (uint32_t lane = 0; lane < 32; ++lane) {
                    uint32_t g = lane / 4, t = lane % 4, b = nt * 8 + 2 * t;
                    s_part[warp][g][b] = acc[nt][lane][0];
                    s_part[warp][g][b + 1] = acc[nt][lane][1];
                    s_part[warp][g + 8][b] = acc[nt][lane][2];
                    s_part[warp][g + 8][b + 1] = acc[nt][lane][3];
                }
            }
        }
        for (uint32_t idx = 0; idx < 16 * batch; ++idx) {
            uint32_t m = idx % 16, b = idx / 16, r = r0 + m;
            if (r >= out) continue;
            float sum = 0.f;
            for (uint32_t w = 0; w < MESWITCH_GEMV_WARPS; ++w) sum += s_part[w][m][b];
            uint32_t e = row_expert[b];
            bool has_expert = e < p->n_experts;
            if (has_expert) {
                const MeswitchExpertDelta& d = experts[e];
                const uint32_t* sidx = (const uint32_t*)d.salient_index;
                const uint16_t* sval = (const uint16_t*)d.salient_values + (size_t)r * d.n_salient;
                for (uint32_t i = 0; i < d.n_salient; ++i)
                    sum += half_to_float(sval[i]) * half_to_float(x[(size_t)b * in + sidx[i]]);
            }
            uint16_t* dst = y + (size_t)b * out + r;
            if (with_base) {
                *dst = float_to_half(sum);
            } else if (has_expert) {
                *dst = float_to_half(half_to_float(*dst) + sum);
            }
        }
    }
    return 0;
}

int meswitch_host_gemv(const MeswitchGemvParams* p, uint32_t bits, uint32_t group, int with_base) {
    return meswitch_host_gemv_variant(p, bits, group, with_base, 0);
}

}  // extern "C"

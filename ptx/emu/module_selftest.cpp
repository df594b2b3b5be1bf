// Kernels that exist only in the emulation, to test the emulation itself
// (tests/emu_runtime.rs): a known mma, a block-wide shuffle reduction, and
// the faults the runtime must report instead of hanging. Each takes
// MeswitchElementwiseParams (a, b: inputs, out: output, n: a count).
#include <cuda_fp16.h>

#include "meswitch_abi.h"
#include "plain_module.h"

#define MESWITCH_WARP 32u
#define MESWITCH_FULL_MASK 0xFFFFFFFFu

// One warp: lane l passes a[6·l .. 6·l+5] as (a0..a3, b0, b1) and
// accumulators out[4·l .. 4·l+3]; the results overwrite them.
extern "C" void meswitch_emu_selftest_mma(const MeswitchElementwiseParams p) {
    const uint32_t* in = reinterpret_cast<const uint32_t*>(p.a) + 6u * threadIdx.x;
    float* c = reinterpret_cast<float*>(p.out) + 4u * threadIdx.x;
    meswitch_emu::mma_16816(c, in[0], in[1], in[2], in[3], in[4], in[5]);
}

// Every thread's a[t] summed over its warp by a butterfly, then over the
// block through shared memory; thread 0 writes out[blockIdx.x].
extern "C" void meswitch_emu_selftest_block_sum(const MeswitchElementwiseParams p) {
    __shared__ float warp_sums[32];
    const float* a = reinterpret_cast<const float*>(p.a);
    float v = a[blockIdx.x * blockDim.x + threadIdx.x];
    for (uint32_t o = MESWITCH_WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(MESWITCH_FULL_MASK, v, o);
    if (threadIdx.x % MESWITCH_WARP == 0) warp_sums[threadIdx.x / MESWITCH_WARP] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (uint32_t w = 0; w < blockDim.x / MESWITCH_WARP; ++w) total += warp_sums[w];
        reinterpret_cast<float*>(p.out)[blockIdx.x] = total;
    }
}

// Half a warp waits at the block barrier, the other half at a shuffle that
// needs the whole warp: neither can complete, a deadlock. (Threads that
// return are not waited for at a barrier, as on the GPU.)
extern "C" void meswitch_emu_selftest_split_warp(const MeswitchElementwiseParams) {
    if (threadIdx.x % MESWITCH_WARP < MESWITCH_WARP / 2) {
        __syncthreads();
    } else {
        (void)__shfl_xor_sync(MESWITCH_FULL_MASK, 1.f, 1);
    }
}

// Lane 0 returns; the others shuffle with the full mask.
extern "C" void meswitch_emu_selftest_shuffle_without_lane(const MeswitchElementwiseParams) {
    if (threadIdx.x == 0) return;
    (void)__shfl_xor_sync(MESWITCH_FULL_MASK, 1.f, 1);
}

// A 16-byte load from a + n bytes: misaligned or outside unless the caller
// makes it valid.
extern "C" void meswitch_emu_selftest_load(const MeswitchElementwiseParams p) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p.a + p.n));
    reinterpret_cast<uint32_t*>(p.out)[0] = v.x;
}

MESWITCH_EMU_MODULE(selftest, MESWITCH_EMU_ENTRY(meswitch_emu_selftest_mma),
                    MESWITCH_EMU_ENTRY(meswitch_emu_selftest_block_sum),
                    MESWITCH_EMU_ENTRY(meswitch_emu_selftest_split_warp),
                    MESWITCH_EMU_ENTRY(meswitch_emu_selftest_shuffle_without_lane),
                    MESWITCH_EMU_ENTRY(meswitch_emu_selftest_load))

// The emulation's FP16 conversions, for tests against the `half` crate.
extern "C" uint16_t meswitch_emu_half_from_f64(double v) { return meswitch_emu::half_bits_from_double(v); }
extern "C" float meswitch_emu_half_to_f32(uint16_t h) { return meswitch_emu::half_bits_to_float(h); }

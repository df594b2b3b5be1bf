// simt.h: the SIMT runtime of the host emulation of the kernels (ptx/emu).
//
// Every CUDA thread of a block runs as a fiber on the launching host thread;
// the blocks of a grid run one after another, and so do launches from
// several host threads (shared memory is one static per kernel). A fiber runs until it
// reaches a synchronisation point and then yields to the block's scheduler:
//
//   __syncthreads()            block barrier: released when every thread of
//                              the block that has not returned is waiting
//   __shfl_xor_sync, mma.sync  warp collectives: the 32 lanes of a warp must
//                              all arrive at the same operation; the last one
//                              to arrive computes it for all 32
//
// What this checks that a rewrite of the kernel in C++ could not: the kernel
// source itself runs (its indexing, its item walks, its fragment assembly),
// with the launch geometry the Rust launcher uses. What it cannot check: the
// PTX the GPU runs (the inline-PTX spellings are replaced by their portable
// twins, tested bit-identical in ptx/tests/), timing, the memory model, and
// anything about races: fibers never interleave inside a statement.
//
// Errors a GPU would turn into a hang, a fault or garbage are reported by the
// launch instead: a barrier or warp collective that can never complete
// (divergent __syncthreads, a warp op with lanes that returned or that wait
// elsewhere), lanes of one warp at different collectives, a vector load that
// is misaligned or reads outside the buffers the caller declared.
#ifndef MESWITCH_EMU_SIMT_H
#define MESWITCH_EMU_SIMT_H

#include <stddef.h>
#include <stdint.h>

struct dim3 {
    uint32_t x, y, z;
};

// The current fiber's indices (set by the scheduler before it resumes a fiber).
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

void __syncthreads();

namespace meswitch_emu {

// Lane-exchange of 32-bit values across the warp: lane l gets the value of
// lane l ^ lane_mask. `mask` must be the full warp (all the kernels use).
uint32_t shfl_xor_bits(uint32_t mask, uint32_t bits, int lane_mask);

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 over the warp, with the
// PTX ISA fragment layout (g = lane / 4, t = lane % 4):
//   a[0] = A(g, 2t..2t+1)  a[1] = A(g+8, 2t..2t+1)  a[2] = A(g, 2t+8..+9)  a[3] = A(g+8, 2t+8..+9)
//   b[0] = B(2t..2t+1, g)  b[1] = B(2t+8..2t+9, g)
//   c[0..1] = C(g, 2t..2t+1)  c[2..3] = C(g+8, 2t..2t+1)
// each 32-bit register holding the lower k (or column) in its low 16 bits.
// D = A·B + C is formed in f64 per element and rounded to f32 once: the
// tensor core's own rounding (it truncates) differs, within the tolerance
// the tests state.
void mma_16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1);

// A vector or read-only-cache load of `bytes` bytes at p: checks the natural
// alignment the GPU requires and that [p, p + bytes) lies in a buffer the
// launch declared (or in a module's static data); a failure is recorded as
// the launch's error and the load returns zeros.
bool check_load(const void* p, size_t bytes);

// One kernel entry point of a module: its name, the size of its param
// struct, and a thunk that calls it with the params.
struct Entry {
    const char* name;
    size_t param_size;
    void (*invoke)(void* kernel, const void* params);
    void* kernel;
};

template <class P>
void invoke_as(void* kernel, const void* params) {
    reinterpret_cast<void (*)(P)>(kernel)(*static_cast<const P*>(params));
}

template <class P>
Entry entry_of(const char* name, void (*kernel)(P)) {
    return Entry{name, sizeof(P), &invoke_as<P>, reinterpret_cast<void*>(kernel)};
}

// Memory a module owns (its __device__ globals), readable by its kernels.
struct StaticData {
    const void* data;
    size_t bytes;
};

struct Module {
    const Entry* entries;
    size_t n_entries;
    StaticData statics;
};

}  // namespace meswitch_emu

// Each module translation unit defines one of these (module_*.cpp);
// selftest holds kernels that test the emulation itself.
#define MESWITCH_EMU_MODULES(X) \
    X(multi_expert_gemv)        \
    X(delta_gemv)               \
    X(multi_expert_gemv_wide)   \
    X(delta_gemv_wide)          \
    X(dequantize)               \
    X(norm)                     \
    X(rope)                     \
    X(activation)               \
    X(attention)                \
    X(selftest)

#define MESWITCH_EMU_DECLARE_MODULE(name) meswitch_emu::Module meswitch_emu_module_##name();
MESWITCH_EMU_MODULES(MESWITCH_EMU_DECLARE_MODULE)
#undef MESWITCH_EMU_DECLARE_MODULE

#endif  // MESWITCH_EMU_SIMT_H

// simt.cpp: the scheduler of the host emulation (design in simt.h) and its C
// entry point, meswitch_emu_launch, which ptx/src/emu.rs calls.
//
// One block at a time, on the launching thread:
//
//   scheduler ──switch──> fiber 0 ──(barrier / warp op / return)──> scheduler
//             ──switch──> fiber 1 ...                                 (sweep)
//
// The scheduler sweeps over the block's fibers and resumes each runnable one
// until it yields. A sweep that resumes nothing while some fiber has not
// returned is a deadlock: the kernel would hang on a GPU.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "half_bits.h"
#include "simt.h"

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

using meswitch_emu::Entry;
using meswitch_emu::Module;
using meswitch_emu::StaticData;

constexpr uint32_t WARP_LANES = 32;
constexpr uint32_t FULL_MASK = 0xFFFFFFFFu;
// The kernels' deepest frames hold a few KiB of register arrays; the margin
// is for the host compiler's spills and the runtime's own frames.
constexpr size_t FIBER_STACK_BYTES = 128 * 1024;
constexpr uint32_t MAX_BLOCK_THREADS = 1024;
// mma.m16n8k16 operand shapes.
constexpr int MMA_M = 16, MMA_N = 8, MMA_K = 16;

// ---- fiber contexts -------------------------------------------------------------
//
// On x86-64 a switch saves the callee-saved registers, MXCSR and the x87
// control word on the current stack and swaps stack pointers: no system
// call (glibc's swapcontext also saves the signal mask, one syscall per
// switch, and a warp collective costs 64 switches). Elsewhere, ucontext.
//
// A new fiber's stack is laid out as if the switch had saved it, with the
// return address pointing at the fiber's entry function:
//
//   top (16-aligned) | pad | entry | rbp rbx r12 r13 r14 r15 = 0 | mxcsr, fpu cw | <- sp
//
// so the first switch into it "returns" into the entry with the stack
// aligned as after a call. The entry never returns; it switches away.
#if defined(__x86_64__)
struct Context {
    void* sp;
};

extern "C" void meswitch_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl meswitch_emu_switch
    .type meswitch_emu_switch, @function
meswitch_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size meswitch_emu_switch, .-meswitch_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");

// Power-on values: all FP exceptions masked, round to nearest (MXCSR
// 0x1F80); x87 extended precision, exceptions masked (0x037F).
constexpr uint64_t INITIAL_MXCSR = 0x1F80, INITIAL_FPU_CW = 0x037F;
constexpr int SAVED_REGISTERS = 6;

void context_switch(Context& from, Context& to) { meswitch_emu_switch(&from.sp, to.sp); }

void context_start(Context& c, char* stack, size_t bytes, void (*entry)()) {
    uint64_t* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15});
    *--sp = 0;  // pad: the entry's return-address slot lands on a 16-byte boundary
    *--sp = reinterpret_cast<uint64_t>(entry);
    for (int i = 0; i < SAVED_REGISTERS; ++i) *--sp = 0;
    *--sp = (INITIAL_FPU_CW << 32) | INITIAL_MXCSR;
    c.sp = sp;
}
#else
#include <ucontext.h>

struct Context {
    ucontext_t uc;
};

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void context_start(Context& c, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;  // the entry never returns
    makecontext(&c.uc, entry, 0);
}
#endif

enum class State { Runnable, AtBarrier, AtWarp, Done };
enum class WarpOp { Shfl, Mma };

struct Fiber {
    Context ctx;
    State state;
};

// One warp's collective in progress: every lane's operands, then every
// lane's results (read by each lane when it resumes, before it can arrive at
// the next collective, so one buffer per direction suffices).
struct WarpSlot {
    WarpOp op;
    uint32_t arrived;
    int lane_mask;
    uint32_t in[WARP_LANES][6];
    float acc[WARP_LANES][4];
    uint32_t out_bits[WARP_LANES];
    float out[WARP_LANES][4];
};

// One launch (they run one at a time, on the launching thread).
struct Launch {
    const Entry* entry;
    const void* params;
    std::vector<std::pair<uintptr_t, size_t>> regions;  // buffers + module statics
    std::string error;                                  // the first, if any
};

struct Block {
    Launch* launch;
    uint32_t n_threads;
    std::vector<Fiber> fibers;
    std::vector<WarpSlot> warps;
    char* stacks;
    Context scheduler;
    uint32_t current;
    uint32_t at_barrier;
    uint32_t done;
    bool abort;
};

thread_local Block* t_block = nullptr;
thread_local Launch* t_launch = nullptr;

void record_error(const std::string& what) {
    Launch* l = t_launch;
    if (!l) return;
    if (l->error.empty()) {
        char where[160] = "";
        if (t_block) {
            snprintf(where, sizeof where, "block (%u, %u, %u) thread %u: ", blockIdx.x, blockIdx.y, blockIdx.z,
                     t_block->current);
        }
        l->error = std::string(where) + what;
    }
}

void yield_to_scheduler() {
    Block& b = *t_block;
    context_switch(b.fibers[b.current].ctx, b.scheduler);
}

// A protocol error: the fiber stops here for good and the block is abandoned.
[[noreturn]] void abort_block(const std::string& what) {
    record_error(what);
    t_block->abort = true;
    yield_to_scheduler();
    // The scheduler never resumes an aborted block's fibers.
    abort();
}

void release_barrier_if_complete(Block& b) {
    if (b.at_barrier == 0 || b.at_barrier != b.n_threads - b.done) return;
    for (Fiber& f : b.fibers) {
        if (f.state == State::AtBarrier) f.state = State::Runnable;
    }
    b.at_barrier = 0;
}

float lo_half(uint32_t r) { return meswitch_emu::half_bits_to_float((uint16_t)(r & 0xFFFFu)); }
float hi_half(uint32_t r) { return meswitch_emu::half_bits_to_float((uint16_t)(r >> 16)); }

void compute_mma(WarpSlot& s) {
    double A[MMA_M][MMA_K], B[MMA_K][MMA_N], C[MMA_M][MMA_N];
    for (uint32_t lane = 0; lane < WARP_LANES; ++lane) {
        const uint32_t g = lane / 4, t = lane % 4;
        const uint32_t* a = s.in[lane];
        A[g][2 * t] = lo_half(a[0]);
        A[g][2 * t + 1] = hi_half(a[0]);
        A[g + 8][2 * t] = lo_half(a[1]);
        A[g + 8][2 * t + 1] = hi_half(a[1]);
        A[g][2 * t + 8] = lo_half(a[2]);
        A[g][2 * t + 9] = hi_half(a[2]);
        A[g + 8][2 * t + 8] = lo_half(a[3]);
        A[g + 8][2 * t + 9] = hi_half(a[3]);
        B[2 * t][g] = lo_half(a[4]);
        B[2 * t + 1][g] = hi_half(a[4]);
        B[2 * t + 8][g] = lo_half(a[5]);
        B[2 * t + 9][g] = hi_half(a[5]);
        C[g][2 * t] = s.acc[lane][0];
        C[g][2 * t + 1] = s.acc[lane][1];
        C[g + 8][2 * t] = s.acc[lane][2];
        C[g + 8][2 * t + 1] = s.acc[lane][3];
    }
    double D[MMA_M][MMA_N];
    for (int m = 0; m < MMA_M; ++m) {
        for (int n = 0; n < MMA_N; ++n) {
            double sum = C[m][n];
            for (int k = 0; k < MMA_K; ++k) sum += A[m][k] * B[k][n];
            D[m][n] = sum;
        }
    }
    for (uint32_t lane = 0; lane < WARP_LANES; ++lane) {
        const uint32_t g = lane / 4, t = lane % 4;
        s.out[lane][0] = (float)D[g][2 * t];
        s.out[lane][1] = (float)D[g][2 * t + 1];
        s.out[lane][2] = (float)D[g + 8][2 * t];
        s.out[lane][3] = (float)D[g + 8][2 * t + 1];
    }
}

void compute_shfl(WarpSlot& s) {
    for (uint32_t lane = 0; lane < WARP_LANES; ++lane) {
        s.out_bits[lane] = s.in[lane ^ (uint32_t)s.lane_mask][0];
    }
}

// Arrives at a warp collective; returns once all 32 lanes have and the last
// one has computed it. Returns the slot (its out arrays hold the results).
WarpSlot& arrive(WarpOp op, uint32_t mask, int lane_mask, const uint32_t in[6], const float acc[4]) {
    Block& b = *t_block;
    const uint32_t tid = b.current, w = tid / WARP_LANES, lane = tid % WARP_LANES;
    if ((w + 1) * WARP_LANES > b.n_threads) abort_block("warp collective in a partial warp (block size not a multiple of 32)");
    if (mask != FULL_MASK) abort_block("warp collective with a partial lane mask (the emulation supports full warps only)");
    if (op == WarpOp::Shfl && (lane_mask < 0 || lane_mask >= (int)WARP_LANES)) abort_block("shuffle lane mask outside 0..31");
    WarpSlot& s = b.warps[w];
    for (uint32_t l = w * WARP_LANES; l < (w + 1) * WARP_LANES; ++l) {
        if (b.fibers[l].state == State::Done) abort_block("warp collective while a lane of the warp has returned");
    }
    if (s.arrived == 0) {
        s.op = op;
        s.lane_mask = lane_mask;
    } else if (s.op != op || s.lane_mask != lane_mask) {
        abort_block("lanes of one warp at different warp collectives (divergent shuffle or mma)");
    }
    memcpy(s.in[lane], in, sizeof s.in[lane]);
    if (acc) memcpy(s.acc[lane], acc, sizeof s.acc[lane]);
    b.fibers[tid].state = State::AtWarp;
    if (++s.arrived == WARP_LANES) {
        if (op == WarpOp::Mma) {
            compute_mma(s);
        } else {
            compute_shfl(s);
        }
        for (uint32_t l = w * WARP_LANES; l < (w + 1) * WARP_LANES; ++l) b.fibers[l].state = State::Runnable;
        s.arrived = 0;
    }
    yield_to_scheduler();
    return s;
}

void fiber_main() {
    Block& b = *t_block;
    b.launch->entry->invoke(b.launch->entry->kernel, b.launch->params);
    Block& after = *t_block;  // same block: fibers never migrate
    after.fibers[after.current].state = State::Done;
    ++after.done;
    // A warp collective cannot complete once a lane of its warp has returned.
    const uint32_t w = after.current / WARP_LANES;
    if (w < after.warps.size() && after.warps[w].arrived > 0) {
        record_error("a lane returned while others of its warp wait at a warp collective");
        after.abort = true;
    }
    release_barrier_if_complete(after);
}

// A fiber's first frame: runs the kernel, then leaves for good (a finished
// fiber is never resumed).
void fiber_entry() {
    fiber_main();
    yield_to_scheduler();
    abort();
}

std::string describe_deadlock(const Block& b) {
    uint32_t barrier = 0, warp = 0;
    for (const Fiber& f : b.fibers) {
        barrier += f.state == State::AtBarrier;
        warp += f.state == State::AtWarp;
    }
    char msg[200];
    snprintf(msg, sizeof msg,
             "deadlock: %u threads at __syncthreads, %u at a warp collective, %u returned, of %u "
             "(a barrier not reached by every thread, or a warp split between two collectives)",
             barrier, warp, b.done, b.n_threads);
    return msg;
}

void run_block(Block& b, dim3 block_index) {
    blockIdx = block_index;
    b.done = 0;
    b.at_barrier = 0;
    b.abort = false;
    for (WarpSlot& s : b.warps) s.arrived = 0;
    for (uint32_t i = 0; i < b.n_threads; ++i) {
        Fiber& f = b.fibers[i];
        context_start(f.ctx, b.stacks + (size_t)i * FIBER_STACK_BYTES, FIBER_STACK_BYTES, fiber_entry);
        f.state = State::Runnable;
    }
    while (b.done < b.n_threads && !b.abort) {
        bool resumed = false;
        for (uint32_t i = 0; i < b.n_threads && !b.abort; ++i) {
            if (b.fibers[i].state != State::Runnable) continue;
            b.current = i;
            threadIdx = dim3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
            context_switch(b.scheduler, b.fibers[i].ctx);
            resumed = true;
        }
        if (!resumed && b.done < b.n_threads && !b.abort) {
            record_error(describe_deadlock(b));
            b.abort = true;
        }
    }
}

// Runs every block of the grid in order, stopping at the first error.
void run_grid(Launch* launch, dim3 grid, dim3 block) {
    gridDim = grid;
    blockDim = block;
    Block b;
    b.launch = launch;
    b.n_threads = block.x * block.y * block.z;
    b.fibers.resize(b.n_threads);
    b.warps.resize((b.n_threads + WARP_LANES - 1) / WARP_LANES);
    // Not zeroed: a fiber's stack is written before it is read.
    const std::unique_ptr<char[]> stacks(new char[(size_t)b.n_threads * FIBER_STACK_BYTES]);
    b.stacks = stacks.get();
    t_block = &b;
    for (uint32_t z = 0; z < grid.z; ++z) {
        for (uint32_t y = 0; y < grid.y; ++y) {
            for (uint32_t x = 0; x < grid.x && launch->error.empty(); ++x) run_block(b, dim3{x, y, z});
        }
    }
    t_block = nullptr;
}

const std::unordered_map<std::string, std::pair<Entry, StaticData>>& registry() {
    static const auto* table = [] {
        auto* t = new std::unordered_map<std::string, std::pair<Entry, StaticData>>();
#define MESWITCH_EMU_ADD_MODULE(module)                                                      \
    {                                                                                      \
        const Module m = meswitch_emu_module_##module();                                     \
        for (size_t i = 0; i < m.n_entries; ++i) (*t)[m.entries[i].name] = {m.entries[i], m.statics}; \
    }
        MESWITCH_EMU_MODULES(MESWITCH_EMU_ADD_MODULE)
#undef MESWITCH_EMU_ADD_MODULE
        return t;
    }();
    return *table;
}

void copy_message(char* dst, size_t len, const std::string& msg) {
    if (!dst || len == 0) return;
    snprintf(dst, len, "%s", msg.c_str());
}

}  // namespace

void __syncthreads() {
    Block& b = *t_block;
    b.fibers[b.current].state = State::AtBarrier;
    ++b.at_barrier;
    release_barrier_if_complete(b);
    yield_to_scheduler();
}

namespace meswitch_emu {

uint32_t shfl_xor_bits(uint32_t mask, uint32_t bits, int lane_mask) {
    const uint32_t in[6] = {bits, 0, 0, 0, 0, 0};
    WarpSlot& s = arrive(WarpOp::Shfl, mask, lane_mask, in, nullptr);
    return s.out_bits[t_block->current % WARP_LANES];
}

void mma_16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    const uint32_t in[6] = {a0, a1, a2, a3, b0, b1};
    WarpSlot& s = arrive(WarpOp::Mma, FULL_MASK, 0, in, c);
    memcpy(c, s.out[t_block->current % WARP_LANES], 4 * sizeof(float));
}

bool check_load(const void* p, size_t bytes) {
    const uintptr_t a = (uintptr_t)p;
    if (a % bytes != 0) {
        char msg[120];
        snprintf(msg, sizeof msg, "misaligned %zu-byte load at %#lx", bytes, (unsigned long)a);
        record_error(msg);
        return false;
    }
    if (t_launch) {
        for (const auto& r : t_launch->regions) {
            if (a >= r.first && a + bytes <= r.first + r.second) return true;
        }
        char msg[120];
        snprintf(msg, sizeof msg, "%zu-byte load at %#lx outside every buffer of the launch", bytes, (unsigned long)a);
        record_error(msg);
        return false;
    }
    return true;
}

}  // namespace meswitch_emu

// 1 when the emulation has an entry point of that name.
extern "C" int meswitch_emu_has_entry(const char* entry) { return registry().count(entry) ? 1 : 0; }

// Runs kernel `entry` over grid x block with `params` (param_size bytes, which
// must be the entry's param struct size). `regions` holds n_regions (address,
// length) pairs: the buffers the params point into, which the checked loads
// may read. Returns 0 on success; else writes a message into err and returns
// 1 (unknown entry or bad arguments) or 2 (the kernel failed a check).
extern "C" int meswitch_emu_launch(const char* entry, const uint32_t grid[3], const uint32_t block[3],
                                   const void* params, size_t param_size, const uint64_t* regions,
                                   size_t n_regions, char* err, size_t err_len) {
    const auto& table = registry();
    const auto found = table.find(entry);
    if (found == table.end()) {
        copy_message(err, err_len, std::string("no emulated kernel named ") + entry);
        return 1;
    }
    const Entry& e = found->second.first;
    if (e.param_size != param_size) {
        copy_message(err, err_len, std::string("param struct size mismatch for ") + entry);
        return 1;
    }
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (threads == 0 || threads > MAX_BLOCK_THREADS || grid[0] == 0 || grid[1] == 0 || grid[2] == 0) {
        copy_message(err, err_len, "launch dimensions out of range");
        return 1;
    }
    Launch launch;
    launch.entry = &e;
    launch.params = params;
    for (size_t i = 0; i < n_regions; ++i) launch.regions.emplace_back((uintptr_t)regions[2 * i], (size_t)regions[2 * i + 1]);
    const StaticData& s = found->second.second;
    if (s.data) launch.regions.emplace_back((uintptr_t)s.data, s.bytes);

    const dim3 g{grid[0], grid[1], grid[2]}, bl{block[0], block[1], block[2]};
    // Shared memory is one static per kernel (cuda_fp16.h): one block at a
    // time in the process, whichever thread launches.
    static std::mutex one_launch_at_a_time;
    std::lock_guard<std::mutex> serial(one_launch_at_a_time);
    t_launch = &launch;
    run_grid(&launch, g, bl);
    t_launch = nullptr;
    if (!launch.error.empty()) {
        copy_message(err, err_len, launch.error);
        return 2;
    }
    return 0;
}

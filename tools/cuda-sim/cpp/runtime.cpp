// The CPU stand-in's thread-block runtime: fibers, barriers, warp collectives, fault capture.
// See include/mood_sim.h for the execution model. One call of mood_sim_run_block runs one block
// on the calling OS thread; the Rust side (src/launch.rs) spreads the blocks of a grid over
// threads. A fiber stack is a kStackSize-aligned region: page 0 holds the Fiber header, page 1
// is a guard page (stack overflow faults there), the rest is stack.
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <vector>

#include "kernel_table.h"
#include "mood_sim.h"

#if !defined(__x86_64__)
#error "the CPU stand-in's fiber switch is written for x86-64"
#endif

extern "C" {
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *from, and resumes the context whose stack pointer is `to`.
__attribute__((visibility("hidden"))) void mood_sim_swap(void** from, void* to);
__attribute__((visibility("hidden"))) void mood_sim_fiber_entry();
__attribute__((visibility("hidden"))) void mood_sim_fiber_main(mood_sim::Fiber* f);
}

asm(R"(
    .text
    .globl mood_sim_swap
    .hidden mood_sim_swap
    .type mood_sim_swap, @function
mood_sim_swap:
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
    .size mood_sim_swap, .-mood_sim_swap

    .globl mood_sim_fiber_entry
    .hidden mood_sim_fiber_entry
    .type mood_sim_fiber_entry, @function
mood_sim_fiber_entry:
    movq %r12, %rdi
    call mood_sim_fiber_main
    ud2
    .size mood_sim_fiber_entry, .-mood_sim_fiber_entry
)");

namespace mood_sim {
namespace {

enum State { kReady, kBarrier, kCollective, kDone };

struct WarpSlot {
    uint64_t values[32];
    unsigned arrived, mask, readers;
    int kind;
};

struct WarpState {
    WarpSlot slot[2];
    unsigned alive;
};

struct BlockRun : Block {
    const KernelEntry* kernel;
    void** args;
    std::vector<Fiber*> fibers;
    std::vector<WarpState> warps;
    void* sched_sp;
    char* err;
    size_t err_len;
    bool failed;
};

constexpr size_t kPage = 4096;
constexpr unsigned kMaxThreads = 1024;

// Fiber stacks of this OS thread, made on first use and kept for the thread's life.
struct Pool {
    std::vector<Fiber*> fibers;
    Fiber* get(size_t i) {
        while (fibers.size() <= i) {
            // One mapping per 64 stacks, over-allocated by one region to align to kStackSize.
            const size_t n = 64, bytes = (n + 1) * kStackSize;
            void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) return nullptr;
            uintptr_t base = ((uintptr_t)m + kStackSize - 1) & ~(kStackSize - 1);
            for (size_t j = 0; j < n; ++j) {
                char* region = (char*)(base + j * kStackSize);
                mprotect(region + kPage, kPage, PROT_NONE);
                fibers.push_back((Fiber*)region);
            }
        }
        return fibers[i];
    }
};

thread_local Pool t_pool;
thread_local unsigned long long t_block_serial = 0;
thread_local sigjmp_buf t_jump;
thread_local volatile sig_atomic_t t_in_kernel = 0;
thread_local void* volatile t_fault_addr = nullptr;
struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
    if (t_in_kernel) {
        t_in_kernel = 0;
        t_fault_addr = info->si_addr;
        siglongjmp(t_jump, 1);
    }
    // Not ours: put the previous handler back; the faulting instruction runs again and reaches it.
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
    (void)uctx;
}

void fail(BlockRun* b, const char* fmt, ...) {
    if (!b->failed) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(b->err, b->err_len, fmt, ap);
        va_end(ap);
        b->failed = true;
    }
}

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// The order of `n` items on one pass: forward, reverse or a seeded shuffle, by `kind`.
void order(std::vector<unsigned>& out, unsigned n, unsigned kind, uint64_t seed) {
    out.resize(n);
    for (unsigned i = 0; i < n; ++i) out[i] = kind == 1 ? n - 1 - i : i;
    if (kind == 2)
        for (unsigned i = n; i > 1; --i) std::swap(out[i - 1], out[splitmix(seed) % i]);
}

inline void yield(Fiber* f) { mood_sim_swap(&f->sp, static_cast<BlockRun*>(f->block)->sched_sp); }

inline void resume(BlockRun* b, Fiber* f) { mood_sim_swap(&b->sched_sp, f->sp); }

bool runnable(BlockRun* b, Fiber* f) {
    if (f->state == kReady) return true;
    if (f->state != kCollective) return false;
    const WarpSlot& s = b->warps[f->warp].slot[f->collectives & 1];
    return (s.arrived & s.mask) == s.mask;
}

void init_fiber(Fiber* f) {
    uint64_t* top = (uint64_t*)((char*)f + kStackSize);
    uint64_t* sp = top - 1;  // the return address slot: rsp ≡ 0 mod 16 after `ret` pops it
    *sp = (uint64_t)&mood_sim_fiber_entry;
    *--sp = 0;              // rbp
    *--sp = 0;              // rbx
    *--sp = (uint64_t)f;    // r12: the fiber, moved to rdi by the entry stub
    *--sp = 0;              // r13
    *--sp = 0;              // r14
    *--sp = 0;              // r15
    *--sp = 0x037f00001f80ull;  // MXCSR default (low half), x87 control word default (high half)
    f->sp = sp;
}

const char* collective_name(int kind) {
    return kind == kShfl ? "a shuffle" : kind == kVote ? "a vote" : "__syncwarp";
}

int run_fibers(BlockRun* b, uint64_t seed, uint64_t linear) {
    const unsigned n = (unsigned)b->fibers.size(), nw = (unsigned)b->warps.size();
    std::vector<unsigned> warp_order, lane_order;
    for (unsigned pass = 0;; ++pass) {
        uint64_t s = seed ^ (linear * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)pass << 32);
        const unsigned kind = (unsigned)((pass + linear + seed) % 3);
        order(warp_order, nw, kind, splitmix(s));
        for (unsigned w : warp_order) {
            const unsigned lanes = n - w * 32 < 32 ? n - w * 32 : 32;
            order(lane_order, lanes, kind, splitmix(s));
            for (bool progress = true; progress;) {
                progress = false;
                for (unsigned l : lane_order) {
                    Fiber* f = b->fibers[w * 32 + l];
                    if (!runnable(b, f)) continue;
                    f->state = kReady;
                    resume(b, f);
                    if (b->failed) return 2;
                    progress = true;
                }
            }
            for (unsigned l = 0; l < lanes; ++l) {
                Fiber* f = b->fibers[w * 32 + l];
                if (f->state == kCollective) {
                    const WarpSlot& sl = b->warps[w].slot[f->collectives & 1];
                    fail(b,
                         "kernel %s: block (%u,%u,%u) warp %u waits in %s (mask 0x%08x) for lanes "
                         "0x%08x that exited or wait at __syncthreads",
                         b->kernel->name, b->idx.x, b->idx.y, b->idx.z, w,
                         collective_name(sl.kind), sl.mask, sl.mask & ~sl.arrived);
                    return 2;
                }
            }
        }
        bool waiting = false;
        for (Fiber* f : b->fibers)
            if (f->state == kBarrier) {
                f->state = kReady;
                waiting = true;
            }
        if (!waiting) return 0;
    }
}

}  // namespace

void barrier() {
    Fiber* f = self();
    f->state = kBarrier;
    yield(f);
}

unsigned long long block_serial() { return t_block_serial; }

void kernel_error(const char* what) {
    Fiber* f = self();
    BlockRun* b = static_cast<BlockRun*>(f->block);
    fail(b, "kernel %s: block (%u,%u,%u) thread %u: %s", b->kernel->name, b->idx.x, b->idx.y,
         b->idx.z, f->linear, what);
    f->state = kDone;
    yield(f);
    __builtin_unreachable();
}

unsigned alive_lanes() {
    Fiber* f = self();
    return static_cast<BlockRun*>(f->block)->warps[f->warp].alive;
}

const uint64_t* exchange(unsigned mask, uint64_t value, int kind) {
    Fiber* f = self();
    BlockRun* b = static_cast<BlockRun*>(f->block);
    WarpSlot& s = b->warps[f->warp].slot[f->collectives & 1];
    const unsigned bit = 1u << f->lane;
    if (!(mask & bit)) {
        fail(b, "kernel %s: lane %u of warp %u calls %s with mask 0x%08x, which leaves it out",
             b->kernel->name, f->lane, f->warp, collective_name(kind), mask);
    } else if (s.arrived == 0) {
        s.kind = kind;
        s.mask = mask;
        s.readers = 0;
        memset(s.values, 0xff, sizeof s.values);  // lanes outside the mask read NaN bytes
    } else if (s.kind != kind || s.mask != mask) {
        fail(b, "kernel %s: lanes of warp %u meet different collectives (%s, mask 0x%08x vs %s, mask 0x%08x)",
             b->kernel->name, f->warp, collective_name(s.kind), s.mask, collective_name(kind), mask);
    }
    if (b->failed) {
        f->state = kDone;
        yield(f);
    }
    s.values[f->lane] = value;
    s.arrived |= bit;
    f->state = kCollective;
    yield(f);
    f->collectives++;
    if (++s.readers == (unsigned)__builtin_popcount(s.mask)) s.arrived = 0;
    return s.values;
}

}  // namespace mood_sim

using namespace mood_sim;

extern "C" void mood_sim_fiber_main(Fiber* f) {
    BlockRun* b = static_cast<BlockRun*>(f->block);
    b->kernel->call(b->args);
    f->state = kDone;
    b->warps[f->warp].alive &= ~(1u << f->lane);
    yield(f);
    __builtin_unreachable();
}

extern "C" void mood_sim_install_fault_handler() {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}

// Runs block `linear` (x fastest) of a launch. Returns 0, 1 for a memory fault (*fault = the
// address) or 2 for a kernel error described in err.
extern "C" int mood_sim_run_block(const KernelEntry* kernel, const unsigned grid[3],
                                  const unsigned block[3], unsigned dyn_smem, void** args,
                                  unsigned long long linear, unsigned long long seed,
                                  void** fault, char* err, size_t err_len) {
    BlockRun b;
    ++t_block_serial;
    b.grid = {grid[0], grid[1], grid[2]};
    b.dim = {block[0], block[1], block[2]};
    b.idx = {(unsigned)(linear % grid[0]), (unsigned)(linear / grid[0] % grid[1]),
             (unsigned)(linear / ((unsigned long long)grid[0] * grid[1]))};
    b.kernel = kernel;
    b.args = args;
    b.err = err;
    b.err_len = err_len;
    b.failed = false;
    const unsigned n = block[0] * block[1] * block[2];
    if (n == 0 || n > kMaxThreads) {
        snprintf(err, err_len, "kernel %s: %u threads per block", kernel->name, n);
        return 2;
    }
    b.fibers.resize(n);
    b.warps.assign((n + 31) / 32, WarpState{});
    for (unsigned i = 0; i < n; ++i) {
        Fiber* f = t_pool.get(i);
        if (!f) {
            snprintf(err, err_len, "kernel %s: out of memory for fiber stacks", kernel->name);
            return 2;
        }
        f->tid = {i % block[0], i / block[0] % block[1], i / (block[0] * block[1])};
        f->linear = i;
        f->lane = i % 32;
        f->warp = i / 32;
        f->block = &b;
        f->state = kReady;
        f->collectives = 0;
        init_fiber(f);
        b.warps[i / 32].alive |= 1u << (i % 32);
        b.fibers[i] = f;
    }
    if (kernel->dyn_smem && dyn_smem) memset(kernel->dyn_smem(), 0xff, dyn_smem);
    t_fault_addr = nullptr;
    if (sigsetjmp(t_jump, 0)) {
        *fault = t_fault_addr;
        snprintf(err, err_len, "kernel %s: block (%u,%u,%u) faulted at address %p", kernel->name,
                 b.idx.x, b.idx.y, b.idx.z, *fault);
        return 1;
    }
    t_in_kernel = 1;
    const int rc = run_fibers(&b, seed, linear);
    t_in_kernel = 0;
    return rc;
}

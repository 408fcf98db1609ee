// Fiber-based CUDA block emulator for the vpmoe kernel templates (no GPU needed).
// Every CUDA thread of a block is a ucontext fiber. Fibers run one at a time, each until it
// reaches a barrier: __syncthreads (all live threads of the block) or a warp collective
// (shuffle, ldmatrix, mma: the 32 lanes of the warp); threads that meet at barriers of different
// kinds or call sites are reported. Blocks run one after another in a random order (a GPU
// promises none: a split reduction's last block, `last_block`, must be any of them), and every
// block starts with its shared memory filled with 0xff bytes (NaN in f32 and bf16), so a read of
// shared memory the block never wrote shows. cp.async copies complete either at issue or only at
// the cp.async.wait_group that covers them, so a missing wait or a missing barrier shows up as
// wrong results. ldmatrix (.trans) and mma.sync m16n8k16 bf16 are emulated from the PTX ISA
// fragment layouts. Errors (barrier with exited threads, mismatched barriers, deadlock,
// misaligned cp.async/ldmatrix, copies outstanding at exit) are counted in g_errors.
//
// The schedule is drawn from VPMOE_EMU_SEED (default 12345) and shaped by VPMOE_EMU_MODE:
//   random    the next fiber and every copy's landing drawn at random (default);
//   late      every cp.async lands at its covering wait;    early  every copy lands at issue;
//   in-order  the lowest ready thread runs first (warp 0 reaches each barrier first);
//   reverse   the highest ready thread runs first.
//
// Built with -DEMU_TSAN (run.sh SAN=thread; the kernels themselves compiled with
// -fsanitize=thread, this file not, so its bookkeeping is invisible), every fiber is a
// ThreadSanitizer fiber and switches carry no synchronisation of their own: a barrier is a release
// by every arriving thread and an acquire by every leaving one, cp.async copies and ldmatrix reads
// are reported as the issuing thread's accesses. Blocks stay ordered (each ends with a release
// that the next block's start acquires), so what it finds are races between the threads of one
// block.
#include "cuda_bf16.h"
#include <ucontext.h>
#include <vector>
#include <functional>
#include <deque>
#include <memory>
#include <string>

#ifdef EMU_TSAN
extern "C" {
void* __tsan_get_current_fiber();
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_read_range(void* addr, unsigned long size);
void __tsan_write_range(void* addr, unsigned long size);
}
static const unsigned NO_SYNC = 1;  // __tsan_switch_to_fiber_no_sync
static void* g_sched_fiber;
// Barrier k releases into and acquires from object k % 2: a thread still leaving barrier k must
// not acquire what others released arriving at k + 1.
static char g_sync_start, g_sync_done, g_sync_block[2], g_sync_warp[32][2];
#define EMU_SWAPCONTEXT 1
#endif

dim3e threadIdx, blockIdx, blockDim, gridDim;
enum St { READY, WB, WW, DONE };
struct Copy { void* d; const void* s; int n; };
struct Site { int kind; const char* file; int line; };
struct Fiber {
    ucontext_t ctx; std::unique_ptr<char[]> stack; St st; bool started; void* jb[5]; Site at; unsigned nbar, nwarp;
    std::vector<Copy> cur; std::deque<std::vector<Copy>> groups;
#ifdef EMU_TSAN
    void* tsan = nullptr;
#endif
};
static const size_t STACK = 1 << 17;
static const unsigned MAX_THREADS = 1024;
// The fibers persist across launches (stacks are allocated once, never cleared). A deque:
// growing it never moves a fiber, whose ucontext_t points into itself.
static std::deque<Fiber> g_pool;
static unsigned g_cur;  // the running thread
static Fiber& fiber(unsigned i) { return g_pool[i]; }
static ucontext_t g_sched; static std::function<void()> g_body;
static std::vector<int> g_ready;  // fibers in state READY, in no particular order

// xorshift64*: the schedule only needs to be varied and reproducible, and mt19937 showed in profiles.
struct Rng { unsigned long long x; unsigned long long operator()() { x ^= x >> 12; x ^= x << 25; x ^= x >> 27; return x * 2685821657736338717ull; } };
enum Mode { RANDOM, LATE, EARLY, IN_ORDER, REVERSE };
static Mode g_mode = RANDOM;
static Rng g_rng{0};
static void configure() {
    if (g_rng.x) return;
    const char* s = getenv("VPMOE_EMU_SEED");
    unsigned long long seed = s && *s ? strtoull(s, nullptr, 10) : 12345;
    seed += 0x9e3779b97f4a7c15ull;  // SplitMix64 of the seed: small seeds still start far apart
    seed = (seed ^ (seed >> 30)) * 0xbf58476d1ce4e5b9ull; seed = (seed ^ (seed >> 27)) * 0x94d049bb133111ebull;
    g_rng.x = (seed ^ (seed >> 31)) | 1;
    const char* m = getenv("VPMOE_EMU_MODE");
    std::string mode = m ? m : "random";
    const char* names[] = {"random", "late", "early", "in-order", "reverse"};
    for (int i = 0; i < 5; ++i) if (mode == names[i]) { g_mode = (Mode)i; return; }
    fprintf(stderr, "vpmoe host emulator: VPMOE_EMU_MODE=%s is not one of random, late, early, in-order, reverse\n", mode.c_str());
    exit(2);
}

static unsigned long long g_slots[32][32];
int g_errors = 0;
#define EMU_FAIL(...) do { fprintf(stderr, "EMU ERROR: " __VA_ARGS__); fprintf(stderr, "\n"); g_errors++; } while (0)

// Switching: swapcontext saves and restores the signal mask with a system call on every switch,
// which dominated whole-plan runs; after a fiber's first entry (setcontext) switches are
// __builtin_setjmp/__builtin_longjmp (registers and stack pointer only). Under AddressSanitizer,
// which must see stack switches, and ThreadSanitizer every switch stays a swapcontext.
#ifdef __SANITIZE_ADDRESS__
#define EMU_SWAPCONTEXT 1
#endif
static void* g_sched_jb[5];
[[gnu::noinline]] static void jump_to(void** jb) { __builtin_longjmp(jb, 1); }
static void yield_as(St s, Site at) {
    Fiber& f = fiber(g_cur);
    f.st = s; f.at = at;
#ifdef EMU_TSAN
    void* sync = s == WB ? &g_sync_block[f.nbar++ % 2] : s == WW ? &g_sync_warp[g_cur / 32][f.nwarp++ % 2] : &g_sync_done;
    __tsan_release(sync);
    __tsan_switch_to_fiber(g_sched_fiber, NO_SYNC);
#endif
#ifdef EMU_SWAPCONTEXT
    swapcontext(&f.ctx, &g_sched);
#else
    if (__builtin_setjmp(f.jb) == 0) jump_to(g_sched_jb);
#endif
#ifdef EMU_TSAN
    __tsan_acquire(sync);  // past the barrier: what every thread did before it happened before
#endif
}
static void run_fiber(Fiber& f) {
#ifdef EMU_TSAN
    __tsan_switch_to_fiber(f.tsan, NO_SYNC);
#endif
#ifdef EMU_SWAPCONTEXT
    swapcontext(&g_sched, &f.ctx);
#else
    if (__builtin_setjmp(g_sched_jb) == 0) {
        if (!f.started) { f.started = true; setcontext(&f.ctx); }
        jump_to(f.jb);
    }
#endif
}
void emu_block_barrier(const char* file, int line) { yield_as(WB, Site{EMU_SYNCTHREADS, file, line}); }
void emu_warp_barrier(EmuSync kind, const char* file, int line) { yield_as(WW, Site{kind, file, line}); }
unsigned long long* emu_warp_slots() { return g_slots[g_cur / 32]; }
int emu_lane() { return g_cur % 32; }
static void fiber_main() {
#ifdef EMU_TSAN
    __tsan_acquire(&g_sync_start);  // the host's writes and the blocks before
#endif
    g_body();
    yield_as(DONE, Site{-1, "", 0});
}

static const char* kind_name(int k) { return k == EMU_SYNCTHREADS ? "__syncthreads" : k == EMU_SHFL ? "shfl" : k == EMU_LDMATRIX ? "ldmatrix" : "mma"; }
static bool same_site(const Site& a, const Site& b) { return a.kind == b.kind && a.line == b.line && !strcmp(a.file, b.file); }

static void do_copies(std::vector<Copy>& v) {
    for (auto& c : v) {
#ifdef EMU_TSAN
        if (c.n) __tsan_read_range((void*)c.s, 16);
        __tsan_write_range(c.d, 16);
#endif
        if (c.n) memcpy(c.d, c.s, 16); else memset(c.d, 0, 16);
    }
    v.clear();
}
void vp_emu_cp_async16(void* smem, const void* gmem, int n) {
    if ((unsigned long long)smem % 16 || (n && (unsigned long long)gmem % 16)) EMU_FAIL("cp.async misaligned");
    Fiber& f = fiber(g_cur);
    const bool now = g_mode == EARLY || (g_mode != LATE && (g_rng() & 1));
    if (now) { std::vector<Copy> v{Copy{smem, gmem, n}}; do_copies(v); }
    else f.cur.push_back(Copy{smem, gmem, n});
}
void vp_emu_cp_async_commit() { Fiber& f = fiber(g_cur); f.groups.push_back(std::move(f.cur)); f.cur.clear(); }
void vp_emu_cp_async_wait(int n) { Fiber& f = fiber(g_cur); while ((int)f.groups.size() > n) { do_copies(f.groups.front()); f.groups.pop_front(); } }

static const void* g_addr[32][32];
void vp_emu_ldmatrix_x4(unsigned (&r)[4], const void* smem, bool trans) {
    int w = g_cur / 32, l = g_cur % 32;
    if ((unsigned long long)smem % 16) EMU_FAIL("ldmatrix misaligned");
#ifdef EMU_TSAN
    __tsan_read_range((void*)smem, 16);  // the row this lane addresses
#endif
    g_addr[w][l] = smem;
    emu_warp_barrier(EMU_LDMATRIX, __FILE__, __LINE__);
    for (int i = 0; i < 4; ++i) {
        unsigned short e0, e1;
        if (!trans) {
            const unsigned short* row = (const unsigned short*)g_addr[w][8 * i + l / 4];
            e0 = row[2 * (l % 4)]; e1 = row[2 * (l % 4) + 1];
        } else {
            const unsigned short* r0 = (const unsigned short*)g_addr[w][8 * i + 2 * (l % 4)];
            const unsigned short* r1 = (const unsigned short*)g_addr[w][8 * i + 2 * (l % 4) + 1];
            e0 = r0[l / 4]; e1 = r1[l / 4];
        }
        r[i] = e0 | ((unsigned)e1 << 16);
    }
    emu_warp_barrier(EMU_LDMATRIX, __FILE__, __LINE__);
}
static unsigned g_a[32][32][4], g_b[32][32][2];
static float bfl(unsigned u, int hi) { return __uint_as_float(hi ? (u & 0xffff0000u) : (u << 16)); }
// Element (r, k) of the warp's 16x16 A and (k, n) of its 16x8 B, read from the lane and register
// that hold it in the PTX m16n8k16 fragment layout.
static float frag_a(int w, int r, int k) { return bfl(g_a[w][4 * (r % 8) + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k % 2); }
static float frag_b(int w, int k, int n) { return bfl(g_b[w][4 * n + (k % 8) / 2][k >= 8], k % 2); }
void vp_emu_mma16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    int w = g_cur / 32, l = g_cur % 32;
    for (int i = 0; i < 4; ++i) g_a[w][l][i] = a[i];
    g_b[w][l][0] = b[0]; g_b[w][l][1] = b[1];
    emu_warp_barrier(EMU_MMA, __FILE__, __LINE__);
    int g = l / 4, q = l % 4;
    int rr[4] = {g, g, g + 8, g + 8}, cc[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
    for (int i = 0; i < 4; ++i) { double s = d[i]; for (int k = 0; k < 16; ++k) s += (double)frag_a(w, rr[i], k) * frag_b(w, k, cc[i]); d[i] = (float)s; }
    emu_warp_barrier(EMU_MMA, __FILE__, __LINE__);
}


// The next fiber to run: at random, or the lowest / highest ready thread.
static size_t pick() {
    if (g_mode != IN_ORDER && g_mode != REVERSE) return g_rng() % g_ready.size();
    size_t k = 0;
    for (size_t j = 1; j < g_ready.size(); ++j)
        if (g_mode == IN_ORDER ? g_ready[j] < g_ready[k] : g_ready[j] > g_ready[k]) k = j;
    return k;
}

void emu_launch_blocks(char* shared_begin, char* shared_end, unsigned gx, unsigned gy, unsigned gz, unsigned nt,
                       std::function<void()> body) {
    configure();
    if (nt == 0 || nt > MAX_THREADS) { EMU_FAIL("a block of %u threads", nt); return; }
    gridDim = {gx, gy, gz}; blockDim = {nt, 1, 1};
    if (g_pool.size() < nt) g_pool.resize(nt);
    g_body = body;
#ifdef EMU_TSAN
    g_sched_fiber = __tsan_get_current_fiber();
#endif
    std::vector<unsigned long long> order((unsigned long long)gx * gy * gz);
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[g_rng() % i]);
    for (size_t n = 0; n < order.size(); ++n) {
        const unsigned long long b = order[n];
        const unsigned bx = b % gx, by = b / gx % gy, bz = b / gx / gy;
        if (shared_begin < shared_end) memset(shared_begin, 0xff, shared_end - shared_begin);
#ifdef EMU_TSAN
        __tsan_release(&g_sync_start);
#endif
        g_ready.clear();
        for (unsigned i = 0; i < nt; ++i) {
            Fiber& f = fiber(i);
            if (!f.stack) { f.stack.reset(new char[STACK]); getcontext(&f.ctx); }  // getcontext is a system call: once
#ifdef EMU_TSAN
            if (!f.tsan) f.tsan = __tsan_create_fiber(0);
#endif
            f.st = READY; f.started = false; f.nbar = f.nwarp = 0; f.cur.clear(); f.groups.clear();
            f.ctx.uc_stack.ss_sp = f.stack.get(); f.ctx.uc_stack.ss_size = STACK; f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_main, 0);
            g_ready.push_back(i);
        }
        for (;;) {
            if (g_ready.empty()) {
                bool released = false;
                for (unsigned w = 0; w * 32 < nt; ++w) {
                    int ww = 0, dn = 0;
                    for (int l = 0; l < 32; ++l) { St s = fiber(w * 32 + l).st; ww += s == WW; dn += s == DONE; }
                    if (ww == 32) {
                        const Site& a = fiber(w * 32).at;
                        for (int l = 1; l < 32; ++l) {
                            const Site& c = fiber(w * 32 + l).at;
                            if (!same_site(a, c)) {
                                EMU_FAIL("warp %u: lane 0 at %s (%s:%d) and lane %d at %s (%s:%d) meet (block %u,%u)", w, kind_name(a.kind),
                                         a.file, a.line, l, kind_name(c.kind), c.file, c.line, bx, by);
                                break;
                            }
                        }
                        for (int l = 0; l < 32; ++l) { fiber(w * 32 + l).st = READY; g_ready.push_back(w * 32 + l); }
                        released = true;
                    } else if (ww > 0) { EMU_FAIL("warp %u: %d lanes at a warp collective, %d exited (block %u,%u)", w, ww, dn, bx, by); }
                }
                if (released) continue;
                int wb = 0, dn = 0, first = -1;
                for (unsigned i = 0; i < nt; ++i) {
                    St s = fiber(i).st; wb += s == WB; dn += s == DONE;
                    if (s == WB && first < 0) first = i;
                }
                if ((unsigned)dn == nt) break;
                if (wb + dn == (int)nt) {
                    const Site& a = fiber(first).at;
                    if (dn) EMU_FAIL("__syncthreads (%s:%d) with %d exited threads (block %u,%u)", a.file, a.line, dn, bx, by);
                    for (unsigned i = 0; i < nt; ++i) {
                        const Site& c = fiber(i).at;
                        if (fiber(i).st == WB && !same_site(a, c)) {
                            EMU_FAIL("__syncthreads at %s:%d (thread %d) and %s:%d (thread %u) meet (block %u,%u)", a.file, a.line, first,
                                     c.file, c.line, i, bx, by);
                            break;
                        }
                    }
                    for (unsigned i = 0; i < nt; ++i) if (fiber(i).st == WB) { fiber(i).st = READY; g_ready.push_back(i); }
                    continue;
                }
                EMU_FAIL("deadlock block %u,%u", bx, by); exit(1);
            }
            size_t k = pick();
            int i = g_ready[k];
            g_cur = i; threadIdx = {(unsigned)i, 0, 0}; blockIdx = {bx, by, bz};
            run_fiber(fiber(i));
            // The fiber left READY (a barrier or its end): drop it from the ready list.
            g_ready[k] = g_ready.back(); g_ready.pop_back();
        }
        for (unsigned i = 0; i < nt; ++i) {
            bool any = !fiber(i).cur.empty();
            for (auto& gq : fiber(i).groups) any |= !gq.empty();
            if (any) EMU_FAIL("thread %u exited with cp.async copies outstanding", i);
        }
#ifdef EMU_TSAN
        __tsan_acquire(&g_sync_done);  // the next block and the host see this block's writes
#endif
    }
    g_body = nullptr;  // the body's code may be unloaded (a dlclosed module) before the next launch
}

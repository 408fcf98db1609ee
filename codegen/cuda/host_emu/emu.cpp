// Fiber-based CUDA block emulator for the vpmoe kernel templates (no GPU needed).
// Every CUDA thread of a block is a ucontext fiber. Fibers run one at a time, in a random order,
// each until it reaches a barrier: __syncthreads (all live threads of the block) or a warp
// collective (shuffle, ldmatrix, mma: the 32 lanes of the warp). Blocks run one after another,
// so `__shared__` can be a function-local static, in a random order (a GPU promises none: a
// split reduction's last block, `last_block`, must be any of them). cp.async copies complete either at issue or
// only at the cp.async.wait_group that covers them (chosen at random), so a missing wait or a
// missing barrier shows up as wrong results. ldmatrix (.trans) and mma.sync m16n8k16 bf16 are
// emulated from the PTX ISA fragment layouts. Errors (barrier with exited threads, deadlock,
// misaligned cp.async/ldmatrix, copies outstanding at exit) are counted in g_errors.
#include "cuda_bf16.h"
#include <ucontext.h>
#include <vector>
#include <functional>
#include <deque>
#include <memory>

dim3e threadIdx, blockIdx, blockDim, gridDim;
enum St { READY, WB, WW, DONE };
struct Copy { void* d; const void* s; int n; };
struct Fiber {
    ucontext_t ctx; std::unique_ptr<char[]> stack; St st; bool started; void* jb[5];
    std::vector<Copy> cur; std::deque<std::vector<Copy>> groups;
};
static const size_t STACK = 1 << 17;
// The fibers persist across launches (stacks are allocated once, never cleared). A deque: growing
// it never moves a fiber, whose ucontext_t points into itself.
static std::deque<Fiber> g_pool;
static int g_cur; static ucontext_t g_sched; static std::function<void()> g_body;
static std::vector<int> g_ready;  // fibers in state READY, in no particular order
// xorshift64*: the schedule only needs to be varied and reproducible, and mt19937 showed in profiles.
struct Rng { unsigned long long x; unsigned long long operator()() { x ^= x >> 12; x ^= x << 25; x ^= x >> 27; return x * 2685821657736338717ull; } };
static Rng g_rng{12345};
static unsigned long long g_slots[32][32];
int g_errors = 0;
#define EMU_FAIL(...) do { fprintf(stderr, "EMU ERROR: " __VA_ARGS__); fprintf(stderr, "\n"); g_errors++; } while (0)

// Switching: swapcontext saves and restores the signal mask with a system call on every switch,
// which dominated whole-plan runs; after a fiber's first entry (setcontext) switches are
// __builtin_setjmp/__builtin_longjmp (registers and stack pointer only). Under AddressSanitizer,
// which must see stack switches, every switch stays a swapcontext.
#ifdef __SANITIZE_ADDRESS__
#define EMU_SWAPCONTEXT 1
#endif
static void* g_sched_jb[5];
[[gnu::noinline]] static void jump_to(void** jb) { __builtin_longjmp(jb, 1); }
static void yield_as(St s) {
    Fiber& f = g_pool[g_cur];
    f.st = s;
#ifdef EMU_SWAPCONTEXT
    swapcontext(&f.ctx, &g_sched);
#else
    if (__builtin_setjmp(f.jb) == 0) jump_to(g_sched_jb);
#endif
}
static void run_fiber(Fiber& f) {
#ifdef EMU_SWAPCONTEXT
    swapcontext(&g_sched, &f.ctx);
#else
    if (__builtin_setjmp(g_sched_jb) == 0) {
        if (!f.started) { f.started = true; setcontext(&f.ctx); }
        jump_to(f.jb);
    }
#endif
}
void __syncthreads() { yield_as(WB); }
void emu_warp_barrier() { yield_as(WW); }
unsigned long long* emu_warp_slots() { return g_slots[g_cur / 32]; }
int emu_lane() { return g_cur % 32; }
static void fiber_main() { g_body(); yield_as(DONE); }

static void do_copies(std::vector<Copy>& v) { for (auto& c : v) { if (c.n) memcpy(c.d, c.s, 16); else memset(c.d, 0, 16); } v.clear(); }
void vp_emu_cp_async16(void* smem, const void* gmem, int n) {
    if ((unsigned long long)smem % 16 || (n && (unsigned long long)gmem % 16)) EMU_FAIL("cp.async misaligned");
    Fiber& f = g_pool[g_cur];
    if (g_rng() & 1) { Copy c{smem, gmem, n}; std::vector<Copy> v{c}; do_copies(v); }
    else f.cur.push_back(Copy{smem, gmem, n});
}
void vp_emu_cp_async_commit() { Fiber& f = g_pool[g_cur]; f.groups.push_back(std::move(f.cur)); f.cur.clear(); }
void vp_emu_cp_async_wait(int n) { Fiber& f = g_pool[g_cur]; while ((int)f.groups.size() > n) { do_copies(f.groups.front()); f.groups.pop_front(); } }

static const void* g_addr[32][32]; static bool g_trans_flag[32];
void vp_emu_ldmatrix_x4(unsigned (&r)[4], const void* smem, bool trans) {
    int w = g_cur / 32, l = g_cur % 32;
    if ((unsigned long long)smem % 16) EMU_FAIL("ldmatrix misaligned");
    g_addr[w][l] = smem;
    emu_warp_barrier();
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
    emu_warp_barrier();
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
    emu_warp_barrier();
    int g = l / 4, q = l % 4;
    int rr[4] = {g, g, g + 8, g + 8}, cc[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
    for (int i = 0; i < 4; ++i) { double s = d[i]; for (int k = 0; k < 16; ++k) s += (double)frag_a(w, rr[i], k) * frag_b(w, k, cc[i]); d[i] = (float)s; }
    emu_warp_barrier();
}

void emu_launch3(unsigned gx, unsigned gy, unsigned gz, unsigned nt, std::function<void()> body) {
    gridDim = {gx, gy, gz}; blockDim = {nt, 1, 1};
    if (g_pool.size() < nt) g_pool.resize(nt);
    std::deque<Fiber>& fs = g_pool;
    std::vector<unsigned long long> order((unsigned long long)gx * gy * gz);
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[g_rng() % i]);
    for (unsigned long long b : order) {
        const unsigned bx = b % gx, by = b / gx % gy, bz = b / gx / gy;
        g_body = body;
        g_ready.clear();
        for (unsigned i = 0; i < nt; ++i) {
            Fiber& f = fs[i];
            if (!f.stack) { f.stack.reset(new char[STACK]); getcontext(&f.ctx); }  // getcontext is a system call: once
            f.st = READY; f.started = false; f.cur.clear(); f.groups.clear();
            f.ctx.uc_stack.ss_sp = f.stack.get(); f.ctx.uc_stack.ss_size = STACK; f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_main, 0);
            g_ready.push_back(i);
        }
        for (;;) {
            if (g_ready.empty()) {
                bool released = false;
                for (unsigned w = 0; w * 32 < nt; ++w) {
                    int ww = 0, dn = 0;
                    for (int l = 0; l < 32; ++l) { St s = fs[w * 32 + l].st; ww += s == WW; dn += s == DONE; }
                    if (ww == 32) { for (int l = 0; l < 32; ++l) { fs[w * 32 + l].st = READY; g_ready.push_back(w * 32 + l); } released = true; }
                    else if (ww > 0) { EMU_FAIL("warp %u: %d lanes at a warp collective, %d exited (block %u,%u)", w, ww, dn, bx, by); }
                }
                if (released) continue;
                int wb = 0, dn = 0;
                for (unsigned i = 0; i < nt; ++i) { wb += fs[i].st == WB; dn += fs[i].st == DONE; }
                if ((unsigned)dn == nt) break;
                if (wb + dn == (int)nt) {
                    if (dn) EMU_FAIL("__syncthreads with %d exited threads (block %u,%u)", dn, bx, by);
                    for (unsigned i = 0; i < nt; ++i) if (fs[i].st == WB) { fs[i].st = READY; g_ready.push_back(i); }
                    continue;
                }
                EMU_FAIL("deadlock block %u,%u", bx, by); exit(1);
            }
            size_t k = g_rng() % g_ready.size();
            int i = g_ready[k];
            g_cur = i; threadIdx = {(unsigned)i, 0, 0}; blockIdx = {bx, by, bz};
            run_fiber(fs[i]);
            // The fiber left READY (a barrier or its end): drop it from the ready list.
            g_ready[k] = g_ready.back(); g_ready.pop_back();
        }
        for (unsigned i = 0; i < nt; ++i) if (!fs[i].cur.empty() || !fs[i].groups.empty()) {
            bool any = !fs[i].cur.empty(); for (auto& gq : fs[i].groups) any |= !gq.empty();
            if (any) EMU_FAIL("thread %u exited with cp.async copies outstanding", i);
        }
    }
    g_body = nullptr;  // the body's code may be unloaded (a dlclosed module) before the next launch
}
void emu_launch(unsigned gx, unsigned gy, unsigned nt, std::function<void()> body) { emu_launch3(gx, gy, 1, nt, body); }

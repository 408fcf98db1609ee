// Host stand-in for cuda_bf16.h and the CUDA built-ins the vpmoe templates use, so the very
// .cuh files NVRTC compiles can be run on a CPU by the fiber emulator (emu.cpp). Only what the
// templates touch is provided. Never given to NVRTC (it gets the real CUDA include directory).
#pragma once
#include <cmath>
#include <cstring>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <functional>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
// Shared memory is the statics of functions in namespace vp (every template's `__shared__`):
// host_emu/shared.ld gathers them into one range, [__vp_shared_begin, __vp_shared_end), which the
// emulator fills with 0xff bytes before every block, as a GPU promises nothing about its contents.
#define __shared__ static
extern "C" char __vp_shared_begin[] __attribute__((weak, visibility("hidden")));
extern "C" char __vp_shared_end[] __attribute__((weak, visibility("hidden")));
#define __align__(n) __attribute__((aligned(n)))

struct dim3e { unsigned x, y, z; };
extern dim3e threadIdx, blockIdx, blockDim, gridDim;

struct uint4 { unsigned x, y, z, w; };
struct int4 { int x, y, z, w; };
inline int __popc(unsigned u) { return __builtin_popcount(u); }
struct uint2 { unsigned x, y; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

struct __nv_bfloat16 { unsigned short x; };
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned)b.x << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) {
    unsigned u = __float_as_uint(f);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.x = 0x7fff; return r; }  // CUDA's canonical NaN, whatever the payload
    u += 0x7fffu + ((u >> 16) & 1u);
    r.x = (unsigned short)(u >> 16);
    return r;
}
// IEEE round-to-nearest arithmetic (x86-64 without -mfma never contracts these into FMAs).
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __double2float_rn(double a) { return (float)a; }
inline float __fmul_rn(float a, float b) { return a * b; }
using std::max; using std::min;
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

// Runs a grid: every block's threads as fibers (emu.cpp), with this module's shared memory.
void emu_launch_blocks(char* shared_begin, char* shared_end, unsigned gx, unsigned gy, unsigned gz, unsigned nt,
                       std::function<void()> body);
inline void emu_launch3(unsigned gx, unsigned gy, unsigned gz, unsigned nt, std::function<void()> body) {
    emu_launch_blocks(__vp_shared_begin, __vp_shared_end, gx, gy, gz, nt, std::move(body));
}
inline void emu_launch(unsigned gx, unsigned gy, unsigned nt, std::function<void()> body) { emu_launch3(gx, gy, 1, nt, std::move(body)); }

// Barriers and warp collectives carry their kind and call site, so threads meeting at different
// ones are reported.
enum EmuSync { EMU_SYNCTHREADS, EMU_SHFL, EMU_LDMATRIX, EMU_MMA };
void emu_block_barrier(const char* file, int line);
void emu_warp_barrier(EmuSync kind, const char* file, int line);
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) { emu_block_barrier(file, line); }
// Fibers never preempt each other, so a read-modify-write is atomic and every store is visible
// to the next fiber. The atomic builtin tells ThreadSanitizer so (acquire-release, which also
// stands for the __threadfence that precedes a ticket on the GPU).
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
inline void __threadfence() {}
inline float __ldcg(const float* p) { return *p; }
inline int __ldcg(const int* p) { return *p; }
inline double __ldcg(const double* p) { return *p; }
[[noreturn]] inline void __trap() { fprintf(stderr, "__trap\n"); abort(); }
// warp exchange
extern unsigned long long* emu_warp_slots();  // 32 slots of the current warp
int emu_lane();
template <typename T> inline T emu_shfl_generic(T v, int src, const char* file, int line) {
    static_assert(sizeof(T) <= 8, "shfl size");
    unsigned long long* s = emu_warp_slots();
    unsigned long long b = 0; memcpy(&b, &v, sizeof(T));
    s[emu_lane()] = b;
    emu_warp_barrier(EMU_SHFL, file, line);
    unsigned long long r = s[src];
    emu_warp_barrier(EMU_SHFL, file, line);
    T out; memcpy(&out, &r, sizeof(T));
    return out;
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int o, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu_shfl_generic(v, emu_lane() ^ o, file, line);
}
template <typename T> inline T __shfl_sync(unsigned, T v, int l, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu_shfl_generic(v, l, file, line);
}
template <typename T> inline T __shfl_up_sync(unsigned, T v, int o, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    int l = emu_lane();
    return emu_shfl_generic(v, l >= o ? l - o : l, file, line);
}

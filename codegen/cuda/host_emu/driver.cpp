// A stand-in for libcuda.so.1 that runs the cuda backend on the CPU: the driver calls the runtime
// makes (through cudarc's dynamic loading) are answered by host memory and the fiber emulator,
// so the whole backend (binding, arenas, gradient sums, optimizer, graph capture and replay)
// runs its real plan on a machine without a GPU. Found first when its directory leads
// LD_LIBRARY_PATH (tests/cuda.rs `the_gpu_tests_pass_on_the_host_emulator`).
//
// It reports one device, "vpmoe host emulator", compute capability 9.0. A module image is not a
// cubin but a kernel's generated source ("VPMOE-EMU\n" + shim + `emu_launcher`); it is compiled
// by g++ against the emulator (host_emu/inc; emu.cpp built once as a shared library) into a shared object, cached under
// VPMOE_EMU_CACHE by a hash of the source and every template, and its `vp_emu_launch` runs
// launches. Everything is synchronous and in issue order; a capturing stream records launches
// (arguments copied) and a graph launch replays them. New allocations are filled with 0xff
// (NaN in f32 and bf16), so a read before any write shows.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <chrono>
#include <functional>
#include <mutex>
#include <string>
#include <vector>
#include <dirent.h>
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>
#include "inc/cuda_bf16.h"

typedef int CUresult;
enum { OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3, INVALID_IMAGE = 200, NOT_FOUND = 500, LAUNCH_FAILED = 719 };
typedef unsigned long long CUdeviceptr;
typedef int (*Launch)(unsigned, unsigned, unsigned, unsigned, void**);

struct Module { void* so; Launch launch; int nargs; const unsigned long* argsize; std::string name; };
// A recorded launch: a kernel with its argument bytes, or (m == nullptr) a host-side library call.
struct Rec { Module* m; unsigned g[3], nt; std::vector<std::vector<char>> args; std::function<int()> host; };
struct Graph { std::vector<Rec> recs; };
struct Stream { Graph* capturing = nullptr; };
struct Event { double ms = 0; };

static const char* NAME = "vpmoe host emulator";
static const unsigned long long TOTAL = 80ull << 30;
static unsigned long long g_used = 0;
static int g_ctx_token = 1;
static void* g_current = nullptr;
static Stream g_legacy;
static std::string g_src, g_cache;
static unsigned long long g_templates = 0;
// One lock for every call: the emulator's fibers and the allocation table are process-wide, and
// test harnesses call from several threads.
static std::recursive_mutex g_lock;
#define LOCKED std::lock_guard<std::recursive_mutex> guard(g_lock)

static double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}
static unsigned long long fnv(const std::string& s, unsigned long long h = 1469598103934665603ull) {
    for (unsigned char c : s) { h ^= c; h *= 1099511628211ull; }
    return h;
}
static bool read_file(const std::string& p, std::string& out) {
    FILE* f = fopen(p.c_str(), "rb");
    if (!f) return false;
    char buf[65536]; size_t n; out.clear();
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
    fclose(f);
    return true;
}
// Every template the generated sources include, and the emulator itself, in name order.
static unsigned long long templates_digest(const std::string& src) {
    unsigned long long h = fnv("vpmoe-emu-1");
    for (const std::string& dir : {src, src + "/host_emu", src + "/host_emu/inc"}) {
        std::vector<std::string> names;
        if (DIR* d = opendir(dir.c_str())) {
            while (dirent* e = readdir(d)) if (e->d_name[0] != '.') names.push_back(e->d_name);
            closedir(d);
        }
        std::sort(names.begin(), names.end());
        for (auto& n : names) { std::string t; if (read_file(dir + "/" + n, t)) h = fnv(n + "\n" + t, h); }
    }
    return h;
}

extern "C" {
CUresult cuInit(unsigned) { LOCKED;
    const char* s = getenv("VPMOE_EMU_SRC");
    if (!s) { fprintf(stderr, "vpmoe host emulator: VPMOE_EMU_SRC (the codegen/cuda directory) is not set\n"); return NOT_INITIALIZED; }
    g_src = s;
    const char* c = getenv("VPMOE_EMU_CACHE");
    g_cache = c ? c : "/tmp/vpmoe-emu-cache";
    mkdir(g_cache.c_str(), 0755);
    g_templates = templates_digest(g_src);
    return OK;
}
CUresult cuDriverGetVersion(int* v) { LOCKED; *v = 13000; return OK; }
CUresult cuDeviceGetCount(int* n) { LOCKED; *n = 1; return OK; }
CUresult cuDeviceGet(int* d, int ordinal) { LOCKED; if (ordinal != 0) return INVALID_VALUE; *d = 0; return OK; }
CUresult cuDeviceGetName(char* name, int len, int) { LOCKED; snprintf(name, len, "%s", NAME); return OK; }
CUresult cuDeviceTotalMem_v2(size_t* b, int) { LOCKED; *b = TOTAL; return OK; }
CUresult cuDeviceGetAttribute(int* v, int attr, int) { LOCKED;
    *v = attr == 75 ? 9 : attr == 76 ? 0 : attr == 16 ? 132 : 0;  // CC major, minor, SM count
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { LOCKED; *ctx = &g_ctx_token; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { LOCKED; return OK; }
CUresult cuCtxGetCurrent(void** ctx) { LOCKED; *ctx = g_current; return OK; }
CUresult cuCtxSetCurrent(void* ctx) { LOCKED; g_current = ctx; return OK; }
CUresult cuCtxSynchronize() { LOCKED; return OK; }
CUresult cuMemGetInfo_v2(size_t* free_, size_t* total) { LOCKED; *total = TOTAL; *free_ = TOTAL - g_used; return OK; }

static std::vector<std::pair<void*, size_t>> g_allocs;
static CUresult alloc(void** p, size_t n) {
    if (g_used + n > TOTAL) return OUT_OF_MEMORY;
    *p = malloc(n);
    if (!*p) return OUT_OF_MEMORY;
    memset(*p, 0xff, n);
    g_used += n;
    g_allocs.push_back({*p, n});
    return OK;
}
static CUresult release(void* p) {
    for (size_t i = 0; i < g_allocs.size(); ++i)
        if (g_allocs[i].first == p) { g_used -= g_allocs[i].second; g_allocs.erase(g_allocs.begin() + i); free(p); return OK; }
    return INVALID_VALUE;
}
CUresult cuMemAlloc_v2(CUdeviceptr* d, size_t n) { LOCKED; void* p; CUresult r = alloc(&p, n); *d = (CUdeviceptr)p; return r; }
CUresult cuMemFree_v2(CUdeviceptr d) { LOCKED; return release((void*)d); }
CUresult cuMemHostAlloc(void** p, size_t n, unsigned) { LOCKED; return alloc(p, n); }
CUresult cuMemFreeHost(void* p) { LOCKED; return release(p); }
CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr* d, void* p, unsigned) { LOCKED; *d = (CUdeviceptr)p; return OK; }
CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) { LOCKED; memmove((void*)dst, (const void*)src, n); return OK; }
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) { LOCKED; memmove((void*)dst, src, n); return OK; }
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) { LOCKED; memmove(dst, (const void*)src, n); return OK; }
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { LOCKED; memset((void*)d, v, n); return OK; }
CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) { LOCKED; for (size_t i = 0; i < n; ++i) ((unsigned*)d)[i] = v; return OK; }

// The emulator itself, built once per template digest into the cache; every module links it.
static std::string emu_library() {
    char key[24];
    snprintf(key, sizeof key, "%016llx", g_templates);
    std::string so = g_cache + "/emu-" + key + ".so";
    if (access(so.c_str(), R_OK) != 0) {
        std::string tmp = so + "." + std::to_string(getpid()) + ".tmp";
        std::string cmd = "g++ -std=c++17 -O2 -w -shared -fPIC -I'" + g_src + "/host_emu/inc' -o '" + tmp + "' '" + g_src +
                          "/host_emu/emu.cpp' && mv '" + tmp + "' '" + so + "'";
        if (system(cmd.c_str()) != 0) return "";
    }
    return so;
}

// Compiling runs outside the lock, so loads issued from several threads compile in parallel.
CUresult cuModuleLoadData(void** mod, const void* image) {
    const char* text = (const char*)image;
    static const char MAGIC[] = "VPMOE-EMU\n";
    if (strncmp(text, MAGIC, sizeof MAGIC - 1)) {
        fprintf(stderr, "vpmoe host emulator: a module image that is not emulator source (a cubin?)\n");
        return INVALID_IMAGE;
    }
    std::string src(text + sizeof MAGIC - 1);
    std::string emu;
    {
        LOCKED;
        emu = emu_library();
    }
    if (emu.empty()) { fprintf(stderr, "vpmoe host emulator: building emu.cpp failed\n"); return INVALID_IMAGE; }
    char key[40];
    snprintf(key, sizeof key, "%016llx%016llx", fnv(src), g_templates);
    std::string base = g_cache + "/" + key, so = base + ".so";
    // Every module defines the same names (vp_emu_launch and the lambda inside it): -Bsymbolic
    // binds each module's references to its own definitions.
    if (access(so.c_str(), R_OK) != 0) {
        std::string pid = std::to_string(getpid()) + "-" + std::to_string((unsigned long long)(uintptr_t)&src);
        std::string cpp = base + "." + pid + ".cpp", tmp = base + "." + pid + ".tmp";
        FILE* f = fopen(cpp.c_str(), "wb");
        if (!f) return INVALID_IMAGE;
        fwrite(src.data(), 1, src.size(), f);
        fclose(f);
        std::string cmd = "g++ -std=c++17 -O1 -w -shared -fPIC -I'" + g_src + "/host_emu/inc' -I'" + g_src + "' -o '" + tmp + "' '" +
                          cpp + "' '" + emu + "' -Wl,-Bsymbolic -Wl,-T,'" + g_src + "/host_emu/shared.ld' -Wl,-rpath,'" + g_cache +
                          "' && mv '" + tmp + "' '" + so + "'";
        int rc = system(cmd.c_str());
        remove(cpp.c_str());
        if (rc != 0) {
            fprintf(stderr, "vpmoe host emulator: compiling a module failed (%s)\n", cmd.c_str());
            return INVALID_IMAGE;
        }
    }
    LOCKED;
    void* h = dlopen(so.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "vpmoe host emulator: %s\n", dlerror()); return INVALID_IMAGE; }
    Module* m = new Module{h, (Launch)dlsym(h, "vp_emu_launch"), 0, (const unsigned long*)dlsym(h, "vp_emu_argsize"), ""};
    const int* nargs = (const int*)dlsym(h, "vp_emu_nargs");
    if (!m->launch || !m->argsize || !nargs) { fprintf(stderr, "vpmoe host emulator: %s lacks vp_emu_launch\n", so.c_str()); return INVALID_IMAGE; }
    m->nargs = *nargs;
    // The kernel's name: the `extern "C" ... void NAME(` of the shim.
    size_t at = src.find("void __launch_bounds__(");
    if (at != std::string::npos) {
        size_t s = src.find(") ", at) + 2, e = src.find('(', s);
        m->name = src.substr(s, e - s);
    }
    *mod = m;
    return OK;
}
CUresult cuModuleGetFunction(void** f, void* mod, const char* name) { LOCKED;
    Module* m = (Module*)mod;
    if (m->name != name) return NOT_FOUND;
    *f = m;
    return OK;
}
CUresult cuModuleUnload(void* mod) { LOCKED; Module* m = (Module*)mod; dlclose(m->so); delete m; return OK; }
CUresult cuFuncGetAttribute(int* v, int, void*) { LOCKED; *v = 0; return OK; }
CUresult cuFuncSetAttribute(void*, int, int) { LOCKED; return OK; }

static CUresult run(const Rec& r, void** args) {
    if (!r.m) return r.host() == 0 ? OK : LAUNCH_FAILED;
    if (r.m->launch(r.g[0], r.g[1], r.g[2], r.nt, args) != 0) {
        fprintf(stderr, "vpmoe host emulator: kernel %s reported emulator errors\n", r.m->name.c_str());
        return LAUNCH_FAILED;
    }
    return OK;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem,
                        void* stream, void** params, void** extra) {
    LOCKED;
    Module* m = (Module*)f;
    if (by != 1 || bz != 1 || smem != 0 || extra || !gx || !gy || !gz || !bx || bx > 1024) return INVALID_VALUE;
    Rec r{m, {gx, gy, gz}, bx, {}, {}};
    Stream* s = stream ? (Stream*)stream : &g_legacy;
    if (!s->capturing) return run(r, params);
    for (int i = 0; i < m->nargs; ++i) r.args.emplace_back((char*)params[i], (char*)params[i] + m->argsize[i]);
    s->capturing->recs.push_back(std::move(r));
    return OK;
}

CUresult cuStreamCreate(void** s, unsigned) { LOCKED; *s = new Stream; return OK; }
CUresult cuStreamDestroy_v2(void* s) { LOCKED; delete (Stream*)s; return OK; }
CUresult cuStreamSynchronize(void*) { LOCKED; return OK; }
CUresult cuStreamQuery(void*) { LOCKED; return OK; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { LOCKED; return OK; }
CUresult cuStreamBeginCapture_v2(void* s, int) { LOCKED;
    Stream* st = s ? (Stream*)s : &g_legacy;
    if (st->capturing || st == &g_legacy) return INVALID_VALUE;
    st->capturing = new Graph;
    return OK;
}
CUresult cuStreamEndCapture(void* s, void** g) { LOCKED;
    Stream* st = (Stream*)s;
    if (!st || !st->capturing) return INVALID_VALUE;
    *g = st->capturing;
    st->capturing = nullptr;
    return OK;
}
CUresult cuGraphInstantiateWithFlags(void** exec, void* g, unsigned long long) { LOCKED; *exec = new Graph(*(Graph*)g); return OK; }
CUresult cuGraphDestroy(void* g) { LOCKED; delete (Graph*)g; return OK; }
CUresult cuGraphExecDestroy(void* g) { LOCKED; delete (Graph*)g; return OK; }
CUresult cuGraphLaunch(void* exec, void*) { LOCKED;
    for (const Rec& r : ((Graph*)exec)->recs) {
        std::vector<void*> args;
        for (auto& a : r.args) args.push_back((void*)a.data());
        if (CUresult e = run(r, args.data())) return e;
    }
    return OK;
}

CUresult cuEventCreate(void** e, unsigned) { LOCKED; *e = new Event; return OK; }
CUresult cuEventDestroy_v2(void* e) { LOCKED; delete (Event*)e; return OK; }
CUresult cuEventRecord(void* e, void*) { LOCKED; ((Event*)e)->ms = now_ms(); return OK; }
CUresult cuEventSynchronize(void*) { LOCKED; return OK; }
CUresult cuEventQuery(void*) { LOCKED; return OK; }
CUresult cuEventElapsedTime(float* ms, void* a, void* b) { LOCKED; *ms = (float)(((Event*)b)->ms - ((Event*)a)->ms); return OK; }
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { LOCKED; return cuEventElapsedTime(ms, a, b); }

CUresult cuProfilerStart() { LOCKED; return OK; }
CUresult cuProfilerStop() { LOCKED; return OK; }
CUresult cuGetErrorName(CUresult e, const char** s) { LOCKED;
    *s = e == OK ? "CUDA_SUCCESS" : e == INVALID_VALUE ? "CUDA_ERROR_INVALID_VALUE" : e == OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY"
       : e == INVALID_IMAGE ? "CUDA_ERROR_INVALID_IMAGE" : e == NOT_FOUND ? "CUDA_ERROR_NOT_FOUND" : e == LAUNCH_FAILED ? "CUDA_ERROR_LAUNCH_FAILED"
       : "CUDA_ERROR_UNKNOWN";
    return OK;
}
CUresult cuGetErrorString(CUresult e, const char** s) { LOCKED; return cuGetErrorName(e, s); }

// cuBLAS, the part `--cublas` uses (runtime/src/cuda/blas.rs): the test harness links libcublas.so
// to this library, so the loader maps it once and both share the streams above. cublasGemmEx
// follows the cuBLAS reference semantics (column-major, op(A) = Aᵀ for CUBLAS_OP_T, leading
// dimensions in elements, C not read when beta == 0) for bf16 A and B, f32 or bf16 C and f32
// compute, checks its arguments as cuBLAS does, and refuses to be captured into a graph without a
// workspace set (real cuBLAS would allocate one during capture).
enum { BLAS_OK = 0, BLAS_NOT_INITIALIZED = 1, BLAS_INVALID_VALUE = 7, BLAS_NOT_SUPPORTED = 15 };
enum { R_32F = 0, R_16BF = 14, COMPUTE_32F = 68 };
struct BlasHandle { void* stream = nullptr; void* workspace = nullptr; size_t workspace_bytes = 0; };
// The conversions the kernels use (inc/cuda_bf16.h): round to nearest even, NaN canonical.
static float bf16_to_f32(uint16_t h) { return __bfloat162float(__nv_bfloat16{h}); }
static uint16_t f32_to_bf16(float f) { return __float2bfloat16(f).x; }
int cublasCreate_v2(BlasHandle** h) { LOCKED; if (!h) return BLAS_INVALID_VALUE; *h = new BlasHandle; return BLAS_OK; }
int cublasDestroy_v2(BlasHandle* h) { LOCKED; if (!h) return BLAS_NOT_INITIALIZED; delete h; return BLAS_OK; }
int cublasSetStream_v2(BlasHandle* h, void* stream) { LOCKED; if (!h) return BLAS_NOT_INITIALIZED; h->stream = stream; return BLAS_OK; }
int cublasSetWorkspace_v2(BlasHandle* h, void* ws, size_t bytes) { LOCKED;
    if (!h) return BLAS_NOT_INITIALIZED;
    h->workspace = ws; h->workspace_bytes = bytes;
    return BLAS_OK;
}
int cublasGemmEx(BlasHandle* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int atype, int lda,
                 const void* B, int btype, int ldb, const void* beta, void* C, int ctype, int ldc, int compute, int /*algo*/) {
    LOCKED;
    if (!h) return BLAS_NOT_INITIALIZED;
    if (atype != R_16BF || btype != R_16BF || (ctype != R_32F && ctype != R_16BF) || compute != COMPUTE_32F) return BLAS_NOT_SUPPORTED;
    if ((ta != 0 && ta != 1) || (tb != 0 && tb != 1) || m < 0 || n < 0 || k < 0 || !alpha || !beta) return BLAS_INVALID_VALUE;
    if (lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k) || ldc < std::max(1, m)) return BLAS_INVALID_VALUE;
    const float al = *(const float*)alpha, be = *(const float*)beta;  // host pointer mode: read now
    const uint16_t* a = (const uint16_t*)A; const uint16_t* b = (const uint16_t*)B;
    auto call = [=]() {
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
                float s = 0.f;
                for (int l = 0; l < k; ++l) {
                    const float x = bf16_to_f32(a[ta ? (size_t)i * lda + l : (size_t)l * lda + i]);
                    const float y = bf16_to_f32(b[tb ? (size_t)l * ldb + j : (size_t)j * ldb + l]);
                    s += x * y;
                }
                const size_t o = (size_t)j * ldc + i;
                if (ctype == R_32F) {
                    float* c = (float*)C;
                    c[o] = al * s + (be != 0.f ? be * c[o] : 0.f);
                } else {
                    uint16_t* c = (uint16_t*)C;
                    c[o] = f32_to_bf16(al * s + (be != 0.f ? be * bf16_to_f32(c[o]) : 0.f));
                }
            }
        return 0;
    };
    Stream* s = h->stream ? (Stream*)h->stream : &g_legacy;
    if (!s->capturing) return call();
    if (!h->workspace || h->workspace_bytes == 0) return BLAS_NOT_SUPPORTED;
    s->capturing->recs.push_back(Rec{nullptr, {0, 0, 0}, 0, {}, call});
    return BLAS_OK;
}
}

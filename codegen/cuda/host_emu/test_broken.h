// Deliberately broken kernels, one for each kind of bug the emulator exists to catch, and the
// check that it reports each one. They run only when named (`run.sh broken`, and `broken-race`
// under SAN=thread, where the race report is ThreadSanitizer's and its exit status says so);
// every one of them passes unnoticed on an emulator without poisoned shared memory, barrier
// tags and copies that land late.
namespace vp {
namespace broken {

// Threads 32..63 read shared elements nobody wrote.
__device__ void unwritten_shared(const float* x, float* y) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    if (t < 32) s[t] = x[t];
    __syncthreads();
    y[blockIdx.x * 64 + t] = s[t];
}

// Each thread reads its neighbour's element with no barrier between the write and the read.
__device__ void missing_syncthreads(const float* x, float* y) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    s[t] = x[t];
    y[blockIdx.x * 64 + t] = s[(t + 1) % 64];
}

// The neighbour's cp.async tile is read after the barrier but before this thread's wait:
// the copies may not have landed.
__device__ void missing_cp_async_wait(const bf16* x, float* y) {
    __shared__ __align__(16) bf16 s[64 * 8];
    const int t = threadIdx.x;
    cp_async16(&s[t * 8], &x[t * 8], true);
    cp_async_commit();
    __syncthreads();
    const float v = __bfloat162float(s[((t + 1) % 64) * 8]);
    cp_async_wait<0>();
    y[blockIdx.x * 64 + t] = v;
}

// Half the block waits at one __syncthreads, half at another.
__device__ void mismatched_syncthreads(float* y) {
    const int t = threadIdx.x;
    if (t < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    y[t] = 1.f;
}

// Half a warp shuffles while the other half issues an mma.
__device__ void mismatched_collectives(float* y) {
    const int t = threadIdx.x;
    float v = 0.f;
    if (t < 16) {
        v = __shfl_xor_sync(0xffffffffu, 1.f, 1);
    } else {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        const unsigned a[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u}, b[2] = {0x3f803f80u, 0x3f803f80u};
        mma_bf16_16816(d, a, b);
        v = d[0];
    }
    y[t] = v;
}

// Every thread adds into one shared float with a plain `+=`.
__device__ void racy_accumulate(const float* x, float* y) {
    __shared__ float acc;
    const int t = threadIdx.x;
    if (t == 0) acc = 0.f;
    __syncthreads();
    acc += x[t];
    __syncthreads();
    if (t == 0) y[blockIdx.x] = acc;
}

}  // namespace broken
}  // namespace vp

static bool any_wrong(const std::vector<float>& y, const std::vector<float>& want) {
    for (size_t i = 0; i < y.size(); ++i) if (!(y[i] == want[i])) return true;
    return false;
}

// Runs `launch`, then checks that the emulator reported it (an emulator error, or a wrong or NaN
// output), and takes the expected errors back out of the count.
static void expect_caught(const char* name, const std::function<bool()>& launch) {
    const int before = g_errors;
    const bool wrong = launch();
    const bool caught = wrong || g_errors > before;
    printf("%-60s %s\n", (std::string("broken: ") + name).c_str(), caught ? "ok   (reported)" : "FAIL (passed unnoticed)");
    if (!caught) g_fail++;
    g_errors = before;
}

template <class Want>
void run_broken_tests(Want&& named) {
    std::vector<float> x(64);
    for (int i = 0; i < 64; ++i) x[i] = (float)(i + 1);
    std::vector<bf> xb(64 * 8);
    for (int i = 0; i < 64 * 8; ++i) xb[i] = tobf(i % 97 + 1);
    if (named("broken")) {
        expect_caught("read of unwritten shared memory", [&] {
            std::vector<float> y(4 * 64, 0.f), want(4 * 64);
            for (int i = 0; i < 4 * 64; ++i) want[i] = x[i % 64];
            emu_launch(4, 1, 64, [&] { vp::broken::unwritten_shared(x.data(), y.data()); });
            return any_wrong(y, want);
        });
        expect_caught("missing __syncthreads", [&] {
            std::vector<float> y(4 * 64, 0.f), want(4 * 64);
            for (int i = 0; i < 4 * 64; ++i) want[i] = x[(i + 1) % 64];
            emu_launch(4, 1, 64, [&] { vp::broken::missing_syncthreads(x.data(), y.data()); });
            return any_wrong(y, want);
        });
        expect_caught("missing cp_async_wait", [&] {
            std::vector<float> y(4 * 64, 0.f), want(4 * 64);
            for (int i = 0; i < 4 * 64; ++i) want[i] = fl(xb[((i + 1) % 64) * 8]);
            emu_launch(4, 1, 64, [&] { vp::broken::missing_cp_async_wait(xb.data(), y.data()); });
            return any_wrong(y, want);
        });
        expect_caught("__syncthreads at two call sites", [&] {
            std::vector<float> y(64, 0.f);
            emu_launch(1, 1, 64, [&] { vp::broken::mismatched_syncthreads(y.data()); });
            return false;
        });
        expect_caught("shfl and mma in one warp", [&] {
            std::vector<float> y(32, 0.f);
            emu_launch(1, 1, 32, [&] { vp::broken::mismatched_collectives(y.data()); });
            return false;
        });
    }
    if (named("broken-race")) {
        // The sum is right on every emulator schedule (fibers never preempt a `+=`); only
        // ThreadSanitizer (SAN=thread) sees the race, and reports it on stderr.
        std::vector<float> y(2, 0.f);
        emu_launch(2, 1, 64, [&] { vp::broken::racy_accumulate(x.data(), y.data()); });
        printf("broken: racy accumulation sums to %g (ThreadSanitizer reports the race)\n", y[0]);
    }
}

"""Optional measured throughput (`--bench`): a small OpenCL FMA kernel per
device and a numpy sgemm on the CPU. The results go beside the table /
computed numbers (`measured_fp32_gflops`), never replacing them."""

from __future__ import annotations

import time

import numpy as np

# Each work-item runs a chain of independent float4 FMAs; 8 accumulators hide
# the FMA latency. FLOPs = global size * ITERS * 8 vectors * 4 lanes * 2.
_FMA_KERNEL = """
__kernel void fma_peak(__global float *out, float a, float b) {
    float4 x0 = (float4)(get_global_id(0)), x1 = x0 + 1.0f, x2 = x0 + 2.0f, x3 = x0 + 3.0f;
    float4 x4 = x0 + 4.0f, x5 = x0 + 5.0f, x6 = x0 + 6.0f, x7 = x0 + 7.0f;
    for (int i = 0; i < ITERS; i++) {
        x0 = fma(x0, a, b); x1 = fma(x1, a, b); x2 = fma(x2, a, b); x3 = fma(x3, a, b);
        x4 = fma(x4, a, b); x5 = fma(x5, a, b); x6 = fma(x6, a, b); x7 = fma(x7, a, b);
    }
    float4 s = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
    out[get_global_id(0)] = s.x + s.y + s.z + s.w;
}
"""
_ITERS = 1024


def opencl_fma_gflops(device, budget_s: float = 1.0) -> float | None:
    """Best FP32 GFLOPS of the FMA kernel on one pyopencl device."""
    import pyopencl as cl
    try:
        ctx = cl.Context([device])
        queue = cl.CommandQueue(ctx)
        prg = cl.Program(ctx, _FMA_KERNEL).build(options=[f"-DITERS={_ITERS}"])
        kernel = prg.fma_peak
        n = max(1, device.max_compute_units) * 1024
        out = cl.Buffer(ctx, cl.mem_flags.WRITE_ONLY, n * 4)
        args = (out, np.float32(0.999), np.float32(0.001))
        kernel(queue, (n,), None, *args).wait()  # warm-up (JIT, page-in)
        best, deadline = 0.0, time.perf_counter() + budget_s
        while True:
            t0 = time.perf_counter()
            kernel(queue, (n,), None, *args).wait()
            dt = time.perf_counter() - t0
            best = max(best, n * _ITERS * 8 * 4 * 2 / dt / 1e9)
            # Grow the launch until one run takes ~50 ms, so launch overhead is noise.
            if dt < 0.05:
                n *= 2
                out = cl.Buffer(ctx, cl.mem_flags.WRITE_ONLY, n * 4)
                args = (out, *args[1:])
            if time.perf_counter() > deadline:
                return round(best, 1)
    except cl.Error:
        return None


def numpy_sgemm_gflops(n: int = 1024, repeats: int = 3) -> float:
    """Best-of FP32 matrix multiply through numpy's BLAS."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: BLAS thread pool start
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return round(best, 1)

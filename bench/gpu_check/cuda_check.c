/* A real CUDA workload without the CUDA toolkit: dlopen the driver's
 * libcuda.so.1, JIT-load an embedded PTX kernel with cuModuleLoadData, run
 * it (c[i] = a[i] + 2 b[i] over 1M floats) and check every element.
 * Prints what it saw; exit 0 = "CUDA OK", 2 = no driver library, 3 = a CUDA
 * call failed, 4 = wrong results. Built by bench/gpu_check_prepare.sh. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream;
typedef unsigned long long CUdeviceptr;
typedef struct { unsigned char bytes[16]; } CUuuid;

static const char PTX[] =
    ".version 6.4\n"
    ".target sm_52\n"
    ".address_size 64\n"
    ".visible .entry vadd(.param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u32 pn)\n"
    "{\n"
    "  .reg .pred %p<2>;\n"
    "  .reg .b32 %r<6>;\n"
    "  .reg .f32 %f<4>;\n"
    "  .reg .b64 %rd<11>;\n"
    "  ld.param.u64 %rd1, [pa];\n"
    "  ld.param.u64 %rd2, [pb];\n"
    "  ld.param.u64 %rd3, [pc];\n"
    "  ld.param.u32 %r1, [pn];\n"
    "  mov.u32 %r2, %ctaid.x;\n"
    "  mov.u32 %r3, %ntid.x;\n"
    "  mov.u32 %r4, %tid.x;\n"
    "  mad.lo.s32 %r5, %r2, %r3, %r4;\n"
    "  setp.ge.u32 %p1, %r5, %r1;\n"
    "  @%p1 bra DONE;\n"
    "  cvta.to.global.u64 %rd4, %rd1;\n"
    "  cvta.to.global.u64 %rd5, %rd2;\n"
    "  cvta.to.global.u64 %rd6, %rd3;\n"
    "  mul.wide.u32 %rd7, %r5, 4;\n"
    "  add.s64 %rd8, %rd4, %rd7;\n"
    "  add.s64 %rd9, %rd5, %rd7;\n"
    "  add.s64 %rd10, %rd6, %rd7;\n"
    "  ld.global.f32 %f1, [%rd8];\n"
    "  ld.global.f32 %f2, [%rd9];\n"
    "  fma.rn.f32 %f3, %f2, 0f40000000, %f1;\n"
    "  st.global.f32 [%rd10], %f3;\n"
    "DONE:\n"
    "  ret;\n"
    "}\n";

static void *lib;
static CUresult (*pGetErrorString)(CUresult, const char **);

static void *sym(const char *name) {
    void *p = dlsym(lib, name);
    if (!p) { printf("missing symbol %s\n", name); exit(3); }
    return p;
}

static void check(CUresult r, const char *what) {
    if (r == 0) return;
    const char *s = "?";
    if (pGetErrorString) pGetErrorString(r, &s);
    printf("CUDA FAILED: %s -> %d (%s)\n", what, r, s);
    exit(3);
}

int main(void) {
    lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { printf("no NVIDIA driver library: %s\n", dlerror()); return 2; }
    pGetErrorString = (CUresult (*)(CUresult, const char **))dlsym(lib, "cuGetErrorString");
    CUresult (*cuInit)(unsigned) = sym("cuInit");
    CUresult (*cuDriverGetVersion)(int *) = sym("cuDriverGetVersion");
    CUresult (*cuDeviceGetCount)(int *) = sym("cuDeviceGetCount");
    CUresult (*cuDeviceGet)(CUdevice *, int) = sym("cuDeviceGet");
    CUresult (*cuDeviceGetName)(char *, int, CUdevice) = sym("cuDeviceGetName");
    CUresult (*cuDeviceGetAttribute)(int *, int, CUdevice) = sym("cuDeviceGetAttribute");
    CUresult (*cuDeviceTotalMem)(size_t *, CUdevice) = sym("cuDeviceTotalMem_v2");
    CUresult (*cuDeviceGetUuid)(CUuuid *, CUdevice) = sym("cuDeviceGetUuid");
    CUresult (*cuCtxCreate)(CUcontext *, unsigned, CUdevice) = sym("cuCtxCreate_v2");
    CUresult (*cuCtxSynchronize)(void) = sym("cuCtxSynchronize");
    CUresult (*cuModuleLoadData)(CUmodule *, const void *) = sym("cuModuleLoadData");
    CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *) = sym("cuModuleGetFunction");
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t) = sym("cuMemAlloc_v2");
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t) = sym("cuMemcpyHtoD_v2");
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t) = sym("cuMemcpyDtoH_v2");
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                               unsigned, CUstream, void **, void **) = sym("cuLaunchKernel");

    int version = 0, count = 0, major = 0, minor = 0;
    check(cuInit(0), "cuInit");
    check(cuDriverGetVersion(&version), "cuDriverGetVersion");
    check(cuDeviceGetCount(&count), "cuDeviceGetCount");
    printf("driver CUDA version %d.%d, %d visible device(s)\n", version / 1000, (version % 1000) / 10, count);
    if (count < 1) { printf("CUDA FAILED: no device visible\n"); return 3; }
    CUdevice dev;
    char name[256] = {0};
    size_t mem = 0;
    CUuuid u;
    check(cuDeviceGet(&dev, 0), "cuDeviceGet");
    check(cuDeviceGetName(name, sizeof name, dev), "cuDeviceGetName");
    check(cuDeviceGetAttribute(&major, 75, dev), "compute capability major");
    check(cuDeviceGetAttribute(&minor, 76, dev), "compute capability minor");
    check(cuDeviceTotalMem(&mem, dev), "cuDeviceTotalMem");
    check(cuDeviceGetUuid(&u, dev), "cuDeviceGetUuid");
    printf("device 0: %s, compute capability %d.%d, %.1f GiB\n", name, major, minor, mem / 1073741824.0);
    printf("uuid=GPU-");
    for (int i = 0; i < 16; i++)
        printf("%02x%s", u.bytes[i], (i == 3 || i == 5 || i == 7 || i == 9) ? "-" : "");
    printf("\n");

    CUcontext ctx;
    CUmodule mod;
    CUfunction fn;
    check(cuCtxCreate(&ctx, 0, dev), "cuCtxCreate");
    check(cuModuleLoadData(&mod, PTX), "cuModuleLoadData (PTX JIT)");
    check(cuModuleGetFunction(&fn, mod, "vadd"), "cuModuleGetFunction");
    unsigned n = 1u << 20;
    size_t bytes = n * sizeof(float);
    float *a = malloc(bytes), *b = malloc(bytes), *c = malloc(bytes);
    for (unsigned i = 0; i < n; i++) { a[i] = (float)i; b[i] = (float)(i % 1000) * 0.5f; c[i] = -1.0f; }
    CUdeviceptr da, db, dc;
    check(cuMemAlloc(&da, bytes), "cuMemAlloc a");
    check(cuMemAlloc(&db, bytes), "cuMemAlloc b");
    check(cuMemAlloc(&dc, bytes), "cuMemAlloc c");
    check(cuMemcpyHtoD(da, a, bytes), "copy a");
    check(cuMemcpyHtoD(db, b, bytes), "copy b");
    void *args[] = {&da, &db, &dc, &n};
    check(cuLaunchKernel(fn, (n + 255) / 256, 1, 1, 256, 1, 1, 0, NULL, args, NULL), "cuLaunchKernel");
    check(cuCtxSynchronize(), "cuCtxSynchronize");
    check(cuMemcpyDtoH(c, dc, bytes), "copy c");
    unsigned bad = 0;
    for (unsigned i = 0; i < n; i++)
        if (c[i] != a[i] + 2.0f * b[i]) bad++;
    printf("kernel vadd over %u floats: %u wrong\n", n, bad);
    if (bad) { printf("CUDA FAILED: wrong results\n"); return 4; }
    printf("CUDA OK\n");
    return 0;
}

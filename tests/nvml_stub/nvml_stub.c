/* A stand-in libnvidia-ml.so.1 for tests: exports the NVML symbols that
 * pynvml calls in hwprobe, with behaviour chosen by NVML_STUB_MODE:
 *   nodriver      nvmlInit fails with NVML_ERROR_DRIVER_NOT_LOADED
 *   nopermission  nvmlInit fails with NVML_ERROR_NO_PERMISSION
 *   nogpu         init works, zero devices
 *   h100          one H100 SXM5 80GB (default)
 *   notsupported  an H100 whose every optional field says NOT_SUPPORTED
 *   two           two H100s (distinct UUIDs, minors 0 and 1, bus 0x18 / 0x2a);
 *                 NVML_STUB_MEM_USED_MB and NVML_STUB_UTIL set what they report in use
 *   mig           one H100 in MIG mode with two 1g.10gb instances (MIG-… UUIDs)
 * Built with -DOLD_DRIVER it lacks nvmlDeviceGetNumGpuCores and
 * nvmlDeviceGetMemoryBusWidth (pynvml then raises FunctionNotFound).
 * With NVML_STUB_LOG set, init and shutdown calls are appended to that file
 * so tests can check every successful init is paired with a shutdown. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct { int index; } *nvmlDevice_t;
#define OK 0
#define UNINIT 1
#define INVALID 2
#define NOTSUP 3
#define NOPERM 4
#define NODRIVER 9

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct {
    unsigned int multiprocessorCount, sharedCopyEngineCount, sharedDecoderCount,
        sharedEncoderCount, sharedJpegCount, sharedOfaCount,
        gpuInstanceSliceCount, computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;

static struct { int index; } devs[2] = {{0}, {1}}, migs[2] = {{10}, {11}};
#define IDX(d) (((struct { int index; } *)(d))->index)
static int inited = 0;

static const char *mode(void) {
    const char *m = getenv("NVML_STUB_MODE");
    return m ? m : "h100";
}
static int is(const char *m) { return strcmp(mode(), m) == 0; }
static void logcall(const char *what) {
    const char *path = getenv("NVML_STUB_LOG");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (f) { fprintf(f, "%s\n", what); fclose(f); }
}
/* Optional fields: NOT_SUPPORTED in "notsupported" mode. */
#define OPTIONAL_FIELD() do { if (!inited) return UNINIT; if (is("notsupported")) return NOTSUP; } while (0)

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    if (is("nodriver")) return NODRIVER;
    if (is("nopermission")) return NOPERM;
    inited = 1;
    logcall("init");
    return OK;
}
nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlShutdown(void) {
    if (!inited) return UNINIT;
    inited = 0;
    logcall("shutdown");
    return OK;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case OK: return "Success";
    case UNINIT: return "Uninitialized";
    case INVALID: return "Invalid Argument";
    case NOTSUP: return "Not Supported";
    case NOPERM: return "Insufficient Permissions";
    case NODRIVER: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *buf, unsigned int len) {
    if (!inited) return UNINIT;
    strncpy(buf, "550.54.15", len);
    return OK;
}
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!inited) return UNINIT;
    *count = is("nogpu") ? 0 : is("two") ? 2 : 1;
    return OK;
}
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) {
    if (!inited) return UNINIT;
    if (is("nogpu") || i >= (is("two") ? 2u : 1u)) return INVALID;
    *d = (nvmlDevice_t)&devs[i];
    return OK;
}
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *buf, unsigned int len) {
    if (!inited) return UNINIT;
    strncpy(buf, IDX(d) >= 10 ? "NVIDIA H100 80GB HBM3 MIG 1g.10gb" : "NVIDIA H100 80GB HBM3", len);
    return OK;
}
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *buf, unsigned int len) {
    OPTIONAL_FIELD();
    strncpy(buf, IDX(d) == 10 ? "MIG-aaaa0000-0000-1111-2222-333344445555"
               : IDX(d) == 11 ? "MIG-bbbb0000-0000-1111-2222-333344445555"
               : IDX(d) ? "GPU-5f2c7c1e-0000-1111-2222-666677778888"
                        : "GPU-5f2c7c1e-0000-1111-2222-333344445555", len);
    return OK;
}
nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p) {
    (void)d; OPTIONAL_FIELD();
    memset(p, 0, sizeof *p);
    p->bus = IDX(d) ? 0x2a : 0x18;
    p->pciDeviceId = 0x233010DE;  /* device 0x2330, vendor 0x10de */
    strcpy(p->busIdLegacy, IDX(d) ? "0000:2a:00.0" : "0000:18:00.0");
    strcpy(p->busId, IDX(d) ? "00000000:2a:00.0" : "00000000:18:00.0");
    return OK;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    OPTIONAL_FIELD();
    m->total = IDX(d) >= 10 ? 10200547328ULL : 85520809984ULL;
    const char *u = getenv("NVML_STUB_MEM_USED_MB");
    m->used = 1048576ULL * (u ? strtoull(u, NULL, 10) : 600);
    m->free = m->total - m->used;
    return OK;
}
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    (void)d; OPTIONAL_FIELD();
    const char *g = getenv("NVML_STUB_UTIL");
    u->gpu = g ? (unsigned)atoi(g) : 7;
    u->memory = 3;
    return OK;
}
nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *mw) {
    (void)d; OPTIONAL_FIELD(); *mw = 71234; return OK;
}
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t d, unsigned int *mw) {
    (void)d; OPTIONAL_FIELD(); *mw = 700000; return OK;
}
nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *t) {
    (void)d; (void)sensor; OPTIONAL_FIELD(); *t = 34; return OK;
}
nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t d, int *maj, int *min) {
    (void)d; OPTIONAL_FIELD(); *maj = 9; *min = 0; return OK;
}
nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t d, int type, unsigned int *mhz) {
    (void)d; OPTIONAL_FIELD();
    if (type == 1) *mhz = 1980;        /* SM */
    else if (type == 2) *mhz = 2619;   /* memory */
    else return INVALID;
    return OK;
}
nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(nvmlDevice_t d, unsigned int *g) {
    (void)d; OPTIONAL_FIELD(); *g = 5; return OK;
}
nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(nvmlDevice_t d, unsigned int *g) {
    (void)d; OPTIONAL_FIELD(); *g = 5; return OK;
}
nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(nvmlDevice_t d, unsigned int *w) {
    (void)d; OPTIONAL_FIELD(); *w = 16; return OK;
}
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *cur, unsigned int *pending) {
    (void)d; OPTIONAL_FIELD(); *cur = *pending = is("mig") ? 1 : 0; return OK;
}
nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t d, unsigned int *n) {
    (void)d; OPTIONAL_FIELD(); *n = is("mig") ? 7 : 0; return OK;
}
nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t d, unsigned int i, nvmlDevice_t *mig) {
    (void)d; OPTIONAL_FIELD();
    if (!is("mig") || i >= 2) return 6;  /* NVML_ERROR_NOT_FOUND: an empty slot */
    *mig = (nvmlDevice_t)&migs[i];
    return OK;
}
/* MIG handles: GPU instance 7 and 8, compute instance 0 (nvidia-caps minors come from /proc). */
nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t d, unsigned int *id) {
    OPTIONAL_FIELD(); if (IDX(d) < 10) return NOTSUP; *id = IDX(d) == 10 ? 7 : 8; return OK;
}
nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t d, unsigned int *id) {
    OPTIONAL_FIELD(); if (IDX(d) < 10) return NOTSUP; *id = 0; return OK;
}
nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t d, nvmlDeviceAttributes_t *a) {
    /* Real drivers answer this for MIG handles only. */
    (void)d; (void)a; if (!inited) return UNINIT; return NOTSUP;
}
#ifndef OLD_DRIVER
nvmlReturn_t nvmlDeviceGetNumGpuCores(nvmlDevice_t d, unsigned int *n) {
    (void)d; OPTIONAL_FIELD(); *n = 16896; return OK;
}
nvmlReturn_t nvmlDeviceGetMemoryBusWidth(nvmlDevice_t d, unsigned int *bits) {
    (void)d; OPTIONAL_FIELD(); *bits = 5120; return OK;
}
#endif
nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned int *minor) {
    OPTIONAL_FIELD(); *minor = (unsigned)IDX(d); return OK;
}

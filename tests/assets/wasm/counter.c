/* Step ABI v1 test module (a WASI reactor): one line of output per step.
 * State lives in statics and on the heap, so a checkpoint must carry both
 * linear memory and __stack_pointer. COUNT (steps, default 100) and WORK
 * (inner iterations per step, default 200000) come from the environment. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static uint64_t acc = 1469598103934665603ULL;
static int step, total, work;
static uint64_t *history;

__attribute__((export_name("synord_step")))
int synord_step(void) {
    if (!total) {
        const char *c = getenv("COUNT"), *w = getenv("WORK");
        total = c ? atoi(c) : 100;
        work = w ? atoi(w) : 200000;
        history = calloc((size_t)total, sizeof *history);
    }
    for (int k = 0; k < work; k++) acc = (acc ^ (uint64_t)(k + step)) * 1099511628211ULL;
    history[step++] = acc;
    printf("step %d acc %016llx\n", step, (unsigned long long)acc);
    if (step < total) { fflush(stdout); return 0; }
    uint64_t sum = 0;
    for (int i = 0; i < total; i++) sum = sum * 31 + history[i];
    printf("done steps=%d sum=%016llx\n", step, (unsigned long long)sum);
    fflush(stdout);
    return 1;
}

__attribute__((export_name("synord_exit_code")))
int synord_exit_code(void) { return (int)(acc % 100); }

/* cpuid_mask.so: make a process (and every thread it starts) see a CPU without AVX-512, AVX-VNNI
 * and AMX, so that engines which pick their kernels at run time (DeepSparse's JIT, oneDNN, MKL, ONNX
 * Runtime, torch, ours) all run their AVX2 code on an AVX-512 machine.
 *
 * Why: an engine's own switch is not enough. DeepSparse 1.8 with NM_ARCH=avx2 loads its "avx2"
 * binary, which still JITs zmm (AVX-512) kernels on an AVX-512 CPU (seen with gdb:
 * docs/protocols.md#emulating-avx2): it reads the "flags" line of /proc/cpuinfo, others read CPUID.
 * So this library does both: Linux can make CPUID fault (arch_prctl ARCH_SET_CPUID, on CPUs with
 * "cpuid_fault"); the constructor turns that on and a SIGSEGV handler answers each faulting CPUID
 * with the real answer minus the masked feature bits; and opening /proc/cpuinfo (open, openat,
 * fopen and their 64-bit forms) returns a memfd holding the text without the masked flags.
 *
 * Use through benchmarks/isa_mask.py (builds this file into the cache and sets LD_PRELOAD plus
 * GLIBC_TUNABLES, which keeps glibc's own string functions off AVX-512: glibc reads CPUID before any
 * constructor runs). Limits: XGETBV cannot be intercepted (it still reports the AVX-512 state as
 * enabled; software checks the CPUID bits first); a program that opens /proc/cpuinfo by a raw
 * syscall, or that is linked statically, is not covered (the gdb check above is how to tell); the
 * setting is per thread and inherited by threads and forks, reset by execve (LD_PRELOAD re-applies
 * it in the new program). Programs that install their own SIGSEGV handler (DeepSparse's crash
 * reporter does) get it chained behind ours: sigaction() and signal() for SIGSEGV are wrapped, so a
 * real fault still reaches their handler. CPUID_MASK_LOG=1 prints each answered CPUID (debugging).
 * The memory system, caches and clocks stay this machine's. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/mman.h>

#ifndef ARCH_GET_CPUID
#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012
#endif

static struct sigaction previous;
static volatile int mask_active;
static int log_fd = -1;  /* $CPUID_MASK_LOG=1: one line per answered CPUID on stderr (debugging) */

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction(void) {
    static sigaction_fn fn;
    if (!fn) fn = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return fn;
}

static long set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

/* The feature bits removed (Intel SDM vol. 2, CPUID leaf 7 and 0xD). */
static void mask(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (leaf == 7 && sub == 0) {
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) |
                (1u << 31));                                       /* AVX512 F DQ IFMA PF ER CD BW VL */
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
                                                                   /* VBMI VBMI2 VNNI BITALG VPOPCNTDQ */
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
                                               /* 4VNNIW 4FMAPS VP2INTERSECT AMX-BF16 FP16 AMX-TILE AMX-INT8 */
    } else if (leaf == 7 && sub == 1) {
        *a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));  /* AVX-VNNI AVX512_BF16 AMX-FP16 AVX-IFMA */
        *d &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 19));   /* AVX-VNNI-INT8 AVX-NE-CONVERT AMX-COMPLEX AVX10 */
    } else if (leaf == 0xD && sub == 0) {
        *a &= ~((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18)); /* opmask ZMM_Hi256 Hi16_ZMM TILECFG TILEDATA */
    } else if (leaf == 0x1E || leaf == 0x1D || leaf == 0x24) {    /* AMX tile info, AVX10 */
        *a = *b = *c = *d = 0;
    }
}

static void on_segv(int sig, siginfo_t *info, void *ctx_) {
    ucontext_t *ctx = (ucontext_t *)ctx_;
    greg_t *r = ctx->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (mask_active && ip[0] == 0x0F && ip[1] == 0xA2) {
        uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
        set_cpuid(1);
        __cpuid_count(leaf, sub, a, b, c, d);
        set_cpuid(0);
        mask(leaf, sub, &a, &b, &c, &d);
        if (log_fd >= 0) {
            char line[96];
            int n = snprintf(line, sizeof line, "cpuid_mask: leaf %#x.%u -> %08x %08x %08x %08x\n", leaf, sub, a, b, c, d);
            if (n > 0) (void)!write(log_fd, line, (size_t)n);
        }
        r[REG_RAX] = a; r[REG_RBX] = b; r[REG_RCX] = c; r[REG_RDX] = d;
        r[REG_RIP] += 2;
        return;
    }
    /* not ours: hand it to whoever had the signal before (or the default: the crash it would be) */
    if (previous.sa_flags & SA_SIGINFO) { if (previous.sa_sigaction) { previous.sa_sigaction(sig, info, ctx_); return; } }
    else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) { previous.sa_handler(sig); return; }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction()(SIGSEGV, &dfl, NULL);  /* returning re-runs the instruction: the default crash */
}

/* /proc/cpuinfo without the masked flags: DeepSparse reads its ISA from the "flags" line, not
 * from CPUID. Opening the file returns a memfd holding the filtered text. */
static const char *const masked_flags[] = {"avx512", "amx_", "avx_vnni", "avx_ifma", "avx_ne_convert",
                                           "avx_vnni_int8", "avx10", NULL};

static int masked_flag(const char *word, size_t n) {
    for (int i = 0; masked_flags[i]; i++) {
        size_t m = strlen(masked_flags[i]);
        if (n >= m && strncmp(word, masked_flags[i], m) == 0) return 1;
    }
    return 0;
}

static int filtered_cpuinfo(int flags) {
    typedef int (*open_fn)(const char *, int, ...);
    static open_fn real_open;
    if (!real_open) real_open = (open_fn)dlsym(RTLD_NEXT, "open");
    int src = real_open("/proc/cpuinfo", O_RDONLY);
    if (src < 0) return src;
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    ssize_t got;
    while (buf && (got = read(src, buf + len, cap - len)) > 0) {
        len += (size_t)got;
        if (len == cap) { cap *= 2; buf = realloc(buf, cap); }
    }
    close(src);
    if (!buf) return -1;
    int out = (int)syscall(SYS_memfd_create, "cpuinfo", (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
    if (out < 0) { free(buf); return out; }
    size_t i = 0;
    while (i < len) {
        size_t end = i;
        while (end < len && buf[end] != '\n') end++;
        int is_flags = (end - i > 5 && (strncmp(buf + i, "flags", 5) == 0));
        if (!is_flags) {
            (void)!write(out, buf + i, end - i + (end < len));
        } else {
            size_t j = i;
            while (j < end) {
                size_t w = j;
                while (w < end && buf[w] != ' ' && buf[w] != '\t' && buf[w] != ':') w++;
                if (w == j) { (void)!write(out, buf + j, 1); j++; continue; }
                if (!masked_flag(buf + j, w - j)) (void)!write(out, buf + j, w - j);
                else if (w < end && buf[w] == ' ') w++;  /* drop the word and its separator */
                j = w;
            }
            if (end < len) (void)!write(out, "\n", 1);
        }
        i = end + 1;
    }
    free(buf);
    lseek(out, 0, SEEK_SET);
    return out;
}

static int is_cpuinfo(const char *path) { return mask_active && path && strcmp(path, "/proc/cpuinfo") == 0; }

#define REAL(name, type) static type real_##name; if (!real_##name) real_##name = (type)dlsym(RTLD_NEXT, #name)
typedef int (*open_t)(const char *, int, ...);
typedef int (*openat_t)(int, const char *, int, ...);
typedef FILE *(*fopen_t)(const char *, const char *);

#define OPEN_WRAPPER(name)                                                                   \
    int name(const char *path, int flags, ...) {                                            \
        mode_t mode = 0;                                                                    \
        if (flags & (O_CREAT | O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); } \
        if (is_cpuinfo(path)) return filtered_cpuinfo(flags);                               \
        REAL(name, open_t);                                                                 \
        return real_##name(path, flags, mode);                                              \
    }
#define OPENAT_WRAPPER(name)                                                                 \
    int name(int dir, const char *path, int flags, ...) {                                   \
        mode_t mode = 0;                                                                    \
        if (flags & (O_CREAT | O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); } \
        if (is_cpuinfo(path)) return filtered_cpuinfo(flags);                               \
        REAL(name, openat_t);                                                               \
        return real_##name(dir, path, flags, mode);                                         \
    }
#define FOPEN_WRAPPER(name)                                                                  \
    FILE *name(const char *path, const char *how) {                                         \
        if (is_cpuinfo(path)) { int fd = filtered_cpuinfo(O_RDONLY); return fd < 0 ? NULL : fdopen(fd, "r"); } \
        REAL(name, fopen_t);                                                                \
        return real_##name(path, how);                                                      \
    }
OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)
OPENAT_WRAPPER(openat)
OPENAT_WRAPPER(openat64)
FOPEN_WRAPPER(fopen)
FOPEN_WRAPPER(fopen64)

/* A handler the program installs for SIGSEGV becomes the one ours passes real faults to. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV || !mask_active) return real_sigaction()(sig, act, old);
    if (old) *old = previous;
    if (act) previous = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, &old) != 0) return SIG_ERR;
    return (old.sa_flags & SA_SIGINFO) ? (sighandler_t)old.sa_sigaction : old.sa_handler;
}

__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (real_sigaction()(SIGSEGV, &sa, &previous) != 0) { perror("cpuid_mask: sigaction"); _exit(70); }
    if (set_cpuid(0) != 0) {
        fprintf(stderr, "cpuid_mask: this CPU or kernel cannot make CPUID fault (no cpuid_fault flag): "
                        "run without the ISA mask\n");
        _exit(70);
    }
    const char *lg = getenv("CPUID_MASK_LOG");
    if (lg && lg[0] == '1') log_fd = 2;
    mask_active = 1;
}

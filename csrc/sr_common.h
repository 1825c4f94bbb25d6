// Internal to the compiled kernels (not part of the C interface, see sparse_runtime.h): the x86
// switch and the row-parallel helper shared by sparse_kernels.cpp and sparsegpt_solver.cpp.
#ifndef SR_COMMON_H
#define SR_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define SR_X86 1
#include <immintrin.h>
#else
#define SR_X86 0
#endif

// n bytes of stack, 64-byte aligned: a vector kernel's per-call buffers (its quantized token), so
// that no 64-byte load of them splits across two cache lines (alloca aligns to 16 only, and where
// the stack pointer falls differs per thread and call depth: a kernel's speed varied per process).
#define SR_ALLOCA64(n) ((void*)(((uintptr_t)alloca((size_t)(n) + 63) + 63) & ~(uintptr_t)63))

// A grow-only 64-byte-aligned scratch buffer, one per thread and use (declare it `static
// thread_local`): the OpenMP pool's threads persist, so a kernel does not pay page faults for its
// scratch on every call (buffers over glibc's mmap threshold are otherwise mapped and unmapped
// each time). Freed when the thread ends. get() returns NULL when out of memory.
struct SrThreadBuf {
    void* p = nullptr;
    size_t cap = 0;
    ~SrThreadBuf() { free(p); }
    void* get(size_t bytes) {
        if (bytes > cap) {
            free(p);
            cap = (bytes + 4095) / 4096 * 4096;
            p = aligned_alloc(64, cap);
            if (!p) cap = 0;
        }
        return p;
    }
};

// ---------------------------------------------------------------------------------------------
// threading: split output rows into contiguous blocks (one stream per thread suits prefetchers)
// ---------------------------------------------------------------------------------------------
// How many row blocks: up to n_threads, each of at least min_rows_per_thread rows (at least one).
static inline int row_parts(int64_t n_rows, int n_threads, int64_t min_rows_per_thread) {
    const int64_t max_t = n_rows / (min_rows_per_thread > 0 ? min_rows_per_thread : 1);
    return max_t < n_threads ? (int)(max_t > 1 ? max_t : 1) : n_threads;
}

template <class F>
static void parallel_rows(int64_t n_rows, int n_threads, int64_t min_rows_per_thread, F f) {
#ifdef _OPENMP
    const int nt = row_parts(n_rows, n_threads, min_rows_per_thread);
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num(), T = omp_get_num_threads();
            int64_t r0 = n_rows * t / T, r1 = n_rows * (t + 1) / T;
            f(r0, r1);
        }
        return;
    }
#else
    (void)n_threads;
    (void)min_rows_per_thread;
#endif
    f((int64_t)0, n_rows);
}

#endif  // SR_COMMON_H

// Internal to the CPU kernels: the per-row routines of kernels.cpp that other CPU translation
// units (varlen.cpp) run on one row of tokens given by pointers, so that a packed batch's
// segments take exactly the dense ops' path.  Tokens are prepared (visprune.h: prepare_tokens),
// contiguous fp32, D floats each.
#pragma once

#include <cstdint>

#include "../visprune.h"

namespace visprune {
namespace cpu {

// Greedy selection among the n tokens y[0..n) (sq: their squared norms for l2, else null), the
// True ones of mask[0..n) (all when null): k local indices to out, in selection order; start -1
// is "auto".  Raises ValueError (naming `need` and, as "row", `row`) when fewer than need.value
// candidates, or a start that is not one.  `parallel`: split the row's work over the threads.
void greedy_tokens(const float* y, const float* sq, int64_t n, int64_t D, Metric metric,
                   const bool* mask, int64_t k, Objective objective, int64_t start, Count need,
                   int64_t row, bool parallel, int64_t* out);

// mi_scores of the n tokens v[0..n) against the M text tokens t[0..M) (tmask: valid ones, null
// for all; raises ValueError for none), into out[0..n).
void mi_tokens(const float* v, int64_t n, const float* t, int64_t M, const bool* tmask, int64_t D,
               Metric metric, int64_t row, bool parallel, float* out);

// The helpers of kernels.cpp that video.cpp shares: the dot product whose result depends only on
// the two vectors (dot_tile's lanes), whether at::mm on fp32 is true fp32 (torch's matmul
// precision not lowered), and whether this process runs the AVX-512 kernels (VISPRUNE_CPU_ISA).
float canonical_dot(const float* a, const float* b, int64_t D);
bool blas_fp32();
bool avx512();

}  // namespace cpu
}  // namespace visprune

// Declarations shared by the registration file (ops.cpp) and the CPU / CUDA kernels.
//
// The schemas (see ops.cpp) mirror visprune.reference with positional arguments; a greedy
// `start` of -1 means "auto".  ops.cpp checks what reads no tensor data (dims, dtypes, devices,
// shapes, option strings, counts against N) and composes each op from the kernels of one device
// (struct Kernels).  Checks that read tensor values (mask counts, index ranges, duplicates) are
// visprune.ops' (one host sync, skipped with validate=False or under torch.compile): the kernels
// never rely on them for memory safety.  The CPU kernels still raise ValueError for bad values
// they meet in their own work; the CUDA kernels never sync the host and never read or write out
// of bounds, whatever the values.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace visprune {

constexpr double kNormEps = 1e-12;  // F.normalize's eps: a zero token has cosine 0 with everything

enum class Metric { kCosine, kL2 };
enum class Objective { kMaxMin, kMaxSum };

// x as contiguous float32: the one fp32 copy of the tokens an op makes (none when x already is).
// Contiguous before any reduction over D, so that bitwise-identical tokens get bitwise-identical
// norms whatever the input's memory layout (a D-major view would round them by position).
at::Tensor fp32_tokens(const at::Tensor& x);

// The fp32 tokens exactly as the reference sees them, from xf = fp32_tokens(x): L2-normalised with
// F.normalize's ops for the cosine metric (zero, huge and non-finite tokens then behave the
// same), or xf itself and its squared norms (xf*xf).sum(-1) for l2 (sq undefined for cosine).
struct Prepared {
  at::Tensor y, sq;
};
Prepared prepare_tokens(const at::Tensor& xf, Metric metric);

// A count and the name of the argument it came from, for error messages.
struct Count {
  int64_t value;
  const char* name;
};

// What each device supplies; ops.cpp composes the four ops from these, once for both devices.
// Inputs are on the device, structurally checked; tensors given are contiguous where noted.
struct Kernels {
  // float32[B, N] text alignment scores of V against T (prepared with `metric`).
  at::Tensor (*mi_scores)(const Prepared& V, const Prepared& T,
                          const c10::optional<at::Tensor>& text_mask, Metric metric);
  // int64[B, k] greedy selection among the True tokens of mask (all when absent), in selection
  // order; B > 0, k > 0.  `need` is the candidate count every row must hold (k, or prune's
  // stage1_keep): the CPU kernel raises ValueError naming it, the CUDA kernel records -1 once a
  // row has no candidate left.
  at::Tensor (*greedy)(const Prepared& P, int64_t k, Objective objective, Metric metric,
                       const c10::optional<at::Tensor>& mask, int64_t start, Count need);
  // tokens[b, t] = x[b, index[b, t]] for a contiguous int64 index[B, K], any dtype of x.
  // `checked`: the indices come from the caller (CPU raises ValueError for one out of range or
  // repeated in its row; CUDA writes a zero row for one out of range).
  at::Tensor (*gather_rows)(const at::Tensor& x, const at::Tensor& index, bool checked);
};

namespace cpu {
const Kernels& kernels();
}  // namespace cpu

#ifdef VISPRUNE_WITH_CUDA
namespace cuda {
const Kernels& kernels();
}  // namespace cuda
#endif

}  // namespace visprune

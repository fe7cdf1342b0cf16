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
constexpr double kHolovEps = 1e-6;  // HoloV's x / (|x| + 1e-6) (visprune.common.HOLOV_EPS)

enum class Metric { kCosine, kL2 };
enum class Objective { kMaxMin, kMaxSum };
// received_attention's query rows (kMask: an explicit bool [B, L]) and head reduction.
enum class Queries { kAfter, kSpan, kLast, kMask };
enum class Heads { kMax, kMean };

// x as contiguous float32: the one fp32 copy of the tokens an op makes (none when x already is).
// Contiguous before any reduction over D, so that bitwise-identical tokens get bitwise-identical
// norms whatever the input's memory layout (a D-major view would round them by position).
at::Tensor fp32_tokens(const at::Tensor& x);

// The fp32 tokens exactly as the reference sees them, from xf = fp32_tokens(x): L2-normalised with
// F.normalize's ops for the cosine metric (zero, huge and non-finite tokens then behave the
// same), or xf itself and its squared norms (xf*xf).sum(-1) for l2 (sq undefined for cosine).
struct Prepared {
  at::Tensor y, sq;
  int64_t first_row = 0;  // the batch row of y[0] (ops run CPU batches in chunks; for messages)
};
Prepared prepare_tokens(const at::Tensor& xf, Metric metric);

// A count and the name of the argument it came from, for error messages.
struct Count {
  int64_t value;
  const char* name;
};

// What each device supplies; ops.cpp composes the ops from these, once for both devices.
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
  // float32[B, length]: the attention the keys [start_b, start_b + length) receive from the query
  // rows `queries` (visprune.reference.received_attention), for contiguous fp32 q[B, H, L, dh] and
  // k[B, Hkv, Lk, dh], a contiguous int64 start[B] and contiguous bool masks; B, L, length > 0.
  // Null where the device has no kernel for it (CUDA: the Triton backend serves CUDA tensors).
  at::Tensor (*received_attention)(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& start, int64_t length, Queries queries,
                                   const c10::optional<at::Tensor>& query_mask, Heads heads,
                                   const c10::optional<at::Tensor>& key_mask, double scale);
  // int64[B, k] greedy MAP of the conditional DPP L = diag(r) S diag(r) (S the cosine matrix of
  // the tokens, P prepared for the cosine metric; contiguous float32 r[B, N]) among the True
  // tokens of mask, in selection order (visprune.methods.cdpruner.dpp_map); B > 0, k > 0.  `need`
  // as for greedy.  Null where the device has no kernel (CUDA: the Triton backend serves it).
  at::Tensor (*dpp_map)(const Prepared& P, const at::Tensor& relevance, int64_t k,
                        const c10::optional<at::Tensor>& mask, double eps, Count need);
  // float32[B, N]: HoloV's similarity variance (visprune.methods.holov.similarity_variance) of
  // contiguous fp32 x[B, N, D] over `crops` >= 1 contiguous raster crops; B, N > 0.  Null where
  // the device has no kernel (CUDA: the Triton backend serves it).
  at::Tensor (*holov_variance)(const at::Tensor& x, int64_t crops);
};

// The varlen (packed, ragged batch) kernels of a device: a packed x[T, D] as a prepared P of
// shape [1, T, D], segment b = tokens [cu[b], cu[b+1]) for a contiguous int64 cu[B+1] on the
// device (validated by visprune.ops; the kernels clamp it into [0, T] and stay in bounds).
struct VarlenKernels {
  // float32[T]: mi_scores of segment b's tokens against text row b (T prepared [B, M, D]).
  at::Tensor (*mi_scores)(const Prepared& V, const Prepared& T, const at::Tensor& cu,
                          const c10::optional<at::Tensor>& text_mask, Metric metric);
  // int64[ck[B]]: greedy selection in every segment among its True tokens of mask[T] (all when
  // absent), segment b's ck[b+1] - ck[b] picks (global positions, in selection order) at
  // [ck[b], ck[b+1]) for a contiguous int64 ck[B+1] on the host; `start` local to every segment
  // (-1: auto).  need[b] (host int64[B]) is the candidate count segment b must hold, named
  // `need_name` in the CPU kernel's ValueError; the CUDA kernel records -1 instead.
  at::Tensor (*greedy)(const Prepared& P, const at::Tensor& cu, const at::Tensor& ck,
                       Objective objective, Metric metric, const c10::optional<at::Tensor>& mask,
                       int64_t start, const at::Tensor& need, const char* need_name);
};

namespace cpu {
const Kernels& kernels();
const VarlenKernels& varlen_kernels();

// The video ops (csrc/cpu/video.cpp; CUDA tensors use the Triton kernels).
// (centers[B, C], assign[B, N], density, delta, score [B, N]) of DPC-kNN on contiguous fp32
// xf[B, N, D]; B rows one after another, each split over the threads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpc_knn(
    const at::Tensor& xf, int64_t num_centers, int64_t k, const c10::optional<at::Tensor>& mask);
// The same on each segment [cu[b], cu[b+1]) of a packed xf ([1, T, D]; contiguous int64 cu on
// the host): centers[Σ C] global, the fields [T].  Raises ValueError for a segment with fewer
// candidates than its num_centers.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpc_knn_varlen(
    const at::Tensor& xf, const at::Tensor& cu, c10::IntArrayRef num_centers, int64_t k,
    const c10::optional<at::Tensor>& mask);
// (tokens[B, C, D] fp32, indices, sizes[B, C]) of the cluster merge of xf (contiguous fp32;
// the nearest-centre assignment by `metric` when assign is absent); centers contiguous int64
// [B, C].  blend absent: the plain mean; clamp_rule: a = max(β, 1/(n+1)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_merge(
    const at::Tensor& xf, Metric metric, const at::Tensor& centers,
    const c10::optional<at::Tensor>& assign, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weights, bool include_centers, c10::optional<double> blend,
    bool clamp_rule);
// float32[B, T, P]: the cosine of each token (P prepared for cosine, [B, T, P, D]) with the same
// position in frame ref[t], `fill` where ref[t] < 0.
at::Tensor temporal_similarity(const Prepared& P, c10::IntArrayRef ref, double fill);
}  // namespace cpu

#ifdef VISPRUNE_WITH_CUDA
namespace cuda {
const Kernels& kernels();
const VarlenKernels& varlen_kernels();
}  // namespace cuda
#endif

}  // namespace visprune

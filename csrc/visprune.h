// Declarations shared by the registration file (ops.cpp) and the CPU / CUDA kernels.
//
// The schemas (see ops.cpp) mirror visprune.reference with positional arguments; a greedy
// `start` of -1 means "auto".  Every function takes already-validated-by-ops.py arguments but
// re-checks what a direct torch.ops call could get wrong, raising ValueError / TypeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace visprune {

constexpr double kNormEps = 1e-12;  // F.normalize's eps: a zero token has cosine 0 with everything

enum class Metric { kCosine, kL2 };
enum class Objective { kMaxMin, kMaxSum };

// The fp32 tokens exactly as the reference sees them: x.float(), L2-normalised with
// F.normalize's ops for the cosine metric (zero, huge and non-finite tokens then behave the
// same), and the squared norms (x*x).sum(-1) for l2 (undefined for cosine).  Contiguous.
struct Prepared {
  at::Tensor y, sq;
};
Prepared prepare_tokens(const at::Tensor& x, Metric metric);

// Argument checks shared by both devices (defined in ops.cpp).  visprune.ops runs the same
// checks before dispatch; these catch direct torch.ops calls and compiled graphs, where the
// Python checks that read tensor values are skipped.
Metric parse_metric(c10::string_view name, const char* arg);
Objective parse_objective(c10::string_view name);
// x[B, N, D] floating, mask[B, N] bool, 0 <= k <= candidates of every row, start in [-1, N).
void check_select(const at::Tensor& x, const char* xname, int64_t k,
                  const c10::optional<at::Tensor>& mask, int64_t start);
// visual[B, N, D], text[B, M, D], text_mask[B, M] with a True in every row.
void check_text(const at::Tensor& visual, const at::Tensor& text,
                const c10::optional<at::Tensor>& text_mask);
// check_text + check_select(visual, stage1_keep, mask) + 0 <= keep <= stage1_keep; parses the
// three option strings.
struct PruneOptions {
  Metric mi_metric;
  Objective objective;
  Metric metric;
};
PruneOptions check_prune(const at::Tensor& visual, const at::Tensor& text, int64_t keep,
                         int64_t stage1_keep, const c10::optional<at::Tensor>& text_mask,
                         const c10::optional<at::Tensor>& mask, c10::string_view mi_metric,
                         c10::string_view objective, c10::string_view metric);
// Exactly one of index[B, K] (unique, in range) or mask[B, N] (same count per row).
void check_gather(const at::Tensor& x, const c10::optional<at::Tensor>& index,
                  const c10::optional<at::Tensor>& mask);

// The four ops, declared once for each device namespace.
#define VISPRUNE_DECLARE_OPS \
at::Tensor mi_scores(const at::Tensor& visual, const at::Tensor& text, \
                     const c10::optional<at::Tensor>& text_mask, c10::string_view metric); \
at::Tensor greedy_select(const at::Tensor& x, int64_t k, c10::string_view objective, \
                         c10::string_view metric, const c10::optional<at::Tensor>& mask, \
                         int64_t start); \
std::tuple<at::Tensor, at::Tensor> gather_compact(const at::Tensor& x, \
                                                  const c10::optional<at::Tensor>& index, \
                                                  const c10::optional<at::Tensor>& mask, bool sort); \
std::tuple<at::Tensor, at::Tensor, at::Tensor> prune( \
    const at::Tensor& visual, const at::Tensor& text, int64_t keep, int64_t stage1_keep, \
    const c10::optional<at::Tensor>& text_mask, const c10::optional<at::Tensor>& mask, \
    c10::string_view mi_metric, c10::string_view objective, c10::string_view metric);

namespace cpu {
VISPRUNE_DECLARE_OPS
}  // namespace cpu

#ifdef VISPRUNE_WITH_CUDA
namespace cuda {
VISPRUNE_DECLARE_OPS
}  // namespace cuda
#endif

}  // namespace visprune

// The one registration file of visprune._C: op schemas (torch.ops.visprune.*), the CPU and
// CUDA implementations, the argument checks both devices share, and the Python module.
// Fake (meta) implementations live in visprune/_ext.py, because gather_compact's mask form has a
// data-dependent output size that only a Python fake can express.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "visprune.h"

namespace visprune {

Metric parse_metric(c10::string_view name, const char* arg) {
  if (name == "cosine") return Metric::kCosine;
  if (name == "l2") return Metric::kL2;
  TORCH_CHECK_VALUE(false, arg, " must be one of ('cosine', 'l2'), got '", std::string(name), "'");
}

Objective parse_objective(c10::string_view name) {
  if (name == "maxmin") return Objective::kMaxMin;
  if (name == "maxsum") return Objective::kMaxSum;
  TORCH_CHECK_VALUE(false, "objective must be one of ('maxmin', 'maxsum'), got '",
                    std::string(name), "'");
}

Prepared prepare_tokens(const at::Tensor& x, Metric metric) {
  at::Tensor xf = x.to(at::kFloat);
  if (metric == Metric::kCosine) {
    const int64_t last[] = {-1};
    at::Tensor denom = at::linalg_vector_norm(xf, 2, last, /*keepdim=*/true).clamp_min(kNormEps);
    return {(xf / denom).contiguous(), at::Tensor()};
  }
  return {xf.contiguous(), (xf * xf).sum(-1).contiguous()};
}

static void check_floating(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must have shape ", layout, ", got shape ", t.sizes());
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
                   " must have dtype float32, float16, bfloat16, got ", s);
}

static void check_mask(const at::Tensor& m, const char* name, const at::Tensor& ref,
                       int64_t rows, int64_t cols, const char* layout) {
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, name, " must have dtype bool, got ",
                   m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == rows && m.size(1) == cols, name,
                    " must have shape ", layout, " = [", rows, ", ", cols, "], got ", m.sizes());
  TORCH_CHECK_VALUE(m.device() == ref.device(), name, " is on ", m.device(), " but the tokens are on ",
                    ref.device());
}

void check_select(const at::Tensor& x, const char* xname, int64_t k,
                  const c10::optional<at::Tensor>& mask, int64_t start) {
  check_floating(x, xname, "[B, N, D]");
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(start >= -1 && start < N, "start=", start, " is out of range for N=", N);
  if (!mask.has_value()) {
    TORCH_CHECK_VALUE(k <= N, "k=", k, " is larger than the number of candidate tokens (", N, ")");
    return;
  }
  check_mask(*mask, "mask", x, B, N, "[B, N]");
  if (B == 0 || k == 0) return;
  const int64_t avail = mask->sum(-1).min().item<int64_t>();
  TORCH_CHECK_VALUE(k <= avail, "k=", k, " is larger than the number of candidate tokens (", avail,
                    " in the sparsest mask row)");
  if (start >= 0) {
    TORCH_CHECK_VALUE(mask->select(1, start).all().item<bool>(), "start=", start,
                      " is not a candidate (mask is False there) in every row");
  }
}

void check_text(const at::Tensor& visual, const at::Tensor& text,
                const c10::optional<at::Tensor>& text_mask) {
  check_floating(visual, "visual", "[B, N, D]");
  check_floating(text, "text", "[B, M, D]");
  const int64_t B = visual.size(0), D = visual.size(2);
  TORCH_CHECK_VALUE(text.size(0) == B && text.size(2) == D, "text must have shape [B, M, D] = [", B,
                    ", M, ", D, "] to match visual, got ", text.sizes());
  TORCH_CHECK_VALUE(text.size(1) > 0, "text must have at least one token (M >= 1), got M=0");
  TORCH_CHECK_VALUE(text.device() == visual.device(), "text is on ", text.device(),
                    " but visual is on ", visual.device());
  if (text_mask.has_value()) {
    check_mask(*text_mask, "text_mask", visual, B, text.size(1), "[B, M]");
    TORCH_CHECK_VALUE(B == 0 || text_mask->any(-1).all().item<bool>(),
                      "text_mask has a row with no True entry: every row needs a text token");
  }
}

PruneOptions check_prune(const at::Tensor& visual, const at::Tensor& text, int64_t keep,
                         int64_t stage1_keep, const c10::optional<at::Tensor>& text_mask,
                         const c10::optional<at::Tensor>& mask, c10::string_view mi_metric,
                         c10::string_view objective, c10::string_view metric) {
  check_text(visual, text, text_mask);
  check_select(visual, "visual", stage1_keep, mask, -1);
  TORCH_CHECK_VALUE(0 <= keep && keep <= stage1_keep, "need keep <= stage1_keep, got keep=", keep,
                    ", stage1_keep=", stage1_keep);
  return {parse_metric(mi_metric, "mi_metric"), parse_objective(objective),
          parse_metric(metric, "metric")};
}

void check_gather(const at::Tensor& x, const c10::optional<at::Tensor>& index,
                  const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x must have shape [B, N, D], got shape ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(index.has_value() != mask.has_value(),
                    "gather_compact needs exactly one of index or mask");
  if (mask.has_value()) {
    check_mask(*mask, "mask", x, B, N, "[B, N]");
    if (B > 0) {
      const auto counts = mask->sum(-1);
      TORCH_CHECK_VALUE(!(counts != counts[0]).any().item<bool>(), "mask rows keep different counts ",
                        counts.cpu(), "; every row must keep the same number of tokens");
    }
    return;
  }
  const at::Tensor& idx = *index;
  TORCH_CHECK_TYPE(idx.dim() == 2 && at::isIntegralType(idx.scalar_type(), /*includeBool=*/false),
                   "index must be an integer tensor of shape [B, K], got ", idx.scalar_type(),
                   " tensor of shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.size(0) == B, "index must have shape [B, K] with B=", B, ", got ",
                    idx.sizes());
  TORCH_CHECK_VALUE(idx.device() == x.device(), "index is on ", idx.device(), " but x is on ",
                    x.device());
  if (idx.numel() == 0) return;
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < N, "index has values in [", lo, ", ", hi, "], expected [0, ", N,
                    ")");
  const auto srt = std::get<0>(idx.sort(-1));
  TORCH_CHECK_VALUE(!srt.narrow(1, 1, srt.size(1) - 1).eq(srt.narrow(1, 0, srt.size(1) - 1))
                         .any().item<bool>(),
                    "index has duplicate entries within a row");
}

}  // namespace visprune

TORCH_LIBRARY(visprune, m) {
  m.def("mi_scores(Tensor visual, Tensor text, Tensor? text_mask, str metric) -> Tensor");
  m.def("greedy_select(Tensor x, int k, str objective, str metric, Tensor? mask, int start) "
        "-> Tensor");
  m.def("gather_compact(Tensor x, Tensor? index, Tensor? mask, bool sort) -> (Tensor, Tensor)");
  m.def("prune(Tensor visual, Tensor text, int keep, int stage1_keep, Tensor? text_mask, "
        "Tensor? mask, str mi_metric, str objective, str metric) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(visprune, CPU, m) {
  m.impl("mi_scores", &visprune::cpu::mi_scores);
  m.impl("greedy_select", &visprune::cpu::greedy_select);
  m.impl("gather_compact", &visprune::cpu::gather_compact);
  m.impl("prune", &visprune::cpu::prune);
}

#ifdef VISPRUNE_WITH_CUDA
TORCH_LIBRARY_IMPL(visprune, CUDA, m) {
  m.impl("mi_scores", &visprune::cuda::mi_scores);
  m.impl("greedy_select", &visprune::cuda::greedy_select);
  m.impl("gather_compact", &visprune::cuda::gather_compact);
  m.impl("prune", &visprune::cuda::prune);
}
#endif

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "visprune's compiled kernels; the ops are torch.ops.visprune.*";
  mod.def("has_cpu", [] { return true; }, "The CPU kernels are built (always, when _C imports).");
  mod.def("has_cuda", [] {
#ifdef VISPRUNE_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in.");
}

// The one registration file of visprune._C: op schemas (torch.ops.visprune.*), the structural
// argument checks, and the composition of each op from the kernels of one device (the same code
// for CPU and CUDA; csrc/cpu and csrc/cuda supply only their Kernels), and the Python module.
// Fake (meta) implementations live in visprune/_ext.py, because gather_compact's mask form has a
// data-dependent output size that only a Python fake can express.
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "visprune.h"

namespace visprune {

at::Tensor fp32_tokens(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x.contiguous();
  return at::empty(x.sizes(), x.options().dtype(at::kFloat)).copy_(x);
}

Prepared prepare_tokens(const at::Tensor& xf, Metric metric) {
  if (metric == Metric::kCosine) {
    const int64_t last[] = {-1};
    at::Tensor denom = at::linalg_vector_norm(xf, 2, last, /*keepdim=*/true).clamp_min(kNormEps);
    return {(xf / denom).contiguous(), at::Tensor()};
  }
  return {xf, (xf * xf).sum(-1).contiguous()};
}

namespace {

// --------------------------------------------------------------------------- structural checks
// These read no tensor data: no host sync, and they hold in compiled graphs too.
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

void check_floating(const at::Tensor& t, const char* name, const char* layout, int64_t ndim = 3) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must have shape ", layout, ", got shape ", t.sizes());
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
                   " must have dtype float32, float16, bfloat16, got ", s);
}

void check_mask(const at::Tensor& m, const char* name, const at::Tensor& ref, int64_t rows,
                int64_t cols, const char* layout) {
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, name, " must have dtype bool, got ",
                   m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == rows && m.size(1) == cols, name,
                    " must have shape ", layout, " = [", rows, ", ", cols, "], got ", m.sizes());
  TORCH_CHECK_VALUE(m.device() == ref.device(), name, " is on ", m.device(),
                    " but the tokens are on ", ref.device());
}

// x[B, N, D] floating, mask[B, N] bool, 0 <= k <= N, start in [-1, N).
void check_select(const at::Tensor& x, const char* xname, Count k,
                  const c10::optional<at::Tensor>& mask, int64_t start) {
  check_floating(x, xname, "[B, N, D]");
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(k.value >= 0, k.name, " must be >= 0, got ", k.value);
  TORCH_CHECK_VALUE(k.value <= N, k.name, "=", k.value,
                    " is larger than the number of candidate tokens (N=", N, ")");
  TORCH_CHECK_VALUE(start >= -2 && start < N, "start=", start, " is out of range for N=", N);
  if (mask.has_value()) check_mask(*mask, "mask", x, B, N, "[B, N]");
}

// visual[B, N, D], text[B, M, D] with M >= 1 on the same device, text_mask[B, M] bool.
void check_text(const at::Tensor& visual, const at::Tensor& text,
                const c10::optional<at::Tensor>& text_mask) {
  check_floating(visual, "visual", "[B, N, D]");
  check_floating(text, "text", "[B, M, D]");
  const int64_t B = visual.size(0), D = visual.size(2);
  TORCH_CHECK_VALUE(text.size(0) == B && text.size(2) == D, "text must have shape [B, M, D] = [",
                    B, ", M, ", D, "] to match visual, got ", text.sizes());
  TORCH_CHECK_VALUE(text.size(1) > 0, "text must have at least one token (M >= 1), got M=0");
  TORCH_CHECK_VALUE(text.device() == visual.device(), "text is on ", text.device(),
                    " but visual is on ", visual.device());
  if (text_mask.has_value()) check_mask(*text_mask, "text_mask", visual, B, text.size(1), "[B, M]");
}

// Exactly one of index[B, K] (integer) or mask[B, N] (bool), on x's device.
void check_gather(const at::Tensor& x, const c10::optional<at::Tensor>& index,
                  const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x must have shape [B, N, D], got shape ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(index.has_value() != mask.has_value(),
                    "gather_compact needs exactly one of index or mask");
  if (mask.has_value()) {
    check_mask(*mask, "mask", x, B, N, "[B, N]");
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
}

Queries parse_queries(c10::string_view name, const c10::optional<at::Tensor>& query_mask) {
  const bool mask = name == "mask";
  TORCH_CHECK_VALUE(mask == query_mask.has_value(), "queries='", std::string(name), "' ",
                    mask ? "needs" : "takes no", " query_mask");
  if (mask) return Queries::kMask;
  if (name == "after") return Queries::kAfter;
  if (name == "span") return Queries::kSpan;
  if (name == "last") return Queries::kLast;
  TORCH_CHECK_VALUE(false, "queries must be one of ('after', 'span', 'last', 'mask'), got '",
                    std::string(name), "'");
}

Heads parse_heads(c10::string_view name) {
  if (name == "max") return Heads::kMax;
  if (name == "mean") return Heads::kMean;
  TORCH_CHECK_VALUE(false, "heads must be one of ('max', 'mean'), got '", std::string(name), "'");
}

// q[B, H, L, dh], k[B, Hkv, Lk, dh] of one floating dtype with H % Hkv == 0 and Lk >= L,
// start int64[B], 0 <= length <= Lk, masks bool [B, L] / [B, Lk], scale > 0, one device.
void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& start,
                     int64_t length, const c10::optional<at::Tensor>& query_mask,
                     const c10::optional<at::Tensor>& key_mask, double scale) {
  check_floating(q, "q", "[B, H, L, dh]", 4);
  check_floating(k, "k", "[B, Hkv, Lk, dh]", 4);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k has dtype ", k.scalar_type(),
                   " but q has ", q.scalar_type(), "; they must have the same dtype");
  TORCH_CHECK_VALUE(k.device() == q.device(), "k is on ", k.device(), " but q is on ", q.device());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), dh = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == dh, "k must have shape [B, Hkv, Lk, dh] with B=",
                    B, " and dh=", dh, " to match q, got ", k.sizes());
  TORCH_CHECK_VALUE(dh >= 1, "q must have dh >= 1, got shape ", q.sizes());
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, "k's head count Hkv=", Hkv,
                    " must divide q's H=", H, " (H % Hkv == 0)");
  TORCH_CHECK_VALUE(Lk >= L, "k must have at least as many positions as q (Lk >= L), got Lk=", Lk,
                    ", L=", L);
  TORCH_CHECK_TYPE(start.scalar_type() == at::kLong, "start must have dtype int64, got ",
                   start.scalar_type());
  TORCH_CHECK_VALUE(start.dim() == 1 && start.size(0) == B, "start must have shape [B] = [", B,
                    "], got ", start.sizes());
  TORCH_CHECK_VALUE(start.device() == q.device(), "start is on ", start.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_VALUE(length >= 0 && length <= Lk, "length must be in [0, Lk=", Lk, "], got ", length);
  if (query_mask.has_value()) check_mask(*query_mask, "query_mask", q, B, L, "[B, L]");
  if (key_mask.has_value()) check_mask(*key_mask, "key_mask", q, B, Lk, "[B, Lk]");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be a positive finite float, got ",
                    scale);
}

// --------------------------------------------------------------------------- CPU row chunks
// A CPU temporary above glibc's largest mmap threshold (32 MiB) is mapped afresh by every call,
// and first touching its pages costs as much as the kernels: normalising B = 8, N = 576,
// D = 4096 fp32 tokens takes 27 ms into a new tensor, 3.4 ms into an existing one.  The CPU ops
// on [B, N, D] tokens therefore run on chunks of rows whose fp32 copy stays under kChunkBytes,
// each chunk's temporaries reusing the memory the one before freed; a chunk still holds at least
// as many rows as threads (a multiple of them where more fit), so rows keep running in parallel
// (on many cores that chunk may exceed kChunkBytes again).  CUDA runs a batch at once.  Every
// row's result is the same either way.
constexpr int64_t kChunkBytes = int64_t(24) << 20;

int64_t chunk_rows(const at::Tensor& x) {
  const int64_t B = x.size(0);
  if (!x.is_cpu() || B <= 1) return B;
  const int64_t row = std::max<int64_t>(1, x.size(1) * x.size(2) * int64_t(sizeof(float)));
  const int64_t threads = at::get_num_threads();
  int64_t n = kChunkBytes / row;
  n = n >= threads ? n - n % threads : threads;
  return std::min(n, B);
}

// Rows [b0, b0 + n) of an optional per-row tensor.
c10::optional<at::Tensor> rows(const c10::optional<at::Tensor>& t, int64_t b0, int64_t n) {
  if (!t.has_value()) return t;
  return t->narrow(0, b0, n);
}

// f(b0, n) on each chunk of x's rows, the results concatenated along dim 0.
template <class F>
at::Tensor by_chunks(const at::Tensor& x, const F& f) {
  const int64_t B = x.size(0), n = chunk_rows(x);
  if (n >= B) return f(0, B);
  std::vector<at::Tensor> parts;
  for (int64_t b0 = 0; b0 < B; b0 += n) parts.push_back(f(b0, std::min(n, B - b0)));
  return at::cat(parts);
}

Prepared prepare_rows(const at::Tensor& x, int64_t b0, int64_t n, Metric metric) {
  Prepared p = prepare_tokens(fp32_tokens(x.narrow(0, b0, n)), metric);
  p.first_row = b0;
  return p;
}

// --------------------------------------------------------------------------- the ops
at::Tensor mi_scores(const at::Tensor& visual, const at::Tensor& text,
                     const c10::optional<at::Tensor>& text_mask, c10::string_view metric_name,
                     const Kernels& K) {
  check_text(visual, text, text_mask);
  const Metric metric = parse_metric(metric_name, "metric");
  const c10::DeviceGuard guard(visual.device());
  return by_chunks(visual, [&](int64_t b0, int64_t n) {
    return K.mi_scores(prepare_rows(visual, b0, n, metric), prepare_rows(text, b0, n, metric),
                       rows(text_mask, b0, n), metric);
  });
}

at::Tensor greedy_select(const at::Tensor& x, int64_t k, c10::string_view objective_name,
                         c10::string_view metric_name, const c10::optional<at::Tensor>& mask,
                         int64_t start, const Kernels& K) {
  check_select(x, "x", {k, "k"}, mask, start);
  const Objective objective = parse_objective(objective_name);
  const Metric metric = parse_metric(metric_name, "metric");
  const c10::DeviceGuard guard(x.device());
  if (x.size(0) == 0 || k == 0) return at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  return by_chunks(x, [&](int64_t b0, int64_t n) {
    return K.greedy(prepare_rows(x, b0, n, metric), k, objective, metric, rows(mask, b0, n), start,
                    {k, "k"});
  });
}

std::tuple<at::Tensor, at::Tensor> gather_compact(const at::Tensor& x,
                                                  const c10::optional<at::Tensor>& index,
                                                  const c10::optional<at::Tensor>& mask, bool sort,
                                                  const Kernels& K) {
  check_gather(x, index, mask);
  const c10::DeviceGuard guard(x.device());
  const int64_t B = x.size(0);
  at::Tensor idx;
  if (mask.has_value()) {
    // The output size depends on the mask: one read of the fewest and most kept per row (the
    // sync this form needs anyway) also tells whether the rows agree.
    int64_t K_rows = 0;
    if (B > 0) {
      const at::Tensor counts = mask->sum(-1);
      const at::Tensor range = at::stack({counts.min(), counts.max()}).cpu();
      const int64_t lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
      TORCH_CHECK_VALUE(lo == hi, "mask rows keep different counts (from ", lo, " to ", hi,
                        "); every row must keep the same number of tokens");
      K_rows = lo;
    }
    idx = mask->nonzero().select(1, 1).reshape({B, K_rows}).contiguous();  // -1 fails when B == 0
    return {K.gather_rows(x, idx, /*checked=*/false), idx};
  }
  // A new tensor either way: the caller's index is never returned.
  idx = sort ? std::get<0>(index->to(at::kLong).sort(-1)).contiguous()
             : index->to(index->options().dtype(at::kLong), /*non_blocking=*/false, /*copy=*/true,
                         at::MemoryFormat::Contiguous);
  return {K.gather_rows(x, idx, /*checked=*/true), idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune(
    const at::Tensor& visual, const at::Tensor& text, int64_t keep, int64_t stage1_keep,
    const c10::optional<at::Tensor>& text_mask, const c10::optional<at::Tensor>& mask,
    c10::string_view mi_metric_name, c10::string_view objective_name,
    c10::string_view metric_name, const Kernels& K, int64_t first_row = 0) {
  check_text(visual, text, text_mask);
  check_select(visual, "visual", {stage1_keep, "stage1_keep"}, mask, -1);
  TORCH_CHECK_VALUE(0 <= keep && keep <= stage1_keep, "need 0 <= keep <= stage1_keep, got keep=",
                    keep, ", stage1_keep=", stage1_keep);
  const Metric mi_metric = parse_metric(mi_metric_name, "mi_metric");
  const Objective objective = parse_objective(objective_name);
  const Metric metric = parse_metric(metric_name, "metric");
  const c10::DeviceGuard guard(visual.device());
  const int64_t B = visual.size(0);
  const at::Tensor lengths = at::full({B}, keep, visual.options().dtype(at::kLong));
  if (B == 0 || keep == 0) {
    const at::Tensor none = at::empty({B, keep}, visual.options().dtype(at::kLong));
    return {K.gather_rows(visual, none, /*checked=*/false), none, lengths};
  }

  const int64_t step = chunk_rows(visual);
  if (step < B) {
    std::vector<at::Tensor> parts[3];
    for (int64_t b0 = 0; b0 < B; b0 += step) {
      const int64_t n = std::min(step, B - b0);
      const auto r = prune(visual.narrow(0, b0, n), text.narrow(0, b0, n), keep, stage1_keep,
                           rows(text_mask, b0, n), rows(mask, b0, n), mi_metric_name,
                           objective_name, metric_name, K, b0);
      parts[0].push_back(std::get<0>(r));
      parts[1].push_back(std::get<1>(r));
      parts[2].push_back(std::get<2>(r));
    }
    return {at::cat(parts[0]), at::cat(parts[1]), at::cat(parts[2])};
  }

  // One fp32 conversion of the visual tokens serves both metrics (cosine then normalises it).
  const at::Tensor xf = fp32_tokens(visual);
  Prepared VM = prepare_tokens(xf, mi_metric);
  VM.first_row = first_row;
  Prepared VG = metric == mi_metric ? VM : prepare_tokens(xf, metric);
  VG.first_row = first_row;
  const at::Tensor score =
      K.mi_scores(VM, prepare_tokens(fp32_tokens(text), mi_metric), text_mask, mi_metric);

  // Stage 1: the reference's topk_mask (NaN and -inf after every real score, +inf as the largest
  // float, non-candidates last, ties to the lowest index through a stable sort).  Only candidates
  // survive, so a stage1_keep above a row's candidate count leaves that row fewer survivors
  // (the greedy kernel's `need` then reports it on CPU).
  const float lowest = std::numeric_limits<float>::lowest();
  at::Tensor key = at::nan_to_num(score, lowest, c10::nullopt, lowest);
  if (mask.has_value()) key = key.masked_fill(~*mask, -std::numeric_limits<float>::infinity());
  const at::Tensor order = std::get<1>(key.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true))
                               .narrow(1, 0, stage1_keep);
  at::Tensor survivors = at::zeros_like(key, key.options().dtype(at::kBool)).scatter_(1, order, true);
  if (mask.has_value()) survivors &= *mask;

  // Stage 2 and the compaction in original order.
  const at::Tensor chosen = std::get<0>(
      K.greedy(VG, keep, objective, metric, survivors, -1, {stage1_keep, "stage1_keep"}).sort(-1))
                                .contiguous();
  return {K.gather_rows(visual, chosen, /*checked=*/false), chosen, lengths};
}

at::Tensor received_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& start,
                              int64_t length, c10::string_view queries_name,
                              const c10::optional<at::Tensor>& query_mask,
                              c10::string_view heads_name,
                              const c10::optional<at::Tensor>& key_mask, double scale,
                              const Kernels& K) {
  check_attention(q, k, start, length, query_mask, key_mask, scale);
  const Queries queries = parse_queries(queries_name, query_mask);
  const Heads heads = parse_heads(heads_name);
  TORCH_CHECK_NOT_IMPLEMENTED(K.received_attention != nullptr,
                              "received_attention has no kernel in visprune._C for ",
                              q.device().type(), " tensors; use backend='triton' (the default "
                              "for CUDA tensors) or backend='reference'");
  const c10::DeviceGuard guard(q.device());
  const int64_t B = q.size(0), L = q.size(2);
  if (B == 0 || L == 0 || length == 0) return at::zeros({B, length}, q.options().dtype(at::kFloat));
  const auto contiguous = [](const c10::optional<at::Tensor>& m) -> c10::optional<at::Tensor> {
    if (!m.has_value()) return c10::nullopt;
    return m->contiguous();
  };
  return K.received_attention(fp32_tokens(q), fp32_tokens(k), start.contiguous(), length, queries,
                              contiguous(query_mask), heads, contiguous(key_mask), scale);
}

at::Tensor dpp_map(const at::Tensor& x, const at::Tensor& relevance, int64_t k,
                   const c10::optional<at::Tensor>& mask, double eps, const Kernels& K) {
  check_select(x, "x", {k, "k"}, mask, -1);
  check_floating(relevance, "relevance", "[B, N]", 2);
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(relevance.size(0) == B && relevance.size(1) == N,
                    "relevance must have shape [B, N] = [", B, ", ", N, "] to match x, got ",
                    relevance.sizes());
  TORCH_CHECK_VALUE(relevance.device() == x.device(), "relevance is on ", relevance.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be a finite float >= 0, got ", eps);
  TORCH_CHECK_NOT_IMPLEMENTED(K.dpp_map != nullptr, "dpp_map has no kernel in visprune._C for ",
                              x.device().type(), " tensors; use backend='triton' (the default "
                              "for CUDA tensors) or backend='reference'");
  const c10::DeviceGuard guard(x.device());
  if (B == 0 || k == 0) return at::empty({B, k}, x.options().dtype(at::kLong));
  return by_chunks(x, [&](int64_t b0, int64_t n) {
    return K.dpp_map(prepare_rows(x, b0, n, Metric::kCosine),
                     fp32_tokens(relevance.narrow(0, b0, n)), k, rows(mask, b0, n), eps, {k, "k"});
  });
}

at::Tensor holov_variance(const at::Tensor& features, int64_t num_crops, const Kernels& K) {
  check_floating(features, "features", "[B, N, D]");
  TORCH_CHECK_VALUE(num_crops >= 1, "num_crops must be >= 1, got ", num_crops);
  TORCH_CHECK_NOT_IMPLEMENTED(K.holov_variance != nullptr,
                              "holov_variance has no kernel in visprune._C for ",
                              features.device().type(), " tensors; use backend='triton' (the "
                              "default for CUDA tensors) or backend='reference'");
  const c10::DeviceGuard guard(features.device());
  if (features.size(0) == 0 || features.size(1) == 0)
    return at::zeros({features.size(0), features.size(1)}, features.options().dtype(at::kFloat));
  return by_chunks(features, [&](int64_t b0, int64_t n) {
    return K.holov_variance(fp32_tokens(features.narrow(0, b0, n)), num_crops);
  });
}

// --------------------------------------------------------------------------- varlen (ragged) ops
// A packed x[T, D] holds B segments, segment b = rows [cu[b], cu[b+1]) (int32/int64 cu[B+1] on
// x's device).  Its values (0 first, non-decreasing, T last) are visprune.ops' checks; the
// kernels clamp them into [0, T].  Counts per segment come as int lists (their total sizes the
// output, so a compiled graph knows it).

// cu_seqlens: 1-D int32/int64 with B+1 >= 1 entries on x's device; returns it as int64.
at::Tensor check_cu(const at::Tensor& x, const at::Tensor& cu) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong,
                   "cu_seqlens must have dtype int32, int64, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1,
                    "cu_seqlens must have shape [B+1] (at least one entry), got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == x.device(), "cu_seqlens is on ", cu.device(),
                    " but the tokens are on ", x.device());
  return cu.to(at::kLong).contiguous();
}

void check_mask1d(const c10::optional<at::Tensor>& mask, const at::Tensor& x) {
  if (!mask.has_value()) return;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must have dtype bool, got ",
                   mask->scalar_type());
  TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == x.size(0), "mask must have shape [T] = [",
                    x.size(0), "], got ", mask->sizes());
  TORCH_CHECK_VALUE(mask->device() == x.device(), "mask is on ", mask->device(),
                    " but the tokens are on ", x.device());
}

// The cumulative counts [0, k0, k0+k1, ...] as a host int64 tensor [B+1]; every count >= 0.
at::Tensor offsets(c10::IntArrayRef k, int64_t B, const char* name) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(k.size()) == B, name, " must have one count per segment (B=",
                    B, "), got ", k.size());
  at::Tensor ck = at::empty({B + 1}, at::kLong);
  int64_t* c = ck.data_ptr<int64_t>();
  c[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(k[b] >= 0, name, " must be >= 0 in every segment, got ", k[b]);
    c[b + 1] = c[b] + k[b];
  }
  return ck;
}

// bool[T]: the k[b] highest scores of each segment (the dense stage 1's order: NaN and -inf after
// every real score, non-candidates last, ties to the lowest index), only where mask is True.
// Two stable sorts of all T scores (by score, then by segment) serve every segment at once.
at::Tensor varlen_topk_mask(const at::Tensor& score, const at::Tensor& cu, const at::Tensor& k,
                            const c10::optional<at::Tensor>& mask) {
  const int64_t T = score.size(0), B = cu.numel() - 1;
  if (T == 0) return at::zeros({0}, score.options().dtype(at::kBool));
  const float lowest = std::numeric_limits<float>::lowest();
  at::Tensor key = at::nan_to_num(score, lowest, c10::nullopt, lowest);
  if (mask.has_value()) key = key.masked_fill(~*mask, -std::numeric_limits<float>::infinity());
  at::Tensor order = std::get<1>(key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor seg = at::searchsorted(cu.slice(0, 1).contiguous(), order, /*out_int32=*/false,
                                          /*right=*/true)
                             .clamp(0, std::max<int64_t>(B - 1, 0));
  auto by_seg = seg.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& seg_sorted = std::get<0>(by_seg);
  order = order.index_select(0, std::get<1>(by_seg));
  const at::Tensor rank =
      at::arange(T, order.options()) - cu.clamp(0, T).index_select(0, seg_sorted);
  const at::Tensor keep = rank < k.to(order.device()).to(at::kLong).index_select(0, seg_sorted);
  at::Tensor top = at::zeros({T}, keep.options()).scatter_(0, order, keep);
  return mask.has_value() ? top & *mask : top;
}

at::Tensor greedy_select_varlen(const at::Tensor& x, const at::Tensor& cu_seqlens,
                                c10::IntArrayRef k, c10::string_view objective_name,
                                c10::string_view metric_name,
                                const c10::optional<at::Tensor>& mask, int64_t start,
                                const VarlenKernels& V) {
  check_floating(x, "x", "[T, D]", 2);
  const at::Tensor cu = check_cu(x, cu_seqlens);
  check_mask1d(mask, x);
  TORCH_CHECK_VALUE(start >= -2, "start=", start,
                    " must be >= 0 (local to each segment), -1 (auto) or -2 (linear)");
  const Objective objective = parse_objective(objective_name);
  const Metric metric = parse_metric(metric_name, "metric");
  const int64_t B = cu.numel() - 1;
  const at::Tensor ck = offsets(k, B, "k");
  const c10::DeviceGuard guard(x.device());
  if (ck[B].item<int64_t>() == 0) return at::empty({0}, x.options().dtype(at::kLong));
  return V.greedy(prepare_tokens(fp32_tokens(x.unsqueeze(0)), metric), cu, ck, objective, metric,
                  mask, start, at::tensor(k, at::kLong).to(x.device()), "k");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_varlen(
    const at::Tensor& visual, const at::Tensor& cu_seqlens, const at::Tensor& text,
    c10::IntArrayRef keep, const at::Tensor& stage1_keep,
    const c10::optional<at::Tensor>& text_mask, const c10::optional<at::Tensor>& mask,
    c10::string_view mi_metric_name, c10::string_view objective_name,
    c10::string_view metric_name, const Kernels& K, const VarlenKernels& V) {
  check_floating(visual, "visual", "[T, D]", 2);
  const at::Tensor cu = check_cu(visual, cu_seqlens);
  const int64_t B = cu.numel() - 1, D = visual.size(1);
  check_floating(text, "text", "[B, M, D]");
  TORCH_CHECK_VALUE(text.size(0) == B && text.size(2) == D, "text must have shape [B, M, D] = [",
                    B, ", M, ", D, "] to match visual and cu_seqlens, got ", text.sizes());
  TORCH_CHECK_VALUE(text.size(1) > 0, "text must have at least one token (M >= 1), got M=0");
  TORCH_CHECK_VALUE(text.device() == visual.device(), "text is on ", text.device(),
                    " but visual is on ", visual.device());
  if (text_mask.has_value()) check_mask(*text_mask, "text_mask", visual, B, text.size(1), "[B, M]");
  check_mask1d(mask, visual);
  TORCH_CHECK_TYPE(at::isIntegralType(stage1_keep.scalar_type(), /*includeBool=*/false),
                   "stage1_keep must be an integer tensor of shape [B], got ",
                   stage1_keep.scalar_type());
  TORCH_CHECK_VALUE(stage1_keep.dim() == 1 && stage1_keep.size(0) == B,
                    "stage1_keep must have shape [B] = [", B, "], got ", stage1_keep.sizes());
  TORCH_CHECK_VALUE(stage1_keep.device() == visual.device(), "stage1_keep is on ",
                    stage1_keep.device(), " but visual is on ", visual.device());
  const Metric mi_metric = parse_metric(mi_metric_name, "mi_metric");
  const Objective objective = parse_objective(objective_name);
  const Metric metric = parse_metric(metric_name, "metric");
  const at::Tensor ck = offsets(keep, B, "keep");
  const c10::DeviceGuard guard(visual.device());
  const at::Tensor lengths = at::tensor(keep, at::kLong).to(visual.device());
  if (ck[B].item<int64_t>() == 0) {
    const at::Tensor none = at::empty({0}, visual.options().dtype(at::kLong));
    return {at::empty({0, D}, visual.options()), none, lengths};
  }

  // One fp32 conversion of the visual tokens serves both metrics, as in prune.
  const at::Tensor xf = fp32_tokens(visual.unsqueeze(0));
  const Prepared VM = prepare_tokens(xf, mi_metric);
  const Prepared VG = metric == mi_metric ? VM : prepare_tokens(xf, metric);
  const at::Tensor score =
      V.mi_scores(VM, prepare_tokens(fp32_tokens(text), mi_metric), cu, text_mask, mi_metric);
  const at::Tensor survivors = varlen_topk_mask(score, cu, stage1_keep, mask);
  // Segments hold ascending, disjoint ranges: one sort orders each segment's picks.
  const at::Tensor chosen =
      std::get<0>(V.greedy(VG, cu, ck, objective, metric, survivors, -1, stage1_keep,
                           "stage1_keep")
                      .sort(-1))
          .contiguous();
  return {K.gather_rows(visual.unsqueeze(0), chosen.unsqueeze(0), /*checked=*/false).squeeze(0),
          chosen, lengths};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_compact_varlen(
    const at::Tensor& x, const at::Tensor& cu_seqlens, const c10::optional<at::Tensor>& index,
    const c10::optional<at::Tensor>& mask, bool sort, const Kernels& K) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must have shape [T, D], got shape ", x.sizes());
  const at::Tensor cu = check_cu(x, cu_seqlens);
  TORCH_CHECK_VALUE(index.has_value() != mask.has_value(),
                    "gather_compact_varlen needs exactly one of index or mask");
  const c10::DeviceGuard guard(x.device());
  at::Tensor idx, ordered;
  bool checked = false;
  if (mask.has_value()) {
    check_mask1d(mask, x);
    ordered = idx = mask->nonzero().select(1, 0).contiguous();  // the kept count: one sync
  } else {
    const at::Tensor& i = *index;
    TORCH_CHECK_TYPE(i.dim() == 1 && at::isIntegralType(i.scalar_type(), /*includeBool=*/false),
                     "index must be an integer tensor of shape [K], got ", i.scalar_type(),
                     " tensor of shape ", i.sizes());
    TORCH_CHECK_VALUE(i.device() == x.device(), "index is on ", i.device(), " but x is on ",
                      x.device());
    // Each segment's entries are together and segments hold ascending ranges: one global sort
    // orders every segment's entries and keeps the segments in place.
    ordered = std::get<0>(i.to(at::kLong).sort(-1)).contiguous();
    idx = sort ? ordered
               : i.to(i.options().dtype(at::kLong), /*non_blocking=*/false, /*copy=*/true,
                      at::MemoryFormat::Contiguous);
    checked = true;
  }
  return {K.gather_rows(x.unsqueeze(0), idx.unsqueeze(0), checked).squeeze(0), idx,
          at::searchsorted(ordered, cu)};
}

// --------------------------------------------------------------------------- video ops (CPU)
// x[B, N, D] (D >= 1), 0 <= num_centers <= N, k >= 1, mask[B, N]: DPC-kNN.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpc_knn(
    const at::Tensor& x, int64_t num_centers, int64_t k, const c10::optional<at::Tensor>& mask) {
  check_floating(x, "x", "[B, N, D]");
  TORCH_CHECK_VALUE(x.size(2) >= 1, "x must have D >= 1, got shape ", x.sizes());
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(0 <= num_centers && num_centers <= x.size(1), "num_centers=", num_centers,
                    " is out of range for N=", x.size(1));
  if (mask.has_value()) check_mask(*mask, "mask", x, x.size(0), x.size(1), "[B, N]");
  return cpu::dpc_knn(fp32_tokens(x), num_centers, k, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpc_knn_varlen(
    const at::Tensor& x, const at::Tensor& cu_seqlens, c10::IntArrayRef num_centers, int64_t k,
    const c10::optional<at::Tensor>& mask) {
  check_floating(x, "x", "[T, D]", 2);
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x must have D >= 1, got shape ", x.sizes());
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  const at::Tensor cu = check_cu(x, cu_seqlens);
  check_mask1d(mask, x);
  offsets(num_centers, cu.numel() - 1, "num_centers");
  return cpu::dpc_knn_varlen(fp32_tokens(x.unsqueeze(0)), cu, num_centers, k, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_merge(
    const at::Tensor& x, const at::Tensor& centers, const c10::optional<at::Tensor>& assign,
    c10::string_view metric_name, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weights, bool include_centers, c10::optional<double> blend,
    c10::string_view blend_rule) {
  check_floating(x, "x", "[B, N, D]");
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK_TYPE(centers.dim() == 2 && at::isIntegralType(centers.scalar_type(), false),
                   "centers must be an integer tensor of shape [B, C], got ",
                   centers.scalar_type(), " tensor of shape ", centers.sizes());
  TORCH_CHECK_VALUE(centers.size(0) == B && centers.size(1) <= N, "centers must have shape [B, C] "
                    "with B=", B, " and C <= N=", N, ", got ", centers.sizes());
  const Metric metric = parse_metric(metric_name, "metric");
  TORCH_CHECK_VALUE(blend_rule == "clamp" || blend_rule == "fixed",
                    "blend_rule must be one of ('clamp', 'fixed'), got '", std::string(blend_rule),
                    "'");
  TORCH_CHECK_VALUE(!blend.has_value() || (*blend >= 0.0 && *blend <= 1.0),
                    "blend must be in [0, 1], got ", blend.value_or(0.0));
  if (mask.has_value()) check_mask(*mask, "mask", x, B, N, "[B, N]");
  if (assign.has_value())
    TORCH_CHECK_VALUE(assign->dim() == 2 && assign->size(0) == B && assign->size(1) == N,
                      "assign must have shape [B, N] = [", B, ", ", N, "], got ", assign->sizes());
  if (weights.has_value())
    TORCH_CHECK_VALUE(weights->dim() == 2 && weights->size(0) == B && weights->size(1) == N,
                      "weights must have shape [B, N] = [", B, ", ", N, "], got ",
                      weights->sizes());
  const at::Tensor ce = centers.to(at::kLong).contiguous();
  if (ce.numel() > 0) {
    const int64_t lo = ce.min().item<int64_t>(), hi = ce.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < N, "centers has values in [", lo, ", ", hi,
                      "], expected [0, ", N, ")");
  }
  const at::Tensor xf = fp32_tokens(x);
  auto r = cpu::cluster_merge(xf, metric, ce, assign, mask, weights, include_centers, blend,
                              blend_rule == "clamp");
  return {std::get<0>(r).to(x.scalar_type()), std::get<1>(r), std::get<2>(r)};
}

at::Tensor temporal_similarity(const at::Tensor& video, c10::optional<c10::IntArrayRef> reference,
                               double fill) {
  check_floating(video, "video", "[B, T, P, D]", 4);
  const int64_t T = video.size(1);
  std::vector<int64_t> ref(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) ref[t] = t - 1;
  if (reference.has_value()) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(reference->size()) == T,
                      "reference must have one entry per frame (T=", T, "), got ",
                      reference->size());
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK_VALUE((*reference)[t] >= -1 && (*reference)[t] < T,
                        "reference must hold frames in [-1, T=", T, "), got ", (*reference)[t]);
      ref[t] = (*reference)[t];
    }
  }
  return cpu::temporal_similarity(prepare_tokens(fp32_tokens(video), Metric::kCosine), ref, fill);
}

}  // namespace
}  // namespace visprune

TORCH_LIBRARY(visprune, m) {
  m.def("mi_scores(Tensor visual, Tensor text, Tensor? text_mask, str metric) -> Tensor");
  m.def("greedy_select(Tensor x, int k, str objective, str metric, Tensor? mask, int start) "
        "-> Tensor");
  m.def("gather_compact(Tensor x, Tensor? index, Tensor? mask, bool sort) -> (Tensor, Tensor)");
  m.def("prune(Tensor visual, Tensor text, int keep, int stage1_keep, Tensor? text_mask, "
        "Tensor? mask, str mi_metric, str objective, str metric) -> (Tensor, Tensor, Tensor)");
  m.def("received_attention(Tensor q, Tensor k, Tensor start, int length, str queries, "
        "Tensor? query_mask, str heads, Tensor? key_mask, float scale) -> Tensor");
  m.def("dpp_map(Tensor x, Tensor relevance, int k, Tensor? mask, float eps) -> Tensor");
  m.def("holov_variance(Tensor features, int num_crops) -> Tensor");
  m.def("greedy_select_varlen(Tensor x, Tensor cu_seqlens, int[] k, str objective, str metric, "
        "Tensor? mask, int start) -> Tensor");
  m.def("prune_varlen(Tensor visual, Tensor cu_seqlens, Tensor text, int[] keep, "
        "Tensor stage1_keep, Tensor? text_mask, Tensor? mask, str mi_metric, str objective, "
        "str metric) -> (Tensor, Tensor, Tensor)");
  m.def("gather_compact_varlen(Tensor x, Tensor cu_seqlens, Tensor? index, Tensor? mask, "
        "bool sort) -> (Tensor, Tensor, Tensor)");
  m.def("dpc_knn(Tensor x, int num_centers, int k, Tensor? mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dpc_knn_varlen(Tensor x, Tensor cu_seqlens, int[] num_centers, int k, Tensor? mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cluster_merge(Tensor x, Tensor centers, Tensor? assign, str metric, Tensor? mask, "
        "Tensor? weights, bool include_centers, float? blend, str blend_rule) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("temporal_similarity(Tensor video, int[]? reference, float fill) -> Tensor");
}

// The ops of one device: the composition above over that device's kernels.
#define VISPRUNE_IMPL_OPS(m, device)                                                              \
  using OptTensor = c10::optional<at::Tensor>;                                                    \
  m.impl("mi_scores", [](const at::Tensor& visual, const at::Tensor& text,                        \
                         const OptTensor& text_mask, c10::string_view metric) {                   \
    return visprune::mi_scores(visual, text, text_mask, metric, visprune::device::kernels());     \
  });                                                                                             \
  m.impl("greedy_select", [](const at::Tensor& x, int64_t k, c10::string_view objective,          \
                             c10::string_view metric, const OptTensor& mask, int64_t start) {     \
    return visprune::greedy_select(x, k, objective, metric, mask, start,                          \
                                   visprune::device::kernels());                                  \
  });                                                                                             \
  m.impl("gather_compact", [](const at::Tensor& x, const OptTensor& index, const OptTensor& mask, \
                              bool sort) {                                                        \
    return visprune::gather_compact(x, index, mask, sort, visprune::device::kernels());           \
  });                                                                                             \
  m.impl("prune", [](const at::Tensor& visual, const at::Tensor& text, int64_t keep,              \
                     int64_t stage1_keep, const OptTensor& text_mask, const OptTensor& mask,      \
                     c10::string_view mi_metric, c10::string_view objective,                      \
                     c10::string_view metric) {                                                   \
    return visprune::prune(visual, text, keep, stage1_keep, text_mask, mask, mi_metric,           \
                           objective, metric, visprune::device::kernels());                       \
  });                                                                                             \
  m.impl("received_attention", [](const at::Tensor& q, const at::Tensor& k,                       \
                                  const at::Tensor& start, int64_t length,                        \
                                  c10::string_view queries, const OptTensor& query_mask,          \
                                  c10::string_view heads, const OptTensor& key_mask,              \
                                  double scale) {                                                 \
    return visprune::received_attention(q, k, start, length, queries, query_mask, heads,          \
                                        key_mask, scale, visprune::device::kernels());            \
  });                                                                                             \
  m.impl("dpp_map", [](const at::Tensor& x, const at::Tensor& relevance, int64_t k,               \
                       const OptTensor& mask, double eps) {                                       \
    return visprune::dpp_map(x, relevance, k, mask, eps, visprune::device::kernels());            \
  });                                                                                             \
  m.impl("holov_variance", [](const at::Tensor& features, int64_t num_crops) {                    \
    return visprune::holov_variance(features, num_crops, visprune::device::kernels());            \
  });                                                                                             \
  m.impl("greedy_select_varlen", [](const at::Tensor& x, const at::Tensor& cu_seqlens,            \
                                    c10::IntArrayRef k, c10::string_view objective,               \
                                    c10::string_view metric, const OptTensor& mask,               \
                                    int64_t start) {                                              \
    return visprune::greedy_select_varlen(x, cu_seqlens, k, objective, metric, mask, start,       \
                                          visprune::device::varlen_kernels());                    \
  });                                                                                             \
  m.impl("prune_varlen", [](const at::Tensor& visual, const at::Tensor& cu_seqlens,               \
                            const at::Tensor& text, c10::IntArrayRef keep,                        \
                            const at::Tensor& stage1_keep, const OptTensor& text_mask,            \
                            const OptTensor& mask, c10::string_view mi_metric,                    \
                            c10::string_view objective, c10::string_view metric) {                \
    return visprune::prune_varlen(visual, cu_seqlens, text, keep, stage1_keep, text_mask, mask,   \
                                  mi_metric, objective, metric, visprune::device::kernels(),      \
                                  visprune::device::varlen_kernels());                            \
  });                                                                                             \
  m.impl("gather_compact_varlen", [](const at::Tensor& x, const at::Tensor& cu_seqlens,           \
                                     const OptTensor& index, const OptTensor& mask, bool sort) {  \
    return visprune::gather_compact_varlen(x, cu_seqlens, index, mask, sort,                      \
                                           visprune::device::kernels());                          \
  })

TORCH_LIBRARY_IMPL(visprune, CPU, m) {
  VISPRUNE_IMPL_OPS(m, cpu);
  m.impl("dpc_knn", &visprune::dpc_knn);
  m.impl("dpc_knn_varlen", &visprune::dpc_knn_varlen);
  m.impl("cluster_merge", &visprune::cluster_merge);
  m.impl("temporal_similarity", &visprune::temporal_similarity);
}

#ifdef VISPRUNE_WITH_CUDA
TORCH_LIBRARY_IMPL(visprune, CUDA, m) { VISPRUNE_IMPL_OPS(m, cuda); }
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

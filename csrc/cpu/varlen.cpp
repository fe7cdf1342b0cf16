// CPU kernels of the varlen (packed, ragged batch) ops: greedy selection and mi_scores on every
// segment [cu[b], cu[b+1]) of a packed x[T, D] in one op call (struct VarlenKernels; ops.cpp
// composes them into greedy_select_varlen and prune_varlen).  Each segment runs the dense ops'
// own per-row routines (rows.h) on pointers into the packed tokens, so a segment's result is
// that of the dense op on it alone, bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../visprune.h"
#include "rows.h"

namespace visprune {
namespace cpu {
namespace {

// A segment's work (tokens × D) from which its own steps are split over the threads; shorter
// segments run whole, one per thread.
constexpr int64_t kSplitWork = int64_t(1) << 17;

struct Segment {
  int64_t bos, n;
};

// Segment b of cu, clamped into [0, T]: an unvalidated cu never leads outside the tokens.
Segment segment(const int64_t* cu, int64_t b, int64_t T) {
  const int64_t bos = std::min(std::max<int64_t>(cu[b], 0), T);
  const int64_t eos = std::min(std::max(cu[b + 1], bos), T);
  return {bos, eos - bos};
}

// f(b, parallel) for the segments b with work(b) > 0.  Segments are ragged: the long ones (work
// >= kSplitWork) run one after another, each split over the threads; the short ones run side by
// side, handed out one at a time to whichever thread is free, so uneven lengths balance.
template <class W, class F>
void for_segments(int64_t B, const W& work, const F& f) {
  std::vector<int64_t> small;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t w = work(b);
    if (w >= kSplitWork) {
      f(b, true);
    } else if (w > 0) {
      small.push_back(b);
    }
  }
  const int64_t n = static_cast<int64_t>(small.size());
  if (n <= 1 || at::get_num_threads() == 1) {
    for (const int64_t b : small) f(b, false);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) f(small[static_cast<size_t>(i)], false);
  });
}

at::Tensor mi_scores(const Prepared& V, const Prepared& Tx, const at::Tensor& cu_t,
                     const c10::optional<at::Tensor>& text_mask, Metric metric) {
  const int64_t T = V.y.size(1), D = V.y.size(2), B = cu_t.numel() - 1, M = Tx.y.size(1);
  const int64_t* cu = cu_t.data_ptr<int64_t>();
  at::Tensor tm = text_mask.has_value() ? text_mask->contiguous() : at::Tensor();
  const bool* tmask = tm.defined() ? tm.data_ptr<bool>() : nullptr;
  // Zeros: a token outside every segment (only an unvalidated cu leaves one) scores 0.
  at::Tensor out = at::zeros({T}, V.y.options());
  const float* v = V.y.data_ptr<float>();
  const float* t = Tx.y.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for_segments(
      B, [&](int64_t b) { return segment(cu, b, T).n * std::max<int64_t>(D, 1); },
      [&](int64_t b, bool parallel) {
        const Segment s = segment(cu, b, T);
        mi_tokens(v + s.bos * D, s.n, t + b * M * D, M, tmask ? tmask + b * M : nullptr, D, metric,
                  b, parallel, o + s.bos);
      });
  return out;
}

at::Tensor greedy(const Prepared& P, const at::Tensor& cu_t, const at::Tensor& ck_t,
                  Objective objective, Metric metric, const c10::optional<at::Tensor>& mask,
                  int64_t start, const at::Tensor& need_t, const char* need_name) {
  const int64_t T = P.y.size(1), D = P.y.size(2), B = cu_t.numel() - 1;
  const int64_t* cu = cu_t.data_ptr<int64_t>();
  const int64_t* ck = ck_t.data_ptr<int64_t>();
  const at::Tensor need_c = need_t.to(at::kLong).contiguous();
  const int64_t* need = need_c.data_ptr<int64_t>();
  at::Tensor out = at::empty({ck[B]}, P.y.options().dtype(at::kLong));
  at::Tensor mh = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* m = mh.defined() ? mh.data_ptr<bool>() : nullptr;
  const float* y = P.y.data_ptr<float>();
  const float* sq = metric == Metric::kL2 ? P.sq.data_ptr<float>() : nullptr;
  int64_t* o = out.data_ptr<int64_t>();
  // A segment with picks but no token still goes through greedy_tokens, which reports it.
  for_segments(
      B,
      [&](int64_t b) {
        return ck[b + 1] > ck[b] ? std::max<int64_t>(segment(cu, b, T).n * D, 1) : 0;
      },
      [&](int64_t b, bool parallel) {
        const Segment s = segment(cu, b, T);
        int64_t* picks = o + ck[b];
        const int64_t k = ck[b + 1] - ck[b];
        greedy_tokens(y + s.bos * D, sq ? sq + s.bos : nullptr, s.n, D, metric,
                      m ? m + s.bos : nullptr, k, objective, start,
                      {std::max(need[b], k), need_name}, b, parallel, picks);
        for (int64_t t = 0; t < k; ++t) picks[t] += s.bos;
      });
  return out;
}

}  // namespace

const VarlenKernels& varlen_kernels() {
  static const VarlenKernels k{&mi_scores, &greedy};
  return k;
}

}  // namespace cpu
}  // namespace visprune

// CPU kernels of the video ops: DPC-kNN density-peak clustering, the nearest-centre assignment
// and cluster merge, and the same-position similarity of frames (visprune.reference has the
// definitions; ops.cpp checks the arguments and calls these).
//
// DPC-kNN without the N×N matrix.  Every pair's squared distance comes once from the upper
// triangle, in BLAS row panels (as kernels.cpp's blas_distances), and is folded at once into
// each of its two tokens' L nearest (value, position) lists and the largest distance; nothing
// of size N² is kept.  From the lists:
// * density: the k smallest distances of a token are its own 0 and the first k-1 of its list;
// * delta: a token's list is sorted by distance and every token outside it is at least as far
//   as the list's last, so the first denser token in it is the nearest denser one overall;
//   only the tokens denser than all L of theirs ("peaks", a few per cent) are compared with
//   every token, and the densest token takes the largest distance;
// * assignment: the same argument gives the nearest centre from the list when a centre lies
//   strictly closer than the list's last entry; the other tokens are compared with every centre.
// Work: c²·D/2 multiply-adds for the triangle plus (peaks·c + fallbacks·C)·D; extra memory
// O(threads·c·L) for the lists, one BLAS panel per thread and the per-token fields.
//
// Exact ties stay exact: tokens equal element for element are at distance exactly 0 (a class
// label per token), a duplicate takes its class representative's mean neighbour distance (BLAS
// may round two copies' rows differently), and every order (density, score, slot) breaks ties
// toward the lowest position.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VISPRUNE_X86 1
#endif

#include "../visprune.h"
#include "rows.h"

namespace visprune {
namespace cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kNearest = 16;       // L: the list length (at least k - 1)
// A BLAS panel: 192 rows (MKL on one thread runs the triangle of N = 6272, D = 896 10 % faster
// than in 96-row ones; 384: no faster) against blocks of 1024 columns, whose 768 KiB of products
// are folded while they are in the core's cache (folding whole rows from memory cost a fifth of
// the products' time).
constexpr int64_t kPanelRows = 192, kPanelCols = 1024;
constexpr int64_t kChunkRows = 64;  // rows per brute-force chunk (peaks, assignment fallbacks)

// The candidate tokens of one row, contiguous: y[c, D] fp32 (unit vectors for cosine), their
// squared norms (l2) and, for DPC-kNN, a class per token: the lowest position whose token equals
// it element for element (-0 == +0; a token holding a NaN equals none but itself).
struct Cands {
  at::Tensor y;
  std::vector<float> sq;
  std::vector<int32_t> cls;
  int64_t c = 0, D = 0;
  const float* row(int64_t p) const { return y.data_ptr<float>() + p * D; }
};

std::vector<int32_t> value_classes(const Cands& X) {
  const int64_t c = X.c, D = X.D;
  std::vector<std::pair<uint64_t, int32_t>> h(static_cast<size_t>(c));
  // Bucketed by a hash of 32 sampled entries (kernels.cpp's duplicate_of), then compared in full.
  const int64_t samples = std::min<int64_t>(D, 32);
  for (int64_t p = 0; p < c; ++p) {
    const float* v = X.row(p);
    uint64_t x = 1469598103934665603ull;
    for (int64_t t = 0; t < samples; ++t) {
      const float f = v[t * D / samples] + 0.0f;  // -0 hashes as +0
      uint32_t bits;
      std::memcpy(&bits, &f, sizeof(bits));
      x = (x ^ bits) * 1099511628211ull;
    }
    h[p] = {x, static_cast<int32_t>(p)};
  }
  std::sort(h.begin(), h.end());
  std::vector<int32_t> cls(static_cast<size_t>(c));
  std::iota(cls.begin(), cls.end(), 0);
  for (int64_t a = 0; a < c;) {
    int64_t e = a + 1;
    while (e < c && h[e].first == h[a].first) ++e;
    for (int64_t u = a + 1; u < e; ++u)  // positions ascend within a bucket: the first match is the lowest
      for (int64_t w = a; w < u; ++w) {
        const int32_t pu = h[u].second, pw = h[w].second;
        if (cls[pw] != pw) continue;
        const float* x = X.row(pu);
        const float* y = X.row(pw);
        bool same = true;
        for (int64_t d = 0; d < D && same; ++d) same = x[d] == y[d];
        if (same) {
          cls[pu] = pw;
          break;
        }
      }
    a = e;
  }
  return cls;
}

// The candidates of row `mask` (all when null) among n tokens y[0..n) of D floats: their rows
// copied contiguous (or viewed when all are), squared norms (l2) and positions.
Cands gather(const float* y, const float* sq, int64_t n, int64_t D, const bool* mask,
             std::vector<int64_t>& pos) {
  pos.clear();
  for (int64_t i = 0; i < n; ++i)
    if (mask == nullptr || mask[i]) pos.push_back(i);
  Cands X;
  X.c = static_cast<int64_t>(pos.size());
  X.D = D;
  const at::Tensor all = at::from_blob(const_cast<float*>(y), {n, D}, at::TensorOptions().dtype(at::kFloat));
  X.y = X.c == n ? all
                 : all.index_select(0, at::from_blob(pos.data(), {X.c},
                                                     at::TensorOptions().dtype(at::kLong)));
  if (sq != nullptr)
    for (const int64_t i : pos) X.sq.push_back(sq[i]);
  return X;
}

// out[r, q] = y_rows[r]·y_cols[q] for row-major a[m, D] and b[w, D] into out (leading dimension
// ld): BLAS when it computes true fp32, else the canonical dot (torch's matmul precision lowered).
void products(const float* a, int64_t m, const float* b, int64_t w, int64_t D, float* out,
              int64_t ld) {
  if (m == 0 || w == 0) return;
  if (blas_fp32()) {
    const auto f = at::TensorOptions().dtype(at::kFloat);
    at::Tensor o = at::from_blob(out, {m, w}, {ld, 1}, f);
    at::mm_out(o, at::from_blob(const_cast<float*>(a), {m, D}, f),
               at::from_blob(const_cast<float*>(b), {w, D}, f).t());
    return;
  }
  for (int64_t r = 0; r < m; ++r)
    for (int64_t q = 0; q < w; ++q) out[r * ld + q] = canonical_dot(a + r * D, b + q * D, D);
}

// Squared distance from a dot product, clamped like the reference (rounding below 0 and NaN
// give 0); 0 between equal tokens when classes are given.
inline float sq_distance(float sp, float sq, float dot) {
  const float d = (sp + sq) - 2.0f * dot;
  return d > 0.0f ? d : 0.0f;
}

// --------------------------------------------------------------------------- nearest lists
// Per thread: for each of the c tokens the L smallest distances offered so far with their
// positions (unsorted), the count held and, once full, the largest held and where.
struct Lists {
  int L;
  int64_t c;
  std::vector<float> val, thr;
  std::vector<int32_t> pos, cnt, at;
  float top = 0.0f;  // the largest distance offered (any pair)

  Lists(int L_, int64_t c_)
      : L(L_), c(c_), val(static_cast<size_t>(c_ * L_)), thr(static_cast<size_t>(c_), kInf),
        pos(static_cast<size_t>(c_ * L_)), cnt(static_cast<size_t>(c_), 0),
        at(static_cast<size_t>(c_), 0) {}

  // thr[r] is +inf while the list is not full, so `v <= thr[r]` lets every value in then (an
  // infinite distance too); once full only a smaller one replaces the largest.
  void offer(int64_t r, float v, int32_t q) {
    float* vs = val.data() + r * L;
    int32_t* ps = pos.data() + r * L;
    int32_t& n = cnt[r];
    int slot;
    if (n < L) {
      slot = n++;
    } else if (v < thr[r]) {
      slot = at[r];
    } else {
      return;
    }
    vs[slot] = v;
    ps[slot] = q;
    if (n < L) return;
    int m = 0;
    for (int t = 1; t < L; ++t)
      if (vs[t] > vs[m]) m = t;
    thr[r] = vs[m];
    at[r] = m;
  }
};

// Row p of a panel against the columns [qa, qb) (all > p): dots[q - qa] = y_p·y_q, p's
// distances folded into the lists of p and q and the largest distance.
void scan_row_portable(Lists& S, const Cands& X, int64_t p, int64_t qa, int64_t qb,
                       const float* dots) {
  const float sp = X.sq[p];
  const int32_t cp = X.cls[p];
  float top = S.top;
  for (int64_t q = qa; q < qb; ++q) {
    const float d = X.cls[q] == cp ? 0.0f : sq_distance(sp, X.sq[q], dots[q - qa]);
    top = std::max(top, d);
    if (d <= S.thr[p]) S.offer(p, d, static_cast<int32_t>(q));
    if (d <= S.thr[q]) S.offer(q, d, static_cast<int32_t>(p));
  }
  S.top = top;
}

#ifdef VISPRUNE_X86
// The same on 16 columns at a time: the distances, the running maximum and both list filters
// in registers; only columns that pass a filter (few once the lists are full) go scalar.
__attribute__((target("avx512f"))) void scan_row_avx512(Lists& S, const Cands& X, int64_t p,
                                                         int64_t qa, int64_t qb,
                                                         const float* dots) {
  const float sp = X.sq[p];
  const int32_t cp = X.cls[p];
  const __m512 vsp = _mm512_set1_ps(sp), two = _mm512_set1_ps(2.0f), zero = _mm512_setzero_ps();
  const __m512i vcp = _mm512_set1_epi32(cp);
  __m512 top = _mm512_set1_ps(S.top);
  alignas(64) float d[16];
  int64_t q = qa;
  for (; q + 16 <= qb; q += 16) {
    __m512 v = _mm512_sub_ps(_mm512_add_ps(vsp, _mm512_loadu_ps(X.sq.data() + q)),
                             _mm512_mul_ps(two, _mm512_loadu_ps(dots + (q - qa))));
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), v);  // d > 0 ? d : 0
    const __mmask16 same = _mm512_cmpeq_epi32_mask(
        _mm512_loadu_si512(X.cls.data() + q), vcp);
    v = _mm512_mask_mov_ps(v, same, zero);
    top = _mm512_mask_max_ps(top, 0xFFFF, top, v);  // the masked form: GCC 12 warns on the other
    const __mmask16 mine = _mm512_cmp_ps_mask(v, _mm512_set1_ps(S.thr[p]), _CMP_LE_OQ);
    const __mmask16 theirs = _mm512_cmp_ps_mask(v, _mm512_loadu_ps(S.thr.data() + q), _CMP_LE_OQ);
    if ((mine | theirs) == 0) continue;
    _mm512_store_ps(d, v);
    for (int l = 0; l < 16; ++l) {
      if (mine >> l & 1) S.offer(p, d[l], static_cast<int32_t>(q + l));
      if (theirs >> l & 1) S.offer(q + l, d[l], static_cast<int32_t>(p));
    }
  }
  _mm512_store_ps(d, top);
  for (int l = 0; l < 16; ++l) S.top = std::max(S.top, d[l]);
  for (; q < qb; ++q) {
    const float v = X.cls[q] == cp ? 0.0f : sq_distance(sp, X.sq[q], dots[q - qa]);
    S.top = std::max(S.top, v);
    if (v <= S.thr[p]) S.offer(p, v, static_cast<int32_t>(q));
    if (v <= S.thr[q]) S.offer(q, v, static_cast<int32_t>(p));
  }
}
#endif

void scan_row(Lists& S, const Cands& X, int64_t p, int64_t qa, int64_t qb, const float* dots) {
#ifdef VISPRUNE_X86
  if (avx512()) return scan_row_avx512(S, X, p, qa, qb, dots);
#endif
  scan_row_portable(S, X, p, qa, qb, dots);
}

// Every pair through the upper triangle in row panels: returns each token's L nearest others
// sorted by (distance, position) in val/pos (cnt held) and the largest distance.  Each thread
// folds into its own lists, merged at the end (the L smallest of a union do not depend on the
// order the pairs came in).
struct Nearest {
  int L;
  std::vector<float> val;
  std::vector<int32_t> pos, cnt;
  float top = 0.0f;
  bool complete(int64_t c) const { return c - 1 <= L; }  // every other token is in the list
};

Nearest nearest_lists(const Cands& X, int L, bool parallel) {
  const int64_t c = X.c, D = X.D;
  const int64_t slots = parallel ? at::get_num_threads() : 1;
  const int64_t np = (c + kPanelRows - 1) / kPanelRows;
  std::vector<Lists> lists;
  for (int64_t s = 0; s < slots; ++s) lists.emplace_back(L, c);
  // uninitialised: every panel writes what it reads
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(slots * kPanelRows * kPanelCols)]);
  auto panel = [&](int64_t u, int64_t slot) {
    const int64_t p0 = u * kPanelRows, p1 = std::min(c, p0 + kPanelRows);
    float* buf = scratch.get() + slot * kPanelRows * kPanelCols;
    for (int64_t q0 = p0; q0 < c; q0 += kPanelCols) {
      const int64_t w = std::min(kPanelCols, c - q0);
      products(X.row(p0), p1 - p0, X.row(q0), w, D, buf, w);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t qa = std::max(q0, p + 1);
        if (qa < q0 + w) scan_row(lists[slot], X, p, qa, q0 + w, buf + (p - p0) * w + (qa - q0));
      }
    }
  };
  // Each thread takes the next panel, largest first, from a shared counter: the triangle splits
  // evenly whatever the thread count, and a thread slowed by a busy core takes fewer.
  std::atomic<int64_t> next(0);
  auto work = [&](int64_t slot) {
    for (int64_t u; (u = next.fetch_add(1)) < np;) panel(u, slot);
  };
  if (parallel) {
    at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) work(s);
    });
  } else {
    work(0);
  }
  Nearest out{L, std::vector<float>(static_cast<size_t>(c * L)),
              std::vector<int32_t>(static_cast<size_t>(c * L)),
              std::vector<int32_t>(static_cast<size_t>(c), 0)};
  for (const Lists& S : lists) out.top = std::max(out.top, S.top);
  at::parallel_for(0, c, 256, [&](int64_t r0, int64_t r1) {
    std::vector<std::pair<float, int32_t>> all;
    for (int64_t r = r0; r < r1; ++r) {
      all.clear();
      for (const Lists& S : lists)
        for (int t = 0; t < S.cnt[r]; ++t) all.emplace_back(S.val[r * L + t], S.pos[r * L + t]);
      std::sort(all.begin(), all.end());
      const int n = static_cast<int>(std::min<size_t>(all.size(), static_cast<size_t>(L)));
      for (int t = 0; t < n; ++t) {
        out.val[r * L + t] = all[t].first;
        out.pos[r * L + t] = all[t].second;
      }
      out.cnt[r] = n;
    }
  });
  return out;
}

// f(chunk of positions) for the positions `todo`, in chunks of kChunkRows, over the threads:
// each chunk gets the products of its rows with the rows `cols` (positions) in `buf`.
template <class F>
void brute_force(const Cands& X, const std::vector<int64_t>& todo, const at::Tensor& cols,
                 const F& f) {
  const int64_t n = static_cast<int64_t>(todo.size()), w = cols.size(0);
  if (n == 0) return;
  at::parallel_for(0, (n + kChunkRows - 1) / kChunkRows, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> buf(static_cast<size_t>(kChunkRows * std::max<int64_t>(w, 1)));
    std::vector<float> rows;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r0 = u * kChunkRows, m = std::min(kChunkRows, n - r0);
      rows.resize(static_cast<size_t>(m * X.D));
      for (int64_t r = 0; r < m; ++r)
        std::memcpy(rows.data() + r * X.D, X.row(todo[r0 + r]), X.D * sizeof(float));
      products(rows.data(), m, cols.data_ptr<float>(), w, X.D, buf.data(), w);
      f(todo.data() + r0, m, buf.data());
    }
  });
}

// The distance between candidates p and q from their dot product (metric l2 with classes, or
// the metric's own when cls is empty).
inline float pair_distance(const Cands& X, Metric metric, int64_t p, int64_t q, float dot) {
  if (metric == Metric::kCosine) {
    const float d = 1.0f - dot;
    return d > 0.0f ? d : 0.0f;
  }
  if (!X.cls.empty() && X.cls[p] == X.cls[q]) return 0.0f;
  return sq_distance(X.sq[p], X.sq[q], dot);
}

// slot[p] for the positions `todo`: the nearest of the centres (positions `centers`, slot =
// their order) by the metric, ties to the lowest slot.
void nearest_center_of(const Cands& X, Metric metric, const std::vector<int64_t>& centers,
                       const std::vector<int64_t>& todo, int64_t* slot) {
  const int64_t C = static_cast<int64_t>(centers.size());
  const at::Tensor cols = X.y.index_select(
      0, at::from_blob(const_cast<int64_t*>(centers.data()), {C}, at::TensorOptions().dtype(at::kLong)));
  // BLAS may round two equal centres' columns differently: each centre reads the column of the
  // first centre equal to it, so that such a tie is exact and goes to the lower slot.
  Cands K;
  K.y = cols;
  K.c = C;
  K.D = X.D;
  const std::vector<int32_t> same = value_classes(K);
  brute_force(X, todo, cols, [&](const int64_t* ps, int64_t m, const float* buf) {
    for (int64_t r = 0; r < m; ++r) {
      float best = kInf;
      int64_t s = -1;
      for (int64_t j = 0; j < C; ++j) {
        const float d = pair_distance(X, metric, ps[r], centers[j], buf[r * C + same[j]]);
        if (s < 0 || d < best) best = d, s = j;
      }
      slot[ps[r]] = s;
    }
  });
}

// DPC-kNN on one row of n tokens (y, sq: prepared for l2) among the True ones of mask (all when
// null): C centres (positions, score order) to centers, per token fields to the outputs.
void dpc_row(const float* y, const float* sq, int64_t n, int64_t D, const bool* mask, int64_t C,
             int64_t k, bool parallel, int64_t* centers, int64_t* assign, float* density,
             float* delta, float* score) {
  std::vector<int64_t> pos;
  Cands X = gather(y, sq, n, D, mask, pos);
  const int64_t c = X.c;
  std::fill(assign, assign + n, -1);
  std::fill(density, density + n, 0.0f);
  std::fill(delta, delta + n, 0.0f);
  std::fill(score, score + n, 0.0f);
  if (c == 0) return;
  X.cls = value_classes(X);
  const int L = static_cast<int>(std::max<int64_t>(kNearest, k - 1));
  const Nearest nb = nearest_lists(X, L, parallel);
  const bool complete = nb.complete(c);

  // Density: the ascending sum of the k smallest (its own 0 first), as the reference adds them.
  const int64_t keff = std::min(k, c);
  const float denom = static_cast<float>(keff * D);
  std::vector<float> m(static_cast<size_t>(c));
  for (int64_t p = 0; p < c; ++p) {
    float s = 0.0f;
    for (int64_t t = 0; t + 1 < keff; ++t) s += nb.val[p * L + t];
    m[p] = s / denom;
  }
  for (int64_t p = 0; p < c; ++p) m[p] = m[X.cls[p]];  // copies tie exactly
  auto denser = [&](int64_t q, int64_t p) { return m[q] < m[p] || (m[q] == m[p] && q < p); };

  // Delta: the first denser token of the sorted list, else compare with every token.
  std::vector<float> e(static_cast<size_t>(c));
  std::vector<int64_t> peaks;
  for (int64_t p = 0; p < c; ++p) {
    int t = 0;
    while (t < nb.cnt[p] && !denser(nb.pos[p * L + t], p)) ++t;
    if (t < nb.cnt[p]) {
      e[p] = nb.val[p * L + t];
    } else if (complete) {
      e[p] = nb.top;  // no denser token at all: the densest
    } else {
      peaks.push_back(p);
    }
  }
  brute_force(X, peaks, X.y, [&](const int64_t* ps, int64_t rows, const float* buf) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t p = ps[r];
      float best = kInf;
      bool any = false;
      for (int64_t q = 0; q < c; ++q)
        if (denser(q, p)) {
          best = std::min(best, pair_distance(X, Metric::kL2, p, q, buf[r * c + q]));
          any = true;
        }
      e[p] = any ? best : nb.top;
    }
  });
  std::vector<float> sc(static_cast<size_t>(c));
  const float fD = static_cast<float>(D);
  for (int64_t p = 0; p < c; ++p) {
    const float rho = std::exp(-m[p]), dl = std::sqrt(e[p] / fD);
    sc[p] = rho * dl;
    density[pos[p]] = rho;
    delta[pos[p]] = dl;
    score[pos[p]] = sc[p];
  }

  // Centres: the C best scores, NaN after every real one, ties to the lowest position.
  std::vector<int64_t> order(static_cast<size_t>(c));
  std::iota(order.begin(), order.end(), 0);
  const float lowest = std::numeric_limits<float>::lowest();
  auto key = [&](int64_t p) { return std::isnan(sc[p]) ? lowest : std::max(sc[p], lowest); };
  std::partial_sort(order.begin(), order.begin() + C, order.end(), [&](int64_t a, int64_t b) {
    const float ka = key(a), kb = key(b);
    return ka > kb || (ka == kb && a < b);
  });
  order.resize(static_cast<size_t>(C));
  for (int64_t j = 0; j < C; ++j) centers[j] = pos[order[j]];
  if (C == 0) return;

  // Assignment: the nearest centre in the list when one lies strictly closer than its last
  // entry (or the list holds every token), else against every centre; centres to themselves.
  std::vector<int64_t> slot_of(static_cast<size_t>(c), -1), slot(static_cast<size_t>(c), -1);
  for (int64_t j = 0; j < C; ++j) slot_of[order[j]] = j;
  std::vector<int64_t> rest;
  for (int64_t p = 0; p < c; ++p) {
    if (slot_of[p] >= 0) {
      slot[p] = slot_of[p];
      continue;
    }
    int t = 0;
    const int held = nb.cnt[p];
    while (t < held && slot_of[nb.pos[p * L + t]] < 0) ++t;
    if (t == held || !(complete || nb.val[p * L + t] < nb.val[p * L + held - 1])) {
      rest.push_back(p);
      continue;
    }
    const float v = nb.val[p * L + t];
    int64_t s = slot_of[nb.pos[p * L + t]];
    for (; t < held && nb.val[p * L + t] == v; ++t)
      if (slot_of[nb.pos[p * L + t]] >= 0) s = std::min(s, slot_of[nb.pos[p * L + t]]);
    slot[p] = s;
  }
  nearest_center_of(X, Metric::kL2, order, rest, slot.data());
  for (int64_t p = 0; p < c; ++p) assign[pos[p]] = slot[p];
}

// The squared norms of the tokens of contiguous xf[..., D], by the canonical dot: no [.., D]
// temporary (x * x would double the op's peak memory at D = 3584).
at::Tensor squared_norms(const at::Tensor& xf) {
  const int64_t D = xf.size(-1), n = xf.numel() / std::max<int64_t>(D, 1);
  at::Tensor sq = at::empty({n}, xf.options());
  const float* x = xf.data_ptr<float>();
  float* o = sq.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = canonical_dot(x + i * D, x + i * D, D);
  });
  return sq;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpc_knn(
    const at::Tensor& xf, int64_t C, int64_t k, const c10::optional<at::Tensor>& mask) {
  const Prepared P{xf, squared_norms(xf)};
  const int64_t B = P.y.size(0), N = P.y.size(1), D = P.y.size(2);
  const auto opt = P.y.options();
  at::Tensor centers = at::empty({B, C}, opt.dtype(at::kLong)), assign = at::empty({B, N}, opt.dtype(at::kLong));
  at::Tensor density = at::empty({B, N}, opt), delta = at::empty({B, N}, opt), score = at::empty({B, N}, opt);
  at::Tensor mh = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* m = mh.defined() ? mh.data_ptr<bool>() : nullptr;
  const float* y = P.y.data_ptr<float>();
  const float* sq = P.sq.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    dpc_row(y + b * N * D, sq + b * N, N, D, m ? m + b * N : nullptr, C, k, true,
            centers.data_ptr<int64_t>() + b * C, assign.data_ptr<int64_t>() + b * N,
            density.data_ptr<float>() + b * N, delta.data_ptr<float>() + b * N,
            score.data_ptr<float>() + b * N);
  return {centers, assign, density, delta, score};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpc_knn_varlen(
    const at::Tensor& xf, const at::Tensor& cu_t, c10::IntArrayRef C, int64_t k,
    const c10::optional<at::Tensor>& mask) {
  const Prepared P{xf, squared_norms(xf)};
  const int64_t T = P.y.size(1), D = P.y.size(2), B = cu_t.numel() - 1;
  const int64_t* cu = cu_t.data_ptr<int64_t>();
  const auto opt = P.y.options();
  int64_t total = 0;
  for (const int64_t v : C) total += v;
  at::Tensor centers = at::empty({total}, opt.dtype(at::kLong)), assign = at::full({T}, -1, opt.dtype(at::kLong));
  at::Tensor density = at::zeros({T}, opt), delta = at::zeros({T}, opt), score = at::zeros({T}, opt);
  at::Tensor mh = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* m = mh.defined() ? mh.data_ptr<bool>() : nullptr;
  const float* y = P.y.data_ptr<float>();
  const float* sq = P.sq.data_ptr<float>();
  int64_t* ce = centers.data_ptr<int64_t>();
  int64_t off = 0;
  for (int64_t b = 0; b < B; ++b) {
    // Clamped into [0, T] as every varlen kernel: an unvalidated cu never leads outside x.
    const int64_t lo = std::min(std::max<int64_t>(cu[b], 0), T);
    const int64_t hi = std::min(std::max(cu[b + 1], lo), T);
    std::vector<int64_t> local(static_cast<size_t>(C[b]), 0);
    if (hi > lo) {
      int64_t cand = hi - lo;
      if (m) cand = std::count(m + lo, m + hi, true);
      TORCH_CHECK_VALUE(C[b] <= cand, "num_centers=", C[b], " is larger than the number of "
                        "candidate tokens in segment ", b, " (", cand, ")");
      dpc_row(y + lo * D, sq + lo, hi - lo, D, m ? m + lo : nullptr, C[b], k, true, local.data(),
              assign.data_ptr<int64_t>() + lo, density.data_ptr<float>() + lo,
              delta.data_ptr<float>() + lo, score.data_ptr<float>() + lo);
    } else {
      TORCH_CHECK_VALUE(C[b] == 0, "num_centers=", C[b], " is larger than segment ", b,
                        "'s length (0 tokens)");
    }
    for (int64_t j = 0; j < C[b]; ++j) ce[off + j] = local[j] + lo;
    off += C[b];
  }
  return {centers, assign, density, delta, score};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_merge(
    const at::Tensor& xf, Metric metric, const at::Tensor& centers_t,
    const c10::optional<at::Tensor>& assign_in, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weights, bool include_centers, c10::optional<double> blend,
    bool clamp_rule) {
  const int64_t B = xf.size(0), N = xf.size(1), D = xf.size(2), C = centers_t.size(1);
  // The tokens prepared for the assignment only when it is computed here: unit vectors for
  // cosine, the squared norms (without an [N, D] temporary) for l2.
  Prepared P{xf, at::Tensor()};
  if (!assign_in.has_value())
    P = metric == Metric::kCosine ? prepare_tokens(xf, metric) : Prepared{xf, squared_norms(xf)};
  const auto opt = xf.options();
  at::Tensor out = at::empty({B, C, D}, opt), sizes = at::zeros({B, C}, opt);
  const int64_t* ce = centers_t.data_ptr<int64_t>();
  at::Tensor mh = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* m = mh.defined() ? mh.data_ptr<bool>() : nullptr;
  at::Tensor wh = weights.has_value() ? fp32_tokens(*weights) : at::Tensor();
  const float* w = wh.defined() ? wh.data_ptr<float>() : nullptr;
  at::Tensor ah = assign_in.has_value() ? assign_in->to(at::kLong).contiguous() : at::Tensor();
  const float* x = xf.data_ptr<float>();
  const float* y = P.y.data_ptr<float>();
  const float* sq = P.sq.defined() ? P.sq.data_ptr<float>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* cb = ce + b * C;
    const bool* mb = m ? m + b * N : nullptr;
    std::vector<int64_t> slot(static_cast<size_t>(N), -1);
    if (ah.defined()) {
      std::copy(ah.data_ptr<int64_t>() + b * N, ah.data_ptr<int64_t>() + (b + 1) * N, slot.begin());
      for (int64_t i = 0; i < N; ++i) {
        if (mb && !mb[i]) slot[i] = -1;
        TORCH_CHECK_VALUE(slot[i] >= -1 && slot[i] < C, "assign has value ", slot[i], " in row ",
                          b, ", expected centre slots in [-1, ", C, ")");
      }
    } else if (C > 0) {
      std::vector<int64_t> pos;
      const Cands X = gather(y + b * N * D, sq ? sq + b * N : nullptr, N, D, nullptr, pos);
      std::vector<int64_t> todo, slot_of(static_cast<size_t>(N), -1);
      for (int64_t j = 0; j < C; ++j) slot_of[cb[j]] = j;
      for (int64_t i = 0; i < N; ++i)
        if ((mb == nullptr || mb[i]) && slot_of[i] < 0) todo.push_back(i);
      std::vector<int64_t> centers(cb, cb + C);
      nearest_center_of(X, metric, centers, todo, slot.data());
      for (int64_t j = 0; j < C; ++j)
        if (mb == nullptr || mb[cb[j]]) slot[cb[j]] = j;
    }
    std::vector<uint8_t> is_center(static_cast<size_t>(N), 0);
    for (int64_t j = 0; j < C; ++j) is_center[cb[j]] = 1;
    // Sums in double, tokens in index order: the same result for any thread count.
    std::vector<double> sum(static_cast<size_t>(C * D), 0.0), size(static_cast<size_t>(C), 0.0);
    for (int64_t i = 0; i < N; ++i) {
      const double wi = w ? w[b * N + i] : 1.0;
      if (slot[i] < 0 || !(wi > 0) || (!include_centers && is_center[i])) continue;
      double* s = sum.data() + slot[i] * D;
      const float* xi = x + (b * N + i) * D;
      for (int64_t d = 0; d < D; ++d) s[d] += wi * xi[d];
      size[slot[i]] += wi;
    }
    float* o = out.data_ptr<float>() + b * C * D;
    for (int64_t j = 0; j < C; ++j) {
      const float* anchor = x + (b * N + cb[j]) * D;
      const double n = size[j];
      double a = 1.0;  // a slot without members gives its anchor
      if (n > 0) a = !blend.has_value() ? 0.0 : clamp_rule ? std::max(*blend, 1.0 / (n + 1.0)) : *blend;
      for (int64_t d = 0; d < D; ++d) {
        const double mean = n > 0 ? sum[j * D + d] / n : 0.0;
        o[j * D + d] = static_cast<float>(a == 1.0 ? anchor[d] : a * anchor[d] + (1.0 - a) * mean);
      }
      sizes.data_ptr<float>()[b * C + j] = static_cast<float>(n);
    }
  }
  return {out, centers_t.clone(), sizes};
}

at::Tensor temporal_similarity(const Prepared& P, c10::IntArrayRef ref, double fill) {
  // P.y: unit vectors [B, T, P, D]
  const int64_t B = P.y.size(0), T = P.y.size(1), Pn = P.y.size(2), D = P.y.size(3);
  at::Tensor out = at::empty({B, T, Pn}, P.y.options());
  const float* y = P.y.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B * T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t bt = t0; bt < t1; ++bt) {
      const int64_t b = bt / T, t = bt % T, r = ref[t];
      for (int64_t p = 0; p < Pn; ++p)
        o[bt * Pn + p] = r < 0 ? static_cast<float>(fill)
                               : canonical_dot(y + (bt * Pn + p) * D, y + ((b * T + r) * Pn + p) * D, D);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace visprune

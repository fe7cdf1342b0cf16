// CPU kernels of visprune: mi_scores, greedy selection, the row gather (which ops.cpp composes
// into the four selection ops), received_attention and CDPruner's DPP MAP (struct Kernels).
//
// Same results as visprune/reference.py with less work:
// * greedy steps compute only row s of the distance matrix (k·N·D instead of N²·D), keep a
//   running min / sum per candidate and take one argmax per step, all in C++;
// * the maxmin start (min over j != i of d(i, j)) needs every pair: it runs over the upper
//   triangle only (GEMM-style register tiles, 8×32 AVX-512 or 6×16 AVX2, chosen at run time)
//   and keeps the distances for the steps; maxsum keeps the triangle too where that beats
//   streaming rows (choose_strategy); BLAS panels remain as a forced strategy;
// * the maxsum start and mi_scores are linear in a per-row summary (Σ x̂_j, x̄, t̄): N·D work;
// * work is split over batch rows when there are enough of them, otherwise within a row
//   (at::parallel_for, so both cores are busy at batch size 1); ops.cpp hands the kernels a
//   batch in row chunks of at most 24 MiB of fp32 tokens (fresh pages cost as much as the work).
//
// Exact ties must stay exact (bitwise-identical tokens are picked in index order), so each kind
// of distance goes through one routine whose result depends only on the two tokens, never on
// where they sit in a tile: dot_tile for the steps and summaries, the Gram tiles for all pairs;
// BLAS products get that property from bitwise-duplicate representatives (duplicate_of).
// Inputs are converted to fp32 and normalised with the same ATen ops as the reference
// (prepare_tokens), so zero, huge and non-finite tokens behave the same.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__unix__)
#include <unistd.h>
#endif

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

// --------------------------------------------------------------------------- canonical dots
// out[r*C + c] = a[r]·b[c] over D floats: lane l accumulates d = 8m + l for increasing m, then
// the lanes are added in the fixed tree of lane_sum, then the D % 8 tail in order.  The AVX2
// path uses FMA and the portable path mul+add; one of them is chosen per process, so values are
// consistent within a run.
constexpr int kLanes = 8;

inline float lane_sum(const float* v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

template <int R, int C>
void dot_tile_portable(const float* const* a, const float* const* b, int64_t D, float* out) {
  float acc[R][C][kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c)
        for (int l = 0; l < kLanes; ++l) acc[r][c][l] += a[r][d + l] * b[c][d + l];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = lane_sum(acc[r][c]);
      for (int64_t e = d; e < D; ++e) s += a[r][e] * b[c][e];
      out[r * C + c] = s;
    }
}

// The instruction set the kernels use, chosen once per process: what the CPU supports, capped
// by VISPRUNE_CPU_ISA=portable|avx2|avx512 (to measure or test a slower path on a faster CPU).
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

Isa isa() {
  static const Isa level = [] {
    Isa cpu = Isa::kPortable;
#ifdef VISPRUNE_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) cpu = Isa::kAvx2;
    if (cpu == Isa::kAvx2 && __builtin_cpu_supports("avx512f")) cpu = Isa::kAvx512;
#endif
    const char* cap = std::getenv("VISPRUNE_CPU_ISA");
    Isa want = Isa::kAvx512;
    if (cap != nullptr && std::strcmp(cap, "portable") == 0) want = Isa::kPortable;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) want = Isa::kAvx2;
    return std::min(cpu, want);
  }();
  return level;
}

#ifdef VISPRUNE_X86
bool use_avx2() { return isa() >= Isa::kAvx2; }

// lane_sum's tree on a register: (l0+l4, l1+l5, l2+l6, l3+l7), then (0+2, 1+3), then the two.
__attribute__((target("avx2,fma"))) inline float lane_sum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

template <int R, int C>
__attribute__((target("avx2,fma"))) void dot_tile_avx2(const float* const* a, const float* const* b,
                                                       int64_t D, float* out) {
  __m256 acc[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    __m256 vb[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) vb[c] = _mm256_loadu_ps(b[c] + d);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 va = _mm256_loadu_ps(a[r] + d);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(va, vb[c], acc[r][c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      float s = lane_sum_avx2(acc[r][c]);
      for (int64_t e = d; e < D; ++e) s = std::fma(a[r][e], b[c][e], s);
      out[r * C + c] = s;
    }
}
#endif

template <int R, int C>
inline void dot_tile(const float* const* a, const float* const* b, int64_t D, float* out) {
#ifdef VISPRUNE_X86
  if (use_avx2()) return dot_tile_avx2<R, C>(a, b, D, out);
#endif
  dot_tile_portable<R, C>(a, b, D, out);
}

// --------------------------------------------------------------------------- Gram tiles
// The maxmin start needs every pair, so it gets a GEMM-style kernel: acc[r][j] += Σ_k a[r][k] ·
// panel[k - k0][j] over k in [k0, k1), an R-row × C-column tile, k ascending, one multiply-add
// chain per entry (no horizontal sums).  `panel` holds C tokens transposed ([k][C]), so each step
// loads C/8 (C/16) vectors and broadcasts R scalars.  A chain split into k ranges (the
// accumulators stored and reloaded in between) is the same chain, so the entry of a pair depends
// neither on where the pair sits in the tile, nor on the order of the two tokens, nor on the
// ISA's tile shape: the AVX2 (6×16) and AVX-512 (8×32) kernels give the same bits, and identical
// tokens get identical distances here too.
constexpr int kGramR = 6, kGramC = 16;      // portable / AVX2 tile (received_attention's too)
constexpr int kGramR512 = 8, kGramC512 = 32;  // AVX-512: 16 accumulators
using GramAcc = void (*)(const float* const* a, const float* panel, int64_t k0, int64_t k1,
                         float* acc, bool init);

template <int R, int C>
void gram_acc_portable(const float* const* a, const float* panel, int64_t k0, int64_t k1,
                       float* acc, bool init) {
  if (init) std::fill(acc, acc + R * C, 0.0f);
  for (int64_t k = k0; k < k1; ++k)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < C; ++j) acc[r * C + j] += a[r][k] * panel[(k - k0) * C + j];
}

#ifdef VISPRUNE_X86
__attribute__((target("avx2,fma"))) void gram_acc_avx2(const float* const* a, const float* panel,
                                                       int64_t k0, int64_t k1, float* out,
                                                       bool init) {
  __m256 acc[kGramR][2];
#pragma GCC unroll 8
  for (int r = 0; r < kGramR; ++r)
    for (int h = 0; h < 2; ++h)
      acc[r][h] = init ? _mm256_setzero_ps() : _mm256_loadu_ps(out + r * kGramC + 8 * h);
  for (int64_t k = k0; k < k1; ++k) {
    const float* p = panel + (k - k0) * kGramC;
    const __m256 b0 = _mm256_loadu_ps(p), b1 = _mm256_loadu_ps(p + 8);
#pragma GCC unroll 8
    for (int r = 0; r < kGramR; ++r) {
      const __m256 va = _mm256_broadcast_ss(a[r] + k);
      acc[r][0] = _mm256_fmadd_ps(va, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(va, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kGramR; ++r) {
    _mm256_storeu_ps(out + r * kGramC, acc[r][0]);
    _mm256_storeu_ps(out + r * kGramC + 8, acc[r][1]);
  }
}

__attribute__((target("avx512f"))) void gram_acc_avx512(const float* const* a, const float* panel,
                                                        int64_t k0, int64_t k1, float* out,
                                                        bool init) {
  constexpr int R = kGramR512, C = kGramC512;
  __m512 acc[R][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h)
      acc[r][h] = init ? _mm512_setzero_ps() : _mm512_loadu_ps(out + r * C + 16 * h);
  for (int64_t k = k0; k < k1; ++k) {
    const float* p = panel + (k - k0) * C;
    const __m512 b0 = _mm512_loadu_ps(p), b1 = _mm512_loadu_ps(p + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 va = _mm512_set1_ps(a[r][k]);
      acc[r][0] = _mm512_fmadd_ps(va, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(va, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(out + r * C, acc[r][0]);
    _mm512_storeu_ps(out + r * C + 16, acc[r][1]);
  }
}

// The distances of an interior R×C Gram tile (every entry a candidate pair p < q), the same
// arithmetic as Rows::dist, folded into the row minima rmin[0..R) and column minima cmin[0..C)
// and, when `dist` is given, stored in its rows (leading dimension ld).  sq_r / sq_c: squared
// norms of the rows and columns for l2, null for cosine.
template <int R, int C>
__attribute__((target("avx2,fma"))) void tile_distances_avx2(const float* g, const float* sq_r,
                                                             const float* sq_c, float* rmin,
                                                             float* cmin, float* dist, int64_t ld) {
  constexpr int H = C / 8;
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  __m256 cm[H];
  for (int h = 0; h < H; ++h) cm[h] = _mm256_loadu_ps(cmin + 8 * h);
  for (int r = 0; r < R; ++r) {
    __m256 v = _mm256_set1_ps(kInf);
    for (int h = 0; h < H; ++h) {
      const __m256 dot = _mm256_loadu_ps(g + r * C + 8 * h);
      __m256 d = sq_r == nullptr
                     ? _mm256_sub_ps(one, dot)
                     : _mm256_sub_ps(_mm256_add_ps(_mm256_set1_ps(sq_r[r]), _mm256_loadu_ps(sq_c + 8 * h)),
                                     _mm256_mul_ps(two, dot));
      d = _mm256_and_ps(d, _mm256_cmp_ps(d, zero, _CMP_GT_OQ));  // d > 0 ? d : 0
      cm[h] = _mm256_min_ps(cm[h], d);
      v = _mm256_min_ps(v, d);
      if (dist != nullptr) _mm256_storeu_ps(dist + r * ld + 8 * h, d);
    }
    __m128 w = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    w = _mm_min_ps(w, _mm_movehl_ps(w, w));
    w = _mm_min_ss(w, _mm_shuffle_ps(w, w, 1));
    rmin[r] = std::min(rmin[r], _mm_cvtss_f32(w));
  }
  for (int h = 0; h < H; ++h) _mm256_storeu_ps(cmin + 8 * h, cm[h]);
}
#endif

// out = the R×C (kGramR × kGramC) Gram tile over k in [0, D) (received_attention's scores).
inline void gram_tile(const float* const* a, const float* panel, int64_t D, float* out) {
#ifdef VISPRUNE_X86
  if (use_avx2()) return gram_acc_avx2(a, panel, 0, D, out, true);
#endif
  gram_acc_portable<kGramR, kGramC>(a, panel, 0, D, out, true);
}

inline float dot(const float* a, const float* b, int64_t D) {
  float out;
  dot_tile<1, 1>(&a, &b, D, &out);
  return out;
}

// |a - b|² with the same lane structure as dot_tile.
float sqdist_portable(const float* a, const float* b, int64_t D) {
  float v[8] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int l = 0; l < 8; ++l) v[l] += (a[d + l] - b[d + l]) * (a[d + l] - b[d + l]);
  float s = lane_sum(v);
  for (; d < D; ++d) s += (a[d] - b[d]) * (a[d] - b[d]);
  return s;
}

#ifdef VISPRUNE_X86
__attribute__((target("avx2,fma"))) float sqdist_avx2(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 t = _mm256_sub_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d));
    acc = _mm256_fmadd_ps(t, t, acc);
  }
  float s = lane_sum_avx2(acc);
  for (; d < D; ++d) s = std::fma(a[d] - b[d], a[d] - b[d], s);
  return s;
}
#endif

inline float sqdist(const float* a, const float* b, int64_t D) {
#ifdef VISPRUNE_X86
  if (use_avx2()) return sqdist_avx2(a, b, D);
#endif
  return sqdist_portable(a, b, D);
}

// --------------------------------------------------------------------------- parallel helpers
// Runs f(begin, end, slot) over [0, n): split over threads when `parallel`, else inline.  `slot`
// indexes per-thread scratch (nslots(parallel) of them).
inline int64_t nslots(bool parallel) { return parallel ? at::get_num_threads() : 1; }

template <class F>
void for_range(bool parallel, int64_t n, int64_t grain, const F& f) {
  if (parallel) {
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { f(b, e, at::get_thread_num()); });
  } else if (n > 0) {
    f(0, n, 0);
  }
}

// Batch rows in parallel when there are enough of them (each row then runs serially), else one
// after another with the work inside each row split over the threads.
template <class F>
void for_batch(int64_t B, const F& f) {
  if (B > 1 && B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) f(b, false);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) f(b, true);
  }
}

// The bytes of a core's own cache (L2) as the OS reports them, 1 MiB where it does not.
int64_t core_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (v > 0) return static_cast<int64_t>(v);
#endif
    return int64_t(1) << 20;
  }();
  return bytes;
}

// --------------------------------------------------------------------------- prepared tokens
// One batch row of prepared tokens and its distance d(i, j), clamped like the reference's
// where(d > 0, d, 0): rounding below 0 and NaN (from NaN/Inf tokens) both become 0.
struct Rows {
  const float* y;
  const float* sq;  // l2 only
  int64_t D;
  Metric metric;

  const float* row(int64_t i) const { return y + i * D; }
  float dist(float dot_ij, int64_t i, int64_t j) const {
    const float d = metric == Metric::kCosine ? 1.0f - dot_ij : (sq[i] + sq[j]) - 2.0f * dot_ij;
    return d > 0.0f ? d : 0.0f;
  }
};

Rows rows_of(const Prepared& p, int64_t b, Metric metric) {
  const int64_t N = p.y.size(1), D = p.y.size(2);
  return {p.y.data_ptr<float>() + b * N * D,
          metric == Metric::kL2 ? p.sq.data_ptr<float>() + b * N : nullptr, D, metric};
}

// --------------------------------------------------------------------------- greedy selection
// The argmax of one chunk: the largest value, the lowest position on ties.
struct Best {
  float v = -kInf;
  int64_t p = -1;
  void offer(float value, int64_t pos) {  // positions arrive in increasing order
    if (value > v) v = value, p = pos;
  }
  void merge(const Best& o) {
    if (o.p >= 0 && (o.v > v || (o.v == v && o.p < p))) *this = o;
  }
};

constexpr int kStepCols = 8;  // rows per dot_tile<1, 8> call in a greedy step

// Dot products of token `s` with the tokens cand[pos[0..n)] (n <= kStepCols).
void step_dots(const Rows& X, int64_t s, const int64_t* cand, const int64_t* pos, int n,
               float* dots) {
  const float* a = X.row(s);
  const float* b[kStepCols];
  for (int e = 0; e < kStepCols; ++e) b[e] = X.row(cand[pos[e < n ? e : n - 1]]);
  dot_tile<1, kStepCols>(&a, b, X.D, dots);
}

// Distances from token `s` to the tokens cand[pos[0..n)] (n <= kStepCols).
void step_distances(const Rows& X, int64_t s, const int64_t* cand, const int64_t* pos, int n,
                    float* d) {
  float dots[kStepCols];
  step_dots(X, s, cand, pos, n, dots);
  for (int e = 0; e < n; ++e) d[e] = X.dist(dots[e], s, cand[pos[e]]);
}

// maxmin's start key min_{j != i} d(i, j) over the candidates, for every candidate.  Each pair
// p < q is computed once, in the column block of q (C columns against the rows above them); the
// threads take the blocks largest first from a shared counter, so the triangle splits evenly
// (within a block of the total) whatever the thread count.  Within a block the k
// range goes in slices whose panel (kGramPanel floats) stays in L1 while every row tile of the
// block runs over it, the tiles' accumulators kept in per-task scratch between slices.  When
// `dist` is not null it receives the upper triangle of the c×c distance matrix.
constexpr int64_t kGramPanel = 4096;  // floats of one panel slice: 16 KiB

template <int R, int C>
std::vector<float> nearest_tiles(const Rows& X, const std::vector<int64_t>& cand, bool parallel,
                                 float* dist, GramAcc kernel, bool fold_avx2) {
  const int64_t c = static_cast<int64_t>(cand.size()), D = X.D;
  const int64_t nb = (c + C - 1) / C, kc = kGramPanel / C, tiles_max = (c + R - 1) / R;
  const int64_t slots = nslots(parallel);
  const bool l2 = X.metric == Metric::kL2;
  std::vector<float> mins(static_cast<size_t>(slots * c), kInf);
  std::vector<float> panels(static_cast<size_t>(slots * kc * C));
  std::vector<float> grams(static_cast<size_t>(slots * tiles_max * R * C));

  auto block = [&](int64_t cb, int64_t slot) {
    float* m = mins.data() + slot * c;
    float* panel = panels.data() + slot * kc * C;
    float* gram = grams.data() + slot * tiles_max * R * C;
    const int64_t q0 = cb * C, nq = std::min<int64_t>(C, c - q0);
    const int64_t tiles = (q0 + nq - 1 + R - 1) / R;  // rows p < the block's last column
    const float* col[C];
    float sq_r[R], sq_c[C];
    for (int j = 0; j < C; ++j) {  // missing columns repeat the last token
      const int64_t i = cand[q0 + std::min<int64_t>(j, nq - 1)];
      col[j] = X.row(i);
      if (l2) sq_c[j] = X.sq[i];
    }
    int64_t k0 = 0;
    do {
      const int64_t k1 = std::min(D, k0 + kc);
      for (int j = 0; j < C; ++j)
        for (int64_t k = k0; k < k1; ++k) panel[(k - k0) * C + j] = col[j][k];
      for (int64_t t = 0; t < tiles; ++t) {
        const float* a[R];
        for (int r = 0; r < R; ++r) a[r] = X.row(cand[std::min(t * R + r, c - 1)]);
        kernel(a, panel, k0, k1, gram + t * R * C, k0 == 0);
      }
      k0 = k1;
    } while (k0 < D);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t p0 = t * R;
      const float* g = gram + t * R * C;
      if (l2)
        for (int r = 0; r < R; ++r) sq_r[r] = X.sq[cand[std::min(p0 + r, c - 1)]];
#ifdef VISPRUNE_X86
      if (fold_avx2 && p0 + R <= q0 && nq == C) {  // interior: every entry a pair
        tile_distances_avx2<R, C>(g, l2 ? sq_r : nullptr, sq_c, m + p0, m + q0,
                                  dist ? dist + p0 * c + q0 : nullptr, c);
        continue;
      }
#endif
      for (int r = 0; r < R; ++r) {
        const int64_t p = p0 + r;
        if (p >= c) break;
        float rm = m[p];
        for (int64_t j = std::max<int64_t>(0, p + 1 - q0); j < nq; ++j) {
          const int64_t q = q0 + j;
          const float d = X.dist(g[r * C + j], cand[p], cand[q]);
          rm = std::min(rm, d);
          m[q] = std::min(m[q], d);
          if (dist) dist[p * c + q] = d;
        }
        m[p] = rm;
      }
    }
  };
  std::atomic<int64_t> next(0);
  for_range(parallel, slots, 1, [&](int64_t, int64_t, int64_t slot) {
    for (int64_t u; (u = next.fetch_add(1)) < nb;) block(nb - 1 - u, slot);
  });
  for (int64_t t = 1; t < slots; ++t)  // min is exact: the merge order does not matter
    for (int64_t p = 0; p < c; ++p) mins[p] = std::min(mins[p], mins[t * c + p]);
  mins.resize(static_cast<size_t>(c));
  return mins;
}

// nearest_tiles with this process's widest kernel (all give the same bits but the portable one).
std::vector<float> nearest_distances(const Rows& X, const std::vector<int64_t>& cand, bool parallel,
                                     float* dist) {
#ifdef VISPRUNE_X86
  if (isa() == Isa::kAvx512)
    return nearest_tiles<kGramR512, kGramC512>(X, cand, parallel, dist, gram_acc_avx512, true);
  if (use_avx2()) return nearest_tiles<kGramR, kGramC>(X, cand, parallel, dist, gram_acc_avx2, true);
#endif
  return nearest_tiles<kGramR, kGramC>(X, cand, parallel, dist, gram_acc_portable<kGramR, kGramC>,
                                       false);
}

// --------------------------------------------------------------------------- all pairs by BLAS
// The same pairs through the BLAS matrix product (at::mm_out: MKL / OpenBLAS with the CPU's
// widest vectors, AVX-512 included): row panels [p0, p1) × [p0, c) of the upper triangle, one
// product each, balanced pairs of panels per task.  Inside at::parallel_for the BLAS runs on the
// calling thread, so the panels, not the BLAS, are split over the cores.
//
// A BLAS product may round one pair differently by where it sits in its tiles, and exact ties
// must stay exact.  The pair value therefore comes from the pair's canonical representatives:
// every candidate equal bit for bit to a lower one takes that one's entries (duplicate_of), so
// bitwise-identical tokens get bitwise-identical distances, as in the hand-written kernels.

// The candidates' rows as a [c, D] tensor: a view when they are rows 0..c-1, else a copy.
at::Tensor candidate_rows(const Rows& X, const std::vector<int64_t>& cand) {
  const int64_t c = static_cast<int64_t>(cand.size());
  const at::Tensor all = at::from_blob(const_cast<float*>(X.y), {cand.back() + 1, X.D},
                                       at::TensorOptions().dtype(at::kFloat));
  if (cand.back() + 1 == c) return all;  // ascending and unique: exactly rows 0..c-1
  return all.index_select(
      0, at::from_blob(const_cast<int64_t*>(cand.data()), {c}, at::TensorOptions().dtype(at::kLong)));
}

// rep[p] = the lowest candidate position whose row is bitwise equal to candidate p's (p itself
// for most).  Rows are bucketed by a hash of 32 sampled entries, then compared in full.
std::vector<int64_t> duplicate_of(const Rows& X, const std::vector<int64_t>& cand, bool* any) {
  const int64_t c = static_cast<int64_t>(cand.size()), D = X.D;
  std::vector<std::pair<uint64_t, int64_t>> h(static_cast<size_t>(c));
  for (int64_t p = 0; p < c; ++p) {
    const float* v = X.row(cand[p]);
    uint64_t x = 1469598103934665603ull;
    for (int64_t t = 0; t < 32; ++t) {
      uint32_t bits;
      std::memcpy(&bits, v + t * D / 32, sizeof(bits));
      x = (x ^ bits) * 1099511628211ull;
    }
    h[p] = {x, p};
  }
  std::sort(h.begin(), h.end());
  std::vector<int64_t> rep(static_cast<size_t>(c));
  for (int64_t p = 0; p < c; ++p) rep[p] = p;
  *any = false;
  for (int64_t a = 0; a < c;) {
    int64_t e = a + 1;
    while (e < c && h[e].first == h[a].first) ++e;
    for (int64_t u = a + 1; u < e; ++u)  // positions ascend within a bucket: the first match is the lowest
      for (int64_t w = a; w < u; ++w) {
        const int64_t pu = h[u].second, pw = h[w].second;
        if (rep[pw] == pw && std::memcmp(X.row(cand[pu]), X.row(cand[pw]), D * sizeof(float)) == 0) {
          rep[pu] = pw;
          *any = true;
          break;
        }
      }
    a = e;
  }
  return rep;
}

// Distances of candidate rows [p0, p1) to the columns q in [p0, c) from one BLAS product:
// d(p, q) lands in out[(p - p0) * ld + (q - p0)] for q >= p (the entries with q < p are scratch).
void pair_panel(const at::Tensor& Yc, const Rows& X, const float* sqc, int64_t p0, int64_t p1,
                float* out, int64_t ld) {
  const int64_t c = Yc.size(0), w = c - p0;
  at::Tensor o = at::from_blob(out, {p1 - p0, w}, {ld, 1}, Yc.options());
  at::mm_out(o, Yc.narrow(0, p0, p1 - p0), Yc.narrow(0, p0, w).t());
  for (int64_t p = p0; p < p1; ++p) {
    float* r = out + (p - p0) * ld;
    if (X.metric == Metric::kCosine) {
      for (int64_t j = p - p0; j < w; ++j) {
        const float d = 1.0f - r[j];
        r[j] = d > 0.0f ? d : 0.0f;
      }
    } else {
      const float sp = sqc[p];
      for (int64_t j = p - p0; j < w; ++j) {
        const float d = (sp + sqc[p0 + j]) - 2.0f * r[j];
        r[j] = d > 0.0f ? d : 0.0f;
      }
    }
  }
}

// Row panels of the c candidates: about 96 rows each (MKL at N = 576, D = 4096, 1 thread: 24 ms
// for the triangle in 96-row panels, 28 in 64-row ones, 44 for the full product), a multiple of
// 2 per thread so that the panel pairs (u, n-1-u) split evenly.
int64_t panel_rows(int64_t c, int64_t slots) {
  const int64_t per = 2 * slots;
  const int64_t n = std::max<int64_t>(1, (c + 96 * per - 1) / (96 * per)) * per;
  return std::max<int64_t>(1, (c + n - 1) / n);
}

// f(p0, p1, slot) for every row panel, balanced over the threads.
template <class F>
void for_panels(bool parallel, int64_t c, const F& f) {
  const int64_t h = panel_rows(c, nslots(parallel)), np = (c + h - 1) / h;
  for_range(parallel, (np + 1) / 2, 1, [&](int64_t u0, int64_t u1, int64_t slot) {
    for (int64_t u = u0; u < u1; ++u) {
      f(u * h, std::min(c, (u + 1) * h), slot);
      const int64_t v = np - 1 - u;
      if (v != u) f(v * h, std::min(c, (v + 1) * h), slot);
    }
  });
}

// The squared norms of the candidates (l2), in candidate order.
std::vector<float> candidate_sq(const Rows& X, const std::vector<int64_t>& cand) {
  std::vector<float> sqc;
  if (X.metric == Metric::kL2)
    for (int64_t i : cand) sqc.push_back(X.sq[i]);
  return sqc;
}

// The upper triangle (diagonal included) of the c×c distances into dist (leading dimension c),
// through BLAS panels, with duplicates made exact.  Returns maxmin's start key min_{j != i} d(i, j)
// for every candidate when `keys` is set.
std::vector<float> blas_distances(const Rows& X, const std::vector<int64_t>& cand, bool parallel,
                                  float* dist, bool keys) {
  const int64_t c = static_cast<int64_t>(cand.size());
  const at::Tensor Yc = candidate_rows(X, cand);
  const std::vector<float> sqc = candidate_sq(X, cand);
  for_panels(parallel, c, [&](int64_t p0, int64_t p1, int64_t) {
    pair_panel(Yc, X, sqc.data(), p0, p1, dist + p0 * c + p0, c);
  });
  bool dup = false;
  const std::vector<int64_t> rep = duplicate_of(X, cand, &dup);
  if (dup) {  // pairs of representatives are never rewritten, so the order does not matter
    auto at = [&](int64_t a, int64_t b) { return dist[std::min(a, b) * c + std::max(a, b)]; };
    for (int64_t p = 0; p < c; ++p)
      for (int64_t q = p; q < c; ++q)
        if (rep[p] != p || rep[q] != q) dist[p * c + q] = at(rep[p], rep[q]);
  }
  std::vector<float> mins;
  if (!keys) return mins;
  const int64_t slots = nslots(parallel);
  mins.assign(static_cast<size_t>(slots * c), kInf);
  for_panels(parallel, c, [&](int64_t p0, int64_t p1, int64_t slot) {
    float* m = mins.data() + slot * c;
    for (int64_t p = p0; p < p1; ++p) {
      const float* r = dist + p * c;
      float rm[4] = {m[p], kInf, kInf, kInf};
      int64_t q = p + 1;
      for (; q + 4 <= c; q += 4)
        for (int l = 0; l < 4; ++l) {
          rm[l] = std::min(rm[l], r[q + l]);
          m[q + l] = std::min(m[q + l], r[q + l]);
        }
      for (; q < c; ++q) rm[0] = std::min(rm[0], r[q]), m[q] = std::min(m[q], r[q]);
      m[p] = std::min(std::min(rm[0], rm[1]), std::min(rm[2], rm[3]));
    }
  });
  for (int64_t t = 1; t < slots; ++t)  // min is exact: the merge order does not matter
    for (int64_t p = 0; p < c; ++p) mins[p] = std::min(mins[p], mins[t * c + p]);
  mins.resize(static_cast<size_t>(c));
  return mins;
}

// maxmin's start key through BLAS panels without keeping the distances (c² does not fit): each
// panel's distances go to per-thread scratch and are folded into the minima at once.  A duplicate
// takes its representative's key, so exact ties stay exact.
std::vector<float> blas_nearest(const Rows& X, const std::vector<int64_t>& cand, bool parallel) {
  const int64_t c = static_cast<int64_t>(cand.size());
  const at::Tensor Yc = candidate_rows(X, cand);
  const std::vector<float> sqc = candidate_sq(X, cand);
  const int64_t slots = nslots(parallel), h = panel_rows(c, slots);
  std::vector<float> mins(static_cast<size_t>(slots * c), kInf);
  std::vector<float> scratch(static_cast<size_t>(slots * h * c));
  for_panels(parallel, c, [&](int64_t p0, int64_t p1, int64_t slot) {
    float* m = mins.data() + slot * c;
    float* buf = scratch.data() + slot * h * c;
    const int64_t w = c - p0;
    pair_panel(Yc, X, sqc.data(), p0, p1, buf, w);
    for (int64_t p = p0; p < p1; ++p) {
      const float* r = buf + (p - p0) * w;  // r[q - p0] = d(p, q)
      float rm = m[p];
      for (int64_t q = p + 1; q < c; ++q) rm = std::min(rm, r[q - p0]), m[q] = std::min(m[q], r[q - p0]);
      m[p] = rm;
    }
  });
  for (int64_t t = 1; t < slots; ++t)
    for (int64_t p = 0; p < c; ++p) mins[p] = std::min(mins[p], mins[t * c + p]);
  mins.resize(static_cast<size_t>(c));
  bool dup = false;
  const std::vector<int64_t> rep = duplicate_of(X, cand, &dup);
  if (dup)
    for (int64_t p = 0; p < c; ++p) mins[p] = mins[rep[p]];
  return mins;
}

// Whether a normalised token holds a NaN: its entries are otherwise finite with |v| <= 1, so v·v
// is NaN exactly then.
bool has_nan(const float* v, int64_t D) { return std::isnan(dot(v, v, D)); }

// maxsum's start key Σ_j d(i, j) over the candidates j (d(i, i) included), for every candidate.
// Linear in a summary of the row: cosine Σ_j (1 - x̂_i·x̂_j) = n - x̂_i·Σ_j x̂_j (a token with NaN
// has distance 0 to all, so it is left out of the summary and its key is 0); l2 Σ_j |x_i - x_j|²
// = n|x_i - x̄|² + const, ranked by |x_i - x̄|².  An l2 row with a non-finite or overflowing
// squared norm falls back to summing the exact pairwise distances.
std::vector<float> distance_sums(const Rows& X, const std::vector<int64_t>& cand, bool parallel) {
  const int64_t c = static_cast<int64_t>(cand.size()), D = X.D;
  std::vector<float> key(static_cast<size_t>(c));
  if (X.metric == Metric::kL2) {
    bool exact = false;
    for (int64_t p = 0; p < c; ++p) exact |= !(X.sq[cand[p]] < 1e37f);
    if (exact) {
      for_range(parallel, c, 1, [&](int64_t p0, int64_t p1, int64_t) {
        std::vector<int64_t> pos(kStepCols);
        float d[kStepCols];
        for (int64_t p = p0; p < p1; ++p) {
          float s = 0.0f;
          for (int64_t q0 = 0; q0 < c; q0 += kStepCols) {
            const int n = static_cast<int>(std::min<int64_t>(kStepCols, c - q0));
            for (int e = 0; e < n; ++e) pos[e] = q0 + e;
            step_distances(X, cand[p], cand.data(), pos.data(), n, d);
            for (int e = 0; e < n; ++e) s += d[e];
          }
          key[p] = s;
        }
      });
      return key;
    }
  }
  std::vector<double> acc(static_cast<size_t>(D), 0.0);
  std::vector<uint8_t> bad(static_cast<size_t>(c), 0);
  int64_t n = 0;
  for (int64_t p = 0; p < c; ++p) {
    const float* v = X.row(cand[p]);
    if (X.metric == Metric::kCosine && (bad[p] = has_nan(v, D))) continue;
    for (int64_t d = 0; d < D; ++d) acc[d] += v[d];
    ++n;
  }
  std::vector<float> summary(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d)
    summary[d] = static_cast<float>(X.metric == Metric::kCosine ? acc[d] : acc[d] / n);
  for_range(parallel, c, 16, [&](int64_t p0, int64_t p1, int64_t) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* v = X.row(cand[p]);
      if (X.metric == Metric::kCosine) {
        key[p] = bad[p] ? 0.0f : static_cast<float>(n) - dot(v, summary.data(), D);
      } else {
        key[p] = sqdist(v, summary.data(), D);
      }
    }
  });
  return key;
}

int64_t argmax(const std::vector<float>& key) {
  Best best;
  for (int64_t p = 0; p < static_cast<int64_t>(key.size()); ++p) best.offer(key[p], p);
  return best.p;
}

// Distance matrices above this many entries are not kept: the steps recompute their row.
// Below kParallelStepWork multiply-adds a greedy step runs on one thread.
constexpr int64_t kParallelStepWork = int64_t(1) << 17;
constexpr int64_t kMaxStoredDistances = int64_t(1) << 22;  // 16 MiB of fp32

// How a greedy row gets its distances.  VISPRUNE_CPU_GREEDY=tiles|gram|stream forces one (tests,
// measurements); every one gives the same indices up to near-ties decided by rounding.
// * kGram: every pair through BLAS panels (blas_distances), the triangle kept, steps read it;
// * kTiles: every pair over the hand-written register tiles (nearest_distances), kept;
// * kStream: nothing kept: each step computes row s (k·c·D); maxmin's start through BLAS panels
//   folded into minima at once (blas_nearest).
// A triangle that does not fit kMaxStoredDistances is never kept (kGram and kTiles then stream
// the steps).
enum class Strategy { kAuto, kGram, kTiles, kStream };

Strategy forced_strategy() {
  const char* v = std::getenv("VISPRUNE_CPU_GREEDY");
  if (v == nullptr) return Strategy::kAuto;
  if (std::strcmp(v, "gram") == 0) return Strategy::kGram;
  if (std::strcmp(v, "tiles") == 0) return Strategy::kTiles;
  if (std::strcmp(v, "stream") == 0) return Strategy::kStream;
  return Strategy::kAuto;
}

// Whether at::mm on fp32 is true fp32 here: torch's matmul precision lowered by the caller may
// let oneDNN round through bf16 / TF32 (selection is discrete); the hand-written kernels serve
// then.
bool blas_is_fp32() {
  auto& ctx = at::globalContext();
  const auto p = ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  return ctx.float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST &&
         p != at::Float32Precision::BF16 && p != at::Float32Precision::TF32;
}

// The rule of "auto".  maxmin's start needs every pair: it runs over the hand-written tiles
// (AVX-512 or AVX2), kept when the triangle fits.  Measured on a 2-core AMD EPYC (Zen 4, AVX-512),
// N = 576, k = 64, 1 thread, against MKL through at::mm: the tiles run the triangle at 46-50
// GMAC/s, MKL's full product at 52, its 96-row triangle panels slower (greedy_select maxmin
// D = 4096, 2 threads: 8.2-9.2 ms over the tiles, 10-12 ms over BLAS panels).  On an AVX2-only
// EPYC (Zen 3) the tiles also beat MKL's panels (D = 4096, 1 thread: 98 vs 121 ms).  Otherwise
// the steps need k rows: streaming them (k·c·D multiply-adds, bound by cache bandwidth) beat a
// kept triangle (c²·D/2 at the tiles' rate) on both machines at c = 576, k = 64 (maxsum D = 4096:
// 73 vs 135 ms on Zen 3 over BLAS panels; 6.7 vs 9.9 ms on Zen 4 over the tiles, which win from
// k = 144: 9.8 vs 12.2 ms; D = 1024 and 256 cross near k = 120 and 170), so the triangle is
// kept where k > c / 5.
// "gram" (BLAS panels) is never chosen by "auto"; it stays as a switch for CPUs whose BLAS beats
// the tiles (an Intel Xeon with two AVX-512 FMA units may; none was measured).
Strategy choose_strategy(int64_t c, int64_t k, bool all_pairs, bool blas_ok) {
  Strategy s = forced_strategy();
  if (!blas_ok && s != Strategy::kStream) s = Strategy::kTiles;
  if (s != Strategy::kAuto) return s;
  return all_pairs || 5 * k > c ? Strategy::kTiles : Strategy::kStream;
}

// The upper triangle of the c×c distances into dist by the planned strategy (kTiles or kGram).
void all_distances(const Rows& X, const std::vector<int64_t>& cand, bool parallel, float* dist,
                   Strategy plan) {
  if (plan == Strategy::kTiles) {
    nearest_distances(X, cand, parallel, dist);
  } else {
    blas_distances(X, cand, parallel, dist, false);
  }
}

// The steps of a greedy loop over c candidates, each returning the argmax of its update.  A step
// is split over the threads when it does enough work (`work` multiply-adds) to pay for waking
// them, in fixed chunks (not per-thread ones): the argmax is the same for any split.  A split step
// waits for every thread: when the cores are busy with other processes one of them may be
// descheduled for a whole time slice, at every step.  A step that takes far longer than its work
// (1 ns per multiply-add, 10x a single core) runs the rest of the row on this thread alone; the
// result does not depend on the split.
class Steps {
 public:
  Steps(bool parallel, int64_t c, int64_t work)
      : c_(c),
        split_(parallel && work >= kParallelStepWork),
        chunks_(split_ ? std::min<int64_t>(at::get_num_threads(), c) : 1),
        slow_(work + 500000),
        best_(static_cast<size_t>(chunks_)) {}

  // chunk(lo, hi): update the candidates at positions [lo, hi) and return their Best.
  template <class F>
  Best run(const F& chunk) {
    const auto t0 = std::chrono::steady_clock::now();
    for_range(split_, chunks_, 1, [&](int64_t ch0, int64_t ch1, int64_t) {
      for (int64_t ch = ch0; ch < ch1; ++ch)
        best_[ch] = chunk(c_ * ch / chunks_, c_ * (ch + 1) / chunks_);
    });
    if (split_ && std::chrono::steady_clock::now() - t0 > slow_) split_ = false;
    Best all;
    for (const Best& b : best_) all.merge(b);
    return all;
  }

 private:
  int64_t c_;
  bool split_;
  int64_t chunks_;
  std::chrono::nanoseconds slow_;
  std::vector<Best> best_;
};

// f(pos, n) for the alive positions in [lo, hi), in ascending batches of up to kStepCols.
template <class F>
void alive_batches(const std::vector<uint8_t>& alive, int64_t lo, int64_t hi, const F& f) {
  int64_t pos[kStepCols];
  int n = 0;
  for (int64_t p = lo; p < hi; ++p) {
    if (alive[p]) pos[n++] = p;
    if (n == kStepCols || (p + 1 == hi && n > 0)) {
      f(pos, n);
      n = 0;
    }
  }
}

// Greedy selection over one batch row (`row`, for messages): `cand` lists the candidate tokens
// ascending; writes k indices to out in selection order.  start: an index, -1 for the
// objective's own rule ("auto"), -2 for maxsum's rule whatever the objective ("linear").  Raises ValueError when the row holds
// fewer than need.value candidates (need.value >= k) or `start` is not one of them.
void greedy_row(const Rows& X, const std::vector<int64_t>& cand, int64_t k, Objective obj,
                int64_t start, Count need, int64_t row, bool parallel, int64_t* out) {
  const int64_t c = static_cast<int64_t>(cand.size());
  TORCH_CHECK_VALUE(need.value <= c, need.name, "=", need.value,
                    " is larger than the number of candidate tokens (", c, " in row ", row, ")");
  if (k == 0) return;
  // The upper triangle of the c×c distances, kept when the plan computes every pair (kTiles,
  // kGram) and it fits (uninitialised: only the triangle is written and read).
  std::unique_ptr<float[]> stored;
  float* dist = nullptr;
  // maxmin's own start rule needs every pair; "linear" (-2) takes maxsum's, from a summary
  const bool all_pairs = start == -1 && obj == Objective::kMaxMin;
  const bool blas_ok = blas_is_fp32();
  const Strategy plan = choose_strategy(c, k, all_pairs, blas_ok);
  const bool fits = c * c <= kMaxStoredDistances;
  if (fits && (plan == Strategy::kGram || plan == Strategy::kTiles)) {
    stored.reset(new float[static_cast<size_t>(c * c)]);
    dist = stored.get();
  }
  int64_t sp;  // position in cand of the token selected next
  if (start >= 0) {
    sp = std::lower_bound(cand.begin(), cand.end(), start) - cand.begin();
    TORCH_CHECK_VALUE(sp < c && cand[sp] == start, "start=", start,
                      " is not a candidate (mask is False there) in row ", row);
    if (dist) all_distances(X, cand, parallel, dist, plan);
  } else if (all_pairs) {
    sp = argmax(plan == Strategy::kTiles || !blas_ok ? nearest_distances(X, cand, parallel, dist)
                : dist                  ? blas_distances(X, cand, parallel, dist, true)
                                        : blas_nearest(X, cand, parallel));
  } else {
    if (dist) all_distances(X, cand, parallel, dist, plan);
    sp = argmax(distance_sums(X, cand, parallel));
  }

  std::vector<float> run(static_cast<size_t>(c), obj == Objective::kMaxMin ? kInf : 0.0f);
  std::vector<uint8_t> alive(static_cast<size_t>(c), 1);
  Steps steps(parallel && dist == nullptr, c, c * X.D);  // stored distances: nothing to split
  auto update = [&](int64_t p, float d, Best& b) {
    run[p] = obj == Objective::kMaxMin ? std::min(run[p], d) : run[p] + d;
    b.offer(run[p], p);
  };
  for (int64_t t = 0; t < k; ++t) {
    out[t] = cand[sp];
    alive[sp] = 0;
    if (t + 1 == k) break;
    const int64_t s = cand[sp];
    const float* srow = dist ? dist + sp * c : nullptr;  // d(s, p) for p > sp
    sp = steps.run([&](int64_t lo, int64_t hi) {
      Best b;
      if (srow) {  // the stored upper triangle: d(p, s) sits in row p for p < sp
        for (int64_t p = lo; p < hi; ++p)
          if (alive[p]) update(p, p > sp ? srow[p] : dist[p * c + sp], b);
      } else {
        alive_batches(alive, lo, hi, [&](const int64_t* pos, int n) {
          float d[kStepCols];
          step_distances(X, s, cand.data(), pos, n, d);
          for (int e = 0; e < n; ++e) update(pos[e], d[e], b);
        });
      }
      return b;
    }).p;
  }
}

std::vector<int64_t> candidates(const bool* mask, int64_t N) {
  std::vector<int64_t> cand;
  cand.reserve(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i)
    if (mask == nullptr || mask[i]) cand.push_back(i);
  return cand;
}

// --------------------------------------------------------------------------- DPP MAP (CDPruner)
// Greedy MAP inference of the conditional DPP L = R S R (S_ij = y_i·y_j of the normalised tokens,
// R = diag(r)), as visprune.methods.cdpruner.dpp_map_torch: the incremental Cholesky recurrence
// on S, res[p] = dist²(y_p, span of the selected tokens), gain r_p²·res[p].  A step computes only
// row s of S (c·D multiply-adds; the full S would be c²·D) and, per candidate, the dot of its
// Cholesky row with s's.  Both go through dot_tile, whose result depends only on the two vectors,
// so bitwise-identical tokens keep bitwise-identical gains and exact ties go to the lowest index.
// A token with res <= eps (or a NaN gain) is spent: it ranks after every other (key -1); once a
// spent token is picked every candidate left is spent and no pick changes the state, so the rest
// are the candidates left in index order.
float dpp_key(float r2, float res, float eps) {
  const float gain = r2 * res;
  return res > eps && gain == gain ? gain : -1.0f;
}

// One batch row (`row`, for messages): `cand` lists the candidates ascending, r the row's
// relevance; writes k indices to out in selection order.  Raises ValueError when the row holds
// fewer than need.value candidates.
void dpp_row(const Rows& Y, const float* r, const std::vector<int64_t>& cand, int64_t k, float eps,
             Count need, int64_t row, bool parallel, int64_t* out) {
  const int64_t c = static_cast<int64_t>(cand.size()), D = Y.D;
  TORCH_CHECK_VALUE(need.value <= c, need.name, "=", need.value,
                    " is larger than the number of candidate tokens (", c, " in row ", row, ")");
  if (k == 0) return;
  const int64_t T = k - 1;  // Cholesky rows ever needed: the last pick updates nothing
  std::vector<float> res(static_cast<size_t>(c)), r2(static_cast<size_t>(c));
  // chol[p * T + t]: entry t of candidate p's Cholesky row (contiguous per candidate, so that
  // the step's c dot products of length t read memory in order)
  std::vector<float> chol(static_cast<size_t>(c * T));
  std::vector<uint8_t> alive(static_cast<size_t>(c), 1);
  for_range(parallel, c, 64, [&](int64_t p0, int64_t p1, int64_t) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* y = Y.row(cand[p]);
      // ||y||²: exactly 1 for a unit vector (the dot is 1 up to rounding, which would break
      // exact relevance ties by noise), 0 for a zero token, NaN for a non-finite one
      const float sq = dot(y, y, D);
      res[p] = sq > 0.5f ? 1.0f : sq;
      r2[p] = r[cand[p]] * r[cand[p]];
    }
  });
  Best first;
  for (int64_t p = 0; p < c; ++p) first.offer(dpp_key(r2[p], res[p], eps), p);
  int64_t sp = first.p;
  bool took = first.v >= 0.0f;  // picked for its gain (else every candidate left is spent)

  Steps steps(parallel, c, c * (D + T));
  for (int64_t t = 0; t < k; ++t) {
    out[t] = cand[sp];
    alive[sp] = 0;
    if (t + 1 == k) break;
    if (!took) {
      for (int64_t p = 0, u = t + 1; u < k; ++p)
        if (alive[p]) out[u++] = cand[p], alive[p] = 0;
      return;
    }
    const int64_t s = cand[sp];
    const float denom = std::sqrt(res[sp]);
    const float* chol_s = chol.data() + sp * T;
    const Best next = steps.run([&](int64_t lo, int64_t hi) {
      Best b;
      alive_batches(alive, lo, hi, [&](const int64_t* pos, int n) {
        float sim[kStepCols], done[kStepCols];
        const float* rows[kStepCols];
        step_dots(Y, s, cand.data(), pos, n, sim);
        for (int e = 0; e < kStepCols; ++e) rows[e] = chol.data() + pos[e < n ? e : n - 1] * T;
        dot_tile<1, kStepCols>(&chol_s, rows, t, done);
        for (int e = 0; e < n; ++e) {
          const int64_t q = pos[e];
          const float v = (sim[e] - done[e]) / denom;
          chol[q * T + t] = v;
          res[q] -= v * v;
          b.offer(dpp_key(r2[q], res[q], eps), q);
        }
      });
      return b;
    });
    sp = next.p;
    took = next.v >= 0.0f;
  }
}

// --------------------------------------------------------------------------- mi_scores
// Linear in a per-row summary of the valid text tokens (DESIGN: no N×M matrix): cosine
// mean_j x̂_i·t̂_j = x̂_i·mean_j t̂_j, l2 mean_j |v_i - t_j|² = |v_i - t̄|² + mean_j |t_j - t̄|².
// Padded (masked-out) text tokens take no part, whatever they hold.  The reference computes the
// same summary form, so a non-finite token scores -inf or NaN as it does there.  `row` names the
// batch row in messages.
void mi_row(const Rows& V, const Rows& T, const bool* tmask, int64_t N, int64_t M, int64_t row,
            bool parallel, float* out) {
  const int64_t D = V.D;
  int64_t m = 0;
  std::vector<double> acc(static_cast<size_t>(D), 0.0);
  for (int64_t j = 0; j < M; ++j) {
    if (tmask && !tmask[j]) continue;
    const float* t = T.row(j);
    for (int64_t d = 0; d < D; ++d) acc[d] += t[d];
    ++m;
  }
  TORCH_CHECK_VALUE(m > 0, "text_mask has no True entry in row ", row,
                    ": every row needs a text token");
  std::vector<float> mean(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) mean[d] = static_cast<float>(acc[d] / m);
  float spread = 0.0f;  // mean_j |t_j - t̄|², the same for every visual token
  if (V.metric == Metric::kL2) {
    double s = 0.0;
    for (int64_t j = 0; j < M; ++j) {
      if (tmask && !tmask[j]) continue;
      const float* t = T.row(j);
      for (int64_t d = 0; d < D; ++d) {
        const float e = t[d] - mean[d];
        s += double(e) * double(e);
      }
    }
    spread = static_cast<float>(s / m);
  }
  for_range(parallel, N, 16, [&](int64_t i0, int64_t i1, int64_t) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* v = V.row(i);
      out[i] = V.metric == Metric::kCosine ? dot(v, mean.data(), D)
                                           : -(sqdist(v, mean.data(), D) + spread);
    }
  });
}

// --------------------------------------------------------------------------- gather
// tokens[b, t] = x[b, index[b, t]] for a contiguous int64 index[B, K]; any dtype.  A checked
// index is validated as it is read, before any row is copied: in range, no repeat within a row.
at::Tensor gather_rows(const at::Tensor& x_in, const at::Tensor& index, bool checked) {
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = index.size(1);
  const int64_t* idx = index.data_ptr<int64_t>();
  if (checked && K > 0) {
    std::vector<int64_t> seen(static_cast<size_t>(N), -1);  // the last row that took each token
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < K; ++t) {
        const int64_t i = idx[b * K + t];
        TORCH_CHECK_VALUE(i >= 0 && i < N, "index has value ", i, " in row ", b,
                          ", expected [0, ", N, ")");
        TORCH_CHECK_VALUE(seen[i] != b, "index has duplicate entries within a row (", i,
                          " in row ", b, ")");
        seen[i] = b;
      }
  }
  at::Tensor out = at::empty({B, K, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const auto* src = static_cast<const char*>(x.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t es = x.element_size(), s0 = x.stride(0) * es, s1 = x.stride(1) * es;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, D * es));
  at::parallel_for(0, B * K, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      std::memcpy(dst + r * D * es, src + (r / K) * s0 + idx[r] * s1, static_cast<size_t>(D * es));
  });
  return out;
}

const bool* mask_ptr(const c10::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value()) return nullptr;
  holder = mask->contiguous();
  return holder.data_ptr<bool>();
}

// --------------------------------------------------------------------------- received attention
// Two passes, as the Triton kernels, in base 2 (s = q·k · scale · log2 e, P = 2^(s - lse)):
// 1. per (b, h), the log-sum-exp of every selected query row over its allowed keys, online over
//    blocks of 16 keys (running max and normaliser), chunks of kAttnChunk rows sharing each
//    packed block of keys; +inf for a row with no allowed key (its probabilities are then 0);
// 2. per (b, block of 16 span columns), for each tile of selected rows, P against those columns
//    only, reduced over heads (max or sum), then summed over the rows in row order.
// Scores come from gram_tile (6 query rows × 16 keys); nothing of size L × Lk is formed: the
// extra memory is the [B, H, L] row statistics, the selected rows and per-task key panels.
constexpr int kAttnChunk = 16 * kGramR;  // query rows per pass-1 chunk (16 Gram tiles)

// The 16 keys k[j0 .. j0+16) of one kv head transposed into panel[dh][16] (zeros past Lk), and
// bias[t] = 0 for a key that may be attended to, -inf for padding or one past Lk.
void pack_keys(const float* k, int64_t Lk, int64_t dh, int64_t j0, const bool* key_mask,
               float* panel, float* bias) {
  for (int t = 0; t < kGramC; ++t) {
    const int64_t j = j0 + t;
    const bool in = j >= 0 && j < Lk;
    bias[t] = in && (key_mask == nullptr || key_mask[j]) ? 0.0f : -kInf;
    for (int64_t d = 0; d < dh; ++d) panel[d * kGramC + t] = in ? k[j * dh + d] : 0.0f;
  }
}

// One row's 16 scores s[t] = dots[t] · c + bias[t], keys t > last excluded: the online update of
// its running max m and normaliser l (l scaled to 2^m).
void lse_update_portable(const float* dots, const float* bias, float c, int last, float& m,
                         float& l) {
  float s[kGramC];
  float top = m;
  for (int t = 0; t < kGramC; ++t) {
    s[t] = t <= last ? dots[t] * c + bias[t] : -kInf;
    top = std::max(top, s[t]);
  }
  const float ref = top == -kInf ? 0.0f : top;  // no allowed key yet: every term is 2^-inf = 0
  float sum = 0.0f;
  for (int t = 0; t < kGramC; ++t) sum += std::exp2(s[t] - ref);
  l = l * std::exp2(m - ref) + sum;
  m = top;
}

// p[t] = 2^(dots[t] · c - lse) for the allowed keys t <= last (bias 0), 0 for the others.
void probs_portable(const float* dots, const float* bias, float c, float lse, int last, float* p) {
  for (int t = 0; t < kGramC; ++t)
    p[t] = t <= last && bias[t] == 0.0f ? std::exp2(dots[t] * c - lse) : 0.0f;
}

#ifdef VISPRUNE_X86
// 2^x on 8 lanes for x below 128 (-inf included): Cephes' exp2f polynomial on the fraction in
// [-0.5, 0.5] (relative error ~2e-7), and 0 below 2^-126 (such a probability adds nothing).
__attribute__((target("avx2,fma"))) inline __m256 exp2_avx2(__m256 x) {
  const __m256 floor = _mm256_set1_ps(-126.0f);
  const __m256 tiny = _mm256_cmp_ps(x, floor, _CMP_LT_OQ);
  x = _mm256_max_ps(x, floor);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// The scores s = dots · c + bias of 16 keys in two registers, keys t > last set to -inf.
__attribute__((target("avx2,fma"))) inline void scores_avx2(const float* dots, const float* bias,
                                                            float c, int last, __m256* s) {
  const __m256 vc = _mm256_set1_ps(c), vlast = _mm256_set1_ps(static_cast<float>(last));
  const __m256 ninf = _mm256_set1_ps(-kInf);
  for (int h = 0; h < 2; ++h) {
    const __m256 t = _mm256_setr_ps(8 * h + 0, 8 * h + 1, 8 * h + 2, 8 * h + 3, 8 * h + 4,
                                    8 * h + 5, 8 * h + 6, 8 * h + 7);
    const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(dots + 8 * h), vc, _mm256_loadu_ps(bias + 8 * h));
    s[h] = _mm256_blendv_ps(v, ninf, _mm256_cmp_ps(t, vlast, _CMP_GT_OQ));
  }
}

__attribute__((target("avx2,fma"))) void lse_update_avx2(const float* dots, const float* bias,
                                                         float c, int last, float& m, float& l) {
  __m256 s[2];
  scores_avx2(dots, bias, c, last, s);
  __m256 v = _mm256_max_ps(s[0], s[1]);
  __m128 w = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  w = _mm_max_ps(w, _mm_movehl_ps(w, w));
  w = _mm_max_ss(w, _mm_shuffle_ps(w, w, 1));
  const float top = std::max(m, _mm_cvtss_f32(w));
  const float ref = top == -kInf ? 0.0f : top;
  const __m256 vref = _mm256_set1_ps(ref);
  const float sum = lane_sum_avx2(_mm256_add_ps(exp2_avx2(_mm256_sub_ps(s[0], vref)),
                                            exp2_avx2(_mm256_sub_ps(s[1], vref))));
  l = l * std::exp2(m - ref) + sum;
  m = top;
}

__attribute__((target("avx2,fma"))) void probs_avx2(const float* dots, const float* bias, float c,
                                                    float lse, int last, float* p) {
  __m256 s[2];
  scores_avx2(dots, bias, c, last, s);
  const __m256 vlse = _mm256_set1_ps(lse);
  for (int h = 0; h < 2; ++h) _mm256_storeu_ps(p + 8 * h, exp2_avx2(_mm256_sub_ps(s[h], vlse)));
}
#endif

inline void lse_update(const float* dots, const float* bias, float c, int last, float& m, float& l) {
#ifdef VISPRUNE_X86
  if (use_avx2()) return lse_update_avx2(dots, bias, c, last, m, l);
#endif
  lse_update_portable(dots, bias, c, last, m, l);
}

inline void probs(const float* dots, const float* bias, float c, float lse, int last, float* p) {
#ifdef VISPRUNE_X86
  if (use_avx2()) return probs_avx2(dots, bias, c, lse, last, p);
#endif
  probs_portable(dots, bias, c, lse, last, p);
}

// The selected query rows of each batch row, ascending.  A row is valid when key_mask is True at
// its own key position; "after" / "span": the valid rows at / inside the span; "last": the last
// valid row; a mask: its True rows as given.  Raises for a span outside [0, Lk) (unvalidated).
std::vector<std::vector<int64_t>> selected_rows(const int64_t* start, int64_t B, int64_t L,
                                                int64_t Lk, int64_t length, Queries queries,
                                                const bool* qmask, const bool* kmask) {
  const int64_t off = Lk - L;
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = start[b];
    TORCH_CHECK_VALUE(s >= 0 && s + length <= Lk, "start has value ", s, " in row ", b,
                      "; with length=", length, " the span needs 0 <= start and start + length <= Lk=",
                      Lk);
    auto& r = rows[static_cast<size_t>(b)];
    for (int64_t i = 0; i < L; ++i) {
      const int64_t pos = i + off;
      const bool valid = kmask == nullptr || kmask[b * Lk + pos];
      bool take = false;
      switch (queries) {
        case Queries::kAfter: take = valid && pos >= s + length; break;
        case Queries::kSpan: take = valid && pos >= s && pos < s + length; break;
        case Queries::kLast: take = valid; break;
        case Queries::kMask: take = qmask[b * L + i]; break;
      }
      if (take) r.push_back(i);
    }
    if (queries == Queries::kLast && r.size() > 1) r.erase(r.begin(), r.end() - 1);
  }
  return rows;
}

// Up to kGramR query rows rows[0..n) of one head as gram_tile's row pointers (the last repeated).
inline void tile_rows(const float* Q, int64_t dh, const int64_t* rows, int n, const float** a) {
  for (int r = 0; r < kGramR; ++r) a[r] = Q + rows[std::min(r, n - 1)] * dh;
}

at::Tensor received_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& start,
                              int64_t length, Queries queries,
                              const c10::optional<at::Tensor>& query_mask, Heads heads,
                              const c10::optional<at::Tensor>& key_mask, double scale) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), dh = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), G = H / Hkv, off = Lk - L;
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const bool* qmask = query_mask.has_value() ? query_mask->data_ptr<bool>() : nullptr;
  const bool* kmask = key_mask.has_value() ? key_mask->data_ptr<bool>() : nullptr;
  const auto rows = selected_rows(start.data_ptr<int64_t>(), B, L, Lk, length, queries, qmask, kmask);
  const float c = static_cast<float>(scale * 1.4426950408889634);  // scale · log2(e)

  // Pass 1: lse[b, h, i] of the selected rows (the others are never read).
  at::Tensor lse_t = at::empty({B, H, L}, q.options());
  float* lse = lse_t.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> panel(static_cast<size_t>(dh * kGramC)), m(kAttnChunk), l(kAttnChunk);
    float bias[kGramC], dots[kGramR * kGramC];
    const float* a[kGramR];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H;
      const auto& sel = rows[static_cast<size_t>(b)];
      const int64_t n = static_cast<int64_t>(sel.size());
      const float* Q = qd + task * L * dh;
      const float* K = kd + (b * Hkv + h / G) * Lk * dh;
      const bool* km = kmask ? kmask + b * Lk : nullptr;
      for (int64_t c0 = 0; c0 < n; c0 += kAttnChunk) {
        const int64_t c1 = std::min(n, c0 + kAttnChunk);
        std::fill(m.begin(), m.end(), -kInf);
        std::fill(l.begin(), l.end(), 0.0f);
        for (int64_t j0 = 0; j0 <= sel[c1 - 1] + off; j0 += kGramC) {
          pack_keys(K, Lk, dh, j0, km, panel.data(), bias);
          for (int64_t r0 = c0; r0 < c1; r0 += kGramR) {
            const int nr = static_cast<int>(std::min<int64_t>(kGramR, c1 - r0));
            if (sel[r0 + nr - 1] + off < j0) continue;  // the tile's rows precede these keys
            tile_rows(Q, dh, sel.data() + r0, nr, a);
            gram_tile(a, panel.data(), dh, dots);
            for (int r = 0; r < nr; ++r) {
              const int64_t last = sel[r0 + r] + off - j0;
              if (last >= 0)
                lse_update(dots + r * kGramC, bias, c, static_cast<int>(std::min<int64_t>(last, kGramC - 1)),
                           m[r0 - c0 + r], l[r0 - c0 + r]);
            }
          }
        }
        for (int64_t r = c0; r < c1; ++r)
          lse[task * L + sel[r]] = m[r - c0] == -kInf ? kInf : m[r - c0] + std::log2(l[r - c0]);
      }
    }
  });

  // Pass 2: out[b, t] for blocks of 16 span columns; each column is one task's, its rows summed
  // in ascending order.
  at::Tensor out_t = at::empty({B, length}, q.options());
  float* out = out_t.data_ptr<float>();
  const int64_t col_blocks = (length + kGramC - 1) / kGramC;
  const int64_t* st = start.data_ptr<int64_t>();
  at::parallel_for(0, B * col_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> panels(static_cast<size_t>(Hkv * dh * kGramC));
    float bias[kGramC], dots[kGramR * kGramC], p[kGramC], red[kGramR][kGramC], acc[kGramC];
    const float* a[kGramR];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / col_blocks, t_first = (task % col_blocks) * kGramC;
      const int64_t j0 = st[b] + t_first;  // the block's first column (key position)
      const int nt = static_cast<int>(std::min<int64_t>(kGramC, length - t_first));
      for (int64_t g = 0; g < Hkv; ++g)
        pack_keys(kd + (b * Hkv + g) * Lk * dh, std::min(Lk, j0 + nt), dh, j0,
                  kmask ? kmask + b * Lk : nullptr, panels.data() + g * dh * kGramC, bias);
      std::fill(acc, acc + kGramC, 0.0f);
      const auto& sel = rows[static_cast<size_t>(b)];
      // Rows before the first column see none of the block (causal).
      const auto first = std::lower_bound(sel.begin(), sel.end(), j0 - off);
      for (int64_t r0 = first - sel.begin(); r0 < static_cast<int64_t>(sel.size()); r0 += kGramR) {
        const int nr = static_cast<int>(std::min<int64_t>(kGramR, sel.size() - r0));
        std::memset(red, 0, sizeof(red));
        for (int64_t h = 0; h < H; ++h) {
          tile_rows(qd + (b * H + h) * L * dh, dh, sel.data() + r0, nr, a);
          gram_tile(a, panels.data() + (h / G) * dh * kGramC, dh, dots);
          for (int r = 0; r < nr; ++r) {
            const int64_t i = sel[r0 + r];
            const int last = static_cast<int>(std::min<int64_t>(i + off - j0, kGramC - 1));
            probs(dots + r * kGramC, bias, c, lse[(b * H + h) * L + i], last, p);
            for (int t = 0; t < kGramC; ++t)
              red[r][t] = heads == Heads::kMax ? std::max(red[r][t], p[t]) : red[r][t] + p[t];
          }
        }
        for (int r = 0; r < nr; ++r)
          for (int t = 0; t < kGramC; ++t) acc[t] += red[r][t];
      }
      for (int t = 0; t < nt; ++t)
        out[b * length + t_first + t] = heads == Heads::kMean ? acc[t] / static_cast<float>(H) : acc[t];
    }
  });
  return out_t;
}

// --------------------------------------------------------------------------- kernels
at::Tensor mi_scores(const Prepared& V, const Prepared& T,
                     const c10::optional<at::Tensor>& text_mask, Metric metric) {
  const int64_t B = V.y.size(0), N = V.y.size(1), M = T.y.size(1);
  at::Tensor tm;
  const bool* tmask = mask_ptr(text_mask, tm);
  at::Tensor out = at::empty({B, N}, V.y.options());
  float* o = out.data_ptr<float>();
  for_batch(B, [&](int64_t b, bool parallel) {
    mi_row(rows_of(V, b, metric), rows_of(T, b, metric), tmask ? tmask + b * M : nullptr, N, M,
           V.first_row + b, parallel, o + b * N);
  });
  return out;
}

at::Tensor greedy(const Prepared& P, int64_t k, Objective objective, Metric metric,
                  const c10::optional<at::Tensor>& mask, int64_t start, Count need) {
  const int64_t B = P.y.size(0), N = P.y.size(1);
  at::Tensor out = at::empty({B, k}, P.y.options().dtype(at::kLong));
  at::Tensor mh;
  const bool* m = mask_ptr(mask, mh);
  int64_t* o = out.data_ptr<int64_t>();
  for_batch(B, [&](int64_t b, bool parallel) {
    greedy_row(rows_of(P, b, metric), candidates(m ? m + b * N : nullptr, N), k, objective, start,
               need, P.first_row + b, parallel, o + b * k);
  });
  return out;
}

at::Tensor dpp_map(const Prepared& P, const at::Tensor& relevance, int64_t k,
                   const c10::optional<at::Tensor>& mask, double eps, Count need) {
  const int64_t B = P.y.size(0), N = P.y.size(1);
  at::Tensor out = at::empty({B, k}, P.y.options().dtype(at::kLong));
  at::Tensor mh;
  const bool* m = mask_ptr(mask, mh);
  const float* r = relevance.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  auto row = [&](int64_t b, bool parallel) {
    dpp_row(rows_of(P, b, Metric::kCosine), r + b * N, candidates(m ? m + b * N : nullptr, N), k,
            static_cast<float>(eps), need, P.first_row + b, parallel, o + b * k);
  };
  // Rows in parallel make every core stream a whole row of tokens from memory at every step.
  // When a row does not fit a core's cache but its share of a split row does, the rows go one
  // after another with each step split over the cores, whose shares then stay cached from step
  // to step (1.5x at N = 576, D = 1024 on 2 cores with 2 MiB of L2 each; the same at D = 4096).
  const int64_t row_bytes = N * P.y.size(2) * static_cast<int64_t>(sizeof(float));
  const int64_t cache = core_cache_bytes();
  if (B > 1 && row_bytes > cache && row_bytes <= at::get_num_threads() * cache) {
    for (int64_t b = 0; b < B; ++b) row(b, true);
  } else {
    for_batch(B, row);
  }
  return out;
}

// --------------------------------------------------------------------------- HoloV statistics
// visprune.methods.holov.similarity_variance, crop by crop: S_ij = (x_i·x_j) / n_i / n_j with
// n = |x| + 1e-6 (ATen's norm, as the PyTorch form) and S_ii = 0 over the M tokens of the crop,
// mu_i = Σ_j S_ij / m1 and V_i = Σ_j (S_ij - mu_i)² / m1 (j = i included, m1 = max(M - 1, 1)).
// Each pair's product is computed once, over the upper triangle in 2×4 dot tiles whose rows (the
// crop, M·D floats) stay in the core's cache; the PyTorch form's batched [M, D] @ [D, M]
// products compute every pair twice.  The crops of all images are split over the threads.
at::Tensor holov_variance(const at::Tensor& x, int64_t crops) {
  constexpr int R = 2, C = 4;
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t last[] = {-1};
  const at::Tensor norm = (at::linalg_vector_norm(x, 2, last, /*keepdim=*/false) + kHolovEps)
                              .contiguous();
  at::Tensor out = at::zeros({B, N}, x.options());
  const float* xs = x.data_ptr<float>();
  const float* ns = norm.data_ptr<float>();
  float* o = out.data_ptr<float>();
  crops = std::min(crops, N);  // more crops than tokens: single tokens (variance 0) either way
  const int64_t base = N / crops, rem = N % crops;
  at::parallel_for(0, B * crops, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / crops, cr = t % crops;
      const int64_t M = base + (cr < rem ? 1 : 0), first = cr * base + std::min(cr, rem);
      if (M == 0) continue;
      const float* X = xs + (b * N + first) * D;
      const float* n = ns + b * N + first;
      S.assign(static_cast<size_t>(M * M), 0.0f);
      for (int64_t i0 = 0; i0 < M; i0 += R)
        for (int64_t j0 = i0 / C * C; j0 < M; j0 += C) {
          const float* a[R];
          const float* c[C];
          for (int r = 0; r < R; ++r) a[r] = X + std::min(i0 + r, M - 1) * D;
          for (int q = 0; q < C; ++q) c[q] = X + std::min(j0 + q, M - 1) * D;
          float d[R * C];
          dot_tile<R, C>(a, c, D, d);
          for (int r = 0; r < R; ++r)
            for (int q = 0; q < C; ++q) {
              const int64_t i = i0 + r, j = j0 + q;
              if (i < j && j < M) S[i * M + j] = S[j * M + i] = d[r * C + q] / n[i] / n[j];
            }
        }
      const float m1 = static_cast<float>(std::max<int64_t>(M - 1, 1));
      for (int64_t i = 0; i < M; ++i) {
        const float* row = S.data() + i * M;
        float sum = 0.0f;
        for (int64_t j = 0; j < M; ++j) sum += row[j];
        const float mu = sum / m1;
        float var = 0.0f;
        for (int64_t j = 0; j < M; ++j) var += (row[j] - mu) * (row[j] - mu);
        o[b * N + first + i] = var / m1;
      }
    }
  });
  return out;
}

}  // namespace

// The per-row routines on one row given by pointers (rows.h; varlen.cpp's segments).
void greedy_tokens(const float* y, const float* sq, int64_t n, int64_t D, Metric metric,
                   const bool* mask, int64_t k, Objective objective, int64_t start, Count need,
                   int64_t row, bool parallel, int64_t* out) {
  greedy_row(Rows{y, sq, D, metric}, candidates(mask, n), k, objective, start, need, row,
             parallel, out);
}

void mi_tokens(const float* v, int64_t n, const float* t, int64_t M, const bool* tmask, int64_t D,
               Metric metric, int64_t row, bool parallel, float* out) {
  mi_row(Rows{v, nullptr, D, metric}, Rows{t, nullptr, D, metric}, tmask, n, M, row, parallel,
         out);
}

float canonical_dot(const float* a, const float* b, int64_t D) { return dot(a, b, D); }

bool blas_fp32() { return blas_is_fp32(); }

bool avx512() {
#ifdef VISPRUNE_X86
  return isa() == Isa::kAvx512;
#else
  return false;
#endif
}

const Kernels& kernels() {
  static const Kernels k{&mi_scores,          &greedy,  &gather_rows,
                         &received_attention, &dpp_map, &holov_variance};
  return k;
}

}  // namespace cpu
}  // namespace visprune

// CUDA kernels of visprune: mi_scores, greedy selection and the row gather, which ops.cpp
// composes into the four ops (struct Kernels).  Same results as visprune/reference.py (indices
// identical).  Nothing here reads a value back to the host: the choices that depend on the data
// (non-finite rows, rows without candidates, out-of-range indices) are made on the device.
//
// greedy_select is latency-bound at batch size 1 (k sequential argmax steps), so each batch row
// runs on G cooperating blocks of one persistent kernel: a block owns a slice of the tokens and
// keeps their running min / sum in shared memory, takes a warp-level then block-level argmax,
// publishes it, and the blocks of the row meet at a grid barrier (one per step); every block then
// reduces the G partial results itself, so one barrier per step suffices.  The kernel is launched
// cooperatively (cudaLaunchCooperativeKernel) so that all its blocks are resident.
//
// Exact ties must stay exact: every distance is computed by a routine whose result depends only
// on the two tokens (never on where they sit in a tile, a warp or the batch), so identical tokens
// get bitwise-identical distances and the lowest index wins, as in the reference.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <limits>
#include <utility>

#include "../visprune.h"

namespace visprune {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // every kernel here: 8 warps
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kFull = 0xffffffffu;

#define VISPRUNE_CUDA_CHECK(expr)                                                     \
  do {                                                                                \
    const cudaError_t err_ = (expr);                                                  \
    TORCH_CHECK(err_ == cudaSuccess, "visprune CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)

// The reference's where(d > 0, d, 0): rounding below 0 and NaN both become 0.
__device__ __forceinline__ float clamp_distance(float d) { return d > 0.0f ? d : 0.0f; }

// The reference's arithmetic, rounded step by step (no contraction into an FMA).
__device__ __forceinline__ float distance(float dot, bool cosine, float sq_i, float sq_j) {
  return clamp_distance(cosine ? __fsub_rn(1.0f, dot)
                               : __fsub_rn(__fadd_rn(sq_i, sq_j), __fmul_rn(2.0f, dot)));
}

// Σ_d a[d]·b[d] by one warp: lane l sums d = l + 32m in order with FMA, then an xor butterfly.
// Every lane ends with the same value, which depends only on a, b and D.
__device__ __forceinline__ float warp_dot(const float* __restrict__ a, const float* __restrict__ b,
                                          int64_t D, int lane) {
  float acc = 0.0f;
  for (int64_t d = lane; d < D; d += kWarp) acc = fmaf(a[d], b[d], acc);
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(kFull, acc, off);
  return acc;
}

// Σ_d (a[d] - b[d])², the same way.
__device__ __forceinline__ float warp_sqdist(const float* __restrict__ a,
                                             const float* __restrict__ b, int64_t D, int lane) {
  float acc = 0.0f;
  for (int64_t d = lane; d < D; d += kWarp) {
    const float t = a[d] - b[d];
    acc = fmaf(t, t, acc);
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(kFull, acc, off);
  return acc;
}

// --------------------------------------------------------------------------- argmax
// An argmax candidate: the larger value wins, the lower index on ties (values are never NaN).
struct Best {
  float v;
  int i;
};

__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

__device__ __forceinline__ Best warp_argmax(Best x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    Best o{__shfl_xor_sync(kFull, x.v, off), __shfl_xor_sync(kFull, x.i, off)};
    x = better(x, o);
  }
  return x;
}

// Block-wide argmax; the result is valid in every thread.
__device__ Best block_argmax(Best x, Best* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  x = warp_argmax(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  Best y = lane < kWarps ? scratch[lane] : Best{-INFINITY, INT_MAX};
  y = warp_argmax(y);
  __syncthreads();  // scratch is reused by the next call
  return y;
}

// --------------------------------------------------------------------------- grid barrier
// The blocks of one batch row meet here.  count/gen are per row; all blocks are resident
// (cooperative launch).  Thread 0 fences its block's writes before arriving.
__device__ void row_barrier(unsigned* count, volatile unsigned* gen, unsigned nblocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned g = *gen;
    __threadfence();
    if (atomicAdd(count, 1u) == nblocks - 1) {
      atomicExch(count, 0u);
      __threadfence();
      atomicAdd(const_cast<unsigned*>(gen), 1u);
    } else {
      while (*gen == g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
        __nanosleep(20);
#endif
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// --------------------------------------------------------------------------- packed segments
// Segment b of a packed batch (cu non-null, int64[B+1]) or row b of a dense one: its first token
// in the per-token buffers and its length; a packed segment is clamped into [0, T] (here N = T),
// so an unvalidated cu never leads outside the tokens.
struct Span {
  int64_t bos, n;
};

__device__ __forceinline__ Span row_span(const int64_t* __restrict__ cu, int64_t b, int64_t N) {
  if (cu == nullptr) return {b * N, N};
  const int64_t bos = min(max(cu[b], int64_t(0)), N);
  return {bos, min(max(cu[b + 1], bos), N) - bos};
}

// --------------------------------------------------------------------------- per-row reductions
// out[b, i] = y[b, i]·v[b] (kDot) or |y[b, i] - v[b]|² (!kDot), one warp per token.  mi_scores
// and the maxsum start are linear in such a per-row summary v.  With seg (packed tokens, B = 1)
// token i takes the summary of its segment seg[i].
template <bool kDot>
__global__ void row_summary_kernel(const float* __restrict__ y, const float* __restrict__ v,
                                   const int64_t* __restrict__ seg, int64_t N, int64_t D,
                                   float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (i >= N) return;
  const float* row = y + (b * N + i) * D;
  const float* vb = v + (seg != nullptr ? seg[b * N + i] : b) * D;
  const float r = kDot ? warp_dot(row, vb, D, lane) : warp_sqdist(row, vb, D, lane);
  if (lane == 0) out[b * N + i] = r;
}

at::Tensor row_summary(const at::Tensor& y, const at::Tensor& v, bool dot,
                       const at::Tensor& seg = at::Tensor()) {
  const int64_t B = y.size(0), N = y.size(1), D = y.size(2);
  at::Tensor out = at::empty({B, N}, y.options());
  if (B == 0 || N == 0) return out;
  const dim3 grid((N + kWarps - 1) / kWarps, B);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor vc = v.contiguous();
  const int64_t* sp = seg.defined() ? seg.data_ptr<int64_t>() : nullptr;
  if (dot) {
    row_summary_kernel<true><<<grid, kThreads, 0, stream>>>(y.data_ptr<float>(), vc.data_ptr<float>(),
                                                            sp, N, D, out.data_ptr<float>());
  } else {
    row_summary_kernel<false><<<grid, kThreads, 0, stream>>>(
        y.data_ptr<float>(), vc.data_ptr<float>(), sp, N, D, out.data_ptr<float>());
  }
  VISPRUNE_CUDA_CHECK(cudaGetLastError());
  return out;
}

// --------------------------------------------------------------------------- pairwise tiles
// maxmin's start key min_{j != i} d(i, j) over the candidates.  64×64 tiles of the upper
// triangle only; each thread owns 4×4 entries and sums d in order with FMA (one chain per entry,
// so an entry depends only on its two tokens and not on their order).  Row and column minima go
// to key (float bits as unsigned: distances are >= 0, where the bit order is the float order).
// With kStore the whole distance matrix is written for the greedy steps (dense rows only).  With
// cu, blockIdx.z is segment b of a packed batch (N = T): tiles past its length return at once.
constexpr int kTile = 64, kTileK = 16, kPer = 4;

template <bool kStore>
__global__ void pair_min_kernel(const float* __restrict__ y, const float* __restrict__ sq,
                                const bool* __restrict__ cand, const int64_t* __restrict__ cu,
                                int64_t N_in, int64_t D, bool cosine, unsigned* __restrict__ key,
                                float* __restrict__ dist) {
  if (blockIdx.x < blockIdx.y) return;  // lower-triangle tiles: their pairs are done above
  __shared__ float as[kTileK][kTile + 1], bs[kTileK][kTile + 1];
  const int64_t b = blockIdx.z;
  const Span span = row_span(cu, b, N_in);
  const int64_t N = span.n;  // the row's own length from here on
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  if (j0 >= N) return;  // the whole block: the condition is the same for every thread
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float* yb = y + span.bos * D;
  float acc[kPer][kPer] = {};
  for (int64_t k0 = 0; k0 < D; k0 += kTileK) {
    for (int e = threadIdx.x; e < kTile * kTileK; e += kThreads) {
      const int r = e / kTileK, kk = e % kTileK;
      const int64_t k = k0 + kk;
      as[kk][r] = (i0 + r < N && k < D) ? yb[(i0 + r) * D + k] : 0.0f;
      bs[kk][r] = (j0 + r < N && k < D) ? yb[(j0 + r) * D + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[kPer], c[kPer];
#pragma unroll
      for (int r = 0; r < kPer; ++r) a[r] = as[kk][ty * kPer + r];
#pragma unroll
      for (int q = 0; q < kPer; ++q) c[q] = bs[kk][tx * kPer + q];
#pragma unroll
      for (int r = 0; r < kPer; ++r)
#pragma unroll
        for (int q = 0; q < kPer; ++q) acc[r][q] = fmaf(a[r], c[q], acc[r][q]);
    }
    __syncthreads();
  }
  const bool* cb = cand + span.bos;
  float colmin[kPer];
#pragma unroll
  for (int q = 0; q < kPer; ++q) colmin[q] = INFINITY;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int64_t i = i0 + ty * kPer + r;
    float rowmin = INFINITY;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int64_t j = j0 + tx * kPer + q;
      if (i < j && j < N && cb[i] && cb[j]) {
        const float d = distance(acc[r][q], cosine, cosine ? 0.0f : sq[span.bos + i],
                                 cosine ? 0.0f : sq[span.bos + j]);
        rowmin = fminf(rowmin, d);
        colmin[q] = fminf(colmin[q], d);
        if (kStore) dist[(span.bos + i) * N + j] = dist[(span.bos + j) * N + i] = d;
      }
    }
    if (rowmin < INFINITY) atomicMin(key + span.bos + i, __float_as_uint(rowmin));
  }
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int64_t j = j0 + tx * kPer + q;
    if (colmin[q] < INFINITY) atomicMin(key + span.bos + j, __float_as_uint(colmin[q]));
  }
}

// --------------------------------------------------------------------------- greedy steps
struct GreedyArgs {
  const float* y;      // [B, N, D] prepared tokens
  const float* sq;     // [B, N] squared norms (l2) or null
  const float* dist;   // [B, N, N] stored distances or null (then computed per step)
  const float* key;    // [B, N] start key (auto start) or null
  const bool* cand;    // [B, N]
  const int64_t* cu;   // packed batch: int64[B+1] segment offsets (N = T), else null
  const int64_t* ck;   // packed batch: int64[B+1] offsets of each segment's picks, else null
  int64_t* out;        // [B, k], or packed [ck[B]] (global positions)
  Best* partial;       // [2, B, G] per-block argmax of a step (double-buffered by parity)
  unsigned* count;     // [B] barrier arrivals
  unsigned* gen;       // [B] barrier generation
  int64_t B, N, D, k, start;
  int blocks;          // G: blocks per batch row
  int chunk;           // tokens per block
  bool cosine, maxmin;
};

// Grid (G, rows of this launch); block g of row b owns tokens [g·chunk, (g+1)·chunk).  Shared:
// run[chunk] floats, then alive[chunk] flags.
__global__ void greedy_kernel(GreedyArgs a, int64_t row0) {
  extern __shared__ float smem[];
  __shared__ Best scratch[kWarps];
  __shared__ int selected;
  float* run = smem;
  bool* alive = reinterpret_cast<bool*>(smem + a.chunk);
  const int64_t b = row0 + blockIdx.y;
  const int g = blockIdx.x, lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  // The row's tokens [bos, bos + N) and picks: out[o0 .. o0 + k) hold index + shift.
  const Span span = row_span(a.cu, b, a.N);
  const int64_t N = span.n, bos = span.bos;
  const int64_t o0 = a.ck != nullptr ? a.ck[b] : b * a.k;
  const int64_t k = a.ck != nullptr ? a.ck[b + 1] - o0 : a.k;
  const int64_t shift = a.cu != nullptr ? bos : 0;
  const int64_t lo = int64_t(g) * a.chunk, hi = lo + a.chunk < N ? lo + a.chunk : N;
  const int64_t n = hi > lo ? hi - lo : 0;
  const bool* cb = a.cand + bos;
  const float* yb = a.y + bos * a.D;

  for (int64_t t = threadIdx.x; t < n; t += kThreads) {
    run[t] = a.maxmin ? INFINITY : 0.0f;
    alive[t] = cb[lo + t];
  }
  __syncthreads();

  // The block-wide choice of every step is reduced over all G blocks after the barrier.
  auto publish_and_reduce = [&](Best mine, int step) -> int {
    mine = block_argmax(mine, scratch);
    Best* slot = a.partial + ((step & 1) * a.B + b) * a.blocks;
    if (threadIdx.x == 0) slot[g] = mine;
    row_barrier(a.count + b, a.gen + b, a.blocks);
    if (threadIdx.x == 0) {
      Best all{-INFINITY, INT_MAX};
      for (int h = 0; h < a.blocks; ++h) {
        const volatile Best* p = slot + h;
        all = better(all, Best{p->v, p->i});
      }
      selected = all.i == INT_MAX ? -1 : all.i;  // -1: no candidate left in the row
    }
    __syncthreads();
    return selected;
  };

  int64_t s = a.start;
  int step = 0;
  if (s < 0) {  // auto start: the argmax of the start key over the candidates
    Best mine{-INFINITY, INT_MAX};
    for (int64_t t = threadIdx.x; t < n; t += kThreads)
      if (alive[t]) mine = better(mine, Best{a.key[bos + lo + t], int(lo + t)});
    s = publish_and_reduce(mine, step++);
  }
  if (s >= N) s = -1;  // an int start outside a short segment (unvalidated)
  for (int64_t t = 0; t < k; ++t) {
    if (s < 0) {  // the same in every block of the row, so they all leave the loop here
      if (g == 0)
        for (int64_t u = t + threadIdx.x; u < k; u += kThreads) a.out[o0 + u] = -1;
      break;
    }
    if (g == 0 && threadIdx.x == 0) a.out[o0 + t] = s + shift;
    if (s >= lo && s < hi && threadIdx.x == 0) alive[s - lo] = false;
    __syncthreads();
    if (t + 1 == k) break;
    Best mine{-INFINITY, INT_MAX};
    if (a.dist != nullptr) {  // stored distances: one thread per token
      const float* ds = a.dist + (bos + s) * N;
      for (int64_t e = threadIdx.x; e < n; e += kThreads) {
        if (!alive[e]) continue;
        const float d = ds[lo + e];
        run[e] = a.maxmin ? fminf(run[e], d) : run[e] + d;
        mine = better(mine, Best{run[e], int(lo + e)});
      }
    } else {  // one warp per token: d(s, i) from the tokens
      const float* ys = yb + s * a.D;
      const float sq_s = a.cosine ? 0.0f : a.sq[bos + s];
      for (int64_t e = warp; e < n; e += kWarps) {
        if (!alive[e]) continue;
        const float dot = warp_dot(ys, yb + (lo + e) * a.D, a.D, lane);
        if (lane == 0) {
          const float d = distance(dot, a.cosine, sq_s, a.cosine ? 0.0f : a.sq[bos + lo + e]);
          run[e] = a.maxmin ? fminf(run[e], d) : run[e] + d;
          mine = better(mine, Best{run[e], int(lo + e)});
        }
      }
    }
    s = publish_and_reduce(mine, step++);
  }
}

// --------------------------------------------------------------------------- greedy driver
constexpr int64_t kMaxStoredDistances = int64_t(1) << 26;  // 256 MiB of fp32 for B·N²

// maxsum's exact start key Σ_j d(i, j) over the candidates j, for the rows flagged in exact[b]
// (an l2 squared norm that overflows or is not finite, where the linear form below breaks down):
// one warp per token, j ascending.  Other rows return at once, so the kernel is launched
// unconditionally and the host never asks whether a row needs it.
__global__ void pair_sum_kernel(const float* __restrict__ y, const float* __restrict__ sq,
                                const bool* __restrict__ cand, const bool* __restrict__ exact,
                                const int64_t* __restrict__ cu, int64_t N_in, int64_t D,
                                float* __restrict__ key) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.y;
  const Span span = row_span(cu, b, N_in);
  const int64_t N = span.n, bos = span.bos;
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (i >= N || !exact[b] || !cand[bos + i]) return;
  const float* yb = y + bos * D;
  const float sq_i = sq[bos + i];
  float s = 0.0f;
  for (int64_t j = 0; j < N; ++j) {
    if (!cand[bos + j]) continue;
    const float dot = warp_dot(yb + i * D, yb + j * D, D, lane);
    s = __fadd_rn(s, distance(dot, /*cosine=*/false, sq_i, sq[bos + j]));
  }
  if (lane == 0) key[bos + i] = s;
}

// The start key of "auto": maxmin min_{j != i} d(i, j) (pairwise tiles, which can also leave the
// distance matrix for the steps); maxsum Σ_j d(i, j), linear in a per-row summary (cosine:
// n - x̂_i·Σ_j x̂_j over the tokens without NaN, whose own key is 0; l2: |x_i - x̄|², ranked like
// Σ_j |x_i - x_j|²) except in the l2 rows with a squared norm that is not finite (or close to
// overflowing), where pair_sum_kernel sums the exact distances.
at::Tensor start_key(const Prepared& P, const at::Tensor& cand, bool maxmin, bool cosine,
                     at::Tensor* dist) {
  const int64_t B = P.y.size(0), N = P.y.size(1), D = P.y.size(2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (maxmin) {
    const bool store = B * N * N <= kMaxStoredDistances;
    at::Tensor key = at::full({B, N}, std::numeric_limits<float>::infinity(), P.y.options());
    if (store) *dist = at::zeros({B, N, N}, P.y.options());
    const int64_t nt = (N + kTile - 1) / kTile;
    const dim3 grid(nt, nt, B);
    const float* sq = cosine ? nullptr : P.sq.data_ptr<float>();
    auto* kp = reinterpret_cast<unsigned*>(key.data_ptr<float>());
    if (store) {
      pair_min_kernel<true><<<grid, kThreads, 0, stream>>>(P.y.data_ptr<float>(), sq,
          cand.data_ptr<bool>(), nullptr, N, D, cosine, kp, dist->data_ptr<float>());
    } else {
      pair_min_kernel<false><<<grid, kThreads, 0, stream>>>(P.y.data_ptr<float>(), sq,
          cand.data_ptr<bool>(), nullptr, N, D, cosine, kp, nullptr);
    }
    VISPRUNE_CUDA_CHECK(cudaGetLastError());
    return key;
  }

  if (cosine) {
    const at::Tensor ok = cand & ~P.y.isnan().any(-1);  // NaN tokens: distance 0 to all
    const at::Tensor total = P.y.masked_fill(~ok.unsqueeze(-1), 0.0f).sum(1);
    const at::Tensor n = ok.sum(-1, /*keepdim=*/true).to(at::kFloat);
    return at::where(ok, n - row_summary(P.y, total, /*dot=*/true), at::zeros_like(n));
  }
  const at::Tensor n = cand.sum(-1, /*keepdim=*/true).to(at::kFloat);
  const at::Tensor mean = P.y.masked_fill(~cand.unsqueeze(-1), 0.0f).sum(1) / n;
  at::Tensor key = row_summary(P.y, mean, /*dot=*/false);
  const at::Tensor exact = (~(P.sq < 1e37f) & cand).any(-1).contiguous();
  const dim3 grid((N + kWarps - 1) / kWarps, B);
  pair_sum_kernel<<<grid, kThreads, 0, stream>>>(P.y.data_ptr<float>(), P.sq.data_ptr<float>(),
                                                 cand.data_ptr<bool>(), exact.data_ptr<bool>(),
                                                 nullptr, N, D, key.data_ptr<float>());
  VISPRUNE_CUDA_CHECK(cudaGetLastError());
  return key;
}

// The blocks per row G and tokens per block of greedy_kernel, and how many of its blocks fit on
// the device at once (`resident`) with the shared memory of that chunk size.  Fewer blocks mean
// a larger chunk, more shared memory and possibly fewer resident blocks, so the count is lowered
// until it fits with the shared memory it implies.
struct GreedyLaunch {
  int64_t blocks, resident;
  int chunk;
  size_t smem;
};

GreedyLaunch plan_greedy(int64_t N, int64_t per_block) {
  int device = 0, sms = 0, smem_max = 0;
  VISPRUNE_CUDA_CHECK(cudaGetDevice(&device));
  VISPRUNE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  VISPRUNE_CUDA_CHECK(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlock, device));
  // The kernel's static shared memory (argmax scratch) counts against the same per-block limit.
  cudaFuncAttributes attr;
  VISPRUNE_CUDA_CHECK(cudaFuncGetAttributes(&attr, greedy_kernel));
  smem_max -= static_cast<int>(attr.sharedSizeBytes);
  GreedyLaunch L;
  L.blocks = std::max<int64_t>(1, (N + per_block - 1) / per_block);
  for (;;) {
    L.chunk = static_cast<int>((N + L.blocks - 1) / L.blocks);
    L.smem = size_t(L.chunk) * (sizeof(float) + sizeof(bool));
    TORCH_CHECK(L.smem <= size_t(smem_max), "greedy_select: N=", N,
                " is too large for one cooperative launch on this device");
    int per_sm = 0;
    VISPRUNE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, greedy_kernel,
                                                                      kThreads, L.smem));
    TORCH_CHECK(per_sm > 0, "greedy_select: no block of the greedy kernel fits on an SM (",
                L.smem, " bytes of shared memory)");
    L.resident = int64_t(per_sm) * sms;
    if (L.blocks <= L.resident) return L;
    L.blocks = L.resident;
  }
}

// greedy_kernel over B rows of N tokens, or with cu / ck (defined) over B packed segments of
// [T = N, D] tokens, as many rows per cooperative launch as fit on the device (plan L).
void launch_greedy(const Prepared& P, const at::Tensor& cand, const at::Tensor& dist,
                   const at::Tensor& key, const at::Tensor& cu, const at::Tensor& ck, int64_t B,
                   int64_t N, int64_t k, int64_t start, bool cosine, bool maxmin,
                   const GreedyLaunch& L, at::Tensor& out) {
  const int64_t rows_per_launch = std::max<int64_t>(1, L.resident / L.blocks);
  at::Tensor partial = at::empty({2 * B * L.blocks * int64_t(sizeof(Best))},
                                 P.y.options().dtype(at::kByte));
  at::Tensor sync = at::zeros({2 * B}, P.y.options().dtype(at::kInt));
  GreedyArgs args;
  args.y = P.y.data_ptr<float>();
  args.sq = cosine ? nullptr : P.sq.data_ptr<float>();
  args.dist = dist.defined() ? dist.data_ptr<float>() : nullptr;
  args.key = key.defined() ? key.data_ptr<float>() : nullptr;
  args.cand = cand.data_ptr<bool>();
  args.cu = cu.defined() ? cu.data_ptr<int64_t>() : nullptr;
  args.ck = ck.defined() ? ck.data_ptr<int64_t>() : nullptr;
  args.out = out.data_ptr<int64_t>();
  args.partial = reinterpret_cast<Best*>(partial.data_ptr<uint8_t>());
  args.count = reinterpret_cast<unsigned*>(sync.data_ptr<int>());
  args.gen = args.count + B;
  args.B = B;
  args.N = N;
  args.D = P.y.size(2);
  args.k = k;
  args.start = start;
  args.blocks = static_cast<int>(L.blocks);
  args.chunk = L.chunk;
  args.cosine = cosine;
  args.maxmin = maxmin;
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t row0 = 0; row0 < B; row0 += rows_per_launch) {
    const int64_t rows = std::min(rows_per_launch, B - row0);
    const dim3 grid(static_cast<unsigned>(L.blocks), static_cast<unsigned>(rows));
    void* params[] = {&args, &row0};
    VISPRUNE_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(greedy_kernel), grid,
                                                    dim3(kThreads), params, L.smem, stream));
  }
}

at::Tensor greedy(const Prepared& P, int64_t k, Objective obj, Metric metric,
                  const c10::optional<at::Tensor>& mask, int64_t start, Count /*need*/) {
  // Rows short of candidates are not reported here (that would need a host sync): the kernel
  // records -1 from the step where a row has none left.
  const int64_t B = P.y.size(0), N = P.y.size(1);
  at::Tensor out = at::empty({B, k}, P.y.options().dtype(at::kLong));
  const at::Tensor cand = mask.has_value() ? mask->contiguous()
                                           : at::ones({B, N}, P.y.options().dtype(at::kBool));
  const bool maxmin = obj == Objective::kMaxMin, cosine = metric == Metric::kCosine;
  at::Tensor dist, key;
  if (start < 0) key = start_key(P, cand, maxmin, cosine, &dist);

  // Blocks per row: enough to spread a step's work (a warp per token when the distances are
  // computed, a thread per token when stored), no more than fit on the device at once.
  launch_greedy(P, cand, dist, key, at::Tensor(), at::Tensor(), B, N, k, start, cosine, maxmin,
                plan_greedy(N, dist.defined() ? 4 * kThreads : 4 * kWarps), out);
  return out;
}

// --------------------------------------------------------------------------- gather
// tokens[b, t] = x[b, index[b, t]]: one block per output row, 16-byte copies when aligned.  An
// index outside [0, N) gives a zero row (never an access outside x).
__global__ void gather_rows_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                   const int64_t* __restrict__ index, int64_t N, int64_t K,
                                   int64_t row_bytes, int64_t stride_b, int64_t stride_n,
                                   bool vec16) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / K, i = index[r];
  const bool inside = i >= 0 && i < N;
  const char* from = src + b * stride_b + (inside ? i : 0) * stride_n;
  char* to = dst + r * row_bytes;
  if (vec16) {
    const int4* f = reinterpret_cast<const int4*>(from);
    int4* o = reinterpret_cast<int4*>(to);
    for (int64_t e = threadIdx.x; e < row_bytes / 16; e += blockDim.x)
      o[e] = inside ? f[e] : make_int4(0, 0, 0, 0);
  } else {
    for (int64_t e = threadIdx.x; e < row_bytes; e += blockDim.x) to[e] = inside ? from[e] : 0;
  }
}

at::Tensor gather_rows(const at::Tensor& x_in, const at::Tensor& index, bool /*checked*/) {
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = index.size(1);
  at::Tensor out = at::empty({B, K, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t es = x.element_size(), row = D * es;
  const int64_t sb = x.stride(0) * es, sn = x.stride(1) * es;
  const auto* src = static_cast<const char*>(x.data_ptr());
  const bool vec16 = reinterpret_cast<uintptr_t>(src) % 16 == 0 && row % 16 == 0 && sb % 16 == 0 &&
                     sn % 16 == 0;
  gather_rows_kernel<<<B * K, 128, 0, c10::cuda::getCurrentCUDAStream()>>>(
      src, static_cast<char*>(out.data_ptr()), index.data_ptr<int64_t>(), N, K, row, sb, sn, vec16);
  VISPRUNE_CUDA_CHECK(cudaGetLastError());
  return out;
}

// --------------------------------------------------------------------------- mi_scores
// Linear in a summary of the valid text tokens, as on CPU and in the reference: cosine
// x̂_i·mean_j t̂_j; l2 -(|v_i - t̄|² + mean_j |t_j - t̄|²).  A non-finite token scores -inf or NaN
// as it does there.  Padded text tokens take no part.  A row without text token gets NaN scores.
// The text summary of each row: (mean t̄ [B, D] of the valid text tokens (of t̂ for cosine, as
// prepared), spread mean_j |t_j - t̄|² [B, 1]).
std::pair<at::Tensor, at::Tensor> text_summary(const Prepared& T,
                                               const c10::optional<at::Tensor>& text_mask) {
  const int64_t B = T.y.size(0), M = T.y.size(1);
  const at::Tensor valid = text_mask.has_value()
                               ? text_mask->contiguous()
                               : at::ones({B, M}, T.y.options().dtype(at::kBool));
  const at::Tensor m = valid.sum(-1, /*keepdim=*/true).to(at::kFloat);  // [B, 1]
  const at::Tensor mean =
      (T.y.masked_fill(~valid.unsqueeze(-1), 0.0f).sum(1) / m).contiguous();  // [B, D]
  const at::Tensor spread =
      (T.y - mean.unsqueeze(1)).pow(2).sum(-1).masked_fill(~valid, 0.0f).sum(-1, true) / m;
  return {mean, spread};
}

at::Tensor mi_scores(const Prepared& V, const Prepared& T,
                     const c10::optional<at::Tensor>& text_mask, Metric metric) {
  const auto summary = text_summary(T, text_mask);
  if (metric == Metric::kCosine) return row_summary(V.y, summary.first, /*dot=*/true);
  return -(row_summary(V.y, summary.first, /*dot=*/false) + summary.second);
}

// --------------------------------------------------------------------------- varlen
// A packed batch: P.y is [1, T, D], segment b = tokens [cu[b], cu[b+1]) for an int64 cu[B+1] on
// the device.  The same kernels as the dense ops with one row per segment (row_span), so that
// nothing is padded; only the longest segment is read back, to size greedy_kernel's launch.

// The segment of every token (clamped into [0, B)) and cu made non-decreasing within [0, T]
// (equal to cu when it is valid), both on the device without a sync.
at::Tensor token_segments(const at::Tensor& cu, int64_t T) {
  const int64_t B = cu.numel() - 1;
  return at::searchsorted(cu.slice(0, 1).contiguous(), at::arange(T, cu.options()),
                          /*out_int32=*/false, /*right=*/true)
      .clamp(0, std::max<int64_t>(B - 1, 0));
}

at::Tensor safe_offsets(const at::Tensor& cu, int64_t T) {
  return std::get<0>(at::cummax(cu.clamp(0, T), 0)).contiguous();
}

// Σ over each segment of the rows of v[T, ...] (in order: deterministic, no atomics): [B, ...].
at::Tensor segment_sums(const at::Tensor& v, const at::Tensor& offsets) {
  return at::segment_reduce(v, "sum", /*lengths=*/c10::nullopt, /*indices=*/c10::nullopt,
                            offsets, /*axis=*/0, /*unsafe=*/true, /*initial=*/0);
}

at::Tensor mi_scores_varlen(const Prepared& V, const Prepared& Tx, const at::Tensor& cu,
                            const c10::optional<at::Tensor>& text_mask, Metric metric) {
  const int64_t T = V.y.size(1);
  const auto summary = text_summary(Tx, text_mask);
  const at::Tensor seg = token_segments(cu, T);
  if (metric == Metric::kCosine) return row_summary(V.y, summary.first, /*dot=*/true, seg)[0];
  return -(row_summary(V.y, summary.first, /*dot=*/false, seg)[0] +
           summary.second.index_select(0, seg).view({T}));
}

// The start key of "auto" for every packed token, as start_key per segment: maxmin from the
// pairwise tiles of each segment (not stored: the steps compute their distances), maxsum from
// per-segment summaries, with the exact pairwise sums in the l2 segments that need them.
at::Tensor start_key_varlen(const Prepared& P, const at::Tensor& cand, const at::Tensor& cu,
                            int64_t nmax, bool maxmin, bool cosine) {
  const int64_t T = P.y.size(1), D = P.y.size(2), B = cu.numel() - 1;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (maxmin) {
    at::Tensor key = at::full({T}, std::numeric_limits<float>::infinity(), P.y.options());
    const int64_t nt = (nmax + kTile - 1) / kTile;
    if (nt > 0 && B > 0) {
      const dim3 grid(nt, nt, B);
      pair_min_kernel<false><<<grid, kThreads, 0, stream>>>(
          P.y.data_ptr<float>(), cosine ? nullptr : P.sq.data_ptr<float>(), cand.data_ptr<bool>(),
          cu.data_ptr<int64_t>(), T, D, cosine, reinterpret_cast<unsigned*>(key.data_ptr<float>()),
          nullptr);
      VISPRUNE_CUDA_CHECK(cudaGetLastError());
    }
    return key;
  }
  const at::Tensor y = P.y[0], seg = token_segments(cu, T), offs = safe_offsets(cu, T);
  if (cosine) {
    const at::Tensor ok = cand & ~y.isnan().any(-1);  // NaN tokens: distance 0 to all
    const at::Tensor total = segment_sums(y.masked_fill(~ok.unsqueeze(-1), 0.0f), offs);
    const at::Tensor n = segment_sums(ok.to(at::kFloat), offs).index_select(0, seg);
    return at::where(ok, n - row_summary(P.y, total, /*dot=*/true, seg)[0], at::zeros_like(n));
  }
  const at::Tensor n = segment_sums(cand.to(at::kFloat), offs);
  const at::Tensor mean = segment_sums(y.masked_fill(~cand.unsqueeze(-1), 0.0f), offs) /
                          n.unsqueeze(-1);
  at::Tensor key = row_summary(P.y, mean, /*dot=*/false, seg)[0].contiguous();
  const at::Tensor exact =
      (segment_sums((~(P.sq[0] < 1e37f) & cand).to(at::kFloat), offs) > 0).contiguous();
  if (nmax > 0 && B > 0) {
    const dim3 grid((nmax + kWarps - 1) / kWarps, B);
    pair_sum_kernel<<<grid, kThreads, 0, stream>>>(P.y.data_ptr<float>(), P.sq.data_ptr<float>(),
                                                   cand.data_ptr<bool>(), exact.data_ptr<bool>(),
                                                   cu.data_ptr<int64_t>(), T, D,
                                                   key.data_ptr<float>());
    VISPRUNE_CUDA_CHECK(cudaGetLastError());
  }
  return key;
}

at::Tensor greedy_varlen(const Prepared& P, const at::Tensor& cu, const at::Tensor& ck_host,
                         Objective obj, Metric metric, const c10::optional<at::Tensor>& mask,
                         int64_t start, const at::Tensor& /*need*/, const char* /*need_name*/) {
  // Segments short of candidates are not reported (that would need a sync): as in greedy, the
  // kernel records -1 from the step where a segment has none left.
  const int64_t T = P.y.size(1), B = cu.numel() - 1;
  const int64_t K = ck_host[B].item<int64_t>();
  at::Tensor out = at::empty({K}, P.y.options().dtype(at::kLong));
  const at::Tensor cand =
      mask.has_value() ? mask->contiguous() : at::ones({T}, P.y.options().dtype(at::kBool));
  const at::Tensor ck = ck_host.to(P.y.device());
  const bool maxmin = obj == Objective::kMaxMin, cosine = metric == Metric::kCosine;
  // The longest segment sizes the launch: one read (FlashAttention's max_seqlen).
  const at::Tensor lo = cu.slice(0, 0, B).clamp(0, T);
  const int64_t nmax =
      B > 0 ? (at::maximum(cu.slice(0, 1).clamp(0, T), lo) - lo).max().item<int64_t>() : 0;
  at::Tensor key;
  if (start < 0) key = start_key_varlen(P, cand, cu, nmax, maxmin, cosine);

  launch_greedy(P, cand, at::Tensor(), key, cu, ck, B, T, 0, start, cosine, maxmin,
                plan_greedy(std::max<int64_t>(nmax, 1), 4 * kWarps), out);
  return out;
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k{&mi_scores, &greedy, &gather_rows, /*received_attention=*/nullptr,
                         /*dpp_map=*/nullptr, /*holov_variance=*/nullptr};
  return k;
}

const VarlenKernels& varlen_kernels() {
  static const VarlenKernels k{&mi_scores_varlen, &greedy_varlen};
  return k;
}

}  // namespace cuda
}  // namespace visprune

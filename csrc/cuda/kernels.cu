// CUDA kernels of visprune: greedy_select and gather_compact as kernels; mi_scores and prune
// compose them with ATen.  Same results as visprune/reference.py (indices identical).
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

// --------------------------------------------------------------------------- per-row reductions
// out[b, i] = y[b, i]·v[b] (kDot) or |y[b, i] - v[b]|² (!kDot), one warp per token.  mi_scores
// and the maxsum start are linear in such a per-row summary v.
template <bool kDot>
__global__ void row_summary_kernel(const float* __restrict__ y, const float* __restrict__ v,
                                   int64_t N, int64_t D, float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (i >= N) return;
  const float* row = y + (b * N + i) * D;
  const float* vb = v + b * D;
  const float r = kDot ? warp_dot(row, vb, D, lane) : warp_sqdist(row, vb, D, lane);
  if (lane == 0) out[b * N + i] = r;
}

at::Tensor row_summary(const at::Tensor& y, const at::Tensor& v, bool dot) {
  const int64_t B = y.size(0), N = y.size(1), D = y.size(2);
  at::Tensor out = at::empty({B, N}, y.options());
  if (B == 0 || N == 0) return out;
  const dim3 grid((N + kWarps - 1) / kWarps, B);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor vc = v.contiguous();
  if (dot) {
    row_summary_kernel<true><<<grid, kThreads, 0, stream>>>(y.data_ptr<float>(), vc.data_ptr<float>(),
                                                            N, D, out.data_ptr<float>());
  } else {
    row_summary_kernel<false><<<grid, kThreads, 0, stream>>>(
        y.data_ptr<float>(), vc.data_ptr<float>(), N, D, out.data_ptr<float>());
  }
  VISPRUNE_CUDA_CHECK(cudaGetLastError());
  return out;
}

// --------------------------------------------------------------------------- pairwise tiles
// maxmin's start key min_{j != i} d(i, j) over the candidates.  64×64 tiles of the upper
// triangle only; each thread owns 4×4 entries and sums d in order with FMA (one chain per entry,
// so an entry depends only on its two tokens and not on their order).  Row and column minima go
// to key (float bits as unsigned: distances are >= 0, where the bit order is the float order).
// With kStore the whole distance matrix is written for the greedy steps.
constexpr int kTile = 64, kTileK = 16, kPer = 4;

template <bool kStore>
__global__ void pair_min_kernel(const float* __restrict__ y, const float* __restrict__ sq,
                                const bool* __restrict__ cand, int64_t N, int64_t D, bool cosine,
                                unsigned* __restrict__ key, float* __restrict__ dist) {
  if (blockIdx.x < blockIdx.y) return;  // lower-triangle tiles: their pairs are done above
  __shared__ float as[kTileK][kTile + 1], bs[kTileK][kTile + 1];
  const int64_t b = blockIdx.z;
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float* yb = y + b * N * D;
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
  const bool* cb = cand + b * N;
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
        const float d = distance(acc[r][q], cosine, cosine ? 0.0f : sq[b * N + i],
                                 cosine ? 0.0f : sq[b * N + j]);
        rowmin = fminf(rowmin, d);
        colmin[q] = fminf(colmin[q], d);
        if (kStore) dist[(b * N + i) * N + j] = dist[(b * N + j) * N + i] = d;
      }
    }
    if (rowmin < INFINITY) atomicMin(key + b * N + i, __float_as_uint(rowmin));
  }
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int64_t j = j0 + tx * kPer + q;
    if (colmin[q] < INFINITY) atomicMin(key + b * N + j, __float_as_uint(colmin[q]));
  }
}

// --------------------------------------------------------------------------- greedy steps
struct GreedyArgs {
  const float* y;      // [B, N, D] prepared tokens
  const float* sq;     // [B, N] squared norms (l2) or null
  const float* dist;   // [B, N, N] stored distances or null (then computed per step)
  const float* key;    // [B, N] start key (auto start) or null
  const bool* cand;    // [B, N]
  int64_t* out;        // [B, k]
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
  const int64_t lo = int64_t(g) * a.chunk, hi = lo + a.chunk < a.N ? lo + a.chunk : a.N;
  const int64_t n = hi > lo ? hi - lo : 0;
  const bool* cb = a.cand + b * a.N;
  const float* yb = a.y + b * a.N * a.D;

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
      selected = all.i;
    }
    __syncthreads();
    return selected;
  };

  int64_t s = a.start;
  int step = 0;
  if (s < 0) {  // auto start: the argmax of the start key over the candidates
    Best mine{-INFINITY, INT_MAX};
    for (int64_t t = threadIdx.x; t < n; t += kThreads)
      if (alive[t]) mine = better(mine, Best{a.key[b * a.N + lo + t], int(lo + t)});
    s = publish_and_reduce(mine, step++);
  }
  for (int64_t t = 0; t < a.k; ++t) {
    if (g == 0 && threadIdx.x == 0) a.out[b * a.k + t] = s;
    if (s >= lo && s < hi && threadIdx.x == 0) alive[s - lo] = false;
    __syncthreads();
    if (t + 1 == a.k) break;
    Best mine{-INFINITY, INT_MAX};
    if (a.dist != nullptr) {  // stored distances: one thread per token
      const float* ds = a.dist + (b * a.N + s) * a.N;
      for (int64_t e = threadIdx.x; e < n; e += kThreads) {
        if (!alive[e]) continue;
        const float d = ds[lo + e];
        run[e] = a.maxmin ? fminf(run[e], d) : run[e] + d;
        mine = better(mine, Best{run[e], int(lo + e)});
      }
    } else {  // one warp per token: d(s, i) from the tokens
      const float* ys = yb + s * a.D;
      const float sq_s = a.cosine ? 0.0f : a.sq[b * a.N + s];
      for (int64_t e = warp; e < n; e += kWarps) {
        if (!alive[e]) continue;
        const float dot = warp_dot(ys, yb + (lo + e) * a.D, a.D, lane);
        if (lane == 0) {
          const float d = distance(dot, a.cosine, sq_s, a.cosine ? 0.0f : a.sq[b * a.N + lo + e]);
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

// The start key of "auto": maxmin min_{j != i} d(i, j) (pairwise tiles, which can also leave the
// distance matrix for the steps); maxsum Σ_j d(i, j), linear in a per-row summary (cosine:
// n - x̂_i·Σ_j x̂_j over the tokens without NaN, whose own key is 0; l2: |x_i - x̄|², ranked like
// Σ_j |x_i - x_j|²) unless an l2 squared norm is not finite, where the exact pair sums are used.
at::Tensor start_key(const Prepared& P, const at::Tensor& cand, bool maxmin, bool cosine,
                     at::Tensor* dist) {
  const int64_t B = P.y.size(0), N = P.y.size(1), D = P.y.size(2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto pairwise = [&](bool store) {
    at::Tensor key = at::full({B, N}, std::numeric_limits<float>::infinity(), P.y.options());
    if (store) *dist = at::zeros({B, N, N}, P.y.options());
    const int64_t nt = (N + kTile - 1) / kTile;
    const dim3 grid(nt, nt, B);
    const float* sq = cosine ? nullptr : P.sq.data_ptr<float>();
    auto* kp = reinterpret_cast<unsigned*>(key.data_ptr<float>());
    if (store) {
      pair_min_kernel<true><<<grid, kThreads, 0, stream>>>(P.y.data_ptr<float>(), sq,
          cand.data_ptr<bool>(), N, D, cosine, kp, dist->data_ptr<float>());
    } else {
      pair_min_kernel<false><<<grid, kThreads, 0, stream>>>(P.y.data_ptr<float>(), sq,
          cand.data_ptr<bool>(), N, D, cosine, kp, nullptr);
    }
    VISPRUNE_CUDA_CHECK(cudaGetLastError());
    return key;
  };
  if (maxmin) return pairwise(B * N * N <= kMaxStoredDistances);

  const at::Tensor c3 = cand.unsqueeze(-1);
  if (cosine) {
    const at::Tensor ok = cand & ~P.y.isnan().any(-1);  // NaN tokens: distance 0 to all
    const at::Tensor total = P.y.masked_fill(~ok.unsqueeze(-1), 0.0f).sum(1);
    const at::Tensor n = ok.sum(-1, /*keepdim=*/true).to(at::kFloat);
    return at::where(ok, n - row_summary(P.y, total, /*dot=*/true), at::zeros_like(n));
  }
  const at::Tensor n = cand.sum(-1, /*keepdim=*/true).to(at::kFloat);
  const at::Tensor mean = P.y.masked_fill(~c3, 0.0f).sum(1) / n;
  const at::Tensor linear = row_summary(P.y, mean, /*dot=*/false);
  const at::Tensor exact_rows = (~(P.sq < 1e37f) & cand).any(-1, /*keepdim=*/true);
  if (!exact_rows.any().item<bool>()) return linear;
  pairwise(/*store=*/true);  // the full distance matrix, kept for the steps too
  const at::Tensor pair = c3 & cand.unsqueeze(1);
  const at::Tensor sums = dist->masked_fill(~pair, 0.0f).sum(-1);
  return at::where(exact_rows, sums, linear);
}

void launch_greedy(const Prepared& P, const at::Tensor& cand, int64_t k, Objective obj,
                   Metric metric, int64_t start, at::Tensor& out) {
  const int64_t B = P.y.size(0), N = P.y.size(1), D = P.y.size(2);
  const bool maxmin = obj == Objective::kMaxMin, cosine = metric == Metric::kCosine;
  at::Tensor dist, key;
  if (start < 0) key = start_key(P, cand, maxmin, cosine, &dist);

  // Blocks per row: enough to spread a step's work (a warp per token when the distances are
  // computed, a thread per token when stored), no more than fit on the device at once.
  int device = 0, sms = 0, smem_max = 0;
  VISPRUNE_CUDA_CHECK(cudaGetDevice(&device));
  VISPRUNE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  VISPRUNE_CUDA_CHECK(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlock, device));
  const int64_t per_block = dist.defined() ? 4 * kThreads : 4 * kWarps;
  int64_t blocks = std::max<int64_t>(1, (N + per_block - 1) / per_block);
  int chunk = static_cast<int>((N + blocks - 1) / blocks);
  size_t smem = size_t(chunk) * (sizeof(float) + sizeof(bool));
  int per_sm = 0;
  VISPRUNE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, greedy_kernel,
                                                                    kThreads, smem));
  const int64_t resident = std::max<int64_t>(1, int64_t(per_sm) * sms);
  blocks = std::min(blocks, resident);
  chunk = static_cast<int>((N + blocks - 1) / blocks);
  smem = size_t(chunk) * (sizeof(float) + sizeof(bool));
  TORCH_CHECK(smem <= size_t(smem_max), "greedy_select: N=", N,
              " is too large for one cooperative launch on this device");
  const int64_t rows_per_launch = std::max<int64_t>(1, resident / blocks);

  at::Tensor partial = at::empty({2 * B * blocks * int64_t(sizeof(Best))},
                                 P.y.options().dtype(at::kByte));
  at::Tensor sync = at::zeros({2 * B}, P.y.options().dtype(at::kInt));
  GreedyArgs args;
  args.y = P.y.data_ptr<float>();
  args.sq = cosine ? nullptr : P.sq.data_ptr<float>();
  args.dist = dist.defined() ? dist.data_ptr<float>() : nullptr;
  args.key = key.defined() ? key.data_ptr<float>() : nullptr;
  args.cand = cand.data_ptr<bool>();
  args.out = out.data_ptr<int64_t>();
  args.partial = reinterpret_cast<Best*>(partial.data_ptr<uint8_t>());
  args.count = reinterpret_cast<unsigned*>(sync.data_ptr<int>());
  args.gen = args.count + B;
  args.B = B;
  args.N = N;
  args.D = D;
  args.k = k;
  args.start = start;
  args.blocks = static_cast<int>(blocks);
  args.chunk = chunk;
  args.cosine = cosine;
  args.maxmin = maxmin;
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t row0 = 0; row0 < B; row0 += rows_per_launch) {
    const int64_t rows = std::min(rows_per_launch, B - row0);
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(rows));
    void* params[] = {&args, &row0};
    VISPRUNE_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(greedy_kernel), grid,
                                                    dim3(kThreads), params, smem, stream));
  }
}

at::Tensor greedy_impl(const at::Tensor& x, int64_t k, Objective obj, Metric metric,
                       const c10::optional<at::Tensor>& mask, int64_t start) {
  const int64_t B = x.size(0), N = x.size(1);
  at::Tensor out = at::empty({B, k}, x.options().dtype(at::kLong));
  if (B == 0 || k == 0) return out;
  const Prepared P = prepare_tokens(x, metric);
  const at::Tensor cand = mask.has_value() ? mask->contiguous()
                                           : at::ones({B, N}, x.options().dtype(at::kBool));
  launch_greedy(P, cand, k, obj, metric, start, out);
  return out;
}

// --------------------------------------------------------------------------- gather
// tokens[b, t] = x[b, index[b, t]]: one block per output row, 16-byte copies when aligned.
__global__ void gather_rows_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                   const int64_t* __restrict__ index, int64_t K, int64_t row_bytes,
                                   int64_t stride_b, int64_t stride_n, bool vec16) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / K;
  const char* from = src + b * stride_b + index[r] * stride_n;
  char* to = dst + r * row_bytes;
  if (vec16) {
    const int4* f = reinterpret_cast<const int4*>(from);
    int4* o = reinterpret_cast<int4*>(to);
    for (int64_t e = threadIdx.x; e < row_bytes / 16; e += blockDim.x) o[e] = f[e];
  } else {
    for (int64_t e = threadIdx.x; e < row_bytes; e += blockDim.x) to[e] = from[e];
  }
}

at::Tensor gather_rows(const at::Tensor& x_in, const at::Tensor& index) {
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), D = x.size(2), K = index.size(1);
  at::Tensor out = at::empty({B, K, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t es = x.element_size(), row = D * es;
  const int64_t sb = x.stride(0) * es, sn = x.stride(1) * es;
  const auto* src = static_cast<const char*>(x.data_ptr());
  const bool vec16 = reinterpret_cast<uintptr_t>(src) % 16 == 0 && row % 16 == 0 && sb % 16 == 0 &&
                     sn % 16 == 0;
  gather_rows_kernel<<<B * K, 128, 0, c10::cuda::getCurrentCUDAStream()>>>(
      src, static_cast<char*>(out.data_ptr()), index.data_ptr<int64_t>(), K, row, sb, sn, vec16);
  VISPRUNE_CUDA_CHECK(cudaGetLastError());
  return out;
}

// --------------------------------------------------------------------------- mi_scores
// Linear in a summary of the valid text tokens, as on CPU: cosine x̂_i·mean_j t̂_j; l2
// -(|v_i - t̄|² + mean_j |t_j - t̄|²), with the reference's per-pair formula where a squared norm
// is not finite.  Padded text tokens take no part.
at::Tensor mi_impl(const at::Tensor& visual, const at::Tensor& text,
                   const c10::optional<at::Tensor>& text_mask, Metric metric) {
  const Prepared V = prepare_tokens(visual, metric), T = prepare_tokens(text, metric);
  const at::Tensor valid = text_mask.has_value()
                               ? *text_mask
                               : at::ones({text.size(0), text.size(1)}, text.options().dtype(at::kBool));
  const at::Tensor v3 = valid.unsqueeze(-1);
  const at::Tensor m = valid.sum(-1, /*keepdim=*/true).to(at::kFloat);  // [B, 1]
  const at::Tensor mean = T.y.masked_fill(~v3, 0.0f).sum(1) / m;        // [B, D]
  if (metric == Metric::kCosine) return row_summary(V.y, mean, /*dot=*/true);
  const at::Tensor spread =
      (T.y - mean.unsqueeze(1)).pow(2).sum(-1).masked_fill(~valid, 0.0f).sum(-1, true) / m;
  const at::Tensor linear = -(row_summary(V.y, mean, /*dot=*/false) + spread);
  const at::Tensor bad_text = (~at::isfinite(T.sq) & valid).any(-1, /*keepdim=*/true);
  const at::Tensor exact_rows = ~at::isfinite(V.sq) | bad_text;
  const at::Tensor pairs = (V.sq.unsqueeze(-1) - 2.0f * at::bmm(V.y, T.y.transpose(1, 2))) +
                           T.sq.unsqueeze(1);
  const at::Tensor exact = -(pairs.masked_fill(~valid.unsqueeze(1), 0.0f).sum(-1) / m);
  return at::where(exact_rows, exact, linear);
}

}  // namespace

// --------------------------------------------------------------------------- ops
at::Tensor mi_scores(const at::Tensor& visual, const at::Tensor& text,
                     const c10::optional<at::Tensor>& text_mask, c10::string_view metric_name) {
  check_text(visual, text, text_mask);
  const Metric metric = parse_metric(metric_name, "metric");
  const c10::cuda::CUDAGuard guard(visual.device());
  return mi_impl(visual, text, text_mask, metric);
}

at::Tensor greedy_select(const at::Tensor& x, int64_t k, c10::string_view objective_name,
                         c10::string_view metric_name, const c10::optional<at::Tensor>& mask,
                         int64_t start) {
  check_select(x, "x", k, mask, start);
  const Objective obj = parse_objective(objective_name);
  const Metric metric = parse_metric(metric_name, "metric");
  const c10::cuda::CUDAGuard guard(x.device());
  return greedy_impl(x, k, obj, metric, mask, start);
}

std::tuple<at::Tensor, at::Tensor> gather_compact(const at::Tensor& x,
                                                  const c10::optional<at::Tensor>& index,
                                                  const c10::optional<at::Tensor>& mask, bool sort) {
  check_gather(x, index, mask);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor idx;
  if (mask.has_value()) {
    const int64_t B = x.size(0), K = B ? (*mask)[0].sum().item<int64_t>() : 0;
    idx = mask->nonzero().select(1, 1).reshape({B, K}).contiguous();  // -1 fails when B == 0
  } else {
    idx = index->to(at::kLong);
    idx = sort ? std::get<0>(idx.sort(-1)).contiguous() : idx.contiguous().clone();
  }
  return {gather_rows(x, idx), idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune(
    const at::Tensor& visual, const at::Tensor& text, int64_t keep, int64_t stage1_keep,
    const c10::optional<at::Tensor>& text_mask, const c10::optional<at::Tensor>& mask,
    c10::string_view mi_metric_name, c10::string_view objective_name, c10::string_view metric_name) {
  const auto [mi_metric, obj, metric] = check_prune(visual, text, keep, stage1_keep, text_mask,
                                                    mask, mi_metric_name, objective_name,
                                                    metric_name);
  const c10::cuda::CUDAGuard guard(visual.device());
  const int64_t B = visual.size(0);
  // Stage 1: the reference's topk_mask (NaN and -inf after every real score, +inf as the largest
  // float, non-candidates last, ties to the lowest index through a stable sort).
  const float lowest = std::numeric_limits<float>::lowest();
  at::Tensor score = at::nan_to_num(mi_impl(visual, text, text_mask, mi_metric), lowest,
                                    c10::nullopt, lowest);
  if (mask.has_value()) score = score.masked_fill(~*mask, -std::numeric_limits<float>::infinity());
  const at::Tensor order =
      std::get<1>(score.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true)).narrow(1, 0, stage1_keep);
  const at::Tensor survivors = at::zeros_like(score, score.options().dtype(at::kBool))
                                   .scatter_(1, order, true);
  // Stage 2 and the compaction in original order.
  const at::Tensor chosen = std::get<0>(greedy_impl(visual, keep, obj, metric, survivors, -1).sort(-1))
                                .contiguous();
  return {gather_rows(visual, chosen), chosen,
          at::full({B}, keep, visual.options().dtype(at::kLong))};
}

}  // namespace cuda
}  // namespace visprune

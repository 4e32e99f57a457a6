// CUDA kernels of bagel_kernels_ext::fused_patch_embed.
//
//   out[n, h] = sum_k A[n, k] * weight[h, k] + bias[h] + pos_table[pos_ids[n], h]
//
// A is the packed patch matrix [N, K] or is gathered from a padded image batch [B, C, H, W] while
// the A tile is loaded (patch_coords[n] = (image, patch row, patch col), BAGEL's patchify order,
// see ../patch_embed.h), so patchify costs no extra pass over memory. The bias and the
// position-table row are added in the epilogue, on the float32 accumulator, with one rounding.
//
// Two kernels:
//   * pe_mma_kernel   float16 / bfloat16 on sm_80+: 128x128x32 block tile, 8 warps of 64x32,
//                     tensor cores through ldmatrix + mma.sync.m16n8k16 (float32 accumulate),
//                     double-buffered shared memory fed by register prefetch (which allows the
//                     gather and any row alignment). From images, the launcher permutes the weight
//                     to (channel, pixel row, pixel col padded to a multiple of 4) so the A-tile
//                     gather reads runs of adjacent pixels rather than single channel values.
//   * pe_simt_kernel  float32 (exact float32 FMA, no TF32), and every dtype on older GPUs or when
//                     BAGEL_KERNELS_PATCH_EMBED_KERNEL=simt: 64x64x16 block tile, 4x4 per thread.
//
// Out-of-range ids cannot fault: the launcher checks them first (check_indices=true), and the
// kernels write a NaN row for any id outside its range instead of reading out of bounds.
#include "../patch_embed.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace bagel_kernels_ext {
namespace {

struct Params {
  const void* input;       // patches [N, lda] (unit inner stride) or images [B, C, H, W] contiguous
  const void* weight;      // [hidden, K] contiguous
  const void* bias;        // [hidden] or nullptr
  const void* table;       // [P, hidden] contiguous or nullptr
  const int64_t* pos_ids;  // [N] or nullptr
  const int64_t* coords;   // [N, 3] or nullptr
  void* out;               // [N, hidden] contiguous
  int64_t N, K, hidden, P;  // K: inputs per patch as the kernel's weight sees them (see pe_mma_kernel)
  int64_t lda;
  int64_t B, C, H, W, p, Hp, Wp;
  int64_t pp;    // mma kernel, images: pixel runs of one patch row padded to pp = round_up(p, 4)
  int vec_a;     // patches: A rows may be read 4 elements (8 bytes) at a time;
                 // images (mma kernel): pixels may be read in aligned pairs (4 bytes)
  int vec_b;     // weight rows may be read 4 elements at a time
  int pair_out;  // bias, table rows and out rows may be accessed 2 elements (4 bytes) at a time
};

// First output row and column of this block's BM x BN tile. Consecutive blocks share one row tile (its
// A rows stay in L2); the weight is small and L2-resident.
struct TileOrigin {
  int64_t m0, n0;
};
template <int BM, int BN>
__device__ __forceinline__ TileOrigin block_tile_origin(int64_t hidden) {
  const int64_t n_tiles = (hidden + BN - 1) / BN;
  return {(static_cast<int64_t>(blockIdx.x) / n_tiles) * BM, (static_cast<int64_t>(blockIdx.x) % n_tiles) * BN};
}

__device__ __forceinline__ float nan_f() {
  return __int_as_float(0x7fffffff);
}

// Source of row n: element k of its patch lives at input + base + (IMAGES ? koff[k] : k).
template <bool IMAGES>
__device__ __forceinline__ bool row_source(const Params& P, int64_t n, int64_t& base) {
  if (IMAGES) {
    const int64_t b = P.coords[3 * n], r = P.coords[3 * n + 1], c = P.coords[3 * n + 2];
    base = ((b * P.C) * P.H + r * P.p) * P.W + c * P.p;
    return b >= 0 && b < P.B && r >= 0 && r < P.Hp && c >= 0 && c < P.Wp;
  } else {
    base = n * P.lda;
    return true;
  }
}

// Whether row n's ids are in range, and its position-table row (0 without a table).
template <bool IMAGES>
__device__ __forceinline__ bool row_valid(const Params& P, int64_t n, int64_t& pos) {
  int64_t base;
  bool ok = row_source<IMAGES>(P, n, base);
  pos = 0;
  if (P.table != nullptr) {
    pos = P.pos_ids[n];
    ok = ok && pos >= 0 && pos < P.P;
  }
  return ok;
}

// SIMT kernel, images: koff[k] = offset of element k of a patch (BAGEL order) from its top-left pixel.
__device__ __forceinline__ void fill_koff(const Params& P, int* koff) {
  for (int64_t k = threadIdx.x; k < P.K; k += blockDim.x) {
    const int64_t q = k / P.C;
    const int64_t c = k - q * P.C;
    const int64_t pi = q / P.p;
    const int64_t pj = q - pi * P.p;
    koff[k] = static_cast<int>((c * P.H + pi) * P.W + pj);
  }
}

// ---------------------------------------------------------------------------------------------
// mma.sync m16n8k16 with float32 accumulators for the 16-bit input type TYPE ("bf16" or "f16").
#define PE_MMA_M16N8K16(TYPE, c, a, b)                                                                       \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                                  \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))

// Element types for the tensor-core kernel: raw 16-bit storage, float conversion, the mma opcode.
template <bool kBf16>
struct Half16 {
  using scalar = std::conditional_t<kBf16, __nv_bfloat16, __half>;
  static __device__ __forceinline__ float to_float(uint16_t v) {
    if constexpr (kBf16) {
      return __bfloat162float(__ushort_as_bfloat16(v));
    } else {
      return __half2float(__ushort_as_half(v));
    }
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    if constexpr (kBf16) {
      return __bfloat16_as_ushort(__float2bfloat16_rn(v));
    } else {
      return __half_as_ushort(__float2half_rn(v));
    }
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (kBf16) {
      PE_MMA_M16N8K16("bf16", c, a, b);
    } else {
      PE_MMA_M16N8K16("f16", c, a, b);
    }
#endif
  }
};
using Bf16 = Half16<true>;
using Fp16 = Half16<false>;

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem_ptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// mma kernel, images: the kernel's K axis is (channel c, pixel row pi, pixel col pj padded to pp), so
// every aligned group of 4 k is up to 4 adjacent pixels of one image row. chunk[k / 4] packs the group's
// offset from the patch's top-left pixel (<< kChunkCountBits) with its count of real pixels (1..4; the
// rest is padding, whose weight columns are zero) in the low bits.
constexpr int kChunkCountBits = 3;
constexpr int kChunkCountMask = (1 << kChunkCountBits) - 1;
// Offsets a chunk can hold (a non-negative int): larger single images take the SIMT kernel.
constexpr int64_t kMaxChunkOffset = int64_t(1) << (31 - kChunkCountBits);

__device__ __forceinline__ void fill_chunks(const Params& P, int* chunk) {
  for (int64_t g = threadIdx.x; g < P.K / 4; g += blockDim.x) {
    const int64_t k = 4 * g;
    const int64_t q = k / P.pp;  // c * p + pi
    const int64_t pj = k - q * P.pp;
    const int64_t c = q / P.p;
    const int64_t pi = q - c * P.p;
    const int64_t valid = P.p - pj < 4 ? P.p - pj : 4;
    chunk[g] = static_cast<int>((((c * P.H + pi) * P.W + pj) << kChunkCountBits) | valid);
  }
}

__device__ __forceinline__ uint2 pack4(uint16_t v0, uint16_t v1, uint16_t v2, uint16_t v3) {
  return make_uint2(static_cast<uint32_t>(v0) | (static_cast<uint32_t>(v1) << 16),
                    static_cast<uint32_t>(v2) | (static_cast<uint32_t>(v3) << 16));
}

constexpr int MMA_BM = 128;
constexpr int MMA_BN = 128;
constexpr int MMA_BK = 32;
constexpr int MMA_LDS = MMA_BK + 8;  // padded row (80 bytes): conflict-free ldmatrix, 16-byte aligned rows
constexpr int MMA_THREADS = 256;

// Each thread moves a 4-element chunk of 4 rows per operand tile: chunk column (tid % 8) * 4,
// rows tid / 8 + 32 * i. A warp reads 4 rows x 64 contiguous bytes per load instruction.
// With images, the weight arrives permuted and zero-padded to [hidden, C * p * pp] (launcher), so that
// a chunk is a run of adjacent pixels (two 4-byte loads) instead of 4 scattered channel values.
template <typename Tr, bool IMAGES>
__global__ void __launch_bounds__(MMA_THREADS) pe_mma_kernel(const Params P) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(16) uint16_t As[2][MMA_BM][MMA_LDS];
  __shared__ __align__(16) uint16_t Bs[2][MMA_BN][MMA_LDS];
  extern __shared__ int chunk[];  // [K / 4], images only

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const TileOrigin origin = block_tile_origin<MMA_BM, MMA_BN>(P.hidden);
  const int64_t m0 = origin.m0, n0 = origin.n0;

  if (IMAGES) {
    fill_chunks(P, chunk);
    __syncthreads();
  }

  const uint16_t* __restrict__ A = static_cast<const uint16_t*>(P.input);
  const uint16_t* __restrict__ Wt = static_cast<const uint16_t*>(P.weight);
  const int kq = (tid & 7) * 4;
  const int rq = tid >> 3;

  int64_t a_base[4];
  bool a_ok[4];
  bool b_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + rq + 32 * i;
    a_base[i] = 0;
    a_ok[i] = row < P.N && row_source<IMAGES>(P, row, a_base[i]);
    b_ok[i] = n0 + rq + 32 * i < P.hidden;
  }

  uint2 ra[4], rb[4];
  auto load_tile = [&](int64_t k0) {
    const int64_t k = k0 + kq;
    if (IMAGES) {
      const int code = k < P.K ? chunk[k >> 2] : 0;  // K is a multiple of 4 here
      const int64_t off = code >> kChunkCountBits;
      const int nv = code & kChunkCountMask;  // 0 beyond K: zeros
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (!a_ok[i] || nv == 0) {
          ra[i] = make_uint2(0u, 0u);
        } else {
          const uint16_t* src = A + a_base[i] + off;
          if (P.vec_a) {  // even element offsets: aligned pixel pairs
            const uint32_t lo = nv >= 2 ? *reinterpret_cast<const uint32_t*>(src) : static_cast<uint32_t>(src[0]);
            const uint32_t hi = nv >= 4 ? *reinterpret_cast<const uint32_t*>(src + 2)
                                        : (nv == 3 ? static_cast<uint32_t>(src[2]) : 0u);
            ra[i] = make_uint2(lo, hi);
          } else {
            ra[i] = pack4(src[0], nv > 1 ? src[1] : uint16_t(0), nv > 2 ? src[2] : uint16_t(0),
                          nv > 3 ? src[3] : uint16_t(0));
          }
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (!a_ok[i] || k >= P.K) {
          ra[i] = make_uint2(0u, 0u);
        } else if (P.vec_a) {
          ra[i] = *reinterpret_cast<const uint2*>(A + a_base[i] + k);
        } else {
          const uint16_t* src = A + a_base[i] + k;
          ra[i] = pack4(src[0], k + 1 < P.K ? src[1] : uint16_t(0), k + 2 < P.K ? src[2] : uint16_t(0),
                        k + 3 < P.K ? src[3] : uint16_t(0));
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (!b_ok[i] || k >= P.K) {
        rb[i] = make_uint2(0u, 0u);
      } else {
        const uint16_t* src = Wt + (n0 + rq + 32 * i) * P.K + k;
        if (P.vec_b) {
          rb[i] = *reinterpret_cast<const uint2*>(src);
        } else {
          rb[i] = pack4(src[0], k + 1 < P.K ? src[1] : uint16_t(0), k + 2 < P.K ? src[2] : uint16_t(0),
                        k + 3 < P.K ? src[3] : uint16_t(0));
        }
      }
    }
  };
  auto store_tile = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      *reinterpret_cast<uint2*>(&As[buf][rq + 32 * i][kq]) = ra[i];
      *reinterpret_cast<uint2*>(&Bs[buf][rq + 32 * i][kq]) = rb[i];
    }
  };

  const int wm = warp >> 2;  // warp row: 64 rows each
  const int wn = warp & 3;   // warp column: 32 columns each
  float acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  const int64_t k_tiles = (P.K + MMA_BK - 1) / MMA_BK;
  if (k_tiles > 0) {
    load_tile(0);
    store_tile(0);
  }
  __syncthreads();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int buf = static_cast<int>(kt & 1);
    const bool has_next = kt + 1 < k_tiles;
    if (has_next) {
      load_tile((kt + 1) * MMA_BK);  // in flight while the tensor cores work on this tile
    }
#pragma unroll
    for (int ks = 0; ks < MMA_BK; ks += 16) {
      uint32_t af[4][4];
      uint32_t bfr[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        // ldmatrix x4: lanes 0-15 address rows 0-15 at k, lanes 16-31 rows 0-15 at k+8, giving the
        // m16n8k16 A fragment {rows 0-7 k0-7, rows 8-15 k0-7, rows 0-7 k8-15, rows 8-15 k8-15}.
        ldmatrix_x4(af[mi], &As[buf][wm * 64 + mi * 16 + (lane & 15)][ks + (lane >> 4) * 8]);
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        // Weight rows are the columns of B (k contiguous): matrices {n0-7 k0-7, n0-7 k8-15,
        // n8-15 k0-7, n8-15 k8-15} = the two B fragments of two adjacent n8 tiles.
        uint32_t r[4];
        ldmatrix_x4(r, &Bs[buf][wn * 32 + nj * 16 + (lane & 7) + (lane >> 4) * 8][ks + ((lane >> 3) & 1) * 8]);
        bfr[2 * nj][0] = r[0];
        bfr[2 * nj][1] = r[1];
        bfr[2 * nj + 1][0] = r[2];
        bfr[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) Tr::mma(acc[mi][ni], af[mi], bfr[ni]);
    }
    if (has_next) {
      store_tile(buf ^ 1);  // buf ^ 1 was last read before the previous barrier
    }
    __syncthreads();
  }

  // Epilogue: accumulator element e of tile (mi, ni) sits at row g (+8 for e >= 2), column 2t + (e & 1).
  const int g = lane >> 2;
  const int t = lane & 3;
  const uint16_t* __restrict__ bias = static_cast<const uint16_t*>(P.bias);
  const uint16_t* __restrict__ table = static_cast<const uint16_t*>(P.table);
  uint16_t* __restrict__ out = static_cast<uint16_t*>(P.out);
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = m0 + wm * 64 + mi * 16 + g + half * 8;
      if (row >= P.N) {
        continue;
      }
      int64_t pos;
      const bool ok = row_valid<IMAGES>(P, row, pos);
      const uint16_t* trow = table != nullptr ? table + pos * P.hidden : nullptr;
      uint16_t* orow = out + row * P.hidden;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int64_t col = n0 + wn * 32 + ni * 8 + 2 * t;
        if (col >= P.hidden) {
          continue;
        }
        const bool two = col + 1 < P.hidden;
        float v0 = acc[mi][ni][2 * half];
        float v1 = acc[mi][ni][2 * half + 1];
        if (!ok) {
          v0 = nan_f();
          v1 = nan_f();
        } else if (P.pair_out) {  // hidden even: col even, col + 1 in range, 4-byte aligned pairs
          if (bias != nullptr) {
            const uint32_t bb = *reinterpret_cast<const uint32_t*>(bias + col);
            v0 += Tr::to_float(static_cast<uint16_t>(bb & 0xffffu));
            v1 += Tr::to_float(static_cast<uint16_t>(bb >> 16));
          }
          if (trow != nullptr) {
            const uint32_t tt = *reinterpret_cast<const uint32_t*>(trow + col);
            v0 += Tr::to_float(static_cast<uint16_t>(tt & 0xffffu));
            v1 += Tr::to_float(static_cast<uint16_t>(tt >> 16));
          }
        } else {
          if (bias != nullptr) {
            v0 += Tr::to_float(bias[col]);
            if (two) v1 += Tr::to_float(bias[col + 1]);
          }
          if (trow != nullptr) {
            v0 += Tr::to_float(trow[col]);
            if (two) v1 += Tr::to_float(trow[col + 1]);
          }
        }
        if (P.pair_out) {
          *reinterpret_cast<uint32_t*>(orow + col) =
              static_cast<uint32_t>(Tr::from_float(v0)) | (static_cast<uint32_t>(Tr::from_float(v1)) << 16);
        } else {
          orow[col] = Tr::from_float(v0);
          if (two) orow[col + 1] = Tr::from_float(v1);
        }
      }
    }
  }
#else
  __trap();  // the launcher only picks this kernel on sm_80+
#endif
}

// ---------------------------------------------------------------------------------------------
// SIMT kernel: float32 math for every dtype.
constexpr int S_BM = 64;
constexpr int S_BN = 64;
constexpr int S_BK = 16;
constexpr int S_THREADS = 256;

template <typename scalar_t, bool IMAGES>
__global__ void __launch_bounds__(S_THREADS) pe_simt_kernel(const Params P) {
  __shared__ float As[S_BK][S_BM + 4];
  __shared__ float Bs[S_BK][S_BN + 4];
  __shared__ int64_t row_base[S_BM];  // -1: row out of range or invalid coordinates
  extern __shared__ int koff[];       // [K], images only

  const int tid = threadIdx.x;
  const int tx = tid & 15;
  const int ty = tid >> 4;
  const TileOrigin origin = block_tile_origin<S_BM, S_BN>(P.hidden);
  const int64_t m0 = origin.m0, n0 = origin.n0;
  const scalar_t* __restrict__ A = static_cast<const scalar_t*>(P.input);
  const scalar_t* __restrict__ Wt = static_cast<const scalar_t*>(P.weight);

  if (IMAGES) {
    fill_koff(P, koff);
  }
  for (int r = tid; r < S_BM; r += S_THREADS) {
    int64_t base = -1;
    const int64_t row = m0 + r;
    if (!(row < P.N && row_source<IMAGES>(P, row, base))) {
      base = -1;
    }
    row_base[r] = base;
  }
  __syncthreads();

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < P.K; k0 += S_BK) {
#pragma unroll
    for (int e = tid; e < S_BM * S_BK; e += S_THREADS) {
      const int r = e / S_BK;
      const int kk = e % S_BK;
      const int64_t k = k0 + kk;
      const int64_t base = row_base[r];
      float av = 0.f;
      if (base >= 0 && k < P.K) {
        av = static_cast<float>(A[base + (IMAGES ? static_cast<int64_t>(koff[k]) : k)]);
      }
      As[kk][r] = av;
      float bv = 0.f;
      if (n0 + r < P.hidden && k < P.K) {
        bv = static_cast<float>(Wt[(n0 + r) * P.K + k]);
      }
      Bs[kk][r] = bv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < S_BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  const scalar_t* __restrict__ bias = static_cast<const scalar_t*>(P.bias);
  const scalar_t* __restrict__ table = static_cast<const scalar_t*>(P.table);
  scalar_t* __restrict__ out = static_cast<scalar_t*>(P.out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= P.N) {
      continue;
    }
    int64_t pos;
    const bool ok = row_valid<IMAGES>(P, row, pos);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= P.hidden) {
        continue;
      }
      float v = acc[i][j];
      if (!ok) {
        v = nan_f();
      } else {
        if (bias != nullptr) v += static_cast<float>(bias[col]);
        if (table != nullptr) v += static_cast<float>(table[pos * P.hidden + col]);
      }
      out[row * P.hidden + col] = static_cast<scalar_t>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dynamic shared memory a block gets without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr size_t kDefaultSharedMemoryPerBlock = 48 * 1024;
// Blocks of a 1-D grid (gridDim.x < 2^31).
constexpr int64_t kMaxGridBlocks = int64_t(1) << 31;

bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

int compute_capability_major(int device) {
  constexpr int kCachedDevices = 128;
  static int cache[kCachedDevices] = {0};  // 0: not queried yet (a benign race: every writer stores the same value)
  if (device < 0 || device >= kCachedDevices) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major;
  }
  if (cache[device] == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    cache[device] = major;
  }
  return cache[device];
}

// BAGEL_KERNELS_PATCH_EMBED_KERNEL=simt forces the SIMT kernel (a debugging and fallback switch).
bool force_simt() {
  const char* v = std::getenv("BAGEL_KERNELS_PATCH_EMBED_KERNEL");
  return v != nullptr && std::strcmp(v, "simt") == 0;
}

template <typename Kernel>
void launch(Kernel kernel, int64_t blocks, int threads, size_t smem_dynamic, size_t smem_static, int device,
            const Params& P, cudaStream_t stream) {
  if (smem_dynamic + smem_static > kDefaultSharedMemoryPerBlock) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK_VALUE(smem_dynamic + smem_static <= static_cast<size_t>(optin), "fused_patch_embed: C*p*p=", P.K,
                      " inputs per patch need ", smem_dynamic + smem_static,
                      " bytes of shared memory with images input; this GPU allows ", optin);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_dynamic)));
  }
  TORCH_CHECK(blocks < kMaxGridBlocks, "fused_patch_embed: too many tiles (", blocks, ")");
  kernel<<<static_cast<unsigned int>(blocks), threads, smem_dynamic, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The CUDA kernels: the tensor-core kernel for float16/bfloat16 on sm_80+, the SIMT kernel otherwise.
void run_patch_embed_cuda(const PatchEmbedArgs& a, const PatchEmbedShape& s, const PatchEmbedOperands& o) {
  const at::Tensor& in = o.input;
  const at::Tensor w = a.weight.contiguous();
  const at::Tensor b = s.has_bias ? a.bias->contiguous() : at::Tensor();

  Params P;
  P.input = in.data_ptr();
  P.weight = w.data_ptr();
  P.bias = s.has_bias ? b.data_ptr() : nullptr;
  P.table = s.has_table ? o.table.data_ptr() : nullptr;
  P.pos_ids = s.has_table ? o.ids.data_ptr<int64_t>() : nullptr;
  P.coords = s.images ? o.coords.data_ptr<int64_t>() : nullptr;
  P.out = o.out.data_ptr();
  P.N = s.N;
  P.K = s.K;
  P.hidden = s.hidden;
  P.P = s.P;
  P.lda = s.images ? 0 : in.stride(0);
  P.B = s.B;
  P.C = s.C;
  P.H = s.H;
  P.W = s.W;
  P.p = s.p;
  P.Hp = s.Hp;
  P.Wp = s.Wp;
  const size_t esize = in.element_size();
  P.vec_a = !s.images && s.K % 4 == 0 && P.lda % 4 == 0 && aligned(P.input, 4 * esize);
  P.vec_b = s.K % 4 == 0 && aligned(P.weight, 4 * esize);
  P.pair_out = s.hidden % 2 == 0 && aligned(P.out, 2 * esize) && (P.bias == nullptr || aligned(P.bias, 2 * esize)) &&
               (P.table == nullptr || aligned(P.table, 2 * esize));

  P.pp = 0;
  const int device = in.get_device();
  const int cc_major = compute_capability_major(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool half_kind = in.scalar_type() == at::kHalf || in.scalar_type() == at::kBFloat16;
  const bool chunk_fits = !s.images || s.C * s.H * s.W < kMaxChunkOffset;

  if (half_kind && cc_major >= 8 && chunk_fits && !force_simt()) {
    const int64_t blocks = ((s.N + MMA_BM - 1) / MMA_BM) * ((s.hidden + MMA_BN - 1) / MMA_BN);
    const size_t smem_static = 2 * 2 * MMA_BM * MMA_LDS * sizeof(uint16_t);
    at::Tensor w_img;
    size_t chunk_bytes = 0;
    if (s.images) {
      // weight [hidden, (pi, pj, c)] -> [hidden, (c, pi, pj padded to pp)], zeros in the padding.
      const int64_t pp = (s.p + 3) / 4 * 4;
      w_img = at::constant_pad_nd(w.view({s.hidden, s.p, s.p, s.C}).permute({0, 3, 1, 2}), {0, pp - s.p}, 0)
                  .contiguous()
                  .view({s.hidden, s.C * s.p * pp});
      P.weight = w_img.data_ptr();
      P.K = s.C * s.p * pp;
      P.pp = pp;
      P.vec_a = s.W % 2 == 0 && s.p % 2 == 0 && aligned(P.input, 2 * esize);
      P.vec_b = aligned(P.weight, 4 * esize);
      chunk_bytes = static_cast<size_t>(P.K / 4) * sizeof(int);
    }
    if (in.scalar_type() == at::kBFloat16) {
      if (s.images) {
        launch(pe_mma_kernel<Bf16, true>, blocks, MMA_THREADS, chunk_bytes, smem_static, device, P, stream);
      } else {
        launch(pe_mma_kernel<Bf16, false>, blocks, MMA_THREADS, 0, smem_static, device, P, stream);
      }
    } else {
      if (s.images) {
        launch(pe_mma_kernel<Fp16, true>, blocks, MMA_THREADS, chunk_bytes, smem_static, device, P, stream);
      } else {
        launch(pe_mma_kernel<Fp16, false>, blocks, MMA_THREADS, 0, smem_static, device, P, stream);
      }
    }
    return;
  }

  const size_t koff_bytes = s.images ? static_cast<size_t>(s.K) * sizeof(int) : 0;
  const int64_t blocks = ((s.N + S_BM - 1) / S_BM) * ((s.hidden + S_BN - 1) / S_BN);
  const size_t smem_static = (S_BK * (S_BM + 4) + S_BK * (S_BN + 4)) * sizeof(float) + S_BM * sizeof(int64_t);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (s.images) {
      launch(pe_simt_kernel<scalar_t, true>, blocks, S_THREADS, koff_bytes, smem_static, device, P, stream);
    } else {
      launch(pe_simt_kernel<scalar_t, false>, blocks, S_THREADS, 0, smem_static, device, P, stream);
    }
  };
  switch (in.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kHalf:
      run(at::Half{});
      break;
    default:  // bfloat16 (the argument check admits no other dtype)
      run(at::BFloat16{});
      break;
  }
}

}  // namespace
}  // namespace bagel_kernels_ext

BAGEL_REGISTER_PATCH_EMBED(CUDA, bagel_kernels_ext::run_patch_embed_cuda)

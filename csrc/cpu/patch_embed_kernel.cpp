// CPU kernel of bagel_kernels_ext::fused_patch_embed: float32 / float16 / bfloat16 inputs, float32
// accumulation, one rounding to the output dtype. Rows are split over at::parallel_for; each row's
// patch is gathered (from the patch matrix or straight from the images) into a float buffer and
// dotted with the weight rows, which are converted to float once per call.
#include "../patch_embed.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace bagel_kernels_ext {
namespace {

// Dot product with 8 independent partial sums so the compiler can vectorise it without -ffast-math.
inline float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int j = 0; j < 8; ++j) {
      s[j] += a[k + j] * b[k + j];
    }
  }
  for (; k < n; ++k) {
    s[0] += a[k] * b[k];
  }
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename scalar_t>
void patch_embed_cpu_impl(
    const PatchEmbedShape& s,
    const at::Tensor& input,
    const at::Tensor& weight_f,
    const at::Tensor& bias_f,
    const at::Tensor& table,
    const at::Tensor& pos_ids,
    const at::Tensor& coords,
    at::Tensor& out) {
  const int64_t K = s.K, hidden = s.hidden;
  const scalar_t* in = input.data_ptr<scalar_t>();
  const float* w = weight_f.data_ptr<float>();
  const float* b = s.has_bias ? bias_f.data_ptr<float>() : nullptr;
  const scalar_t* tab = s.has_table ? table.data_ptr<scalar_t>() : nullptr;
  const int64_t* ids = s.has_table ? pos_ids.data_ptr<int64_t>() : nullptr;
  const int64_t* pc = s.images ? coords.data_ptr<int64_t>() : nullptr;
  scalar_t* o = out.data_ptr<scalar_t>();

  std::vector<int64_t> koff;
  if (s.images) {
    koff.resize(K);
    for (int64_t k = 0; k < K; ++k) {
      koff[k] = patch_element_offset(k, s.C, s.H, s.W, s.p);
    }
  }
  const int64_t lda = s.images ? 0 : input.stride(0);
  const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());

  at::parallel_for(0, s.N, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> a(K);
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* orow = o + n * hidden;
      // Out-of-range ids (only reachable with check_indices=false) give a NaN row, never a stray read.
      bool valid = true;
      int64_t base = 0;
      if (s.images) {
        const int64_t bi = pc[3 * n], r = pc[3 * n + 1], c = pc[3 * n + 2];
        valid = bi >= 0 && bi < s.B && r >= 0 && r < s.Hp && c >= 0 && c < s.Wp;
        base = ((bi * s.C) * s.H + r * s.p) * s.W + c * s.p;
      } else {
        base = n * lda;
      }
      int64_t pos = 0;
      if (s.has_table) {
        pos = ids[n];
        valid = valid && pos >= 0 && pos < s.P;
      }
      if (!valid) {
        for (int64_t h = 0; h < hidden; ++h) {
          orow[h] = nan;
        }
        continue;
      }
      if (s.images) {
        for (int64_t k = 0; k < K; ++k) {
          a[k] = static_cast<float>(in[base + koff[k]]);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          a[k] = static_cast<float>(in[base + k]);
        }
      }
      const scalar_t* trow = s.has_table ? tab + pos * hidden : nullptr;
      for (int64_t h = 0; h < hidden; ++h) {
        float acc = dot(a.data(), w + h * K, K);
        if (b != nullptr) {
          acc += b[h];
        }
        if (trow != nullptr) {
          acc += static_cast<float>(trow[h]);
        }
        orow[h] = static_cast<scalar_t>(acc);
      }
    }
  });
}

// The CPU kernel: the weight (and bias) converted to float once per call.
void run_patch_embed_cpu(const PatchEmbedArgs& a, const PatchEmbedShape& s, const PatchEmbedOperands& o) {
  const at::Tensor weight_f = a.weight.to(at::kFloat).contiguous();
  const at::Tensor bias_f = s.has_bias ? a.bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = o.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.input.scalar_type(), "fused_patch_embed_cpu", [&] {
    patch_embed_cpu_impl<scalar_t>(s, o.input, weight_f, bias_f, o.table, o.ids, o.coords, out);
  });
}

}  // namespace
}  // namespace bagel_kernels_ext

BAGEL_REGISTER_PATCH_EMBED(CPU, bagel_kernels_ext::run_patch_embed_cpu)

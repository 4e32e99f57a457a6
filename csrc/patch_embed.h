// Fused patch embedding: out[n, :] = A[n, :] @ weight^T + bias (+ pos_table[pos_ids[n], :]).
//
// A is either a packed patch matrix [N, K] (K = C * p * p, BAGEL's patchify order) or is gathered
// inside the kernel from a padded image batch [B, C, H, W] through per-patch coordinates
// patch_coords[n] = (image index, patch row, patch col).
//
// BAGEL's patchify (data/data_utils.py) reshapes an image [C, H, W] to [C, h, p, w, p] and permutes
// with einsum "chpwq->hwpqc": patches are numbered row-major over the (h, w) grid and the vector of
// one patch is ordered (pixel row pi, pixel col pj, channel c), channel fastest:
//     k = (pi * p + pj) * C + c  <->  image[c, r * p + pi, col * p + pj]
// The linear weight is [hidden, C * p * p] in the same order (Conv2d weight permuted (0, 2, 3, 1)).
//
// Shared between the CPU kernel (cpu/), the CUDA kernel (cuda/) and the schema (patch_embed.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <optional>

namespace bagel_kernels_ext {

// Shapes of one call, after validation.
struct PatchEmbedShape {
  bool images = false;  // A is gathered from [B, C, H, W] images (else a [N, K] patch matrix)
  int64_t N = 0;        // patches (output rows)
  int64_t K = 0;        // inputs per patch = C * p * p
  int64_t hidden = 0;   // output columns
  int64_t P = 0;        // rows of the position table (0 without one)
  // images only
  int64_t B = 0, C = 0, H = 0, W = 0, p = 0;
  int64_t Hp = 0, Wp = 0;  // patch grid of the padded batch: H / p, W / p (floor)
  bool has_bias = false;
  bool has_table = false;
};

// The kernels index one image with 32-bit offsets: C * H * W must stay below this.
constexpr int64_t kMaxImageElements = int64_t(1) << 31;

// The op's arguments, in the schema's order (references to the caller's, valid for the call).
struct PatchEmbedArgs {
  const at::Tensor& input;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const std::optional<at::Tensor>& pos_table;
  const std::optional<at::Tensor>& pos_ids;
  const std::optional<at::Tensor>& patch_coords;
  int64_t patch_size;
  bool check_indices;
};

// Validates shapes, dtypes and devices (TORCH_CHECK_VALUE, which Python sees as ValueError, with the
// argument's name) and returns the call's shape. `device_type` is the dispatch key's device.
PatchEmbedShape check_patch_embed_args(const PatchEmbedArgs& a, c10::DeviceType device_type);

// Checks 0 <= pos_ids < P and the coordinates against the image batch. On CUDA this costs one
// device-to-host copy (a synchronisation); callers skip it with check_indices=false, in which case
// the kernels write NaN rows for out-of-range ids instead of reading out of bounds.
void check_patch_embed_indices(const PatchEmbedShape& s, const PatchEmbedArgs& a);

// The operands both kernels read, prepared the same way: the input with a unit inner stride (images
// contiguous), the position table contiguous, ids and coordinates as contiguous int64 (undefined
// tensors where absent), and the output [N, hidden] in the input's dtype.
struct PatchEmbedOperands {
  at::Tensor input, table, ids, coords, out;
};

// A device's kernel: computes `o.out` from the validated call.
using PatchEmbedRun = void (*)(const PatchEmbedArgs& a, const PatchEmbedShape& s, const PatchEmbedOperands& o);

// The op's implementation for one device, with the schema's signature (what TORCH_LIBRARY_IMPL
// registers): validates the arguments, checks the indices when asked to (under a guard for the
// input's device), prepares the operands and runs the device's kernel.
template <c10::DeviceType kDevice, PatchEmbedRun kRun>
at::Tensor fused_patch_embed_impl(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pos_table, const std::optional<at::Tensor>& pos_ids,
    const std::optional<at::Tensor>& patch_coords, int64_t patch_size, bool check_indices) {
  const PatchEmbedArgs a{input, weight, bias, pos_table, pos_ids, patch_coords, patch_size, check_indices};
  const PatchEmbedShape s = check_patch_embed_args(a, kDevice);
  const c10::DeviceGuard guard(input.device());
  if (check_indices) {
    check_patch_embed_indices(s, a);
  }
  PatchEmbedOperands o;
  o.out = at::empty({s.N, s.hidden}, input.options());
  if (s.N == 0 || s.hidden == 0) {
    return o.out;
  }
  o.input = input;
  if (s.images || input.stride(1) != 1 || input.stride(0) < s.K) {
    o.input = input.contiguous();
  }
  o.table = s.has_table ? pos_table->contiguous() : at::Tensor();
  o.ids = s.has_table ? pos_ids->to(at::kLong).contiguous() : at::Tensor();
  o.coords = s.images ? patch_coords->to(at::kLong).contiguous() : at::Tensor();
  kRun(a, s, o);
  return o.out;
}

// Registers fused_patch_embed_impl<DEVICE, RUN> as the op's kernel for the dispatch key DEVICE (CPU or
// CUDA); used once at file scope by each device's source (which includes <torch/library.h>).
#define BAGEL_REGISTER_PATCH_EMBED(DEVICE, RUN)                                                           \
  TORCH_LIBRARY_IMPL(bagel_kernels_ext, DEVICE, m) {                                                      \
    m.impl("fused_patch_embed", &bagel_kernels_ext::fused_patch_embed_impl<c10::DeviceType::DEVICE, RUN>); \
  }

// Offset of element k of a patch vector relative to the patch's top-left pixel of channel 0 in a
// contiguous [B, C, H, W] batch (see the order above).
inline int64_t patch_element_offset(int64_t k, int64_t C, int64_t H, int64_t W, int64_t p) {
  const int64_t q = k / C;  // pixel inside the patch, row-major
  const int64_t c = k - q * C;
  const int64_t pi = q / p;
  const int64_t pj = q - pi * p;
  return (c * H + pi) * W + pj;
}

}  // namespace bagel_kernels_ext

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

// Validates shapes, dtypes and devices (TORCH_CHECK_VALUE, which Python sees as ValueError, with the
// argument's name) and returns the call's shape. `device_type` is the dispatch key's device.
PatchEmbedShape check_patch_embed_args(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pos_table,
    const std::optional<at::Tensor>& pos_ids,
    const std::optional<at::Tensor>& patch_coords,
    int64_t patch_size,
    c10::DeviceType device_type);

// Checks 0 <= pos_ids < P and the coordinates against the image batch. On CUDA this costs one
// device-to-host copy (a synchronisation); callers skip it with check_indices=false, in which case
// the kernels write NaN rows for out-of-range ids instead of reading out of bounds.
void check_patch_embed_indices(
    const PatchEmbedShape& s,
    const std::optional<at::Tensor>& pos_ids,
    const std::optional<at::Tensor>& patch_coords);

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

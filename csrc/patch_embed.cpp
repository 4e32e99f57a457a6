// Schema of bagel_kernels_ext::fused_patch_embed and the argument checks shared by its kernels.
// The CPU kernel is registered in cpu/patch_embed_kernel.cpp, the CUDA kernel in
// cuda/patch_embed_kernel.cu; the fake (meta) implementation and the autograd formula live in
// Python (bagel_kernels/patch_embed.py), which set_python_module below points torch to.
#include "patch_embed.h"

#include <torch/library.h>

namespace bagel_kernels_ext {

namespace {

bool is_float_kind(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_index_kind(at::ScalarType t) {
  return t == at::kLong || t == at::kInt;
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& input, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(
      t.device().type() == device_type && t.device() == input.device(),
      "fused_patch_embed: ", name, " is on ", t.device(), " but input is on ", input.device());
  TORCH_CHECK_VALUE(
      t.scalar_type() == input.scalar_type(),
      "fused_patch_embed: ", name, " has dtype ", t.scalar_type(), " but input has dtype ", input.scalar_type(),
      " (all floating-point arguments must share one dtype)");
}

}  // namespace

PatchEmbedShape check_patch_embed_args(const PatchEmbedArgs& a, c10::DeviceType device_type) {
  PatchEmbedShape s;
  TORCH_CHECK_VALUE(
      a.input.device().type() == device_type,
      "fused_patch_embed: input is on ", a.input.device(), ", expected a ", device_type, " tensor");
  TORCH_CHECK_VALUE(
      is_float_kind(a.input.scalar_type()),
      "fused_patch_embed: input must be float32, float16 or bfloat16, got ", a.input.scalar_type());
  check_same(a.weight, "weight", a.input, device_type);
  TORCH_CHECK_VALUE(a.weight.dim() == 2, "fused_patch_embed: weight must be [hidden, C*p*p], got ", a.weight.sizes());
  s.hidden = a.weight.size(0);
  s.K = a.weight.size(1);

  s.images = a.patch_coords.has_value();
  if (s.images) {
    const at::Tensor& pc = *a.patch_coords;
    TORCH_CHECK_VALUE(a.input.dim() == 4, "fused_patch_embed: with patch_coords, input must be images [B, C, H, W], got ",
                      a.input.sizes());
    TORCH_CHECK_VALUE(a.patch_size > 0, "fused_patch_embed: patch_size must be positive with patch_coords, got ", a.patch_size);
    TORCH_CHECK_VALUE(pc.device() == a.input.device(), "fused_patch_embed: patch_coords is on ", pc.device(),
                      " but input is on ", a.input.device());
    TORCH_CHECK_VALUE(is_index_kind(pc.scalar_type()), "fused_patch_embed: patch_coords must be int32 or int64, got ",
                      pc.scalar_type());
    TORCH_CHECK_VALUE(pc.dim() == 2 && pc.size(1) == 3,
                      "fused_patch_embed: patch_coords must be [N, 3] (image, patch row, patch col), got ", pc.sizes());
    s.N = pc.size(0);
    s.B = a.input.size(0);
    s.C = a.input.size(1);
    s.H = a.input.size(2);
    s.W = a.input.size(3);
    s.p = a.patch_size;
    s.Hp = s.H / s.p;
    s.Wp = s.W / s.p;
    TORCH_CHECK_VALUE(s.C * s.p * s.p == s.K, "fused_patch_embed: weight has ", s.K, " inputs per patch but images with C=",
                      s.C, " and patch_size=", s.p, " give C*p*p=", s.C * s.p * s.p);
    // The kernels index one image with 32-bit offsets.
    TORCH_CHECK_VALUE(s.C * s.H * s.W < kMaxImageElements,
                      "fused_patch_embed: one image of input has C*H*W=", s.C * s.H * s.W, " elements (limit 2^31)");
  } else {
    TORCH_CHECK_VALUE(a.input.dim() == 2, "fused_patch_embed: input must be patches [N, C*p*p] (or images with patch_coords), got ",
                      a.input.sizes());
    TORCH_CHECK_VALUE(a.input.size(1) == s.K, "fused_patch_embed: input has ", a.input.size(1),
                      " values per patch but weight expects ", s.K);
    TORCH_CHECK_VALUE(a.patch_size >= 0, "fused_patch_embed: patch_size must be >= 0, got ", a.patch_size);
    s.N = a.input.size(0);
  }

  if (a.bias.has_value()) {
    check_same(*a.bias, "bias", a.input, device_type);
    TORCH_CHECK_VALUE(a.bias->dim() == 1 && a.bias->size(0) == s.hidden, "fused_patch_embed: bias must be [hidden=", s.hidden,
                      "], got ", a.bias->sizes());
    s.has_bias = true;
  }

  TORCH_CHECK_VALUE(a.pos_table.has_value() == a.pos_ids.has_value(),
                    "fused_patch_embed: pos_table and pos_ids must be given together (got pos_table ",
                    a.pos_table.has_value() ? "set" : "None", ", pos_ids ", a.pos_ids.has_value() ? "set" : "None", ")");
  if (a.pos_table.has_value()) {
    const at::Tensor& t = *a.pos_table;
    const at::Tensor& ids = *a.pos_ids;
    check_same(t, "pos_table", a.input, device_type);
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == s.hidden, "fused_patch_embed: pos_table must be [P, hidden=", s.hidden,
                      "], got ", t.sizes());
    TORCH_CHECK_VALUE(ids.device() == a.input.device(), "fused_patch_embed: pos_ids is on ", ids.device(),
                      " but input is on ", a.input.device());
    TORCH_CHECK_VALUE(is_index_kind(ids.scalar_type()), "fused_patch_embed: pos_ids must be int32 or int64, got ",
                      ids.scalar_type());
    TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == s.N, "fused_patch_embed: pos_ids must be [N=", s.N, "], got ",
                      ids.sizes());
    s.P = t.size(0);
    s.has_table = true;
  }
  return s;
}

void check_patch_embed_indices(const PatchEmbedShape& s, const PatchEmbedArgs& a) {
  if (s.N == 0 || (!s.has_table && !s.images)) {
    return;
  }
  // min and max of every index column gathered into one small tensor: one copy to the host.
  std::vector<at::Tensor> parts;
  if (s.has_table) {
    auto mm = at::aminmax(a.pos_ids->to(at::kLong));
    parts.push_back(std::get<0>(mm).reshape({1}));
    parts.push_back(std::get<1>(mm).reshape({1}));
  }
  if (s.images) {
    auto mm = at::aminmax(a.patch_coords->to(at::kLong), /*dim=*/0);
    parts.push_back(std::get<0>(mm));
    parts.push_back(std::get<1>(mm));
  }
  const at::Tensor host = at::cat(parts).cpu();
  const int64_t* v = host.data_ptr<int64_t>();
  int64_t i = 0;
  if (s.has_table) {
    TORCH_CHECK_VALUE(v[0] >= 0 && v[1] < s.P, "fused_patch_embed: pos_ids must lie in [0, ", s.P,
                      ") (rows of pos_table), got values in [", v[0], ", ", v[1], "]");
    i = 2;
  }
  if (s.images) {
    const int64_t* lo = v + i;
    const int64_t* hi = v + i + 3;
    const int64_t limit[3] = {s.B, s.Hp, s.Wp};
    const char* what[3] = {"image index", "patch row", "patch col"};
    for (int j = 0; j < 3; ++j) {
      TORCH_CHECK_VALUE(lo[j] >= 0 && hi[j] < limit[j], "fused_patch_embed: patch_coords[:, ", j, "] (", what[j],
                        ") must lie in [0, ", limit[j], ") for images of shape [", s.B, ", ", s.C, ", ", s.H, ", ", s.W,
                        "] and patch_size ", s.p, ", got values in [", lo[j], ", ", hi[j], "]");
    }
  }
}

}  // namespace bagel_kernels_ext

TORCH_LIBRARY(bagel_kernels_ext, m) {
  m.set_python_module("bagel_kernels.patch_embed");
  m.def(
      "fused_patch_embed(Tensor input, Tensor weight, Tensor? bias, Tensor? pos_table, Tensor? pos_ids, "
      "Tensor? patch_coords, int patch_size, bool check_indices) -> Tensor");
}

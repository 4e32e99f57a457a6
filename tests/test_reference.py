"""The shared math of ``bagel_kernels.reference``: one definition behind every public name, and the
properties the model relies on (Qwen2RMSNorm's float32 statistics, RoPE as transformers computes it)."""

from __future__ import annotations

import torch

from bagel.data import packing
from bagel.model import qwen2, qwen2_reference
from bagel_kernels import mot, reference
from bagel_kernels import patch_embed as pe


def test_public_names_are_the_reference_definitions():
    """The names users import from mot / patch_embed / bagel.data.packing are the reference's own objects."""
    for module, names in (
        (mot, ("mot_rms_norm_reference", "mot_qk_norm_rope_reference", "swiglu_reference",
               "mot_linear_reference", "permute_rows_reference", "qwen2_rms_norm", "rotate_half")),
        (pe, ("patchify", "patchify_images", "patch_embed_reference", "patch_embed_images_reference")),
        (packing, ("patchify",)),
    ):  # fmt: skip
        for name in names:
            assert getattr(module, name) is getattr(reference, name), f"{module.__name__}.{name}"
            assert name in module.__all__


def test_rms_norm_statistics_dtype():
    """None keeps float64 inputs in float64 (the references); float32 is transformers' Qwen2RMSNorm,
    which the module runs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g, dtype=torch.float64) * 1e3
    w = torch.randn(16, generator=g, dtype=torch.float64)
    exact = w * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(reference.qwen2_rms_norm(x, w), exact, atol=1e-12, rtol=1e-12)
    hf = reference.qwen2_rms_norm(x, w, stats_dtype=torch.float32)
    xf = x.float()
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.float64)
    assert torch.equal(hf, expected)
    module = qwen2.Qwen2RMSNorm(16).double()
    module.weight.data.copy_(w)
    assert torch.equal(module(x), hf)


def test_rope_matches_transformers():
    """cos/sin tables and the rotation against transformers' Qwen2 rotary embedding."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, rope_theta=1e6)
    pos = torch.tensor([0, 3, 7, 100, 4095])
    hf_cos, hf_sin = Qwen2RotaryEmbedding(cfg)(torch.zeros(1, 5, 16), pos[None])
    cos, sin = reference.rope_tables(pos, reference.rope_inv_freq(16, 1e6), torch.float32)
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    torch.testing.assert_close(reference.apply_rope(q, cos, sin), hq[0].transpose(0, 1), atol=0, rtol=0)
    ours_q, ours_k = qwen2_reference.apply_rotary(q, k, cos, sin)
    assert torch.equal(ours_q, reference.apply_rope(q, cos, sin))
    assert torch.equal(ours_k, hk[0].transpose(0, 1))
    assert torch.equal(torch.stack(mot.rope_cos_sin(pos, 16, 1e6)), torch.stack((cos, sin)))

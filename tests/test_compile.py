"""torch.compile with the kernels in the loop: graph breaks and recompilations.

The forward is split at a clear line (``bagel.qwen2.Qwen2Model``): ``prepare_pack`` runs eagerly once
per pack (validation with host syncs, grouping by expert, the mask with its row index, the kernels'
block tables, RoPE tables); ``decode`` (every decoder layer and the final norms) and each decoder
layer hold only tensor work and custom ops, and trace with ``fullgraph=True``. Shapes are dynamic: a
new pack of another length must not recompile once sizes have been seen to vary.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from bagel import BagelBackendConfig, BagelConfig, BagelForUnifiedMultimodal, pack_samples, synthetic_samples
from bagel.qwen2 import Qwen2ForCausalLM
from bagel_kernels import PackedMask
from bagel_kernels.testing import random_pack


def _packs(count: int = 3):
    """Packs of different lengths (about 120-250 tokens), each with generation tokens (noise splits)."""
    rng = random.Random(7)
    out = []
    while len(out) < count:
        layout = random_pack(
            rng, rng.randint(3, 5), kinds=("t2i", "und", "edit"), text=(4, 12), image=(8, 24)
        )
        if not 120 <= layout.total_len <= 250 or layout.total_len in [p[0] for p in out]:
            continue
        mask = PackedMask.from_splits(*layout.as_tuple())
        gen, off = [], 0
        for n, mode in zip(layout.split_lens, layout.attn_modes, strict=True):
            if mode == "noise":
                gen += range(off, off + n)
            off += n
        und = sorted(set(range(layout.total_len)) - set(gen))
        out.append(
            (layout.total_len, mask, torch.tensor(und, dtype=torch.long), torch.tensor(gen, dtype=torch.long))
        )
    return out


BACKENDS = [
    BagelBackendConfig(attention="triton", mot="triton", patch_embed="torch"),
    BagelBackendConfig(attention="triton", mot="torch", patch_embed="torch"),
    BagelBackendConfig(attention="sdpa", mot="triton", patch_embed="torch"),
    BagelBackendConfig(attention="sdpa", mot="torch", patch_embed="torch"),
]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"{b.attention}-{b.mot}")
def test_decoder_layer_and_decode_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = BagelConfig.tiny().text_config
    lm = Qwen2ForCausalLM(cfg, backend=backend)
    model = lm.model
    layer = model.layers[0]
    layer_count = CompileCounterWithBackend("aot_eager")
    decode_count = CompileCounterWithBackend("aot_eager")
    layer_c = torch.compile(layer, fullgraph=True, dynamic=True, backend=layer_count)
    decode_c = torch.compile(model.decode, fullgraph=True, dynamic=True, backend=decode_count)
    packs = _packs()
    first = None  # frames compiled for the first pack
    for L, mask, und, gen in packs:
        x = torch.randn(L, cfg.hidden_size)
        xg, ctx, _ = model.prepare_pack(x, None, mask, torch.arange(L), und, gen)
        xg.requires_grad_()
        # fullgraph=True raises on any graph break, so reaching the comparisons means none happened
        y = layer_c(xg, ctx)
        torch.testing.assert_close(y, layer(xg, ctx), atol=1e-5, rtol=1e-5)
        out = decode_c(xg, ctx)
        ref = model.decode(xg, ctx)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        (g,) = torch.autograd.grad(out.square().sum(), xg)
        (gr,) = torch.autograd.grad(ref.square().sum(), xg)
        torch.testing.assert_close(g, gr, atol=1e-4, rtol=1e-4)
        if first is None:
            first = (layer_count.frame_count, decode_count.frame_count)
    # The Triton kernels read the mask as tensors: what was compiled for the first pack serves every
    # later pack length (dynamic shapes, nothing guarded per pack). The sdpa reference loops over
    # samples in Python, so it specialises on each pack's sample layout and recompiles per pack.
    if backend.attention == "triton":
        assert (layer_count.frame_count, decode_count.frame_count) == first
    else:
        assert layer_count.frame_count > first[0]


def test_whole_model_forward_graph_breaks_are_only_the_pack_preparation():
    """``torch._dynamo.explain`` of the whole forward: it traces, and its graph breaks come from the
    per-pack preparation (host syncs of validation and index building), not from the kernels."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=BagelBackendConfig.reference())
    model.initialize_weights()
    batch = pack_samples(
        synthetic_samples(["und", "t2i", "edit"], model.config, seed=1), model.config, max_num_tokens=256
    )
    explanation = torch._dynamo.explain(model)(**batch)
    assert explanation.graph_count >= 1
    reasons = " ".join(str(b.reason) for b in explanation.break_reasons)
    assert "bagel_kernels::" not in reasons  # no custom op of ours breaks a graph

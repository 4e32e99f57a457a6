"""torch.compile with the kernels in the loop: graph breaks and recompilations.

Where the line is drawn: ``BagelForUnifiedMultimodal.forward(**batch)`` is
``forward_prepared(prepare_pack(**batch))``.

- ``prepare_pack`` runs eagerly once per pack: input validation (host syncs), the masks built from
  Python lists (``sample_lens``, ``split_lens``, ...), the grouping by expert, the kernels' block tables,
  the patchified latents and the flow-matching noise. It is full of data-dependent Python on purpose.
- ``forward_prepared`` (embeddings, SigLIP ViT, every decoder layer, final norms, heads, losses) and a
  single MoT decoder layer hold only tensor work and our custom ops: they trace with
  ``fullgraph=True`` (which raises on any graph break) with every attention x MoT backend.
- ``forward`` as a whole traces with graph breaks, every one of them in the preparation.

Shapes are dynamic (``dynamic=True``). A graph still specialises on sizes 0 and 1 and on sizes that
happen to be equal when it is traced (duck shaping), and one graph serves one combination of present
inputs (ViT images, CE tokens, VAE tokens): the first packs of a run may each add a graph, then the set
stops growing. The tests warm up on ``WARMUP`` packs of one composition and lengths 30-90 tokens, then
require that further packs of new lengths compile nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from bagel import BagelBackendConfig, BagelConfig, BagelForUnifiedMultimodal, pack_samples, synthetic_samples

pytestmark = pytest.mark.slow  # every case compiles (10-40 s each on 2 CPU cores); CI runs them all

WARMUP = 3  # packs after which no pack may compile anything new
PACKS = 5
ATOL, RTOL = 1e-5, 1e-5  # fp32; compiled (aot_eager) and eager run the same kernels, in another order

# (attention, mot, torch.compile backend, activation checkpointing). "aot_eager" also traces the
# backward through every custom op's autograd and fake implementation: the all-kernel combination, and
# the sdpa + MoT-kernel one with every decoder layer under non-reentrant torch.utils.checkpoint (as
# bagel.train.distributed.apply_fsdp2 sets it). The others bring no op of their own, so Dynamo's capture
# ("eager", where a graph break would show) is what they need checked. The fused patch-embedding op is
# traced by tests/test_patch_embed.py; "torch" keeps these runs short.
CASES = [
    ("triton", "triton", "aot_eager", False),
    ("sdpa", "triton", "aot_eager", True),
    ("triton", "torch", "eager", False),
    ("sdpa", "torch", "eager", False),
    ("flex", "torch", "eager", False),  # forward only: FlexAttention has no backward on CPU
]


def _model(backend: BagelBackendConfig) -> BagelForUnifiedMultimodal:
    torch.manual_seed(0)
    model = BagelForUnifiedMultimodal(BagelConfig.tiny(llm_layers=1, vit_layers=1), backend=backend)
    model.initialize_weights()
    return model


def _packs(config, count: int = PACKS) -> list[dict]:
    """Packs of one composition (understanding + text-to-image, every other one with an edit sample:
    ViT images, CE tokens, noised and clean VAE tokens in each) and different lengths."""
    out = []
    for i in range(count):
        kinds = ["und", "t2i", "edit"][: 2 + i % 2]
        out.append(pack_samples(synthetic_samples(kinds, config, seed=i), config, max_num_tokens=400))
    assert len({b["sequence_length"] for b in out}) == count
    return out


def _close(got: dict, ref: dict) -> None:
    for key in ("ce", "mse"):
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=RTOL, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize(
    "attention,mot,compiler,checkpointing",
    CASES,
    ids=[f"{a}-{m}-{c}{'-checkpointing' if ac else ''}" for a, m, c, ac in CASES],
)
def test_forward_prepared_and_decoder_layer_fullgraph(attention, mot, compiler, checkpointing):
    torch._dynamo.reset()
    counters.clear()
    grad = attention != "flex"
    model = _model(BagelBackendConfig(attention=attention, mot=mot, patch_embed="torch"))
    model.model.language_model.model.gradient_checkpointing = checkpointing
    model.model.vit_model.vision_model.encoder.gradient_checkpointing = checkpointing
    body_count = CompileCounterWithBackend(compiler)
    layer_count = CompileCounterWithBackend(compiler)
    # fullgraph=True: any graph break raises, so reaching the comparisons means there was none
    body = torch.compile(model.forward_prepared, fullgraph=True, dynamic=True, backend=body_count)
    layer = model.model.language_model.model.layers[0]  # a Qwen2MoTDecoderLayer
    layer_c = torch.compile(layer, fullgraph=True, dynamic=True, backend=layer_count)
    frames = []
    with torch.set_grad_enabled(grad):
        for i, batch in enumerate(_packs(model.config)):
            torch.manual_seed(i)  # the flow-matching noise
            pack = model.prepare_pack(**batch)
            out = body(pack)
            torch.manual_seed(i)
            _close(out, model(**batch))
            x = torch.randn(batch["sequence_length"], model.hidden_size, requires_grad=grad)
            torch.testing.assert_close(layer_c(x, pack.lm), layer(x, pack.lm), atol=ATOL, rtol=RTOL)
            frames.append((body_count.frame_count, layer_count.frame_count))
        if grad:  # the compiled backward against the eager one, on the last pack
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            params = [p for _, p in named]
            loss = out["ce"].mean() + out["mse"].mean()
            got = torch.autograd.grad(loss, params, allow_unused=True)
            torch.manual_seed(i)
            ref = model(**batch)
            want = torch.autograd.grad(ref["ce"].mean() + ref["mse"].mean(), params, allow_unused=True)
            for (name, _), g, w in zip(named, got, want, strict=True):
                assert (g is None) == (w is None), name
                if g is not None:
                    torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert not counters["graph_break"]
    # what was compiled during the warm-up serves every later pack length
    assert frames[-1] == frames[WARMUP - 1], frames


def test_lora_model_body_fullgraph_without_recompiling():
    """A PEFT LoRA model (adapters on the LLM's and the ViT's projections): the fused kernels give way
    to the adapted modules by the pack's fusion plan, decided in the eager preparation, so the body
    still traces with ``fullgraph=True`` and packs of new lengths compile nothing after the warm-up."""
    from peft import LoraConfig, get_peft_model

    torch._dynamo.reset()
    counters.clear()
    model = _model(BagelBackendConfig(attention="sdpa", mot="torch", patch_embed="torch"))
    targets = r".*(language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj(_moe_gen)?|mlp\.down_proj)|encoder\.layers\.\d+\.self_attn\.q_proj)"
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    assert not model.model.language_model.model.fusion_plan().layers[0].fused("q_proj")
    count = CompileCounterWithBackend("eager")
    body = torch.compile(model.forward_prepared, fullgraph=True, dynamic=True, backend=count)
    frames = []
    for i, batch in enumerate(_packs(model.config, WARMUP + 1)):
        torch.manual_seed(i)
        out = body(model.prepare_pack(**batch))
        torch.manual_seed(i)
        _close(out, peft_model(**batch))
        frames.append(count.frame_count)
    assert not counters["graph_break"]
    assert frames[-1] == frames[WARMUP - 1], frames


def test_whole_forward_graph_breaks_are_only_in_the_pack_preparation():
    """``torch._dynamo.explain`` of the documented ``forward``: it traces, and every graph break lies in
    ``prepare_pack`` (validation host syncs, masks from Python lists, block tables), none in the model
    body or in our custom ops."""
    torch._dynamo.reset()
    model = _model(BagelBackendConfig(attention="triton", mot="triton", patch_embed="torch"))
    batch = _packs(model.config, 1)[0]
    explanation = torch._dynamo.explain(model)(**batch)
    assert explanation.graph_break_count > 0
    assert explanation.graph_count == explanation.graph_break_count + 1
    body = {
        "_forward_prepared",
        "forward_prepared",
        "decode",
        "forward_grouped",
        "_attention",
        "_mlp",
        "_norm",
        "_linear",
        "_call_rows",
        "_qk_norm_rope",
        "packed_attention",
        "triton_packed_attention",
    }
    for brk in explanation.break_reasons:
        names = {frame.name for frame in brk.user_stack}
        assert not names & body, (str(brk.reason)[:200], names)
        assert "bagel_kernels::" not in str(brk.reason)

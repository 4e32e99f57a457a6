"""Fine-tuning: the model calls its modules, so PEFT LoRA adapters, quantised linears and forward hooks
act on every backend; fused kernels that read raw weights stand in only for stock modules with nothing
attached (bagel.model.fusion.fusable, decided once per pack).

On the tiny stage-2 MoT model (BagelConfig.tiny) and one ~160-token pack of understanding, text-to-image,
edit and text samples: LoRA (the real ``peft`` package) on q/k/v/o and the MLP projections of both
experts and on the ViT's attention and MLP; a quantised-style linear (int8 weight + scale, not an
nn.Linear); forward hooks. The fast backends (Triton attention under the interpreter + Triton MoT, and
SDPA + torch MoT on the grouped layout) are compared with the all-reference model (SDPA, torch ops,
upstream's gather/scatter LM) under tests/test_model.py's tolerances: forward outputs within
``tolerance("float32", "fwd")``; gradients per tensor within ``GRAD_RTOL * max|g_ref| + GRAD_FLOOR * G``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from model_helpers import randomize_
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn.utils import parametrize

from bagel import (
    BagelBackendConfig,
    BagelConfig,
    BagelForUnifiedMultimodal,
    Qwen2ForCausalLMReference,
    pack_samples,
    synthetic_samples,
)
from bagel.model.fusion import fusable
from bagel.model.qwen2 import LayerFusion
from bagel_kernels.testing import tolerance

FWD_ATOL, FWD_RTOL = tolerance("float32", "fwd")
GRAD_RTOL, GRAD_FLOOR = 1e-4, 1e-6  # as tests/test_model.py (fp32 reassociation ~5e-7 relative)
REF = BagelBackendConfig.reference()
FAST = [
    pytest.param(BagelBackendConfig(attention="sdpa", mot="torch", patch_embed="torch"), id="sdpa-torch"),
    pytest.param(
        BagelBackendConfig(attention="triton", mot="triton", patch_embed="auto"), id="triton-triton"
    ),
]
# LoRA targets: q/k/v/o and gate/up/down of both experts in every LLM layer, q/k/v/out and fc1/fc2 of
# every ViT layer (a regex: a bare "fc1" would also catch the connector)
LM_TARGETS = r".*language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj(_moe_gen)?|mlp(_moe_gen)?\.(gate|up|down)_proj)"
VIT_TARGETS = r".*vit_model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
LORA = dict(r=4, lora_alpha=8, target_modules=f"({LM_TARGETS})|({VIT_TARGETS})", init_lora_weights=False)


def _needs_triton(backend: BagelBackendConfig) -> None:
    if "triton" in (backend.attention, backend.mot) and not (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    ):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")


def make_model(backend: BagelBackendConfig, state: dict | None = None) -> BagelForUnifiedMultimodal:
    """``REF`` (the object): the all-reference model with upstream's gather/scatter LM; any other
    backend (``sdpa``/``torch`` included): the grouped LM."""
    lm_cls = Qwen2ForCausalLMReference if backend is REF else None
    model = BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=backend, language_model_cls=lm_cls)
    if state is None:
        randomize_(model, 0)
    else:
        model.load_state_dict(state)
    return model


def run(model: nn.Module, batch: dict, noise_seed: int = 1, grad: bool = True):
    """Forward (+ backward of ``ce.mean() + mse.mean()``) with a fixed noise draw; (outputs, grads)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(noise_seed)
    with torch.set_grad_enabled(grad):
        out = model(**batch)
    if not grad:
        return out, {}
    (out["ce"].mean() + out["mse"].mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_out_close(out: dict, ref: dict) -> None:
    for key in ("ce", "mse"):
        torch.testing.assert_close(
            out[key], ref[key], atol=FWD_ATOL, rtol=FWD_RTOL, msg=lambda m, k=key: f"{k}: {m}"
        )


def assert_grads_close(grads: dict, ref: dict) -> None:
    assert set(grads) == set(ref), set(grads) ^ set(ref)
    G = max(g.abs().max().item() for g in ref.values())
    for name, g0 in ref.items():
        err = (grads[name] - g0).abs().max().item()
        bound = GRAD_RTOL * g0.abs().max().item() + GRAD_FLOOR * G
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


@pytest.fixture(scope="module")
def batch():
    cfg = BagelConfig.tiny()
    return pack_samples(
        synthetic_samples(["und", "t2i", "edit", "text"], cfg, seed=0), cfg, max_num_tokens=160, rng=0
    )


@pytest.fixture(scope="module")
def base_state():
    return make_model(REF).state_dict()


@pytest.fixture(scope="module")
def lora_reference(batch, base_state):
    """The all-reference model with LoRA adapters (random A and B), its outputs and LoRA gradients, and
    the outputs of the same model without adapters."""
    model = make_model(REF, base_state)
    plain, _ = run(model, batch, grad=False)
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    out, grads = run(peft_model, batch)
    return peft_model.state_dict(), out, grads, plain


class Int8Linear(nn.Module):
    """A quantised-style linear that is not an nn.Linear: int8 weight and per-row float scale as buffers,
    dequantised in forward; the bias trains."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)


QUANTISED = [  # module paths under BagelModel, both experts, the ViT and the embedders
    "language_model.model.layers.0.self_attn.q_proj",
    "language_model.model.layers.0.self_attn.k_proj_moe_gen",
    "language_model.model.layers.1.self_attn.o_proj",
    "language_model.model.layers.0.mlp.down_proj",
    "language_model.model.layers.1.mlp_moe_gen.gate_proj",
    "vit_model.vision_model.embeddings.patch_embedding",
    "vit_model.vision_model.encoder.layers.0.self_attn.q_proj",
    "vit_model.vision_model.encoder.layers.1.mlp.fc2",
    "connector.fc1",
    "time_embedder.mlp.0",
    "vae2llm",
    "llm2vae",
]


def _swap(root: nn.Module, path: str, make) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, make(getattr(parent, name)))


# ---------------------------------------------------------------------------------------------- fusion plan
def test_fusion_plan_follows_the_modules():
    """Stock modules with nothing attached run fused; a LoRA layer, a hook (module or global), a
    subclass, a parametrization, a patched forward or a quantised weight send the op to the modules."""
    model = make_model(BagelBackendConfig(attention="sdpa", mot="torch"))
    lm = model.model.language_model.model
    layer = lm.layers[0]
    assert lm.fusion_plan().layers == (LayerFusion(), LayerFusion()) and lm.fusion_plan().norm
    assert model.model.vit_model.fusion_plan()

    h = layer.input_layernorm_moe_gen.register_forward_hook(lambda m, i, o: None)
    assert not lm.fusion_plan().layers[0].fused("input_layernorm") and lm.fusion_plan().layers[1].fused(
        "input_layernorm"
    )
    h.remove()
    h = layer.self_attn.k_norm.register_forward_pre_hook(lambda m, i: None)
    assert not lm.fusion_plan().layers[0].fused("qk_norm")
    h.remove()
    h = layer.mlp.register_forward_hook(lambda m, i, o: None)
    assert not lm.fusion_plan().layers[0].fused("mlp")
    h.remove()
    h = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        plan = lm.fusion_plan()
        ops = ("input_layernorm", "post_attention_layernorm", "q_proj", "k_proj", "v_proj", "o_proj")
        ops += ("qk_norm", "mlp", "gate_proj", "up_proj", "down_proj")
        assert not any(p.fused(op) for p in plan.layers for op in ops) and not plan.norm
        assert not model.model.vit_model.fusion_plan()
    finally:
        h.remove()
    assert lm.fusion_plan().layers[0] == LayerFusion()

    class MyLinear(nn.Linear):
        pass

    sub = MyLinear(64, 64)
    assert not fusable(nn.Linear, sub) and fusable(nn.Linear, nn.Linear(3, 4), None)
    lin = nn.Linear(4, 4)
    lin.forward = lambda x: x
    assert not fusable(nn.Linear, lin)

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", Scale())
    assert not fusable(nn.Linear, lin)
    norm = layer.post_attention_layernorm
    norm.weight = nn.Parameter(torch.ones(64, dtype=torch.int8), requires_grad=False)
    assert fusable(type(norm), norm)  # a plain tensor of another dtype: the kernel's own checks apply
    assert not fusable(nn.Linear, Int8Linear(nn.Linear(4, 4)))

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    plan = peft_model.base_model.model.model.language_model.model.fusion_plan().layers[0]
    assert (
        not plan.fused("q_proj") and not plan.fused("down_proj") and plan.fused("mlp")
    )  # the MLP is split, down_proj called
    assert (
        plan.fused("k_proj")
        and plan.fused("v_proj")
        and plan.fused("o_proj")
        and plan.fused("gate_proj")
        and plan.fused("up_proj")
    )
    assert plan.fused("input_layernorm") and plan.fused("qk_norm")


# ---------------------------------------------------------------------------------------------- LoRA (peft)
@pytest.mark.parametrize("backend", FAST)
def test_lora_fast_backends_match_reference(batch, base_state, lora_reference, backend):
    """LoRA on q/k/v/o + MLP of both experts and on the ViT: the losses change; the fast backend and
    the reference agree on the adapted model (ce, mse and every LoRA gradient); only the adapters
    have gradients."""
    _needs_triton(backend)
    state, ref_out, ref_grads, plain = lora_reference
    assert not torch.allclose(ref_out["ce"], plain["ce"]) and not torch.allclose(ref_out["mse"], plain["mse"])
    peft_model = get_peft_model(make_model(backend, base_state), LoraConfig(**LORA))
    peft_model.load_state_dict(state)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    kinds = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert kinds == {
        "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "q_proj_moe_gen", "k_proj_moe_gen",
        "v_proj_moe_gen", "o_proj_moe_gen", "gate_proj", "up_proj", "down_proj", "fc1", "fc2",
    }  # fmt: skip
    assert any("mlp_moe_gen" in n for n in trainable) and any("vit_model" in n for n in trainable)
    out, grads = run(peft_model, batch)
    assert_out_close(out, ref_out)
    assert set(grads) == trainable  # only the adapters train, and every one of them gets a gradient
    assert_grads_close(grads, ref_grads)


def test_lora_merge_and_unload_and_training_step(batch, base_state, lora_reference):
    """``merge_and_unload()`` gives the adapted model's outputs, on stock modules that run fused again;
    an optimizer step moves the adapters and nothing else."""
    state, ref_out, _, _ = lora_reference
    backend = BagelBackendConfig(attention="sdpa", mot="torch", patch_embed="torch")
    peft_model = get_peft_model(make_model(backend, base_state), LoraConfig(**LORA))
    peft_model.load_state_dict(state)
    base = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    out, _ = run(peft_model, batch)
    assert_out_close(out, ref_out)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    opt.step()
    assert all(torch.equal(p, base[n]) for n, p in peft_model.named_parameters() if n in base)
    assert all(not torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if n in before)
    torch.manual_seed(1)
    with torch.no_grad():
        adapted = peft_model(**batch)
    merged = peft_model.merge_and_unload()
    assert type(merged) is BagelForUnifiedMultimodal
    assert set(merged.state_dict()) == set(base_state)
    lm = merged.model.language_model.model
    assert lm.fusion_plan().layers == (LayerFusion(), LayerFusion()) and merged.model.vit_model.fusion_plan()
    out_merged, _ = run(merged, batch, grad=False)
    assert_out_close(out_merged, adapted)


# ---------------------------------------------------------------------------------------------- quantised modules
@pytest.mark.parametrize("backend", FAST)
def test_quantised_linear_modules(batch, base_state, backend):
    """Int8Linear (not an nn.Linear, no float ``.weight``) swapped into both experts' projections, the
    ViT's patch embedding and layers, the connector and the generation embedders: the fast backend
    computes what the reference computes with stock nn.Linear modules holding the dequantised weights
    (outputs and every gradient, the quantised modules' biases included)."""
    _needs_triton(backend)
    quant = make_model(backend, base_state)
    ref = make_model(REF, base_state)
    for path in QUANTISED:
        _swap(quant.model, path, Int8Linear)
        q = quant.model.get_submodule(path)

        def stock(lin, q=q):
            with torch.no_grad():
                lin.weight.copy_(q.dequantized())
            return lin

        _swap(ref.model, path, stock)
    plan = quant.model.language_model.model.fusion_plan().layers
    assert (
        not plan[0].fused("q_proj")
        and not plan[0].fused("k_proj")
        and not plan[0].fused("down_proj")
        and not plan[1].fused("o_proj")
    )
    assert (
        not plan[1].fused("gate_proj") and plan[0].fused("v_proj") and not quant.model.vit_model.fusion_plan()
    )
    out, grads = run(quant, batch)
    ref_out, ref_grads = run(ref, batch)
    assert_out_close(out, ref_out)
    ref_grads = {n: g for n, g in ref_grads.items() if not any(n == f"model.{p}.weight" for p in QUANTISED)}
    assert_grads_close(grads, ref_grads)
    biased = [p for p in QUANTISED if quant.model.get_submodule(p).bias is not None]
    assert len(biased) >= 8 and all(f"model.{p}.bias" in grads for p in biased)


# ---------------------------------------------------------------------------------------------- hooks
HOOKED = [  # module paths under BagelModel whose forward hooks must fire on every backend
    "language_model.model.embed_tokens",
    "language_model.model.layers.0",
    "language_model.model.layers.0.input_layernorm",
    "language_model.model.layers.0.input_layernorm_moe_gen",
    "language_model.model.layers.0.self_attn",
    "language_model.model.layers.0.self_attn.q_proj",
    "language_model.model.layers.0.self_attn.q_proj_moe_gen",
    "language_model.model.layers.0.self_attn.k_norm",
    "language_model.model.layers.0.self_attn.k_norm_moe_gen",
    "language_model.model.layers.1.self_attn.o_proj",
    "language_model.model.layers.1.post_attention_layernorm",
    "language_model.model.layers.0.mlp",
    "language_model.model.layers.0.mlp.gate_proj",
    "language_model.model.layers.1.mlp_moe_gen",
    "language_model.model.layers.1.mlp_moe_gen.down_proj",
    "language_model.model.norm",
    "language_model.model.norm_moe_gen",
    "language_model.lm_head",
    "vit_model.vision_model.embeddings",
    "vit_model.vision_model.embeddings.patch_embedding",
    "vit_model.vision_model.embeddings.position_embedding",
    "vit_model.vision_model.encoder.layers.0",
    "vit_model.vision_model.encoder.layers.0.self_attn.q_proj",
    "vit_model.vision_model.encoder.layers.0.layer_norm1",
    "vit_model.vision_model.encoder.layers.1.mlp",
    "vit_model.vision_model.encoder.layers.1.mlp.fc1",
    "vit_model.vision_model.post_layernorm",
    "connector",
    "vit_pos_embed",
    "time_embedder",
    "vae2llm",
    "llm2vae",
    "latent_pos_embed",
]
HOOK_BACKENDS = [
    pytest.param(REF, id="reference"),
    pytest.param(BagelBackendConfig(attention="sdpa", mot="torch", patch_embed="torch"), id="sdpa-torch"),
    pytest.param(
        BagelBackendConfig(attention="triton", mot="triton", patch_embed="auto"), id="triton-triton"
    ),
    pytest.param(BagelBackendConfig(attention="flex", mot="torch", patch_embed="torch"), id="flex-torch"),
]


@pytest.fixture(scope="module")
def hooked_reference(batch, base_state):
    """Reference outputs with a hook that doubles one expert's q projection and one MLP's output."""
    model = make_model(REF, base_state)
    out, _ = run(model, batch, grad=False)
    _modifying_hooks(model)
    hooked, _ = run(model, batch, grad=False)
    return out, hooked


def _modifying_hooks(model) -> None:
    layers = model.model.language_model.model.layers
    layers[0].self_attn.q_proj_moe_gen.register_forward_hook(lambda m, i, o: o + 1.0)
    layers[1].mlp.register_forward_hook(lambda m, i, o: 2.0 * o)
    model.model.vit_model.vision_model.encoder.layers[0].mlp.fc1.register_forward_pre_hook(
        lambda m, args: (args[0] * 0.5,)
    )


@pytest.mark.parametrize("backend", HOOK_BACKENDS)
def test_forward_hooks_fire_and_act_on_every_backend(batch, base_state, hooked_reference, backend):
    """Forward hooks on projections, norms, MLPs, layers, the ViT's modules and the embedders fire on
    every backend, once per forward each (the pack has understanding, ViT and generation tokens), and a
    hook that changes an output changes the losses the same way on every backend."""
    _needs_triton(backend)
    plain, hooked = hooked_reference
    model = make_model(backend, base_state)
    calls = dict.fromkeys(HOOKED, 0)
    for path in HOOKED:
        model.model.get_submodule(path).register_forward_hook(
            lambda m, i, o, path=path: calls.__setitem__(path, calls[path] + 1)
        )
    grad = backend.attention != "flex"  # FlexAttention has no backward on CPU
    out, _ = run(model, batch, grad=grad)
    assert calls == dict.fromkeys(HOOKED, 1)
    assert_out_close(out, plain)  # hooks returning None change nothing
    _modifying_hooks(model)
    out, _ = run(model, batch, grad=grad)
    assert not torch.allclose(out["ce"], plain["ce"]) and not torch.allclose(out["mse"], plain["mse"])
    assert_out_close(out, hooked)

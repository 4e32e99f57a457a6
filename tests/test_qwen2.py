"""bagel.model.qwen2: the grouped MoT language model against the upstream-style gather/scatter reference.

The reference (bagel.model.qwen2_reference) runs on a float64 copy of the same parameters; the model under
test runs in fp32 with every backend combination. Forward outputs and the gradients of the input and
of EVERY parameter are compared with the fp32 tolerances of bagel_kernels.testing (accumulated over
two layers of fp32 math: the same budget the kernels get). The reference itself is pinned to
transformers' Qwen2 (dense, no qk_norm, one causal sample) and to routing invariance (MoT with equal
expert weights == dense).
"""

from __future__ import annotations

import copy
import importlib.util
import random

import pytest
import torch
from transformers import Qwen2Config

from bagel.model.backend import BagelBackendConfig
from bagel.model.qwen2 import LAYER_MODULES, Qwen2ForCausalLM
from bagel.model.qwen2_reference import Qwen2ForCausalLMReference, forward_train_reference
from bagel_kernels import PackedMask
from bagel_kernels.testing import random_pack, tolerance

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 4, 2, 16, 96, 100
FWD = tolerance(torch.float32, "fwd")
BWD = tolerance(torch.float32, "bwd")


# the Triton backends run on CUDA, or on CPU under the interpreter (tests/conftest.py sets it without CUDA)
needs_triton_attention = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (Linux only)"
)


# ---------------------------------------------------------------------------------------------- fixtures
def make_config(
    layer_module="Qwen2MoTDecoderLayer",
    qk_norm=True,
    freeze_und=False,
    layers=2,
    hidden=HIDDEN,
    heads=HEADS,
    inter=INTER,
) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=KV_HEADS,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        qk_norm=qk_norm,
        layer_module=layer_module,
        freeze_und=freeze_und,
    )


def make_model(cfg, backend=None, seed=0) -> Qwen2ForCausalLM:
    """A model with every parameter random and distinct between experts (HF init leaves norms at 1 and
    biases at 0, which would hide a norm or bias routed to the wrong expert)."""
    lm = Qwen2ForCausalLM(cfg, backend)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight") or "norm_moe_gen" in name or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return lm


def make_pack(seed: int, num_samples=6, pad=7, gen="mixed", kinds=None, small=False):
    """A random pack: layout, mask, L, positions, und/gen indexes (about 150 tokens; ``small``: about
    60, for the Triton MoT ops, whose interpreted q/k-norm kernel costs ~25 ms per token and pass).

    gen="mixed": tokens inside noise splits and inside about half of the full splits (clean VAE images)
    are generation tokens (the two bracket tokens of an image are text, so understanding); "none": no
    generation token; "all": every token."""
    rng = random.Random(seed)
    kw = {} if kinds is None else {"kinds": kinds}
    if small:
        layout = random_pack(rng, 3, text=(1, 6), image=(3, 12), pad=pad, **kw)
    else:
        layout = random_pack(rng, num_samples, text=(1, 10), image=(1, 18), pad=pad, **kw)
    mask = PackedMask.from_splits(*layout.as_tuple())
    L = mask.total_len - (pad or 0)
    is_gen = torch.zeros(mask.total_len, dtype=torch.bool)
    pos = torch.zeros(mask.total_len, dtype=torch.long)
    start, sample_end, p = 0, 0, 0
    ends = iter(torch.tensor(layout.sample_lens).cumsum(0).tolist())
    for n, mode in zip(layout.split_lens, layout.attn_modes, strict=True):
        if n == 0:  # a zero-length pad sample
            continue
        while start >= sample_end:  # new sample: positions restart
            sample_end, p = next(ends), 0
        if mode == "causal":
            pos[start : start + n] = torch.arange(p, p + n)
            p += n
        else:  # an image: all its tokens share one position
            pos[start : start + n] = p
            p += 1
            if n >= 3 and (mode == "noise" or rng.random() < 0.5):
                is_gen[start + 1 : start + n - 1] = True
        start += n
    is_gen = is_gen[:L]
    if gen == "none":
        is_gen[:] = False
    elif gen == "all":
        is_gen[:] = True
    und = torch.nonzero(~is_gen).flatten()
    gen_idx = torch.nonzero(is_gen).flatten()
    return layout, mask, L, pos[:L], und, gen_idx


def run(fn, lm, x, out_weight):
    """Forward + backward of sum(out * out_weight); returns output, input grad, {param name: grad}."""
    lm.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * out_weight.to(y.dtype)).sum().backward()
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in lm.named_parameters()}
    return y.detach(), x.grad.detach(), grads


def compare(lm, layout, mask, L, pos, und, gen, und_arg="given", gen_arg="given", check_grads=True):
    """Fast path of ``lm`` (fp32, its backend) vs the reference on a float64 copy."""
    ref = copy.deepcopy(lm).double()
    x = torch.randn(L, HIDDEN)
    w = torch.randn(L, HIDDEN)
    u = und if und_arg == "given" else None
    g = gen if gen_arg == "given" else (gen.new_zeros(0) if gen_arg == "empty" else None)

    def fast(t):
        return lm.forward_train(t, layout.sample_lens, mask, pos, u, g)

    def slow(t):
        return forward_train_reference(ref, t, layout.sample_lens, mask, pos, und, gen)

    if not check_grads:
        with torch.no_grad():
            y = fast(x)
            yr = slow(x.double())
        torch.testing.assert_close(y.double(), yr, atol=FWD[0], rtol=FWD[1])
        return
    y, dx, grads = run(fast, lm, x, w)
    yr, dxr, grads_r = run(slow, ref, x.double(), w)
    assert y.dtype == torch.float32 and y.shape == (L, HIDDEN)
    torch.testing.assert_close(y.double(), yr, atol=FWD[0], rtol=FWD[1])
    torch.testing.assert_close(dx.double(), dxr, atol=BWD[0], rtol=BWD[1])
    assert grads.keys() == grads_r.keys()
    for name in grads:
        a, b = grads[name], grads_r[name]
        if b is None or not bool(b.any()):
            assert a is None or not bool(a.any()), f"{name}: the reference has no gradient, the model has one"
            continue
        assert a is not None, f"{name}: no gradient"
        torch.testing.assert_close(a.double(), b, atol=BWD[0], rtol=BWD[1], msg=lambda m, n=name: f"{n}: {m}")
    return grads


# ---------------------------------------------------------------------------------------------- backend config
def test_backend_config_validates():
    assert BagelBackendConfig() == BagelBackendConfig("auto", "auto", "auto", False)
    ref = BagelBackendConfig.reference()
    assert (ref.attention, ref.mot, ref.patch_embed) == ("sdpa", "torch", "torch")
    for field, bad in (
        ("attention", "flash"),
        ("mot", "cuda"),
        ("patch_embed", "triton"),
        ("attention", None),
    ):
        with pytest.raises(ValueError, match=field) as exc:
            BagelBackendConfig(**{field: bad})
        assert "auto" in str(exc.value)  # the message lists the allowed values
    with pytest.raises(ValueError, match="deterministic"):
        BagelBackendConfig(deterministic="yes")
    lm = Qwen2ForCausalLM(make_config(layers=1))
    with pytest.raises(ValueError, match="backend"):
        lm.backend = "sdpa"


# ---------------------------------------------------------------------------------------------- structure
def _expected_keys(layer_module: str, qk_norm: bool, layers: int) -> set[str]:
    moe = layer_module != "Qwen2DecoderLayer"
    mot_layer = layer_module == "Qwen2MoTDecoderLayer"
    keys = {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"}
    if moe:
        keys.add("model.norm_moe_gen.weight")
    for i in range(layers):
        p = f"model.layers.{i}."
        sfx = ["", "_moe_gen"] if mot_layer else [""]
        for s in sfx:
            keys |= {p + f"input_layernorm{s}.weight", p + f"post_attention_layernorm{s}.weight"}
            for proj in "qkv":
                keys |= {p + f"self_attn.{proj}_proj{s}.weight", p + f"self_attn.{proj}_proj{s}.bias"}
            keys.add(p + f"self_attn.o_proj{s}.weight")
            if qk_norm:
                keys |= {p + f"self_attn.q_norm{s}.weight", p + f"self_attn.k_norm{s}.weight"}
        for s in ["", "_moe_gen"] if moe else [""]:
            keys |= {p + f"mlp{s}.{n}_proj.weight" for n in ("gate", "up", "down")}
    return keys


@pytest.mark.parametrize("layer_module", LAYER_MODULES)
@pytest.mark.parametrize("qk_norm", [True, False])
def test_state_dict_keys_match_bagel_checkpoint(layer_module, qk_norm):
    lm = Qwen2ForCausalLM(make_config(layer_module, qk_norm=qk_norm))
    sd = lm.state_dict()
    assert set(sd) == _expected_keys(layer_module, qk_norm, 2)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (HEADS * HEAD_DIM, HIDDEN)
    assert sd["model.layers.0.self_attn.k_proj.bias"].shape == (KV_HEADS * HEAD_DIM,)
    assert sd["model.layers.1.mlp.down_proj.weight"].shape == (HIDDEN, INTER)
    assert lm.get_input_embeddings() is lm.model.embed_tokens
    assert lm.get_output_embeddings() is lm.lm_head
    # HF-style init: norms 1, biases 0
    assert bool((sd["model.norm.weight"] == 1).all()) and not bool(
        sd["model.layers.0.self_attn.q_proj.bias"].any()
    )
    # the reference model has the same keys
    assert set(Qwen2ForCausalLMReference(make_config(layer_module, qk_norm=qk_norm)).state_dict()) == set(sd)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="layer_module"):
        Qwen2ForCausalLM(make_config("Qwen2MoDDecoderLayer"))
    cfg = make_config()
    cfg.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act"):
        Qwen2ForCausalLM(cfg)


def test_init_moe_copies_understanding_weights():
    lm = make_model(make_config())
    lm.init_moe()
    sd = lm.state_dict()
    gen_keys = [k for k in sd if "moe_gen" in k]
    assert gen_keys
    for k in gen_keys:
        assert torch.equal(sd[k], sd[k.replace("_moe_gen", "")])


# ---------------------------------------------------------------------------------------------- the reference itself
def test_reference_matches_transformers_qwen2():
    """Dense, no qk_norm, one causal sample: our reference and fast path == transformers' Qwen2Model."""
    from transformers import Qwen2Model as HFQwen2Model

    cfg = make_config("Qwen2DecoderLayer", qk_norm=False)
    cfg._attn_implementation = "eager"
    lm = make_model(cfg, BagelBackendConfig.reference())
    hf = HFQwen2Model(cfg).eval()
    hf.load_state_dict(lm.model.state_dict(), strict=True)
    L = 37
    x = torch.randn(L, HIDDEN)
    pos = torch.arange(L)
    mask = PackedMask.from_splits([L], [L], ["causal"])
    with torch.no_grad():
        want = hf(inputs_embeds=x[None], position_ids=pos[None]).last_hidden_state[0]
        ref = forward_train_reference(lm, x, [L], mask, pos)
        fast = lm.forward_train(x, [L], mask, pos)
    torch.testing.assert_close(ref, want, atol=FWD[0], rtol=FWD[1])
    torch.testing.assert_close(fast, want, atol=FWD[0], rtol=FWD[1])


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_mot_with_equal_experts_equals_dense(impl):
    """Routing invariance: a MoT model whose *_moe_gen weights equal the base ones computes what the
    dense model with those weights computes, whatever the und/gen split."""
    mot_lm = make_model(make_config("Qwen2MoTDecoderLayer"), BagelBackendConfig.reference())
    mot_lm.init_moe()
    dense = Qwen2ForCausalLM(make_config("Qwen2DecoderLayer"), BagelBackendConfig.reference())
    missing, unexpected = dense.load_state_dict(mot_lm.state_dict(), strict=False)
    assert not missing and all("moe_gen" in k for k in unexpected)
    layout, mask, L, pos, und, gen = make_pack(1)
    assert gen.numel() > 0
    x = torch.randn(L, HIDDEN)
    with torch.no_grad():
        if impl == "reference":
            got = forward_train_reference(
                copy.deepcopy(mot_lm).double(), x.double(), layout.sample_lens, mask, pos, und, gen
            )
            want = forward_train_reference(
                copy.deepcopy(dense).double(), x.double(), layout.sample_lens, mask, pos
            )
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        else:
            want = dense.forward_train(x, layout.sample_lens, mask, pos)
            got = mot_lm.forward_train(x, layout.sample_lens, mask, pos, und, gen)
            torch.testing.assert_close(got, want, atol=FWD[0], rtol=FWD[1])


# ---------------------------------------------------------------------------------------------- fast path vs reference
BACKENDS = [
    ("sdpa", "torch"),
    ("sdpa", "triton"),
    pytest.param("triton", "torch", marks=needs_triton_attention),
    pytest.param("triton", "triton", marks=needs_triton_attention),
]


@pytest.mark.parametrize("attention,mot_backend", BACKENDS)
def test_mot_matches_reference(attention, mot_backend):
    """Interleaved understanding/generation tokens, a pad sample (L < mask.total_len), all gradients."""
    lm = make_model(make_config(), BagelBackendConfig(attention=attention, mot=mot_backend))
    layout, mask, L, pos, und, gen = make_pack(seed=3, pad=9, small=mot_backend == "triton")
    assert 0 < gen.numel() < L and L < mask.total_len
    # generation tokens really are interleaved with understanding ones (not one block)
    assert int((torch.diff(gen) > 1).sum()) >= 2
    compare(lm, layout, mask, L, pos, und, gen)


def test_mot_flex_forward_matches_reference():
    lm = make_model(make_config(), BagelBackendConfig(attention="flex", mot="torch"))
    layout, mask, L, pos, und, gen = make_pack(seed=4)
    compare(lm, layout, mask, L, pos, und, gen, check_grads=False)


@pytest.mark.parametrize("layer_module", ["Qwen2DecoderLayer", "Qwen2MoEDecoderLayer"])
@pytest.mark.parametrize("mot_backend", ["torch", "triton"])
def test_dense_and_moe_layers_match_reference(layer_module, mot_backend):
    lm = make_model(make_config(layer_module), BagelBackendConfig(attention="sdpa", mot=mot_backend))
    layout, mask, L, pos, und, gen = make_pack(seed=5, small=mot_backend == "triton")
    compare(lm, layout, mask, L, pos, und, gen)


@pytest.mark.parametrize("mot_backend", ["torch", "triton"])
def test_without_qk_norm_matches_reference(mot_backend):
    lm = make_model(make_config(qk_norm=False), BagelBackendConfig(attention="sdpa", mot=mot_backend))
    layout, mask, L, pos, und, gen = make_pack(seed=6, small=mot_backend == "triton")
    compare(lm, layout, mask, L, pos, und, gen)


@pytest.mark.parametrize(
    "case",
    [
        ("none", "given", "none", "triton"),  # gen None: an understanding-only pack (n_und = L)
        ("none", "given", "empty", "torch"),  # gen an empty tensor
        ("mixed", "none", "given", "torch"),  # und None: every token not in gen
        ("all", "given", "given", "triton"),  # every token a generation token (n_und = 0)
    ],
)
def test_routing_edge_cases(case):
    gen_kind, und_arg, gen_arg, mot_backend = case
    lm = make_model(make_config(), BagelBackendConfig(attention="sdpa", mot=mot_backend))
    layout, mask, L, pos, und, gen = make_pack(
        seed=7, num_samples=4, pad=0, gen=gen_kind, small=mot_backend == "triton"
    )
    compare(lm, layout, mask, L, pos, und, gen, und_arg=und_arg, gen_arg=gen_arg)


# ---------------------------------------------------------------------------------------------- freeze_und
@pytest.mark.parametrize(
    "layer_module,attention,mot_backend",
    [
        ("Qwen2MoTDecoderLayer", "sdpa", "torch"),
        pytest.param("Qwen2MoTDecoderLayer", "triton", "triton", marks=needs_triton_attention),
        ("Qwen2MoEDecoderLayer", "sdpa", "torch"),
    ],
)
def test_freeze_und(layer_module, attention, mot_backend):
    lm = make_model(
        make_config(layer_module, freeze_und=True), BagelBackendConfig(attention=attention, mot=mot_backend)
    )
    layout, mask, L, pos, und, gen = make_pack(seed=8, small=mot_backend == "triton")
    grads = compare(lm, layout, mask, L, pos, und, gen)
    for name, g in grads.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert g is None  # not used by forward_train
            continue
        if layer_module == "Qwen2MoTDecoderLayer":
            # MoT: no gradient reaches the understanding side; the generation side trains
            if "moe_gen" in name:
                assert g is not None and bool(g.any()), f"{name} should train"
            else:
                assert g is None or not bool(g.any()), f"{name} should be frozen"
        elif name == "model.norm.weight":
            assert g is None or not bool(g.any())  # the routed final norm of understanding rows is detached
        elif name.startswith("model.layers.") and "mlp." not in name:
            assert g is not None and bool(g.any()), f"{name}: MoE layers share attention, which still trains"


def test_freeze_und_input_gradient_only_on_generation_rows():
    lm = make_model(make_config(freeze_und=True), BagelBackendConfig(attention="sdpa", mot="torch"))
    layout, mask, L, pos, und, gen = make_pack(seed=9)
    x = torch.randn(L, HIDDEN, requires_grad=True)
    lm.forward_train(x, layout.sample_lens, mask, pos, und, gen).square().sum().backward()
    assert not bool(x.grad[und].any())
    assert bool((x.grad[gen].abs().sum(-1) > 0).all())


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise():
    lm = make_model(make_config(layers=1), BagelBackendConfig.reference())
    layout, mask, L, pos, und, gen = make_pack(seed=10)
    x = torch.randn(L, HIDDEN)
    sl = layout.sample_lens

    def call(**kw):
        args = dict(
            packed_sequence=x,
            sample_lens=sl,
            attention_mask=mask,
            packed_position_ids=pos,
            packed_und_token_indexes=und,
            packed_gen_token_indexes=gen,
        )
        args.update(kw)
        return lm.forward_train(**args)

    with pytest.raises(ValueError, match="packed_und_token_indexes.*packed_gen_token_indexes"):
        call(packed_und_token_indexes=und[1:])
    with pytest.raises(ValueError, match="overlap"):
        call(packed_und_token_indexes=torch.cat([und[:-1], gen[:1]]))
    with pytest.raises(ValueError, match="packed_gen_token_indexes"):
        call(packed_gen_token_indexes=gen.float())
    # a Python list of floats is refused too, not truncated to integers (0.5 -> 0 would alias a token)
    with pytest.raises(ValueError, match="packed_gen_token_indexes must hold integers"):
        call(packed_gen_token_indexes=[float(i) + 0.5 for i in gen.tolist()])
    with pytest.raises(ValueError, match="packed_und_token_indexes must hold integers"):
        call(packed_und_token_indexes=[float(i) for i in und.tolist()])
    # lists of ints are taken as they are
    assert torch.equal(
        call(packed_und_token_indexes=und.tolist(), packed_gen_token_indexes=gen.tolist()), call()
    )
    with pytest.raises(ValueError, match="outside"):
        call(packed_gen_token_indexes=torch.cat([gen[:-1], torch.tensor([L + 3])]))
    with pytest.raises(ValueError, match="hidden size"):
        call(packed_sequence=torch.randn(L, HIDDEN + 1))
    with pytest.raises(ValueError, match="packed_position_ids"):
        call(packed_position_ids=pos[:-1])
    with pytest.raises(ValueError, match="attention_mask"):
        call(attention_mask="causal")
    with pytest.raises(ValueError, match="attention_mask"):
        call(attention_mask=PackedMask.from_splits([L - 1], [L - 1], ["causal"]))
    with pytest.raises(ValueError, match="sample_lens"):
        call(sample_lens=[L + 100])


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("layer_module", ["Qwen2MoTDecoderLayer", "Qwen2MoEDecoderLayer"])
def test_gpu_bf16_fast_backends_match_reference(layer_module):
    """CUDA, bf16, fast backends ("auto": Triton) vs the fp32 reference on the same weights."""
    dev = torch.device("cuda")
    cfg = make_config(layer_module, hidden=8 * 64, heads=8, inter=1024)  # head_dim 64, GQA 4
    lm = make_model(cfg, BagelBackendConfig()).to(dev)
    layout, mask, L, pos, und, gen = make_pack(seed=11, num_samples=24)
    mask, pos, und, gen = mask.to(dev), pos.to(dev), und.to(dev), gen.to(dev)
    ref = copy.deepcopy(lm).float()
    fast = copy.deepcopy(lm).to(torch.bfloat16)
    x = torch.randn(L, cfg.hidden_size, device=dev)
    w = torch.randn(L, cfg.hidden_size, device=dev)
    y, dx, g = run(
        lambda t: fast.forward_train(t, layout.sample_lens, mask, pos, und, gen), fast, x.bfloat16(), w
    )
    yr, dxr, gr = run(
        lambda t: forward_train_reference(ref, t, layout.sample_lens, mask, pos, und, gen), ref, x, w
    )
    atol, rtol = tolerance(torch.bfloat16, "fwd")
    # outputs are O(1)-O(10) after the final norm with random weights: compare relative to their scale
    scale = yr.abs().max()
    torch.testing.assert_close(y.float() / scale, yr / scale, atol=atol, rtol=rtol)
    atol, rtol = tolerance(torch.bfloat16, "bwd")
    for name in gr:
        if gr[name] is None:
            continue
        s = gr[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(
            g[name].float() / s, gr[name] / s, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )
    s = dxr.abs().max()
    torch.testing.assert_close(dx.float() / s, dxr / s, atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_reproducible():
    dev = torch.device("cuda")
    lm = make_model(
        make_config(), BagelBackendConfig(attention="triton", mot="triton", deterministic=True)
    ).to(dev)
    layout, mask, L, pos, und, gen = make_pack(seed=12, num_samples=16)
    mask, pos, und, gen = mask.to(dev), pos.to(dev), und.to(dev), gen.to(dev)
    x = torch.randn(L, HIDDEN, device=dev)
    w = torch.randn(L, HIDDEN, device=dev)
    fn = lambda t: lm.forward_train(t, layout.sample_lens, mask, pos, und, gen)
    y1, dx1, g1 = run(fn, lm, x, w)
    y2, dx2, g2 = run(fn, lm, x, w)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    for name in g1:
        assert (g1[name] is None and g2[name] is None) or torch.equal(g1[name], g2[name]), name


# ---------------------------------------------------------------------------------------------- benchmark pack
def test_bench_mot_pack_has_about_half_generation_tokens():
    """benchmarks/bench_mot.py marks VAE latents (inside noise splits and edit samples' clean VAE image)
    as generation tokens; its 16k pack must have about half of them, never on image bracket tokens."""
    import os
    import sys

    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    )
    import bench_mot

    layout, mask, L, pos, und, gen, seed = bench_mot.build_pack(16384, False, "cpu")
    assert L == 16384 and und.numel() + gen.numel() == L
    assert 0.4 <= gen.numel() / L <= 0.6
    split_of = torch.repeat_interleave(torch.arange(len(layout.split_lens)), torch.tensor(layout.split_lens))
    starts = torch.tensor([0] + layout.split_lens).cumsum(0)
    modes = [layout.attn_modes[i] for i in split_of[gen].tolist()]
    assert all(m in ("noise", "full") for m in modes)
    s = split_of[gen]
    assert bool((gen > starts[s]).all()) and bool((gen < starts[s + 1] - 1).all())  # not a bracket token
    noise_tokens = sum(
        n - 2 for n, m in zip(layout.split_lens, layout.attn_modes, strict=True) if m == "noise"
    )
    assert modes.count("noise") == noise_tokens
    # positions: every token of an image shares one position, text advances by one
    assert bool((pos[gen] == pos[gen - 1]).all())


def test_a_new_decoder_block_is_one_class():
    """A new block variant is one decorated subclass: the config check, the grouped forward, the fusion
    plan, the gather/scatter reference and the checkpoint's key groups all take it (here: routed norms
    and attention around one shared MLP)."""
    from bagel.io.checkpoint import classify_key
    from bagel.model.config import BagelConfig
    from bagel.model.qwen2 import DECODER_LAYERS, PackedAttentionMoT, Qwen2DecoderLayer, decoder_layer

    @decoder_layer
    class Qwen2SharedMLPDecoderLayer(Qwen2DecoderLayer):
        routed_attention = True

        def __init__(self, config, layer_idx=None):
            super().__init__(config, layer_idx)
            self.input_layernorm_moe_gen = type(self.input_layernorm)(config.hidden_size, config.rms_norm_eps)
            self.post_attention_layernorm_moe_gen = type(self.input_layernorm)(
                config.hidden_size, config.rms_norm_eps
            )

        def _attention_module(self, config):
            return PackedAttentionMoT(config, self.layer_idx)

    try:
        name = "Qwen2SharedMLPDecoderLayer"
        assert BagelConfig.tiny(layer_module=name).text_config.layer_module == name
        for mot_backend in ("torch", "triton"):
            lm = make_model(make_config(name), BagelBackendConfig(attention="sdpa", mot=mot_backend))
            assert lm.model.use_moe and hasattr(lm.model, "norm_moe_gen")
            keys = [f"language_model.{k}" for k in lm.state_dict()]
            assert "unknown" not in {classify_key(k) for k in keys}
            assert not any("mlp_moe_gen" in k for k in keys)
            layout, mask, L, pos, und, gen = make_pack(seed=11, small=mot_backend == "triton")
            compare(lm, layout, mask, L, pos, und, gen)
    finally:
        DECODER_LAYERS.pop("Qwen2SharedMLPDecoderLayer", None)

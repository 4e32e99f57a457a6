"""bagel.generate and bagel.model.inference: the cached path against the recompute-everything path (the
language model's training forward over whole sequences), for text-to-image and editing with every
guidance variant; the guidance formulas against hand-written loops; the Euler sampler against the
training convention (x_t = (1 - t) x_0 + t eps, velocity eps - x_0); greedy decoding against the argmax of
the training forward's logits (recovered from its per-token cross entropy); step backends; seeds."""

from __future__ import annotations

import math
import os

import pytest
import torch
from model_helpers import randomize_
from torch import nn

from bagel import BagelConfig, BagelForUnifiedMultimodal
from bagel.data.packing import Sample, SpecialTokens, Text, VitImage, pack_samples
from bagel.generate import (
    Branches,
    Context,
    Generator,
    apply_cfg,
    generate_text,
    pick_token,
    sample_latent_tokens,
    timestep_schedule,
)
from bagel.generate.guidance import cfg_scales_at, check_cfg_args
from bagel.model.inference import Chunk, KVCache, forward_cached, resolve_step_backend
from bagel.vae import FluxVAE, FluxVAEConfig

# fp32 on the tiny model: the cached and recomputed paths differ only by the order of float operations
ATOL = 1e-4
RTOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    from bagel.data.tokenizer import tiny_tokenizer

    return tiny_tokenizer()


VOCAB = 325  # len(tiny_tokenizer()): its four BAGEL tokens are the model's last four ids


def _model(stage: int = 2, seed: int = 0) -> BagelForUnifiedMultimodal:
    cfg = BagelConfig.tiny(visual_gen=stage == 2, max_latent_size=8, vocab_size=VOCAB)
    m = BagelForUnifiedMultimodal(cfg).eval()
    randomize_(m, seed)
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def vae():
    # a slim random VAE (32 channels at every level, one block each; FLUX's 8x downsampling)
    cfg = FluxVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4)
    return FluxVAE(cfg).initialize_weights(0)


# ---------------------------------------------------------------------------------------------- guidance
def _cfg_loop(v, vt, vi, st, si, lo, kind):
    """The guidance of bagel.generate.guidance written out token by token (no broadcasting)."""
    if st <= 1:
        return v.clone()
    V = v.shape[0]

    def norm(x):
        return math.sqrt(sum(float(e) ** 2 for e in x))

    u = torch.stack([vt[i] + st * (v[i] - vt[i]) for i in range(V)])
    if kind == "text_channel":
        rows = []
        for i in range(V):
            r = min(max(norm(v[i]) / (norm(u[i]) + 1e-8), lo), 1.0)
            rows.append(u[i] * r)
        u = torch.stack(rows)
        return torch.stack([vi[i] + si * (u[i] - vi[i]) for i in range(V)]) if si > 1 else u
    w = torch.stack([vi[i] + si * (u[i] - vi[i]) for i in range(V)]) if si > 1 else u
    if kind == "global":
        r = min(max(norm(v.flatten()) / (norm(w.flatten()) + 1e-8), lo), 1.0)
        return w * r
    return torch.stack([w[i] * min(max(norm(v[i]) / (norm(w[i]) + 1e-8), lo), 1.0) for i in range(V)])


@pytest.mark.parametrize("kind", ["global", "channel", "text_channel"])
@pytest.mark.parametrize(
    "st,si,lo", [(4.0, 1.0, 0.0), (4.0, 2.0, 0.0), (3.0, 1.5, 0.7), (1.0, 2.0, 0.0), (0.5, 1.0, 0.0)]
)
def test_guidance_matches_hand_written(kind, st, si, lo):
    g = torch.Generator().manual_seed(3)
    v, vt, vi = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    vi = vi * 0.3  # norms that differ, so the clamps bite at both ends somewhere
    got = apply_cfg(v, vt, vi, st, si, lo, kind)
    torch.testing.assert_close(got, _cfg_loop(v, vt, vi, st, si, lo, kind), rtol=1e-12, atol=1e-12)


def test_guidance_renorm_bounds():
    g = torch.Generator().manual_seed(0)
    v, vt = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    out = apply_cfg(v, vt, None, 5.0, 1.0, 0.0, "channel")
    assert (out.norm(dim=-1) <= v.norm(dim=-1) * (1 + 1e-6)).all()  # never above the unguided norm
    assert torch.linalg.vector_norm(apply_cfg(v, vt, None, 5.0, 1.0, 0.0, "global")) <= v.norm() * (1 + 1e-6)


def test_guidance_interval_and_argument_checks():
    assert cfg_scales_at(0.5, 4.0, 2.0, (0.4, 1.0)) == (4.0, 2.0)
    assert cfg_scales_at(0.4, 4.0, 2.0, (0.4, 1.0)) == (1.0, 1.0)  # low end open, as upstream
    assert cfg_scales_at(1.0, 4.0, 2.0, (0.4, 1.0)) == (4.0, 2.0)
    for bad in (dict(cfg_renorm_type="local"), dict(cfg_interval=(0.5, 0.2)), dict(cfg_renorm_min=2.0)):
        args = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.0, 1.0), cfg_renorm_min=0.0)
        args.update(cfg_renorm_type="global")
        args.update(bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            check_cfg_args(**args)


# ---------------------------------------------------------------------------------------------- sampler
def test_timestep_schedule():
    t = timestep_schedule(6, 3.0)
    u = torch.linspace(1, 0, 6, dtype=torch.float64)
    torch.testing.assert_close(t, (3 * u / (1 + 2 * u)).float())
    assert t[0] == 1 and t[-1] == 0
    torch.testing.assert_close(timestep_schedule(5, 1.0), torch.linspace(1, 0, 5))
    with pytest.raises(ValueError, match="num_timesteps"):
        timestep_schedule(1, 1.0)


class _Oracle(nn.Module):
    """Stands in for llm2vae: the exact training velocity eps - x_0, whatever the hidden states."""

    def __init__(self, velocity: torch.Tensor):
        super().__init__()
        self.velocity = velocity

    def forward(self, h):
        reps = h.shape[0] // self.velocity.shape[0]
        return self.velocity.repeat(reps, 1).to(h.dtype)


def test_euler_inverts_the_training_noising():
    """With the training target as velocity (eps - x_0) the sampler started at eps lands on x_0, and
    every intermediate state it embeds is the training forward's x_t = (1 - t) x_0 + t eps."""
    m = _model(seed=1)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    m.model.llm2vae = _Oracle(eps - x0)
    seen = []
    embed = m.model.vae2llm
    m.model.vae2llm = nn.Sequential()  # identity: record what the sampler embeds
    m.model.vae2llm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    m.model.vae2llm.append(embed)
    ctx = Context(m).add_text([1, 2, 3])
    times_seen = []  # what the time embedder gets: the training forward's t, one per latent token
    m.model.time_embedder.register_forward_hook(lambda mod, inp, out: times_seen.append(inp[0].clone()))
    out = sample_latent_tokens(
        m, Branches(ctx), (2, 2), num_timesteps=5, timestep_shift=2.0, initial_noise=eps
    )
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    times = timestep_schedule(5, 2.0)
    assert len(seen) == 4
    for t, x, ts in zip(times[:-1], seen, times_seen, strict=True):
        torch.testing.assert_close(x, (1 - t) * x0 + t * eps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ts, torch.full((4,), float(t)))


def _t2i_branches(model, use_cache, backend="sdpa"):
    base = Context(model, use_cache=use_cache, backend=backend)
    text_uncond = base.fork()
    cond = base.add_text([5, 6, 7, 8, 9])
    return Branches(cond, text_uncond, cond)


def _edit_branches(model, use_cache, backend="sdpa"):
    g = torch.Generator().manual_seed(7)
    latent = torch.randn(4, 6, 4, generator=g)  # a 3x2 grid of latent tokens
    pixels = torch.rand(3, 12, 16, generator=g) * 2 - 1
    base = Context(model, use_cache=use_cache, backend=backend)
    img_uncond = base.fork().add_text([11, 12, 13])
    cond = base.add_vae_image(latent).add_vit_image(pixels)
    text_uncond = cond.fork()
    cond.add_text([11, 12, 13])
    return Branches(cond, text_uncond, img_uncond)


GUIDANCE = [
    dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_renorm_type="global"),
    dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_renorm_type="global", cfg_renorm_min=0.3),
    dict(cfg_text_scale=3.0, cfg_img_scale=2.0, cfg_renorm_type="channel"),
    dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_renorm_type="text_channel", cfg_interval=(0.3, 1.0)),
    dict(cfg_text_scale=1.0, cfg_img_scale=1.0),
]


@pytest.mark.parametrize("task", ["t2i", "edit"])
@pytest.mark.parametrize("guidance", GUIDANCE, ids=lambda g: "-".join(f"{v}" for v in g.values()))
def test_cached_equals_recompute(model, task, guidance):
    build = _t2i_branches if task == "t2i" else _edit_branches
    grid = (2, 3)
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(num_timesteps=4, timestep_shift=3.0, initial_noise=noise, cfg_interval=(0.0, 1.0))
    kw.update(guidance)
    cached = sample_latent_tokens(model, build(model, True), grid, **kw)
    recomputed = sample_latent_tokens(model, build(model, False), grid, **kw)
    torch.testing.assert_close(cached, recomputed, atol=ATOL, rtol=RTOL)
    assert cached.abs().max() > 0.1


def test_guidance_changes_the_result(model):
    """The branches are really different contexts: guidance on and off give different latents."""
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(num_timesteps=3, initial_noise=noise, cfg_interval=(0.0, 1.0))
    off = sample_latent_tokens(model, _edit_branches(model, True), (2, 3), cfg_text_scale=1.0, **kw)
    text = sample_latent_tokens(model, _edit_branches(model, True), (2, 3), cfg_text_scale=4.0, **kw)
    both = sample_latent_tokens(
        model, _edit_branches(model, True), (2, 3), cfg_text_scale=4.0, cfg_img_scale=2.0, **kw
    )
    assert (off - text).abs().max() > 1e-3 and (text - both).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["packed", "sdpa"])
def test_step_backends_agree(model, backend):
    """Every step backend against the recompute path (packed = bagel_kernels.packed_attention over
    [cache; chunk], on the CPU through its sdpa backend)."""
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(
        num_timesteps=3, initial_noise=noise, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)
    )
    ref = sample_latent_tokens(model, _edit_branches(model, False), (2, 3), **kw)
    got = sample_latent_tokens(model, _edit_branches(model, True, backend), (2, 3), **kw)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_packed_step_on_the_triton_kernel():
    """The "packed" step backend through bagel_kernels' Triton kernel (under the interpreter on a CPU):
    the GPU's default for a prefill onto an empty cache, and a choice for the steps."""
    from bagel import BagelBackendConfig

    m = _model(seed=5)
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(
        num_timesteps=2, initial_noise=noise, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)
    )
    ref = sample_latent_tokens(m, _edit_branches(m, True, "sdpa"), (2, 3), **kw)
    m.backend = BagelBackendConfig(attention="triton")
    got = sample_latent_tokens(m, _edit_branches(m, True, "packed"), (2, 3), **kw)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_mixed_chunk_prefill_matches_recompute(model):
    """One chunk holding a text, an image and a text (three splits) onto a non-empty cache, with the
    cache updated: the chunk's rows and the next step agree with the recompute path."""
    from bagel.generate.context import text_chunk, vit_chunk

    tok = SpecialTokens.for_config(model.config)
    outs = []
    for use_cache in (True, False):
        ctx = Context(model, use_cache=use_cache).add_text([3, 4])
        p = ctx.next_position
        parts = [
            text_chunk(model, tok, [5, 6], p),
            vit_chunk(model, tok, torch.linspace(-1, 1, 3 * 8 * 8).view(3, 8, 8), p + 4),
            text_chunk(model, tok, [7], p + 5),
        ]
        chunk = Chunk(
            torch.cat([c.embeds for c in parts]),
            torch.cat([c.positions for c in parts]),
            torch.cat([c.gen for c in parts]),
            [len(c) for c in parts],
            ["causal", "full", "causal"],
        )
        h1 = ctx.add_chunk(chunk, advance=8)
        h2 = ctx.add_chunk(text_chunk(model, tok, [9, 10], ctx.next_position), advance=4)
        outs.append((h1, h2))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_kv_cache_forks_and_growth(model):
    """Decoding token by token past the buffer's first capacity (5 + 64 rows) regrows it, and a fork never
    sees the other copy's later tokens (copy on write): each token's hidden state equals that of the
    same tokens as one causal chunk through the recompute path (one training forward)."""
    from bagel.generate.context import token_chunk

    cached = Context(model).add_text([1, 2, 3])  # positions 0..4
    fork = cached.fork()
    main_tokens, fork_tokens, main_h, fork_h = [], [], [], []
    for i in range(66):
        main_tokens.append(10 + i % 50)
        main_h.append(cached.add_chunk(token_chunk(model, main_tokens[-1], cached.next_position), advance=1))
        if i % 20 == 0:  # the fork continues differently
            fork_tokens.append(7 + i)
            fork_h.append(fork.add_chunk(token_chunk(model, fork_tokens[-1], fork.next_position), advance=1))
    assert cached.cache.num_tokens == 71 and fork.cache.num_tokens == 9
    for tokens, hidden in ((main_tokens, main_h), (fork_tokens, fork_h)):
        parts = [token_chunk(model, t, 5 + j) for j, t in enumerate(tokens)]
        run = Chunk(
            torch.cat([c.embeds for c in parts]),
            torch.cat([c.positions for c in parts]),
            torch.zeros(len(parts), dtype=torch.bool),
            [len(parts)],
            ["causal"],
        )
        ref = Context(model, use_cache=False).add_text([1, 2, 3]).add_chunk(run, advance=len(parts))
        torch.testing.assert_close(torch.cat(hidden), ref, atol=ATOL, rtol=RTOL)


def test_add_inputs_in_one_forward_equals_one_by_one(model):
    g = torch.Generator().manual_seed(7)
    latent, pixels = torch.randn(4, 6, 4, generator=g), torch.rand(3, 12, 16, generator=g) * 2 - 1
    items = [("text", [3, 4]), ("vae", latent), ("vit", pixels), ("text", [5, 6, 7])]
    one = Context(model).add_inputs(items)
    steps = Context(model)
    for kind, value in items:
        {"text": steps.add_text, "vae": steps.add_vae_image, "vit": steps.add_vit_image}[kind](value)
    assert one.next_position == steps.next_position == 4 + 1 + 1 + 5
    assert one.num_tokens == steps.num_tokens
    for i in range(len(model.model.language_model.model.layers)):
        for a, b in zip(one.cache.layer(i), steps.cache.layer(i), strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="kind"):
        Context(model).add_inputs([("audio", [1])])


def test_step_backend_choice(model):
    chunk = Chunk(torch.zeros(2, 64), torch.arange(2), torch.zeros(2, dtype=torch.bool), [2], ["causal"])
    cache = KVCache.empty(2)
    assert resolve_step_backend("auto", [chunk], [cache]) == "sdpa"  # CPU, no flash-attn
    with pytest.raises(ValueError, match="flash"):
        resolve_step_backend("flash", [chunk], [cache])
    with pytest.raises(ValueError, match="backend"):
        resolve_step_backend("fast", [chunk], [cache])
    with pytest.raises(ValueError, match="split_lens"):
        Chunk(torch.zeros(2, 64), torch.arange(2), torch.zeros(2, dtype=torch.bool), [3], ["causal"])
    with pytest.raises(ValueError, match="caches"):
        forward_cached(model, [chunk], [], update=False)


def test_seeded_and_explicit_noise(model, vae):
    gen = Generator(model, vae)
    kw = dict(height=32, width=48, num_timesteps=3, cfg_interval=(0.0, 1.0))
    a = gen.text_to_image([4, 5, 6], seed=3, **kw)
    b = gen.text_to_image([4, 5, 6], seed=3, **kw)
    c = gen.text_to_image([4, 5, 6], seed=4, **kw)
    assert torch.equal(a.latent, b.latent) and not torch.equal(a.latent, c.latent)
    assert a.image.shape == (3, 32, 48) and a.latent.shape == (4, 4, 6)
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))  # what seed=3 draws
    d = gen.text_to_image([4, 5, 6], initial_noise=noise, **kw)
    assert torch.equal(a.latent, d.latent)
    e = gen.text_to_image([4, 5, 6], initial_noise=a.latent * 0 + 1, **kw)  # the latent layout is accepted
    assert e.latent.shape == a.latent.shape
    with pytest.raises(ValueError, match="initial_noise"):
        gen.text_to_image([4, 5, 6], initial_noise=torch.zeros(5, 16), **kw)
    with pytest.raises(ValueError, match="height"):
        gen.text_to_image([4, 5, 6], height=40, width=48)


def test_edit_and_think_cached_equals_recompute(model, vae, tokenizer):
    assert len(tokenizer) == VOCAB
    image = torch.rand(3, 40, 20, generator=torch.Generator().manual_seed(5)) * 2 - 1
    kw = dict(num_timesteps=3, seed=0, cfg_interval=(0.0, 1.0), think=True, max_think_tokens=4)
    a = Generator(model, vae, tokenizer).edit(image, "make it brighter", **kw)
    b = Generator(model, vae, tokenizer, use_cache=False).edit(image, "make it brighter", **kw)
    torch.testing.assert_close(a.latent, b.latent, atol=ATOL, rtol=RTOL)
    assert a.thinking == b.thinking and a.thinking  # the plan the model wrote
    # resized to multiples of 16 within 128 (8 latent tokens): the short side raised to 64 (upstream's
    # max 1024 / min 512 rule, scaled), 40x20 -> 128x64
    assert a.image.shape[-2:] == (128, 64)
    c = Generator(model, vae, tokenizer).text_to_image("a photo", height=32, width=32, **{**kw, "seed": 1})
    d = Generator(model, vae, tokenizer, use_cache=False).text_to_image(
        "a photo", height=32, width=32, **{**kw, "seed": 1}
    )
    torch.testing.assert_close(c.latent, d.latent, atol=ATOL, rtol=RTOL)


def test_input_checks(model, vae):
    ctx = Context(model)
    with pytest.raises(ValueError, match="ViT image"):
        ctx.add_vit_image(torch.zeros(3, 10, 8))  # not a multiple of the patch size 4
    with pytest.raises(ValueError, match="ViT image"):
        ctx.add_vit_image(torch.zeros(3, 64, 8))  # beyond the 8x8 patch grid
    with pytest.raises(ValueError, match="VAE latent"):
        ctx.add_vae_image(torch.zeros(16, 4, 4))  # 16 channels, the model has 4
    with pytest.raises(ValueError, match="VAE latent"):
        ctx.add_vae_image(torch.zeros(4, 18, 4))  # 9 latent tokens > max_latent_size 8
    assert ctx.num_tokens == 0 and ctx.next_position == 0
    with pytest.raises(ValueError, match="vocabulary"):
        Generator(
            model, vae, special_tokens=SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=VOCAB)
        )
    with pytest.raises(ValueError, match="token ids"):
        Generator(model, vae).text_to_image([VOCAB + 5], height=32, width=32)


def test_stage1_refuses_to_draw(vae):
    m = _model(stage=1)
    with pytest.raises(ValueError, match="stage 1"):
        Generator(m, vae).text_to_image([1, 2], height=32, width=32, num_timesteps=2)
    with pytest.raises(ValueError, match="stage 1"):
        Generator(m, vae).edit(torch.zeros(3, 32, 32), [1, 2], num_timesteps=2)


# ---------------------------------------------------------------------------------------------- understanding
def _training_argmax(model, pixels, question, answer):
    """Per answer position, the label with the smallest training cross entropy (= the logits' argmax),
    from BagelForUnifiedMultimodal.forward on the packer's pack with every vocabulary id as a label."""
    segs = [Text(question), Text(answer, loss=True)]
    if pixels is not None:
        segs.insert(0, VitImage(pixels))
    batch = pack_samples([Sample(segs)], model.config)
    rows = batch["ce_loss_indexes"][: len(answer) + 1]  # bos a_1 ... a_n predict a_1 ... a_n, eos
    vocab = model.config.text_config.vocab_size
    batch["ce_loss_indexes"] = rows.repeat_interleave(vocab)
    batch["packed_label_ids"] = torch.arange(vocab).repeat(rows.numel())
    batch["ce_loss_weights"] = None
    with torch.no_grad():
        ce = model(**batch)["ce"].view(rows.numel(), vocab)
    return ce.argmin(dim=1).tolist()


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_tokens_are_training_argmax(stage, with_image):
    m = _model(stage=stage, seed=2)
    pixels = torch.rand(3, 12, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1 if with_image else None
    ctx = Context(m)
    if pixels is not None:
        ctx.add_vit_image(pixels)
    ctx.add_text([30, 31, 32])
    out = generate_text(ctx, max_new_tokens=8)
    eos = SpecialTokens.for_config(m.config).eos
    answer = out[:-1] if out[-1] == eos else out
    expected = _training_argmax(m, pixels, [30, 31, 32], answer)
    assert out == expected[: len(out)]
    assert ctx.num_tokens == 5 + (0 if pixels is None else 14)  # the caller's context is not extended


class _Head(nn.Module):
    """Stands in for lm_head: logits favouring one token."""

    def __init__(self, vocab, token):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, h):
        out = torch.zeros(h.shape[0], self.vocab, dtype=h.dtype)
        out[:, self.token] = 10.0
        return out


def test_stop_on_end_token_and_max_length():
    m = _model(seed=3)
    eos = SpecialTokens.for_config(m.config).eos
    m.model.language_model.lm_head = _Head(m.config.text_config.vocab_size, eos)
    assert generate_text(Context(m).add_text([1, 2]), max_new_tokens=5) == [eos]
    m.model.language_model.lm_head = _Head(m.config.text_config.vocab_size, 7)
    assert generate_text(Context(m).add_text([1, 2]), max_new_tokens=5) == [7] * 5
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text(Context(m), max_new_tokens=0)


def test_sampling_temperature_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    g = torch.Generator().manual_seed(0)
    draws = [pick_token(logits, do_sample=True, top_p=0.7, generator=g) for _ in range(300)]
    probs = torch.softmax(logits, 0)
    nucleus = {0, 1}  # 0.61 < 0.7 <= 0.61 + 0.22: the two most likely tokens
    assert probs[0] < 0.7 <= probs[0] + probs[1]
    assert set(draws) == nucleus
    frac = draws.count(0) / len(draws)
    assert abs(frac - float(probs[0] / (probs[0] + probs[1]))) < 0.08
    assert pick_token(logits, do_sample=True, top_p=1e-6, generator=g) == 0  # top_p -> greedy
    cold = [pick_token(logits, do_sample=True, temperature=0.05, generator=g) for _ in range(20)]
    assert set(cold) == {0}
    assert pick_token(logits, do_sample=False) == 0
    m = _model(seed=4)
    ctx = Context(m).add_text([1, 2, 3])
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5)
    a = generate_text(ctx, generator=torch.Generator().manual_seed(9), **kw)
    b = generate_text(ctx, generator=torch.Generator().manual_seed(9), **kw)
    assert a == b


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "sdpa", "packed"])
def test_cached_equals_recompute_cuda_bf16(backend):
    """On a GPU in bf16: every step backend (packed = our Triton kernel) against the recompute path."""
    m = _model(seed=5).to("cuda", torch.bfloat16)
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(
        num_timesteps=4, initial_noise=noise, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)
    )
    ref = sample_latent_tokens(m, _edit_branches(m, False), (2, 3), **kw)
    got = sample_latent_tokens(m, _edit_branches(m, True, backend), (2, 3), **kw)
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0.05)  # bf16 activations through 2 layers, 3 steps


def test_save_samples_for_a_training_runner(model, vae, tmp_path):
    import json

    model.train()
    gen = Generator(model, vae)
    image = torch.zeros(3, 32, 32)
    files = gen.save_samples([[4, 5], (image, [6, 7])], tmp_path, 100, num_timesteps=2, height=32, width=32)
    assert model.training  # back in the mode it was in
    model.eval()
    assert [os.path.basename(f) for f in files] == ["step00000100_00.png", "step00000100_01.png"]
    assert all(os.path.isfile(f) for f in files) and not [
        f for f in os.listdir(files[0].rsplit("/", 1)[0]) if "tmp" in f
    ]
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["index"], r["prompt"]) for r in records] == [(100, 0, [4, 5]), (100, 1, [6, 7])]
    # the same seed per index at every step: the same image from the same weights
    again = gen.save_samples([[4, 5]], tmp_path, 200, num_timesteps=2, height=32, width=32)
    from PIL import Image

    assert Image.open(again[0]).tobytes() == Image.open(files[0]).tobytes()


def test_moe_layers_and_module_hooks():
    """Qwen2MoEDecoderLayer (only the MLP routed) runs the same cached and recomputed; a forward hook on
    a generation-expert module (what a LoRA adapter or a quantised linear looks like to the model) acts
    in the cached path exactly as in the training forward."""
    cfg = BagelConfig.tiny(layer_module="Qwen2MoEDecoderLayer", vocab_size=VOCAB, max_latent_size=8)
    m = BagelForUnifiedMultimodal(cfg).eval()
    randomize_(m, 6)
    noise = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(num_timesteps=3, initial_noise=noise, cfg_text_scale=3.0, cfg_interval=(0.0, 1.0))
    plain = sample_latent_tokens(m, _t2i_branches(m, True), (2, 3), **kw)
    torch.testing.assert_close(
        plain, sample_latent_tokens(m, _t2i_branches(m, False), (2, 3), **kw), atol=ATOL, rtol=RTOL
    )
    mlp = m.model.language_model.model.layers[0].mlp_moe_gen
    handle = mlp.register_forward_hook(lambda mod, inp, out: out * 0.5)
    try:
        hooked = sample_latent_tokens(m, _t2i_branches(m, True), (2, 3), **kw)
        ref = sample_latent_tokens(m, _t2i_branches(m, False), (2, 3), **kw)
    finally:
        handle.remove()
    torch.testing.assert_close(hooked, ref, atol=ATOL, rtol=RTOL)
    assert (hooked - plain).abs().max() > 1e-4


def test_fsdp2_sharded_model_samples_like_the_plain_one(model, vae, tmp_path):
    """A model sharded with bagel.train.distributed.apply_fsdp2 (one process, gloo): the Generator
    gathers the units, draws the same latents as the unsharded model, and leaves them sharded."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from bagel.train.distributed import apply_fsdp2, free_port

    sharded = _model()
    sharded.load_state_dict(model.state_dict())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        apply_fsdp2(sharded, activation_checkpointing=False)
        assert any(isinstance(m, FSDPModule) for m in sharded.modules())
        kw = dict(height=32, width=48, num_timesteps=3, cfg_interval=(0.0, 1.0), seed=5)
        got = Generator(sharded, vae).text_to_image([4, 5, 6], **kw)
        assert isinstance(sharded.model.vae2llm.weight, DTensor)  # resharded after
        files = Generator(sharded, vae).save_samples([[4, 5, 6]], tmp_path, 1, **kw | {"seed": 0})
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got.latent, Generator(model, vae).text_to_image([4, 5, 6], **kw).latent)
    assert len(files) == 1

"""BagelForUnifiedMultimodal: the SigLIP-NaViT tower against HF SigLIP, the forward against a transcription
of upstream BAGEL's ``Bagel.forward``, every backend combination against the all-reference model (ce, mse
and every parameter gradient), nested masks vs splits vs padding, stages, initialisation, bad inputs.

Tolerances (fp32 on CPU, tiny model):
- forward outputs (ce, mse): ``bagel_kernels.testing.tolerance("float32", "fwd")`` (blocked-softmax and
  kernel reassociation noise, measured ~1e-6 here).
- gradients: per tensor, ``max|g - g_ref| <= GRAD_RTOL * max|g_ref| + GRAD_FLOOR * G`` with G the largest
  gradient in the model. GRAD_RTOL = 1e-4 is ~100x the measured fp32 reassociation error (~5e-7
  relative); the floor covers gradients that are exactly zero in exact arithmetic (SigLIP's k_proj.bias:
  softmax is invariant to a per-query constant) and are pure rounding noise (~1e-9).
"""

import os

import numpy as np
import pytest
import torch
from model_helpers import randomize_
from torch import nn

from bagel import (
    BagelBackendConfig,
    BagelConfig,
    BagelForUnifiedMultimodal,
    BagelModel,
    Qwen2ForCausalLMReference,
    T2ISample,
    pack_samples,
    synthetic_samples,
)
from bagel.model.embeddings import get_2d_sincos_pos_embed
from bagel.model.modeling import (
    convert_patch_embedding_for_packed_vit,
    prepare_config_for_stage,
    stage_to_int,
)
from bagel.model.siglip import SiglipVisionEmbeddings, vit_rope_cos_sin
from bagel_kernels.reference import dense_mask_from_rule, patchify
from bagel_kernels.testing import tolerance

FWD_ATOL, FWD_RTOL = tolerance("float32", "fwd")
GRAD_RTOL, GRAD_FLOOR = 1e-4, 1e-6
REF = BagelBackendConfig.reference()


def reference_model(cfg: BagelConfig | None = None, seed: int = 0) -> BagelForUnifiedMultimodal:
    """All-reference model (SDPA attention, torch MoT ops, torch patch embedding, gather/scatter LM)
    with every trainable weight random (llm2vae too, so the MSE reaches every layer)."""
    cfg = BagelConfig.tiny() if cfg is None else cfg
    model = BagelForUnifiedMultimodal(cfg, backend=REF, language_model_cls=Qwen2ForCausalLMReference)
    randomize_(model, seed)
    return model


def run(model: nn.Module, batch: dict, noise_seed: int = 1):
    """Forward + backward of ``ce.mean() + mse.mean()`` with a fixed noise draw; (outputs, grads)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(noise_seed)
    out = model(**batch)
    loss = sum(v.float().mean() for v in out.values() if v is not None)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_grads_close(grads: dict, ref: dict, rtol: float = GRAD_RTOL, floor: float = GRAD_FLOOR) -> None:
    assert set(grads) == set(ref), set(grads) ^ set(ref)
    G = max(g.abs().max().item() for g in ref.values())
    for name, g0 in ref.items():
        err = (grads[name].float() - g0.float()).abs().max().item()
        bound = rtol * g0.abs().max().item() + floor * G
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def assert_out_close(out: dict, ref: dict, atol: float = FWD_ATOL, rtol: float = FWD_RTOL) -> None:
    for key in ("ce", "mse"):
        if ref[key] is None:
            assert out[key] is None
        else:
            torch.testing.assert_close(out[key].float(), ref[key].float(), atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def stage2_batch():
    cfg = BagelConfig.tiny()
    samples = synthetic_samples(["und", "t2i", "edit", "text"], cfg, seed=0)
    return pack_samples(samples, cfg, max_num_tokens=160, rng=0)


@pytest.fixture(scope="module")
def stage2_reference(stage2_batch):
    model = reference_model()
    out, grads = run(model, stage2_batch)
    return model.state_dict(), out, grads


# ---------------------------------------------------------------------------------------------- pieces
def test_sincos_table_matches_upstream():
    """Transcription of upstream's get_2d_sincos_pos_embed (meshgrid with w first)."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, n = 32, 5
    grid = np.stack(np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32)), axis=0)
    expected = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(dim, n), expected, rtol=1e-12, atol=1e-12)


def test_vit_rope_tables_match_upstream():
    """Transcription of upstream's RotaryEmbedding2D tables, indexed by flattened ids."""
    head_dim, side = 24, 6
    dim = head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    gh = torch.arange(side).float()[:, None].repeat(1, side)
    gw = torch.arange(side).float()[None, :].repeat(side, 1)
    tables = []
    for grid in (gh, gw):
        f = grid[..., None] * inv_freq[None, None, :]
        emb = torch.cat([f, f], dim=-1).flatten(0, 1)
        tables += [emb.cos(), emb.sin()]
    ids = torch.tensor([0, 5, 7, 13, 35, 20])
    ours = vit_rope_cos_sin(ids, head_dim, side, torch.float32)
    for a, b in zip(ours, tables, strict=True):
        torch.testing.assert_close(a, b[ids], atol=0, rtol=0)


def test_conv_to_linear_patch_embedding():
    cfg = BagelConfig.tiny().vision_config
    emb = SiglipVisionEmbeddings(cfg)
    img = torch.randn(1, 3, 8, 12)
    conv_out = emb.patch_embedding(img)[0].flatten(1).T  # [n_patches, E], row-major over the grid
    emb.convert_conv2d_to_linear()
    assert isinstance(emb.patch_embedding, nn.Linear) and emb.patch_embedding.weight.shape == (48, 3 * 4 * 4)
    lin_out = emb.patch_embedding(patchify(img[0], 4))
    torch.testing.assert_close(lin_out, conv_out, atol=1e-5, rtol=1e-5)
    model = reference_model()
    w = model.model.vit_model.vision_model.embeddings.patch_embedding.weight.clone()
    convert_patch_embedding_for_packed_vit(model.model, model.config)  # already Linear: no-op
    assert torch.equal(model.model.vit_model.vision_model.embeddings.patch_embedding.weight, w)


def test_siglip_tower_matches_hf():
    """Our packed tower (2 images in one pack, vit_select_layer=-2) vs HF SigLIP run per image, taking
    hidden_states[-2] and post_layernorm as upstream BAGEL's truncated tower does."""
    from transformers import SiglipVisionModel as HFSiglip

    cfg = BagelConfig.tiny()
    model = reference_model(cfg)
    vc = cfg.vision_config.to_dict()
    vc.pop("rope", None)
    vc.update(vision_use_head=False)
    hf_cfg = type(cfg.vision_config)(
        **{k: v for k, v in vc.items() if k not in ("model_type", "transformers_version")}
    )
    hf_cfg._attn_implementation = "eager"
    hf = HFSiglip(hf_cfg).eval()
    ours = {k.removeprefix("vision_model."): v for k, v in model.model.vit_model.state_dict().items()}
    E, p = cfg.vision_config.hidden_size, cfg.vision_config.patch_size
    ours["embeddings.patch_embedding.weight"] = (
        ours["embeddings.patch_embedding.weight"].reshape(E, p, p, 3).permute(0, 3, 1, 2)
    )
    hf_sd = hf.state_dict()
    mapped = {
        k: ours[k.removeprefix("vision_model.")] for k in hf_sd if k.removeprefix("vision_model.") in ours
    }
    missing = [k for k in hf_sd if k not in mapped and "encoder.layers.2." not in k]
    assert not missing, missing
    hf.load_state_dict(mapped, strict=False)
    imgs = [torch.randn(3, 32, 32), torch.randn(3, 32, 32)]  # full 8x8 grids: HF's position ids = ours
    tokens = torch.cat([patchify(x, p) for x in imgs])
    ids = torch.arange(64).repeat(2)
    with torch.no_grad():
        got = model.model.vit_model(tokens, ids, vit_token_seqlens=[64, 64])
        post = hf.post_layernorm if hasattr(hf, "post_layernorm") else hf.vision_model.post_layernorm
        for i, x in enumerate(imgs):
            hs = hf(x[None], output_hidden_states=True).hidden_states
            torch.testing.assert_close(got[64 * i : 64 * (i + 1)], post(hs[-2])[0], atol=2e-5, rtol=2e-5)


def upstream_forward(model: BagelForUnifiedMultimodal, b: dict) -> dict:
    """Transcription of upstream BAGEL's ``Bagel.forward`` (modeling/bagel/bagel.py) over our modules,
    with per-sample dense masks (upstream's non-flex path) and the gather/scatter reference LM."""
    lm = model.model.language_model
    seq = lm.model.embed_tokens(b["packed_text_ids"])
    packed = seq.new_zeros(b["sequence_length"], model.hidden_size)
    packed[b["packed_text_indexes"]] = seq
    feats = model.model.vit_model(
        b["packed_vit_tokens"], b["packed_vit_position_ids"], b["vit_token_seqlens"]
    )
    packed[b["packed_vit_token_indexes"]] = model.model.connector(feats) + model.model.vit_pos_embed(
        b["packed_vit_position_ids"]
    )
    p = model.latent_patch_size
    lat = []
    for latent, (h, w) in zip(b["padded_latent"], b["patchified_vae_latent_shapes"], strict=True):
        lat.append(patchify(latent[:, : h * p, : w * p], p))  # upstream's patchify, BAGEL's order
    clean = torch.cat(lat, dim=0)
    noise = torch.randn_like(clean)
    t = torch.sigmoid(b["packed_timesteps"])
    t = model.timestep_shift * t / (1 + (model.timestep_shift - 1) * t)
    x = (1 - t[:, None]) * clean + t[:, None] * noise
    packed[b["packed_vae_token_indexes"]] = (
        model.model.vae2llm(x)
        + model.model.time_embedder(t)
        + model.model.latent_pos_embed(b["packed_latent_position_ids"])
    )
    sl = b["sample_lens"]
    rule = dense_mask_from_rule(sl, b["split_lens"], b["attn_modes"])  # the rule, written independently
    masks, s = [], 0
    for n in sl:
        masks.append(torch.zeros(n, n).masked_fill(~rule[s : s + n, s : s + n], float("-inf")))
        s += n
    und = torch.cat([b["packed_text_indexes"], b["packed_vit_token_indexes"]])
    hidden = lm.forward_train(packed, sl, masks, b["packed_position_ids"], und, b["packed_vae_token_indexes"])
    preds = model.model.llm2vae(hidden[b["mse_loss_indexes"]])
    mse = (preds - (noise - clean)[t > 0]) ** 2
    ce = nn.functional.cross_entropy(
        lm.lm_head(hidden[b["ce_loss_indexes"]]), b["packed_label_ids"], reduction="none"
    )
    return dict(ce=ce, mse=mse)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_forward_matches_upstream_transcription(stage2_batch, shift):
    model = reference_model(BagelConfig.tiny(timestep_shift=shift))
    torch.manual_seed(3)
    got = model(**stage2_batch)
    torch.manual_seed(3)
    want = upstream_forward(model, stage2_batch)
    assert got["ce"].shape == (stage2_batch["ce_loss_indexes"].numel(),)
    assert got["mse"].shape == (stage2_batch["mse_loss_indexes"].numel(), model.patch_latent_dim)
    assert_out_close(got, want, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- backends
COMBOS = [(a, m, p) for a in ("sdpa", "triton") for m in ("torch", "triton") for p in ("torch", "auto")]
COMBOS.append(("sdpa", "torch", "cpu_ext"))  # the extension's C++ CPU kernel, named (auto takes torch on CPU)


@pytest.mark.parametrize("attention,mot,patch_embed", COMBOS)
def test_backend_combination_matches_reference(stage2_batch, stage2_reference, attention, mot, patch_embed):
    """The grouped-routing model on (attention, mot, patch_embed) kernels vs the all-reference model:
    ce, mse and the gradient of every parameter (patch_embed "auto": the torch path on CPU, the CUDA
    extension on GPUs when built)."""
    if (
        "triton" in (attention, mot)
        and not torch.cuda.is_available()
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    if patch_embed == "cpu_ext":
        from bagel_kernels import patch_embed as pe

        if not pe.extension_status().cpu:
            pytest.skip(f"extension CPU kernel absent: {pe.extension_status().reason}")
    state, ref_out, ref_grads = stage2_reference
    model = BagelForUnifiedMultimodal(
        BagelConfig.tiny(), backend=BagelBackendConfig(attention, mot, patch_embed)
    )
    model.load_state_dict(state)
    out, grads = run(model, stage2_batch)
    assert_out_close(out, ref_out)
    assert_grads_close(grads, ref_grads)
    if patch_embed == "auto":  # the fastest correct path: torch on CPU (the extension's CPU kernel is slower)
        from bagel_kernels import patch_embed as pe

        assert pe.last_backend()[0] == "torch", pe.last_backend()
    if patch_embed == "cpu_ext":
        from bagel_kernels import patch_embed as pe

        assert pe.last_backend()[0] == "cpu_ext", pe.last_backend()


def test_reference_lm_and_grouped_lm_same_parameters():
    a = BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=REF)
    b = reference_model()
    assert list(a.state_dict()) == list(b.state_dict())


# ---------------------------------------------------------------------------------------------- masks / padding
def test_nested_masks_splits_and_padding_agree():
    cfg = BagelConfig.tiny()
    model = reference_model(cfg)
    samples = synthetic_samples(["edit", "und", "t2i"], cfg, seed=5)
    splits = pack_samples(samples, cfg, rng=1)
    nested = pack_samples(samples, cfg, rng=1, mask_format="nested")
    padded = pack_samples(samples, cfg, rng=1, max_num_tokens=splits["sequence_length"] + 37)
    assert "split_lens" not in nested and sum(padded["sample_lens"]) > padded["sequence_length"]
    o0, g0 = run(model, splits)
    for batch in (nested, padded):
        out, grads = run(model, batch)
        assert_out_close(out, o0, atol=1e-6, rtol=1e-6)
        assert_grads_close(grads, g0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- stages
def test_stage1_model_understanding_only():
    cfg = BagelConfig.tiny(stage="stage1")
    model = BagelForUnifiedMultimodal(cfg, backend=REF, language_model_cls=Qwen2ForCausalLMReference)
    assert not cfg.visual_gen and cfg.text_config.layer_module == "Qwen2DecoderLayer"
    names = [n for n, _ in model.model.named_parameters()]  # checkpoint names
    assert not any(
        "moe_gen" in n or n.split(".")[0] in ("time_embedder", "vae2llm", "llm2vae") for n in names
    )
    randomize_(model, 0)
    batch = pack_samples(synthetic_samples(["und", "text", "und"], cfg, seed=2), cfg, max_num_tokens=120)
    out, grads = run(model, batch)
    assert out["mse"] is None and out["ce"].shape == (batch["ce_loss_indexes"].numel(),)
    assert (
        torch.isfinite(out["ce"]).all()
        and grads["model.vit_model.vision_model.post_layernorm.weight"].abs().sum() > 0
    )
    gen = pack_samples([T2ISample([1, 2], torch.randn(4, 4, 4))], BagelConfig.tiny(), rng=0)
    with pytest.raises(ValueError, match="stage 1"):
        model(**gen)


def test_stage2_understanding_only_pack():
    model = reference_model()
    cfg = model.config
    batch = pack_samples(synthetic_samples(["und", "text"], cfg, seed=3), cfg)
    out = model(**batch)
    assert out["mse"] is None and out["ce"] is not None


def test_stage_helpers():
    assert [stage_to_int(s) for s in (1, 2, "1", "stage2", "Stage1", " STAGE2 ")] == [1, 2, 1, 2, 1, 2]
    for bad in (0, 3, "stage3", "gen", None, True, 1.0):
        with pytest.raises(ValueError, match="stage"):
            stage_to_int(bad)
    cfg = BagelConfig.tiny(stage=2, layer_module="Qwen2DecoderLayer")
    prepare_config_for_stage(cfg)
    assert cfg.visual_gen and cfg.text_config.layer_module == "Qwen2MoTDecoderLayer"
    cfg = BagelConfig.tiny(stage=2, layer_module="Qwen2MoEDecoderLayer")
    prepare_config_for_stage(cfg)
    assert cfg.text_config.layer_module == "Qwen2MoEDecoderLayer"
    n = cfg.vision_config.num_hidden_layers
    prepare_config_for_stage(cfg)  # idempotent; vit_select_layer is never folded into the config
    assert cfg.vision_config.num_hidden_layers == n and cfg.vit_num_layers == n - 1
    with pytest.raises(ValueError, match="stage"):
        BagelForUnifiedMultimodal(BagelConfig.tiny(stage="stage3"))


# ---------------------------------------------------------------------------------------------- init / accessors
def test_initialize_weights_after_meta_materialisation(stage2_batch):
    cfg = BagelConfig.tiny()
    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(cfg, backend=REF, language_model_cls=Qwen2ForCausalLMReference)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan"))  # whatever initialize_weights leaves untouched shows up
    torch.manual_seed(0)
    model.initialize_weights()
    assert all(torch.isfinite(t).all() for t in list(model.parameters()) + list(model.buffers()))
    fresh = BagelForUnifiedMultimodal(
        BagelConfig.tiny(), backend=REF, language_model_cls=Qwen2ForCausalLMReference
    )
    for name in ("model.vit_pos_embed.pos_embed", "model.latent_pos_embed.pos_embed"):
        assert torch.equal(model.state_dict()[name], fresh.state_dict()[name])
    assert model.model.llm2vae.weight.abs().sum() == 0 and model.model.llm2vae.bias.abs().sum() == 0
    assert torch.equal(
        model.model.language_model.model.rotary_emb.inv_freq,
        fresh.model.language_model.model.rotary_emb.inv_freq,
    )
    assert (model.model.language_model.model.layers[0].input_layernorm.weight == 1).all()
    std = model.model.language_model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - cfg.text_config.initializer_range) < 0.005
    torch.manual_seed(1)
    out = model(**stage2_batch)
    assert torch.isfinite(out["ce"]).all() and torch.isfinite(out["mse"]).all()
    torch.manual_seed(0)
    model2 = BagelForUnifiedMultimodal(cfg, backend=REF, language_model_cls=Qwen2ForCausalLMReference)
    torch.manual_seed(0)
    model2.initialize_weights()
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True)
    )


def test_accessors_and_backend_setter():
    model = reference_model()
    assert model.get_input_embeddings() is model.model.language_model.model.embed_tokens
    assert model.get_output_embeddings() is model.model.language_model.lm_head
    # the documented container: an nn.Module holding the BagelModel, whose keys are the checkpoint's
    assert isinstance(model.model, BagelModel) and not isinstance(model, BagelModel)
    assert type(model).__mro__[1] is nn.Module
    assert {k.removeprefix("model.") for k in model.state_dict()} == set(model.model.state_dict())
    assert all(k.startswith("model.") for k in model.state_dict())
    assert BagelForUnifiedMultimodal.supports_config(model.config)
    assert BagelForUnifiedMultimodal.supports_config({"model_type": "bagel"})
    assert not BagelForUnifiedMultimodal.supports_config(model.config.text_config)
    be = BagelBackendConfig(attention="sdpa", mot="torch", patch_embed="torch", deterministic=True)
    model.backend = be
    assert model.model.language_model.backend is be and model.model.vit_model.backend is be
    with pytest.raises(ValueError, match="backend"):
        model.backend = "sdpa"
    with pytest.raises(ValueError, match="config"):
        BagelForUnifiedMultimodal(model.config.to_dict())


def test_vit_select_layer_builds_that_many_layers():
    for sel, n in ((-2, 2), (-1, 3), (1, 1), (3, 3)):
        cfg = BagelConfig.tiny(vit_select_layer=sel)
        model = BagelForUnifiedMultimodal(cfg, backend=REF, language_model_cls=Qwen2ForCausalLMReference)
        assert len(model.model.vit_model.vision_model.encoder.layers) == n
    for sel in (0, -5, 4):
        with pytest.raises(ValueError, match="vit_select_layer"):
            BagelConfig.tiny(vit_select_layer=sel)


def test_vit_rope_variant_runs():
    cfg = BagelConfig.tiny(vit_rope=True)
    model = reference_model(cfg)
    assert not hasattr(model.model.vit_model.vision_model.embeddings, "position_embedding")
    assert not any("rope" in k for k in model.state_dict())
    batch = pack_samples(synthetic_samples(["und", "edit"], cfg, seed=4), cfg, rng=0)
    out, grads = run(model, batch)
    assert (
        torch.isfinite(out["ce"]).all()
        and grads["model.vit_model.vision_model.encoder.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    )


# ---------------------------------------------------------------------------------------------- determinism
DETERMINISTIC = [
    pytest.param("reference", "sdpa", "torch", id="reference"),
    pytest.param("grouped", "sdpa", "torch", id="sdpa-torch"),
    pytest.param("grouped", "triton", "triton", id="triton-triton", marks=pytest.mark.slow),  # ~5-9 s on CPU
]


def _assert_bit_identical_runs(model: nn.Module, batch: dict) -> tuple[dict, dict]:
    o1, g1 = run(model, batch)
    o2, g2 = run(model, batch)
    assert g1 and set(g1) == set(g2)
    for key in ("ce", "mse"):
        assert torch.equal(o1[key], o2[key]), key
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"{name}: the backward is not bit-reproducible"
    return o1, g1


@pytest.mark.parametrize("lm,attention,mot", DETERMINISTIC)
def test_deterministic_backward_is_bit_identical(lm, attention, mot):
    """``deterministic=True``: a forward + backward repeated on the same pack gives bit-identical losses
    and gradients of every parameter, on every backend that runs a backward on CPU (FlexAttention has
    none there; the GPU variant below covers it). A small pack with every token kind: the interpreted
    Triton kernels cost per token."""
    if (
        "triton" in (attention, mot)
        and not torch.cuda.is_available()
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    be = BagelBackendConfig(attention=attention, mot=mot, patch_embed="auto", deterministic=True)
    lm_cls = Qwen2ForCausalLMReference if lm == "reference" else None
    cfg = BagelConfig.tiny()
    model = BagelForUnifiedMultimodal(cfg, backend=be, language_model_cls=lm_cls)
    randomize_(model, 0)
    batch = pack_samples(synthetic_samples(["und", "edit"], cfg, seed=2), cfg, rng=0)  # 58 tokens
    assert all(batch[k].numel() for k in ("packed_vit_tokens", "mse_loss_indexes", "ce_loss_indexes"))
    out, grads = _assert_bit_identical_runs(model, batch)
    model.backend = BagelBackendConfig(attention=attention, mot=mot, patch_embed="auto", deterministic=False)
    ref_out, ref_grads = run(model, batch)  # what deterministic=True computes is the same function
    assert_out_close(out, ref_out)
    assert_grads_close(grads, ref_grads)


def _gpu_bf16_batch(cfg: BagelConfig) -> dict:
    """A ~1.5k-token pack of every sample kind on CUDA, latents in bf16."""
    samples = synthetic_samples(
        ["und", "t2i", "edit", "und", "t2i", "text"] * 2,
        cfg,
        seed=0,
        text_len=(8, 64),
        vit_side=(4, 16),
        latent_side=(4, 16),
    )
    batch = pack_samples(samples, cfg, rng=0, device="cuda")
    batch["padded_latent"] = batch["padded_latent"].to(torch.bfloat16)
    return batch


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lm,attention,mot",
    DETERMINISTIC
    + [
        pytest.param("grouped", "sdpa", "triton", id="sdpa-triton"),
        pytest.param("grouped", "flex", "torch", id="flex-torch"),
    ],
)
def test_gpu_deterministic_backward_is_bit_identical(lm, attention, mot):
    """The CUDA variant, with bf16 weights on a ~1.5k-token pack (atomics, where a kernel used them,
    would show as differing low bits)."""
    cfg = BagelConfig.tiny(llm_hidden=256, llm_heads=4, llm_kv_heads=2, vit_grid=16, max_latent_size=16)
    be = BagelBackendConfig(attention=attention, mot=mot, patch_embed="auto", deterministic=True)
    lm_cls = Qwen2ForCausalLMReference if lm == "reference" else None
    model = BagelForUnifiedMultimodal(cfg, backend=be, language_model_cls=lm_cls)
    randomize_(model, 0)
    model = model.cuda().to(torch.bfloat16)
    batch = _gpu_bf16_batch(cfg)
    _assert_bit_identical_runs(model, batch)


# ---------------------------------------------------------------------------------------------- checkpoint keys
def test_upstream_vit_rope_buffers_are_reported_not_errors(tmp_path):
    """Upstream checkpoints trained with ViT RoPE carry ``vit_model.vision_model.rope.{cos,sin}_{h,w}``
    (persistent buffers of its RotaryEmbedding2D): loading with strict=True reports them as recomputed
    (the model computes those tables from the patch positions) and loads everything else."""
    from bagel.io.checkpoint import save_checkpoint

    cfg = BagelConfig.tiny(vit_rope=True)
    model = reference_model(cfg)
    side, dim = (
        cfg.vit_max_num_patch_per_side,
        cfg.vision_config.hidden_size // cfg.vision_config.num_attention_heads,
    )
    tables = vit_rope_cos_sin(torch.arange(side * side), dim, side, torch.float32)
    rope = {
        f"vit_model.vision_model.rope.{name}": t
        for name, t in zip(("cos_h", "sin_h", "cos_w", "sin_w"), tables, strict=True)
    }
    save_checkpoint(model, tmp_path, config=model.config, extra_tensors=rope)
    back = BagelForUnifiedMultimodal.from_pretrained(
        tmp_path, stage=2, strict=True, backend=REF, language_model_cls=Qwen2ForCausalLMReference
    )
    r = back.load_report
    assert sorted(r.recomputed) == sorted(rope) and not r.unexpected and not r.missing
    assert "recomputed 4" in r.summary()
    for k, v in model.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k
    batch = pack_samples(synthetic_samples(["und"], cfg, seed=1), cfg, rng=0)
    torch.manual_seed(0)
    a = model(**batch)
    torch.manual_seed(0)
    b = back(**batch)
    assert torch.equal(a["ce"], b["ce"])


# ---------------------------------------------------------------------------------------------- bad inputs
def _mutations(b: dict) -> list[tuple[str, dict, str]]:
    L = b["sequence_length"]
    t = b["packed_text_indexes"].clone()
    t[0] = b["packed_vit_token_indexes"][0]
    out = [
        ("overlap", dict(packed_text_indexes=t), "partition"),
        (
            "gap",
            dict(
                packed_text_indexes=b["packed_text_indexes"][:-1], packed_text_ids=b["packed_text_ids"][:-1]
            ),
            "partition",
        ),
        ("out of range", dict(packed_vae_token_indexes=b["packed_vae_token_indexes"] + L), "outside"),
        (
            "sample_lens short",
            dict(sample_lens=[L - 1], split_lens=[L - 1], attn_modes=["causal"]),
            "sum\\(sample_lens\\)",
        ),
        ("missing stage-2 input", dict(packed_timesteps=None), "packed_timesteps"),
        ("missing vit input", dict(vit_token_seqlens=None), "vit_token_seqlens"),
        ("no mask", dict(split_lens=None), "split_lens"),
        ("vit token width", dict(packed_vit_tokens=b["packed_vit_tokens"][:, :-1]), "packed_vit_tokens"),
        ("vit seqlens", dict(vit_token_seqlens=b["vit_token_seqlens"] + 1), "vit_token_seqlens"),
        ("latent channels", dict(padded_latent=b["padded_latent"][:, :3]), "padded_latent"),
        (
            "latent shapes",
            dict(patchified_vae_latent_shapes=[(99, 1)] * len(b["patchified_vae_latent_shapes"])),
            "patchified_vae_latent_shapes",
        ),
        ("timesteps count", dict(packed_timesteps=b["packed_timesteps"][:-1]), "packed_timesteps"),
        ("float indexes", dict(packed_text_indexes=b["packed_text_indexes"].float()), "packed_text_indexes"),
        ("token id", dict(packed_text_ids=b["packed_text_ids"] + 1000), "packed_text_ids"),
        ("labels without indexes", dict(packed_label_ids=None), "packed_label_ids"),
        ("label count", dict(packed_label_ids=b["packed_label_ids"][:-1]), "packed_label_ids"),
        ("label range", dict(packed_label_ids=b["packed_label_ids"] + 1000), "packed_label_ids"),
        ("mse order", dict(mse_loss_indexes=b["mse_loss_indexes"].flip(0)), "mse_loss_indexes"),
        ("mse count", dict(mse_loss_indexes=b["mse_loss_indexes"][:-1]), "mse_loss_indexes"),
        (
            "mse clean tokens",
            dict(mse_loss_indexes=b["packed_vae_token_indexes"][: b["mse_loss_indexes"].numel()]),
            "mse_loss_indexes",
        ),
        (
            "mse text tokens",
            dict(mse_loss_indexes=b["packed_text_indexes"][: b["mse_loss_indexes"].numel()]),
            "mse_loss_indexes",
        ),
        (
            "vit position ids",
            dict(packed_vit_position_ids=b["packed_vit_position_ids"] + 1000),
            "packed_vit_position_ids",
        ),
        (
            "latent position ids",
            dict(packed_latent_position_ids=b["packed_latent_position_ids"] + 1000),
            "packed_latent_position_ids",
        ),
        ("position ids", dict(packed_position_ids=b["packed_position_ids"][:-1]), "packed_position_ids"),
        ("bad mode", dict(attn_modes=["bidirectional"] + b["attn_modes"][1:]), "attn_modes"),
        ("sequence_length", dict(sequence_length=0), "sequence_length"),
        ("nested sizes", dict(nested_attention_masks=[torch.zeros(3, 3)]), "nested_attention_masks"),
    ]
    return out


def test_bad_inputs_raise_value_error(stage2_batch):
    model = reference_model()
    for name, change, match in _mutations(stage2_batch):
        batch = dict(stage2_batch)
        batch.update(change)
        with pytest.raises(ValueError, match=match):
            model(**batch)
            pytest.fail(f"{name}: no error")


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_bf16_auto_backends_match_reference():
    """bf16 on CUDA: the all-auto model (Triton attention / MoT, fused patch embedding) vs the all-reference
    model with the same weights, on a ~1.5k-token pack of a wider tiny model. bf16 tolerances: outputs
    within tolerance("bfloat16", "fwd") of each other after averaging, gradients within 5% relative L2."""
    torch.manual_seed(0)
    wide = dict(llm_hidden=256, llm_heads=4, llm_kv_heads=2, vit_hidden=144, vit_heads=2, vit_grid=16)
    cfg = BagelConfig.tiny(**wide, max_latent_size=16)
    ref = reference_model(cfg).cuda().to(torch.bfloat16)
    fast = BagelForUnifiedMultimodal(BagelConfig.tiny(**wide, max_latent_size=16))
    fast.load_state_dict(ref.state_dict())
    fast = fast.cuda().to(torch.bfloat16)
    batch = _gpu_bf16_batch(cfg)
    o_ref, g_ref = run(ref, batch)
    o, g = run(fast, batch)
    atol, rtol = tolerance("bfloat16", "fwd")
    for k in ("ce", "mse"):
        assert abs(o[k].float().mean().item() - o_ref[k].float().mean().item()) <= atol + rtol * abs(
            o_ref[k].float().mean().item()
        )
    for name, g0 in g_ref.items():
        rel = (g[name].float() - g0.float()).norm() / (g0.float().norm() + 1e-12)
        assert rel < 5e-2 or g0.float().norm() < 1e-3 * max(x.float().norm() for x in g_ref.values()), (
            f"{name}: rel L2 {rel:.3e}"
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_lm_head_cross_entropy_hook_matches_the_plain_head(stage2_batch, stage2_reference, backend):
    """``model.ce_loss_fn`` (what bagel-train sets: the chunked linear cross-entropy, which never holds every
    CE token's logits) gives the per-token CE and every gradient of the plain lm_head + F.cross_entropy."""
    from bagel_kernels.linear_cross_entropy import lm_head_cross_entropy

    state, out_ref, grads_ref = stage2_reference
    model = reference_model()
    model.load_state_dict(state)
    calls = []

    def ce_loss_fn(head, hidden, labels):
        calls.append(hidden.shape[0])
        return lm_head_cross_entropy(head, hidden, labels, reduction="none", chunk_size=7, backend=backend)

    model.ce_loss_fn = ce_loss_fn
    out, grads = run(model, stage2_batch)
    assert calls == [out_ref["ce"].shape[0]]  # the hook ran, on every CE row at once (chunked inside)
    assert_out_close(out, out_ref)
    assert_grads_close(grads, grads_ref)

"""Hostile inputs to the model's public entry points (issue 23 items 5, 8, 9, 10, 17): each is refused
with a ValueError that names the argument, never truncated, cast or silently ignored."""

import pytest
import torch

from bagel import BagelBackendConfig, BagelConfig, BagelForUnifiedMultimodal, pack_samples, synthetic_samples
from bagel.model.qwen2 import Qwen2ForCausalLM
from bagel_kernels import PackedMask

REF = BagelBackendConfig.reference()


@pytest.fixture(scope="module")
def model():
    return BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=REF)


@pytest.fixture(scope="module")
def batch():
    cfg = BagelConfig.tiny()
    samples = synthetic_samples(["und", "t2i", "edit", "text"], cfg, seed=0)
    return pack_samples(samples, cfg, max_num_tokens=160, rng=0)


def test_the_batch_runs(model, batch):
    out = model(**batch)
    assert torch.isfinite(out["ce"]).all() and torch.isfinite(out["mse"]).all()


def _bad_forward_inputs(b: dict) -> list[tuple[str, dict, str]]:
    L = b["sequence_length"]
    clean = b["packed_timesteps"].clone()
    assert torch.isinf(clean).any(), "the pack needs a clean conditioning image"
    clean[torch.isinf(clean)] = float("nan")
    return [
        # item 5: truncation
        ("float sequence_length", dict(sequence_length=torch.tensor(L + 0.7)), "sequence_length"),
        ("python float", dict(sequence_length=L + 0.0), "sequence_length"),
        # item 17: a bool or a vector as the length
        ("bool sequence_length", dict(sequence_length=torch.tensor(True)), "sequence_length must be an int"),
        (
            "vector sequence_length",
            dict(sequence_length=torch.tensor([L, L])),
            "sequence_length must be an int",
        ),
        ("float sample_lens", dict(sample_lens=[s + 0.5 for s in b["sample_lens"]]), "sample_lens"),
        ("string sample_lens", dict(sample_lens=[str(s) for s in b["sample_lens"]]), "sample_lens"),
        # item 8: NaN timestep on the clean image
        ("NaN timestep", dict(packed_timesteps=clean), "packed_timesteps has NaN"),
        # item 9: both mask forms
        (
            "nested + splits",
            dict(nested_attention_masks=[torch.zeros(s, s) for s in b["sample_lens"]]),
            "nested_attention_masks and split_lens / attn_modes both given",
        ),
        (
            "nested + bogus modes",
            dict(
                nested_attention_masks=[torch.zeros(s, s) for s in b["sample_lens"]],
                split_lens=None,
                attn_modes=["bogus"],
            ),
            "nested_attention_masks and attn_modes both given",
        ),
        # item 10: raw integer pixels
        (
            "integer vit tokens",
            dict(packed_vit_tokens=(b["packed_vit_tokens"] * 100).to(torch.uint8)),
            "packed_vit_tokens must be floating point",
        ),
        # item 17: integer latents
        ("int64 latents", dict(padded_latent=b["padded_latent"].long()), "padded_latent must be a floating"),
        ("None timesteps", dict(packed_timesteps=[None] * len(clean)), "packed_timesteps must be"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_forward_refuses(model, batch, case):
    name, change, match = _bad_forward_inputs(batch)[case]
    with pytest.raises(ValueError, match=match):
        model(**{**batch, **change})


def _lm_and_pack():
    cfg = BagelConfig.tiny().text_config
    lm = Qwen2ForCausalLM(cfg, REF)
    lens = [5, 7]
    mask = PackedMask.from_splits(lens, lens, ["causal", "causal"])
    x = torch.randn(12, cfg.hidden_size)
    pos = torch.arange(12)
    gen = torch.tensor([8, 9])
    return lm, x, lens, mask, pos, gen


def test_language_model_refuses_truncation_and_wide_dtypes():
    lm, x, lens, mask, pos, gen = _lm_and_pack()
    lm.forward_train(x, lens, mask, pos, None, gen)
    for bad in ([5.9, 7.2], ["5", "7"], [5.0, 7.0], [True, 7]):
        with pytest.raises(ValueError, match="sample_lens"):
            lm.forward_train(x, bad, mask, pos, None, gen)
    with pytest.raises(ValueError, match="sequence_length"):
        lm.model.prepare_context(11.9, lens, mask, pos[:11], device="cpu", dtype=torch.float32)
    lm.model.prepare_context(11, lens, mask, pos[:11], device="cpu", dtype=torch.float32)
    # item 17: a float64 input names the input and the weights' dtype, not a kernel's argument
    with pytest.raises(ValueError, match="packed_sequence has dtype torch.float64 but the model's weights"):
        lm.forward_train(x.double(), lens, mask, pos, None, gen)


def test_siglip_refuses_fractional_seqlens(model):
    vit = model.model.vit_model
    patches = torch.randn(4, vit.vision_model.embeddings.patch_dim)
    ids = torch.arange(4)
    assert vit(patches, ids, vit_token_seqlens=[2, 2]).shape[0] == 4
    for bad in ([2.5, 1.5], [2.0, 2.0], ["2", "2"], torch.tensor([2.5, 1.5])):
        with pytest.raises(ValueError, match="vit_token_seqlens"):
            vit(patches, ids, vit_token_seqlens=bad)
    with pytest.raises(ValueError, match="packed_pixel_values must be floating point"):
        vit((patches * 255).to(torch.uint8), ids, vit_token_seqlens=[2, 2])


def test_model_construction_arguments():
    with pytest.raises(ValueError, match="language_model_cls must be an nn.Module subclass"):
        BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=REF, language_model_cls=int)
    with pytest.raises(ValueError, match="backend must be a BagelBackendConfig"):
        BagelForUnifiedMultimodal(BagelConfig.tiny(), backend="sdpa")

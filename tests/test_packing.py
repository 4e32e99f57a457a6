"""bagel.data.packing: packs built like BAGEL's PackedDataset (hand-computed expectations), masks that follow
the rule of DESIGN.md sec. 3, flex-style padding, and clear errors."""

import random

import numpy as np
import pytest
import torch

from bagel import BagelConfig
from bagel.data.packing import (
    DroppedImage,
    EditSample,
    Sample,
    SpecialTokens,
    T2ISample,
    Text,
    TextSample,
    UnderstandingSample,
    VaeImage,
    VitImage,
    flattened_position_ids,
    len2weight,
    pack_samples,
    patchify,
    sample_num_tokens,
    synthetic_samples,
)
from bagel_kernels import PackedMask
from bagel_kernels.reference import dense_mask_from_rule

CFG = BagelConfig.tiny()  # vocab 128 -> special tokens 124..127; ViT patch 4, grid 8; latent C=4, p=2
TOK = SpecialTokens.for_config(CFG)
B, E, SOI, EOI = TOK.bos, TOK.eos, TOK.start_of_image, TOK.end_of_image


def test_special_tokens():
    assert (B, E, SOI, EOI) == (124, 125, 126, 127)
    assert (
        SpecialTokens.for_config(BagelConfig.bagel_7b_mot(llm_layers=1, vit_layers=1))
        == SpecialTokens.qwen2()
    )


def test_patchify_order():
    # token (r, c) of the patch grid holds pixel [ch, r*p + i, c*p + j] at position (i*p + j)*C + ch
    C, p = 3, 2
    img = torch.arange(C * 4 * 6, dtype=torch.float32).reshape(C, 4, 6)
    toks = patchify(img, p)
    assert toks.shape == (2 * 3, p * p * C)
    for r in range(2):
        for c in range(3):
            for i in range(p):
                for j in range(p):
                    for ch in range(C):
                        assert toks[r * 3 + c, (i * p + j) * C + ch] == img[ch, r * p + i, c * p + j]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.zeros(3, 5, 4), 2)


def test_flattened_position_ids():
    assert flattened_position_ids(2, 3, 5).tolist() == [0, 1, 2, 5, 6, 7]
    # interpolation spreads a coarse grid over the whole max grid: 2 rows of a 4-grid land on rows 0, 2
    assert flattened_position_ids(2, 2, 4, interpolate=True).tolist() == [0, 2, 8, 10]
    # a full-size grid is the identity either way
    assert torch.equal(flattened_position_ids(4, 4, 4, True), flattened_position_ids(4, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        flattened_position_ids(5, 2, 4)


def test_len2weight():
    assert len2weight(4) == 0.5 and len2weight(4, "sample") == 0.25 and len2weight(4, "token") == 1.0
    assert len2weight(0) == 0.0
    with pytest.raises(ValueError):
        len2weight(3, "mean")


def test_pack_layout_by_hand():
    px = torch.randn(3, 8, 4)  # 2x1 patches of 4
    lat_clean = torch.randn(4, 2, 4)  # 1x2 latent tokens (p=2)
    lat_noise = torch.randn(4, 4, 2)  # 2x1
    samples = [
        TextSample([5, 6]),
        Sample([VitImage(px), Text([7], loss=True)]),
        Sample(
            [Text([8]), VaeImage(lat_clean, noised=False), VaeImage(lat_noise, noised=True, timestep=0.5)]
        ),
    ]
    b = pack_samples(samples, CFG, max_num_tokens=40)
    # sample 0: [B 5 6 E] | sample 1: [SOI v v EOI][B 7 E] | sample 2: [B 8 E][SOI l l EOI][SOI n n EOI]
    assert b["sequence_length"] == 4 + 7 + 11 == 22
    assert b["sample_lens"] == [4, 7, 11, 18]
    assert b["split_lens"] == [4, 4, 3, 3, 4, 4, 18]
    assert b["attn_modes"] == ["causal", "full", "causal", "causal", "full", "noise", "causal"]
    assert b["packed_text_ids"].tolist() == [B, 5, 6, E, SOI, EOI, B, 7, E, B, 8, E, SOI, EOI, SOI, EOI]
    assert b["packed_text_indexes"].tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14, 17, 18, 21]
    assert b["packed_vit_token_indexes"].tolist() == [5, 6]
    assert b["packed_vae_token_indexes"].tolist() == [15, 16, 19, 20]
    # RoPE: text advances per token, an image is one position (+1 after a clean one, +0 after a noised one)
    assert b["packed_position_ids"].tolist() == [
        0,
        1,
        2,
        3,
        0,
        0,
        0,
        0,
        1,
        2,
        3,
        0,
        1,
        2,
        3,
        3,
        3,
        3,
        4,
        4,
        4,
        4,
    ]
    # labels: next token of [B, ids...] is [ids..., E]
    assert b["ce_loss_indexes"].tolist() == [0, 1, 2, 8, 9]
    assert b["packed_label_ids"].tolist() == [5, 6, E, 7, E]
    assert torch.allclose(b["ce_loss_weights"], torch.tensor([3**-0.5] * 3 + [2**-0.5] * 2))
    assert b["mse_loss_indexes"].tolist() == [19, 20]
    t = b["packed_timesteps"]
    assert torch.isneginf(t[:2]).all() and torch.equal(t[2:], torch.tensor([0.5, 0.5]))
    assert b["patchified_vae_latent_shapes"] == [(1, 2), (2, 1)]
    assert b["padded_latent"].shape == (2, 4, 4, 4)
    assert (
        torch.equal(b["padded_latent"][0, :, :2, :4], lat_clean)
        and b["padded_latent"][0, :, 2:].abs().sum() == 0
    )
    assert b["packed_latent_position_ids"].tolist() == [0, 1, 0, 8]  # max_latent_size 8
    assert torch.equal(b["packed_vit_tokens"], patchify(px, 4))
    assert b["packed_vit_position_ids"].tolist() == [0, 8] and b["vit_token_seqlens"].tolist() == [2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_partition_and_mask_rule(seed):
    kinds = random.Random(seed).choices(["text", "und", "t2i", "edit"], k=5)
    b = pack_samples(synthetic_samples(kinds, CFG, seed=seed), CFG, max_num_tokens=400, rng=seed)
    L = b["sequence_length"]
    assert L == sum(sample_num_tokens(s, CFG) for s in synthetic_samples(kinds, CFG, seed=seed))
    idx = [b["packed_text_indexes"]]
    idx += [b[k] for k in ("packed_vit_token_indexes", "packed_vae_token_indexes") if k in b]
    assert torch.equal(torch.sort(torch.cat(idx)).values, torch.arange(L))
    assert sum(b["sample_lens"]) == 400 and b["attn_modes"][-1] == "causal"
    # splits mask == the rule == the nested per-sample masks of mask_format="nested"
    mask = PackedMask.from_splits(b["sample_lens"], b["split_lens"], b["attn_modes"])
    assert torch.equal(
        mask.to_dense(), dense_mask_from_rule(b["sample_lens"], b["split_lens"], b["attn_modes"])
    )
    n = pack_samples(synthetic_samples(kinds, CFG, seed=seed), CFG, mask_format="nested", rng=seed)
    assert "split_lens" not in n and n["sample_lens"] == b["sample_lens"][:-1]
    dense = PackedMask.from_dense(n["nested_attention_masks"]).to_dense()
    assert torch.equal(dense, mask.truncated(L).to_dense())
    for k in ("packed_text_ids", "packed_position_ids", "packed_timesteps", "ce_loss_indexes"):
        if k in b:
            assert torch.equal(b[k], n[k])


def test_random_timesteps_seeded():
    s = [T2ISample([1, 2], torch.randn(4, 4, 4)), T2ISample([3], torch.randn(4, 2, 2))]
    a = pack_samples(s, CFG, rng=7)["packed_timesteps"]
    b = pack_samples(s, CFG, rng=7)["packed_timesteps"]
    c = pack_samples(s, CFG, rng=8)["packed_timesteps"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[:4].unique().numel() == 1 and a[4:].unique().numel() == 1  # one logit per image


def test_convenience_samples():
    px, lat = torch.randn(3, 8, 8), torch.randn(4, 4, 4)
    und = UnderstandingSample(px, [1], [2, 3])
    assert [type(s).__name__ for s in und.segments] == ["VitImage", "Text", "Text"]
    assert [s.loss for s in und.segments[1:]] == [False, True]
    edit = EditSample(px, lat, [4], lat)
    assert [(type(s).__name__, getattr(s, "noised", None)) for s in edit.segments] == [
        ("VaeImage", False),
        ("VitImage", None),
        ("Text", None),
        ("VaeImage", True),
    ]
    b = pack_samples([edit], CFG)
    assert b["attn_modes"] == ["full", "full", "causal", "noise"]


def test_pack_errors():
    with pytest.raises(ValueError, match="max_num_tokens"):
        pack_samples([TextSample(list(range(10)))], CFG, max_num_tokens=5)
    with pytest.raises(ValueError, match="outside"):
        pack_samples([TextSample([1, 500])], CFG)
    with pytest.raises(ValueError, match="visual_gen=False"):
        pack_samples([T2ISample([1], torch.randn(4, 2, 2))], BagelConfig.tiny(visual_gen=False))
    with pytest.raises(ValueError, match="latent must be"):
        pack_samples([T2ISample([1], torch.randn(3, 2, 2))], CFG)
    with pytest.raises(ValueError, match="ViT pixels"):
        pack_samples([Sample([VitImage(torch.randn(8, 8))])], CFG)
    with pytest.raises(ValueError, match="segment type"):
        pack_samples([["hello"]], CFG)
    with pytest.raises(ValueError, match="mask_format"):
        pack_samples([TextSample([1])], CFG, mask_format="dense")
    with pytest.raises(ValueError, match="splits"):
        pack_samples([TextSample([1])], CFG, max_num_tokens=10, mask_format="nested")


# ------------------------------------------------------------------------------ hostile input (issue 13)
@pytest.mark.parametrize(
    "ids, needle",
    [
        ([1.7, 2.2], r"text ids\[0\]"),  # would pack as [1, 2]
        ("12", "text ids"),  # would pack as [1, 2]
        (torch.tensor([1.7, 2.2]), "text ids must hold integers"),
        (np.array([1.0, 2.0]), "text ids must be .* numpy array of dtype float64"),
        ([True, 2], r"text ids\[0\]"),
        ([1, 2.0], r"text ids\[1\]"),  # integral floats are refused too
    ],
)
def test_text_ids_are_never_coerced(ids, needle):
    with pytest.raises(ValueError, match=rf"samples\[0\] {needle}"):
        pack_samples([TextSample(ids)], CFG)


def test_integer_ids_of_any_integer_kind_are_accepted():
    a = pack_samples([TextSample([1, 2])], CFG)["packed_text_ids"]
    for ids in (torch.tensor([1, 2], dtype=torch.int32), np.array([1, 2]), (np.int64(1), 2)):
        assert torch.equal(pack_samples([TextSample(ids)], CFG)["packed_text_ids"], a)


@pytest.mark.parametrize(
    "samples, needle",
    [
        ([TextSample([1]), T2ISample([1], torch.randn(4, 0, 4))], r"samples\[1\] latent is empty"),
        ([T2ISample([1], torch.randn(4, 4, 0))], r"samples\[0\] latent is empty"),
        ([UnderstandingSample(torch.randn(3, 0, 8), [1], [2])], r"samples\[0\] ViT pixels is empty"),
        ([UnderstandingSample(torch.randn(3, 6, 8), [1], [2])], r"samples\[0\] ViT pixels must be \[3, h\*4"),
        ([T2ISample([1], torch.randint(0, 9, (4, 4, 4)))], r"samples\[0\] latent must be a floating"),
        (
            [UnderstandingSample(torch.zeros(3, 8, 8, dtype=torch.uint8), [1], [2])],
            "ViT pixels must be a float",
        ),
        (
            [T2ISample([1], torch.randn(4, 4, 4), timestep=float("nan"))],
            r"samples\[0\] timestep must be finite",
        ),
        (
            [T2ISample([1], torch.randn(4, 4, 4), timestep=float("inf"))],
            r"samples\[0\] timestep must be finite",
        ),
        ([T2ISample([1], torch.randn(4, 4, 4), timestep="0.5")], r"samples\[0\] timestep must be a real"),
        (
            [T2ISample([1], torch.randn(4, 4, 4)), T2ISample([2], torch.randn(4, 4, 4).half())],
            r"samples\[1\] latent has dtype torch.float16 but an earlier latent",
        ),
        ([Sample([Text([1], special_token_loss=True, special_token_label=2.5)])], "special_token_label"),
    ],
)
def test_bad_images_latents_and_timesteps_are_refused_at_pack_time(samples, needle):
    with pytest.raises(ValueError, match=needle):
        pack_samples(samples, CFG)


def test_max_num_tokens_must_be_an_int():
    with pytest.raises(ValueError, match="max_num_tokens"):
        pack_samples([TextSample([1, 2])], CFG, max_num_tokens=20.5)
    assert sum(pack_samples([TextSample([1, 2])], CFG, max_num_tokens=np.int64(20))["sample_lens"]) == 20


def test_finite_timesteps_of_any_real_kind():
    lat = torch.randn(4, 4, 4)
    for t in (0.5, 1, np.float32(0.5), torch.tensor(0.5)):
        b = pack_samples([T2ISample([1], lat, timestep=t)], CFG)
        assert torch.isfinite(b["packed_timesteps"]).all()


def test_model_forward_refuses_float_lengths():
    """The model's own entry takes the lengths strictly too: [6.9, 5.0] is not silently [6, 5]."""
    from bagel import BagelBackendConfig, BagelForUnifiedMultimodal

    model = BagelForUnifiedMultimodal(CFG, backend=BagelBackendConfig.reference())
    batch = pack_samples([TextSample([1, 2, 3, 4]), TextSample([5, 6, 7])], CFG)
    assert batch["sample_lens"] == [6, 5]
    for lens in (np.array([6.9, 5.0], dtype=np.float32), [6.0, 5.0], [6, True]):
        with pytest.raises(ValueError, match="sample_lens"):
            model(**{**batch, "sample_lens": lens})


# ---------------------------------------------------------------------------------------------- issue 23 item 13
@pytest.mark.parametrize("field", ["loss", "special_token_loss"])
@pytest.mark.parametrize("value", ["no", 1, 0.0, None])
def test_text_loss_flags_must_be_bools(field, value):
    # Text(loss="no") used to switch the loss ON (a non-empty string is truthy)
    seg = Text([1, 2], **{field: value}, special_token_label=3)
    with pytest.raises(ValueError, match=f"Text.{field} must be a bool"):
        pack_samples([[seg]], CFG)
    pack_samples([[Text([1, 2], loss=np.bool_(True))]], CFG)  # numpy bools are bools


@pytest.mark.parametrize("reduction", ["bogus", "", None, 1])
def test_loss_reduction_is_checked_even_without_loss_tokens(reduction):
    # used to be checked only when a text split carried loss: a typo passed silently on image-only packs
    with pytest.raises(ValueError, match="loss_reduction"):
        pack_samples([[Text([1, 2], loss=False)]], CFG, loss_reduction=reduction)


# ---------------------------------------------------------------------------------------------- data pipeline forms
def test_dropped_image_advances_the_position_only():
    # upstream's pack_sequence: a ViT/VAE image removed by CFG dropout adds no token but rope += 1
    px = torch.zeros(3, 4, 4)  # one ViT patch
    out = pack_samples([[DroppedImage("vae"), VitImage(px), Text([5], loss=True)]], CFG)
    assert out["split_lens"] == [3, 3] and out["attn_modes"] == ["full", "causal"]
    assert out["packed_position_ids"].tolist() == [1, 1, 1, 2, 3, 4]
    assert sample_num_tokens([DroppedImage(), Text([5])], CFG) == 3
    with pytest.raises(ValueError, match="no segments with tokens"):
        pack_samples([[DroppedImage()]], CFG)


def test_vae_image_in_pixels_counts_tokens_and_must_be_encoded_before_packing():
    s = CFG.latent_downsample  # pixels per latent token side
    seg = VaeImage(pixels=torch.zeros(3, 2 * s, 3 * s))
    assert sample_num_tokens([seg], CFG) == 2 * 3 + 2
    with pytest.raises(ValueError, match="encode it first"):
        pack_samples([[Text([1]), seg]], CFG)

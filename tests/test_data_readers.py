"""bagel.data readers, transforms, tokenizer and config: every upstream format read from files made in
the test, the exact token / loss layout of each sample kind (hand-written expectations, upstream's
``pack_sequence`` rules), and every bad-data case (skipped, counted per reason, logged once)."""

import json
import logging
import math
import os

import pytest
import torch
from data_helpers import (
    VAE_ARGS,
    VIT_ARGS,
    data_config,
    image_bytes,
    model_config,
    t2i_group,
    write_config,
    write_jsonl,
    write_parquet,
)

from bagel.data import (
    DataConfig,
    DroppedImage,
    Text,
    VaeImage,
    VitImage,
    add_special_tokens,
    build_loader,
    load_tokenizer,
    pack_samples,
    tiny_tokenizer,
)
from bagel.data.config import ImageTransformArgs, field_docs, load_groups
from bagel.data.tokenizer import encode_text
from bagel.data.transforms import ImageTransform, SkipSample, open_image, pil_to_tensor, target_size


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def cfg(tok):
    return model_config(tok)


def first_sample(yaml_path, tok, cfg, **kw):
    loader = build_loader(data_config(yaml_path, **kw), cfg, tok)
    raw = next(iter(loader))
    assert len(raw.samples) == 1
    return raw.samples[0], loader


def fake_latents(samples):
    """Latents standing in for the VAE: [16, H/8, W/8] of the pixels' size (the layout is what is tested)."""
    out = []
    for segs in samples:
        new = []
        for s in segs:
            if isinstance(s, VaeImage):
                H, W = s.pixels.shape[1:]
                s = VaeImage(latent=torch.randn(16, H // 8, W // 8), noised=s.noised, timestep=s.timestep)
            new.append(s)
        out.append(new)
    return out


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tiny_tokenizer_is_deterministic_and_ends_with_bagel_tokens(tok):
    again = tiny_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    special, new = add_special_tokens(tok)
    n = len(tok)
    assert new == 0 and (special.bos, special.eos, special.start_of_image, special.end_of_image) == tuple(
        range(n - 4, n)
    )
    text = "describe the ünïcode image 42"
    ids = encode_text(tok, text)
    assert max(ids) < n - 5 and tok.decode(ids) == text  # no special token inside text


def test_load_tokenizer_from_local_files(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded, special = load_tokenizer(tmp_path)
    assert encode_text(loaded, "flip the image") == encode_text(tok, "flip the image")
    assert special == add_special_tokens(tok)[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_missing_special_tokens_are_added_like_upstream():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.add_tokens(["a", "b"])
    bpe.add_special_tokens(["<|im_start|>"])  # has one of the four
    t = PreTrainedTokenizerFast(tokenizer_object=bpe)
    special, new = add_special_tokens(t)
    assert (
        new == 3
        and special.bos == 2
        and (special.eos, special.start_of_image, special.end_of_image) == (3, 4, 5)
    )


# ---------------------------------------------------------------------------------------------- transforms
def test_target_size_by_hand():
    a = ImageTransformArgs(image_stride=16, max_image_size=512, min_image_size=256)
    assert target_size(1000, 500, a) == (512, 256)  # long side down to 512, short side 256
    assert target_size(100, 50, a) == (512, 256)  # short side up to 256 (upstream's min_image_size)
    b = ImageTransformArgs(image_stride=16, max_image_size=512, min_image_size=16, max_pixels=128 * 128)
    # area: 400x400 > 128^2 -> sides scale by sqrt(128^2 / 400^2) = 0.32 -> 128 (upstream: 0.1024 -> 48)
    assert target_size(400, 400, b) == (128, 128)
    assert target_size(400, 400, b, img_num=4) == (64, 64)  # the area budget is shared by 4 images
    # 300x100 -> strides 304x96 (29184 px) -> x sqrt(16384 / 29184) = 0.749 -> 228, 72 -> round(14.25),
    # round(4.5) strides (Python rounds half to even, as upstream does) -> 224x64
    assert target_size(300, 100, b) == (224, 64)
    c = ImageTransformArgs(image_stride=14, max_image_size=980, min_image_size=378)
    # the model's grid caps the long side: 70 patches of 14 = 980; cap 8 patches -> 112
    assert target_size(2000, 1000, c, max_side=112) == (112, 56)
    assert target_size(3, 1, ImageTransformArgs(16, 64, 16)) == (48, 16)  # never below one stride


def test_pixels_and_transparency():
    from PIL import Image

    white = pil_to_tensor(Image.new("RGB", (4, 2), (255, 0, 128)))
    assert white.shape == (3, 2, 4) and white.dtype == torch.float32
    assert torch.allclose(white[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
    import io

    clear = Image.new("RGBA", (20, 20), (10, 20, 30, 0))  # fully transparent: becomes white, as upstream
    buf = io.BytesIO()
    clear.save(buf, format="PNG")
    rgb = open_image(buf.getvalue(), min_side=1, max_pixels=10**6)
    assert rgb.mode == "RGB" and rgb.getpixel((3, 4)) == (255, 255, 255)
    tr = ImageTransform(ImageTransformArgs(16, 64, 16))
    x = tr(open_image(image_bytes(70, 40), min_side=1, max_pixels=10**6))
    assert x.shape == (3, 32, 64) and -1 <= x.min() and x.max() <= 1  # 70x40 * 64/70 -> 64x36.6 -> 64x32


# ---------------------------------------------------------------------------------------------- config
def test_data_config_refuses_unknown_and_bad_values():
    d = DataConfig()
    assert (d.text_cond_dropout_prob, d.vit_cond_dropout_prob, d.vae_cond_dropout_prob) == (0.1, 0.3, 0.3)
    with pytest.raises(ValueError, match="max_num_tokenz"):
        DataConfig.from_dict({"max_num_tokenz": 5})
    with pytest.raises(ValueError, match="max_num_tokens_per_sample"):
        DataConfig(max_num_tokens=100, expected_num_tokens=50, max_num_tokens_per_sample=200)
    with pytest.raises(TypeError, match="seed"):
        DataConfig(seed="1")
    with pytest.raises(ValueError, match="vit_cond_dropout_prob"):
        DataConfig(vit_cond_dropout_prob=1.5)
    with pytest.raises(ValueError, match="long_samples"):
        DataConfig(long_samples="cut")
    assert DataConfig.from_dict(d.to_dict()) == d
    docs = field_docs()  # every field documented (the trainer's --help reads these)
    assert set(docs) == set(d.to_dict()) and all(len(v) > 20 for v in docs.values())


def test_group_yaml_as_upstream_writes_it(tmp_path):
    # upstream's data/configs/example.yaml, with its dataset_info in a YAML beside it
    groups = {
        "t2i_pretrain": {**t2i_group(), "is_mandatory": True, "num_used_data": [10]},
        "vlm_sft": {
            "dataset_names": ["llava"],
            "image_transform_args": {**VIT_ARGS, "max_pixels": 2_007_040},
            "frame_sampler_args": {"max_num_frames": 12, "min_num_frames": 8},
            "is_mandatory": True,
            "shuffle_lines": True,
            "shuffle_seed": 0,
            "num_used_data": [1000],
            "weight": 1,
        },
    }
    info = {
        "t2i_pretrain": {"t2i": {"data_dir": "t2i", "num_files": 10, "num_total_samples": 1000}},
        "vlm_sft": {
            "llava": {"data_dir": "vlm/images", "jsonl_path": "vlm/x.jsonl", "num_total_samples": 1000}
        },
    }
    y = write_config(str(tmp_path), groups, info)
    specs = load_groups(DataConfig(dataset_config_file=y))
    assert [s.name for s in specs] == ["t2i_pretrain", "vlm_sft"]
    assert specs[1].datasets[0].jsonl_path == str(tmp_path / "vlm" / "x.jsonl")
    assert specs[1].image_transform_args.max_pixels == 2_007_040 and specs[1].shuffle_lines
    bad = {"t2i_pretrain": {**groups["t2i_pretrain"], "weigth": 1}}
    with pytest.raises(ValueError, match="weigth"):
        load_groups(DataConfig(dataset_config_file=write_config(str(tmp_path), bad, info)))
    with pytest.raises(ValueError, match="unknown group"):
        load_groups(
            DataConfig(dataset_config_file=write_config(str(tmp_path), {"t2i": groups["t2i_pretrain"]}, info))
        )
    with pytest.raises(ValueError, match="no dataset 'other'"):
        g = {"t2i_pretrain": {**groups["t2i_pretrain"], "dataset_names": ["other"]}}
        load_groups(DataConfig(dataset_config_file=write_config(str(tmp_path), g, info)))
    with pytest.raises(ValueError, match="image_transform_args"):
        g = {"t2i_pretrain": {**groups["t2i_pretrain"], "image_transform_args": {"image_stride": 16}}}
        load_groups(DataConfig(dataset_config_file=write_config(str(tmp_path), g, info)))


# ---------------------------------------------------------------------------------------------- layouts
def test_t2i_parquet_layout(tmp_path, tok, cfg):
    caption = "a red square"
    write_parquet(
        str(tmp_path / "t2i" / "a.parquet"),
        {"image": [image_bytes(48, 32)], "captions": [json.dumps({"c": caption})]},
    )
    y = write_config(
        str(tmp_path), {"t2i_pretrain": t2i_group()}, {"t2i_pretrain": {"t2i": {"data_dir": "t2i"}}}
    )
    segs, loader = first_sample(y, tok, cfg)
    ids = encode_text(tok, caption)
    assert [type(s) for s in segs] == [Text, VaeImage]
    assert list(segs[0].ids) == ids and segs[0].loss is False  # upstream: no CE on the caption
    img = segs[1]
    assert (
        img.noised and img.latent is None and img.pixels.shape == (3, 32, 48) and math.isfinite(img.timestep)
    )
    out = pack_samples(fake_latents([segs]), cfg, special_tokens=loader.special_tokens)
    t = loader.special_tokens
    n = len(ids)
    assert out["packed_text_ids"].tolist() == [t.bos, *ids, t.eos, t.start_of_image, t.end_of_image]
    assert out["packed_text_indexes"].tolist() == [*range(n + 3), n + 3 + 6]
    assert out["packed_vae_token_indexes"].tolist() == list(range(n + 3, n + 9))  # 2x3 latent tokens
    assert out["mse_loss_indexes"].tolist() == list(range(n + 3, n + 9))
    assert out["split_lens"] == [n + 2, 8] and out["attn_modes"] == ["causal", "noise"]
    assert out["packed_position_ids"].tolist() == [*range(n + 2), *[n + 2] * 8]
    assert out["packed_timesteps"].tolist() == [pytest.approx(img.timestep)] * 6
    assert "ce_loss_indexes" not in out


def test_image_as_a_hugging_face_struct(tmp_path, tok, cfg):
    # parquet exported by Hugging Face datasets stores an image as {"bytes": ..., "path": ...}
    img = {"bytes": image_bytes(32, 16), "path": "x.png"}
    write_parquet(
        str(tmp_path / "t2i" / "a.parquet"), {"image": [img], "captions": [json.dumps({"c": "hi"})]}
    )
    y = write_config(
        str(tmp_path), {"t2i_pretrain": t2i_group()}, {"t2i_pretrain": {"t2i": {"data_dir": "t2i"}}}
    )
    segs, _ = first_sample(y, tok, cfg)
    assert segs[1].pixels.shape == (3, 16, 32)


def test_edit_parquet_layout(tmp_path, tok, cfg):
    instr = "flip it"
    write_parquet(
        str(tmp_path / "edit" / "a.parquet"),
        {
            "image_list": [[image_bytes(32, 32, seed=1), image_bytes(32, 32, seed=2)]],
            "instruction_list": [[[instr]]],
        },
    )
    groups = {
        "unified_edit": {
            "dataset_names": ["e"],
            "image_transform_args": {**VAE_ARGS, "max_image_size": 32},
            "vit_image_transform_args": VIT_ARGS,
        }
    }
    y = write_config(str(tmp_path), groups, {"unified_edit": {"e": {"data_dir": "edit"}}})
    segs, loader = first_sample(y, tok, cfg)
    assert [type(s) for s in segs] == [VaeImage, VitImage, Text, VaeImage]
    src, vit, text, tgt = segs
    assert not src.noised and src.pixels.shape == (3, 32, 32) and vit.pixels.shape == (3, 16, 16)
    assert text.loss is False and list(text.ids) == encode_text(tok, instr)
    assert tgt.noised and not torch.equal(tgt.pixels, src.pixels)
    out = pack_samples(fake_latents([segs]), cfg, special_tokens=loader.special_tokens)
    n = len(text.ids)
    assert out["attn_modes"] == ["full", "full", "causal", "noise"]
    assert out["split_lens"] == [4 + 2, 16 + 2, n + 2, 4 + 2]
    # clean VAE image at position 0, ViT image at 1, the instruction from 2, the target after it
    assert out["packed_position_ids"].tolist() == [0] * 6 + [1] * 18 + list(range(2, n + 4)) + [n + 4] * 6
    ts = out["packed_timesteps"].tolist()
    assert ts[:4] == [float("-inf")] * 4 and all(math.isfinite(x) for x in ts[4:])
    start_tgt = 6 + 18 + n + 2 + 1
    assert out["mse_loss_indexes"].tolist() == list(range(start_tgt, start_tgt + 4))
    assert "ce_loss_indexes" not in out  # upstream: editing has MSE only


def test_vlm_jsonl_layout(tmp_path, tok, cfg):
    os.makedirs(tmp_path / "img")
    (tmp_path / "img" / "a.png").write_bytes(image_bytes(16, 8))
    conv = [
        {"from": "human", "value": "<image>\nDescribe it."},
        {"from": "gpt", "value": "A gradient."},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Blue."},
    ]
    write_jsonl(str(tmp_path / "v.jsonl"), [{"id": 1, "image": "a.png", "conversations": conv}])
    groups = {"vlm_sft": {"dataset_names": ["v"], "image_transform_args": VIT_ARGS}}
    y = write_config(str(tmp_path), groups, {"vlm_sft": {"v": {"data_dir": "img", "jsonl_path": "v.jsonl"}}})
    segs, loader = first_sample(y, tok, cfg)
    assert [type(s) for s in segs] == [VitImage, Text, Text, Text, Text]
    assert segs[0].pixels.shape == (3, 8, 16)
    assert [s.loss for s in segs[1:]] == [False, True, False, True]  # CE on the assistant's answers only
    parts = ["Describe it.", "A gradient.", "Colour?", "Blue."]
    assert [list(s.ids) for s in segs[1:]] == [encode_text(tok, p) for p in parts]
    out = pack_samples(segs and [segs], cfg, special_tokens=loader.special_tokens)
    t = loader.special_tokens
    lens = [len(s.ids) + 2 for s in segs[1:]]
    a1 = 8 + 2 + lens[0]  # start of the first answer: image split (8 patches + 2), first question
    a2 = a1 + lens[1] + lens[2]
    ce = list(range(a1, a1 + lens[1] - 1)) + list(range(a2, a2 + lens[3] - 1))
    assert out["ce_loss_indexes"].tolist() == ce
    ids1, ids3 = encode_text(tok, parts[1]), encode_text(tok, parts[3])
    assert out["packed_label_ids"].tolist() == ids1 + [t.eos] + ids3 + [t.eos]
    w = [1 / math.sqrt(len(ids1) + 1)] * (len(ids1) + 1) + [1 / math.sqrt(len(ids3) + 1)] * (len(ids3) + 1)
    assert out["ce_loss_weights"].tolist() == pytest.approx(w)
    assert out["attn_modes"] == ["full"] + ["causal"] * 4
    assert out["packed_position_ids"][:10].tolist() == [0] * 10 and out["packed_position_ids"][10] == 1


def test_text_jsonl_layout(tmp_path, tok, cfg):
    write_jsonl(str(tmp_path / "t.jsonl"), [{"text": "hello world"}])
    y = write_config(
        str(tmp_path),
        {"text_pretrain": {"dataset_names": ["t"]}},
        {"text_pretrain": {"t": {"jsonl_path": "t.jsonl"}}},
    )
    segs, loader = first_sample(y, tok, cfg)
    ids = encode_text(tok, "hello world")
    assert len(segs) == 1 and list(segs[0].ids) == ids and segs[0].loss is True
    out = pack_samples([segs], cfg, special_tokens=loader.special_tokens)
    assert out["ce_loss_indexes"].tolist() == list(range(len(ids) + 1))
    assert out["packed_label_ids"].tolist() == ids + [loader.special_tokens.eos]


# ---------------------------------------------------------------------------------------------- bad data
def skip_run(y, tok, cfg, n_good, **kw):
    """Read every record of one epoch: (good sample positions, skip counts by reason); then check that
    the loader skips and counts the same while packing."""
    from collections import Counter

    loader = build_loader(data_config(y, **kw), cfg, tok)
    reader = loader.stream.packer(0).groups[0]
    good, skips = [], Counter()
    for pos in range(reader.total):
        try:
            reader.read(0, pos)
            good.append(pos)
        except SkipSample as e:
            skips[e.reason] += 1
    assert len(good) == n_good
    seen = []
    for raw in loader:  # the loader yields exactly the good ones in epoch 0, counting the others
        seen += raw.sample_ids
        if raw.sample_ids[-1][1] == 1:
            break
    assert sorted(p for _, e, p in seen if e == 0) == good
    counted = loader.skip_counts()
    assert counted.keys() == skips.keys() and all(skips[k] <= v <= 2 * skips[k] for k, v in counted.items())
    return good, dict(skips)


def test_bad_t2i_rows_are_skipped_counted_and_logged_once(tmp_path, tok, cfg, caplog):
    good = image_bytes(32, 32)
    rows = [
        (good, json.dumps({"a": "fine"})),
        (b"not an image", json.dumps({"a": "corrupt"})),
        (good[: len(good) // 2], json.dumps({"a": "truncated"})),
        (good, json.dumps({})),
        (good, json.dumps({"a": "  "})),
        (good, "not json"),
        (good, json.dumps(["a", "list"])),
        (image_bytes(8, 40), json.dumps({"a": "too small"})),
        (image_bytes(200, 200), json.dumps({"a": "too large"})),
        (None, json.dumps({"a": "no image"})),
        (good, json.dumps({"a": "fine too"})),
    ]
    write_parquet(
        str(tmp_path / "t2i" / "a.parquet"), {"image": [r[0] for r in rows], "captions": [r[1] for r in rows]}
    )
    y = write_config(
        str(tmp_path), {"t2i_pretrain": t2i_group()}, {"t2i_pretrain": {"t2i": {"data_dir": "t2i"}}}
    )
    with caplog.at_level(logging.WARNING, logger="bagel.data"):
        got, skips = skip_run(y, tok, cfg, 2, min_image_side=16, max_image_pixels=150 * 150)
        skip_run(y, tok, cfg, 2, min_image_side=16, max_image_pixels=150 * 150)  # a second run logs again
    assert skips == {
        "corrupt_image": 2,
        "image_too_small": 1,
        "image_too_large": 1,
        "empty_text": 2,
        "bad_record": 1,
        "unknown_field": 1,
        "missing_field": 1,
    }
    messages = [r.getMessage() for r in caplog.records]
    assert sum("corrupt_image" in m for m in messages) == 2  # once per reason per run (per worker)
    assert any("a.parquet row group" in m for m in messages)  # says where the sample was


def test_bad_vlm_lines_are_skipped(tmp_path, tok, cfg):
    os.makedirs(tmp_path / "img")
    (tmp_path / "img" / "a.png").write_bytes(image_bytes(16, 16))
    ok = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}]
    lines = [
        {"image": "a.png", "conversations": ok},
        {"image": "missing.png", "conversations": ok},
        {"image": "a.png", "conversations": [{"from": "robot", "value": "<image> hi"}, ok[1]]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "no placeholder"}, ok[1]]},
        {"video": "a.mp4", "conversations": ok},
        "{not json",
        "[1, 2]",
        {"image": "a.png", "conversations": [ok[0]]},
        {"image": "a.png"},
        {"image": ["a.png"], "conversations": ok},
    ]
    write_jsonl(str(tmp_path / "v.jsonl"), lines)
    groups = {"vlm_sft": {"dataset_names": ["v"], "image_transform_args": VIT_ARGS}}
    y = write_config(str(tmp_path), groups, {"vlm_sft": {"v": {"data_dir": "img", "jsonl_path": "v.jsonl"}}})
    got, skips = skip_run(y, tok, cfg, 2)
    assert skips == {
        "missing_file": 1,
        "unknown_field": 1,
        "image_placeholder_mismatch": 1,
        "video_unsupported": 1,
        "bad_record": 2,
        "no_loss": 1,
        "missing_field": 1,
    }


def test_a_dataset_that_yields_nothing_is_an_error_naming_its_files(tmp_path, tok, cfg):
    write_parquet(
        str(tmp_path / "t2i" / "bad.parquet"), {"image": [b"x", b"y"], "captions": ['{"a": "b"}'] * 2}
    )
    y = write_config(
        str(tmp_path), {"t2i_pretrain": t2i_group()}, {"t2i_pretrain": {"t2i": {"data_dir": "t2i"}}}
    )
    loader = build_loader(data_config(y), cfg, tok)
    with pytest.raises(ValueError, match=r"no usable sample.*corrupt_image.*bad\.parquet"):
        next(iter(loader))


def test_dataset_level_errors_name_the_files(tmp_path, tok, cfg):
    write_parquet(str(tmp_path / "t2i" / "a.parquet"), {"image": [image_bytes(16, 16)], "caption": ["x"]})
    y = write_config(
        str(tmp_path), {"t2i_pretrain": t2i_group()}, {"t2i_pretrain": {"t2i": {"data_dir": "t2i"}}}
    )
    with pytest.raises(ValueError, match=r"a\.parquet lacks the column\(s\) \['captions'\]"):
        build_loader(data_config(y), cfg, tok)
    y = write_config(
        str(tmp_path), {"t2i_pretrain": t2i_group("x")}, {"t2i_pretrain": {"x": {"data_dir": "nowhere"}}}
    )
    with pytest.raises(ValueError, match="nowhere"):
        build_loader(data_config(y), cfg, tok)
    os.makedirs(tmp_path / "empty")
    y = write_config(
        str(tmp_path), {"t2i_pretrain": t2i_group("e")}, {"t2i_pretrain": {"e": {"data_dir": "empty"}}}
    )
    with pytest.raises(ValueError, match="no .parquet files"):
        build_loader(data_config(y), cfg, tok)


def test_model_mismatches_are_refused(tmp_path, tok, cfg):
    write_parquet(
        str(tmp_path / "t2i" / "a.parquet"), {"image": [image_bytes(16, 16)], "captions": ['{"a": "b"}']}
    )
    g = {"t2i_pretrain": {**t2i_group(), "image_transform_args": {**VAE_ARGS, "image_stride": 8}}}
    y = write_config(str(tmp_path), g, {"t2i_pretrain": {"t2i": {"data_dir": "t2i"}}})
    with pytest.raises(ValueError, match="image_stride=8 but the model's latent stride is 16"):
        build_loader(data_config(y), cfg, tok)
    from bagel import BagelConfig

    y = write_config(
        str(tmp_path), {"t2i_pretrain": t2i_group()}, {"t2i_pretrain": {"t2i": {"data_dir": "t2i"}}}
    )
    with pytest.raises(ValueError, match="vocab_size"):
        build_loader(data_config(y), BagelConfig.tiny(latent_channels=16), tok)
    with pytest.raises(ValueError, match="visual_gen=False"):
        build_loader(
            data_config(y), model_config(tok).__class__.tiny(vocab_size=len(tok), visual_gen=False), tok
        )


def test_skip_sample_reasons_are_closed():
    with pytest.raises(ValueError, match="unknown skip reason"):
        SkipSample("because")


def test_dropped_image_segments_come_from_edit_dropout(tmp_path, tok, cfg):
    write_parquet(
        str(tmp_path / "edit" / "a.parquet"),
        {
            "image_list": [[image_bytes(32, 32, seed=1), image_bytes(32, 32, seed=2)]],
            "instruction_list": [[["x y"]]],
        },
    )
    groups = {
        "unified_edit": {
            "dataset_names": ["e"],
            "image_transform_args": VAE_ARGS,
            "vit_image_transform_args": VIT_ARGS,
        }
    }
    y = write_config(str(tmp_path), groups, {"unified_edit": {"e": {"data_dir": "edit"}}})
    segs, _ = first_sample(
        y, tok, cfg, vit_cond_dropout_prob=1.0, vae_cond_dropout_prob=1.0, text_cond_dropout_prob=1.0
    )
    assert [type(s) for s in segs] == [DroppedImage, DroppedImage, VaeImage]
    out = pack_samples(fake_latents([segs]), cfg)
    assert out["packed_position_ids"].tolist() == [2] * 6  # two dropped images still take positions 0 and 1

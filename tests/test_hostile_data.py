"""Hostile input to the data pipeline (issue 23's rule: no crash, no hang, no silent wrong sample; a bad
argument is a ValueError/TypeError naming the field; a bad sample is skipped and counted).

Each test here failed before its fix. Datasets are tiny files written in the test's folder."""

import copy
import io
import json
import os

import numpy as np
import pytest
import yaml
from data_helpers import (
    data_config,
    image_bytes,
    model_config,
    t2i_group,
    write_config,
    write_parquet,
)

from bagel.data import DataConfig, build_loader, tiny_tokenizer
from bagel.data.config import load_groups
from bagel.data.convert import convert_edits, convert_folder
from bagel.data.convert import main as convert_main
from bagel.data.transforms import ImageTransformArgs, SkipSample, open_image, target_size

INFO = {"t2i_pretrain": {"t2i": {"data_dir": "t2i"}}}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def cfg(tok):
    return model_config(tok)


def t2i_dataset(folder, groups=None, n=8, info=INFO):
    rows = [image_bytes(32, 32, seed=i) for i in range(n)]
    caps = [json.dumps({"c": f"a photo number {i}"}) for i in range(n)]
    write_parquet(os.path.join(folder, "t2i", "part0.parquet"), {"image": rows, "captions": caps})
    return write_config(folder, groups or {"t2i_pretrain": t2i_group(files=1)}, info)


def png(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grey_image_keeps_its_tones(fmt):
    """A 16-bit greyscale image (PIL mode I;16 / I) came out almost all white: PIL's convert clips
    0..65535 to 0..255. It must map 0..65535 onto 0..255."""
    from PIL import Image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    img = Image.fromarray(ramp.astype(np.uint16)) if fmt == "PNG" else Image.fromarray(ramp.astype(np.int32))
    out = np.asarray(open_image(png(img, fmt), min_side=1, max_pixels=10**6)).astype(np.float64)
    expected = np.round(ramp / 257.0)
    assert out.shape == (64, 64, 3)
    assert np.abs(out[..., 0] - expected).max() <= 1
    assert abs(out.mean() - 127.5) < 1


def test_float_image_is_skipped_not_blackened():
    """A mode-F (float) TIFF with values in [0, 1] became black (clipped); now it is a counted skip."""
    from PIL import Image

    img = Image.fromarray(np.linspace(0, 1, 32 * 32).reshape(32, 32).astype(np.float32), mode="F")
    with pytest.raises(SkipSample, match="floating-point") as e:
        open_image(png(img, "TIFF"), min_side=1, max_pixels=10**6)
    assert e.value.reason == "corrupt_image"


@pytest.mark.parametrize(
    "kw", [dict(width=0, height=8), dict(width=8, height=0), dict(width=8, height=8, img_num=0)]
)
def test_target_size_refuses_empty_sizes(kw):
    """Used to be a ZeroDivisionError."""
    args = ImageTransformArgs(16, 64, 16)
    with pytest.raises(ValueError, match="must be a positive int"):
        target_size(kw.pop("width"), kw.pop("height"), args, **kw)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "field, value",
    [
        ("max_buffer_size", 10**12),  # with prefer_buffer_before < expected this filled the buffer forever
        ("prefetch_factor", 10**12),  # the DataLoader asked the endless stream for 10**12 packs at once
        ("max_num_tokens", 2**40),  # past the attention kernels' limit: a pack that never closes
    ],
)
def test_data_config_refuses_unbounded_values(field, value):
    kw = {field: value}
    if field == "max_num_tokens":
        kw.update(expected_num_tokens=1, max_num_tokens_per_sample=1)
    with pytest.raises(ValueError, match=f"DataConfig.{field} must be <="):
        DataConfig(**kw)


def test_huge_buffer_no_longer_hangs(tmp_path, tok, cfg):
    """expected = max = 100 tokens, samples ~14 tokens, prefer_buffer_before 0: every sample that did
    not fit went to the buffer, which was allowed to grow to 10**12: the first pack never came."""
    yp = t2i_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="max_buffer_size"):
        build_loader(
            data_config(
                yp,
                expected_num_tokens=100,
                max_num_tokens=100,
                max_num_tokens_per_sample=100,
                max_buffer_size=10**12,
            ),
            cfg,
            tok,
        )


def test_num_used_data_huge_is_refused_not_memory_error(tmp_path, tok, cfg):
    yp = t2i_dataset(str(tmp_path), {"t2i_pretrain": t2i_group(files=10**12)})
    with pytest.raises(ValueError, match="num_used_data=1000000000000.*weight"):
        build_loader(data_config(yp), cfg, tok)


def test_num_used_data_cycling_still_works(tmp_path, tok, cfg):
    yp = t2i_dataset(str(tmp_path), {"t2i_pretrain": t2i_group(files=3)})
    loader = build_loader(data_config(yp), cfg, tok)
    assert len(loader.stream.sources[0][0].files) == 3


def test_duplicate_dataset_names_refused(tmp_path, tok, cfg):
    """[t2i, t2i] silently read every record twice per epoch."""
    group = {**t2i_group(files=1), "dataset_names": ["t2i", "t2i"], "num_used_data": [1, 1]}
    yp = t2i_dataset(str(tmp_path), {"t2i_pretrain": group})
    with pytest.raises(ValueError, match=r"dataset_names lists \['t2i'\] more than once"):
        build_loader(data_config(yp), cfg, tok)


def test_duplicate_yaml_keys_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: the first group vanished without a word."""
    t2i_dataset(str(tmp_path))
    text = yaml.safe_dump({"t2i_pretrain": t2i_group(files=1)})
    path = tmp_path / "twice.yaml"
    path.write_text(text + text.replace("weight: 1", "weight: 5"))
    with pytest.raises(ValueError, match="'t2i_pretrain' appears twice"):
        load_groups(data_config(str(path)))
    info = tmp_path / "info.json"
    info.write_text('{"t2i_pretrain": {"t2i": {"data_dir": "t2i"}}, "t2i_pretrain": {}}')
    with pytest.raises(ValueError, match="appears twice"):
        load_groups(data_config(str(tmp_path / "groups.yaml"), dataset_info_file=str(info)))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"t2i_pretrain: [unclosed\n", "is not valid YAML"),  # was yaml.ParserError, no file named
        (b"t2i_pretrain:\n  dataset_names: [\xff\xfe]\n", "is not UTF-8"),  # was UnicodeDecodeError
    ],
)
def test_unreadable_yaml_names_the_file(tmp_path, content, match):
    t2i_dataset(str(tmp_path))
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        load_groups(data_config(str(path)))
    assert str(path) in str(e.value)


def test_bad_json_info_and_folder_paths_name_the_problem(tmp_path):
    yp = t2i_dataset(str(tmp_path))
    bad = tmp_path / "info.json"
    bad.write_text("{bad")
    with pytest.raises(ValueError, match="is not valid JSON") as e:  # was a bare JSONDecodeError
        load_groups(data_config(yp, dataset_info_file=str(bad)))
    assert str(bad) in str(e.value)
    with pytest.raises(ValueError, match="is a folder, not a file"):  # said "does not exist"
        load_groups(data_config(str(tmp_path)))


def test_build_loader_refuses_wrong_tokenizer_and_model_config(tmp_path, tok, cfg):
    yp = t2i_dataset(str(tmp_path))
    with pytest.raises(TypeError, match="tokenizer must be"):  # was AttributeError: get_vocab
        build_loader(data_config(yp), cfg, None)
    with pytest.raises(TypeError, match="model_config must be"):  # was AttributeError: text_config
        build_loader(data_config(yp), {"vocab_size": 10}, tok)


# ---------------------------------------------------------------------------------------------- state
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok, cfg):
    folder = str(tmp_path_factory.mktemp("state"))
    yp = t2i_dataset(folder, n=12)
    loader = build_loader(data_config(yp), cfg, tok)
    it = iter(loader)
    for _ in range(3):
        next(it)
    return yp, loader.state_dict()


def _edit(key, value):
    def f(state):
        state["workers"][0][key] = value

    return f


@pytest.mark.parametrize(
    "edit, match",
    [
        (_edit("cursors", [[0, 100]]), "cursors"),  # was accepted: jumped to the next epoch silently
        (_edit("cursors", [[0, -5]]), "cursors"),  # was IndexError
        (_edit("cursors", [[0, 2.5]]), "cursors"),  # was a numpy IndexError
        (_edit("cursors", [[-3, 2]]), "cursors"),  # was numpy's "expected non-negative integer"
        (lambda s: s["workers"][0].pop("good"), "lacks"),  # was KeyError
        (_edit("rng", [1, 2, 3]), "rng"),  # was TypeError
        (_edit("pending", [[5, 0, 0]]), "pending"),  # was IndexError
        (_edit("pending", [[0, 0, 10**9]]), "pending"),  # was IndexError
        (_edit("pending", [[0, 0, 3]] * 10**5), "at most 2"),  # re-read 10**5 copies of one sample
        (_edit("skipped", {"bogus": "x"}), "skipped"),  # was accepted, then broke skip_counts()
        (_edit("packs", "x"), "packs"),  # was a raw int() error
        (lambda s: s.__setitem__("workers", [1]), "workers"),  # was AttributeError
        (lambda s: s.__setitem__("workers", {"a": {}}), "worker ids"),  # was a raw int() error
        (lambda s: s.__setitem__("next_worker", 2.5), "next_worker"),  # was truncated to 2
    ],
)
def test_corrupted_loader_state_is_refused(saved, tok, cfg, edit, match):
    yp, state = saved
    bad = copy.deepcopy(state)
    edit(bad)
    loader = build_loader(data_config(yp), cfg, tok)
    with pytest.raises(ValueError, match=match):
        loader.load_state_dict(bad)


def test_intact_state_still_restores(saved, tok, cfg):
    yp, state = saved
    loader = build_loader(data_config(yp), cfg, tok)
    loader.load_state_dict(json.loads(json.dumps(state)))  # through JSON: string keys, lists
    assert next(iter(loader)).sample_ids == [(0, 0, 3)]


# ---------------------------------------------------------------------------------------------- convert
def _folder_with_captions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        (src / f"im{i}.png").write_bytes(image_bytes(32, 32, seed=i))
        (src / f"im{i}.txt").write_text(f"caption {i}")
    return src


@pytest.mark.parametrize("info", ["- a list\n", "{not yaml: [\n", "42\n"])
def test_convert_with_garbage_dataset_info_is_a_clean_error(tmp_path, capsys, info):
    """An existing out/dataset_info.yaml that is a list or broken YAML: AttributeError / YAMLError
    traceback from bagel-convert."""
    src = _folder_with_captions(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_info.yaml").write_text(info)
    with pytest.raises(ValueError, match="dataset_info.yaml"):
        convert_folder(src, out)
    assert convert_main([str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert "dataset_info.yaml" in err and "Traceback" not in err


def test_convert_refuses_bad_transform_sizes(tmp_path):
    """image_stride=2.5 (or 0, or min > max) was written into the YAML; the loader refused it later."""
    src = _folder_with_captions(tmp_path)
    for kw, match in (
        (dict(image_stride=2.5), "image_stride"),
        (dict(image_stride=0), "image_stride"),
        (dict(min_image_size=2048), "min_image_size"),
    ):
        with pytest.raises((TypeError, ValueError), match=match):
            convert_folder(src, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
    jsonl = tmp_path / "edits.jsonl"
    jsonl.write_text(json.dumps({"source": "src/im0.png", "target": "src/im1.png", "instruction": "x"}))
    with pytest.raises((TypeError, ValueError), match="vit_patch_size|image_stride"):
        convert_edits(jsonl, tmp_path / "out", vit_patch_size=True)


def test_convert_non_utf8_jsonl_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "caps.jsonl"
    bad.write_bytes(b'{"image": "a.png", "caption": "ok"}\n\xff\xfe{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"caps.jsonl:2: not UTF-8"):
        convert_folder(bad, tmp_path / "out")
    assert convert_main([str(bad), str(tmp_path / "out")]) == 1
    assert "caps.jsonl:2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("n", [10**12, 2**64, -1, 2.0])
def test_tiny_tokenizer_num_merges_bounded(n):
    """num_merges=10**12 aborted the whole process (the BPE trainer's Rust allocation failed)."""
    with pytest.raises(ValueError, match="num_merges must be an int in"):
        tiny_tokenizer(n)


def test_load_tokenizer_path_errors(tmp_path):
    from bagel.data import load_tokenizer

    f = tmp_path / "tokenizer.json"
    f.write_text("{}")
    with pytest.raises(ValueError, match="is a file"):  # said the folder "does not exist"
        load_tokenizer(f)
    with pytest.raises(TypeError, match="path must be"):  # was fspath's "expected str, bytes or ..."
        load_tokenizer(None)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_t2i=10**12), "num_t2i"),  # ran for ever
        (dict(num_t2i=0), "num_t2i"),  # wrote a YAML the loader refused later
        (dict(num_vlm=-1), "num_vlm"),
        (dict(num_edit=2.5), "num_edit"),  # raw "'float' object cannot be interpreted as an integer"
        (dict(seed=2.5), "seed"),  # accepted
        (dict(seed="x"), "seed"),  # accepted
    ],
)
def test_write_example_dataset_arguments(tmp_path, kw, match):
    from bagel.data.example import write_example_dataset

    with pytest.raises(ValueError, match=match):
        write_example_dataset(tmp_path / "ex", None, **kw)
    with pytest.raises(TypeError, match="model_config"):  # AttributeError: latent_downsample
        write_example_dataset(tmp_path / "ex", "tiny")
    assert not (tmp_path / "ex").exists()


def test_encode_vae_images_arguments():
    import torch

    from bagel.data import VaeImage, encode_vae_images
    from bagel.vae import FluxVAE, FluxVAEConfig

    vae = FluxVAE(FluxVAEConfig.tiny(ch_mult=(1, 2)))
    samples = [[VaeImage(pixels=torch.zeros(3, 16, 16))]]
    with pytest.raises(TypeError, match="dtype must be a floating"):  # int64 truncated the latents
        encode_vae_images(samples, vae, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype must be a floating"):  # "Invalid device string"
        encode_vae_images(samples, vae, dtype="float16")
    with pytest.raises(TypeError, match="vae must be"):  # AttributeError
        encode_vae_images(samples, None)
    with pytest.raises(TypeError, match="samples must be"):  # "abc" came back as [['a'], ['b'], ['c']]
        encode_vae_images("abc", vae)
    out = encode_vae_images(samples, vae, dtype=torch.float16)
    assert out[0][0].latent.dtype == torch.float16 and out[0][0].latent.shape == (16, 8, 8)


def test_sample_num_tokens_checks_segments(cfg):
    import torch

    from bagel.data import Text, VaeImage, VitImage, sample_num_tokens

    with pytest.raises(ValueError, match="1-d"):  # len() of a 0-d tensor
        sample_num_tokens([Text(torch.tensor(5))], cfg)
    with pytest.raises(ValueError, match="ViT pixels must be a tensor"):  # AttributeError: shape
        sample_num_tokens([VitImage([[1]])], cfg)
    with pytest.raises(ValueError, match="VAE pixels must be"):  # a [3, 5] "image" counted 2 tokens
        sample_num_tokens([VaeImage(pixels=torch.zeros(3, 5))], cfg)
    s = cfg.latent_downsample
    assert sample_num_tokens([Text([1, 2, 3]), VaeImage(pixels=torch.zeros(3, 2 * s, 3 * s))], cfg) == 5 + 8


def test_convert_skips_and_counts_unreadable_images(tmp_path, capsys):
    """A dangling symlink (a loop) with a caption aborted the whole conversion ("does not exist")."""
    src = _folder_with_captions(tmp_path)
    os.symlink(src / "loop.png", src / "loop.png")
    (src / "loop.txt").write_text("a caption")
    res = convert_folder(src, tmp_path / "out")
    assert (res.num_rows, res.num_unreadable, res.num_without_caption) == (2, 1, 0)
    assert convert_main([str(src), str(tmp_path / "out2")]) == 0
    assert "1 with a missing or unreadable image" in capsys.readouterr().out
    jsonl = tmp_path / "edits.jsonl"
    lines = [
        {"source": "src/im0.png", "target": "src/im1.png", "instruction": "swap"},
        {"source": "src/im0.png", "target": "src/loop.png", "instruction": "loop"},
        {"source": "src/im0.png", "target": "src", "instruction": "a folder"},
    ]
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = convert_edits(jsonl, tmp_path / "out3")
    assert (res.num_rows, res.num_unreadable) == (1, 2)


@pytest.mark.parametrize("flag", ["--row-group-size", "--rows-per-file"])
def test_convert_huge_row_counts_are_usage_errors(tmp_path, capsys, flag):
    """--row-group-size 2**70: OverflowError traceback from pyarrow."""
    src = _folder_with_captions(tmp_path)
    with pytest.raises(SystemExit) as e:
        convert_main([str(src), str(tmp_path / "out"), flag, str(2**70)])
    assert e.value.code == 2 and f"{flag} must be in" in capsys.readouterr().err
    with pytest.raises(ValueError, match="row_group_size must be an int in"):
        convert_folder(src, tmp_path / "out", row_group_size=2**70)


def test_huge_transform_sizes_refused(tmp_path):
    """min_image_size = max_image_size = 10**6 with max_pixels 10**13 was accepted: with the model's
    grid uncapped (interpolate_pos) every image would be resized to terapixels."""
    args = {"image_stride": 16, "max_image_size": 10**6, "min_image_size": 10**6, "max_pixels": 10**13}
    yp = t2i_dataset(str(tmp_path), {"t2i_pretrain": {**t2i_group(files=1), "image_transform_args": args}})
    with pytest.raises(ValueError, match="max_image_size must be <="):
        load_groups(data_config(yp))


def test_jsonl_path_that_is_a_folder(tmp_path, tok, cfg):
    (tmp_path / "x.jsonl").mkdir()
    yp = write_config(
        str(tmp_path),
        {"text_pretrain": {"dataset_names": ["x"], "num_used_data": [None]}},
        {"text_pretrain": {"x": {"jsonl_path": "x.jsonl"}}},
    )
    with pytest.raises(ValueError, match="is a folder, not a file"):  # said "does not exist"
        build_loader(data_config(yp), cfg, tok)


def test_restoring_over_changed_data_is_a_value_error(tmp_path, tok, cfg):
    """A waiting sample that no longer reads: SkipSample (an internal exception) escaped load_state_dict."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(4)))
    yp = write_config(
        str(tmp_path),
        {"text_pretrain": {"dataset_names": ["t"], "num_used_data": [None]}},
        {"text_pretrain": {"t": {"jsonl_path": "t.jsonl"}}},
    )
    loader = build_loader(data_config(yp), cfg, tok)
    next(iter(loader))
    state = loader.state_dict()
    state["workers"][0]["pending"] = [[0, 0, 2]]
    path.write_text("".join("{not json}\n" for _ in range(4)))  # same lines, now unreadable
    with pytest.raises(ValueError, match=r"sample \(0, 0, 2\) was usable when the state was saved"):
        build_loader(data_config(yp), cfg, tok).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- packing
def _sample(cfg, **over):
    import torch

    from bagel.data import Text, VaeImage, VitImage

    p, lp, c = cfg.vision_config.patch_size, cfg.latent_patch_size, cfg.latent_channels
    segs = {
        "text": Text([1, 2, 3], loss=True),
        "vit": VitImage(torch.rand(3, 2 * p, 2 * p) * 2 - 1),
        "vae": VaeImage(torch.randn(c, 2 * lp, 2 * lp), noised=True, timestep=0.3),
    }
    segs.update(over)
    return list(segs.values())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_num_tokens=10**12), "max_num_tokens must be in"),  # a trillion-token pad split
        (dict(max_num_tokens=-1), "max_num_tokens must be in"),  # "the samples need 17 tokens"
        (dict(rng="x"), "rng must be an int"),  # used as a string seed
        (dict(rng=2.5), "rng must be an int"),  # used as a float seed
        (dict(device="bogus"), "device='bogus' is not a device"),  # raw RuntimeError
        (dict(special_tokens="qwen"), "special_tokens must be a SpecialTokens"),  # AttributeError
    ],
)
def test_pack_samples_arguments(cfg, kw, match):
    from bagel.data import pack_samples

    with pytest.raises(ValueError, match=match):
        pack_samples([_sample(cfg)], cfg, **kw)


def test_pack_samples_special_tokens_must_be_distinct_ints(cfg):
    """bos=1.5 was truncated to 1 when the ids became a tensor; four equal ids were accepted."""
    from bagel.data import SpecialTokens, pack_samples

    with pytest.raises(ValueError, match=r"special_tokens.bos=1.5 must be an int"):
        pack_samples([_sample(cfg)], cfg, special_tokens=SpecialTokens(1.5, 2, 3, 4))
    with pytest.raises(ValueError, match="four different ids"):
        pack_samples([_sample(cfg)], cfg, special_tokens=SpecialTokens(1, 1, 1, 1))


@pytest.mark.parametrize("where", ["vit", "vae"])
@pytest.mark.parametrize("bad", ["nan", "inf", "meta"])
def test_pack_samples_refuses_non_finite_and_meta_images(cfg, where, bad):
    """NaN/inf pixels or latents were packed (the loss then is NaN); meta ViT pixels gave meta tokens
    and meta latents a NotImplementedError."""
    import torch

    from bagel.data import VaeImage, VitImage, pack_samples

    good = _sample(cfg)
    x = (good[1].pixels if where == "vit" else good[2].latent).clone()
    if bad == "meta":
        x = x.to("meta")
    else:
        x[0, 1, 1] = float(bad)
    seg = VitImage(x) if where == "vit" else VaeImage(x, noised=True, timestep=0.3)
    sample = _sample(cfg, **{where: seg})
    what = "ViT pixels" if where == "vit" else "latent"
    match = "is on the meta device" if bad == "meta" else "holds NaN or inf"
    with pytest.raises(ValueError, match=rf"samples\[1\] {what} {match}"):
        pack_samples([_sample(cfg), sample], cfg)
    assert torch.isfinite(pack_samples([_sample(cfg)], cfg)["padded_latent"]).all()


def test_packing_helpers_refuse_bad_numbers(cfg):
    import random

    from bagel.data import DroppedImage
    from bagel.data.packing import flattened_position_ids, len2weight, synthetic_sample, synthetic_samples

    with pytest.raises(ValueError, match="DroppedImage.kind"):  # "bogus" was kept
        DroppedImage("bogus")
    for args, kw in (
        ((0, 2, 4), {"interpolate": True}),
        ((2, 2, 0), {"interpolate": True}),
        ((2.5, 2, 4), {}),
    ):
        with pytest.raises(ValueError, match="flattened_position_ids"):  # ZeroDivisionError / float ids
            flattened_position_ids(*args, **kw)
    for n in (-4, 2.5):
        with pytest.raises(ValueError, match="n must be an int"):  # math domain error / accepted
            len2weight(n)
    rng = random.Random(0)
    with pytest.raises(TypeError, match="rng must be a random.Random"):  # AttributeError: getrandbits
        synthetic_sample("text", cfg, 5)
    with pytest.raises(ValueError, match="text_len"):  # 10**9 ran for ever; (-5, -1) gave no text
        synthetic_sample("text", cfg, rng, text_len=(10**9, 10**9))
    with pytest.raises(ValueError, match="vit_side"):  # a [3, 0, 0] image
        synthetic_sample("und", cfg, rng, vit_side=(0, 0))
    with pytest.raises(ValueError, match="seed must be an int"):  # a float seed
        synthetic_samples(["text"], cfg, seed=2.5)


def test_special_token_strings_in_data_stay_text(tok):
    """A caption saying "<|im_end|>" or "<|vision_start|>" was encoded as those control tokens: an eos
    and an image bracket without an image inside a text split."""
    from bagel.data.tokenizer import BAGEL_SPECIAL_TOKENS, encode_text

    specials = {tok.convert_tokens_to_ids(t) for _, t in BAGEL_SPECIAL_TOKENS}
    for _, t in BAGEL_SPECIAL_TOKENS:
        ids = encode_text(tok, f"a caption {t} with a control string")
        assert not specials & set(ids), t
        assert tok.decode(ids) == f"a caption {t} with a control string"
    assert encode_text(tok, "flip the image") == tok.encode("flip the image", add_special_tokens=False)


def test_records_that_break_the_decoders_are_skipped(tmp_path, tok, cfg):
    """One record could stop training: captions or a JSONL line nested 200000 deep (RecursionError
    escaped the loader), a caption or text with a lone surrogate "\\ud800" (the tokenizer's TypeError)."""
    deep = "[" * 200000 + "]" * 200000
    good = json.dumps({"c": "a good caption"})
    rows = [image_bytes(32, 32, seed=i) for i in range(3)]
    caps = [good, deep, json.dumps({"c": "a \ud800 b"})]
    write_parquet(str(tmp_path / "t2i" / "part0.parquet"), {"image": rows, "captions": caps})
    (tmp_path / "x.jsonl").write_text(
        "\n".join([json.dumps({"text": "fine"}), deep, '{"text": "bad \\ud800 text"}']) + "\n"
    )
    groups = {
        "t2i_pretrain": {**t2i_group(files=1), "is_mandatory": True},
        "text_pretrain": {"dataset_names": ["x"], "num_used_data": [None], "is_mandatory": True},
    }
    info = {**INFO, "text_pretrain": {"x": {"jsonl_path": "x.jsonl"}}}
    yp = write_config(str(tmp_path), groups, info)
    loader = build_loader(data_config(yp), cfg, tok)
    it = iter(loader)
    packs = [next(it) for _ in range(4)]
    assert all(len(p.samples) == 2 for p in packs)
    assert set(loader.skip_counts()) == {"bad_record"} and loader.skip_counts()["bad_record"] >= 4
    bad = tmp_path / "deep.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n" + deep + "\n")
    with pytest.raises(ValueError, match=r"deep.jsonl:2: not JSON \(RecursionError"):
        convert_folder(bad, tmp_path / "out")


def test_restoring_over_a_grown_dataset_is_refused(tmp_path, tok, cfg):
    """12 rows saved, 16 rows now: the saved positions were restored into a reshuffled epoch."""
    yp = t2i_dataset(str(tmp_path), n=12)
    loader = build_loader(data_config(yp), cfg, tok)
    it = iter(loader)
    next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    t2i_dataset(str(tmp_path), n=16)
    with pytest.raises(ValueError, match=r"group_records: \[12\] vs \[16\]"):
        build_loader(data_config(yp), cfg, tok).load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "group_records"}  # older states: no record
    t2i_dataset(str(tmp_path), n=12)
    build_loader(data_config(yp), cfg, tok).load_state_dict(legacy)


def test_dataset_info_shapes_are_named(tmp_path):
    yp = t2i_dataset(str(tmp_path), info={"t2i_pretrain": ["t2i"]})
    with pytest.raises(ValueError, match="'t2i_pretrain' must map dataset names to paths, got list"):
        load_groups(data_config(yp))  # said "no entry for group 't2i_pretrain'" while listing it
    yp = t2i_dataset(str(tmp_path), info={1: {}, "vlm_sft": {}})
    with pytest.raises(ValueError, match="no entry for group 't2i_pretrain'"):  # sorted() TypeError
        load_groups(data_config(yp))
    yp = t2i_dataset(str(tmp_path), info={"t2i_pretrain": {1: {}, "x": {}}})
    with pytest.raises(ValueError, match="has no dataset 't2i'"):  # sorted() TypeError
        load_groups(data_config(yp))

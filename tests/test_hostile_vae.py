"""Hostile input to bagel.vae and bagel-encode (issue 23's rule: no crash, no hang, no silent wrong
result; a bad argument is a ValueError/TypeError naming it; the command never shows a traceback).

Each test here failed before its fix."""

import io
import os

import numpy as np
import pytest
import torch

from bagel.vae import FluxVAE, FluxVAEConfig, encode_main

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def vae():
    return FluxVAE(FluxVAEConfig.tiny(ch_mult=(1, 2))).initialize_weights(0)


@pytest.fixture()
def x():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


# ---------------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda x: x * 127.5 + 127.5, r"in \[-1, 1\], got values in \[0.*, 25"),  # uint8-range pixels
        (lambda x: torch.full_like(x, float("nan")), "finite values"),
        (lambda x: x.masked_fill(x > 0.9, float("inf")), "finite values"),
    ],
)
def test_encode_refuses_pixels_outside_minus1_1(vae, x, bad, match):
    """Pixels in [0, 255] encoded to plausible latents, NaN pixels to NaN latents, without a word."""
    with pytest.raises(ValueError, match=match):
        vae.encode(bad(x))
    with pytest.raises(ValueError, match=match):
        vae.encode_images([bad(x)[0]])


def test_encode_still_takes_the_range_edges_and_layouts(vae, x):
    edges = x.clone()
    edges[0, 0, 0, 0], edges[0, 0, 0, 1] = -1.0, 1.0
    ref = vae.encode(edges, sample=False)
    got = vae.encode(edges.to(memory_format=torch.channels_last), sample=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sample", ["no", None, 1])
def test_encode_sample_must_be_bool(vae, x, sample):
    """sample="no" was truthy: a posterior sample where the mean was asked for."""
    with pytest.raises(TypeError, match="sample must be a bool"):
        vae.encode(x, sample=sample)
    with pytest.raises(TypeError, match="sample must be a bool"):
        vae.encode_images([x[0]], sample=sample)


def test_encode_generator_type(vae, x):
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):  # was AttributeError
        vae.encode(x, generator=5)


@pytest.mark.parametrize("multiple_of", [0, -1, 2.5, True, None])
def test_encode_images_multiple_of(vae, x, multiple_of):
    """0 was a ZeroDivisionError; -1 and True were accepted; 2.5 gave "multiples of 5.0"."""
    with pytest.raises(ValueError, match="multiple_of must be a positive int"):
        vae.encode_images([x[0]], multiple_of=multiple_of)


def test_decode_refuses_non_finite_latents(vae):
    with pytest.raises(ValueError, match="NaN or inf"):
        vae.decode(torch.full((1, 16, 2, 2), float("nan")))


@pytest.mark.parametrize("seed", [2.5, "5", None, -1, 2**70, True])
def test_initialize_weights_seed(seed):
    """2.5 was truncated to 2, "5" parsed, -1 accepted, 2**70 a raw overflow, None a raw int() error."""
    vae = FluxVAE(FluxVAEConfig.tiny(ch_mult=(1,)))
    with pytest.raises(ValueError, match="seed must be an int"):
        vae.initialize_weights(seed)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_from_pretrained_refuses_non_finite_weights(tmp_path, vae, value):
    """A file with one NaN weight loaded silently; every latent then came out NaN."""
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    state["decoder.conv_in.bias"][3] = value
    path = tmp_path / "ae.safetensors"
    safetensors_torch.save_file(state, str(path))
    with pytest.raises(ValueError, match=r"decoder.conv_in.bias holds 1 NaN/inf value"):
        FluxVAE.from_pretrained(path, config=vae.config)


# ---------------------------------------------------------------------------------------------- bagel-encode
def _png(arr, fmt="PNG"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    (src / "good.png").write_bytes(_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    (src / "text.png").write_text("not an image")
    (src / "tiny.png").write_bytes(_png(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)))
    (src / "dir.png").mkdir()
    os.symlink(src / "loop.png", src / "loop.png")
    jpg = _png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    (src / "trunc.jpg").write_bytes(jpg[: len(jpg) // 3])
    return src


def test_encode_skips_and_counts_bad_images(tmp_path, capsys):
    """A text file named .png, a 4x4 image, a folder or symlink loop named .png, a truncated JPEG: each
    was a traceback that lost every latent encoded so far."""
    src = _folder(tmp_path)
    out = tmp_path / "lat.safetensors"
    assert encode_main([str(src), str(out), "--tiny-random", "0", "--mean"]) == 0
    err = capsys.readouterr().err
    assert "skipped 5 unusable image(s)" in err and "Traceback" not in err
    for name in ("text", "tiny", "dir", "loop", "trunc"):
        assert name in err
    assert sorted(safetensors_torch.load_file(str(out))) == ["good"]


def test_encode_16bit_image_is_not_whitened(tmp_path):
    """A 16-bit greyscale PNG went through PIL's clipping convert: its latent was that of a white image."""
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16)
    Image.fromarray(ramp.astype(np.uint16)).save(src / "g.png")
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).convert("RGB").save(src / "g8.png")
    out = tmp_path / "lat.safetensors"
    assert encode_main([str(src), str(out), "--tiny-random", "0", "--mean"]) == 0
    lat = safetensors_torch.load_file(str(out))
    torch.testing.assert_close(lat["g"], lat["g8"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--seed", str(2**70)], "--seed must be in"),  # was a raw overflow traceback
        (["--seed", "-1"], "--seed must be in"),
        (["--device", "bogus"], "--device 'bogus' is not a device"),  # RuntimeError traceback
        (["--image-size", "100000", "100000"], "at most 8192"),  # was killed for memory
        (["--image-size", "4", "4"], "multiples of 8"),  # ValueError traceback after loading
        (["--image-size", "20", "16"], "multiples of 8"),  # silently cropped to 16x16
    ],
)
def test_encode_usage_errors(tmp_path, capsys, extra, match):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(SystemExit) as e:
        encode_main([str(src), str(tmp_path / "o.safetensors"), "--tiny-random", "0", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and "Traceback" not in err


def test_encode_usage_errors_seed_of_tiny_random_and_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        encode_main([str(tmp_path), str(tmp_path / "o.safetensors"), "--tiny-random", str(2**70)])
    assert e.value.code == 2 and "--tiny-random must be in" in capsys.readouterr().err
    if not torch.cuda.is_available():  # was AssertionError: Torch not compiled with CUDA enabled
        with pytest.raises(SystemExit) as e:
            encode_main(
                [str(tmp_path), str(tmp_path / "o.safetensors"), "--tiny-random", "0", "--device", "cuda"]
            )
        assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_encode_output_folder_missing_is_found_first(tmp_path, capsys):
    src = _folder(tmp_path)
    with pytest.raises(SystemExit) as e:
        encode_main([str(src), str(tmp_path / "nope" / "o.safetensors"), "--tiny-random", "0"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_encode_failures_are_one_line(tmp_path, capsys):
    """Missing/garbage --ae, a garbage or column-less parquet, a folder without images: tracebacks."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "x.parquet").write_text("garbage")
    pq.write_table(pa.table({"other": [1, 2]}), str(tmp_path / "y.parquet"))
    pq.write_table(pa.table({"image": [b"junk", None]}), str(tmp_path / "z.parquet"))
    out = str(tmp_path / "o.safetensors")
    cases = [
        ([str(empty), out, "--ae", str(tmp_path / "missing.safetensors")], "no such file"),
        ([str(empty), out, "--ae", str(tmp_path / "x.parquet")], "not a readable safetensors"),
        ([str(tmp_path / "x.parquet"), out, "--tiny-random", "0"], "not a readable parquet"),
        ([str(tmp_path / "y.parquet"), out, "--tiny-random", "0"], "has no column 'image'"),
        ([str(tmp_path / "z.parquet"), out, "--tiny-random", "0"], "no usable images"),
        ([str(empty), out, "--tiny-random", "0"], "no usable images"),
    ]
    for argv, match in cases:
        assert encode_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, (argv, err)
    assert not os.path.exists(out)


def test_from_pretrained_on_meta_is_refused(tmp_path, vae):
    """device="meta" "loaded" a model that holds no weights."""
    path = tmp_path / "ae.safetensors"
    safetensors_torch.save_file(dict(vae.state_dict()), str(path))
    with pytest.raises(ValueError, match="device='meta' loads no weights"):
        FluxVAE.from_pretrained(path, config=vae.config, device="meta")
    with pytest.raises(ValueError, match="is not a device"):  # a raw RuntimeError
        FluxVAE.from_pretrained(path, config=vae.config, device="bogus")
    loaded = FluxVAE.from_pretrained(path, config=vae.config)
    x = torch.zeros(1, 3, 8, 8)
    torch.testing.assert_close(loaded.encode(x, sample=False), vae.encode(x, sample=False), rtol=0, atol=0)


def test_vae_argument_errors_name_the_argument(tmp_path, capsys):
    from bagel.vae import to_diffusers_state_dict

    with pytest.raises(TypeError, match="path must be"):  # fspath's "expected str, bytes or ..."
        FluxVAE.from_pretrained(None)
    with pytest.raises(ValueError, match="device 'bogus' is not a device"):  # raw RuntimeError
        FluxVAE(FluxVAEConfig.tiny(ch_mult=(1,)), device="bogus")
    with pytest.raises(ValueError, match="'foo' is not a key"):  # IndexError
        to_diffusers_state_dict({"foo": torch.zeros(1)})
    # --column with a folder was ignored without a word
    with pytest.raises(SystemExit) as e:
        encode_main([str(tmp_path), str(tmp_path / "o.safetensors"), "--tiny-random", "0", "--column", "x"])
    assert e.value.code == 2 and "--column names a parquet column" in capsys.readouterr().err


def test_encode_output_is_written_atomically(tmp_path, monkeypatch):
    """A failure while writing left a partial file under the output name; the old file is kept now."""
    import safetensors.torch as st

    src = _folder(tmp_path)
    out = tmp_path / "lat.safetensors"
    out.write_bytes(b"previous")

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    assert encode_main([str(src), str(out), "--tiny-random", "0"]) == 1
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("lat.")] == ["lat.safetensors"]

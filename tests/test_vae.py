"""bagel.vae: the FLUX autoencoder's layout against the published ae.safetensors, loading and refusals,
and its values against diffusers' AutoencoderKL (configured for FLUX, weights mapped by diffusers' own
single-file converter) as the independent implementation."""

from __future__ import annotations

import os

import pytest
import torch

from bagel.vae import (
    AE_KEY_COUNT,
    FluxVAE,
    FluxVAEConfig,
    diffusers_config,
    encode_main,
    pad_latents,
    to_diffusers_state_dict,
)

safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = FluxVAEConfig.tiny()
SCALE, SHIFT = 0.3611, 0.1159

# Shapes of a handful of tensors of FLUX.1's ae.safetensors (black-forest-labs' layout), written out by
# hand from the published architecture: ch=128, ch_mult=(1, 2, 4, 4), two ResnetBlocks per encoder level
# and three per decoder level, 16 latent channels, no quant convs.
PUBLISHED = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.2.block.0.nin_shortcut.bias": (512,),
    "encoder.down.2.downsample.conv.bias": (512,),
    "encoder.down.3.block.1.norm2.bias": (512,),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.bias": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (32, 512, 3, 3),
    "decoder.conv_in.weight": (512, 16, 3, 3),
    "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "decoder.mid.block_2.norm2.weight": (512,),
    "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.1.upsample.conv.bias": (256,),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "decoder.norm_out.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
NOT_PUBLISHED = [
    "encoder.down.3.downsample.conv.weight",  # the last encoder level keeps its resolution
    "decoder.up.0.upsample.conv.weight",  # the first decoder level (run last) too
    "encoder.down.0.block.0.nin_shortcut.weight",  # 128 -> 128: no shortcut conv
    "decoder.up.3.block.0.nin_shortcut.weight",  # 512 -> 512
    "quant_conv.weight",
    "post_quant_conv.weight",
]


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny() -> FluxVAE:
    return FluxVAE(TINY).initialize_weights(7)


@pytest.fixture(scope="module")
def reference(tiny):
    """diffusers' AutoencoderKL for the tiny config, weights mapped by diffusers' own converter of BFL/LDM
    checkpoints (what ``AutoencoderKL.from_single_file`` uses for ae.safetensors), not ours."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = diffusers_config(TINY)
    ref = diffusers.AutoencoderKL(**config)
    ref.load_state_dict(convert_ldm_vae_checkpoint(dict(tiny.state_dict()), config), strict=True)
    return ref.eval().requires_grad_(False)


@pytest.fixture
def ae_file(tmp_path, tiny):
    path = tmp_path / "ae.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------- layout
def test_full_config_has_the_published_layout():
    sd = FluxVAE(device="meta").state_dict()
    assert len(sd) == AE_KEY_COUNT == 244
    assert sum(k.startswith("encoder.") for k in sd) == 106
    assert all(k.startswith(("encoder.", "decoder.")) for k in sd)
    for key, shape in PUBLISHED.items():
        assert tuple(sd[key].shape) == shape, key
    for key in NOT_PUBLISHED:
        assert key not in sd
    n_params = sum(v.numel() for v in sd.values())
    assert n_params == 83_819_683  # FLUX.1's autoencoder: 34.3M encoder + 49.5M decoder


def test_full_config_matches_diffusers_flux_layout():
    """The published config through our key map gives exactly the state dict keys and shapes of
    diffusers' AutoencoderKL configured as FLUX.1's vae/config.json."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**diffusers_config()).state_dict()
    ours = to_diffusers_state_dict(FluxVAE(device="meta").state_dict())
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_our_key_map_equals_diffusers_converter(tiny):
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    theirs = convert_ldm_vae_checkpoint(dict(tiny.state_dict()), diffusers_config(TINY))
    ours = to_diffusers_state_dict(tiny.state_dict(), TINY)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k].reshape(ours[k].shape)), k


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(ch=48), "ch * ch_mult"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(z_channels=0), "z_channels"),
        (dict(num_res_blocks=1.5), "num_res_blocks"),
        (dict(scale_factor=0.0), "scale_factor"),
        (dict(shift_factor=float("nan")), "shift_factor"),
    ],
)
def test_config_refuses(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("*", r"\*")):
        FluxVAEConfig(**kwargs)


def test_frozen(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    assert not tiny.train().training
    x = _images(1, 3, 16, 16).requires_grad_(True)
    lat = tiny.encode(x, sample=False)
    assert not lat.requires_grad and not lat.is_inference()
    assert not tiny.decode(lat).requires_grad


# ---------------------------------------------------------------------------------------------- loading
def test_from_pretrained_loads_values(ae_file, tiny):
    loaded = FluxVAE.from_pretrained(ae_file, config=TINY)
    assert loaded.state_dict().keys() == tiny.state_dict().keys()
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert not any(p.is_meta for p in loaded.parameters())
    x = _images(2, 3, 16, 24)
    assert torch.equal(loaded.encode(x, sample=False), tiny.encode(x, sample=False))
    # a folder holding ae.safetensors is accepted as well
    assert torch.equal(
        FluxVAE.from_pretrained(ae_file.parent, config=TINY).encoder.conv_in.bias, tiny.encoder.conv_in.bias
    )


def test_from_pretrained_bf16_converts_tensor_by_tensor(ae_file, tiny, monkeypatch):
    """Each tensor goes to bf16 as soon as it is read: at most one fp32 tensor is alive at a time."""
    from safetensors import safe_open

    alive = []

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = safe_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, k):
            return self.f.get_slice(k)

        def get_tensor(self, k):
            t = self.f.get_tensor(k)
            alive.append(torch.utils.weak.WeakIdRef(t))
            assert sum(r() is not None for r in alive) <= 1, "more than one fp32 tensor alive while loading"
            return t

    monkeypatch.setattr("safetensors.safe_open", Counting)
    loaded = FluxVAE.from_pretrained(ae_file, config=TINY, dtype=torch.bfloat16)
    assert len(alive) == len(tiny.state_dict())
    assert {p.dtype for p in loaded.state_dict().values()} == {torch.bfloat16}
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k


def _write(path, state):
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_from_pretrained_refuses_missing_key(tmp_path, tiny):
    state = dict(tiny.state_dict())
    del state["decoder.up.1.upsample.conv.weight"]
    with pytest.raises(ValueError, match=r"1 missing key\(s\): decoder\.up\.1\.upsample\.conv\.weight"):
        FluxVAE.from_pretrained(_write(tmp_path / "ae.safetensors", state), config=TINY)


def test_from_pretrained_refuses_wrong_shape(tmp_path, tiny):
    state = dict(tiny.state_dict())
    state["encoder.mid.attn_1.q.weight"] = torch.zeros(128, 128)  # a linear, not a 1x1 conv
    with pytest.raises(
        ValueError, match=r"mis-shaped key\(s\): encoder\.mid\.attn_1\.q\.weight: file \[128, 128\]"
    ):
        FluxVAE.from_pretrained(_write(tmp_path / "ae.safetensors", state), config=TINY)


def test_from_pretrained_refuses_unknown_key(tmp_path, tiny):
    state = {**tiny.state_dict(), "quant_conv.weight": torch.zeros(32, 32, 1, 1)}
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\): quant_conv\.weight"):
        FluxVAE.from_pretrained(_write(tmp_path / "ae.safetensors", state), config=TINY)


def test_from_pretrained_refuses_other_config(ae_file):
    """The tiny file against the full config: every conv is mis-shaped, and the message says so."""
    with pytest.raises(
        ValueError, match=r"does not match the FLUX VAE \(ch=128.*mis-shaped key\(s\): decoder\."
    ):
        FluxVAE.from_pretrained(ae_file)


def test_from_pretrained_refuses_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        FluxVAE.from_pretrained(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="folder without ae.safetensors"):
        FluxVAE.from_pretrained(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        FluxVAE.from_pretrained(junk)
    with pytest.raises(TypeError, match="dtype"):
        FluxVAE.from_pretrained(junk, dtype=torch.int8)


# ---------------------------------------------------------------------------------------------- values
def test_shapes(tiny):
    lat = tiny.encode(_images(2, 3, 32, 48))
    assert lat.shape == (2, 16, 4, 6) and lat.dtype == torch.float32
    assert tiny.decode(lat).shape == (2, 3, 32, 48)


def test_encode_mean_matches_diffusers(tiny, reference):
    x = _images(2, 3, 32, 48)
    with torch.no_grad():
        want = SCALE * (reference.encode(x).latent_dist.mean - SHIFT)
    got = tiny.encode(x, sample=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0.05  # a real signal, not a collapsed output


def test_encode_sample_matches_diffusers(tiny, reference):
    x = _images(2, 3, 32, 48)
    with torch.no_grad():
        dist = reference.encode(x).latent_dist
        want = SCALE * (dist.sample(generator=torch.Generator().manual_seed(5)) - SHIFT)
    got = tiny.encode(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the sample differs from the mean by std * eps, std the posterior's
    assert (got - tiny.encode(x, sample=False)).abs().max() > 1e-3


def test_decode_matches_diffusers(tiny, reference):
    lat = tiny.encode(_images(2, 3, 32, 48), sample=False)
    with torch.no_grad():
        want = reference.decode(lat / SCALE + SHIFT).sample
    got = tiny.decode(lat)
    # 8 levels of GroupNorm + convs in fp32 on values up to ~2: summation order differs by ~1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)


def test_bf16_error_like_diffusers_bf16(tiny, reference):
    """bf16 runs, and its error against our fp32 result is at most twice (plus a little) that of
    diffusers' AutoencoderKL run in bf16 on the same weights and inputs (flash-attention's pass rule)."""
    import copy

    vae16 = FluxVAE(TINY, dtype=torch.bfloat16)
    vae16.load_state_dict(tiny.state_dict())
    ref16 = copy.deepcopy(reference).to(torch.bfloat16)
    x = _images(2, 3, 32, 48)
    lat32 = tiny.encode(x, sample=False)
    lat16 = vae16.encode(x, sample=False, micro_batch_size=1)
    with torch.no_grad():
        ref_lat16 = SCALE * (ref16.encode(x.bfloat16()).latent_dist.mean - SHIFT)
    assert lat16.dtype == torch.bfloat16
    err, ref_err = ((y.float() - lat32).abs().max() for y in (lat16, ref_lat16))
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)

    z = lat32.bfloat16()
    img32 = tiny.decode(lat32)
    img16 = vae16.decode(z, micro_batch_size=1)
    with torch.no_grad():
        ref_img16 = ref16.decode(z / SCALE + SHIFT).sample
    assert img16.dtype == torch.bfloat16 and torch.isfinite(img16).all()
    err, ref_err = ((y.float() - img32).abs().max() for y in (img16, ref_img16))
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_micro_batches_equal_one_batch(tiny, dtype):
    vae = tiny if dtype == torch.float32 else FluxVAE(TINY, dtype=dtype).initialize_weights(7)
    x = _images(5, 3, 16, 24)
    for sample in (False, True):
        whole = vae.encode(x, sample=sample, generator=torch.Generator().manual_seed(1))
        parts = vae.encode(x, sample=sample, generator=torch.Generator().manual_seed(1), micro_batch_size=2)
        torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)
    lat = vae.encode(x, sample=False)
    torch.testing.assert_close(
        vae.decode(lat, micro_batch_size=3),
        vae.decode(lat),
        rtol=0,
        atol=1e-4 if dtype == torch.float32 else 3e-2,
    )


def test_encode_decode_refuse(tiny):
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny.encode(_images(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        tiny.encode(_images(3, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        tiny.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tiny.encode([[0.0]])
    with pytest.raises(ValueError, match="micro_batch_size"):
        tiny.encode(_images(1, 3, 16, 16), micro_batch_size=0)
    with pytest.raises(ValueError, match=r"latents must be \[B, 16, h, w\]"):
        tiny.decode(torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------------------------------------- pack layout
def test_pack_layout_hand_computed(tiny):
    """Images 32x48, 16x32, 48x16 with latent patch size 2: latents 4x6, 2x4, 6x2, i.e. (2, 3), (1, 2),
    (3, 1) patches, padded to 6x6 latent cells (3 x 3 patches), each latent in the top-left corner."""
    images = [_images(3, 32, 48, seed=1), _images(3, 16, 32, seed=2), _images(3, 48, 16, seed=3)]
    out = tiny.encode_to_pack_layout(images, latent_patch_size=2, sample=False)
    assert set(out) == {"padded_latent", "patchified_vae_latent_shapes"}
    assert out["patchified_vae_latent_shapes"] == [(2, 3), (1, 2), (3, 1)]
    padded = out["padded_latent"]
    assert padded.shape == (3, 16, 6, 6)
    for i, (img, (h, w)) in enumerate(zip(images, [(4, 6), (2, 4), (6, 2)], strict=True)):
        alone = tiny.encode(img[None], sample=False)[0]
        torch.testing.assert_close(padded[i, :, :h, :w], alone, rtol=0, atol=1e-6)
        rest = padded[i].clone()
        rest[:, :h, :w] = 0
        assert not rest.any()


def test_pack_layout_equals_pack_samples(tiny):
    """The layout equals what bagel.data.packing.pack_samples builds from the same latents one by one."""
    from bagel import BagelConfig
    from bagel.data.packing import T2ISample, pack_samples

    images = [_images(3, 16, 48, seed=4), _images(3, 32, 16, seed=5)]
    out = tiny.encode_to_pack_layout(images, sample=False)
    latents = tiny.encode_images(images, sample=False, multiple_of=2)
    config = BagelConfig.tiny(latent_channels=16, latent_patch_size=2)
    pack = pack_samples([T2ISample([1, 2], lat) for lat in latents], config, rng=0)
    assert pack["patchified_vae_latent_shapes"] == out["patchified_vae_latent_shapes"] == [(1, 3), (2, 1)]
    assert torch.equal(pack["padded_latent"], out["padded_latent"])


def test_pack_layout_samples_in_list_order(tiny):
    """With a generator, images of equal size encoded together draw the same noise as one by one."""
    images = [_images(3, 16, 32, seed=1), _images(3, 32, 16, seed=2), _images(3, 16, 32, seed=3)]
    got = tiny.encode_images(images, generator=torch.Generator().manual_seed(9), micro_batch_size=1)
    gen = torch.Generator().manual_seed(9)
    for img, lat in zip(images, got, strict=True):
        torch.testing.assert_close(lat, tiny.encode(img[None], generator=gen)[0], rtol=0, atol=1e-6)


def test_pack_layout_refuses(tiny):
    with pytest.raises(ValueError, match=r"images\[1\] is 24x32: H and W must be multiples of 16"):
        tiny.encode_to_pack_layout([_images(3, 16, 16), _images(3, 24, 32)], latent_patch_size=2)
    with pytest.raises(ValueError, match="non-empty list"):
        tiny.encode_to_pack_layout([])
    with pytest.raises(ValueError, match="latent_patch_size"):
        pad_latents([torch.zeros(16, 4, 4)], latent_patch_size=0)
    with pytest.raises(ValueError, match=r"latents\[1\] is 16 channels torch.bfloat16"):
        pad_latents([torch.zeros(16, 4, 4), torch.zeros(16, 2, 2, dtype=torch.bfloat16)])


# ---------------------------------------------------------------------------------------------- bagel-encode
def test_encode_main_folder(tmp_path, tiny):
    PIL = pytest.importorskip("PIL.Image")
    import numpy as np

    src = tmp_path / "imgs"
    src.mkdir()
    arrays = {
        "a": np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8),
        "b": np.random.default_rng(1).integers(0, 256, (20, 16, 3), dtype=np.uint8),  # cropped to 16x16
    }
    for name, arr in arrays.items():
        PIL.fromarray(arr).save(src / f"{name}.png")
    out = tmp_path / "lat.safetensors"
    assert encode_main([str(src), str(out), "--tiny-random", "7", "--mean"]) == 0
    lat = safetensors_torch.load_file(str(out))
    assert sorted(lat) == ["a", "b"]
    a = torch.from_numpy(arrays["a"]).permute(2, 0, 1).float() / 127.5 - 1
    b = torch.from_numpy(arrays["b"][2:18]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(lat["a"], tiny.encode(a[None], sample=False)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(lat["b"], tiny.encode(b[None], sample=False)[0], rtol=0, atol=1e-5)


def test_encode_main_parquet(tmp_path, tiny):
    """A parquet column of PNG bytes in Hugging Face's {"bytes": ...} struct, resized by --image-size;
    posterior samples from --seed are the ones encode_images draws from that seed."""
    import io

    import numpy as np

    PIL = pytest.importorskip("PIL.Image")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(2)
    pngs, tensors = [], []
    for shape in [(16, 16, 3), (16, 16, 3), (16, 16, 3)]:
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        buf = io.BytesIO()
        PIL.fromarray(arr).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
        tensors.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)
    pq.write_table(pa.table({"img": pngs}), str(tmp_path / "d.parquet"))
    out = tmp_path / "lat.safetensors"
    argv = [str(tmp_path / "d.parquet"), str(out), "--tiny-random", "7", "--column", "img", "--seed", "3"]
    assert encode_main([*argv, "--image-size", "16", "16", "--batch-size", "2"]) == 0
    lat = safetensors_torch.load_file(str(out))
    assert sorted(lat) == ["00000000", "00000001", "00000002"]
    want = tiny.encode_images(tensors, generator=torch.Generator().manual_seed(3))
    for key, w in zip(sorted(lat), want, strict=True):
        torch.testing.assert_close(lat[key], w, rtol=0, atol=1e-5)


def test_encode_main_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        encode_main([str(tmp_path / "absent"), str(tmp_path / "o.safetensors"), "--tiny-random", "0"])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        encode_main([str(tmp_path), str(tmp_path / "o.pt"), "--tiny-random", "0"])
    assert exc.value.code == 2 and "must end in .safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        encode_main([str(tmp_path), str(tmp_path / "o.safetensors")])
    assert exc.value.code == 2 and "--ae" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.safetensors")

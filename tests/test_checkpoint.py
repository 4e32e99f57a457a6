"""Checkpoint I/O: config round trips, random tiny checkpoints (config.json + ema.safetensors, and
upstream's llm_config.json + vit_config.json layout) loaded back bit for bit in both stages, key
classification, strict mode, VAE keys, Conv2d patch weights, missing keys and shape errors."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel import BagelBackendConfig, BagelConfig, BagelForUnifiedMultimodal, Qwen2ForCausalLMReference
from bagel.io.checkpoint import classify_key, load_checkpoint_into, save_checkpoint
from bagel.io.files import find_weight_files, read_safetensors_header

REF = dict(backend=BagelBackendConfig.reference(), language_model_cls=Qwen2ForCausalLMReference)


def random_model(cfg=None, seed=0) -> BagelForUnifiedMultimodal:
    model = BagelForUnifiedMultimodal(BagelConfig.tiny() if cfg is None else cfg, **REF)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))  # frozen pos tables too: the load must copy them
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("bagel_tiny")
    model = random_model()
    vae = {"encoder.conv_in.weight": torch.randn(8, 3, 3, 3), "decoder.conv_out.bias": torch.randn(3)}
    save_checkpoint(model, path, config=model.config, extra_tensors=vae)
    return path, model.model.state_dict()


def test_config_round_trip(tmp_path):
    cfg = BagelConfig.tiny(timestep_shift=2.5, vit_rope=True, interpolate_pos=True, max_latent_size=6)
    cfg.save_pretrained(tmp_path)
    for _ in range(2):  # reload twice: nothing (vit_select_layer in particular) is applied again
        back = BagelConfig.from_pretrained(tmp_path)
        assert back.to_dict() == cfg.to_dict()
        back.save_pretrained(tmp_path)
    assert back.vision_config.num_hidden_layers == 3 and back.vit_num_layers == 2
    assert back.llm_config is back.text_config and back.vit_config is back.vision_config
    assert back.text_config.layer_module == "Qwen2MoTDecoderLayer" and back.text_config.qk_norm is True
    assert back.vision_config.rope is True and back.vae_config == {"z_channels": 4, "downsample": 8}
    assert BagelConfig.from_pretrained(tmp_path, visual_gen=False).visual_gen is False
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "bagel"


def test_config_aliases_and_dicts():
    cfg = BagelConfig.tiny()
    d = cfg.to_dict()
    a = BagelConfig(llm_config=d["text_config"], vit_config=d["vision_config"], vae_config=d["vae_config"])
    b = BagelConfig(
        text_config=d["text_config"], vision_config=d["vision_config"], vae_config=d["vae_config"]
    )
    assert a.to_dict() == b.to_dict()
    assert a.text_config.hidden_size == 64 and a.vision_config.hidden_size == 48
    with pytest.raises(ValueError, match="llm_config or text_config"):
        BagelConfig(llm_config=d["text_config"], text_config=dict(d["text_config"]))
    with pytest.raises(ValueError, match="layer_module"):
        BagelConfig(llm_config=dict(d["text_config"], layer_module="Qwen3Layer"))
    with pytest.raises(ValueError, match="z_channels"):
        BagelConfig(vae_config={"downsample": 8})
    big = BagelConfig.bagel_7b_mot()
    tc, vc = big.text_config, big.vision_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert (tc.intermediate_size, tc.vocab_size, vc.hidden_size, vc.num_attention_heads) == (
        18944,
        152064,
        1152,
        16,
    )
    assert big.vit_num_layers == 26 and vc.num_hidden_layers == 27 and big.latent_channels == 16


def test_key_classification_covers_the_model():
    model = random_model()
    kinds = {k: classify_key(k) for k in model.model.state_dict()}
    assert "unknown" not in kinds.values(), [k for k, v in kinds.items() if v == "unknown"]
    gen = {k for k, v in kinds.items() if v == "gen"}
    assert all(
        "moe_gen" in k or k.split(".")[0] in ("time_embedder", "vae2llm", "llm2vae", "latent_pos_embed")
        for k in gen
    )
    stage1 = BagelForUnifiedMultimodal(BagelConfig.tiny(stage=1), **REF)
    assert set(stage1.model.state_dict()) == {k for k, v in kinds.items() if v == "und"}
    assert classify_key("encoder.down.0.block.0.conv1.weight") == "vae"
    assert classify_key("decoder.up.1.conv.bias") == "vae"
    assert classify_key("language_model.model.layers.3.mlp.gate_up_proj.weight") == "unknown"
    assert classify_key("foo.bar") == "unknown"


@pytest.mark.parametrize("stage", [2, "stage2"])
def test_load_stage2_bit_identical(ckpt, stage):
    path, sd = ckpt
    model = BagelForUnifiedMultimodal.from_pretrained(path, stage=stage, strict=True, **REF)
    got = model.model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    r = model.load_report
    assert not r.missing and not r.unexpected and not r.skipped_by_stage
    assert sorted(r.vae) == ["decoder.conv_out.bias", "encoder.conv_in.weight"]
    assert len(r.loaded) == len(sd)


def test_load_stage1_understanding_subset(ckpt):
    path, sd = ckpt
    model = BagelForUnifiedMultimodal.from_pretrained(path, stage=1, strict=True, **REF)
    assert model.config.visual_gen is False and model.config.stage == 1
    got = model.model.state_dict()
    assert set(got) == {k for k in sd if classify_key(k) == "und"}
    for k, v in got.items():
        assert torch.equal(v, sd[k]), k
    r = model.load_report
    assert not r.missing and not r.unexpected
    assert set(r.skipped_by_stage) == {k for k in sd if classify_key(k) == "gen"}


def test_upstream_layout(ckpt, tmp_path):
    """llm_config.json + vit_config.json next to ema.safetensors, no BAGEL config.json (a Qwen2 config.json
    of the tokenizer side is ignored); max_latent_size / vit grid come from the table shapes."""
    path, sd = ckpt
    cfg = BagelConfig.from_pretrained(path)
    with open(tmp_path / "llm_config.json", "w") as f:
        json.dump(cfg.text_config.to_dict(), f)
    with open(tmp_path / "vit_config.json", "w") as f:
        json.dump(cfg.vision_config.to_dict(), f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "qwen2", "hidden_size": 7}, f)
    os.link(path / "ema.safetensors", tmp_path / "ema.safetensors")
    up = BagelConfig.from_pretrained(tmp_path)
    assert up.max_latent_size == cfg.max_latent_size == 8 and up.vit_max_num_patch_per_side == 8
    assert up.visual_gen and up.vit_num_layers == 2
    model = BagelForUnifiedMultimodal.from_pretrained(
        tmp_path, stage=2, strict=True, vae_config=cfg.vae_config, **REF
    )
    for k, v in sd.items():
        assert torch.equal(model.model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="llm_config.json"):
        BagelConfig.from_pretrained(tmp_path / "..")


def test_strict_unknown_keys(ckpt, tmp_path):
    path, sd = ckpt
    tensors = load_file(path / "ema.safetensors")
    tensors["foo.bar"] = torch.zeros(2)
    tensors["vit_model.vision_model.encoder.layers.2.mlp.fc1.bias"] = torch.zeros(
        96
    )  # a layer the model lacks
    save_file(tensors, tmp_path / "ema.safetensors")
    BagelConfig.from_pretrained(path).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="strict=True: 2 checkpoint key"):
        BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=2, strict=True, **REF)
    model = BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=2, **REF)
    assert sorted(model.load_report.unexpected) == [
        "foo.bar",
        "vit_model.vision_model.encoder.layers.2.mlp.fc1.bias",
    ]
    assert torch.equal(model.model.state_dict()["connector.fc1.weight"], sd["connector.fc1.weight"])


def test_strict_failure_leaves_model_untouched(ckpt, tmp_path):
    path, _ = ckpt
    tensors = load_file(path / "ema.safetensors")
    tensors["foo.bar"] = torch.zeros(2)
    save_file(tensors, tmp_path / "ema.safetensors")
    model = random_model(seed=7)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(ValueError, match="match no model parameter"):
        load_checkpoint_into(model, tmp_path, stage=2, strict=True)
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_missing_keys_conv_weight_and_shape_errors(ckpt, tmp_path):
    path, sd = ckpt
    tensors = load_file(path / "ema.safetensors")
    del tensors["connector.fc2.bias"]
    key = "vit_model.vision_model.embeddings.patch_embedding.weight"
    E, p = 48, 4
    conv = tensors[key].reshape(E, p, p, 3).permute(0, 3, 1, 2).contiguous()  # HF SigLIP Conv2d layout
    tensors[key] = conv
    save_file(tensors, tmp_path / "ema.safetensors")
    BagelConfig.from_pretrained(path).save_pretrained(tmp_path)
    model = BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=2, **REF)
    r = model.load_report
    assert r.missing == ["connector.fc2.bias"] and r.converted == [key]
    assert torch.equal(model.model.state_dict()[key], sd[key])
    tensors["connector.fc2.bias"] = torch.zeros(5)
    save_file(tensors, tmp_path / "ema.safetensors")
    with pytest.raises(ValueError, match="connector.fc2.bias.*shape"):
        BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=2, **REF)


def test_weight_files_and_errors(ckpt, tmp_path):
    path, _ = ckpt
    assert find_weight_files(path) == [str(path / "ema.safetensors")]
    header = read_safetensors_header(str(path / "ema.safetensors"))
    assert header["latent_pos_embed.pos_embed"]["shape"] == [64, 64]
    with pytest.raises(ValueError, match="ema.safetensors"):
        find_weight_files(tmp_path)
    # sharded layout via an index file
    tensors = load_file(path / "ema.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, tmp_path / name)
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    BagelConfig.from_pretrained(path).save_pretrained(tmp_path)
    model = BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=2, strict=True, **REF)
    assert not model.load_report.missing and len(model.load_report.files) == 2
    with pytest.raises(ValueError, match="stage"):
        BagelForUnifiedMultimodal.from_pretrained(path, stage=3)


def test_save_pretrained_and_dtype(tmp_path):
    model = random_model(seed=3)
    model.save_pretrained(tmp_path)
    back = BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=2, dtype=torch.bfloat16, **REF)
    assert back.model.language_model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(
        back.model.language_model.lm_head.weight, model.model.language_model.lm_head.weight.to(torch.bfloat16)
    )


# ------------------------------------------------------------------------------ hostile input (issue 13)
def _sharded(ckpt, folder, names=("a.safetensors", "b.safetensors")):
    """The checkpoint split into two shards plus a model.safetensors.index.json in ``folder``."""
    path, _ = ckpt
    tensors = load_file(path / "ema.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {names[0]: keys[:half], names[1]: keys[half:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, folder / name)
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    return shards


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_is_all_or_nothing_when_a_later_shard_is_cut_short(ckpt, tmp_path):
    _sharded(ckpt, tmp_path)
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[:-100])  # the second shard cut short
    model = random_model(seed=11)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"b\.safetensors.*data_offsets"):
        load_checkpoint_into(model, tmp_path, stage=2, strict=True)
    assert _unchanged(model, before)  # not one of the first shard's tensors was copied


@pytest.mark.parametrize("st_dtype", [torch.int64, torch.bool])
def test_integer_or_bool_tensors_are_not_cast_into_float_parameters(ckpt, tmp_path, st_dtype):
    path, _ = ckpt
    tensors = load_file(path / "ema.safetensors")
    key = "connector.fc1.weight"
    tensors[key] = torch.ones_like(tensors[key], dtype=st_dtype)
    save_file(tensors, tmp_path / "ema.safetensors")
    model = random_model(seed=5)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{key}.*dtype (I64|BOOL).*never cast"):
        load_checkpoint_into(model, tmp_path, stage=2)
    assert _unchanged(model, before)


def test_bf16_checkpoint_still_loads_into_fp32(ckpt, tmp_path):
    path, sd = ckpt
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(path / "ema.safetensors").items()}
    save_file(tensors, tmp_path / "ema.safetensors")
    model = random_model(seed=5)
    load_checkpoint_into(model, tmp_path, stage=2)
    assert torch.equal(
        model.model.state_dict()["connector.fc1.weight"], tensors["connector.fc1.weight"].float()
    )


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_shard_paths_leaving_the_folder_are_refused(ckpt, tmp_path, kind):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    outside = tmp_path / "x.safetensors"
    shards = _sharded(ckpt, folder)
    os.replace(folder / "b.safetensors", outside)
    name = {"parent": "../x.safetensors", "absolute": str(outside), "symlink": "b.safetensors"}[kind]
    if kind == "symlink":
        os.symlink(outside, folder / "b.safetensors")
    weight_map = {
        k: ("a.safetensors" if n == "a.safetensors" else name) for n, ks in shards.items() for k in ks
    }
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        find_weight_files(folder)
    model = random_model(seed=2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        load_checkpoint_into(model, folder, stage=2)
    assert _unchanged(model, before)


def test_hf_cache_snapshot_symlinks_into_blobs_are_allowed(ckpt, tmp_path):
    """The Hugging Face cache layout: snapshots/<rev>/ema.safetensors -> ../../blobs/<hash>."""
    path, sd = ckpt
    repo = tmp_path / "models--org--bagel"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    os.link(path / "ema.safetensors", repo / "blobs" / "deadbeef")
    os.symlink(os.path.join("..", "..", "blobs", "deadbeef"), snap / "ema.safetensors")
    assert find_weight_files(snap) == [str(snap / "ema.safetensors")]


def _write(p, data: bytes):
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "content, needle",
    [
        (struct.pack("<Q", 2**62) + b"{}", "header length"),
        (bytes(range(256)) * 8, "header length"),  # random bytes
        (b"\x05\x00", "fewer than the 8-byte header length"),
        (struct.pack("<Q", 40) + b'{"a": {"dtype": "F32"', "header length"),  # header cut short
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not UTF-8"),
        (struct.pack("<Q", 5) + b"{bad}", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "must be a JSON object"),
    ],
)
def test_unreadable_safetensors_raise_value_error_naming_the_file(tmp_path, content, needle):
    f = _write(tmp_path / "w.safetensors", content)
    with pytest.raises(ValueError, match=needle) as info:
        read_safetensors_header(str(f))
    assert "w.safetensors" in str(info.value)


def _header_file(tmp_path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    return _write(tmp_path / "h.safetensors", struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "entry, data, needle",
    [
        (
            {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            b"\0" * 4,
            "data_offsets",
        ),  # beyond the file
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, b"\0" * 8, "needs 12"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, b"\0" * 8, "shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, b"\0" * 8, "data_offsets"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, b"\0" * 8, "shape"),
        ([1, 2], b"", "expected an object"),
        ({"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}, b"\0" * 4, "'dtype' = 'F99'"),
    ],
)
def test_bad_header_fields_are_named(tmp_path, entry, data, needle):
    f = _header_file(tmp_path, {"w": entry}, data)
    with pytest.raises(ValueError, match=needle) as info:
        read_safetensors_header(str(f))
    assert "h.safetensors" in str(info.value) and "'w'" in str(info.value)


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'{"model_type": "bagel", ', "not valid JSON"),
        (b'\xff\xfe{"model_type": "bagel"}', "not UTF-8"),
        (b"[1, 2]", "JSON object"),
    ],
)
def test_unreadable_config_json_names_the_file(tmp_path, content, needle):
    _write(tmp_path / "config.json", content)
    with pytest.raises(ValueError, match=needle) as info:
        BagelConfig.from_pretrained(tmp_path)
    assert "config.json" in str(info.value)


def test_unreadable_index_json_names_the_file(ckpt, tmp_path):
    _sharded(ckpt, tmp_path)
    _write(tmp_path / "model.safetensors.index.json", b'{"weight_map": ')
    with pytest.raises(ValueError, match="index.json: not valid JSON"):
        find_weight_files(tmp_path)
    _write(tmp_path / "model.safetensors.index.json", b'{"weight_map": ["a.safetensors"]}')
    with pytest.raises(ValueError, match="index.json: field 'weight_map'"):
        find_weight_files(tmp_path)


@pytest.mark.parametrize(
    "section, field, value, needle",
    [
        ("vision_config", "patch_size", 0, r"vit_config\.patch_size must be >= 1"),
        # (transformers' own field validation may answer first; either way the field is named)
        ("vision_config", "hidden_size", "48", r"vit_config.*hidden_size"),
        ("vision_config", "layer_norm_eps", None, r"vit_config.*layer_norm_eps"),
        ("text_config", "num_attention_heads", 4.0, r"llm_config.*num_attention_heads"),
        ("text_config", "vocab_size", True, r"llm_config.*vocab_size"),
        ("text_config", "rms_norm_eps", -1e-6, r"llm_config\.rms_norm_eps must be a finite number > 0"),
        ("text_config", "qk_norm", "yes", r"llm_config\.qk_norm must be a bool"),
        (None, "latent_patch_size", 2.5, "latent_patch_size must be an int"),
        (None, "max_latent_size", "8", "max_latent_size must be an int"),
        (None, "visual_gen", "false", "visual_gen must be a bool"),
        (None, "timestep_shift", float("nan"), "timestep_shift must be a finite number"),
        (None, "vae_config", [4, 8], "vae_config must be a dict"),
        (None, "vae_config", {"z_channels": True, "downsample": 8}, "z_channels"),
        (None, "text_config", [1, 2], "llm_config/text_config must be a dict"),
    ],
)
def test_config_json_with_wrong_fields_names_file_and_field(tmp_path, section, field, value, needle):
    d = BagelConfig.tiny().to_dict()
    if section is None:
        d[field] = value
    else:
        d[section][field] = value
    with open(tmp_path / "config.json", "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match=needle) as info:
        BagelConfig.from_pretrained(tmp_path)
    assert "config.json" in str(info.value)


# ---------------------------------------------------------------------------------------------- loading in the target dtype
class _Fp32Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every fp32 tensor of at least ``min_numel`` elements that an op allocates (views and
    in-place results, e.g. of the memory-mapped file, are not allocations)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.seen = min_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place op: no new memory
        for t in out if isinstance(out, (tuple, list)) else (out,):
            real = isinstance(t, torch.Tensor) and not t.is_meta
            if real and t.dtype == torch.float32 and t.numel() >= self.min_numel:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def _wide_config():
    # every weight matrix has >= 64 * 64 elements; the fp32 buffers (RoPE inverse frequencies) are tiny
    return BagelConfig.tiny(llm_hidden=128, vocab_size=256, vit_hidden=96)


@pytest.mark.parametrize("saved_dtype", [torch.bfloat16, torch.float32])
def test_bf16_load_has_no_fp32_transient(tmp_path, monkeypatch, saved_dtype):
    """from_pretrained(dtype=bf16) builds on meta, materialises in bf16 and reads each tensor straight
    into its parameter (an fp32 file in chunks of rows): no fp32 tensor of a weight's size ever exists,
    and the weights equal the saved ones cast to bf16."""
    import bagel.io.checkpoint as ckpt_io

    model = random_model(_wide_config()).to(saved_dtype)
    save_checkpoint(model, tmp_path, config=model.config)
    want = {k: v.to(torch.bfloat16) for k, v in model.model.state_dict().items()}
    monkeypatch.setattr(ckpt_io, "READ_CHUNK_BYTES", 2048)  # an fp32 chunk holds at most 512 values
    with _Fp32Allocations(min_numel=1024) as mode:
        got = BagelForUnifiedMultimodal.from_pretrained(
            tmp_path, stage=2, strict=True, dtype="bfloat16", **REF
        )
    assert mode.seen == [], mode.seen[:5]
    for k, v in got.model.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, want[k]), k
    inv = [b for n, b in got.named_buffers() if n.endswith("inv_freq")]
    assert inv and all(b.dtype == torch.float32 for b in inv)  # RoPE frequencies stay fp32
    torch.testing.assert_close(
        inv[0], got.model.language_model.model.rotary_emb.compute_inv_freq(), atol=0, rtol=0
    )


def test_read_into_rows_and_dtype(ckpt):
    """The per-tensor reader the sharded loader uses: any row range of a stored tensor, into a tensor
    of another dtype, in chunks; the Conv2d patch weight converted on the way."""
    import contextlib

    from bagel.io.checkpoint import PATCH_EMBED_KEY, open_checkpoint, read_into

    path, sd = ckpt
    (file,) = find_weight_files(path)
    key = "language_model.model.embed_tokens.weight"
    with contextlib.ExitStack() as stack:
        handle = open_checkpoint([file], stack)[file]
        out = torch.empty(5, sd[key].shape[1], dtype=torch.bfloat16)
        assert read_into(handle, key, out, row_start=3) is False
        assert torch.equal(out, sd[key][3:8].to(torch.bfloat16))
        with pytest.raises(ValueError, match="outside the stored"):
            read_into(handle, key, out, row_start=sd[key].shape[0] - 2)
        with pytest.raises(ValueError, match="does not fit a target"):
            read_into(handle, key, torch.empty(5, sd[key].shape[1] + 1), row_start=0)
        with pytest.raises(ValueError, match="row_start must be an int"):
            read_into(handle, key, out, row_start=1.5)
    conv = torch.randn(48, 3, 4, 4)
    save_file({PATCH_EMBED_KEY: conv}, str(path.parent / "conv.safetensors"))
    with contextlib.ExitStack() as stack:
        f = str(path.parent / "conv.safetensors")
        out = torch.empty(48, 48)
        assert read_into(open_checkpoint([f], stack)[f], PATCH_EMBED_KEY, out) is True
        assert torch.equal(out, conv.permute(0, 2, 3, 1).reshape(48, 48))


def test_from_pretrained_initialises_only_missing(tmp_path):
    """Keys the checkpoint lacks are initialised (not left as to_empty's garbage); the others load."""
    model = random_model()
    sd = model.model.state_dict()
    drop = {"llm2vae.weight", "llm2vae.bias", "language_model.model.norm.weight"}
    save_checkpoint(model, tmp_path, config=model.config, keys=[k for k in sd if k not in drop])
    got = BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=2, **REF)
    assert set(got.load_report.missing) == drop
    new = got.model.state_dict()
    assert torch.equal(new["llm2vae.weight"], torch.zeros_like(sd["llm2vae.weight"]))
    assert torch.equal(
        new["language_model.model.norm.weight"], torch.ones_like(sd["language_model.model.norm.weight"])
    )
    for k in sd.keys() - drop:
        assert torch.equal(new[k], sd[k]), k


# ---------------------------------------------------------------------------------------------- issue 23: saving, strict, arguments
def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails (weights or config) leaves the previous checkpoint loadable with strict=True."""
    import safetensors.torch

    old = random_model(seed=1)
    save_checkpoint(old, tmp_path, config=old.config)
    new = random_model(BagelConfig.tiny(max_latent_size=6), seed=2)  # a config the old weights do not fit

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(BagelConfig, "to_json_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["config.json", "ema.safetensors"]  # no temporary left
    back = BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=2, strict=True, **REF)
    for k, v in old.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k
    new.save_pretrained(tmp_path)  # and a save that works replaces both
    assert (
        BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=2, strict=True, **REF).max_latent_size == 6
    )


@pytest.mark.parametrize("kept", [0, 0.5])
def test_strict_refuses_missing_keys(tmp_path, kept):
    model = random_model()
    keys = list(model.model.state_dict())
    save_checkpoint(model, tmp_path, config=model.config, keys=keys[: int(kept * len(keys))])
    with pytest.raises(ValueError, match="strict=True: .* missing from the checkpoint"):
        BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=2, strict=True, **REF)
    # stage 1 needs only the understanding keys: a stage-2 checkpoint without generation keys is complete
    und = [k for k in keys if classify_key(k) == "und"]
    save_checkpoint(model, tmp_path, config=model.config, keys=und)
    BagelForUnifiedMultimodal.from_pretrained(tmp_path, stage=1, strict=True, **REF)


def test_meta_device_loads_nothing(ckpt):
    path, sd = ckpt
    model = BagelForUnifiedMultimodal.from_pretrained(path, stage=2, device="meta", **REF)
    r = model.load_report
    assert r.loaded == [] and set(r.on_meta) == set(sd) and not r.missing
    assert all(p.is_meta for p in model.parameters())


def test_from_pretrained_arguments(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(ValueError, match="max_latent_sise.*did you mean 'max_latent_size'"):
        BagelForUnifiedMultimodal.from_pretrained(path, stage=2, max_latent_sise=4, **REF)
    with pytest.raises(ValueError, match="max_latent_sise"):
        BagelConfig.from_pretrained(path, max_latent_sise=4)
    assert (
        BagelForUnifiedMultimodal.from_pretrained(
            path, stage=2, dtype="torch.float16", **REF
        ).model.vae2llm.weight.dtype
        == torch.float16
    )
    for bad in ("bfloat17", "int8", torch.int64, 3):
        with pytest.raises(ValueError, match="dtype="):
            BagelForUnifiedMultimodal.from_pretrained(path, stage=2, dtype=bad, **REF)
    with pytest.raises(ValueError, match="device="):
        BagelForUnifiedMultimodal.from_pretrained(path, stage=2, device="gpu0", **REF)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            BagelForUnifiedMultimodal.from_pretrained(path, stage=2, device="cuda", **REF)
    for bad in ("²", "stage²", "٢", 2.0, None):
        with pytest.raises(ValueError, match="stage"):
            BagelForUnifiedMultimodal.from_pretrained(path, stage=bad, **REF)
    with pytest.raises(ValueError, match="strict must be a bool"):
        BagelForUnifiedMultimodal.from_pretrained(path, stage=2, strict="yes", **REF)


def test_upstream_layout_with_a_0d_position_table(ckpt, tmp_path):
    path, _ = ckpt
    cfg = BagelConfig.from_pretrained(path)
    with open(tmp_path / "llm_config.json", "w") as f:
        json.dump(cfg.text_config.to_dict(), f)
    for table in (torch.tensor(3.0), torch.zeros(10, 64)):  # 0-d; 10 rows: not a square grid
        save_file({"latent_pos_embed.pos_embed": table}, str(tmp_path / "ema.safetensors"))
        with pytest.raises(ValueError, match="latent_pos_embed.pos_embed.*square grid"):
            BagelConfig.from_pretrained(tmp_path)


def test_save_refuses_meta_tensors_and_unknown_keys(tmp_path):
    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(BagelConfig.tiny(), **REF)
    with pytest.raises(ValueError, match="meta device"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="keys: 1 name"):
        save_checkpoint(random_model(), tmp_path, keys=["vae2llm.weight", "nope"])
    assert os.listdir(tmp_path) == []

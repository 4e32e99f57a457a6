"""Issue 23 (hostile input, round two), the kernel side: one test per item; each failed before its fix.

Items 3, 17 (flex on meta) and 18 (TRITON_INTERPRET read as Triton reads it) are tested with the
dispatcher in ``tests/test_dispatch.py``."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
import torch

from bagel_kernels import PackedMask, mot, packed_attention
from bagel_kernels import attention_configs as ac
from bagel_kernels import patch_embed as pe
from bagel_kernels.attention import flex_kv_blocks, prepare_attention
from bagel_kernels.attention_triton import default_config, op_params, prepare_mask, triton_packed_attention
from bagel_kernels.reference import attention_reference

META = torch.device("meta")


def _mask() -> PackedMask:
    return PackedMask.from_splits([6, 4, 3], [2, 4, 4, 3], ["causal", "full", "noise", "causal"])


# ------------------------------------------------------------------------------ 1. fakes check devices
def _ops():
    x = torch.randn(5, 8)
    w = torch.ones(8)
    W = torch.randn(3, 8)
    g = torch.randn(5, 8)
    mask = _mask().truncated(13)
    cfg = default_config(torch.device("cpu"), torch.float32, 16)
    fwd_t, bwd_t = prepare_mask(mask, cfg, False)
    blocks, launch = op_params(cfg, False)
    q = torch.randn(13, 2, 16)
    lo, hi, _ = mask.vectors()
    ops = torch.ops.bagel_kernels
    return {
        "permute_rows": lambda: ops.permute_rows(x, torch.arange(5, device=META)),
        "mot_rms_norm": lambda: ops.mot_rms_norm(x, 2, w.to(META), w.to(META), 1e-6),
        "mot_linear": lambda: ops.mot_linear(x, 2, W.to(META), None, W.to(META), None),
        "swiglu_backward": lambda: ops.swiglu_backward(g.to(META), g, g),
        "packed_attention_fwd": lambda: ops.packed_attention_fwd(
            q, q, q, lo.to(META), hi, None, list(fwd_t), list(bwd_t), 0.25, list(blocks), list(launch)
        ),
    }


@pytest.mark.parametrize(
    "op", ["permute_rows", "mot_rms_norm", "mot_linear", "swiglu_backward", "packed_attention_fwd"]
)
def test_registered_op_with_one_argument_on_meta_is_refused(op):
    """The dispatcher runs an op's fake whenever one argument is on meta; the fake allocated on the first
    argument's device (CPU) and handed back uninitialised memory. Every fake checks devices now."""
    with pytest.raises(ValueError, match="is on meta"):
        _ops()[op]()


@pytest.mark.skipif(not pe.extension_status().cpu, reason="the compiled extension is not built")
def test_extension_op_with_pos_ids_on_meta_is_refused():
    x, w, table = torch.randn(3, 12), torch.randn(5, 12), torch.randn(4, 5)
    ids = torch.zeros(3, dtype=torch.long, device=META)
    with pytest.raises(ValueError, match="pos_ids is on meta"):
        torch.ops.bagel_kernels_ext.fused_patch_embed(x, w, None, table, ids, None, 0, True)


# ------------------------------------------------------------------------------ 5. truncation
@pytest.mark.parametrize("block", [2.7, "16", True, 16.0])
def test_block_tables_refuse_non_int_sizes(block):
    mask = _mask()
    with pytest.raises(ValueError, match="block_m must be an int"):
        mask.block_tables(block, 16)
    with pytest.raises(ValueError, match="block_n must be an int"):
        mask.block_tables(16, block)


def _table(tmp_path, name="t.json", **entry):
    e = {"arch": "sm90", "triton": "3.6", "dtype": "bf16", "head_dim": 128, "config": {"block_m": 64}}
    e.update(entry)
    path = tmp_path / name
    path.write_text(json.dumps({"format": ac.TABLE_FORMAT, "entries": [e]}))
    return path


@pytest.mark.parametrize("head_dim", [64.9, True, "64", 0, 257])
def test_tuned_table_head_dim_must_be_an_int(tmp_path, head_dim):
    with pytest.raises(ValueError, match="entry 0: head_dim"):
        ac.load_tuned_table(_table(tmp_path, head_dim=head_dim))


# ------------------------------------------------------------------------------ 11. tuned-table loader
@pytest.mark.parametrize(
    "field,value",
    [("block_m", 24), ("block_n", 2**20), ("fwd_warps", 3), ("bwd_stages", 100), ("onepass_block_n", 8)],
)
def test_tuned_table_tiles_follow_the_launchers_rules(tmp_path, monkeypatch, field, value):
    """A tile the launcher refuses is refused at load (naming the field), and the configuration falls
    back to the defaults with a warning instead of failing every later Triton call."""
    path = _table(tmp_path, config={field: value})
    with pytest.raises(ValueError, match=f"{field}={value}"):
        ac.load_tuned_table(path)
    monkeypatch.setenv(ac.TABLE_ENV, str(path))
    ac.clear_table_cache()
    try:
        with pytest.warns(UserWarning, match=f"{field}={value}"):
            cfg = ac.config_for(90, torch.bfloat16, 128, "3.6")
        assert cfg == ac.default_for(90, False, 128, "3.6")
    finally:
        ac.clear_table_cache()


def test_tuned_table_refuses_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="entry 0: dtype 'fp8'"):
        ac.load_tuned_table(_table(tmp_path, dtype="fp8"))


def test_tuned_table_missing_env_file_and_directory_warn(tmp_path, monkeypatch):
    ac.clear_table_cache()
    try:
        for path, why in ((tmp_path / "missing.json", "does not exist"), (tmp_path, "is a directory")):
            monkeypatch.setenv(ac.TABLE_ENV, str(path))
            ac.clear_table_cache()
            with pytest.warns(UserWarning, match=why):
                assert ac.config_for(90, torch.bfloat16, 128, "3.6") == ac.default_for(90, False, 128, "3.6")
        with pytest.raises(ValueError, match="is a directory"):
            ac.load_tuned_table(tmp_path)
    finally:
        ac.clear_table_cache()


# ------------------------------------------------------------------------------ 12. immutable mask
def test_mask_vectors_cannot_be_edited_after_construction():
    """``kv_lo[7] = 0`` used to change the mask (sdpa and flex then disagreed); now the attributes are
    copies, and every backend still computes the original mask."""
    mask = _mask()
    before = mask.to_dense()
    mask.kv_lo[7] = 0
    mask.kv_hi[0] = 0
    assert torch.equal(mask.to_dense(), before)
    with pytest.raises(AttributeError, match="immutable"):
        mask.kv_lo = torch.zeros(13, dtype=torch.int32)
    with pytest.raises(AttributeError, match="immutable"):
        mask._lo = torch.zeros(13, dtype=torch.int32)
    torch.manual_seed(0)
    q, k, v = torch.randn(13, 2, 16), torch.randn(13, 1, 16), torch.randn(13, 1, 16)
    ref = attention_reference(q.double(), k.double(), v.double(), _mask())
    for backend in ("sdpa", "flex"):
        torch.testing.assert_close(
            packed_attention(q, k, v, mask, backend=backend).double(), ref, atol=1e-5, rtol=1e-5
        )
    flex_kv_blocks(mask)  # derived values live outside the mask
    assert not any(name.startswith("_cache") or name == "_tables" for name in vars(mask))


# ------------------------------------------------------------------------------ 13. loose types
def test_loose_types_are_refused():
    mask = _mask()
    q = torch.randn(13, 2, 16)
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        packed_attention(q, q, q, mask, deterministic="no")
    with pytest.raises(ValueError, match="softmax_scale must be a real number"):
        triton_packed_attention(q, q, q, mask, scale=True)
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        triton_packed_attention(q, q, q, mask, deterministic="no")
    with pytest.raises(ValueError, match="head_dim must be an int"):
        prepare_attention(mask, torch.device("cpu"), torch.float32, "64")
    x, w = torch.randn(4, 8), torch.ones(8)
    for eps in (math.inf, math.nan, -1.0, "1e-6", True):
        with pytest.raises(ValueError, match="eps must be"):
            mot.mot_rms_norm(x, 2, w, w, eps=eps)
    pos = torch.arange(4)
    for theta in (math.inf, 0.0, -1.0, True):
        with pytest.raises(ValueError, match="theta must be"):
            mot.rope_cos_sin(pos, 8, theta)


# ------------------------------------------------------------------------------ 14. command lines
@pytest.mark.parametrize("args", [["--seed", str(10**30)], ["--tokens", "50000000"], ["--seed", "-1"]])
def test_kernels_check_refuses_unbounded_values_at_once(args, capsys):
    from bagel_kernels.check import main

    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and time.perf_counter() - t0 < 5
    assert args[0] in capsys.readouterr().err


def test_compile_check_merge_and_json_errors_are_usage_errors(tmp_path, monkeypatch, capsys):
    from bagel_kernels import compile_check

    garbage = tmp_path / "g.json"
    garbage.write_text("not json")
    wrong = tmp_path / "w.json"
    wrong.write_text('{"a": 1}')
    for path, why in ((tmp_path / "missing.json", "cannot be read"), (garbage, "not a JSON file"),
                      (wrong, "not a compile_check --json report")):  # fmt: skip
        assert compile_check.main(["--merge", str(path)]) == 2
        assert why in capsys.readouterr().err
    # --json into a folder that does not exist: refused before anything is compiled
    monkeypatch.setattr(
        compile_check, "collect_specs", lambda *a: pytest.fail("compiled before checking --json")
    )
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert compile_check.main(["--json", str(tmp_path / "nope" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 15. empty inputs
@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("cpu_ext", marks=pytest.mark.skipif(not pe.extension_status().cpu, reason="no ext")),
    ],
)
def test_patch_embed_images_with_no_patches(backend):
    images = torch.randn(1, 3, 28, 28, requires_grad=True)
    w = torch.randn(8, 3 * 14 * 14, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    table = torch.randn(4, 8, requires_grad=True)
    coords, ids = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    out = pe.fused_patch_embed_images(images, coords, 14, w, b, table, ids, backend=backend)
    assert out.shape == (0, 8)
    out.sum().backward()
    for t in (images, w, b, table):
        assert t.grad is not None and not t.grad.any()


@pytest.mark.parametrize("shape", [(0, 4), (0, 2, 3)])
def test_permute_rows_triton_with_no_rows(shape):
    x = torch.randn(*shape, requires_grad=True)
    y = mot.permute_rows(x, torch.zeros(0, dtype=torch.long), backend="triton")
    y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape


# ------------------------------------------------------------------------------ 17. messages
def test_messages_name_the_problem():
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        pe.image_patch_coords([(28, 28)], 0)
    mask = _mask()
    q = torch.randn(13, 2, 16)
    with pytest.raises(ValueError, match="config must be an AttnConfig"):
        triton_packed_attention(q, q, q, mask, config={"block_m": 64})
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="block_n=1099511627776 must be a positive block size"):
        mask.block_tables(16, 2**40)
    assert time.perf_counter() - t0 < 1


def test_numpy_float_eps_is_accepted():
    x, w = torch.randn(4, 8), torch.rand(8)
    got = mot.mot_rms_norm(x, 2, w, w, eps=np.float32(1e-6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = mot.mot_rms_norm(x, 2, w, w, eps=float(np.float32(1e-6)))
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------ issue 20: no device reads
def _kernel_step(dev: str, attention: str, mot_backend: str):
    """Mask from splits, truncation, grouped order, row index, preparation, the MoT permutation and
    RMSNorm, packed attention, and a backward: everything the model's forward asks of the kernels."""
    mask = PackedMask.from_splits([6, 5, 4], [2, 4, 5, 4], ["causal", "full", "noise", "causal"], device=dev)
    T = 11
    und = torch.tensor([0, 1, 2, 3, 4, 5, 10], device=dev)
    gen = torch.tensor([6, 7, 8, 9], device=dev)
    order = mot.grouped_order(und, gen, T)
    pmask = mask.truncated(T).with_row_index(order)
    prepare_attention(pmask, torch.device(dev), torch.float32, 16, attention)
    q = torch.randn(T, 4, 16, device=dev, requires_grad=True)
    k = torch.randn(T, 2, 16, device=dev, requires_grad=True)
    x = torch.randn(T, 32, device=dev, requires_grad=True)
    w = torch.ones(32, device=dev, requires_grad=True)
    h = mot.mot_rms_norm(
        mot.group_rows(x, order, backend=mot_backend), order.n_und, w, w, backend=mot_backend
    )
    out = packed_attention(q, k, k, pmask, backend=attention)
    (out.sum() + mot.ungroup_rows(h, order, backend=mot_backend).sum()).backward()
    return out, q.grad, k.grad, x.grad, w.grad


@pytest.mark.parametrize("attention,mot_backend", [("sdpa", "torch"), ("triton", "triton")])
def test_kernel_side_of_a_forward_runs_under_fake_tensors(attention, mot_backend):
    """Under FakeTensorMode (shapes, no data) nothing on the kernel side reads a tensor's values: the mask
    is checked and its tables built from its host copy, value checks skip tensors without data, and the
    Triton paths run their registered ops' fakes. (On meta tensors too, with the reference backends.)"""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        got = _kernel_step("cpu", attention, mot_backend)
    assert all(isinstance(t, FakeTensor) for t in got)
    assert [tuple(t.shape) for t in got] == [(11, 4, 16), (11, 4, 16), (11, 2, 16), (11, 32), (32,)]
    if attention == "sdpa":
        assert all(t.device.type == "meta" for t in _kernel_step("meta", attention, mot_backend))

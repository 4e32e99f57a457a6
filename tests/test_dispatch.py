"""The backend dispatcher (``bagel_kernels.dispatch``): declarations, "auto" priority, refusals that list
every backend's reasons, for every op family, through the public functions as well as directly."""

from __future__ import annotations

import pytest
import torch

from bagel import backend_names
from bagel.model.backend import FAMILIES, BagelBackendConfig
from bagel_kernels import PackedMask, mot, packed_attention
from bagel_kernels import patch_embed as pe
from bagel_kernels.attention import ATTENTION
from bagel_kernels.dispatch import Backend, Family, Request

CPU = torch.device("cpu")


def _toy() -> Family:
    return Family(
        "toy",
        {
            "kern": Backend(
                "kern",
                devices=("cuda",),
                dtypes=(torch.float16,),
                limits={"width": (1, 64)},
                interpreted=True,
                hook=lambda r: ["no backward here"] if r.backward else [],
            ),
            "ref": Backend("ref", dtypes=(torch.float32, torch.float16)),
        },
        auto={"cuda": ("kern", "ref"), "*": ("ref",)},
    )


# ---------------------------------------------------------------------------------------------- mechanism
def test_declarations_give_the_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kern = _toy().backends["kern"]
    why = kern.reasons(Request(CPU, torch.float64, {"width": 100}, backward=True))
    assert len(why) == 4, why
    assert "runs on cuda tensors (got cpu" in why[0] and "TRITON_INTERPRET=1" in why[0]
    assert "takes float16 inputs (got float64)" in why[1]
    assert "width 100 is outside its limits [1, 64]" in why[2]
    assert why[3] == "no backward here"
    assert kern.reasons(Request(torch.device("cuda"), torch.float16, {"width": 64})) == []
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # an interpreted backend then runs on CPU tensors
    assert kern.reasons(Request(CPU, torch.float16, {"width": 8})) == []


def test_auto_takes_the_device_priority_and_names_are_checked():
    toy = _toy()
    assert toy.names == ("auto", "kern", "ref")
    cuda16 = Request(torch.device("cuda"), torch.float16, {"width": 8})
    assert toy.choose("auto", cuda16).name == "kern"
    choice = toy.choose("auto", Request(torch.device("cuda"), torch.float32))
    assert choice.name == "ref" and list(choice.skipped) == ["kern"]
    assert toy.choose("auto", Request(CPU, torch.float16)).name == "ref"  # never "kern" on the CPU
    assert toy.available(Request(torch.device("cuda"), torch.float16)) == ["kern", "ref"]
    for bad in ("nope", None, 3):
        with pytest.raises(ValueError, match="unknown toy backend .*must be one of 'auto', 'kern', 'ref'"):
            toy.choose(bad, cuda16)


def test_a_refusal_lists_every_backend_with_its_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    toy = _toy()
    with pytest.raises(ValueError) as info:
        toy.choose("auto", Request(CPU, torch.float64, backward=True))
    msg = str(info.value)
    head = "no toy backend accepts these inputs (float64 on cpu, with backward; auto tries ref)"
    assert msg.startswith(head)
    assert "kern: runs on cuda tensors" in msg and "no backward here" in msg
    assert "ref: takes float32, float16 inputs (got float64)" in msg
    with pytest.raises(ValueError) as info:
        toy.choose("kern", Request(CPU, torch.float16))
    msg = str(info.value)
    assert msg.startswith("toy backend 'kern' refuses these inputs (float16 on cpu)")
    assert "kern: runs on cuda tensors" in msg and "ref: accepts" in msg


def test_family_declarations_are_checked():
    with pytest.raises(ValueError, match="unknown backends"):
        Family("f", {"a": Backend("a")}, auto={"*": ("a", "b")})
    with pytest.raises(ValueError, match="named"):
        Family("f", {"a": Backend("b")}, auto={"*": ("a",)})
    with pytest.raises(ValueError, match="'\\*' entry"):
        Family("f", {"a": Backend("a")}, auto={"cuda": ("a",)})


# ---------------------------------------------------------------------------------------------- the families
def test_names_come_from_the_families():
    """BagelBackendConfig validates against the families; bagel.backend_names (the torch-free copy the
    demo's argument parser uses) equals them."""
    assert {f: fam.names for f, fam in FAMILIES.items()} == {
        "attention": backend_names.ATTENTION_BACKENDS,
        "mot": backend_names.MOT_BACKENDS,
        "patch_embed": backend_names.PATCH_EMBED_BACKENDS,
    }
    assert mot.BACKENDS == FAMILIES["mot"].names and pe.BACKENDS == FAMILIES["patch_embed"].names
    for field, fam in FAMILIES.items():
        for name in fam.names:
            BagelBackendConfig(**{field: name})


def test_auto_priorities():
    cuda = torch.device("cuda")
    assert ATTENTION.priority("cuda") == ("triton", "flex", "sdpa")
    assert ATTENTION.priority("cpu") == ("sdpa", "flex")
    assert FAMILIES["mot"].priority("cuda") == ("triton", "torch")
    assert FAMILIES["mot"].priority("cpu") == ("torch",)
    assert FAMILIES["patch_embed"].priority("cuda") == ("cuda", "torch")
    assert FAMILIES["patch_embed"].priority("cpu") == ("torch",)
    # a request MoT's kernels cannot hold goes to torch on CUDA, without any GPU here
    wide = Request(cuda, torch.float32, {"row_width": 40000})
    assert FAMILIES["mot"].choose("auto", wide).name == "torch"


def test_attention_refusal_lists_every_backend():
    mask = PackedMask.from_splits([5], [5], ["causal"])
    q = torch.randn(5, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        packed_attention(q, q, q, mask, backend="triton")
    msg = str(info.value)
    assert "attention backend 'triton' refuses these inputs (float64 on cpu" in msg
    assert "triton: " in msg and "takes float16, bfloat16, float32 inputs (got float64)" in msg
    assert "flex: accepts" in msg and "sdpa: accepts" in msg


def test_attention_auto_refusal_lists_every_backend(monkeypatch):
    """With sdpa declared CUDA-only, "auto" on the CPU has nothing left for a backward (flex has none
    there): the error names all three backends and why."""
    sdpa = ATTENTION.backends["sdpa"]
    monkeypatch.setitem(ATTENTION.backends, "sdpa", Backend("sdpa", devices=("cuda",), impl=sdpa.impl))
    mask = PackedMask.from_splits([5], [5], ["causal"])
    q = torch.randn(5, 2, 16, requires_grad=True)
    with pytest.raises(ValueError) as info:
        packed_attention(q, q, q, mask)
    msg = str(info.value)
    assert "no attention backend accepts these inputs (float32 on cpu, head_dim 16, with backward" in msg
    assert "sdpa: runs on cuda tensors (got cpu)" in msg
    assert "flex: FlexAttention has no backward on CPU" in msg
    assert "triton: " in msg


def test_mot_refusal_lists_every_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, 40000)
    w = torch.ones(40000)
    with pytest.raises(ValueError) as info:
        mot.mot_rms_norm(x, 1, w, w, backend="triton")
    msg = str(info.value)
    assert "mot backend 'triton' refuses these inputs (float32 on cpu, row_width 40000)" in msg
    assert "row_width 40000 is outside its limits [0, 32768]" in msg and "torch: accepts" in msg
    torch.testing.assert_close(mot.mot_rms_norm(x, 1, w, w), mot.mot_rms_norm(x, 1, w, w, backend="torch"))


def test_patch_embed_refusal_lists_every_backend():
    x, w = torch.randn(3, 12), torch.randn(5, 12)
    with pytest.raises(ValueError) as info:
        pe.fused_patch_embed(x, w, backend="cuda")
    msg = str(info.value)
    assert "patch_embed backend 'cuda' refuses these inputs (float32 on cpu)" in msg
    assert "cuda: runs on cuda tensors (got cpu)" in msg and "cpu_ext: " in msg and "torch: accepts" in msg
    with pytest.raises(ValueError, match="unknown patch_embed backend 'triton'"):
        pe.fused_patch_embed(x, w, backend="triton")

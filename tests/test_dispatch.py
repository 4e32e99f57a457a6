"""The backend dispatcher (``bagel_kernels.dispatch``): declarations, "auto" priority, refusals that list
every backend's reasons, for every op family, through the public functions as well as directly."""

from __future__ import annotations

import pytest
import torch

from bagel.model.backend import FAMILIES, BagelBackendConfig
from bagel_kernels import PackedMask, backends, mot, packed_attention
from bagel_kernels import patch_embed as pe
from bagel_kernels.attention import ATTENTION
from bagel_kernels.dispatch import Backend, Family, Request, families

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
    """BagelBackendConfig validates against the registries, whose names are the torch-free declarations
    of bagel_kernels.backends (what the demo's argument parser reads); a registry that differs from its
    declaration refuses to build."""
    assert {f: fam.names for f, fam in FAMILIES.items()} == {f: backends.names(f) for f in FAMILIES}
    assert {name: fam.names for name, fam in families().items()} == {
        name: backends.names(name) for name in backends.BACKEND_NAMES
    }
    with pytest.raises(ValueError, match="differ from the names declared"):
        Family("mot", {"torch": Backend("torch")}, auto={"*": ("torch",)})
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


# ---------------------------------------------------------------------------------------------- registries
def test_registries_declare_row_index_preparation_and_compile_specs():
    """Everything about a backend is in its family's registry: prepare_attention runs the declared
    preparation, packed_attention gathers rows only for backends that do not read the row index, and
    compile_check's module list is the registries' compile specs."""
    from bagel_kernels.compile_check import MODULES

    assert [n for n, be in ATTENTION.backends.items() if be.row_index] == ["triton"]
    assert ATTENTION.backends["flex"].prepare is not None and ATTENTION.backends["sdpa"].prepare is None
    declared = [be.compile_specs for fam in families().values() for be in fam.backends.values()]
    assert [m for m in declared if m] == [m for m in MODULES if m in declared]
    assert MODULES[:2] == ["bagel_kernels.attention_triton", "bagel_kernels.mot_triton"]


def test_backend_names_module_imports_no_torch():
    """The names and the interpreter switch load without torch (command lines refuse bad names at once)."""
    import subprocess
    import sys

    code = "import sys, bagel_kernels.backends as b; print(b.names('mot'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('auto', 'triton', 'torch') False"


@pytest.mark.parametrize(
    "value", ["1", "true", "TRUE", "On", "yes", "Y", "0", "false", "off", "", " 1", "2", "t"]
)
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value):
    """Issue 23 item 18: TRITON_INTERPRET=true is on for Triton, so it is on for the package too (and the
    dispatcher lets an interpreted backend take CPU tensors); values Triton reads as off stay off."""
    knobs = pytest.importorskip("triton.knobs")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backends.interpreting() == bool(knobs.runtime.interpret)
    kern = _toy().backends["kern"]
    reasons = kern.reasons(Request(CPU, torch.float16, {"width": 8}))
    assert (reasons == []) == backends.interpreting()


def test_available_backends_on_cuda_without_a_gpu(monkeypatch):
    """Issue 23 item 3: with no CUDA device visible, no backend is available on "cuda"."""
    from bagel_kernels import available_backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert available_backends("cuda") == [] and available_backends("cuda:1") == []
    assert available_backends("cpu")[:1] == ["sdpa"]


def test_flex_on_meta_is_refused_with_a_reason():
    """Issue 23 item 17: the dispatcher says why flex cannot take meta tensors, instead of accepting them
    and failing deep inside FlexAttention."""
    mask = PackedMask.from_splits([5], [5], ["causal"]).to("meta")
    q = torch.empty(5, 2, 16, device="meta")
    with pytest.raises(ValueError, match="flex: FlexAttention cannot run on meta tensors"):
        packed_attention(q, q, q, mask, backend="flex")
    out = packed_attention(q, q, q, mask, backend="sdpa")  # the reference runs on meta: shapes only
    assert out.shape == (5, 2, 16) and out.device.type == "meta"

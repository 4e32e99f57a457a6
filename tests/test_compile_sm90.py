"""Every Triton kernel of the package compiles for sm_90 (Hopper) and sm_80 (A100) on a machine without
a GPU, as the runtime specialises the launches the model makes, with no register spill inside a loop,
shared memory within the architecture's limit and tensor cores in the attention loops.

``bagel_kernels.compile_check`` needs the real ``JITFunction`` objects, so it runs in a subprocess
with TRITON_INTERPRET removed from the environment (conftest sets it for this process). The compiles
take a minute or two per module (``slow``; CI's full run includes them).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bagel_kernels.compile_check import MODULES, collect_specs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_check(*args: str, extra_path: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    paths = [p for p in (extra_path, _ROOT, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run(
        [sys.executable, "-m", "bagel_kernels.compile_check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=_ROOT,
    )


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_module_kernels_compile_for_sm90(module):
    """Both architectures; a spill inside a loop, too much shared memory or an attention loop without
    tensor-core MMA fails the check (the resource table is printed on failure)."""
    assert importlib.util.find_spec(module) is not None, f"{module} is listed in MODULES but not importable"
    args = ["--module", module, "--report"]
    if os.environ.get("COMPILE_JSON_DIR"):  # CI merges the tables of both Triton versions
        import triton

        os.makedirs(os.environ["COMPILE_JSON_DIR"], exist_ok=True)
        name = f"compile_check_{module.rsplit('.', 1)[-1]}_triton{triton.__version__}.json"
        args += ["--json", os.path.join(os.environ["COMPILE_JSON_DIR"], name)]
    proc = _run_check(*args)
    report = proc.stdout + proc.stderr
    assert "no compile_specs()" not in report, report  # every module in MODULES registers its kernels
    assert proc.returncode == 0, report
    assert "FAIL" not in report, report
    assert "OK   sm_90" in report and "OK   sm_80" in report, report
    assert "| regs |" in report and "| spill in loop |" in report, report


def test_attention_specs_cover_the_model_shapes():
    """The registry names the kernels and shapes the model runs (Qwen2 D=128 with and without the
    MoT row index, SigLIP D=72), each with fwd, delta and bwd kernels, and the one-pass backward
    (delta with the dQ accumulator zeroed, the one-pass program, the dQ cast) at the same shapes; the
    padded D=72 layout (``dsplit=0``) and, on sm_90, the forward with TMA."""
    specs, notes, errors = collect_specs(["bagel_kernels.attention_triton"])
    assert not errors and not notes
    names = {s[0].split(":", 1)[1] for s in specs}
    for tag in ("bf16_d128", "bf16_d128_ridx", "bf16_d72", "fp32_d128", "bf16_d72_pad"):
        for kind in ("attn_fwd", "attn_bwd_delta", "attn_bwd"):
            assert f"{kind}_{tag}" in names
    for tag in ("bf16_d128_1p", "bf16_d128_ridx_1p", "bf16_d72_1p", "fp32_d128_1p"):
        for kind in ("attn_bwd_delta", "attn_bwd_onepass", "attn_dq_cast"):
            assert f"{kind}_{tag}" in names
        assert f"attn_fwd_{tag}" not in names and f"attn_bwd_{tag}" not in names
    assert {"attn_fwd_bf16_d128_tma", "attn_fwd_bf16_d72_tma"} <= names
    for name, fn, sig, const, opts in specs:
        assert set(sig) == set(fn.arg_names), name
        assert {a for a, t in sig.items() if t == "constexpr"} == set(const), name
        assert opts.get("num_warps") in (4, 8), name
    sm80 = {s[0] for s in collect_specs(["bagel_kernels.attention_triton"], 80)[0]}
    assert sm80 >= {
        f"attention_triton:{kind}_{tag}"
        for tag in ("bf16_d128", "bf16_d128_ridx", "bf16_d72")
        for kind in ("attn_fwd", "attn_bwd_delta", "attn_bwd")
    }
    assert sm80 >= {f"attention_triton:attn_bwd_onepass_{tag}_1p" for tag in ("bf16_d128", "bf16_d72")}
    assert not any("tma" in n for n in sm80)  # no TMA before sm_90


def test_specs_specialise_like_the_runtime():
    """Specs come from Triton's own binder applied to the launchers' arguments at model layouts:
    SigLIP's q/k/v are views of a fused qkv output (row stride 3456, head stride 72), so the head
    stride is not divisible by 16; the launcher passes strides divided by ALIGN = 8 (8 bf16 = one
    16-byte vector) and 72 / 8 = 9 stays unspecialised; GROUP = 1 (16/16 heads) becomes a constant,
    as the runtime makes every integer argument equal to 1; the pack length 16381 is no multiple of 16.
    Head dim 72 runs as two column blocks of 64 + 16 (``DA``, ``DB``), the padded layout of
    ``dsplit=0`` as one block of 128 (what ``D_PAD`` was before the split)."""
    specs = {s[0]: s for s in collect_specs(["bagel_kernels.attention_triton"], 90)[0]}
    _, _, sig, const, opts = specs["attention_triton:attn_fwd_bf16_d72"]
    div = set(opts["divisible_by_16"])
    assert const["ALIGN"] == 8 and const["D"] == 72 and (const["DA"], const["DB"]) == (64, 16)
    pad = specs["attention_triton:attn_fwd_bf16_d72_pad"][3]
    assert (pad["DA"], pad["DB"]) == (128, 0)
    assert const["USE_TMA"] is False and specs["attention_triton:attn_fwd_bf16_d72_tma"][3]["USE_TMA"] is True
    assert "stride_qt" in div and "stride_qh" not in div and "N" not in div
    assert {"Q", "K", "V", "Out", "LSE"} <= div  # k and v start 1152 and 2304 elements in: aligned
    assert sig["GROUP"] == "constexpr" and const["GROUP"] == 1
    assert sig["Q"] == "*bf16" and sig["qk_scale"] == "fp32"
    _, _, sig, const, opts = specs["attention_triton:attn_fwd_bf16_d128"]
    assert const["ALIGN"] == 8 and sig["GROUP"] == "i32" and "HQ" not in opts["divisible_by_16"]
    assert {"stride_qt", "stride_qh", "stride_kt", "stride_kh"} <= set(opts["divisible_by_16"])
    assert opts.get("expect_mma") is True
    assert not specs["attention_triton:attn_fwd_fp32_d128"][4].get("expect_mma")
    # the launch parameters are those of the sm_90 table for bf16, head dim 128
    from bagel_kernels.attention_configs import config_for

    cfg = config_for(90, torch.bfloat16, 128)
    _, _, _, const, opts = specs["attention_triton:attn_bwd_bf16_d128"]
    assert (const["BLOCK_M1"], const["BLOCK_N1"], const["BLOCK_M2"], const["BLOCK_N2"]) == tuple(
        cfg.blocks()[2:]
    )
    assert (opts["num_warps"], opts["num_stages"]) == (cfg.bwd_warps, cfg.bwd_stages)


def test_sass_loop_analysis():
    from bagel_kernels.compile_check import sass_loops

    sass = """
        /*0100*/                   MOV R1, R2 ;
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0120*/                   STL [R1], R3 ;
        /*0130*/               @P0 BRA 0x110 ;
        /*0140*/                   LDL R3, [R1] ;
        /*0150*/                   BRA 0x150;
    """
    loops, insts = sass_loops(sass)
    assert loops == [(0x110, 0x130)]
    assert [a for a, t in insts if "STL" in t or "LDL" in t] == [0x120, 0x140]


def test_failures_are_reported(tmp_path):
    """A kernel the GPU compiler rejects gives FAIL and a non-zero exit; good kernels still pass."""
    (tmp_path / "bk_broken_kernels.py").write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl

            @triton.jit
            def good(X, n, BLOCK: tl.constexpr):
                o = tl.arange(0, BLOCK)
                tl.store(X + o, tl.load(X + o, mask=o < n) * 2, mask=o < n)

            @triton.jit
            def bad(X, BLOCK: tl.constexpr):
                o = tl.arange(0, BLOCK)  # not a power of two below
                tl.store(X + o, tl.load(X + o))

            def compile_specs(arch):
                return [
                    ("good", good, {"X": "*fp16", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128}),
                    ("bad", bad, {"X": "*fp16", "BLOCK": "constexpr"}, {"BLOCK": 100}, {"num_warps": 4}),
                ]
            """
        )
    )
    proc = _run_check("--module", "bk_broken_kernels", extra_path=str(tmp_path), timeout=300)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 1, report
    for arch in ("sm_90", "sm_80"):
        assert f"OK   {arch} bk_broken_kernels:good" in report, report
        assert f"FAIL {arch} bk_broken_kernels:bad" in report, report


@pytest.mark.slow
def test_resource_failures_are_reported(tmp_path):
    """A kernel that spills inside its loop, one that needs more shared memory than sm_90 has, and a
    dot loop without tensor cores where the spec expects them: each FAILs, with the reason."""
    (tmp_path / "bk_resource_kernels.py").write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl

            @triton.jit
            def spills(X, Y, n, BLOCK: tl.constexpr):
                r = tl.arange(0, BLOCK)
                offs = r[:, None] * BLOCK + r[None, :]
                acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
                for i in range(n):
                    x = tl.load(X + i * BLOCK * BLOCK + offs).to(tl.float32)
                    acc = acc * x + tl.exp(x)
                tl.store(Y + offs, acc)

            @triton.jit
            def dots(X, Y, n, BLOCK: tl.constexpr, PREC: tl.constexpr):
                r = tl.arange(0, BLOCK)
                offs = r[:, None] * BLOCK + r[None, :]
                acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
                for i in range(n):
                    a = tl.load(X + i * BLOCK * BLOCK + offs)
                    b = tl.load(X + (i + 1) * BLOCK * BLOCK + offs)
                    acc = tl.dot(a, b, acc, input_precision=PREC)
                tl.store(Y + offs, acc)

            def compile_specs(arch):
                sig = {"X": "*bf16", "Y": "*fp32", "n": "i32", "BLOCK": "constexpr"}
                sig_d = dict(sig, PREC="constexpr")
                f32 = dict(sig_d, X="*fp32")
                return [
                    ("spills", spills, sig, {"BLOCK": 64}, {"num_warps": 1, "num_stages": 1, "maxnreg": 64}),
                    ("big_smem", dots, sig_d, {"BLOCK": 128, "PREC": "tf32"}, {"num_warps": 4, "num_stages": 8}),
                    ("no_mma", dots, f32, {"BLOCK": 32, "PREC": "ieee"}, {"num_warps": 4, "expect_mma": True}),
                    ("mma", dots, sig_d, {"BLOCK": 64, "PREC": "tf32"}, {"num_warps": 4, "expect_mma": True}),
                ]
            """
        )
    )
    proc = _run_check(
        "--module", "bk_resource_kernels", "--arch", "90", "--report", extra_path=str(tmp_path), timeout=300
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 1, report
    assert "FAIL sm_90 bk_resource_kernels:spills: spills inside a loop" in report, report
    assert "FAIL sm_90 bk_resource_kernels:big_smem: needs 524288 B of shared memory" in report, report
    assert "FAIL sm_90 bk_resource_kernels:no_mma: no tensor-core MMA (HGMMA) in its loops" in report, report
    assert "OK   sm_90 bk_resource_kernels:mma" in report, report


def test_missing_and_unregistered_modules_are_skipped():
    specs, notes, errors = collect_specs(["bagel_kernels.no_such_module", "bagel_kernels.reference"])
    assert specs == [] and errors == []
    assert any("no_such_module: module not found" in n for n in notes)
    assert any("reference: no compile_specs()" in n for n in notes)


def test_merge_reports(tmp_path):
    """Reports of two runs (e.g. two Triton versions) print as one table; a failure fails the merge."""
    import json

    from bagel_kernels.compile_check import KernelReport, main

    good = KernelReport(
        "m:k",
        90,
        "3.6.0",
        ok=True,
        warps=4,
        stages=3,
        registers=100,
        spill_stores=0,
        spill_loads=0,
        shared=1024,
        loops=1,
        loop_mma=True,
        loop_async_copy=True,
        ctas_per_sm=4,
    )
    bad = KernelReport("m:k", 90, "3.9.0", ok=False, problems=["spills inside a loop"])
    from dataclasses import asdict

    (tmp_path / "a.json").write_text(json.dumps([asdict(good)]))
    (tmp_path / "b.json").write_text(json.dumps([asdict(bad)]))
    assert main(["--merge", str(tmp_path / "a.json")]) == 0
    assert main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1

"""Tile tuning of the Triton attention kernels on the GPU at hand; writes the tuned table the launchers read.

    python benchmarks/tune_attention.py --out TABLE.json [--budget-s 120] [--base PATH] [--md PATH]
    python benchmarks/tune_attention.py --dry-run --out TABLE.json      (CPU: the same code, interpreter, tiny)

For each shape the model runs,

    llm   BAGEL-7B language model: a realistic 16k pack (und / t2i / edit samples), 28 query heads, 4 KV
          heads, head dim 128, q/k/v read through a row permutation (the MoT layout), bf16
    vit   SigLIP so400m: 4 images (1024 + 2304 + 4900 + 729 patches, one ``full`` split each), 16 heads
          of 72, q/k/v views into one fused qkv projection output, bf16

it sweeps candidate tiles (block sizes, warps, stages) for the forward program, then, with the forward's
winner, for the backward launch (its dK/dV and dQ programs together). Every candidate is first checked
against the SDPA backend in fp32 on a 2k-token pack of the same kind (output, or dq/dk/dv; bf16
tolerances of ``bagel_kernels.testing``); one that fails the check, fails to compile or runs out of
resources is skipped and reported. Survivors are timed (median of CUDA-event-timed calls) and the fastest
wins; the built-in default is always the first candidate, so a winner is never slower than it.

The table (format of :mod:`bagel_kernels.attention_configs`) starts from ``--base`` (default: the
package's ``attention_tuned.json``); the entries of the tuned keys ``(GPU arch, Triton major.minor,
bf16, head dim)`` are replaced, each with what was measured; the file is rewritten after every shape
(written as it goes). ``--budget-s`` bounds the sweep: when it is spent, the remaining candidates are
skipped and the best so far is kept. ``benchmarks/gpu_check.sh`` runs this first and points the later
benchmarks at the new table (``BAGEL_KERNELS_ATTN_TABLE``); commit the table it copies to its output
folder as ``bagel_kernels/attention_tuned.json``.

``--dry-run`` (no GPU needed): the same sweep, check and table code on tiny packs under the Triton
interpreter, two candidates per program; its times mean nothing, so it writes the base table unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import traceback

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

from common import device_info, git_commit, time_ms  # noqa: E402

from bagel_kernels import PackedMask, packed_attention  # noqa: E402
from bagel_kernels import attention_configs as ac  # noqa: E402
from bagel_kernels.attention_triton import (  # noqa: E402
    _packed_attention_bwd,
    _packed_attention_fwd,
    prepare_mask,
)
from bagel_kernels.testing import random_pack, realistic_pack, tolerance  # noqa: E402

# candidates per architecture family: forward (block_m, block_n, warps, stages); backward
# (block_m1, block_n1, block_m2, block_n2, warps, stages). The default comes first, then these.
FWD_CANDIDATES = {
    90: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2),
         (128, 64, 8, 2), (128, 128, 16, 2)],
    80: [(128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2), (128, 128, 8, 1)],
}  # fmt: skip
BWD_CANDIDATES = {
    90: [(32, 128, 128, 32, 8, 3), (64, 128, 128, 64, 8, 3), (32, 128, 128, 32, 8, 2), (64, 64, 64, 64, 8, 3),
         (32, 64, 64, 32, 4, 3), (16, 128, 128, 16, 8, 3), (64, 128, 128, 32, 8, 2), (32, 128, 64, 32, 8, 3)],
    80: [(64, 64, 64, 64, 8, 2), (32, 64, 64, 32, 8, 2), (32, 64, 64, 32, 4, 2), (64, 64, 64, 64, 8, 3),
         (32, 128, 128, 32, 8, 1), (16, 64, 64, 16, 4, 2)],
}  # fmt: skip
DTYPE = torch.bfloat16


@dataclasses.dataclass
class Shape:
    name: str
    hq: int
    hkv: int
    d: int
    mask: PackedMask  # the timed pack
    check_mask: PackedMask  # the pack the candidates are checked on
    fused_qkv: bool
    row_index: bool


def _images(total: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    lens, used = [], 0
    while True:
        n = rng.choice((729, 1024, 1600, 2304, 4900))
        if used + n > total:
            return lens or [total]
        lens.append(n)
        used += n


def shapes(dry: bool) -> list[Shape]:
    if dry:  # interpreter: a few hundred tokens, fewer heads
        llm = PackedMask.from_splits(
            *random_pack(random.Random(0), 3, text=(1, 40), image=(1, 60)).as_tuple()
        )
        vit = PackedMask.from_splits([90, 70], [90, 70], ["full", "full"])
        return [Shape("llm", 4, 2, 128, llm, llm, False, True), Shape("vit", 2, 2, 72, vit, vit, True, False)]
    vit_lens = [1024, 2304, 4900, 729]
    vit_check = _images(2048, 1)
    return [
        Shape(
            "llm", 28, 4, 128,
            PackedMask.from_splits(*realistic_pack(16384, seed=1).as_tuple(), device="cuda"),
            PackedMask.from_splits(*realistic_pack(2048, seed=2).as_tuple(), device="cuda"),
            False, True,
        ),
        Shape(
            "vit", 16, 16, 72,
            PackedMask.from_splits(vit_lens, vit_lens, ["full"] * len(vit_lens), device="cuda"),
            PackedMask.from_splits(vit_check, vit_check, ["full"] * len(vit_check), device="cuda"),
            True, False,
        ),
    ]  # fmt: skip


def make_inputs(shape: Shape, mask: PackedMask, device, seed: int):
    """q, k, v laid out as the model produces them, the mask (with a row permutation for the LLM)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, hq, hkv, d = mask.total_len, shape.hq, shape.hkv, shape.d
    if shape.fused_qkv:
        qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(device=device, dtype=DTYPE)
        q = qkv[:, : hq * d].view(n, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
    else:
        q, k, v = (torch.randn(n, h, d, generator=g).to(device=device, dtype=DTYPE) for h in (hq, hkv, hkv))
    if shape.row_index:
        perm = torch.randperm(n, generator=g).to(device)
        mask = mask.with_row_index(perm.to(torch.int32))
        q, k, v = (torch.empty_like(t).index_copy_(0, perm, t) for t in (q, k, v))
    return q, k, v, mask


def _op_args(cfg, q, k, v, mask):
    fwd_t, bwd_t = prepare_mask(mask, cfg)
    return (q, k, v, mask.kv_lo, mask.kv_hi, mask.row_index, fwd_t, bwd_t, q.shape[-1] ** -0.5,
            cfg.blocks(), cfg.launch())  # fmt: skip


def _check(cfg, shape: Shape, device, kind: str) -> str:
    """'' when the candidate matches the fp32 SDPA backend on the check pack, else why not."""
    q, k, v, mask = make_inputs(shape, shape.check_mask, device, seed=7)
    args = _op_args(cfg, q, k, v, mask)
    out, lse = _packed_attention_fwd(*args)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = packed_attention(qr, kr, vr, mask, backend="sdpa")
    if kind == "fwd":
        pairs = [("out", out, ref)]
    else:
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(device=device, dtype=DTYPE)
        dq, dk, dv = _packed_attention_bwd(do, q, k, v, out, lse, *args[3:6], args[7], *args[8:])
        rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), do.float())
        pairs = [("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)]
    atol, rtol = tolerance(DTYPE, "fwd" if kind == "fwd" else "bwd")
    for name, a, b in pairs:
        if not torch.isfinite(a).all():
            return f"{name} not finite"
        if not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol):
            return f"{name} off by {(a.float() - b.float()).abs().max().item():.3g}"
    return ""


def _time(cfg, shape: Shape, device, kind: str, reps: int, warmup: int) -> float:
    q, k, v, mask = make_inputs(shape, shape.mask, device, seed=3)
    args = _op_args(cfg, q, k, v, mask)
    if kind == "fwd":
        return time_ms(lambda: _packed_attention_fwd(*args), device, reps, warmup)
    out, lse = _packed_attention_fwd(*args)
    do = torch.randn_like(out)
    return time_ms(
        lambda: _packed_attention_bwd(do, q, k, v, out, lse, *args[3:6], args[7], *args[8:]),
        device,
        reps,
        warmup,
    )


def candidates(base: ac.AttnConfig, fam: int, kind: str, dry: bool) -> list[ac.AttnConfig]:
    out = [base]
    if kind == "fwd":
        for bm, bn, w, st in FWD_CANDIDATES[fam]:
            out.append(dataclasses.replace(base, block_m=bm, block_n=bn, fwd_warps=w, fwd_stages=st))
    else:
        for bm1, bn1, bm2, bn2, w, st in BWD_CANDIDATES[fam]:
            out.append(
                dataclasses.replace(
                    base, block_m1=bm1, block_n1=bn1, block_m2=bm2, block_n2=bn2, bwd_warps=w, bwd_stages=st
                )
            )
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    if dry:  # the interpreter: the default and one other small candidate per program
        other = (
            dict(block_m=32, block_n=64)
            if kind == "fwd"
            else dict(block_m1=64, block_n1=32, block_m2=32, block_n2=64)
        )
        uniq = [base, dataclasses.replace(base, **other)]
    return uniq


_DRY_TILES = dict(block_m=64, block_n=32, block_m1=32, block_n1=64, block_m2=64, block_n2=32)


def _fields(cfg: ac.AttnConfig, kind: str) -> dict:
    names = ("block_m", "block_n", "fwd_warps", "fwd_stages") if kind == "fwd" else (
        "block_m1", "block_n1", "block_m2", "block_n2", "bwd_warps", "bwd_stages")  # fmt: skip
    return {n: getattr(cfg, n) for n in names}


def _write(path: str, entries: dict) -> None:
    data = {"format": ac.TABLE_FORMAT, "entries": list(entries.values())}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    ac.load_tuned_table(path)  # what we wrote must parse


def tune(args) -> int:
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    t0 = time.perf_counter()
    arch = 90 if dry else (lambda c: c[0] * 10 + c[1])(torch.cuda.get_device_capability())
    fam = ac.arch_family(arch)
    version = ac.triton_version()
    reps, warmup = (1, 0) if dry else (args.reps, 2)
    base_path = args.base or str(ac.TABLE_PATH)
    with open(base_path) as f:
        base_data = json.load(f)
    ac.load_tuned_table(base_path)  # validate the base
    entries = {
        ac.table_key(int(e["arch"].removeprefix("sm")), e["triton"], e["dtype"], e["head_dim"]): e
        for e in base_data["entries"]
    }
    if args.out:
        _write(args.out, entries)  # a valid table exists from the start
    lines = [
        f"### Attention tile tuning ({'DRY RUN: interpreter, times meaningless, nothing written' if dry else 'bf16'})",
        "",
        "| shape | program | candidate | check | ms (median) | vs default |",
        "|---|---|---|---|---|---|",
    ]

    def emit(line):
        lines.append(line)
        print(line, flush=True)

    for line in lines:
        print(line)
    for shape in shapes(dry):
        default = ac.default_for(arch, False, shape.d, version)
        best = default if not dry else dataclasses.replace(default, **_DRY_TILES)
        measured = {}
        for kind in ("fwd", "bwd"):
            base_ms = None
            best_ms = None
            for i, cand in enumerate(candidates(best, fam, kind, dry)):
                label = ", ".join(f"{k}={v}" for k, v in _fields(cand, kind).items())
                if i > 0 and time.perf_counter() - t0 > args.budget_s:
                    emit(
                        f"| {shape.name} | {kind} | {label} | skipped: budget of {args.budget_s:.0f} s spent | - | - |"
                    )
                    continue
                try:
                    why = _check(cand, shape, device, kind)
                    if why:
                        emit(f"| {shape.name} | {kind} | {label} | FAIL: {why} | - | - |")
                        continue
                    ms = _time(cand, shape, device, kind, reps, warmup)
                except Exception as exc:  # compile errors, out of resources: skip the candidate
                    emit(
                        f"| {shape.name} | {kind} | {label} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | - | - |"
                    )
                    if args.verbose:
                        traceback.print_exc()
                    continue
                if base_ms is None:
                    base_ms = ms
                emit(f"| {shape.name} | {kind} | {label} | ok | {ms:.3f} | {base_ms / ms:.2f}x |")
                if best_ms is None or ms < best_ms:
                    best_ms, winner = ms, cand
            if best_ms is not None:
                best = winner
                measured[f"{kind}_ms"] = round(best_ms, 4)
                measured[f"{kind}_default_ms"] = round(base_ms, 4)
        emit(f"| {shape.name} | winner | {best} | | | |")
        if dry or not measured:
            continue
        key = ac.table_key(arch, version, DTYPE, shape.d)
        fields = {k: v for k, v in best.to_dict().items() if v != getattr(default, k)}
        entries[key] = {
            "arch": key[0], "triton": key[1], "dtype": key[2], "head_dim": key[3], "config": fields,
            "measured": dict(measured, shape=f"{shape.name}: {shape.mask.total_len} tokens, {shape.hq}/{shape.hkv} heads",
                             gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=version,
                             commit=git_commit(), date=time.strftime("%Y-%m-%d")),
        }  # fmt: skip
        if args.out:
            _write(args.out, entries)
    emit("")
    emit(f"- {device_info(device)}; {time.perf_counter() - t0:.0f} s; table: {args.out or '(not written)'}")
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="where to write the tuned table (JSON)")
    p.add_argument(
        "--base", default=None, help="table to start from (default: the package's attention_tuned.json)"
    )
    p.add_argument("--md", default=None, help="also write the sweep as a markdown table here")
    p.add_argument("--budget-s", type=float, default=120.0, help="seconds the sweep may take (default 120)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per candidate (default 5)")
    p.add_argument("--dry-run", action="store_true", help="CPU: interpreter, tiny packs, nothing written")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("tune_attention: needs CUDA; nothing tuned (use --dry-run to check the script on the CPU)")
        return 0
    return tune(args)


if __name__ == "__main__":
    sys.exit(main())

"""Tile tuning of the Triton attention kernels on the GPU at hand; writes the tuned table the launchers read.

    python benchmarks/tune_attention.py --out TABLE.json [--budget-s 120] [--base PATH] [--md PATH]
    python benchmarks/tune_attention.py --dry-run --out TABLE.json      (CPU: the same code, interpreter, tiny)

For each shape the model runs,

    llm   BAGEL-7B language model: a realistic 16k pack (und / t2i / edit samples), 28 query heads, 4 KV
          heads, head dim 128, q/k/v read through a row permutation (the MoT layout), bf16
    vit   SigLIP so400m: 4 images (1024 + 2304 + 4900 + 729 patches, one ``full`` split each), 16 heads
          of 72, q/k/v views into one fused qkv projection output, bf16

it sweeps candidate tiles (block sizes, warps, stages) for three programs, each with the winners so far:

    fwd       the forward (on sm_90, for the SigLIP layout, the winner is also tried with K/V through
              tensor descriptors: ``tma=1``)
    bwd       the deterministic two-program backward (its dK/dV and dQ programs together)
    onepass   the one-pass backward (dK/dV programs adding dQ with fp32 atomics; ``onepass_*`` tiles)

then sets ``onepass`` in the entry: 1 when the fastest one-pass backward beats the fastest two-program
one by more than 3% (``deterministic=False`` then runs it; ``deterministic=True`` never does), else 0.
This is how the first GPU measurement decides the default backward per key. Every candidate is first
checked against the SDPA backend in fp32 on a 2k-token pack of the same kind (output, or dq/dk/dv; bf16
tolerances of ``bagel_kernels.testing``); one that fails the check, fails to compile or runs out of
resources is skipped and reported. Survivors are timed (median of CUDA-event-timed calls) and the fastest
wins; the built-in default is always the first candidate, so a winner is never slower than it.

The table (format of :mod:`bagel_kernels.attention_configs`) starts from ``--base`` (default: the
package's ``attention_tuned.json``); the entries of the tuned keys ``(GPU arch, Triton major.minor,
bf16, head dim)`` are replaced, each with what was measured; the file is rewritten after every shape
(written as it goes). ``--budget-s`` bounds the sweep: each (shape, program) gets its share of it (what
one leaves unused goes to the next); past its share a program's remaining candidates are skipped and
the best so far is kept, so that every program of every shape gets measured.
``benchmarks/gpu_check.sh`` runs this first and points the later
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

# run as a script (benchmarks/gpu_check.sh): its folder, with common.py, is on sys.path
from common import device_info, git_commit, time_ms, use_checkout, write_atomic  # noqa: E402

use_checkout()
from bagel_kernels import PackedMask, packed_attention  # noqa: E402
from bagel_kernels import attention_configs as ac  # noqa: E402
from bagel_kernels.attention_triton import op_params as _op_params  # noqa: E402
from bagel_kernels.attention_triton import packed_attention_bwd as _packed_attention_bwd  # noqa: E402
from bagel_kernels.attention_triton import packed_attention_fwd as _packed_attention_fwd  # noqa: E402
from bagel_kernels.attention_triton import prepare_mask  # noqa: E402
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
# one-pass backward (onepass_block_m, onepass_block_n, warps, stages)
ONEPASS_CANDIDATES = {
    90: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3), (16, 128, 8, 3),
         (64, 128, 8, 2), (32, 64, 8, 3)],
    80: [(64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2), (32, 128, 8, 1), (64, 64, 8, 1)],
}  # fmt: skip
KINDS = ("fwd", "bwd", "onepass")
ONEPASS_MARGIN = 0.97  # the one-pass backward is the default where it takes < 97% of the two-program time
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


class _Op:
    """The registered ops with one candidate's tables and variant arguments (``kind``: fwd, bwd, onepass)."""

    def __init__(self, cfg: ac.AttnConfig, kind: str, q, k, v, mask):
        self.onepass = kind == "onepass"
        # the ops' schemas take lists (the named tuples are the Python-side types)
        blocks, launch = (list(t) for t in _op_params(cfg, self.onepass))
        fwd_t, bwd_t = (list(t) for t in prepare_mask(mask, cfg, self.onepass))
        self.q, self.k, self.v = q, k, v
        self.common = (mask.kv_lo, mask.kv_hi, mask.row_index)
        self.fwd_t, self.bwd_t, self.scale = fwd_t, bwd_t, q.shape[-1] ** -0.5
        self.blocks, self.launch, self.dsplit, self.tma = blocks, launch, bool(cfg.dsplit), bool(cfg.tma)

    def fwd(self):
        return _packed_attention_fwd(
            self.q, self.k, self.v, *self.common, self.fwd_t, self.bwd_t, self.scale,
            self.blocks, self.launch, self.dsplit, self.tma, self.onepass,
        )  # fmt: skip

    def bwd(self, do, out, lse):
        return _packed_attention_bwd(
            do, self.q, self.k, self.v, out, lse, *self.common, self.bwd_t, self.scale,
            self.blocks, self.launch, self.dsplit, self.onepass,
        )  # fmt: skip


def check_candidate(cfg, shape: Shape, device, kind: str) -> str:
    """'' when the candidate matches the fp32 SDPA backend on the check pack, else why not."""
    q, k, v, mask = make_inputs(shape, shape.check_mask, device, seed=7)
    op = _Op(cfg, kind, q, k, v, mask)
    out, lse = op.fwd()
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = packed_attention(qr, kr, vr, mask, backend="sdpa")
    if kind == "fwd":
        pairs = [("out", out, ref)]
    else:
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(device=device, dtype=DTYPE)
        dq, dk, dv = op.bwd(do, out, lse)
        rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), do.float())
        pairs = [("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)]
    atol, rtol = tolerance(DTYPE, "fwd" if kind == "fwd" else "bwd")
    for name, a, b in pairs:
        if not torch.isfinite(a).all():
            return f"{name} not finite"
        if not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol):
            return f"{name} off by {(a.float() - b.float()).abs().max().item():.3g}"
    return ""


def time_candidate(cfg, shape: Shape, device, kind: str, reps: int, warmup: int) -> float:
    q, k, v, mask = make_inputs(shape, shape.mask, device, seed=3)
    op = _Op(cfg, kind, q, k, v, mask)
    if kind == "fwd":
        return time_ms(op.fwd, device, reps, warmup)
    out, lse = op.fwd()
    do = torch.randn_like(out)
    return time_ms(lambda: op.bwd(do, out, lse), device, reps, warmup)


_KIND_FIELDS = {
    "fwd": ("block_m", "block_n", "fwd_warps", "fwd_stages"),
    "bwd": ("block_m1", "block_n1", "block_m2", "block_n2", "bwd_warps", "bwd_stages"),
    "onepass": ("onepass_block_m", "onepass_block_n", "onepass_warps", "onepass_stages"),
}
_SWEEP = {"fwd": FWD_CANDIDATES, "bwd": BWD_CANDIDATES, "onepass": ONEPASS_CANDIDATES}


def candidates(base: ac.AttnConfig, fam: int, kind: str, dry: bool) -> list[ac.AttnConfig]:
    names = _KIND_FIELDS[kind]
    out = [base] + [dataclasses.replace(base, **dict(zip(names, c, strict=True))) for c in _SWEEP[kind][fam]]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    if dry:  # the interpreter: the default and one other small candidate per program
        other = {
            "fwd": dict(block_m=32, block_n=64),
            "bwd": dict(block_m1=64, block_n1=32, block_m2=32, block_n2=64),
            "onepass": dict(onepass_block_m=32, onepass_block_n=32),
        }[kind]
        uniq = [base, dataclasses.replace(base, **other)]
    return uniq


_DRY_TILES = dict(block_m=64, block_n=32, block_m1=32, block_n1=64, block_m2=64, block_n2=32,
                  onepass_block_m=64, onepass_block_n=16)  # fmt: skip


def _fields(cfg: ac.AttnConfig, kind: str) -> dict:
    return {n: getattr(cfg, n) for n in _KIND_FIELDS[kind]}


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
        if args.md:  # the table so far: a run cut off by a timeout keeps every measured row
            write_atomic(args.md, "\n".join(lines) + "\n")

    def record(**fields):
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(dict(bench="tune_attention", **fields)) + "\n")

    if args.jsonl and os.path.exists(args.jsonl):
        os.remove(args.jsonl)
    no_measurement = []  # (shape, program) whose every candidate failed

    for line in lines:
        print(line)
    all_shapes = shapes(dry)
    n_slots, slot = len(all_shapes) * len(KINDS), 0
    for shape in all_shapes:
        default = ac.default_for(arch, False, shape.d, version)
        best = default if not dry else dataclasses.replace(default, **_DRY_TILES)
        measured = {}
        for kind in KINDS:
            slot += 1
            deadline = args.budget_s * slot / n_slots  # this program's share, plus what earlier ones left
            base_ms = None
            best_ms = None
            winner = best
            cands = candidates(best, fam, kind, dry)
            if kind == "fwd" and not shape.row_index and (dry or fam >= 90):
                cands.append(None)  # placeholder: the forward's winner with TMA, decided below
            for i, cand in enumerate(cands):
                if cand is None:
                    if best_ms is None:
                        continue
                    cand = dataclasses.replace(winner, tma=1)
                label = ", ".join(f"{k}={v}" for k, v in _fields(cand, kind).items())
                if kind == "fwd" and cand.tma:
                    label += ", tma=1"
                if i > 0 and time.perf_counter() - t0 > deadline:
                    emit(f"| {shape.name} | {kind} | {label} | skipped: its share of the {args.budget_s:.0f} s "
                         "budget is spent | - | - |")  # fmt: skip
                    record(
                        shape=shape.name, program=kind, candidate=label, ok=False, check="skipped (budget)"
                    )
                    continue
                try:
                    why = check_candidate(cand, shape, device, kind)
                    if why:
                        emit(f"| {shape.name} | {kind} | {label} | FAIL: {why} | - | - |")
                        record(
                            shape=shape.name, program=kind, candidate=label, ok=False, check=f"FAIL: {why}"
                        )
                        continue
                    ms = time_candidate(cand, shape, device, kind, reps, warmup)
                except Exception as exc:  # compile errors, out of resources: skip the candidate
                    err = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}"
                    emit(f"| {shape.name} | {kind} | {label} | error: {err} | - | - |")
                    record(shape=shape.name, program=kind, candidate=label, ok=False, check=f"error: {err}")
                    if args.verbose:
                        traceback.print_exc()
                    continue
                if base_ms is None:
                    base_ms = ms
                emit(f"| {shape.name} | {kind} | {label} | ok | {ms:.3f} | {base_ms / ms:.2f}x |")
                record(
                    shape=shape.name, program=kind, candidate=label, ok=True, ms=ms, vs_default=base_ms / ms
                )
                if best_ms is None or ms < best_ms:
                    best_ms, winner = ms, cand
            if best_ms is None:
                no_measurement.append(f"{shape.name} {kind}")
            else:
                best = winner
                measured[f"{kind}_ms"] = round(best_ms, 4)
                measured[f"{kind}_default_ms"] = round(base_ms, 4)
        # the default backward for deterministic=False: the one-pass one only where clearly faster
        if "bwd_ms" in measured and "onepass_ms" in measured:
            faster = measured["onepass_ms"] < ONEPASS_MARGIN * measured["bwd_ms"]
            best = dataclasses.replace(best, onepass=int(faster))
            measured["backward"] = "one-pass" if faster else "two-program"
            emit(f"| {shape.name} | backward | {measured['backward']} (one-pass {measured['onepass_ms']:.3f} ms, "
                 f"two-program {measured['bwd_ms']:.3f} ms) | | | |")  # fmt: skip
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
    if no_measurement:  # a program none of whose candidates ran is a failed tuning, not a tuned one
        emit(f"- FAILED: no candidate passed for {', '.join(no_measurement)} (see the errors above)")
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="where to write the tuned table (JSON)")
    p.add_argument(
        "--base", default=None, help="table to start from (default: the package's attention_tuned.json)"
    )
    p.add_argument("--md", default=None, help="also write the sweep as a markdown table here (row by row)")
    p.add_argument("--jsonl", default=None, help="append every candidate's result to this JSON-lines file")
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

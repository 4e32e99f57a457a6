"""Fused patch embedding vs the unfused torch path, SigLIP so400m shapes (patch 14, C=3, hidden 1152).

    python benchmarks/bench_patch_embed.py [--out DIR] [--quick] [--tiny]

Cases: batches of 4-16 images of 224-980 px (plus one mixed-size batch), every patch of every image,
BAGEL's position ids ``row * 70 + col`` into a ``[4900, 1152]`` position table, bf16 on CUDA.
Paths, each timed forward and forward+backward (gradients for weight, bias and table), median ms:

    unfused (patches)  F.linear(patches, W, b) + F.embedding(pos_ids, table)       (BAGEL's ViT entry)
    unfused (images)   torch patchify gather from the padded image batch, then the same
    fused (patches)    bagel_kernels.patch_embed.fused_patch_embed (CUDA extension)
    fused (images)     fused_patch_embed_images: patchify inside the kernel's A-tile load

"fused" rows run with ``check_indices=True`` (the default: one device-to-host sync for the range check)
and, as "no sync", with ``check_indices=False``. Speed-ups compare each fused row with the unfused path
that starts from the same input (patches or images); the goal is >= 1.3x on H100 bf16.

Without CUDA the script prints "needs CUDA" and exits 0; ``--tiny`` runs the same code on the CPU on tiny
shapes (the extension's CPU kernel against torch) to check the script itself; its times mean nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import Report, device_info, run_script, save_plot, time_ms, use_checkout, write_results  # noqa: E402

use_checkout()

from bagel_kernels import patch_embed as pe  # noqa: E402
from bagel_kernels import reference  # noqa: E402

SO400M = dict(patch=14, channels=3, hidden=1152, side=70)  # BAGEL: vit_max_num_patch_per_side = 70
TINY = dict(patch=4, channels=3, hidden=64, side=8)

FULL_CASES = [(4, 224), (16, 224), (4, 448), (8, 448), (16, 448), (4, 980), (8, 980), (16, 980), (8, "mixed")]
QUICK_CASES = [(4, 224), (8, 448), (16, 980), (8, "mixed")]
TINY_CASES = [(2, 16), (3, "mixed")]


def time_path(f, params, dy, device, reps: int, warmup: int) -> tuple[float, float]:
    """Median ms of the forward alone and of forward + backward (gradients of ``params``)."""

    def fwd():
        with torch.no_grad():
            f(*params)

    def fwd_bwd():
        for q in params:
            q.grad = None
        f(*params).backward(dy)

    return time_ms(fwd, device, reps, warmup), time_ms(fwd_bwd, device, reps, warmup)


def image_sizes(n: int, px, dims, rng: random.Random) -> list[tuple[int, int]]:
    if px == "mixed":  # BAGEL-like: each side a multiple of the patch, 224..980 px (tiny: 8..28)
        lo, hi = (224, 980) if dims is SO400M else (8, 28)
        p = dims["patch"]
        return [(rng.randrange(lo, hi + 1, p), rng.randrange(lo, hi + 1, p)) for _ in range(n)]
    return [(px, px)] * n


def build_case(n_img: int, px, dims, device, dtype, seed: int = 0):
    rng = random.Random(seed)
    sizes = image_sizes(n_img, px, dims, rng)
    p, C, E, side = dims["patch"], dims["channels"], dims["hidden"], dims["side"]
    g = torch.Generator().manual_seed(seed)
    H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = (torch.rand(n_img, C, H, W, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    coords, ids = pe.image_patch_coords(sizes, p, max_num_patches_per_side=side, device=device)
    K = C * p * p
    weight = (torch.randn(E, K, generator=g) * K**-0.5).to(device=device, dtype=dtype)
    bias = (torch.randn(E, generator=g) * 0.02).to(device=device, dtype=dtype)
    table = (torch.randn(side * side, E, generator=g) * 0.02).to(device=device, dtype=dtype)
    patches = reference.patchify_images(images, coords, p).contiguous()
    label = (
        f"{n_img} x {px}px"
        if px != "mixed"
        else f"{n_img} x mixed {min(min(s) for s in sizes)}-{max(max(s) for s in sizes)}px"
    )
    return dict(
        label=label,
        images=images,
        coords=coords,
        ids=ids,
        weight=weight,
        bias=bias,
        table=table,
        patches=patches,
        N=coords.shape[0],
        K=K,
        E=E,
        p=p,
    )


def paths(c, fused_backend: str):
    """name -> (input kind, forward function of (weight, bias, table))."""
    p, ids, coords = c["p"], c["ids"], c["coords"]

    def unfused_patches(w, b, t):
        return reference.patch_embed_reference(c["patches"], w, b, t, ids)

    def unfused_images(w, b, t):
        return reference.patch_embed_images_reference(c["images"], coords, p, w, b, t, ids)

    def fused(entry, check):
        if entry == "patches":
            return lambda w, b, t: pe.fused_patch_embed(
                c["patches"], w, b, t, ids, backend=fused_backend, check_indices=check
            )
        return lambda w, b, t: pe.fused_patch_embed_images(
            c["images"], coords, p, w, b, t, ids, backend=fused_backend, check_indices=check
        )

    return {
        "unfused (patches)": ("patches", unfused_patches),
        "fused (patches)": ("patches", fused("patches", True)),
        "fused (patches, no sync)": ("patches", fused("patches", False)),
        "unfused (images)": ("images", unfused_images),
        "fused (images)": ("images", fused("images", True)),
        "fused (images, no sync)": ("images", fused("images", False)),
    }


def run(args) -> Report:
    tiny = args.tiny
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    dims = TINY if tiny else SO400M
    fused_backend = "cpu_ext" if tiny else "cuda"
    st = pe.extension_status()
    if not (st.cpu if tiny else st.cuda):
        raise SystemExit(
            f"bench_patch_embed: the extension has no {'CPU' if tiny else 'CUDA'} kernel: {st.reason}"
        )
    cases = TINY_CASES if tiny else (QUICK_CASES if args.quick else FULL_CASES)
    reps, warmup = (5, 1) if tiny else ((20, 5) if args.quick else (40, 10))

    cols = [
        "case",
        "patches N",
        "path",
        "fwd ms",
        "fwd+bwd ms",
        "speed-up fwd",
        "speed-up fwd+bwd",
        "fwd TFLOP/s",
        "max |diff|",
    ]
    report = Report(args.out, "bench_patch_embed")
    table = report.table(
        f"Fused patch embedding ({'tiny CPU check, times meaningless' if tiny else 'SigLIP so400m, bf16'})",
        cols,
    )
    plot = {}
    for n_img, px in cases:
        c = build_case(n_img, px, dims, device, dtype)
        params = [
            c["weight"].clone().requires_grad_(True),
            c["bias"].clone().requires_grad_(True),
            c["table"].clone().requires_grad_(True),
        ]
        dy = torch.randn(c["N"], c["E"], device=device, dtype=dtype)
        flops = 2.0 * c["N"] * c["K"] * c["E"]
        results, baseline, ref_out = {}, {}, {}
        for name, (entry, f) in paths(c, fused_backend).items():
            with torch.no_grad():
                out = f(*[q.detach() for q in params])
            if name.startswith("unfused"):
                ref_out[entry] = out.float()
            diff = (out.float() - ref_out[entry]).abs().max().item()

            t_f, t_fb = time_path(f, params, dy, device, reps, warmup)
            if name.startswith("unfused"):
                baseline[entry] = (t_f, t_fb)
            base_f, base_fb = baseline[entry]
            results[name] = (t_f, t_fb)
            table.add(
                [
                    c["label"],
                    c["N"],
                    name,
                    f"{t_f:.3f}",
                    f"{t_fb:.3f}",
                    f"{base_f / t_f:.2f}x",
                    f"{base_fb / t_fb:.2f}x",
                    f"{flops / t_f / 1e9:.1f}",
                    f"{diff:.2e}",
                ],
                raw=dict(
                    case=c["label"], patches=c["N"], path=name, fwd_ms=t_f, fwd_bwd_ms=t_fb, max_diff=diff
                ),
            )
            print(table.rows[-1], flush=True)
            plot.setdefault(name, []).append((c["N"], base_f / t_f))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table.note(device_info(device))
    table.note(
        f"median of {reps} runs after {warmup} warm-up runs{'; CUDA events' if device.type == 'cuda' else ''}; GEMM {dims['channels']}*{dims['patch']}^2 -> "
        f"{dims['hidden']}, position table {dims['side']}^2 rows; extension: {st.path}"
    )
    table.note(
        "speed-up = unfused path from the same input / this path; 'no sync' = check_indices=False "
        "(no range check, out-of-range ids give NaN rows)"
    )
    table.note(
        "max |diff| = largest elementwise difference of the forward output from the unfused path of the same input"
    )
    write_results(
        args.out,
        "bench_patch_embed",
        None,  # the Report wrote the table row by row
        lambda path: save_plot(
            path,
            {k: v for k, v in plot.items() if not k.startswith("unfused")},
            "patches N",
            "forward speed-up vs unfused torch",
            "fused patch embedding (so400m, bf16)" if not tiny else "tiny CPU check",
            logx=True,
        ),
    )
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="folder for bench_patch_embed.md and .png")
    ap.add_argument("--quick", action="store_true", help="4 cases, fewer repetitions (about 30 s on an H100)")
    ap.add_argument(
        "--tiny", action="store_true", help="tiny shapes on the CPU (checks the script; times mean nothing)"
    )
    return run_script(ap, run, "bench_patch_embed", "so400m shapes in bf16", argv)


if __name__ == "__main__":
    sys.exit(main())

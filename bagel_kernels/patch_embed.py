"""Fused ViT patch embedding: patchify + linear + bias + absolute position embedding in one kernel.

    out[n] = patch[n] @ weight.T + bias + pos_table[pos_ids[n]]

Shapes (N = patches, K = C * p * p, E = hidden size, P = rows of the position table):
    patches      [N, K]          packed patches in BAGEL's patchify order (see :func:`patchify`)
    images       [B, C, H, W]    padded image batch (raw-image entry); H, W need not be multiples of p
    patch_coords [N, 3]          int (image index, patch row, patch col) of each patch
    weight       [E, K]          nn.Linear layout (BAGEL's converted SigLIP ``patch_embedding``)
    bias         [E] or None
    pos_table    [P, E] or None  e.g. SigLIP's ``position_embedding.weight``
    pos_ids      [N] int or None BAGEL's flattened ids ``row * max_num_patches_per_side + col``
    out          [N, E]          dtype of the inputs

Backends (``backend=``):
    "cuda"     the compiled CUDA kernel (``torch.ops.bagel_kernels_ext.fused_patch_embed``): a tiled GEMM
               on tensor cores (fp16/bf16, fp32 accumulate) or in exact fp32, patchify gathered in the A-tile
               load, bias and position row added in the epilogue
    "cpu_ext"  the same op's CPU kernel (fp32/fp16/bf16, fp32 accumulate); slower than "torch" on CPU,
               it runs only when named (tests, parity)
    "torch"    the unfused PyTorch path (:func:`patch_embed_reference`): patchify + ``F.linear`` + embedding add
    "auto"     the fastest correct path for the tensors' device: on CUDA the extension when it is built
               (else "torch", warning once), on CPU "torch" (:func:`extension_status` and
               :func:`last_backend` say what ran and why)

The extension (``bagel_kernels/_C*.so``, built by ``pip install --no-build-isolation -e .``) is loaded on
first use, never at import. Its op is registered with ``torch.library``: a fake implementation for
``torch.compile`` / meta tensors and an autograd formula (gradients for weight, bias, the position table
and the pixels; the backward is plain torch ops: ``grad.T @ patches``, ``grad.sum(0)``, an embedding
backward, ``grad @ weight``).

Index checks: with ``check_indices=True`` (default) out-of-range ``pos_ids`` / ``patch_coords`` raise
ValueError before any kernel runs (on CUDA that costs one device-to-host sync). With
``check_indices=False`` there is no sync (CUDA graphs, overlap) and every backend (the kernels and the
torch path) writes a NaN row for an out-of-range id or coordinate instead of reading out of bounds; the
backward drops those rows (they add nothing to any gradient and nothing is indexed by their ids). Inside
``torch.compile`` the torch path behaves as with ``check_indices=False`` (a check would be a sync).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import as_int, check_same_device
from .dispatch import Backend, Family, Request
from .reference import (
    patch_embed_images_reference,
    patch_embed_reference,
    patch_grid_view,
    patchify,
    patchify_images,
)

__all__ = [
    "BACKENDS",
    "PATCH_EMBED",
    "ExtensionStatus",
    "extension_status",
    "last_backend",
    "fused_patch_embed",
    "fused_patch_embed_images",
    "patchify",
    "patchify_images",
    "image_patch_coords",
    "patch_embed_reference",
    "patch_embed_images_reference",
]

_OP_NAME = "bagel_kernels_ext::fused_patch_embed"
_EXT_MODULE = "bagel_kernels._C"
_EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REF_DTYPES = _EXT_DTYPES + (torch.float64,)  # float64: the torch path only (references, gradcheck)


# ------------------------------------------------------------------------------------------ torch path
# (patchify and the references live in bagel_kernels.reference and are re-exported here)
def image_patch_coords(
    image_sizes: list[tuple[int, int]],
    patch_size: int,
    max_num_patches_per_side: int | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(patch_coords [N, 3], pos_ids [N])`` for images of ``(height, width)`` pixels placed at index
    0, 1, ... of a padded batch, all their patches in BAGEL's order (image by image, row-major);
    ``pos_ids`` are BAGEL's flattened ids ``row * max_num_patches_per_side + col``
    (``get_flattened_position_ids_extrapolate``; default side: the largest grid side)."""
    patch_size = as_int(patch_size, "patch_size")
    if patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size}")
    grids = [(h // patch_size, w // patch_size) for h, w in image_sizes]
    side = (
        max_num_patches_per_side
        if max_num_patches_per_side is not None
        else max([max(g) for g in grids] + [1])
    )
    coords, ids = [], []
    for b, (gh, gw) in enumerate(grids):
        if gw > side:
            raise ValueError(f"image {b} has {gw} patches per row, more than max_num_patches_per_side={side}")
        r = torch.arange(gh).repeat_interleave(gw)
        c = torch.arange(gw).repeat(gh)
        coords.append(torch.stack([torch.full_like(r, b), r, c], dim=1))
        ids.append(r * side + c)
    if not coords:
        return torch.zeros(0, 3, dtype=torch.long, device=device), torch.zeros(
            0, dtype=torch.long, device=device
        )
    return torch.cat(coords).to(device), torch.cat(ids).to(device)


def _valid_rows(n, device, table_rows, pos_ids, image_shape=None, patch_coords=None, patch_size=0):
    """``[N]`` bool: the rows whose position id and patch coordinates are in range (no host sync)."""
    valid = torch.ones(n, dtype=torch.bool, device=device)
    if pos_ids is not None:
        valid &= (pos_ids >= 0) & (pos_ids < table_rows)
    if patch_coords is not None:
        B, _, H, W = image_shape
        valid &= (patch_coords >= 0).all(dim=1)
        valid &= (patch_coords[:, 0] < B) & (patch_coords[:, 1] < H // patch_size)
        valid &= patch_coords[:, 2] < W // patch_size
    return valid


def _reference_unchecked(images, patch_coords, patch_size, patches, weight, bias, pos_table, pos_ids):
    """The torch path without index checks (``check_indices=False``, or inside ``torch.compile``): like
    the kernels, a row with an out-of-range position id or patch coordinate comes out NaN and reads
    nothing out of bounds (invalid ids are replaced by 0 before any gather, and the NaN fill cuts their
    gradients). Valid rows are computed exactly as by the reference."""
    src = images if images is not None else patches
    n = patch_coords.shape[0] if images is not None else patches.shape[0]
    rows = pos_table.shape[0] if pos_table is not None else 0
    shape = images.shape if images is not None else None
    valid = _valid_rows(n, src.device, rows, pos_ids, shape, patch_coords, patch_size)
    if images is not None:
        B, C, H, W = images.shape
        if B and H // patch_size and W // patch_size:
            coords = patch_coords.masked_fill(~valid[:, None], 0)
            patches = patchify_images(images, coords, patch_size)
        else:  # no patch exists: every row is invalid, nothing may be read
            patches = images.new_zeros(n, C * patch_size * patch_size)
    out = F.linear(patches, weight, bias)
    if pos_table is not None and rows:
        out = out + F.embedding(pos_ids.masked_fill(~valid, 0).long(), pos_table)
    return out.masked_fill(~valid[:, None], float("nan"))


# ------------------------------------------------------------------------------------------ extension
@dataclass(frozen=True)
class ExtensionStatus:
    """Whether the compiled op is usable: ``loaded`` (the library is loaded and the op registered),
    ``cpu`` / ``cuda`` (a kernel for that device is registered), ``path`` of the library, and
    ``reason``: why it is absent or which kernel is missing ("" when everything is there), with the
    build's own record when it has one (a failed CUDA build: where the toolkit was taken from and the
    last lines of the compiler's output); ``build``: that record in one line ("" when none)."""

    loaded: bool
    cpu: bool
    cuda: bool
    path: str | None
    reason: str
    build: str = ""


def _build_record() -> dict | None:
    """What setup.py wrote about the last build (``_build_status.json``), or None."""
    import json

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_status.json")
    try:
        with open(path) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def build_summary(rec: dict | None) -> str:
    if not rec:
        return ""
    tries = ", ".join(
        f"{a.get('kind')} {'ok' if a.get('ok') else 'FAILED'}"
        for a in rec.get("attempts", [])
        if isinstance(a, dict)
    )
    return (
        f"build {rec.get('time', '?')}: CUDA {rec.get('cuda', '?')} ({rec.get('cuda_why', '')}); attempts: "
        f"{tries or 'none'}; CUDA_HOME={rec.get('cuda_home')} (from {rec.get('cuda_home_how')}); "
        f"nvcc {rec.get('nvcc')}; torch {rec.get('torch')} (CUDA {rec.get('torch_cuda')})"
    )


def no_cuda_reason(rec: dict | None) -> str:
    if not rec:
        return "no CUDA kernel (built without CUDA: torch without CUDA or no toolkit at build time; no build record)"
    if rec.get("cuda") == "failed":
        tail = next(
            (a.get("error_tail", "") for a in rec.get("attempts", []) if isinstance(a, dict)
             and str(a.get("kind", "")).startswith("cuda") and not a.get("ok")),
            "",
        )  # fmt: skip
        return (
            f"no CUDA kernel: the CUDA build FAILED ({rec.get('cuda_why', '')}; CUDA_HOME={rec.get('cuda_home')} "
            f"from {rec.get('cuda_home_how')}, nvcc {rec.get('nvcc')}, torch {rec.get('torch')} "
            f"CUDA {rec.get('torch_cuda')}); last compiler output:\n{tail}"
        )
    return f"no CUDA kernel (built without CUDA: {rec.get('cuda_why') or 'no reason recorded'})"


_lock = threading.Lock()
_status: ExtensionStatus | None = None
_last: tuple[str, str] = ("none", "fused_patch_embed has not been called yet")
_warned: set[str] = set()


def _op_exists() -> bool:
    # torch._C, justified: the dispatcher's registry is the only place that knows whether the C++ op
    # (and, below, a kernel for one dispatch key) is registered; torch has no public query for it
    try:
        torch._C._dispatch_find_schema_or_throw(_OP_NAME, "")
    except RuntimeError:
        return False
    return True


def _has_kernel(key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, key))


def _load() -> ExtensionStatus:
    if os.environ.get("BAGEL_KERNELS_DISABLE_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
        return ExtensionStatus(False, False, False, None, "disabled by BAGEL_KERNELS_DISABLE_EXT=1")
    path = None
    if not _op_exists():
        try:
            spec = importlib.util.find_spec(_EXT_MODULE)
        except (ImportError, ValueError) as exc:
            spec = None
            why = repr(exc)
        else:
            why = ""
        if spec is None or spec.origin is None:
            rec = _build_record()
            return ExtensionStatus(
                False,
                False,
                False,
                None,
                f"{_EXT_MODULE} is not built {why}(install with `pip install --no-build-isolation -e .` "
                "with torch present; BAGEL_KERNELS_SKIP_EXT=1 or a missing compiler skip it)"
                + (f"; {no_cuda_reason(rec)}" if rec and rec.get("cuda") == "failed" else ""),
                build_summary(rec),
            )
        path = spec.origin
        try:
            torch.ops.load_library(path)
        except Exception as exc:  # e.g. built against another torch: undefined symbols
            return ExtensionStatus(False, False, False, path, f"loading {path} failed: {exc}")
        if not _op_exists():
            return ExtensionStatus(
                False, False, False, path, f"{path} loaded but did not register {_OP_NAME}"
            )
    _register_python_parts()
    cpu, cuda = _has_kernel("CPU"), _has_kernel("CUDA")
    rec = _build_record()
    missing = [] if cuda else [no_cuda_reason(rec)]
    if not cpu:
        missing.append("no CPU kernel")
    return ExtensionStatus(True, cpu, cuda, path, "; ".join(missing), build_summary(rec))


def extension_status() -> ExtensionStatus:
    """Load the extension if not done yet (no compilation, ever) and report what is usable and why not."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _load()
    return _status


def last_backend() -> tuple[str, str]:
    """``(backend, reason)`` of the most recent :func:`fused_patch_embed` / :func:`fused_patch_embed_images`
    call (under ``torch.compile``: of the most recent trace)."""
    return _last


def _extension_reasons(kernel: str) -> Callable[[Request], list[str]]:
    """The hook of an extension backend: its ``kernel`` ("cpu" or "cuda") must be built and loaded."""

    def reasons(req: Request) -> list[str]:
        st = extension_status()
        if getattr(st, kernel):
            return []
        return [f"the extension's {kernel} kernel is not available: {st.reason or 'extension not loaded'}"]

    return reasons


# The backends (bagel_kernels.dispatch). "auto" takes the fastest correct path per device: on CPU that is
# torch (BLAS GEMM + add), the extension's CPU kernel being 6.6x slower at so400m shapes
# (benchmarks/test_microbench.py), so "cpu_ext" runs only when named (tests, parity).
PATCH_EMBED = Family(
    "patch_embed",
    {
        "cuda": Backend("cuda", devices=("cuda",), dtypes=_EXT_DTYPES, hook=_extension_reasons("cuda")),
        "cpu_ext": Backend("cpu_ext", devices=("cpu",), dtypes=_EXT_DTYPES, hook=_extension_reasons("cpu")),
        "torch": Backend("torch", dtypes=_REF_DTYPES),
    },
    auto={"cuda": ("cuda", "torch"), "*": ("torch",)},
)
BACKENDS = PATCH_EMBED.names


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device_type: str, dtype_name: str) -> str:
    """Backend that runs for these arguments; records it for :func:`last_backend`. Evaluated eagerly
    (also while torch.compile traces), so loading and warnings stay out of compiled graphs."""
    global _last
    extension_status()
    dtype = getattr(torch, dtype_name)
    choice = PATCH_EMBED.choose(backend, Request(torch.device(device_type), dtype))
    if backend != "auto":
        _last = (choice.name, "requested")
    elif choice.name == "cuda":
        _last = ("cuda", "auto: CUDA extension kernel")
    elif device_type == "cpu":
        _last = ("torch", "auto: the torch path (BLAS) is the fastest on CPU")
    else:  # the extension was wanted and cannot run: say why, and warn once per reason
        skipped = "; ".join(f"{n}: {', '.join(r)}" for n, r in choice.skipped.items())
        why = f"auto: {skipped or f'no extension kernel for {device_type} tensors'}"
        _last = ("torch", why)
        if why not in _warned and dtype in _EXT_DTYPES:
            _warned.add(why)
            message = f"fused_patch_embed falls back to the unfused torch path ({why})"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
    return choice.name


# --------------------------------------------------------------------------- torch.library: fake + autograd
def _fake(input, weight, bias, pos_table, pos_ids, patch_coords, patch_size, check_indices):
    # the dispatcher runs the fake whenever one argument is on meta: without this check it would hand
    # back an uninitialised tensor on the pixels' device for, e.g., pos_ids on meta
    try:
        check_same_device(
            "input",
            input,
            weight=weight,
            bias=bias,
            pos_table=pos_table,
            pos_ids=pos_ids,
            patch_coords=patch_coords,
        )
    except ValueError as exc:
        raise ValueError(f"torch.ops.{_OP_NAME.replace('::', '.')}: {exc}") from None
    n = patch_coords.shape[0] if patch_coords is not None else input.shape[0]
    return input.new_empty((n, weight.shape[0]))


def _setup_context(ctx, inputs, output):
    input, weight, bias, pos_table, pos_ids, patch_coords, patch_size, check_indices = inputs
    ctx.save_for_backward(input, weight, pos_ids, patch_coords)
    ctx.patch_size = patch_size
    ctx.table_rows = pos_table.shape[0] if pos_table is not None else 0
    ctx.check_indices = check_indices


def _embedding_grad(grad: torch.Tensor, pos_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """``d(pos_table)`` of ``out = ... + pos_table[pos_ids]``: rows summed per id, in float32."""
    if grad.device.type == "cuda":
        # F.embedding's own backward: sort-based segment sums, accumulated in float32, deterministic
        return torch.ops.aten.embedding_dense_backward(grad, pos_ids.long(), rows, -1, False)
    acc = torch.zeros(rows, grad.shape[1], dtype=torch.float32, device=grad.device)
    return acc.index_add_(0, pos_ids.long(), grad.float()).to(grad.dtype)


def _backward(ctx, grad):
    input, weight, pos_ids, patch_coords = ctx.saved_tensors
    need_input, need_weight, need_bias, need_table = ctx.needs_input_grad[:4]
    images = patch_coords is not None
    grad_input = grad_weight = grad_bias = grad_table = None
    has_patches = True
    if not ctx.check_indices:
        # rows with an out-of-range id or coordinate came out NaN: they drop out of every gradient
        # (zero grad, ids/coords replaced by 0), so no gather or scatter below leaves its tensor
        p = ctx.patch_size
        shape = input.shape if images else None
        valid = _valid_rows(grad.shape[0], grad.device, ctx.table_rows, pos_ids, shape, patch_coords, p)
        grad = grad.masked_fill(~valid[:, None], 0)
        if pos_ids is not None:
            pos_ids = pos_ids.masked_fill(~valid, 0)
        if images:
            patch_coords = patch_coords.masked_fill(~valid[:, None], 0)
            has_patches = bool(input.shape[0] and input.shape[2] // p and input.shape[3] // p)
    if need_weight:
        if not has_patches:  # every row invalid: no patch to read
            a = grad.new_zeros(grad.shape[0], weight.shape[1])
        else:
            a = patchify_images(input, patch_coords, ctx.patch_size) if images else input  # [N, K]
        grad_weight = grad.t().mm(a.to(grad.dtype))  # [E, K]
    if need_bias:
        grad_bias = grad.sum(0)
    if need_table:
        if ctx.table_rows == 0:
            grad_table = grad.new_zeros(0, grad.shape[1])
        else:
            grad_table = _embedding_grad(grad, pos_ids, ctx.table_rows)
    if need_input:
        gp = grad.mm(weight)  # [N, K]
        if images and not has_patches:
            grad_input = torch.zeros_like(input)
        elif images:
            p = ctx.patch_size
            grad_input = torch.zeros_like(input, memory_format=torch.contiguous_format)
            view = patch_grid_view(grad_input, p)  # [B, Hp, Wp, p, p, C]
            c = patch_coords.long()
            view.index_put_(
                (c[:, 0], c[:, 1], c[:, 2]), gp.reshape(-1, p, p, input.shape[1]), accumulate=True
            )
        else:
            grad_input = gp
    return grad_input, grad_weight, grad_bias, grad_table, None, None, None, None


_registered = False


def _register_python_parts() -> None:
    """Fake implementation and autograd formula of the C++ op (the op's ``set_python_module`` points here)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake(_OP_NAME, _fake)
    torch.library.register_autograd(_OP_NAME, _backward, setup_context=_setup_context)
    _registered = True


# ------------------------------------------------------------------------------------------ public API
def _is_int(t: torch.Tensor) -> bool:
    return t.dtype in (torch.int32, torch.int64)


def _validate(
    n: int, k_input: int, device: torch.device, dtype: torch.dtype, weight, bias, pos_table, pos_ids
) -> None:
    """ValueError naming the argument for every shape/dtype/device mismatch (no data-dependent checks)."""
    if dtype not in _REF_DTYPES:
        raise ValueError(
            f"pixels must be float32, float16 or bfloat16 (float64: backend='torch' only), got {dtype}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("pos_table", pos_table)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the pixels are on {device}")
        if t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but the pixels have {dtype} (one dtype for all)")
    if weight is None or weight.dim() != 2 or weight.shape[1] != k_input:
        raise ValueError(
            f"weight must be [hidden, {k_input}] (C*p*p inputs per patch), got "
            f"{None if weight is None else list(weight.shape)}"
        )
    hidden = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != hidden):
        raise ValueError(f"bias must be [hidden={hidden}], got {list(bias.shape)}")
    if (pos_table is None) != (pos_ids is None):
        raise ValueError("pos_table and pos_ids must be given together (one of them is None)")
    if pos_table is not None:
        if pos_table.dim() != 2 or pos_table.shape[1] != hidden:
            raise ValueError(f"pos_table must be [P, hidden={hidden}], got {list(pos_table.shape)}")
        if not isinstance(pos_ids, torch.Tensor) or not _is_int(pos_ids):
            raise ValueError(
                f"pos_ids must be an int32/int64 tensor, got {getattr(pos_ids, 'dtype', type(pos_ids))}"
            )
        if pos_ids.device != device:
            raise ValueError(f"pos_ids is on {pos_ids.device} but the pixels are on {device}")
        if pos_ids.dim() != 1 or pos_ids.shape[0] != n:
            raise ValueError(f"pos_ids must be [N={n}], got {list(pos_ids.shape)}")


def _check_ranges_torch(pos_table, pos_ids, images=None, patch_coords=None, patch_size=0) -> None:
    """Data-dependent index checks for the torch path (the extension does its own, in C++)."""
    if torch.compiler.is_compiling():
        return
    if pos_ids is not None and pos_ids.numel():
        lo, hi = int(pos_ids.min()), int(pos_ids.max())
        if lo < 0 or hi >= pos_table.shape[0]:
            raise ValueError(
                f"pos_ids must lie in [0, {pos_table.shape[0]}) (rows of pos_table), got [{lo}, {hi}]"
            )
    if patch_coords is not None and patch_coords.numel():
        B, _, H, W = images.shape
        lo = patch_coords.min(0).values.tolist()
        hi = patch_coords.max(0).values.tolist()
        for j, (what, limit) in enumerate(
            (("image index", B), ("patch row", H // patch_size), ("patch col", W // patch_size))
        ):
            if lo[j] < 0 or hi[j] >= limit:
                raise ValueError(
                    f"patch_coords[:, {j}] ({what}) must lie in [0, {limit}), got [{lo[j]}, {hi[j]}]"
                )


def fused_patch_embed(
    patches: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_table: torch.Tensor | None = None,
    pos_ids: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """``patches @ weight.T + bias (+ pos_table[pos_ids])`` in one kernel -> ``[N, E]``.

    patches ``[N, C*p*p]`` (BAGEL's patchify order), weight ``[E, C*p*p]``, bias ``[E]`` or None,
    pos_table ``[P, E]`` and pos_ids ``[N]`` (int32/int64), both or neither. One floating dtype for all
    (float32/float16/bfloat16; float64 with backend="torch"), one device. Differentiable in patches,
    weight, bias and pos_table. See the module docstring for ``backend`` and ``check_indices``."""
    PATCH_EMBED.check_name(backend)
    if not isinstance(patches, torch.Tensor) or patches.dim() != 2:
        raise ValueError(
            f"patches must be a 2-D tensor [N, C*p*p], got {getattr(patches, 'shape', type(patches))}"
        )
    _validate(
        patches.shape[0], patches.shape[1], patches.device, patches.dtype, weight, bias, pos_table, pos_ids
    )
    which = resolve_backend(backend, patches.device.type, str(patches.dtype).removeprefix("torch."))
    if which == "torch":
        if check_indices and not torch.compiler.is_compiling():
            _check_ranges_torch(pos_table, pos_ids)
            return patch_embed_reference(patches, weight, bias, pos_table, pos_ids)
        return _reference_unchecked(None, None, 0, patches, weight, bias, pos_table, pos_ids)
    return torch.ops.bagel_kernels_ext.fused_patch_embed(
        patches, weight, bias, pos_table, pos_ids, None, 0, check_indices
    )


def fused_patch_embed_images(
    images: torch.Tensor,
    patch_coords: torch.Tensor,
    patch_size: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_table: torch.Tensor | None = None,
    pos_ids: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """Like :func:`fused_patch_embed` but patchifies inside the kernel: patch ``n`` is the ``p x p``
    window at patch row ``patch_coords[n, 1]``, patch col ``patch_coords[n, 2]`` of image
    ``patch_coords[n, 0]`` of the padded batch ``images [B, C, H, W]`` (pixels beyond the last whole
    patch are never read). Equals ``fused_patch_embed(patchify_images(images, patch_coords, p), ...)``;
    with every patch of an image in order it equals BAGEL's :func:`patchify` of that image."""
    PATCH_EMBED.check_name(backend)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(
            f"images must be a 4-D tensor [B, C, H, W], got {getattr(images, 'shape', type(images))}"
        )
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if (
        not isinstance(patch_coords, torch.Tensor)
        or not _is_int(patch_coords)
        or patch_coords.dim() != 2
        or patch_coords.shape[1] != 3
    ):
        raise ValueError(
            "patch_coords must be an int32/int64 tensor [N, 3] (image, patch row, patch col), got "
            f"{getattr(patch_coords, 'dtype', type(patch_coords))} {list(getattr(patch_coords, 'shape', []))}"
        )
    if patch_coords.device != images.device:
        raise ValueError(f"patch_coords is on {patch_coords.device} but images are on {images.device}")
    C = images.shape[1]
    _validate(
        patch_coords.shape[0],
        C * patch_size * patch_size,
        images.device,
        images.dtype,
        weight,
        bias,
        pos_table,
        pos_ids,
    )
    which = resolve_backend(backend, images.device.type, str(images.dtype).removeprefix("torch."))
    if which == "torch":
        if check_indices and not torch.compiler.is_compiling():
            _check_ranges_torch(pos_table, pos_ids, images, patch_coords, patch_size)
            return patch_embed_images_reference(
                images, patch_coords, patch_size, weight, bias, pos_table, pos_ids
            )
        return _reference_unchecked(images, patch_coords, patch_size, None, weight, bias, pos_table, pos_ids)
    return torch.ops.bagel_kernels_ext.fused_patch_embed(
        images, weight, bias, pos_table, pos_ids, patch_coords, patch_size, check_indices
    )


if _op_exists():  # the library was loaded by other means (torch.ops.load_library): attach fake + autograd now
    _register_python_parts()

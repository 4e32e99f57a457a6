"""The argument checks shared by every op family of ``bagel_kernels`` and by the ``bagel`` model layer.

One rule throughout: nothing is coerced silently. An int is an int (``2.0``, ``True`` and ``"2"`` are
refused, so that ``2.5`` can never be truncated by accident), a float is a real number (numpy floats
included, bools and strings refused), a flag is a bool. Every check raises ``ValueError`` naming the
argument (a ``TypeError`` would name the same problem; one exception type keeps callers simple).

    coercion   as_int, as_int_list, as_float, as_bool, check_softmax_scale
    tensors    check_tensor, check_same_device, check_weight, check_like, check_vector, check_range
    values     to_device (meta/fake aware), has_values (False for meta / fake tensors and while torch.compile traces: value
               checks, which read device data, are skipped there; shapes, dtypes and devices are not)
    sizes      next_pow2, pad_dim
    switches   interpreting (the TRITON_INTERPRET test, read as Triton reads it)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

from .backends import interpreting

__all__ = [
    "as_int",
    "as_int_list",
    "as_float",
    "as_bool",
    "check_softmax_scale",
    "check_tensor",
    "check_same_device",
    "check_weight",
    "check_like",
    "check_vector",
    "check_range",
    "has_values",
    "to_device",
    "next_pow2",
    "pad_dim",
    "interpreting",
    "dtype_names",
]


# ============================================================================================ coercion
def as_int(value, name: str) -> int:
    """``value`` as a Python int, refusing anything that is not an integer already: bools, floats
    (integral ones too: ``2.0`` is refused, so that ``2.5`` can never be truncated by accident),
    strings, and non-integer tensors. Accepts ints, numpy integers and one-element integer tensors."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an int, got the bool {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise ValueError(
                f"{name} must be an int, got a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        return int(value.item())
    if isinstance(value, (float, np.floating, str, bytes)):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None


def as_int_list(values, name: str) -> list[int]:
    """A 1-D sequence of ints (list/tuple of ints, integer numpy array or tensor) as a list of Python
    ints; every element goes through :func:`as_int` (no float, bool or string is coerced)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-D sequence of ints, got a tensor of shape {tuple(values.shape)}"
            )
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
        return [int(v) for v in values.tolist()]
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise ValueError(
                f"{name} must be a 1-D sequence of ints, got a numpy array of dtype {values.dtype} "
                f"and shape {values.shape}"
            )
        return [int(v) for v in values.tolist()]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    return [as_int(v, f"{name}[{i}]") for i, v in enumerate(values)]


def as_float(
    value, name: str, *, finite: bool = True, min_value: float | None = None, positive: bool = False
) -> float:
    """``value`` as a Python float: ints, floats and numpy integers/floats are accepted; bools, strings,
    tensors and anything else are refused. ``finite``: refuse inf and NaN (NaN is always refused);
    ``min_value``: refuse values below it; ``positive``: refuse values <= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    out = float(value)
    # comparisons, not math.isnan/isinf: they also hold for the symbolic floats torch.compile traces
    if out != out or (finite and (out == math.inf or out == -math.inf)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if min_value is not None and out < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value!r}")
    if positive and not out > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def check_softmax_scale(value, name: str = "softmax_scale") -> float:
    """A softmax scale as a float: a finite, non-negative real number (bools, strings, NaN and inf
    refused), the same rule on every attention backend (the Triton kernels fold the scale into the
    running max, which needs it >= 0)."""
    return as_float(value, name, min_value=0.0)


def as_bool(value, name: str) -> bool:
    """``value`` as a bool: only ``True``/``False`` (and numpy bools); ``"no"``, ``0`` or ``None`` are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    return bool(value)


# ============================================================================================ tensors
def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    """``"float16, bfloat16, float32"``: dtypes as messages name them."""
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(name: str, t, dims: int | None = None, dtypes: Sequence[torch.dtype] | None = None) -> None:
    """``t`` is a tensor with ``dims`` dimensions and one of ``dtypes`` (None: any)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {dtype_names(dtypes)}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    """Every tensor of ``others`` (None skipped; lists of tensors checked element-wise) is on ``ref``'s
    device. The registered ops' fake implementations call it too: the dispatcher runs the fake whenever
    one argument is on ``meta``, and a fake that allocated on the first argument's device without this
    check would hand back uninitialised memory."""
    for name, t in others.items():
        if isinstance(t, (list, tuple)):
            check_same_device(ref_name, ref, **{f"{name}[{i}]": x for i, x in enumerate(t)})
        elif t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_weight(name: str, w, shape: tuple, ref: torch.Tensor, ref_name: str = "x", dtypes=None) -> None:
    """``w`` is a tensor of exactly ``shape`` on ``ref``'s device."""
    check_tensor(name, w, dims=len(shape), dtypes=dtypes)
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(w.shape)}")
    check_same_device(ref_name, ref, **{name: w})


def check_like(name: str, t, ref: torch.Tensor, ref_name: str, dtypes=None) -> None:
    """``t`` has ``ref``'s shape and device (a gradient of ``ref``, or its partner operand)."""
    check_tensor(name, t, dims=ref.dim(), dtypes=dtypes)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    check_same_device(ref_name, ref, **{name: t})


def check_vector(
    name: str, t, n: int, device, *, dtype: torch.dtype = torch.int32, optional: bool = False
) -> None:
    """``t`` is a contiguous 1-D ``dtype`` tensor of ``n`` entries on ``device`` (None allowed when
    ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != dtype:
        got = (
            f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        )
        raise ValueError(f"{name} must be a 1-D {str(dtype).removeprefix('torch.')} tensor, got {got}")
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_range(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    """Values in ``[lo, hi]``, checked only for CPU tensors that hold values (checking CUDA values would
    cost a device sync; the kernels clamp what they read from tables instead)."""
    if t.device.type == "cpu" and t.numel() and has_values(t) and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{name} holds values outside [{lo}, {hi}]: min {int(t.min())}, max {int(t.max())}")


def has_values(*tensors: torch.Tensor) -> bool:
    """Whether the tensors' values can be read: False for ``meta`` tensors, for fake tensors
    (``FakeTensorMode``: shapes without data) and while ``torch.compile`` traces. Value checks run only
    where this is True; shape, dtype and device checks always run."""
    if torch.compiler.is_compiling():
        return False
    return not any(t.device.type == "meta" or _fake(t) for t in tensors)


def _fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor  # torch's own class; no public alias exists

    return isinstance(t, FakeTensor)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)``, except for a tensor without data (meta or fake, or any tensor while a
    ``FakeTensorMode`` is active), which becomes an empty tensor of its shape and dtype on ``device``:
    there is nothing to copy, and a fake CPU tensor cannot move to a device the torch build lacks (a
    CPU-only build planning CUDA shapes under ``FakeTensorMode``, where only factories take the device)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type != "meta" and not _fake(t):
        try:
            return t.to(device)
        except RuntimeError:
            if not _fake(torch.empty(0)):  # no FakeTensorMode active: a real error
                raise
    return torch.empty(t.shape, dtype=t.dtype, device=device)


# ============================================================================================ sizes
def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``); ``triton.next_power_of_2`` without triton."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pad_dim(d: int) -> int:
    """A head dim as the kernels' column block holds it: the next power of two, at least 16."""
    return max(16, next_pow2(d))

"""The backend names of every op family and the Triton-interpreter switch, importable without torch.

This module imports nothing but the standard library, so that a command line can refuse a bad
backend name (``bagel-demo --attention nonsense``) in a fraction of a second, before torch is
imported. It is also where the names are declared: each family's registry (a
:class:`bagel_kernels.dispatch.Family` in the family's module) must implement exactly the backends
listed here, in this order, and refuses to build otherwise. The registries declare everything else
about a backend (devices, dtypes, limits, row-index support, preparation hook, compile specs).

    family        module                      backends (besides "auto")
    attention     bagel_kernels.attention     triton, flex, sdpa
    mot           bagel_kernels.mot           triton, torch
    patch_embed   bagel_kernels.patch_embed   cuda, cpu_ext, torch
    linear_cross_entropy  bagel_kernels.linear_cross_entropy  triton, torch
"""

from __future__ import annotations

import os

__all__ = ["AUTO", "BACKEND_NAMES", "FAMILY_MODULES", "names", "interpreting", "INTERPRET_ENV"]

AUTO = "auto"

# family -> its backends, in declaration order (the registries check that they match)
BACKEND_NAMES: dict[str, tuple[str, ...]] = {
    "attention": ("triton", "flex", "sdpa"),
    "mot": ("triton", "torch"),
    "patch_embed": ("cuda", "cpu_ext", "torch"),
    "linear_cross_entropy": ("triton", "torch"),
}
# family -> the module whose registry (a module attribute named like the family, upper case) declares it
FAMILY_MODULES: dict[str, str] = {
    "attention": "bagel_kernels.attention",
    "mot": "bagel_kernels.mot",
    "patch_embed": "bagel_kernels.patch_embed",
    "linear_cross_entropy": "bagel_kernels.linear_cross_entropy",
}

INTERPRET_ENV = "TRITON_INTERPRET"
# the values Triton itself reads as "on" (triton.knobs env_bool: case-insensitive, no spaces stripped)
_TRUE = ("1", "true", "on", "yes", "y")


def names(family: str) -> tuple[str, ...]:
    """Every name ``backend=`` accepts in ``family``: ``"auto"``, then its backends."""
    if family not in BACKEND_NAMES:
        raise ValueError(f"unknown op family {family!r}; families: {', '.join(BACKEND_NAMES)}")
    return (AUTO, *BACKEND_NAMES[family])


def interpreting() -> bool:
    """True when Triton runs its kernels on the CPU (the interpreter: tests, slow).

    ``TRITON_INTERPRET`` is read the way Triton reads it (``1``, ``true``, ``on``, ``yes`` or ``y``, in
    any case), so that the package and Triton never disagree about whether kernels are interpreted.
    This is the one place the variable is read."""
    return os.environ.get(INTERPRET_ENV, "").lower() in _TRUE

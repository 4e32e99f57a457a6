"""Input validation of the model layer: checks once, at the public boundary.

Host checks (types, shapes, lengths) raise at once. Checks of tensor VALUES (indexes in range, a
partition of the sequence, ...) run on the tensors' device and are collected in a
:class:`DeviceChecks`, which reads them all back in ONE host synchronisation. A public entry point
(``BagelForUnifiedMultimodal.forward`` / ``prepare_pack``, ``Qwen2Model.prepare_context``,
:func:`bagel.model.qwen2.prepare_routing`) validates once this way and then builds on the validated tensors
without checking them again: the mask's truncation is checked on its host copy (no device read), and
the grouping by expert is built with ``bagel_kernels.mot.GroupedOrder.from_checked`` after its
``partition_flags`` were read back with the other checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bagel.model.backend import BagelBackendConfig
from bagel_kernels.checks import has_values

__all__ = ["DeviceChecks", "as_index", "backend_property", "check_backend", "HasBackend"]


class DeviceChecks:
    """Device-side input checks read back in one synchronisation.

    ``add(bad, message, explain=None)`` records a flag tensor (any True entry = the check failed);
    ``raise_first()`` reads every flag back at once and raises ValueError for the first failing check,
    in the order added. ``explain`` (optional) is called first for a failing check: a function that
    raises a more detailed ValueError (it may take its own host syncs: it runs on bad input only)."""

    def __init__(self) -> None:
        self._flags: list[torch.Tensor] = []
        self._errors: list[tuple[str, Callable[[], object] | None]] = []

    def add(self, bad: torch.Tensor, message: str, explain: Callable[[], object] | None = None) -> None:
        if bad.numel():
            self._flags.append(bad.any().reshape(1))
            self._errors.append((message, explain))

    def in_range(self, t: torch.Tensor, name: str, hi: int, what: str) -> None:
        self.add((t < 0) | (t >= hi), f"{name} has entries outside [0, {hi}) ({what})")

    def raise_first(self) -> None:
        """The one host synchronisation: raises ValueError for the first failing check, else nothing.
        Flags without values (fake or meta tensors: a forward under ``FakeTensorMode``) cannot be read
        and are skipped, as the kernels skip their value checks (``bagel_kernels.checks.has_values``);
        validate such a batch on its real tensors first (:func:`bagel.model.fake.fake_forward_backward`)."""
        if not self._flags or not has_values(*self._flags):
            return
        bad = torch.cat([f.to(self._flags[0].device) for f in self._flags]).tolist()
        for failed, (message, explain) in zip(bad, self._errors, strict=True):
            if failed:
                if explain is not None:
                    explain()
                raise ValueError(message)


def as_index(t, name: str, device: torch.device, *, allow_bool_len: int | None = None) -> torch.Tensor:
    """A 1-D long index tensor on ``device``; with ``allow_bool_len`` a bool mask of that length is
    accepted and turned into indexes. Floats, complex and (otherwise) bools are refused, never cast."""
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a 1-D integer tensor: {exc}") from None
        if t.numel() == 0:  # an empty list has no element type (torch makes it float32)
            t = t.long()
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        if allow_bool_len is None:
            raise ValueError(f"{name} must hold integer indexes, got a bool tensor")
        if t.numel() != allow_bool_len:
            raise ValueError(
                f"{name} is a bool mask of {t.numel()} entries, expected sequence_length={allow_bool_len}"
            )
        return torch.nonzero(t.to(device)).flatten()
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.long)


def check_backend(value) -> BagelBackendConfig:
    """``value`` if it is a :class:`bagel.model.backend.BagelBackendConfig`, else ValueError."""
    if not isinstance(value, BagelBackendConfig):
        raise ValueError(f"backend must be a BagelBackendConfig, got {type(value).__name__}")
    return value


def backend_property(children=None) -> property:
    """A ``backend`` attribute kept in ``self._backend``, checked by :func:`check_backend` when set;
    ``children(self)`` lists the submodules that take the new value too."""

    def get(self) -> BagelBackendConfig:
        return self._backend

    def set_(self, value: BagelBackendConfig) -> None:
        self._backend = check_backend(value)
        for child in children(self) if children is not None else ():
            child.backend = value

    return property(
        get,
        set_,
        doc="The kernel choice (a :class:`bagel.model.backend.BagelBackendConfig`), checked when set.",
    )


class HasBackend:
    """Mixin of the modules that pick kernels: a ``backend`` attribute, checked when set."""

    backend = backend_property()

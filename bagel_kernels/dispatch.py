"""One backend dispatcher for every op family (attention, MoT, patch embedding).

Each backend declares everything about itself in one place, its family's registry: device types,
dtypes, size limits by name (``head_dim``, ``row_width``, ``tokens``), whether it also runs under the
Triton interpreter, whether it reads rows through a mask's row index itself (``row_index``), what it
builds ahead from a mask (``prepare``), where its kernels' compile specs live (``compile_specs``, read
by :mod:`bagel_kernels.compile_check`), and a ``hook`` for the reasons no declaration covers (an
optional package that is missing, a compiled extension that is not built, no backward on some device,
meta tensors it cannot trace). A :class:`Family` holds its backends in declaration order and an
``"auto"`` priority list per device type; the names are declared once, torch-free, in
:mod:`bagel_kernels.backends` (command lines read them there), and a family refuses to build unless
its backends are exactly those. One function, :meth:`Family.choose`, picks:

    "auto"   the first backend of the device type's priority list that accepts the request
    a name   that backend, if it accepts the request

and when it cannot, raises a ValueError that lists every backend of the family with its reasons
(``"accepts"`` for one that would run), the way xformers' attention dispatcher reports. An unknown
name is a ValueError listing the family's names (:attr:`Family.names`, which is also where
``bagel.BagelBackendConfig`` takes its allowed values from; :func:`family` returns a family by name).

A :class:`Request` is what every check reads: device, dtype, the sizes a backend may limit, and
whether a backward will run. Building one costs no device work, so choosing never synchronises.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .backends import AUTO, BACKEND_NAMES, FAMILY_MODULES, interpreting

__all__ = ["Request", "Backend", "Choice", "Family", "family", "families", "interpreting"]

_AUTO = AUTO
_ANY_DEVICE = "*"  # key of Family.auto for the device types without their own priority list


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Request:
    """What a backend is asked to run.

    ``device``/``dtype``: of the inputs; ``sizes``: named sizes that backends may limit (e.g.
    ``{"head_dim": 128}``); ``backward``: whether gradients will be taken through the call."""

    device: torch.device
    dtype: torch.dtype
    sizes: Mapping[str, int] = field(default_factory=dict)
    backward: bool = False


@dataclass(frozen=True)
class Backend:
    """One backend's declaration.

    Attributes:
        name: the name users pass as ``backend=``.
        devices: device types it runs on (``("cuda",)``); None: any.
        dtypes: input dtypes it takes; None: any.
        limits: ``size name -> (lo, hi)``, inclusive, for the sizes a request carries.
        interpreted: a Triton backend, which also runs on CPU tensors under ``TRITON_INTERPRET=1``.
        hook: ``request -> [reasons]`` for whatever the declarations above do not say.
        impl: what the family runs for this backend (e.g. attention's forward function); opaque here.
        row_index: it reads and writes rows through a mask's row index itself (else the family
            gathers the rows into mask order before calling it and scatters them back after).
        prepare: what it builds ahead from a mask (``(mask, request) -> None``, cached outside the
            mask), so that a ``torch.compile`` region only reads it; None: nothing to build.
        compile_specs: the module whose ``compile_specs(arch)`` lists its kernels for
            :mod:`bagel_kernels.compile_check`; None: no kernel of its own to compile.
    """

    name: str
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    limits: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    interpreted: bool = False
    hook: Callable[[Request], list[str]] | None = None
    impl: Any = None
    row_index: bool = False
    prepare: Callable[[Any, Request], None] | None = None
    compile_specs: str | None = None

    def reasons(self, request: Request) -> list[str]:
        """Why this backend refuses ``request`` (empty: it accepts)."""
        out = []
        device = request.device.type
        on_interpreter = self.interpreted and device == "cpu" and interpreting()
        if self.devices is not None and device not in self.devices and not on_interpreter:
            cpu_hint = self.interpreted and device == "cpu"
            hint = "; set TRITON_INTERPRET=1 to interpret the kernels on the CPU" if cpu_hint else ""
            out.append(f"runs on {' or '.join(self.devices)} tensors (got {device}{hint})")
        if self.dtypes is not None and request.dtype not in self.dtypes:
            names = ", ".join(_dtype_name(d) for d in self.dtypes)
            out.append(f"takes {names} inputs (got {_dtype_name(request.dtype)})")
        for size, (lo, hi) in self.limits.items():
            value = request.sizes.get(size)
            if value is not None and not lo <= value <= hi:
                out.append(f"{size} {value} is outside its limits [{lo}, {hi}]")
        if self.hook is not None:
            out += self.hook(request)
        return out


@dataclass(frozen=True)
class Choice:
    """The backend :meth:`Family.choose` picked, and the reasons of those ``"auto"`` tried first."""

    backend: Backend
    skipped: dict[str, list[str]]

    @property
    def name(self) -> str:
        return self.backend.name


@dataclass(frozen=True)
class Family:
    """The backends of one op family and its ``"auto"`` priority per device type (key ``"*"``: every
    other device type)."""

    name: str
    backends: Mapping[str, Backend]
    auto: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        for key, be in self.backends.items():
            if key != be.name or key == _AUTO:
                raise ValueError(f"{self.name}: backend registered as {key!r} is named {be.name!r}")
        declared = BACKEND_NAMES.get(self.name)
        if declared is not None and tuple(self.backends) != declared:
            raise ValueError(
                f"{self.name}: backends {tuple(self.backends)} differ from the names declared in "
                f"bagel_kernels.backends.BACKEND_NAMES {declared}"
            )
        if _ANY_DEVICE not in self.auto:
            raise ValueError(f"{self.name}: the auto priority needs a {_ANY_DEVICE!r} entry")
        for order in self.auto.values():
            unknown = [n for n in order if n not in self.backends]
            if unknown or not order:
                raise ValueError(f"{self.name}: auto priority {order} names unknown backends {unknown}")

    @property
    def names(self) -> tuple[str, ...]:
        """Every name ``backend=`` accepts: ``"auto"`` and the backends, in declaration order."""
        return (_AUTO, *self.backends)

    def check_name(self, backend) -> None:
        """ValueError for anything but one of :attr:`names`."""
        if not isinstance(backend, str) or (backend != _AUTO and backend not in self.backends):
            allowed = ", ".join(map(repr, self.names))
            raise ValueError(f"unknown {self.name} backend {backend!r}: backend must be one of {allowed}")

    def priority(self, device_type: str) -> tuple[str, ...]:
        """The order ``"auto"`` tries on ``device_type``."""
        return self.auto.get(device_type, self.auto[_ANY_DEVICE])

    def reasons(self, request: Request) -> dict[str, list[str]]:
        """Every backend's reasons to refuse ``request``, in declaration order."""
        return {name: be.reasons(request) for name, be in self.backends.items()}

    def available(self, request: Request) -> list[str]:
        """The backends that accept ``request``: ``"auto"``'s order for the device first, then the rest."""
        order = dict.fromkeys(self.priority(request.device.type) + tuple(self.backends))
        return [name for name in order if not self.backends[name].reasons(request)]

    def choose(self, backend: str, request: Request) -> Choice:
        """The backend that runs ``request``: ``"auto"`` takes the first of the device's priority list
        that accepts it, a name must accept it. ValueError (listing every backend's reasons) when none
        does, or for an unknown name."""
        self.check_name(backend)
        skipped: dict[str, list[str]] = {}
        for name in self.priority(request.device.type) if backend == _AUTO else (backend,):
            why = self.backends[name].reasons(request)
            if not why:
                return Choice(self.backends[name], skipped)
            skipped[name] = why
        raise ValueError(self.refusal(backend, request))

    def refusal(self, backend: str, request: Request) -> str:
        """The message of a refusal: what was asked, then every backend with its reasons."""
        what = f"{_dtype_name(request.dtype)} on {request.device.type}"
        if request.sizes:
            what += ", " + ", ".join(f"{k} {v}" for k, v in request.sizes.items())
        if request.backward:
            what += ", with backward"
        if backend == _AUTO:
            tried = ", ".join(self.priority(request.device.type))
            head = f"no {self.name} backend accepts these inputs ({what}; auto tries {tried})"
        else:
            head = f"{self.name} backend {backend!r} refuses these inputs ({what})"
        every = "; ".join(f"{n}: {', '.join(r) or 'accepts'}" for n, r in self.reasons(request).items())
        return f"{head}. Every {self.name} backend: {every}"


def family(name: str) -> Family:
    """The registry of op family ``name`` (``"attention"``, ``"mot"``, ``"patch_embed"``), imported on first
    use from the module :data:`bagel_kernels.backends.FAMILY_MODULES` names."""
    if name not in FAMILY_MODULES:
        raise ValueError(f"unknown op family {name!r}; families: {', '.join(FAMILY_MODULES)}")
    return getattr(importlib.import_module(FAMILY_MODULES[name]), name.upper())


def families() -> dict[str, Family]:
    """Every declared op family's registry, by name."""
    return {name: family(name) for name in FAMILY_MODULES}

"""When a fused kernel may stand in for the modules it replaces.

The model calls its submodules, so whatever a user swaps in or attaches (a PEFT LoRA layer, a float8
or quantised linear, a forward hook, a parametrization) takes effect on every backend. Some fast paths
read raw weights instead of calling modules: both experts' RMSNorm in one launch, q/k RMSNorm fused
with RoPE, the routed projections as two GEMMs into one buffer, the SwiGLU MLP split into its
projections and one activation kernel, the fused ViT patch embedding. Such a fusion computes what the
modules compute only when they are the stock classes with nothing attached; :func:`fusable` says when.

The model decides once per pack, eagerly, before the compiled region runs (``Qwen2Model.fusion_plan``,
``SiglipVisionModel.fusion_plan``); a module that fails the test is called instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

__all__ = ["fusable", "float_dtype", "float_device", "global_hooks_present"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def _plain(t: torch.Tensor | None) -> bool:
    """A parameter or buffer whose raw storage a kernel may read: a plain tensor, or a DTensor of
    FSDP2 (sharded between steps, unsharded into plain tensors while its unit runs). Tensor subclasses
    (quantised or float8 weights) are not."""
    if t is None:
        return True
    if type(t) in (nn.Parameter, torch.Tensor):
        return True
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def global_hooks_present() -> bool:
    """Whether any global module hook is registered (``nn.modules.module.register_module_forward_hook``
    and friends): they fire for every module call, so every module must then be called."""
    return any(getattr(_module, name, None) for name in _GLOBAL_HOOK_DICTS)


def fusable(kind: type | tuple[type, ...], *modules: nn.Module | None) -> bool:
    """True when a fused kernel reading these modules' raw weights computes exactly what calling them
    computes: every module is exactly of the stock class ``kind`` (``type(m) is kind``, so a subclass
    such as PEFT's or torchao's linears fails), has no forward / backward hook or pre-hook of its own,
    no global module hook is registered, it has no parametrization, its ``forward`` is not patched on
    the instance, and its parameters and buffers are plain tensors (not quantised / float8 subclasses).
    ``None`` entries are skipped."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if global_hooks_present():
        return False
    for m in modules:
        if m is None:
            continue
        if type(m) not in kinds:
            return False
        if any(getattr(m, name, None) for name in _HOOK_DICTS):
            return False
        if parametrize.is_parametrized(m) or "forward" in m.__dict__:
            return False
        if not all(_plain(t) for t in m._parameters.values()):
            return False
        if not all(_plain(t) for t in m._buffers.values()):
            return False
    return True


def float_dtype(module: nn.Module, default: torch.dtype | None = None) -> torch.dtype:
    """The dtype ``module`` computes in, read without assuming its layout (a swapped-in module may have
    no ``.weight``, or an int8 one): its first floating-point parameter's dtype, else its first
    floating-point buffer's, else ``default`` (``torch.get_default_dtype()``)."""
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in module.buffers():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype() if default is None else default


def float_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else buffer); the CPU for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")

"""Run the model on fake tensors: shapes, dtypes and memory without data, e.g. a memory estimate of
BAGEL-7B-MoT at real pack sizes on a CPU.

Under :class:`torch._subclasses.fake_tensor.FakeTensorMode` a tensor has a shape, a dtype and a device
but no data, so nothing may read a value. The model is built for that: every read of the pack's values
(validation, masks from the split lists, the kernels' block tables, grouping by expert) happens once, at
the edge, in :meth:`BagelForUnifiedMultimodal.prepare_pack`, and never touches a parameter's data; the
body, :meth:`BagelForUnifiedMultimodal.forward_prepared`, is tensor work and custom ops (each with a fake
implementation) only. The recipe:

1. build the model on ``meta`` and materialise it inside the mode (:func:`fake_model`): its parameters
   are fake, no memory is used, any size fits;
2. prepare the pack OUTSIDE the mode, from the batch's real host tensors (the data pipeline's output:
   index tensors and split lists on the CPU, latents and pixels as they come): validation reads those;
3. run ``forward_prepared`` and the backward INSIDE the mode (``allow_non_fake_inputs=True`` turns the
   pack's real tensors into fakes as they enter).

:func:`fake_forward_backward` does steps 2 and 3. ``model(**batch)`` also runs whole inside the mode:
the value checks (which have no values to read there) are then skipped, so validate the batch on its
real tensors as step 2 does. On a CPU-only build of torch, fake tensors must be on the CPU ("cuda"
fakes fail in some ops). A trainer adds what it measures around step 3 (for
example FSDP2 on a fake process group and ``torch.distributed._tools.fsdp2_mem_tracker``). The pack is
prepared for the model's device; a fake model on the CPU with the Triton backends (under
``TRITON_INTERPRET=1``) runs the same custom ops, with the same output shapes, as on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

__all__ = ["fake_mode", "fake_model", "fake_forward_backward"]


def fake_mode() -> FakeTensorMode:
    """A fake-tensor mode that lets real tensors in (they become fakes): the pack's tensors, prepared
    on real host data, enter the fake body this way."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_model(
    build: Callable[[], nn.Module],
    mode: FakeTensorMode,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """``build()`` (e.g. ``lambda: BagelForUnifiedMultimodal(config, backend)``) on ``meta``, cast to
    ``dtype`` there, then materialised as fake tensors on ``device`` inside ``mode``. Its weights hold
    no values (no initialisation is needed: nothing reads them)."""
    with torch.device("meta"):
        model = build()
    if dtype is not None:
        model.to(dtype)
    with mode:
        model.to_empty(device=device)
    return model


def _default_loss(out: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
    return sum(v.float().mean() for v in out.values() if v is not None)


def fake_forward_backward(
    model: nn.Module,
    batch: Mapping[str, Any],
    mode: FakeTensorMode,
    *,
    loss_fn: Callable[[Mapping[str, torch.Tensor | None]], torch.Tensor] = _default_loss,
    backward: bool = True,
) -> dict[str, torch.Tensor | None]:
    """One training step's forward (and backward) of ``model`` (a ``BagelForUnifiedMultimodal`` whose
    parameters are fakes of ``mode``, e.g. from :func:`fake_model`) on ``batch`` (``forward``'s
    keyword arguments, real tensors): the pack is prepared and validated on the real data outside the
    mode, then the body and ``loss_fn(outputs).backward()`` run inside it. Returns the (fake) outputs;
    the parameters' ``.grad`` are fake tensors of the right shapes."""
    pack = model.prepare_pack(**batch)  # outside the mode: reads the batch's values once
    with mode:
        out = model.forward_prepared(pack)
        if backward:
            loss_fn(out).backward()
    return out

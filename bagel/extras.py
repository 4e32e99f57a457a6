"""The optional dependencies of the model layer, named by the pyproject extra that installs them.

``bagel_kernels`` needs only torch, triton and numpy. The model layer (``bagel``: configs, modules,
checkpoints) needs the ``model`` extra (transformers, safetensors), the demo also the ``demo`` extra
(matplotlib). Imports of those go through :func:`needs_extra`, so that a missing one says what to install.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["EXTRAS", "needs_extra"]

EXTRAS = {
    "transformers": "model",
    "safetensors": "model",
    "matplotlib": "demo",
    "PIL": "data",
    "pyarrow": "data",
    "yaml": "data",
    "tqdm": "train",
    "peft": "lora",
    "tensorboard": "tensorboard",
}


@contextlib.contextmanager
def needs_extra() -> Iterator[None]:
    """Re-raise a ModuleNotFoundError of an optional dependency as one that names its extra."""
    try:
        yield
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        raise ModuleNotFoundError(
            f"{exc.name} is not installed: this part of bagel needs the '{extra}' extra "
            f"(pip install 'bagel-kernels[{extra}]'); bagel_kernels alone needs only torch, triton and numpy",
            name=exc.name,
        ) from exc

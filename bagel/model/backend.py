"""Which kernel runs each hot path of the BAGEL model: one config object, threaded through every module.

``"auto"`` picks the fastest backend the inputs allow (Triton / CUDA on GPUs, the reference elsewhere);
the reference values (``sdpa`` / ``torch`` / ``torch``) are the pure-PyTorch paths that every kernel is
tested against. The allowed names are the kernels' own: each op family's backends as declared in its
registry (:func:`bagel_kernels.dispatch.family`), whose names :mod:`bagel_kernels.backends` lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from bagel_kernels.dispatch import family

__all__ = ["BagelBackendConfig", "ATTENTION_BACKENDS", "MOT_BACKENDS", "PATCH_EMBED_BACKENDS"]

FAMILIES = {name: family(name) for name in ("attention", "mot", "patch_embed")}  # config field -> registry
ATTENTION_BACKENDS = FAMILIES["attention"].names
MOT_BACKENDS = FAMILIES["mot"].names
PATCH_EMBED_BACKENDS = FAMILIES["patch_embed"].names


@dataclass(frozen=True)
class BagelBackendConfig:
    """Backend choice per op family.

    Attributes:
        attention: packed attention backend, one of ``"auto"``, ``"triton"``, ``"flex"``, ``"sdpa"``
            (passed to :func:`bagel_kernels.packed_attention`).
        mot: MoT routed ops (RMSNorm, q/k norm + RoPE, SwiGLU, routed linear), one of ``"auto"``,
            ``"triton"``, ``"torch"`` (passed as ``backend=`` to :mod:`bagel_kernels.mot`).
        patch_embed: ViT patch embedding, one of ``"auto"`` (the fastest correct path per device: the
            CUDA extension on GPUs when built, the torch path on CPU), ``"cuda"`` (the extension's CUDA
            kernel), ``"cpu_ext"`` (the extension's C++ CPU kernel; slower than torch on CPU, for tests
            and parity), ``"torch"`` (``F.linear`` + position row); passed to
            :func:`bagel_kernels.fused_patch_embed`.
        deterministic: True promises a bit-identical backward on repeated runs (same inputs, same
            device and configuration) with every backend: the Triton attention kernels have no atomics,
            FlexAttention's backward is two-pass (no atomics), the ``sdpa`` backend runs SDPA's math
            kernel on CUDA (its memory-efficient backward accumulates with atomics), and the MoT ops (torch
            and Triton) and the model's own ops have deterministic backwards. False lets a backend use a
            faster non-deterministic backward where it has one (passed to
            :func:`bagel_kernels.packed_attention` as ``deterministic``).
    """

    attention: str = "auto"
    mot: str = "auto"
    patch_embed: str = "auto"
    deterministic: bool = False

    def __post_init__(self) -> None:
        for field, registry in FAMILIES.items():
            value, allowed = getattr(self, field), registry.names
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(
                    f"{field}={value!r} is not a valid backend; allowed values: {', '.join(map(repr, allowed))}"
                )
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be a bool, got {self.deterministic!r}")

    @classmethod
    def reference(cls, deterministic: bool = False) -> BagelBackendConfig:
        """All pure-PyTorch reference paths: attention ``sdpa``, mot ``torch``, patch_embed ``torch``."""
        return cls(attention="sdpa", mot="torch", patch_embed="torch", deterministic=deterministic)

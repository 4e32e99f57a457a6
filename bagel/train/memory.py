"""Peak GPU memory of a ``bagel-train`` step at BAGEL-7B-MoT's real shapes, computed on the CPU.

    python -m bagel.train.memory                 # the table (LoRA on 1x80 GB at 16k, full on 8x80 GB at 32k)
    bagel-train --estimate-memory                # the same

How: the model is built on ``meta`` and materialised as fake tensors (:mod:`bagel.model.fake`: shapes and
dtypes, no data), sharded with FSDP2 exactly as a run shards it (one unit per LLM and ViT layer + the
root, bf16 compute through ``MixedPrecisionPolicy``, fp32 gradient reduction, activation checkpointing)
over a fake process group of the run's world size (``torch.testing._internal.distributed.fake_pg``),
and one pack of the run's size is prepared on real host data (a mix of understanding, text-to-image,
edit and text samples at BAGEL's image sizes). Two training steps (forward, backward, AdamW step; the
second has the optimizer states) run under torch's FSDP2 memory tracker
(``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker``), which counts every tensor this rank
allocates: parameters (sharded and gathered), gradients, optimizer states, activations, temporaries.
The kernels are the GPU's (Triton attention and MoT: their registered fake implementations give the
output shapes; ``TRITON_INTERPRET=1`` is set so that they import on a CPU).

Not counted: the CUDA caching allocator's fragmentation and reserve, NCCL buffers, the CUDA context
(~0.5-1 GB), and the VAE (frozen, encoding outside the step). Measure on a GPU when one is at hand.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass

__all__ = ["MemoryCase", "CASES", "estimate_step_memory", "realistic_pack", "main"]


@dataclass
class MemoryCase:
    name: str
    mode: str  # "full" or "lora"
    world: int
    tokens: int  # per GPU (one pack)
    param_dtype: str  # storage of the sharded weights: float32 master weights, or bfloat16 (frozen base)
    lora_r: int = 64


CASES = [
    MemoryCase("LoRA r=64 (fp32 adapters), 1x80 GB, 16k tokens", "lora", 1, 16384, "bfloat16"),
    MemoryCase("full fine-tune, 8x80 GB, 32k tokens/GPU", "full", 8, 32768, "float32"),
]


def realistic_pack(config, tokens: int):
    """One pack of ``tokens`` tokens (flex-padded) cycling understanding (a 518 px ViT image, 32 + 128
    text tokens), text-to-image (64 caption tokens, a 512 px image: 1024 latent tokens), edit (ViT image,
    clean and noised 512 px latents) and text (512 tokens) samples, on the host."""
    import torch

    from bagel.data.packing import (
        EditSample,
        T2ISample,
        TextSample,
        UnderstandingSample,
        pack_samples,
        sample_num_tokens,
    )

    g = torch.Generator().manual_seed(0)
    p = config.vision_config.patch_size
    side = 37 * p  # 37x37 patches
    lat = 2 * 32  # 64x64 latent of a 512 px image: 32x32 = 1024 tokens with latent patch 2
    C = config.latent_channels

    def ids(n):
        return torch.randint(0, 1000, (n,), generator=g).tolist()

    makers = [
        lambda: UnderstandingSample(torch.randn(3, side, side, generator=g), ids(32), ids(128)),
        lambda: T2ISample(ids(64), torch.randn(C, lat, lat, generator=g)),
        lambda: EditSample(
            torch.randn(3, side, side, generator=g),
            torch.randn(C, lat, lat, generator=g),
            ids(32),
            torch.randn(C, lat, lat, generator=g),
        ),  # fmt: skip
        lambda: TextSample(ids(512)),
    ]
    samples, used, i = [], 0, 0
    while True:
        s = makers[i % len(makers)]()
        n = sample_num_tokens(s, config)
        if used + n > tokens:
            if i % len(makers) == len(makers) - 1 or n <= 514:
                break
            i += 1
            continue
        samples.append(s)
        used += n
        i += 1
    return pack_samples(samples, config, max_num_tokens=tokens, rng=0)


def _init_fake_group(world: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def estimate_step_memory(case: MemoryCase, *, config=None, steps: int = 2) -> dict:
    """Peak memory (bytes, by category) of rank 0 during ``steps`` training steps of ``case``."""
    import torch
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from bagel import BagelBackendConfig, BagelConfig, BagelForUnifiedMultimodal
    from bagel.model.fake import fake_mode, fake_model
    from bagel.train.build import lora_target_regex
    from bagel.train.distributed import apply_fsdp2
    from bagel.train.trainer import use_fused_ce

    config = config or BagelConfig.bagel_7b_mot()
    config.stage = 2
    backend = BagelBackendConfig(attention="triton", mot="triton", patch_embed="torch")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.param_dtype]
    _init_fake_group(case.world)
    mode = fake_mode()

    def build():
        model = BagelForUnifiedMultimodal(config, backend=backend).to(dtype)
        if (
            case.mode == "lora"
        ):  # adapters on meta too, fp32 (finetune.lora_dtype), materialised with the model
            from peft import LoraConfig, inject_adapter_in_model

            targets = lora_target_regex(["llm_attn", "llm_mlp"])
            inject_adapter_in_model(
                LoraConfig(r=case.lora_r, lora_alpha=2 * case.lora_r, target_modules=targets), model
            )
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
        return model

    model = fake_model(build, mode)
    use_fused_ce(model)  # as bagel-train runs by default (loss.ce: fused)
    for n, p in model.named_parameters():
        p.requires_grad_(case.mode == "full" or "lora_" in n)
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if dtype != torch.bfloat16 else None, reduce_dtype=torch.float32
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (case.world,))  # outside the mode: the mesh reads real ranks
    with mode:
        apply_fsdp2(model, mesh=mesh, mp_policy=mp, activation_checkpointing=True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
    batch = realistic_pack(config, case.tokens)
    # the tracker instruments the root unit's forward hooks: run the prepared body as the root's forward
    # (the class's forward_prepared, without the FSDP2 method wrapper: the module call runs the hooks)
    body = type(model).forward_prepared
    model.forward = types.MethodType(lambda self, pack: body(self, pack), model)
    pack = model.prepare_pack(**batch)  # real host data, outside the mode (reused by every step)

    def step(track: bool) -> None:
        out = model(pack)
        loss = sum(v.float().sum() for v in out.values() if v is not None)
        loss.backward()
        if not track:  # the optimizer step on DTensor shards runs outside the tracker (see below)
            opt.step()
            opt.zero_grad()

    with mode:
        step(track=False)  # creates the optimizer states (exp_avg, exp_avg_sq on this rank's shards)
        tracker = FSDPMemTracker(mod=model, optm=opt)
        with tracker:  # counts the states, then a whole forward and backward
            step(track=True)
    snap = tracker.get_tracker_snapshot("peak")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    dist.destroy_process_group()
    per_dev = {str(d): v for d, v in snap.items()}
    return {
        "case": case,
        "params": n_params,
        "trainable": n_train,
        "sequence_length": int(batch["sequence_length"]),
        "ce_tokens": int(batch["ce_loss_indexes"].numel()) if "ce_loss_indexes" in batch else 0,
        "mse_tokens": int(batch["mse_loss_indexes"].numel()) if "mse_loss_indexes" in batch else 0,
        "peak": per_dev,
    }


def _fmt(result: dict) -> list[str]:
    gib = 2**30
    rows = []
    for cats in result["peak"].values():
        total = cats.get("Total", sum(v for k, v in cats.items() if k != "Total"))
        parts = ", ".join(
            f"{getattr(k, 'value', k).lower()} {v / gib:.1f}"
            for k, v in cats.items()
            if k != "Total" and v >= gib / 20
        )
        case = result["case"]
        rows.append(
            f"| {case.name} | {result['sequence_length']} ({result['ce_tokens']} CE, {result['mse_tokens']} MSE) "
            f"| {result['trainable'] / 1e9:.3g} B of {result['params'] / 1e9:.3g} B, {case.param_dtype} "
            f"| **{total / gib:.1f}** | {parts} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels' fakes import without a GPU
    print(
        "Peak memory per GPU of one bagel-train step at BAGEL-7B-MoT shapes (FSDP2, bf16 compute, fp32 grad"
    )
    print(
        "reduction, activation checkpointing, chunked linear CE; computed on fake tensors, see bagel.train.memory):"
    )
    print()
    print("| case | pack tokens | trainable params, weights | peak GiB | by category (GiB) |")
    print("|---|---|---|---|---|")
    for case in CASES:
        for row in _fmt(estimate_step_memory(case)):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

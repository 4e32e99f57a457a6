"""The ``bagel-train`` loop: one function, :func:`train`, run by every rank.

    from bagel.train.config import load_config
    from bagel.train.trainer import train
    summary = train(load_config("run.yaml", ["schedule.steps=100"]))

Per optimizer step each rank draws ``schedule.grad_accum`` packs. The losses are normalised per token
over the whole step, across micro-batches and ranks, as upstream BAGEL does: the CE and MSE token
counts of all packs of the step are summed over the ranks (one all-reduce), and every micro-batch
contributes ``world * sum(per-token loss) / global count`` (FSDP2's reduce-scatter averages over the
ranks, which the factor ``world`` undoes), so the gradient is that of

    ce_weight * sum(CE over every CE token of the step) / N_ce  +  mse_weight * sum(MSE per token) / N_mse

with the MSE of a token the mean over its ``p*p*C`` latent elements. The logged ``ce`` and ``mse`` are
those global means. Then gradient clipping (the global norm is logged), AdamW, the learning-rate
schedule (linear warm-up, then cosine or constant) and the sharded EMA.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from bagel.train.config import TrainConfig, config_to_dict

__all__ = ["train", "lr_lambda", "step_losses", "use_fused_ce"]


def lr_lambda(cfg: TrainConfig):
    """Multiplier of ``optim.lr`` at scheduler step ``s`` (0-based: ``s`` optimizer steps done)."""
    steps, warmup = cfg.schedule.steps, cfg.schedule.warmup_steps
    kind, floor = cfg.schedule.kind, cfg.schedule.min_lr_ratio

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def step_losses(out: dict, n_ce: float, n_mse: float, world: int, ce_weight: float, mse_weight: float):
    """One micro-batch's share of the step's loss (see the module docstring): ``(loss, ce_sum,
    mse_sum)`` with the unnormalised local sums (detached) for the logs. ``n_ce`` / ``n_mse``: the
    step's global token counts."""
    ce, mse = out.get("ce"), out.get("mse")
    loss = None
    ce_sum = mse_sum = 0.0
    if ce is not None:
        s = ce.float().sum()
        ce_sum = s.detach()
        loss = ce_weight * s * (world / max(n_ce, 1.0))
    if mse is not None:
        s = mse.float().mean(dim=-1).sum()
        mse_sum = s.detach()
        term = mse_weight * s * (world / max(n_mse, 1.0))
        loss = term if loss is None else loss + term
    if loss is None:
        raise ValueError("a pack produced neither a CE nor an MSE loss (no CE tokens and no noised image)")
    return loss, ce_sum, mse_sum


def _count_tokens(batch: dict) -> tuple[int, int]:
    ce = batch.get("ce_loss_indexes")
    mse = batch.get("mse_loss_indexes")
    return (0 if ce is None else int(ce.numel())), (0 if mse is None else int(mse.numel()))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _total_norm(params, max_norm: float) -> float:
    from torch.distributed.tensor import DTensor

    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def use_fused_ce(model, chunk_size: int | None = None) -> bool:
    """Route ``model``'s CE through the chunked linear cross-entropy
    (:func:`bagel_kernels.linear_cross_entropy.lm_head_cross_entropy`: the LM head never materialises
    the logits of all CE tokens at once; a LoRA'd or hooked head is called instead). Returns False when
    the model has no ``ce_loss_fn`` hook (it then computes lm_head + F.cross_entropy itself)."""
    if not hasattr(model, "ce_loss_fn"):
        return False
    from bagel_kernels.linear_cross_entropy import lm_head_cross_entropy

    def ce_loss_fn(head, hidden, labels):
        return lm_head_cross_entropy(head, hidden, labels, reduction="none", chunk_size=chunk_size)

    model.ce_loss_fn = ce_loss_fn
    return True


def _use_fused_ce(model, cfg: TrainConfig, log) -> None:
    if cfg.loss.ce == "fused" and not use_fused_ce(model, cfg.loss.ce_chunk_size):
        log("bagel-train: note: this model has no ce_loss_fn hook yet; the CE uses lm_head + F.cross_entropy")


def _memory_record(device: torch.device) -> dict:
    from bagel.train.metrics import host_peak_rss_gb

    rec = {"host_peak_rss_gb": round(host_peak_rss_gb(), 3)}
    if device.type == "cuda":
        rec["gpu_peak_alloc_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        rec["gpu_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    return rec


def _setup_distributed(cfg: TrainConfig):
    from bagel.train.distributed import build_mesh, init_distributed, init_single_process_group

    backend = None if cfg.distributed.backend == "auto" else cfg.distributed.backend
    rank, world, device = init_distributed(
        backend=backend, timeout_s=cfg.distributed.timeout_s, device=cfg.distributed.device
    )
    if not dist.is_initialized():
        init_single_process_group(device, timeout_s=cfg.distributed.timeout_s)
    return rank, world, device, build_mesh(device, cfg.distributed.hybrid_shard_size)


def _resume_path(cfg: TrainConfig, ckpt_dir: str) -> str | None:
    from bagel.train.checkpoint import latest_checkpoint

    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    if not os.path.isfile(os.path.join(resume, "meta.json")):
        raise ValueError(f"checkpoint.resume={resume!r} is not a complete checkpoint folder (no meta.json)")
    return resume


def train(cfg: TrainConfig, *, stop_after: int | None = None, keep_model: bool = False) -> dict:
    """Run (or continue) the training of ``cfg`` on this rank; returns a summary on every rank
    (``losses``: the step records of this invocation; ``checkpoint``; ``export``; with ``keep_model``
    also ``model`` and ``ema``). ``stop_after``: leave after that many steps of this invocation (as a
    killed run would, without the end-of-run saves)."""
    import yaml

    from bagel.train.build import build_model
    from bagel.train.checkpoint import load_checkpoint, save_checkpoint
    from bagel.train.data_source import make_source
    from bagel.train.ema import ShardedEMA
    from bagel.train.metrics import MetricsLogger, lm_flops, peak_tflops, plot_losses, read_records
    from bagel.train.tensor_files import atomic_write_text

    cfg.validate()
    rank, world, device, mesh = _setup_distributed(cfg)
    out = cfg.output_dir
    ckpt_dir = os.path.join(out, "checkpoints")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(
            os.path.join(out, "config.yaml"), yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        )
    dist.barrier()
    say = print if rank == 0 else (lambda *a, **k: None)
    resume = _resume_path(cfg, ckpt_dir)
    t0 = time.perf_counter()
    # resuming: the trainable parameters come from the checkpoint, only the frozen ones from model.path
    built = build_model(cfg, device, mesh, frozen_only=resume is not None)
    model = built.model
    _use_fused_ce(model, cfg, say)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=cfg.optim.fused or None,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ema = None
    if cfg.ema.enabled:
        ema_dtype = (
            None
            if cfg.ema.dtype == "param"
            else {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.ema.dtype]
        )
        ema = ShardedEMA(model, cfg.ema.decay, dtype=ema_dtype)
    data = make_source(cfg, model.config, rank=rank, world=world, device=device)
    start = 0
    if resume is not None:
        saved = load_checkpoint(resume, model=model, optimizer=opt, ema=ema)
        start = int(saved["step"])
        if "scheduler" in saved:
            sched.load_state_dict(saved["scheduler"])
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg), last_epoch=start - 1)
        if "data" in saved:
            data.load_state_dict(saved["data"])
        else:
            _seed_everything(cfg.seed + 7919 * rank + start)
        say(f"bagel-train: resumed from {resume} (step {start})")
    else:
        _seed_everything(cfg.seed + 7919 * rank)
    setup_s = time.perf_counter() - t0
    be = model.backend
    say(
        f"bagel-train: {built.n_params / 1e6:.2f} M parameters ({n_train / 1e6:.3f} M trainable, "
        f"{cfg.finetune.mode}), stage {cfg.model.stage}, {world} rank(s) on {device}, "
        f"attention={be.attention} mot={be.mot}, setup {setup_s:.1f} s"
    )
    log = MetricsLogger(
        out,
        enabled=rank == 0,
        total_steps=cfg.schedule.steps,
        start_step=start,
        progress=cfg.logging.progress,
        tensorboard=cfg.logging.tensorboard,
    )
    llm_config = model.config.text_config
    peak = peak_tflops(device, cfg.logging.peak_tflops)
    records, last_ckpt, export_dir = [], None, None
    done = 0
    try:
        for step in range(start + 1, cfg.schedule.steps + 1):
            if stop_after is not None and done >= stop_after:
                break
            t_step = time.perf_counter()
            packs = [data.next_pack() for _ in range(cfg.schedule.grad_accum)]
            local = torch.zeros(4, dtype=torch.float64)
            for b in packs:
                n_ce, n_mse = _count_tokens(b)
                local += torch.tensor(
                    [
                        n_ce,
                        n_mse,
                        int(b["sequence_length"]),
                        lm_flops(llm_config, b["sequence_length"], b["sample_lens"]),
                    ],
                    dtype=torch.float64,
                )
            counts = local.to(device)
            dist.all_reduce(counts)
            n_ce, n_mse, n_tok, flops = (float(x) for x in counts.cpu())
            sums = torch.zeros(2, dtype=torch.float64, device=device)
            for b in packs:
                out_ = model(**b)
                loss, ce_sum, mse_sum = step_losses(
                    out_, n_ce, n_mse, world, cfg.loss.ce_weight, cfg.loss.mse_weight
                )
                loss.backward()
                sums += torch.stack(
                    [
                        torch.as_tensor(ce_sum, dtype=torch.float64, device=device),
                        torch.as_tensor(mse_sum, dtype=torch.float64, device=device),
                    ]
                )
            grad_norm = _total_norm(params, cfg.optim.grad_clip)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            dist.all_reduce(sums)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t_step
            dt_max = torch.tensor([dt], dtype=torch.float64, device=device)
            dist.all_reduce(dt_max, op=dist.ReduceOp.MAX)
            dt = float(dt_max)
            rec = {
                "step": step,
                "ce": float(sums[0]) / n_ce if n_ce else None,
                "mse": float(sums[1]) / n_mse if n_mse else None,
                "loss": (cfg.loss.ce_weight * float(sums[0]) / max(n_ce, 1))
                + (cfg.loss.mse_weight * float(sums[1]) / max(n_mse, 1)),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": int(n_tok),
                "ce_tokens": int(n_ce),
                "mse_tokens": int(n_mse),
                "step_s": dt,
                "tokens_per_s": n_tok / dt,
                "tflops_per_device": flops / dt / world / 1e12,
                "mfu": (flops / dt / world / 1e12 / peak) if peak else None,
                **_memory_record(device),
                "skipped": data.skip_counts(),
            }
            records.append(rec)
            done += 1
            if not all(math.isfinite(v) for v in (rec["loss"], grad_norm)):
                raise FloatingPointError(f"non-finite loss or gradient at step {step}: {rec}")
            if step % cfg.logging.every == 0 or step == cfg.schedule.steps:
                log.log(rec)
            log.progress(step, rec)
            if cfg.logging.sample_every and (
                step % cfg.logging.sample_every == 0 or step == cfg.schedule.steps
            ):
                files = _draw_samples(model, data, cfg, step)
                if files:
                    log.write(f"bagel-train: step {step}: samples {', '.join(files)}")
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.schedule.steps:
                last_ckpt = _save(save_checkpoint, ckpt_dir, step, model, opt, ema, sched, data, cfg)
        finished = (start + done) >= cfg.schedule.steps
        if finished and cfg.checkpoint.at_end and (start + done) > start:
            last_ckpt = _save(
                save_checkpoint, ckpt_dir, cfg.schedule.steps, model, opt, ema, sched, data, cfg
            )
        if finished and cfg.export.at_end:
            export_dir = _export(model, built, ema, cfg)
            log.write(f"bagel-train: exported to {export_dir}")
    finally:
        log.close()
    if rank == 0 and cfg.logging.plot:
        plot_losses(os.path.join(out, "losses.png"), read_records(os.path.join(out, "metrics.jsonl")))
    summary = {
        "losses": records,
        "start_step": start,
        "checkpoint": last_ckpt,
        "export": export_dir,
        "rank": rank,
        "world": world,
    }
    if keep_model:
        summary.update(model=model, ema=ema)
    return summary


def _draw_samples(model, data, cfg: TrainConfig, step: int) -> list[str]:
    """The periodic samples (every rank calls; rank 0 writes). The RNG states are restored after, so a
    run with samples trains exactly as one without."""
    from bagel.train.checkpoint import capture_rng, restore_rng

    vae = getattr(data, "vae", None)
    if vae is None:
        return []
    from bagel.generate import Generator

    side = cfg.logging.sample_size or model.config.max_latent_size * vae.config.downsample_factor
    state = capture_rng()
    try:
        gen = Generator(model, vae, data.tokenizer)
        return gen.save_samples(
            list(cfg.logging.sample_prompts),
            cfg.output_dir,
            step,
            num_timesteps=cfg.logging.sample_timesteps,
            height=side,
            width=side,
        )
    finally:
        restore_rng(state)


def _save(save_checkpoint, ckpt_dir, step, model, opt, ema, sched, data, cfg) -> str:
    return save_checkpoint(
        ckpt_dir,
        step,
        model=model,
        optimizer=opt,
        ema=ema,
        rank_state={"scheduler": sched.state_dict(), "data": data.state_dict()},
        keep=cfg.checkpoint.keep,
        meta={"mode": cfg.finetune.mode},
    )


def _export(model, built, ema, cfg: TrainConfig) -> str:
    from bagel.train.export import export_lora_adapter, export_model

    dtype = {"param": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.export.dtype]
    base = os.path.join(cfg.output_dir, "export")
    if built.lora_config is None:
        return export_model(model, base, ema=ema, use_ema=cfg.export.use_ema, dtype=dtype)
    export_lora_adapter(
        model, built.lora_config, os.path.join(base, "adapter"), ema=ema, use_ema=cfg.export.use_ema
    )
    if cfg.export.merge_lora:
        export_model(
            model,
            os.path.join(base, "merged"),
            ema=ema,
            use_ema=cfg.export.use_ema,
            merge_lora=True,
            dtype=dtype,
        )
    return base


def main_entry(cfg: TrainConfig) -> int:
    """Run ``cfg`` in this process (a torchrun rank or a single process) and leave the process group."""
    from bagel.train.distributed import cleanup

    try:
        train(cfg)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the bagel-train command")

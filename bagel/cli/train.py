"""``bagel-train``: fine-tune BAGEL on one GPU or many, and resume where it stopped.

    bagel-train CONFIG.yaml [section.field=value ...]          one process (a GPU, or the CPU)
    torchrun --nproc-per-node 8 -m bagel.cli.train CONFIG.yaml  several GPUs or machines
    bagel-train --example [section.field=value ...]            the built-in example (tiny model, CPU)
    bagel-train --help-config                                  every config key, documented
    bagel-train CONFIG.yaml --print-config                     the merged configuration, as YAML
    bagel-train --estimate-memory                              peak GPU memory of BAGEL-7B-MoT (fake tensors)

The configuration is :class:`bagel.train.config.TrainConfig` (YAML sections model, vae, data, loss,
optim, schedule, precision, ema, checkpoint, export, logging, finetune, distributed). A run writes into
``output_dir``: ``metrics.jsonl``, ``losses.png``, ``checkpoints/step_*`` (resumable; ``checkpoint.resume``
is ``auto`` by default, so running the same command again continues), ``export/`` (``config.json`` +
``ema.safetensors``, or the LoRA adapter and the merged model).

A bad key or value, or a malformed torchrun environment, is a one-line error with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "example_overrides"]

# The built-in example: the tiny random BAGEL (stage 2), the data pipeline over the built-in example
# images, the FLUX VAE architecture with random weights; a few minutes on 2 CPU cores.
EXAMPLE = [
    "output_dir=bagel-train-example",
    "model.attention=sdpa",
    "model.mot=torch",
    "model.patch_embed=torch",
    "data.source=example",
    "data.loader.max_num_tokens=512",
    "data.loader.expected_num_tokens=448",
    "data.loader.max_num_tokens_per_sample=512",
    "data.loader.num_workers=0",
    "vae.dtype=float32",
    "vae.tiny.ch_mult=[1,1,1,1]",  # the FLUX architecture at 32 channels: 8x down, 16 latent channels
    "vae.tiny.num_res_blocks=1",
    "vae.micro_batch_size=16",
    "schedule.steps=200",
    "schedule.warmup_steps=10",
    "schedule.kind=cosine",
    "optim.lr=2e-3",
    "optim.eps=1e-8",
    "ema.decay=0.99",
    "checkpoint.every=100",
    "checkpoint.keep=2",
]


def example_overrides() -> list[str]:
    """The overrides ``--example`` starts from (later overrides on the command line win)."""
    return list(EXAMPLE)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bagel-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("config", nargs="?", help="YAML config file (optional with --example)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, applied in order")
    p.add_argument("--example", action="store_true", help="train the built-in example")
    p.add_argument("--help-config", action="store_true", help="print every config key with its documentation")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    p.add_argument(
        "--estimate-memory",
        action="store_true",
        help="print the peak GPU memory table of BAGEL-7B-MoT (LoRA 1x80 GB at 16k, full 8x80 GB at 32k), "
        "computed on the CPU with fake tensors (a few minutes)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine (spawned; under torchrun it is implied)",
    )
    return p


def _split(args) -> tuple[str | None, list[str]]:
    """The config path and the overrides (a first positional with '=' is an override, not a file)."""
    items = ([args.config] if args.config else []) + list(args.overrides)
    path = None
    if items and "=" not in items[0]:
        path, items = items[0], items[1:]
    bad = [i for i in items if "=" not in i]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a section.field=value override")
    return path, items


def _worker(rank: int, world: int, port: int, cfg) -> None:
    from bagel.train.distributed import set_local_env
    from bagel.train.trainer import main_entry

    set_local_env(rank, world, port)
    main_entry(cfg)


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    from bagel.train.config import ConfigError, config_to_dict, describe_config, load_config

    if args.help_config:
        sys.stdout.write(describe_config())
        return 0
    if args.estimate_memory:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        from bagel.train.memory import main as memory_main

        return memory_main()
    try:
        path, overrides = _split(args)
        if path is None and not args.example and not overrides:
            p.error("give a CONFIG.yaml (and/or section.field=value overrides), or --example")
        if args.example:
            overrides = example_overrides() + overrides
        cfg = load_config(path, overrides)
        from bagel.train.distributed import read_launch_env

        world_env, _, _ = read_launch_env()
    except (ConfigError, ValueError) as exc:
        p.exit(2, f"bagel-train: error: {exc}\n")
    if args.print_config:
        import yaml

        sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    if args.nproc < 1:
        p.error(f"--nproc {args.nproc} must be >= 1")
    from bagel.train.trainer import main_entry

    if world_env > 1 or args.nproc == 1:
        try:
            return main_entry(cfg)
        except KeyboardInterrupt:
            sys.stderr.write(
                "\nbagel-train: interrupted; rerun the same command to resume from the last checkpoint\n"
            )
            return 130
    import torch.multiprocessing as mp

    from bagel.train.distributed import free_port

    mp.spawn(_worker, args=(args.nproc, free_port(), cfg), nprocs=args.nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

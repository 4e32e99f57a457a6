"""What a run reports: a JSONL record per logged step (always), TensorBoard scalars (when installed),
a progress bar (tqdm when installed) and the loss plot ``losses.png``; and the FLOP count behind MFU.

MFU uses BAGEL's own formula (upstream ``train/pretrain_unified_navit.py``, the same as
``benchmarks/bench_model.py``): per pack ``6 * N * sequence_length + 12 * D * Hq * L * sum(len^2)``
with ``N = L * (3 H I + H (2 Hq D + 2 Hkv D)) + 2 V H`` from the language model's config.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

from bagel.train.tensor_files import atomic_write_text

__all__ = ["lm_flops", "peak_tflops", "host_peak_rss_gb", "MetricsLogger", "plot_losses", "read_records"]


def lm_flops(llm_config, sequence_length: int, sample_lens) -> float:
    """Training FLOPs (forward + backward) of one pack by BAGEL's formula (see the module docstring)."""
    H = llm_config.hidden_size
    V = llm_config.vocab_size
    L = llm_config.num_hidden_layers
    Hq = llm_config.num_attention_heads
    Hkv = llm_config.num_key_value_heads
    inter = llm_config.intermediate_size
    D = getattr(llm_config, "head_dim", None) or H // Hq
    per_token = L * (3 * H * inter + H * (2 * Hq * D + 2 * Hkv * D)) + 2 * V * H
    square = sum(int(n) ** 2 for n in sample_lens)
    return 6.0 * per_token * float(sequence_length) + 12.0 * D * Hq * L * float(square)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Dense bf16 peak per device for MFU: ``override``, else upstream's values (H100/H200/H800 989,
    A100/A800 312), else None (no MFU)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    if any(t in name for t in ("H100", "H200", "H800")):
        return 989.0
    if any(t in name for t in ("A100", "A800")):
        return 312.0
    return None


def host_peak_rss_gb() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``), GiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def read_records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: dropped
                    continue
    return out


def plot_losses(path: str, records: list[dict]) -> bool:
    """``losses.png``: CE and MSE per step with a running mean, written through a temporary file.
    Returns False (with a warning on stderr) when matplotlib is missing or plotting fails."""
    rows = [r for r in records if "step" in r]
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        sys.stderr.write(
            "bagel-train: matplotlib is not installed: no losses.png (pip install 'bagel-kernels[train]')\n"
        )
        return False
    tmp = f"{path}.tmp.png"
    try:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, title in ((axes[0], "ce", "understanding CE"), (axes[1], "mse", "flow-matching MSE")):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                steps = np.array([p[0] for p in pts])
                ys = np.array([p[1] for p in pts], dtype=np.float64)
                ax.plot(steps, ys, alpha=0.3, label="per step")
                k = max(1, len(ys) // 20)
                if len(ys) >= k:
                    ax.plot(
                        steps[k - 1 :], np.convolve(ys, np.ones(k) / k, mode="valid"), label=f"mean of {k}"
                    )
                ax.legend()
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        return True
    except Exception as exc:  # the run's result does not depend on its picture
        sys.stderr.write(f"bagel-train: warning: losses.png not written ({type(exc).__name__}: {exc})\n")
        if os.path.exists(tmp):
            os.remove(tmp)
        return False


class MetricsLogger:
    """Rank 0's reporting: ``metrics.jsonl`` (one JSON object per logged step, appended and flushed),
    TensorBoard scalars, a progress bar. Other ranks get a logger that does nothing.

    On resume from step ``start_step`` the JSONL file keeps only the records up to that step (records
    of steps after the checkpoint, from the interrupted run, are dropped)."""

    def __init__(
        self,
        output_dir: str,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        progress: bool,
        tensorboard: str,
    ) -> None:
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.bar = None
        self.tb = None
        self.file = None
        if not enabled:
            return
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    log_dir=os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1
                )
            except ImportError:
                if tensorboard == "on":
                    raise ImportError(
                        "logging.tensorboard=on needs tensorboard: pip install 'bagel-kernels[tensorboard]'"
                    ) from None
        if progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="bagel-train", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def progress(self, step: int, record: dict | None) -> None:
        if not self.enabled or self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        if record:
            post = {k: f"{record[k]:.4g}" for k in ("ce", "mse", "lr") if record.get(k) is not None}
            if record.get("tokens_per_s"):
                post["tok/s"] = f"{record['tokens_per_s']:,.0f}"
            self.bar.set_postfix(post, refresh=False)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()

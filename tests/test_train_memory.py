"""The memory estimate (bagel.train.memory) on a small config, where every category can be checked
against a count by hand: the tracked sharded parameters are this rank's share of the weights, the
optimizer states two per trainable element on the shard (AdamW's exp_avg and exp_avg_sq, not the full
tensors), the LoRA case keeps the frozen base in bf16, the adapters in fp32, and has states only for them, and the
peak holds at least the parameters, states and activations. Runs in a subprocess (a fake process group)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from bagel import BagelConfig
    from bagel.train.memory import MemoryCase, estimate_step_memory, realistic_pack

    def run(case):
        config = BagelConfig.bagel_7b_mot(llm_layers=1, vit_layers=1)
        r = estimate_step_memory(case, config=config)
        (cats,) = r["peak"].values()
        return {
            "cats": {getattr(k, "value", k): v for k, v in cats.items()},
            "params": r["params"], "trainable": r["trainable"], "tokens": r["sequence_length"],
        }

    print(json.dumps({
        "full": run(MemoryCase("full", "full", 4, 4096, "float32")),
        "lora": run(MemoryCase("lora", "lora", 1, 4096, "bfloat16", lora_r=8)),
    }))
    """
)


def test_memory_estimate_counts_shards_states_and_activations():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    full, lora = got["full"], got["lora"]
    # full fine-tuning on 4 ranks: fp32 weights sharded 4 ways (FSDP2 pads each shard: within 1%)
    share = full["params"] * 4 / 4
    assert abs(full["cats"]["Sharded Param"] - share) < 0.01 * share
    assert abs(full["cats"]["OptState"] - 2 * share) < 0.01 * 2 * share  # exp_avg + exp_avg_sq, sharded
    assert full["cats"]["Activation"] > 0 and full["tokens"] > 3000
    # LoRA on 1 rank: the whole base in bf16, fp32 adapters, states (fp32) for the adapters only
    assert lora["trainable"] < 0.05 * lora["params"]
    weights = 2 * (lora["params"] - lora["trainable"]) + 4 * lora["trainable"]
    assert abs(lora["cats"]["Sharded Param"] - weights) < 0.002 * weights
    assert abs(lora["cats"]["OptState"] - 2 * 4 * lora["trainable"]) < 0.05 * 8 * lora["trainable"]
    for case in (full, lora):
        parts = sum(v for k, v in case["cats"].items() if k != "Total")
        assert case["cats"]["Total"] == parts

"""``bagel-train``'s configuration (bagel.train.config) and command line (bagel.cli.train), no training:
unknown and misspelt keys are errors naming the key and the close match, values are typed and range
checked, every key is documented, YAML and overrides compose; the learning-rate schedule and the
LoRA / freeze presets against hand-written expectations."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml

from bagel.train.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_keys,
    config_to_dict,
    describe_config,
    load_config,
)


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1e-4", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("optm.lr=1e-4", "unknown config key 'optm.lr'; did you mean 'optim.lr'?"),
        ("lr=1e-4", "unknown config key 'lr'; did you mean 'optim.lr'?"),
        ("schedule.warmup=5", "did you mean 'schedule.warmup_steps'?"),
        ("data.loader.max_num_token=5", "did you mean 'data.loader.max_num_tokens'?"),
        ("model.stage=3", "model.stage=3: must be 1 or 2"),
        ("loss.ce=fusd", "loss.ce='fusd': must be one of 'fused', 'plain'; did you mean 'fused'?"),
        ("optim.lr=abc", "optim.lr='abc': expected a number"),
        ("schedule.steps=1.5", "schedule.steps=1.5: expected an integer"),
        ("ema.enabled=maybe", "ema.enabled='maybe': expected true or false"),
        ("ema.decay=1.5", "ema.decay=1.5: must be in [0, 1]"),
        ("optim", "must look like section.field=value"),
        ("optim=3", "optim is a section"),
        ("data.loader.max_num_tokens=100", "data.loader.max_num_tokens_per_sample=16384 exceeds"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value)


def test_unknown_yaml_key_names_its_full_path(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-5\nfinetune:\n  lora_rank: 8\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'finetune.lora_rank'; did you mean 'finetune.lora_r'\?"
    ):
        load_config(str(path))
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(str(tmp_path / "missing.yaml"))


def test_yaml_then_overrides_compose_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "output_dir: out\noptim: {lr: 2.0e-5, betas: [0.9, 0.99]}\nmodel: {tiny: {llm_hidden: 32}}\n"
        "logging: {tensorboard: off}\ndata: {loader: {max_num_tokens: 4096, expected_num_tokens: 4000,"
        " max_num_tokens_per_sample: 2048}}\n"
    )
    cfg = load_config(str(path), ["optim.lr=3e-4", "model.tiny.llm_layers=1", "finetune.freeze=[vit, und]"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == [0.9, 0.99]  # 3e-4: YAML 1.1 reads it as text
    assert cfg.model.tiny == {"llm_hidden": 32, "llm_layers": 1}
    assert cfg.finetune.freeze == ["vit", "und"]
    assert cfg.logging.tensorboard == "off"  # YAML's off (a boolean) for the on/off choice
    assert cfg.data.loader.max_num_tokens == 4096
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_every_key_is_documented():
    text = describe_config()
    yaml.safe_load(text)  # the help is a valid YAML file of the defaults
    lines = text.splitlines()
    keys = config_keys()
    assert len(keys) > 60 and "data.loader.seed" in keys and "optim.lr" in keys
    for key in keys:
        name = key.rsplit(".", 1)[-1]
        hits = [i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")]
        assert hits, key

        def comment_above(i):
            block = []
            while i > 0 and lines[i - 1].strip().startswith("#"):
                i -= 1
                block.append(lines[i].strip("# "))
            return " ".join(block)

        assert any(len(comment_above(i)) > 20 for i in hits), key


def test_lr_schedule():
    from bagel.train.trainer import lr_lambda

    cfg = load_config(None, ["schedule.steps=10", "schedule.warmup_steps=2", "schedule.kind=cosine",
                             "schedule.min_lr_ratio=0.1"])  # fmt: skip
    f = lr_lambda(cfg)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10) == pytest.approx(0.1)
    const = lr_lambda(apply_overrides(cfg, ["schedule.kind=constant"]))
    assert [const(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_lora_and_freeze_presets():
    import re

    from bagel import BagelConfig, BagelForUnifiedMultimodal
    from bagel.train.build import apply_freeze, lora_target_regex

    rx = re.compile(lora_target_regex(["llm_attn", "und_only"]))
    assert rx.fullmatch("model.language_model.model.layers.3.self_attn.q_proj")
    assert not rx.fullmatch("model.language_model.model.layers.3.self_attn.q_proj_moe_gen")
    rx = re.compile(lora_target_regex(["llm_mlp", "gen_only"]))
    assert rx.fullmatch("model.language_model.model.layers.0.mlp_moe_gen.down_proj")
    assert not rx.fullmatch("model.language_model.model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match="exclude each other"):
        lora_target_regex(["llm_attn", "und_only", "gen_only"])
    model = BagelForUnifiedMultimodal(BagelConfig.tiny())
    frozen = set(apply_freeze(model, ["gen", "vit"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and all("_moe_gen" in n or "vit_model" in n for n in frozen)
    assert "model.language_model.model.norm_moe_gen.weight" in frozen
    assert "model.language_model.model.layers.0.self_attn.q_proj.weight" in trainable
    assert "model.vae2llm.weight" in trainable and "model.connector.fc1.weight" in trainable
    apply_freeze(model, ["connectors", r"lm_head"])
    assert not model.model.connector.fc1.weight.requires_grad and not model.model.llm2vae.weight.requires_grad
    assert not model.model.language_model.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_freeze(model, ["no_such_module"])


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bagel.cli.train", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_usage_errors_and_help_config(tmp_path):
    import os

    res = _cli("--help-config")
    assert res.returncode == 0 and "lora_targets:" in res.stdout and "# Peak learning rate" in res.stdout
    res = _cli("--example", "optim.lrr=1")
    assert res.returncode == 2 and "did you mean 'optim.lr'" in res.stderr and "Traceback" not in res.stderr
    res = _cli("--example", f"output_dir={tmp_path}", "--print-config")
    assert res.returncode == 0 and yaml.safe_load(res.stdout)["data"]["source"] == "example"
    res = _cli()
    assert res.returncode == 2 and "CONFIG.yaml" in res.stderr
    for bad, message in [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
    ]:
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        res = _cli("--example", env={**env, **bad})
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.slow
def test_example_and_stage1_lora_runs_through_the_cli(tmp_path):
    """``bagel-train --example`` (the README's main job, cut to 6 steps): the real data pipeline over the
    built-in images, the random FLUX VAE, one process; then a stage-1 LoRA run on synthetic packs with
    the ViT frozen and adapters on the ViT too. Both write their logs, plot, checkpoint and export."""
    import json
    import os

    out = tmp_path / "example"
    res = _cli(
        "--example", f"output_dir={out}", "schedule.steps=6", "checkpoint.every=3", "logging.progress=false"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert all(r["ce_tokens"] > 0 and r["mse_tokens"] > 0 and isinstance(r["skipped"], dict) for r in recs)
    assert (out / "losses.png").stat().st_size > 1000
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000003", "step_00000006"]
    assert sorted(os.listdir(out / "export")) == ["config.json", "ema.safetensors"]
    assert (out / "example-data" / "example.yaml").is_file()
    out = tmp_path / "stage1"
    res = _cli(
        f"output_dir={out}", "model.stage=1", "data.kinds=[und,text]", "finetune.mode=lora",
        "finetune.lora_targets=[llm_attn,vit]", "schedule.steps=2", "checkpoint.every=0",
        "data.loader.max_num_tokens=160", "data.loader.expected_num_tokens=160",
        "data.loader.max_num_tokens_per_sample=160", "model.attention=sdpa", "model.mot=torch",
        "model.patch_embed=torch", "logging.progress=false",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mse"] is None and r["mse_tokens"] == 0 for r in recs)
    assert sorted(os.listdir(out / "export")) == ["adapter", "merged"]
    adapter = json.loads((out / "export" / "adapter" / "adapter_config.json").read_text())
    assert "vit_model" in adapter["target_modules"] and adapter["r"] == 16

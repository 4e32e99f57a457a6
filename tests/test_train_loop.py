"""``bagel-train``'s loop on the CPU: 2 ranks (gloo), FSDP2, the tiny stage-2 model, synthetic packs.

One spawned session (two processes) runs every scenario in turn and leaves its results in files; the
tests below check them against independent references computed here, in one plain process:

- global per-token normalisation: the first step's loss and gradient norm (2 ranks x 2 micro-batches)
  equal those of one process summing the per-token losses of all four packs and dividing by the global
  CE and MSE token counts;
- resume: 4 steps uninterrupted versus 2 steps, stop, ``resume: auto``, 2 more: the losses and gradient
  norms of steps 3-4 are bit-identical (the CPU kernels are deterministic);
- a run killed during a save (an error raised after the DCP files of step 3 were written, before the
  checkpoint was complete) resumes from step 2, and again its steps 3-4 equal the uninterrupted run's;
- export: ``config.json`` + ``ema.safetensors`` load with ``from_pretrained(strict=True)`` and give the
  sharded model's per-token CE and MSE on a fixed pack;
- the sharded EMA against its formula, on 2-rank FSDP2 shards;
- LoRA: the adapter saved in PEFT's format loads with ``PeftModel.from_pretrained`` onto the same base
  and gives the trained model's outputs; ``merge_and_unload`` and the merged export give them too.

Every multi-process run has a bounded wall time.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from bagel.train.config import load_config

pytestmark = pytest.mark.slow  # one 2-process session, about 80 s on 2 busy cores

WORLD = 2
BASE = [
    "model.attention=sdpa",
    "model.mot=torch",
    "model.patch_embed=torch",
    "data.loader.max_num_tokens=192",
    "data.loader.expected_num_tokens=192",
    "data.loader.max_num_tokens_per_sample=192",
    "schedule.grad_accum=2",
    "schedule.warmup_steps=1",
    "schedule.kind=cosine",
    "optim.lr=1e-2",
    "optim.eps=1e-8",
    "logging.progress=false",
    "logging.plot=false",
    "logging.tensorboard=off",
    "ema.decay=0.5",
    "export.dtype=param",  # lossless: the exports are compared with the trained model's outputs
]
STEPS = 4


def _cfg(out: str, *extra: str):
    return load_config(None, [*BASE, f"output_dir={out}", f"schedule.steps={STEPS}", *extra])


def _fixed_pack(config):
    from bagel.data.packing import pack_samples, synthetic_samples

    return pack_samples(synthetic_samples(["und", "t2i", "edit"], config, seed=123), config, rng=5)


def _outputs(model, config) -> dict:
    """Per-token CE and MSE of the fixed pack, noise seeded (eval mode: no dropout)."""
    model.eval()
    torch.manual_seed(99)
    with torch.no_grad():
        out = model(**_fixed_pack(config))
    model.train()
    return {k: v.detach().clone() for k, v in out.items()}


def _ema_formula(rank: int, result: dict) -> None:
    """ShardedEMA on a 2-rank FSDP2 Linear against ema_k = d * ema_{k-1} + (1 - d) * p_k, in float64."""
    from torch.distributed.fsdp import fully_shard

    from bagel.train.ema import ShardedEMA

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 7)  # 7 rows over 2 ranks: uneven shards
    fully_shard(lin)
    decay = 0.9
    ema = ShardedEMA(lin, decay)
    full = {n: p.full_tensor().double() for n, p in lin.named_parameters()}
    expect = dict(full)
    for k in range(3):
        with torch.no_grad():
            for n, p in lin.named_parameters():
                g = torch.Generator().manual_seed(10 * k + len(n))
                new = torch.randn(p.shape, generator=g)
                p.to_local().copy_(new.narrow(0, *_rows(p)))
                expect[n] = decay * expect[n] + (1 - decay) * new.double()
        ema.update()
    err = max(float((ema.shadow[n].full_tensor().double() - expect[n]).abs().max()) for n in expect)
    result["ema_err"] = err
    result["ema_local_shapes"] = [tuple(ema.shadow[n].to_local().shape) for n in expect]


def _rows(p):
    from bagel.train.build import local_rows

    a, b = local_rows(p)
    return a, b - a


def _worker(rank: int, port: int, root: str) -> None:
    from bagel.train.distributed import cleanup, init_distributed, set_local_env
    from bagel.train.trainer import train

    set_local_env(rank, WORLD, port)
    init_distributed(timeout_s=120)
    result: dict = {}
    # A: uninterrupted, export of the current weights, outputs of the sharded model on the fixed pack
    a = train(
        _cfg(f"{root}/a", "checkpoint.every=0", "checkpoint.at_end=false", "export.use_ema=false"),
        keep_model=True,
    )
    result["a"] = [(r["step"], r["loss"], r["ce"], r["mse"], r["grad_norm"], r["lr"]) for r in a["losses"]]
    result["a_first"] = {
        k: a["losses"][0][k] for k in ("ce", "mse", "loss", "grad_norm", "ce_tokens", "mse_tokens")
    }
    result["a_outputs"] = _outputs(a["model"], a["model"].config)
    del a
    # B: 2 steps, stop (no end-of-run saves), then resume auto
    train(_cfg(f"{root}/b", "checkpoint.every=2"), stop_after=2)
    b = train(_cfg(f"{root}/b", "checkpoint.every=2"))
    result["b_start"] = b["start_step"]
    result["b"] = [(r["step"], r["loss"], r["ce"], r["mse"], r["grad_norm"], r["lr"]) for r in b["losses"]]
    # C: a save that fails after the DCP files of step 3 are written, then resume auto
    import bagel.train.checkpoint as ck

    real = ck.write_rank_state

    def failing(folder, r, state):
        if state.get("step") == 3:
            raise RuntimeError("simulated kill during the save of step 3")
        real(folder, r, state)

    ck.write_rank_state = failing
    try:
        train(_cfg(f"{root}/c", "checkpoint.every=1", "checkpoint.keep=5"))
        result["c_failed"] = False
    except RuntimeError as exc:
        result["c_failed"] = "simulated kill" in str(exc)
    finally:
        ck.write_rank_state = real
    torch.distributed.barrier()
    result["c_listing"] = sorted(os.listdir(f"{root}/c/checkpoints"))
    c = train(_cfg(f"{root}/c", "checkpoint.every=1", "checkpoint.keep=5"))
    result["c_start"] = c["start_step"]
    result["c"] = [(r["step"], r["loss"], r["ce"], r["mse"], r["grad_norm"], r["lr"]) for r in c["losses"]]
    # D: LoRA, 2 steps; adapter + merged export of the current weights
    d = train(
        load_config(
            None,
            [*BASE, f"output_dir={root}/d", "schedule.steps=2", "finetune.mode=lora", "finetune.lora_r=4",
             "finetune.lora_targets=[llm_attn,llm_mlp]", "export.use_ema=false", "checkpoint.every=0",
             "ema.enabled=false", "optim.lr=5e-2"],
        ),
        keep_model=True,
    )  # fmt: skip
    result["d_outputs"] = _outputs(d["model"], d["model"].config)
    result["d_trainable"] = sorted(n for n, p in d["model"].named_parameters() if p.requires_grad)
    del d
    # E/F: start from A's export (the sliced loader inside the loop), plain and hybrid sharding (2-D mesh:
    # 2 replicas of a 1-rank shard group); same data, so the same losses up to reduction order
    for name, hybrid in (("e", 0), ("f", 1)):
        r = train(
            _cfg(f"{root}/{name}", f"model.path={root}/a/export", f"distributed.hybrid_shard_size={hybrid}",
                 "schedule.steps=2", "checkpoint.every=1", "export.at_end=false", "ema.enabled=false"),
            keep_model=True,
        )  # fmt: skip
        result[name] = [(x["loss"], x["grad_norm"]) for x in r["losses"]]
        result[f"{name}_placements"] = sorted({str(p.placements) for p in r["model"].parameters()})
        del r
    # E again, one step more: resumes from its step-2 checkpoint, the frozen position tables from model.path
    r = train(
        _cfg(f"{root}/e", f"model.path={root}/a/export", "schedule.steps=3", "checkpoint.every=1",
             "export.at_end=false", "ema.enabled=false"),
        keep_model=True,
    )  # fmt: skip
    result["e_resumed_start"] = r["start_step"]
    result["e_frozen"] = {
        n: p.full_tensor().clone() for n, p in r["model"].named_parameters() if not p.requires_grad
    }
    del r
    _ema_formula(rank, result)
    gathered = [None] * WORLD
    torch.distributed.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, f"{root}/results.pt")
    cleanup()


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_loop"))
    from bagel.train.distributed import free_port

    ctx = mp.start_processes(
        _worker, args=(free_port(), root), nprocs=WORLD, start_method="spawn", join=False
    )
    deadline = time.monotonic() + 400
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank training session did not finish within 400 s")
    return root, torch.load(f"{root}/results.pt", weights_only=False)


def _reference_first_step(root: str) -> dict:
    """Step 1 of run A in one process: the 2 x 2 packs the ranks drew, losses summed per token and
    divided by the global counts, one backward; the gradient norm before clipping."""
    from bagel.train.build import BuiltModel  # noqa: F401  (the module must import without a group)
    from bagel.train.data_source import SyntheticSource

    cfg = _cfg(f"{root}/ref")
    from bagel import BagelBackendConfig, BagelForUnifiedMultimodal
    from bagel.train.build import bagel_config

    config = bagel_config(cfg)
    torch.manual_seed(cfg.model.init_seed)
    model = BagelForUnifiedMultimodal(
        config, backend=BagelBackendConfig(attention="sdpa", mot="torch", patch_embed="torch")
    )
    model.initialize_weights()
    packs = {}
    for r in range(WORLD):
        src = SyntheticSource(
            config,
            kinds=list(cfg.data.kinds),
            max_num_tokens=cfg.data.loader.max_num_tokens,
            seed=cfg.data.loader.seed,
            rank=r,
            device="cpu",
        )
        packs[r] = [src.next_pack() for _ in range(cfg.schedule.grad_accum)]
    n_ce = sum(
        int(b["ce_loss_indexes"].numel()) for bs in packs.values() for b in bs if "ce_loss_indexes" in b
    )
    n_mse = sum(
        int(b["mse_loss_indexes"].numel()) for bs in packs.values() for b in bs if "mse_loss_indexes" in b
    )
    ce_sum = mse_sum = 0.0
    for r in range(WORLD):
        torch.manual_seed(cfg.seed + 7919 * r)  # the trainer's per-rank seed: the flow-matching noise
        for b in packs[r]:
            out = model(**b)
            ce = out["ce"].sum() if out["ce"] is not None else 0.0
            mse = out["mse"].mean(-1).sum() if out["mse"] is not None else 0.0
            (ce / n_ce + mse / n_mse).backward()
            ce_sum += float(ce.detach()) if torch.is_tensor(ce) else ce
            mse_sum += float(mse.detach()) if torch.is_tensor(mse) else mse
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return {
        "ce": ce_sum / n_ce,
        "mse": mse_sum / n_mse,
        "grad_norm": float(norm),
        "ce_tokens": n_ce,
        "mse_tokens": n_mse,
    }


def test_global_token_normalisation_matches_one_process(session):
    root, results = session
    got = results[0]["a_first"]
    ref = _reference_first_step(root)
    assert got["ce_tokens"] == ref["ce_tokens"] and got["mse_tokens"] == ref["mse_tokens"]
    for key in ("ce", "mse", "grad_norm"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key


def test_resume_is_bit_identical(session):
    _, results = session
    for r in results:
        a = {s[0]: s for s in r["a"]}
        assert r["b_start"] == 2 and [s[0] for s in r["b"]] == [3, 4]
        for s in r["b"]:
            assert s == a[s[0]], (s, a[s[0]])  # loss, ce, mse, grad norm and lr, bit for bit


def test_killed_save_resumes_from_previous_checkpoint(session):
    _, results = session
    for r in results:
        assert r["c_failed"]
        # the interrupted save left a temporary folder, never a step_00000003
        assert "step_00000003" not in r["c_listing"] and "step_00000002" in r["c_listing"]
        assert any(n.startswith(".tmp-step_00000003") for n in r["c_listing"])
        assert r["c_start"] == 2
        a = {s[0]: s for s in r["a"]}
        for s in r["c"]:
            assert s == a[s[0]], (s, a[s[0]])
    assert sorted(os.listdir(os.path.join(session[0], "c", "checkpoints"))) == [
        "step_00000001",
        "step_00000002",
        "step_00000003",
        "step_00000004",
    ]  # fmt: skip  (the leftover is gone after the next save)


def test_losses_fall_and_logs_are_written(session):
    root, results = session
    a = results[0]["a"]
    assert a[-1][1] < a[0][1]
    recs = [json.loads(x) for x in open(f"{root}/b/metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # the resumed run appends after its checkpoint
    for key in (
        "loss",
        "ce",
        "mse",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tflops_per_device",
        "host_peak_rss_gb",
        "skipped",
    ):
        assert key in recs[-1]


def test_export_loads_strict_and_gives_the_same_outputs(session):
    from bagel import BagelBackendConfig, BagelForUnifiedMultimodal

    root, results = session
    model = BagelForUnifiedMultimodal.from_pretrained(
        f"{root}/a/export", stage=2, strict=True,
        backend=BagelBackendConfig(attention="sdpa", mot="torch", patch_embed="torch"),
    )  # fmt: skip
    assert not model.load_report.missing and not model.load_report.unexpected
    got = _outputs(model, model.config)
    for key, want in results[0]["a_outputs"].items():
        torch.testing.assert_close(got[key], want, atol=1e-6, rtol=1e-5, msg=key)


def test_plain_and_hybrid_sharding_load_the_export_and_agree(session):
    _, results = session
    for r in results:
        assert r["e_placements"] == ["(Shard(dim=0),)"]
        assert r["f_placements"] == ["(Replicate(), Shard(dim=0))"]
        assert len(r["e"]) == len(r["f"]) == 2
        for (le, ge), (lf, gf) in zip(r["e"], r["f"], strict=True):
            assert lf == pytest.approx(le, rel=1e-6) and gf == pytest.approx(ge, rel=1e-5)
    # the first step starts from A's trained weights: its loss is A's last loss range, not the init's
    assert results[0]["e"][0][0] < results[0]["a"][0][1]


def test_resume_reads_frozen_parameters_from_the_source(session):
    from safetensors.torch import load_file

    root, results = session
    exported = load_file(f"{root}/a/export/ema.safetensors")
    for r in results:
        assert r["e_resumed_start"] == 2
        assert r["e_frozen"]  # the sin-cos position tables are frozen parameters
        for name, t in r["e_frozen"].items():
            assert torch.equal(t, exported[name.removeprefix("model.")]), name


def test_ema_matches_its_formula_on_shards(session):
    _, results = session
    for r in results:
        assert r["ema_err"] < 1e-6
    assert (
        results[0]["ema_local_shapes"][0][0] + results[1]["ema_local_shapes"][0][0] == 7
    )  # each rank its rows


def test_lora_adapter_saves_loads_and_merges(session):
    from peft import PeftModel

    from bagel import BagelBackendConfig, BagelForUnifiedMultimodal
    from bagel.train.build import bagel_config

    root, results = session
    want = results[0]["d_outputs"]
    trainable = results[0]["d_trainable"]
    assert trainable and all("lora_" in n for n in trainable)
    backend = BagelBackendConfig(attention="sdpa", mot="torch", patch_embed="torch")
    cfg = _cfg(f"{root}/ref")
    torch.manual_seed(cfg.model.init_seed)  # the run's random base model
    base = BagelForUnifiedMultimodal(bagel_config(cfg), backend=backend)
    base.initialize_weights()
    plain = _outputs(base, base.config)
    adapted = PeftModel.from_pretrained(base, f"{root}/d/export/adapter")
    got = _outputs(adapted, base.config)
    assert not torch.allclose(plain["ce"], want["ce"])  # the adapter changed the model
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)
    merged = adapted.merge_and_unload()
    got = _outputs(merged, base.config)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)
    exported = BagelForUnifiedMultimodal.from_pretrained(
        f"{root}/d/export/merged", stage=2, strict=True, backend=backend
    )
    got = _outputs(exported, exported.config)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)

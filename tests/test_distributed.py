"""FSDP2 data parallelism on CPU (gloo, 2 ranks) against the same steps run in one process.

Each rank trains the tiny BAGEL (stage 2) on its own pack, with one FSDP2 unit per LLM and ViT decoder
layer plus the root and activation checkpointing of every layer; FSDP2's reduce-scatter averages the
gradients, so the single-process reference computes both packs' gradients, averages them and takes the
same optimizer step. The packs differ in kind on purpose: a rank without an image (the ViT runs on its
stand-in) and a rank without generation tokens (no MSE). The reference-backend run calls
``model(**batch)``, the Triton one ``model.forward_prepared(model.prepare_pack(**batch))``. Losses and all updated parameters (gathered
with ``full_tensor``) must agree within fp32 round-off of a different summation order (atol 2e-5,
rtol 1e-4). The optimizer is SGD with momentum, linear in the gradients: Adam would divide near-zero
gradients by their own magnitude and turn round-off into parameter differences of the order of the
learning rate.

Every multi-process run has a bounded wall time: a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from bagel import BagelBackendConfig, BagelConfig, BagelForUnifiedMultimodal, pack_samples, synthetic_samples
from bagel.train.distributed import free_port, set_local_env

WORLD = 2
STEPS = 2
ATOL, RTOL = 2e-5, 1e-4


def _model(backend: BagelBackendConfig) -> BagelForUnifiedMultimodal:
    torch.manual_seed(0)
    model = BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=backend)
    model.initialize_weights()
    return model


# sample kinds per (rank, step): rank 1's first pack has no image (the ViT's units still run, on the
# stand-in), rank 0's second pack has no generation token (no MSE, zero gradients for the gen expert)
KINDS = {(0, 0): ["und", "t2i"], (1, 0): ["t2i", "text"], (0, 1): ["und", "text"], (1, 1): ["edit", "text"]}


def _batch(config, rank: int, step: int):
    kinds = KINDS[rank % 2, step]
    torch.manual_seed(100 * step + rank)  # the flow-matching noise
    samples = synthetic_samples(kinds, config, seed=10 * step + rank)
    return pack_samples(samples, config, max_num_tokens=200, rng=step)


def _loss(model, batch, prepared: bool = False):
    """Mean CE + mean MSE of one pack; ``prepared``: through ``forward_prepared(prepare_pack(...))``
    (a forward method of the FSDP2 root too) instead of ``model(**batch)``."""
    torch.manual_seed(1000 + batch["sequence_length"])
    out = model.forward_prepared(model.prepare_pack(**batch)) if prepared else model(**batch)
    return sum(v.mean() for v in out.values() if v is not None)


def _worker(rank: int, port: int, backend: BagelBackendConfig, prepared: bool, result_path: str) -> None:
    set_local_env(rank, WORLD, port)
    from torch.distributed.fsdp import FSDPModule

    from bagel.train.distributed import apply_fsdp2, cleanup, decoder_layers, init_distributed

    init_distributed(timeout_s=120)
    model = _model(backend)
    apply_fsdp2(model, activation_checkpointing=True)
    layers = decoder_layers(model)
    assert len(layers) == 2 * 2 and all(isinstance(m, FSDPModule) for m in layers + [model])
    # FSDP2's sharded (DTensor) weights and its unit hooks leave the fused kernels in place
    plan = model.model.language_model.model.fusion_plan()
    assert (
        all(not p.called and not p.all_called for p in plan.layers)
        and plan.norm
        and model.model.vit_model.fusion_plan()
    )
    calls = {"llm": 0, "vit": 0}  # forward calls of one LLM and one ViT layer: 2 per step = recomputed
    layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__("llm", calls["llm"] + 1))
    layers[-1].register_forward_pre_hook(lambda *a: calls.__setitem__("vit", calls["vit"] + 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(STEPS):
        loss = _loss(model, _batch(model.config, rank, step), prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    gathered = [None] * WORLD
    torch.distributed.all_gather_object(gathered, (losses, calls))
    if rank == 0:
        torch.save(
            {"losses": [g[0] for g in gathered], "calls": [g[1] for g in gathered], "params": full},
            result_path,
        )
    cleanup()


def _single_process(backend: BagelBackendConfig):
    model = _model(backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = [[] for _ in range(WORLD)]
    for step in range(STEPS):
        grads = None
        for rank in range(WORLD):
            model.zero_grad()
            loss = _loss(model, _batch(model.config, rank, step))
            loss.backward()
            losses[rank].append(loss.item())
            g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
            grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g / WORLD
        opt.step()
    return losses, dict(model.named_parameters())


def _spawn(backend, prepared, tmp_path, timeout_s=240):
    path = str(tmp_path / "fsdp_result.pt")
    ctx = mp.start_processes(
        _worker, args=(free_port(), backend, prepared, path), nprocs=WORLD, start_method="spawn", join=False
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"FSDP2 workers did not finish within {timeout_s} s")
    return torch.load(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,prepared",
    [
        (BagelBackendConfig.reference(), False),
        (BagelBackendConfig(attention="triton", mot="triton", patch_embed="torch"), True),
    ],
    ids=["reference", "triton-prepared"],
)
def test_fsdp2_matches_single_process(backend, prepared, tmp_path):
    got = _spawn(backend, prepared, tmp_path)
    # activation checkpointing: every layer ran twice per step (forward + recomputation), on every
    # rank, the ViT layers included on the rank whose pack has no image
    assert got["calls"] == [{"llm": 2 * STEPS, "vit": 2 * STEPS}] * WORLD
    ref_losses, ref_params = _single_process(backend)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), atol=ATOL, rtol=RTOL)
    assert set(got["params"]) == set(ref_params)
    moved = 0
    for name, p in ref_params.items():
        torch.testing.assert_close(
            got["params"][name], p.detach(), atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved += (
            int(not torch.equal(p.detach(), _model(backend).state_dict()[name]))
            if name.endswith("q_proj.weight")
            else 0
        )
    assert moved > 0  # the steps did update parameters (the comparison is not between two untouched copies)


def test_apply_fsdp2_needs_a_process_group():
    from bagel.train.distributed import apply_fsdp2

    with pytest.raises(ValueError, match="process group"):
        apply_fsdp2(_model(BagelBackendConfig.reference()))


def test_activation_checkpointing_keeps_gradients():
    """The recomputation path (used under FSDP2) gives the same gradients as the plain one."""
    backend = BagelBackendConfig.reference()
    batch = _batch(BagelConfig.tiny(), 0, 0)
    grads = []
    for ac in (False, True):
        model = _model(backend)
        model.model.language_model.model.gradient_checkpointing = ac
        model.model.vit_model.vision_model.encoder.gradient_checkpointing = ac
        _loss(model, batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_stand_in_and_zero_ties_give_every_parameter_a_gradient_and_change_nothing():
    """What apply_fsdp2 switches on, in one process: on a pack without an image or generation tokens,
    the ViT stand-in and the weight-zero ties leave losses and gradients exactly as they were, and
    every trainable parameter gets a gradient (zero where the pack does not use it)."""
    backend = BagelBackendConfig.reference()
    batch = pack_samples(synthetic_samples(["text", "text"], BagelConfig.tiny(), seed=3), BagelConfig.tiny())
    runs = []
    for tie in (False, True):
        model = _model(backend)
        if tie:
            model.vit_stand_in = True
            model.zero_grad_prefixes = (
                "model.language_model.model.layers.",
                "model.vit_model.vision_model.encoder.layers.",
            )
        loss = _loss(model, batch)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, g0), (loss1, g1) = runs
    assert torch.equal(loss0, loss1)
    assert all(g is not None for g in g1.values())
    assert any(g is None for g in g0.values())  # the plain run leaves the ViT and heads without one
    for name, g in g1.items():
        assert torch.equal(g, g0[name] if g0[name] is not None else torch.zeros_like(g)), name


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["nproc", "torchrun"])
def test_demo_runs_on_two_processes(launch, tmp_path):
    """``bagel-demo --nproc 2`` (spawned workers) and ``torchrun --standalone --nproc-per-node 2 -m
    bagel.cli.demo``: 3 steps; rank 0 alone reports and writes the CSV, whose token counts (and the final
    tokens/s line) sum both ranks' packs."""
    import re
    import subprocess
    import sys

    args = ["--steps", "3", "--tokens", "256", "--device", "cpu", "--out", str(tmp_path)]
    if launch == "nproc":
        cmd = [sys.executable, "-m", "bagel.cli.demo", "--nproc", "2", *args]
    else:
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        cmd = [*run, "-m", "bagel.cli.demo", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("bagel-demo:") == 1 and "x 2 processes (FSDP2)" in res.stdout
    rows = [line.split(",") for line in (tmp_path / "losses.csv").read_text().strip().splitlines()]
    assert len(rows) == 4 and rows[0][3] == "tokens"  # header + 3 steps, written once (by rank 0)
    tokens = [int(r[3]) for r in rows[1:]]
    assert all(t > 256 for t in tokens)  # two packs of at most 256 tokens each, summed over the ranks
    done = re.search(r"trained 3 steps, (\d+) tokens in .* tokens/s", res.stdout)
    assert done and int(done.group(1)) == sum(tokens)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be >= 1"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside [0, WORLD_SIZE=2)"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1' must be >= 0"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
        ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "3"}, "LOCAL_RANK=3 exceeds RANK=1"),
    ],
)
def test_init_distributed_names_a_malformed_environment(monkeypatch, env, message):
    """A torchrun environment that cannot be right is a usage error naming the variable, raised before
    any process group or device is touched (issue 23 item 14)."""
    import torch.distributed as dist

    from bagel.train.distributed import init_distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as exc:
        init_distributed(device="cpu")
    assert message in str(exc.value) and "torchrun" in str(exc.value)
    assert not dist.is_initialized()


def test_read_launch_env_defaults(monkeypatch):
    from bagel.train.distributed import read_launch_env

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert read_launch_env() == (1, 0, 0)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    assert read_launch_env() == (8, 5, 5)  # one machine: LOCAL_RANK defaults to RANK
    monkeypatch.setenv("LOCAL_RANK", " 1 ")
    assert read_launch_env() == (8, 5, 1)

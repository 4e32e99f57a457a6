"""The GPU lend driver (benchmarks/gpu_check.py) and what it relies on, checked on the CPU.

- the time plan of each phase fits its budget and the file rule (at most 6 files, plain names);
- the check of an output folder finds every way a file would be lost on the way back;
- a phase run keeps the rows of a step that a timeout cut off, marks a failing step, and leaves OUT
  within the file rule;
- the benchmarks' row-by-row report, the compile time limit, the tuner's failure status;
- bench_model's model built on the meta device and materialised by to_empty + initialize_weights, and
  its upstream ViT attention path against the model's own.

The full CPU dry run of both phases (a few minutes) is the ``slow`` test at the end.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import gpu_check  # noqa: E402
from common import CompileTimeout, Report, time_limit  # noqa: E402


# ------------------------------------------------------------------------------------------ plan
@pytest.mark.parametrize("phase", gpu_check.PHASES)
def test_phase_plan_fits_budget_and_file_rule(phase):
    steps = gpu_check.plan(phase)
    assert gpu_check.plan_problems(phase) == []
    assert sum(s.cap_s for s in steps) + gpu_check.RESERVE_S <= gpu_check.BUDGET_S
    files = gpu_check.out_files(phase)
    assert len(files) <= gpu_check.MAX_FILES <= 6
    assert all(gpu_check.NAME_RE.match(f) for f in files)
    assert steps[0].kind == "install"  # everything else runs on the installed package
    assert "compile_check" not in {s.kind for s in steps}  # only with the flag
    assert gpu_check.main(["--phase", phase, "--plan"]) == 0


def test_phase_order():
    correct = [s.kind for s in gpu_check.plan("correct")]
    assert correct.index("gpu_tests") < correct.index("equivalence") < correct.index("bench")
    fast = [s.name for s in gpu_check.plan("fast")]
    assert fast.index("tune") < fast.index("bench_attention")  # the benchmarks run with the tuned tiles
    assert fast.index("tune") < fast.index("bench_model")


def test_plan_check_fails_over_budget_or_too_many_files(monkeypatch, capsys):
    assert gpu_check.main(["--phase", "correct", "--plan", "--budget-s", "200"]) == 1
    assert "OVER BUDGET" in capsys.readouterr().out
    # the compile check brings its own time: the default budget grows by its cap
    assert gpu_check.main(["--phase", "correct", "--plan", "--compile-check"]) == 0
    assert gpu_check.plan_problems("correct", gpu_check.BUDGET_S, compile_check=True)
    monkeypatch.setattr(gpu_check, "out_files", lambda phase: [f"f{i}.md" for i in range(7)])
    assert any("7 files" in p for p in gpu_check.plan_problems("fast"))


def test_check_out_dir_finds_what_a_lend_would_lose(tmp_path):
    ok = tmp_path / "ok"
    ok.mkdir()
    for name in ("a.md", "b_c-1.json"):
        (ok / name).write_text("x")
    assert gpu_check.check_out_dir(str(ok)) == []
    assert gpu_check.check_out_dir(str(ok), ["a.md"]) == ["files outside the phase's list: ['b_c-1.json']"]

    many = tmp_path / "many"
    many.mkdir()
    for i in range(7):
        (many / f"f{i}.txt").write_text("x")
    assert any("7 files > 6" in p for p in gpu_check.check_out_dir(str(many)))

    odd = tmp_path / "odd"
    (odd / "a" / "b" / "c").mkdir(parents=True)
    (odd / "bad name.md").write_text("x")
    (odd / "link.md").symlink_to(odd / "bad name.md")
    with open(odd / "big.bin", "wb") as f:
        f.truncate(gpu_check.MAX_FILE_BYTES + 1)
    problems = "\n".join(gpu_check.check_out_dir(str(odd)))
    assert "bad name.md: a name outside" in problems
    assert "link.md: not a plain file" in problems
    assert "big.bin" in problems and "> 16 MiB" in problems
    assert "more than 2 folders down" in problems


# ------------------------------------------------------------------------------------------ a phase run
_ROWS_THEN_HANG = """
import sys, time
sys.path.insert(0, {bench!r})
from common import Report
r = Report(sys.argv[1], "bench_fake")
t = r.table("fake", ["case", "ms"])
t.add(["a", "1.0"], raw={{"ms": 1.0}})
t.add(["b", "2.0"], raw={{"ms": float("nan")}})
print("two rows written", flush=True)
time.sleep(120)
"""


def test_phase_keeps_rows_of_a_timed_out_step_and_marks_failures(tmp_path):
    py = sys.executable
    steps = [
        gpu_check.Step(
            "fails", 8, "command", args=("{py}", "-c", "import sys; print('broken'); sys.exit(3)")
        ),
        gpu_check.Step(
            "hangs",
            8,
            "command",
            bench="fake",
            args=("{py}", "-c", _ROWS_THEN_HANG.format(bench=BENCH), "{bench_dir}"),
        ),
    ]
    out = tmp_path / "OUT"
    budget = 8 + 8 + int(gpu_check.RESERVE_S / 2) + 2
    phase = gpu_check.Phase(
        "fast",
        str(out),
        dry=True,
        full=False,
        compile_check=False,
        budget_s=budget,
        py=py,
        steps=steps,
        facts=False,
    )
    t0 = time.monotonic()
    rc = phase.run()
    assert time.monotonic() - t0 < budget + 15
    assert rc == 1
    tsv = (out / "fast_steps.tsv").read_text().splitlines()
    assert tsv[1].startswith("fails\tFAILED (exit 3)")
    assert tsv[2].startswith("hangs\tTIMEOUT")
    results = (out / "fast_results.md").read_text()
    assert "| a | 1.0 |" in results and "| b | 2.0 |" in results  # measured before the kill
    raw = json.loads((out / "fast_raw.json").read_text())
    assert [r["raw"]["ms"] for r in raw["rows"]] == [1.0, None]  # NaN kept as null: strict JSON
    assert [s["status"].split()[0] for s in raw["steps"]] == ["FAILED", "TIMEOUT"]
    assert "broken" in (out / "fast_log.txt").read_text()
    assert gpu_check.check_out_dir(str(out), gpu_check.out_files("fast")) == []
    assert not os.path.exists(phase.work)  # the work folder is cleaned up


_DRIVER = """
import sys
sys.path.insert(0, {bench!r})
import gpu_check
child = "import os, time; print('child', os.getpid(), flush=True); time.sleep(300)"
steps = [gpu_check.Step("hangs", 60, "command", args=("{{py}}", "-c", child))]
phase = gpu_check.Phase("fast", sys.argv[1], dry=True, full=False, compile_check=False, budget_s=100,
                        py=sys.executable, steps=steps, facts=False)
sys.exit(phase.run())
"""


def test_phase_stopped_by_sigterm_stops_its_step_and_keeps_its_files(tmp_path):
    """The device command's own timeout: the driver stops the running step (its whole process group) and
    leaves OUT complete."""
    import signal

    out = tmp_path / "OUT"
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER.format(bench=BENCH), str(out)], stdout=subprocess.PIPE, text=True
    )
    child = None
    for line in driver.stdout:
        if line.startswith("child "):
            child = int(line.split()[1])
            break
    assert child is not None
    driver.send_signal(signal.SIGTERM)
    driver.stdout.read()
    assert driver.wait(timeout=30) == 1
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}")
    assert "hangs\tINTERRUPTED" in (out / "fast_steps.tsv").read_text()
    assert "signal 15" in (out / "fast_log.txt").read_text()
    assert gpu_check.check_out_dir(str(out), gpu_check.out_files("fast")) == []


def test_pytest_outcomes_plugin_records_as_tests_finish(tmp_path):
    (tmp_path / "test_a.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='not here')\n"
        "def test_skip(): pass\n"
    )
    (tmp_path / "test_b.py").write_text("import not_a_module_anywhere\n")
    log = tmp_path / "outcomes.jsonl"
    env = dict(os.environ, PYTHONPATH=BENCH)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_outcomes",
           "--continue-on-collection-errors", "--outcomes-jsonl", str(log), "-c", os.devnull, str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 1, res.stdout[-2000:]
    got = {
        (r["nodeid"].split("::")[-1], r["when"], r["outcome"]): r
        for r in map(json.loads, log.read_text().splitlines())
    }
    assert set(got) == {
        ("test_b.py", "collect", "failed"), ("test_ok", "call", "passed"), ("test_bad", "call", "failed"),
        ("test_skip", "setup", "skipped"),
    }  # fmt: skip
    assert "one is not two" in got[("test_bad", "call", "failed")]["message"]
    assert "not_a_module_anywhere" in got[("test_b.py", "collect", "failed")]["message"]
    summary = "\n".join(gpu_check.gpu_test_summary(list(got.values())))
    assert "1 error, 1 failed, 1 passed, 1 skipped" in summary and "`" in summary


# ------------------------------------------------------------------------------------------ install
_FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: pip and the CUDA-extension probe answer as $PIP_RC / $EXT_RC say
case "$*" in
  *"-m pip install"*) echo "[bagel-kernels setup] building"; echo "error: nvcc failed"; exit "$PIP_RC" ;;
  *setup.py*) echo "cpu kernel built in place"; exit 0 ;;
  *extension_status*) echo "extension status"; exit "$EXT_RC" ;;
esac
exit 0
"""


def _run_install(tmp_path, pip_rc, ext_rc):
    tree = tmp_path / "tree"
    if not tree.exists():
        (tree / "csrc").mkdir(parents=True)
        (tree / "csrc" / "k.cu").write_text("// kernel")
        (tree / "setup.py").write_text("# setup")
    py = tmp_path / "python"
    py.write_text(_FAKE_PYTHON)
    py.chmod(0o755)
    script = gpu_check.install_script(str(py), str(tmp_path))
    env = dict(os.environ, PIP_RC=str(pip_rc), EXT_RC=str(ext_rc))
    return subprocess.run(
        ["bash", "-c", script], cwd=tree, capture_output=True, text=True, env=env, timeout=60
    )


def test_install_step_requires_cuda_and_reuses_a_warm_build(tmp_path):
    failed = _run_install(tmp_path, pip_rc=1, ext_rc=1)
    assert failed.returncode == 1
    assert "INSTALL FAILED" in failed.stdout and "error: nvcc failed" in failed.stdout
    assert "cpu kernel built in place" in (tmp_path / "pip_install.log").read_text()
    assert not (tmp_path / "tree" / "build" / "gpu_check_install.stamp").exists()
    # pip succeeds but the extension has no CUDA kernel: still a failed install
    assert _run_install(tmp_path, pip_rc=0, ext_rc=1).returncode == 1
    fresh = _run_install(tmp_path, pip_rc=0, ext_rc=0)
    assert fresh.returncode == 0 and "install: pip install -e ." in fresh.stdout
    warm = _run_install(tmp_path, pip_rc=1, ext_rc=0)  # same sources, extension there: pip is not called
    assert warm.returncode == 0 and "install: reused" in warm.stdout
    (tmp_path / "tree" / "csrc" / "k.cu").write_text("// changed kernel")
    stale = _run_install(tmp_path, pip_rc=1, ext_rc=0)  # changed sources: a rebuild, which fails here
    assert stale.returncode == 1 and "install: reused" not in stale.stdout


# ------------------------------------------------------------------------------------------ helpers
def test_report_writes_each_row_and_fails_when_nothing_was_measured(tmp_path):
    r = Report(str(tmp_path), "bench_x")
    r.text("# header")
    t = r.table("T", ["a", "b"])
    t.add(["1", "x"], ok=False)
    assert "| 1 | x |" in (tmp_path / "bench_x.md").read_text()  # on disk before the run ends
    assert r.exit_code() == 1  # rows, none of them a measurement
    t.add(["2", "y"])
    assert r.exit_code() == 0
    lines = [json.loads(x) for x in (tmp_path / "bench_x.jsonl").read_text().splitlines()]
    assert [(x["a"], x["ok"]) for x in lines] == [("1", False), ("2", True)]
    assert Report(str(tmp_path), "bench_x").exit_code() == 0  # a fresh report starts empty
    assert not (tmp_path / "bench_x.jsonl").exists()


def test_time_limit_stops_a_long_call():
    t0 = time.monotonic()
    with pytest.raises(CompileTimeout), time_limit(0.3, "fake compile"):
        while True:
            time.sleep(0.01)
    assert time.monotonic() - t0 < 2
    with time_limit(None):  # no limit: nothing fires
        time.sleep(0.05)


def test_tune_fails_when_every_candidate_fails(tmp_path, monkeypatch):
    import argparse

    import tune_attention

    def broken(*a, **k):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(tune_attention, "check_candidate", broken)
    md, jsonl = tmp_path / "t.md", tmp_path / "t.jsonl"
    args = argparse.Namespace(
        dry_run=True,
        out=str(tmp_path / "t.json"),
        base=None,
        md=str(md),
        jsonl=str(jsonl),
        budget_s=30.0,
        reps=1,
        verbose=False,
    )
    assert tune_attention.tune(args) == 1
    assert "FAILED: no candidate passed" in md.read_text()
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert rows and not any(r["ok"] for r in rows)


# ------------------------------------------------------------------------------------------ bench_model
def test_build_model_materialises_every_tensor_on_the_device():
    import bench_model

    from bagel import BagelConfig, BagelForUnifiedMultimodal

    cfg = BagelConfig.tiny()
    model = bench_model.build_model(cfg, torch.device("cpu"), torch.bfloat16)
    params = list(model.parameters())
    assert params and all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    # the non-persistent RoPE buffers equal those of a model built the ordinary way
    ref = dict(BagelForUnifiedMultimodal(cfg).named_buffers())
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf.float(), ref[name].float(), msg=name)
    # the init is the model's own: weights of a Linear are not all equal (to_empty garbage would be NaN
    # or arbitrary; build_model fills NaN first and checks every tensor was written)
    assert float(params[0].detach().float().std()) > 0


def test_upstream_vit_attention_matches_the_model_attention():
    import bench_model

    from bagel import BagelBackendConfig, BagelConfig
    from bagel_kernels import PackedMask

    model = bench_model.build_model(BagelConfig.tiny(), torch.device("cpu"), torch.float32)
    attention_modules = [
        m for m in model.model.vit_model.modules() if hasattr(m, "q_proj") and hasattr(m, "out_proj")
    ]
    assert bench_model.set_vit_attention(model, upstream=True) == len(attention_modules) >= 1
    attn = next(m for m in model.model.vit_model.modules() if type(m).__name__.startswith("UpstreamSiglip"))
    lens = [5, 9, 1, 7]
    mask = PackedMask.from_splits(lens, lens, ["full"] * len(lens))
    x = torch.randn(sum(lens), attn.embed_dim)
    backend = BagelBackendConfig(attention="sdpa")
    with torch.no_grad():
        upstream = attn(x, mask, backend)
        bench_model.set_vit_attention(model, upstream=False)
        assert type(attn).__name__ == "SiglipAttention"
        ours = attn(x, mask, backend)
    torch.testing.assert_close(upstream, ours, atol=1e-5, rtol=1e-4)
    # each image attends only to itself: changing one image leaves the others' outputs unchanged
    x2 = x.clone()
    x2[:5] += 1.0
    with torch.no_grad():
        bench_model.set_vit_attention(model, upstream=True)
        moved = attn(x2, mask, backend)
    torch.testing.assert_close(moved[5:], upstream[5:])
    assert not torch.allclose(moved[:5], upstream[:5])


# ------------------------------------------------------------------------------------------ dry runs
@pytest.mark.slow
@pytest.mark.parametrize("phase", gpu_check.PHASES)
def test_dry_run_of_phase(phase, tmp_path):
    """The whole phase with its CPU stand-ins (about 2.5 minutes each on 2 cores): every step ok, inside
    the budget, OUT within the file rule."""
    out = tmp_path / "OUT"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT)
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", os.path.join(BENCH, "gpu_check.sh"), "--phase", phase, str(out), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=gpu_check.BUDGET_S + 60,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert time.monotonic() - t0 <= gpu_check.BUDGET_S + 10
    assert gpu_check.check_out_dir(str(out), gpu_check.out_files(phase)) == []
    steps = (out / f"{phase}_steps.tsv").read_text()
    assert "TIMEOUT" not in steps and "FAILED" not in steps
    assert "DRY RUN" in (out / f"{phase}_results.md").read_text()

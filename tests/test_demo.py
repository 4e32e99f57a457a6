"""bagel-demo: the built-in data and a few training steps end to end (CSV, plot, finite losses)."""

import csv

import torch

from bagel.cli.demo import DemoData, make_parser, train


def test_demo_data_packs_to_the_budget():
    from bagel import BagelConfig

    config = BagelConfig.tiny(vae_config={"z_channels": 4, "downsample": 4}, max_latent_size=16)
    data = DemoData(config, seed=1)
    batch = data.pack(384, "cpu")
    assert sum(batch["sample_lens"]) == 384
    assert 0 < batch["sequence_length"] <= 384
    assert batch["ce_loss_indexes"].numel() > 0 or batch["mse_loss_indexes"].numel() > 0
    # the stand-in VAE is a fixed function of the pixels
    px = data._crop()[0]
    assert data.encode(px).shape == (4, px.shape[1] // 4, px.shape[2] // 4)
    assert (data.encode(px) == data.encode(px)).all()


def test_demo_trains_a_few_steps(tmp_path):
    args = make_parser().parse_args(
        ["--steps", "4", "--tokens", "256", "--out", str(tmp_path), "--device", "cpu"]
    )
    result = train(args)
    rows = list(csv.DictReader(open(tmp_path / "losses.csv")))
    assert len(rows) == 4 and set(rows[0]) >= {"step", "ce", "mse", "tokens"}
    assert (tmp_path / "losses.png").stat().st_size > 1000
    assert result["tokens_per_s"] > 0


# ------------------------------------------------------------------------------ hostile input (issue 13)
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from bagel.cli import demo  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(module: str, args: list[str], timeout: float = 120, env: dict | None = None):
    """``python -m module args`` -> (returncode, stderr, seconds); a run past ``timeout`` fails the test."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{module} {args} ran past {timeout} s instead of refusing its arguments")
    return res.returncode, res.stderr, time.perf_counter() - t0


def _assert_usage_error(rc, err, seconds, prog, needle):
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:") and needle in lines[0], err
    # a refusal comes before any model is built: seconds, where building and training took 6-14 s
    assert seconds < 30, seconds


def _bad_demo_args(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    taken = tmp_path / "taken"
    (taken / "losses.csv").mkdir(parents=True)  # the CSV's name is a folder
    return [
        (["--attention", "nonsense"], "--attention"),
        (["--mot", "cuda"], "--mot"),
        (["--device", "tpu"], "--device"),
        (["--tokens", "16"], "--tokens"),
        (["--tokens", str(demo.min_tokens() - 1)], "--tokens"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "-1e-3"], "--lr"),
        (["--steps", "0"], "--steps"),
        (["--hidden", "12"], "--hidden"),
        (["--out", str(a_file)], "--out"),
        (["--out", str(a_file / "sub")], "--out"),  # cannot be created: a file is in the way
        (["--out", str(taken)], "losses.csv"),
        (["--attention", "flex", "--device", "cpu"], "flex"),
        # unbounded values would run for minutes (or exhaust memory) before the first step
        (["--tokens", "3000000000"], "--tokens"),
        (["--layers", "100000000"], "--layers"),
        (["--hidden", "100000000"], "--hidden"),
        (["--seed", "99999999999999999999999999"], "--seed"),
        (["--nproc", "100000000"], "--nproc"),
    ]


def test_demo_usage_errors_are_one_line_and_immediate(tmp_path):
    for args, needle in _bad_demo_args(tmp_path):
        args = [*args, "--device", "cpu"] if "--device" not in args else args
        rc, err, seconds = _run_cli("bagel.cli.demo", args)
        _assert_usage_error(rc, err, seconds, "bagel-demo", needle)


def test_demo_argument_checks_import_no_torch(tmp_path):
    """The refusals run before torch (and the model's modules) are imported."""
    cases = [a for a, _ in _bad_demo_args(tmp_path) if "flex" not in a]
    code = (
        f"import sys\nfrom bagel.cli.demo import main\nfor args in {cases!r}:\n"
        "    try:\n        main(args + ['--device', 'cpu'] if '--device' not in args else args)\n"
        "    except SystemExit as e:\n        assert e.code == 2, (args, e.code)\n"
        "    else:\n        raise AssertionError(args)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False False"


@pytest.mark.parametrize(
    "env, needle",
    [({"WORLD_SIZE": "abc"}, "WORLD_SIZE"), ({"WORLD_SIZE": "-2"}, "WORLD_SIZE")],
)
def test_demo_refuses_a_bad_launcher_environment(env, needle):
    rc, err, seconds = _run_cli("bagel.cli.demo", ["--device", "cpu"], env=env)
    _assert_usage_error(rc, err, seconds, "bagel-demo", needle)


@pytest.mark.parametrize(
    "module, prog, args, needle",
    [
        ("bagel_kernels.check", "python -m bagel_kernels.check", ["--backends", "foo"], "--backends"),
        ("bagel_kernels.check", "python -m bagel_kernels.check", ["--device", "tpu"], "--device"),
        ("bagel_kernels.check", "python -m bagel_kernels.check", ["--tokens", "0"], "--tokens"),
        ("bagel.cli.bench", "bagel-bench", ["--only", "foo"], "--only"),
        ("bagel.cli.bench", "bagel-bench", ["--device", "tpu"], "--device"),
        ("bagel.cli.bench", "bagel-bench", ["--out", "{a_file}"], "--out"),
    ],
)
def test_other_clis_refuse_bad_arguments_in_one_line(tmp_path, module, prog, args, needle):
    (tmp_path / "a_file").write_text("x")
    args = [a.format(a_file=tmp_path / "a_file") for a in args]
    rc, err, seconds = _run_cli(module, args)
    _assert_usage_error(rc, err, seconds, prog, needle)


def test_min_tokens_is_the_largest_sample():
    """``--tokens`` below min_tokens() is refused because some sample would not fit: the bound is
    reached by the largest crops and never exceeded, and packs of exactly min_tokens() always build."""
    from bagel.data.packing import sample_num_tokens

    args = demo.make_parser().parse_args([])
    config = demo.demo_config(args)
    big = demo.DemoData(config, seed=3, side_units=(demo.DEMO_SIDE_UNITS[1],) * 2)
    sizes = [sample_num_tokens(big.sample(), config) for _ in range(40)]
    assert max(sizes) == demo.min_tokens()
    data = demo.DemoData(config, seed=4)
    assert all(sample_num_tokens(data.sample(), config) <= demo.min_tokens() for _ in range(200))
    for _ in range(20):
        assert sum(data.pack(demo.min_tokens(), "cpu")["sample_lens"]) == demo.min_tokens()


def test_pack_calls_pack_samples_once(monkeypatch):
    """The data builder counts tokens per sample and packs once (it re-packed the whole list for every
    added sample: quadratic). Same samples, same pack as that builder."""
    import bagel.data.packing as packing
    from bagel import BagelConfig

    config = BagelConfig.tiny(vae_config={"z_channels": 4, "downsample": 4}, max_latent_size=16)
    calls = []
    real = packing.pack_samples
    monkeypatch.setattr(packing, "pack_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = demo.DemoData(config, seed=1).pack(20000, "cpu")
    assert len(calls) == 1 and sum(batch["sample_lens"]) == 20000
    assert batch["sequence_length"] > 20000 - demo.min_tokens()

    def old_pack(data, tokens):  # the previous builder, for the equality check on a small pack
        samples = []
        while True:
            samples.append(data.sample())
            if real(samples, data.config, rng=0)["sequence_length"] > tokens:
                samples.pop()
                break
        return real(samples, data.config, max_num_tokens=tokens, rng=data.rng.randrange(2**31))

    want = old_pack(demo.DemoData(config, seed=2), 700)
    got = demo.DemoData(config, seed=2).pack(700, "cpu")
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def _demo_args(out, steps=4):
    return ["--steps", str(steps), "--tokens", "256", "--out", str(out), "--device", "cpu"]


def test_ctrl_c_saves_the_finished_steps(tmp_path, monkeypatch):
    (tmp_path / "losses.png").write_bytes(b"a plot of an earlier run")
    real_pack = demo.DemoData.pack
    calls = []

    def pack(self, tokens, device):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_pack(self, tokens, device)

    monkeypatch.setattr(demo.DemoData, "pack", pack)
    try:
        rc = demo.main(_demo_args(tmp_path, steps=6))
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped train(): the finished steps were not saved")
    assert rc == 130
    rows = list(csv.DictReader(open(tmp_path / "losses.csv")))
    assert [r["step"] for r in rows] == ["1", "2"]
    png = (tmp_path / "losses.png").read_bytes()
    assert png.startswith(b"\x89PNG")  # this run's plot replaced the earlier one
    assert sorted(os.listdir(tmp_path)) == ["losses.csv", "losses.png"]  # no temporary files left


def test_outputs_are_written_atomically_and_together(tmp_path, monkeypatch):
    """A failed plot never leaves another run's plot beside this run's CSV, nor a partial file."""
    (tmp_path / "losses.png").write_bytes(b"a plot of an earlier run")

    def broken_plot(path, rows):
        with open(path, "wb") as f:
            f.write(b"half a png")
        raise RuntimeError("no display")

    monkeypatch.setattr(demo, "_plot", broken_plot)
    assert demo.main(_demo_args(tmp_path, steps=2)) == 0
    assert len(list(csv.DictReader(open(tmp_path / "losses.csv")))) == 2
    assert sorted(os.listdir(tmp_path)) == ["losses.csv"]

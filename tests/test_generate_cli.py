"""bagel-generate on a tiny random checkpoint (save_pretrained of a tiny model + a slim random VAE as
ae.safetensors + the tiny tokenizer): draws, edits and answers on the CPU; bad arguments are one-line
usage errors (exit 2); a stage-1 checkpoint asked to draw is a clear error."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from model_helpers import randomize_

from bagel import BagelConfig, BagelForUnifiedMultimodal
from bagel.cli.generate import main
from bagel.vae import FluxVAE, FluxVAEConfig


def _checkpoint(folder, *, stage: int = 2, with_vae: bool = True) -> str:
    from safetensors.torch import save_file

    from bagel.data.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = BagelConfig.tiny(visual_gen=stage == 2, vocab_size=len(tok), max_latent_size=4)
    model = BagelForUnifiedMultimodal(cfg)
    randomize_(model, 0)
    path = str(folder)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if with_vae:
        vae = FluxVAE(
            FluxVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4)
        ).initialize_weights(1)
        save_file(
            {k: v.contiguous() for k, v in vae.state_dict().items()}, os.path.join(path, "ae.safetensors")
        )
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("bagel_tiny"))


def _one_line_error(capsys, code_expected, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code_expected
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bagel-generate: error:") and match in err, err


def test_draw_edit_answer(ckpt, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "out.png"
    common = ["--model", ckpt, "--steps", "3", "--no-progress"]
    assert (
        main([*common, "--prompt", "a photo of a fox", "--out", str(out), "--height", "48", "--width", "32"])
        == 0
    )
    img = Image.open(out)
    assert img.size == (32, 48) and img.mode == "RGB"
    assert "wrote" in capsys.readouterr().err

    src = tmp_path / "in.png"
    Image.fromarray((torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()).save(src)
    edited = tmp_path / "edited.png"
    argv = [*common, "--prompt", "make it darker", "--image", str(src), "--edit", "--out", str(edited)]
    assert main([*argv, "--cfg-renorm-type", "channel", "--seed", "3"]) == 0
    # 56x40 within the 64-pixel maximum, sides rounded to multiples of 16 (40 / 16 = 2.5 rounds to even)
    assert Image.open(edited).size == (64, 32)

    assert (
        main(
            ["--model", ckpt, "--ask", "what is in the picture", "--image", str(src), "--max-new-tokens", "5"]
        )
        == 0
    )
    answer = capsys.readouterr().out
    assert answer.strip()  # the tiny random model's words (byte-level BPE of random ids)
    assert main(["--model", ckpt, "--ask", "describe the image", "--max-new-tokens", "3", "--do-sample"]) == 0
    think = [*common, "--prompt", "a fox", "--out", str(out), "--height", "32", "--width", "32", "--think"]
    assert main([*think, "--max-think-tokens", "3"]) == 0  # the plan is printed, then the image written
    assert Image.open(out).size == (32, 32)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--prompt", "x"], "--out"),
        (["--ask", "x", "--edit"], "--edit"),
        (["--prompt", "x", "--edit", "--out", "o.png"], "--image"),
        (["--prompt", "x", "--out", "o.png", "--steps", "1"], "--steps"),
        (["--prompt", "x", "--out", "o.png", "--cfg-interval", "0.8", "0.2"], "--cfg-interval"),
        (["--prompt", "x", "--out", "o.png", "--cfg-text", "nan"], "finite"),
        (["--ask", "x", "--top-p", "0"], "--top-p"),
        (["--ask", "x", "--image", "missing.png"], "does not exist"),
        (["--prompt", "x", "--ask", "y"], "not allowed"),
        (["--prompt", "x", "--out", "o.png", "--cfg-renorm-type", "local"], "invalid choice"),
    ],
)
def test_usage_errors(ckpt, capsys, extra, match):
    _one_line_error(capsys, 2, ["--model", ckpt, *extra], match)


def test_missing_vae_and_stage1(ckpt, tmp_path, capsys):
    no_vae = _checkpoint(tmp_path / "novae", with_vae=False)
    _one_line_error(
        capsys, 2, ["--model", no_vae, "--prompt", "x", "--out", str(tmp_path / "o.png")], "--vae"
    )
    stage1 = _checkpoint(tmp_path / "stage1", stage=1)
    assert main(["--model", stage1, "--prompt", "x", "--out", str(tmp_path / "o.png"), "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage-1" in err
    assert main(["--model", stage1, "--ask", "what", "--max-new-tokens", "2"]) == 0  # it still answers
    # a config that claims generation but weights without it (an understanding-only ema.safetensors)
    import json

    cfg_file = os.path.join(stage1, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["visual_gen"] = True
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    capsys.readouterr()
    assert main(["--model", stage1, "--prompt", "x", "--out", str(tmp_path / "o.png"), "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "lacks the generation weights" in err and err.count("bagel-generate: error") == 1
    # a height the model cannot draw is found once the model is read: still a one-line usage error
    assert main(["--model", ckpt, "--prompt", "x", "--out", str(tmp_path / "o.png"), "--height", "40"]) == 2
    assert "--height" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--model", ckpt, "--ask", "what", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_bench_generate_tiny(tmp_path, capsys):
    """benchmarks/bench_generate.py --tiny runs every row on the CPU (times are not asserted)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import bench_generate

    assert bench_generate.main(["--tiny", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "bench_generate.md").read_text()
    assert "failed" not in md
    for row in (
        "prefill sdpa",
        "prefill packed",
        "step sdpa",
        "step packed",
        "step recompute",
        "image (3 timesteps)",
        "token cached",
    ):
        assert f"| {row} |" in md, row

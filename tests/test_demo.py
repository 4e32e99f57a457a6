"""bagel-demo: the built-in data and a few training steps end to end (CSV, plot, finite losses)."""

import csv

from bagel.demo import DemoData, _parser, train


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
    args = _parser().parse_args(
        ["--steps", "4", "--tokens", "256", "--out", str(tmp_path), "--device", "cpu"]
    )
    result = train(args)
    rows = list(csv.DictReader(open(tmp_path / "losses.csv")))
    assert len(rows) == 4 and set(rows[0]) >= {"step", "ce", "mse", "tokens"}
    assert (tmp_path / "losses.png").stat().st_size > 1000
    assert result["tokens_per_s"] > 0

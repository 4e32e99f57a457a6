"""The training loss path of ``bagel-train`` in one process: the fused (chunked) linear cross-entropy
the trainer installs (:func:`bagel.train.trainer.use_fused_ce`) against the model's own
``lm_head`` + ``F.cross_entropy``, values and gradients of every parameter; and
:func:`bagel.train.trainer.step_losses`' per-token normalisation against a hand computation."""

from __future__ import annotations

import pytest
import torch

from bagel import BagelBackendConfig, BagelConfig, BagelForUnifiedMultimodal, pack_samples, synthetic_samples
from bagel.train.trainer import step_losses, use_fused_ce

REF = BagelBackendConfig(attention="sdpa", mot="torch", patch_embed="torch")


def _model():
    torch.manual_seed(0)
    model = BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=REF)
    model.initialize_weights()
    with torch.no_grad():  # llm2vae starts at zero: give the MSE head gradients something to differ by
        model.model.llm2vae.weight.normal_(0, 0.02)
    return model


def _run(model, batch):
    torch.manual_seed(5)
    out = model(**batch)
    n_ce, n_mse = out["ce"].numel(), out["mse"].shape[0]
    loss, _, _ = step_losses(out, n_ce, n_mse, 1, 1.0, 0.5)
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_ce_matches_cross_entropy_values_and_gradients(monkeypatch):
    import bagel_kernels.linear_cross_entropy as lce

    cfg = BagelConfig.tiny()
    batch = pack_samples(synthetic_samples(["und", "t2i", "text", "edit", "text"], cfg, seed=1), cfg, rng=0)
    plain = _model()
    ref_out, ref_grads = _run(plain, batch)
    calls = []
    real = lce.linear_cross_entropy
    monkeypatch.setattr(
        lce, "linear_cross_entropy", lambda *a, **k: calls.append(k.get("chunk_size")) or real(*a, **k)
    )
    fused = _model()
    assert use_fused_ce(fused, chunk_size=7)  # several chunks for the ~40 CE tokens
    out, grads = _run(fused, batch)
    assert calls == [7]  # the fused kernel ran (the LM head is a stock nn.Linear)
    assert out["ce"].shape == ref_out["ce"].shape and out["ce"].dtype == torch.float32
    torch.testing.assert_close(out["ce"], ref_out["ce"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["mse"], ref_out["mse"], atol=0, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_step_losses_normalise_per_token():
    ce = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    mse = torch.tensor([[1.0, 3.0], [5.0, 7.0]], requires_grad=True)
    loss, ce_sum, mse_sum = step_losses({"ce": ce, "mse": mse}, 12, 8, 4, 2.0, 0.5)
    # world 4 (FSDP2 averages over ranks), 12 CE and 8 MSE tokens in the whole step
    want = 2.0 * (1 + 2 + 3) * 4 / 12 + 0.5 * (2 + 6) * 4 / 8
    assert float(loss) == pytest.approx(want)
    assert float(ce_sum) == 6.0 and float(mse_sum) == 8.0
    loss.backward()
    assert torch.allclose(ce.grad, torch.full((3,), 2.0 * 4 / 12))
    assert torch.allclose(mse.grad, torch.full((2, 2), 0.5 * 4 / 8 / 2))
    only_mse, _, _ = step_losses({"ce": None, "mse": mse}, 0, 8, 1, 1.0, 1.0)
    assert float(only_mse) == pytest.approx(8 / 8)
    with pytest.raises(ValueError, match="neither a CE nor an MSE"):
        step_losses({"ce": None, "mse": None}, 0, 0, 1, 1.0, 1.0)

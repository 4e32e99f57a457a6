"""The tiny model's forward and backward under FakeTensorMode (bagel.model.fake): the recipe a memory
estimate at 7B shapes uses. Outputs and gradients must have the shapes and dtypes of a real run, and
nothing may read a fake tensor's data (FakeTensorMode raises on a data-dependent read)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from bagel import BagelBackendConfig, BagelConfig, BagelForUnifiedMultimodal, pack_samples, synthetic_samples
from bagel.model.fake import fake_forward_backward, fake_mode, fake_model

BACKENDS = {
    "reference": BagelBackendConfig.reference(),
    "triton": BagelBackendConfig(attention="triton", mot="triton", patch_embed="torch"),
}


@pytest.fixture(scope="module")
def batch():
    cfg = BagelConfig.tiny()
    samples = synthetic_samples(["und", "t2i", "edit", "text"], cfg, seed=0)
    return pack_samples(samples, cfg, max_num_tokens=160, rng=0)


@pytest.fixture(scope="module")
def real_runs(batch):
    """Outputs and gradients of a real run per dtype (the shapes do not depend on the backend: the
    reference one is the cheap one on the CPU)."""
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        real = BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=BACKENDS["reference"]).to(dtype)
        out = real(**batch)
        sum(v.float().mean() for v in out.values() if v is not None).backward()
        runs[dtype] = out, {n: p.grad for n, p in real.named_parameters() if p.grad is not None}
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_fake_forward_backward_matches_real_shapes(batch, real_runs, backend, dtype):
    want, want_grads = real_runs[dtype]
    mode = fake_mode()
    model = fake_model(
        lambda: BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=BACKENDS[backend]), mode, dtype=dtype
    )
    assert all(isinstance(p, FakeTensor) for p in model.parameters())
    out = fake_forward_backward(model, batch, mode)
    for key in ("ce", "mse"):
        assert isinstance(out[key], FakeTensor)
        assert out[key].shape == want[key].shape and out[key].dtype == want[key].dtype
    got_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got_grads) == set(want_grads)
    for name, g in got_grads.items():
        assert isinstance(g, FakeTensor), name
        assert g.shape == want_grads[name].shape and g.dtype == want_grads[name].dtype, name


def test_fake_model_uses_no_parameter_memory():
    """A config whose real weights would need ~1.3 GB builds as fakes in no time and no memory."""
    cfg = BagelConfig.tiny(llm_hidden=2048, llm_heads=16, llm_kv_heads=4, llm_layers=16, vocab_size=32000)
    mode = fake_mode()
    model = fake_model(lambda: BagelForUnifiedMultimodal(cfg), mode, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert n > 5e8
    assert all(isinstance(p, FakeTensor) and p.dtype == torch.bfloat16 for p in model.parameters())


def test_plain_forward_inside_the_mode(batch):
    """``model(**batch)`` itself runs inside the mode too: the value checks, which have no values to
    read there, are skipped (fake_forward_backward validates on the real batch first)."""
    mode = fake_mode()
    model = fake_model(
        lambda: BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=BACKENDS["triton"]), mode
    )
    with mode:
        out = model(**batch)
        (out["ce"].mean() + out["mse"].mean()).backward()
    assert isinstance(out["ce"], FakeTensor) and out["ce"].shape == (batch["ce_loss_indexes"].numel(),)
    assert all(isinstance(p.grad, FakeTensor) for p in model.parameters() if p.grad is not None)

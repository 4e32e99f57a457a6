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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_fake_forward_backward_matches_real_shapes(batch, backend, dtype):
    real = BagelForUnifiedMultimodal(BagelConfig.tiny(), backend=BACKENDS[backend]).to(dtype)
    want = real(**batch)
    sum(v.float().mean() for v in want.values() if v is not None).backward()

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
    want_grads = {n: p.grad for n, p in real.named_parameters() if p.grad is not None}
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

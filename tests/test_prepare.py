"""bagel.model.prepare: the forward's inputs declared once, the preparation's result kinds, and validation read
back from the device ONCE per forward.

Host reads are counted on CPU with a dispatch mode that sees every operation reading tensor values back
to the host (``item`` / ``bool`` / ``int`` on a tensor, ``nonzero`` and other ops whose output size depends
on the values: each a device synchronisation on a GPU) plus ``Tensor.tolist`` / ``Tensor.numpy``, which do
not dispatch. A forward with valid input reads back exactly once (all value checks together); a second
validation sync that creeps back fails these tests.
"""

from __future__ import annotations

import inspect
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bagel import (
    BagelBackendConfig,
    BagelConfig,
    BagelForUnifiedMultimodal,
    Qwen2ForCausalLMReference,
    pack_samples,
    synthetic_samples,
)
from bagel.model.prepare import GroupedPack, PackInputs, PreparedPack, ReferencePack
from bagel.model.qwen2 import PackContext, prepare_routing
from bagel_kernels import PackedMask, mot

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
_READ_BACK_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique2"}


class HostReads(TorchDispatchMode):
    """Records every read of tensor values by the host while active (``where`` holds a short stack)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    def _note(self, what: str) -> None:
        stack = [f"{f.name}:{f.lineno}" for f in traceback.extract_stack()[-6:-2]]
        self.where.append(f"{what} at {' <- '.join(reversed(stack))}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in _READ_BACK_OPS:
            self._note(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = torch.Tensor.tolist, torch.Tensor.numpy
        tolist, numpy = self._saved
        torch.Tensor.tolist = lambda t, *a, **k: self._note("tolist") or tolist(t, *a, **k)
        torch.Tensor.numpy = lambda t, *a, **k: self._note("numpy") or numpy(t, *a, **k)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
        return super().__exit__(*exc)


def _model(attention="sdpa", mot_backend="torch", lm_cls=None, cfg=None) -> BagelForUnifiedMultimodal:
    torch.manual_seed(0)
    cfg = BagelConfig.tiny(llm_layers=1, vit_layers=1) if cfg is None else cfg
    be = BagelBackendConfig(attention=attention, mot=mot_backend, patch_embed="torch")
    model = BagelForUnifiedMultimodal(cfg, backend=be, language_model_cls=lm_cls)
    model.initialize_weights()
    return model


def _batch(config, kinds=("und", "t2i", "edit"), seed=0, pad=200) -> dict:
    batch = pack_samples(
        synthetic_samples(list(kinds), config, seed=seed), config, max_num_tokens=pad, rng=seed
    )
    # the ViT's image lengths are host metadata the mask is built from (a tensor in the upstream API):
    # given as a list, every host read left in the forward is validation
    batch["vit_token_seqlens"] = batch["vit_token_seqlens"].tolist()
    return batch


# ---------------------------------------------------------------------------------------------- the inputs
def test_forward_signature_is_pack_inputs():
    """``forward`` keeps the documented signature and ``PackInputs`` declares the same inputs, in the same
    order, with the same defaults: the two cannot drift apart."""
    params = list(inspect.signature(BagelForUnifiedMultimodal.forward).parameters.values())[1:]
    fields = list(inspect.signature(PackInputs).parameters.values())
    assert [(p.name, p.default) for p in params] == [(f.name, f.default) for f in fields]
    assert PackInputs.NAMES == tuple(p.name for p in params)
    assert len(params) == 21


def test_prepare_pack_takes_arguments_or_pack_inputs_and_says_its_path():
    model = _model()
    batch = _batch(model.config)
    torch.manual_seed(3)
    by_kwargs = model.prepare_pack(**batch)
    torch.manual_seed(3)
    by_inputs = model.prepare_pack(PackInputs(**batch))
    assert isinstance(by_kwargs, GroupedPack) and isinstance(by_kwargs, PreparedPack)
    assert isinstance(by_kwargs.lm, PackContext) and by_kwargs.lm_args is None
    for key in ("ce", "mse"):
        assert torch.equal(model.forward_prepared(by_kwargs)[key], model.forward_prepared(by_inputs)[key])
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        model.prepare_pack(**batch, nonsense=1)

    ref = _model(lm_cls=Qwen2ForCausalLMReference)
    pack = ref.prepare_pack(**batch)
    assert isinstance(pack, ReferencePack) and pack.lm is None
    assert pack.lm_args[0] == batch["sample_lens"] and isinstance(pack.lm_args[1], PackedMask)


# ---------------------------------------------------------------------------------------------- one read-back
@pytest.mark.parametrize(
    "attention,mot_backend",
    [
        ("sdpa", "torch"),
        pytest.param("triton", "triton", marks=pytest.mark.skipif(not TRITON, reason="Triton")),
    ],
)
def test_forward_validates_with_one_host_read(attention, mot_backend):
    """A stage-2 pack with every input kind (text, ViT, clean and noised VAE tokens, CE and MSE, a pad
    sample): the forward reads tensor values back once (every value check together), the backward never."""
    model = _model(attention, mot_backend)
    batch = _batch(model.config)
    with HostReads() as reads:
        out = model(**batch)
    assert len(reads.where) == 1, reads.where
    with HostReads() as reads:
        (out["ce"].mean() + out["mse"].mean()).backward()
    assert reads.where == []


def test_bad_input_still_raises_after_the_one_read():
    """The one read-back still catches what the four checks caught: an overlap of the index sets, and a
    sequence_length that cuts a full split (pad rows must form whole splits)."""
    model = _model()
    batch = _batch(model.config)
    bad = dict(batch)
    bad["packed_vae_token_indexes"] = torch.cat(
        [batch["packed_vae_token_indexes"][:-1], batch["packed_text_indexes"][:1]]
    )
    with HostReads() as reads, pytest.raises(ValueError, match="overlap"):
        model(**bad)
    assert len(reads.where) == 1, reads.where
    cut = dict(batch)
    cut["split_lens"] = batch["split_lens"][:-2] + [batch["split_lens"][-2] + batch["split_lens"][-1]]
    cut["attn_modes"] = batch["attn_modes"][:-2] + ["full"]
    cut["sample_lens"] = batch["sample_lens"][:-2] + [batch["sample_lens"][-2] + batch["sample_lens"][-1]]
    with pytest.raises(ValueError, match="cuts the pack inside an attention span"):
        model(**cut)


@pytest.mark.parametrize(
    "mot_backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="Triton"))]
)
def test_language_model_forward_train_validates_with_one_host_read(mot_backend):
    """``Qwen2ForCausalLM.forward_train`` on its own (routing, mask cut, grouping, row index, permutation
    in and out): one read-back in the forward, none in the backward."""
    model = _model(mot_backend=mot_backend)
    lm = model.model.language_model
    batch = _batch(model.config)
    L = batch["sequence_length"]
    mask = PackedMask.from_splits(batch["sample_lens"], batch["split_lens"], batch["attn_modes"])
    und = torch.cat([batch["packed_text_indexes"], batch["packed_vit_token_indexes"]])
    x = torch.randn(L, model.hidden_size, requires_grad=True)
    with HostReads() as reads:
        y = lm.forward_train(
            x,
            batch["sample_lens"],
            mask,
            batch["packed_position_ids"],
            und,
            batch["packed_vae_token_indexes"],
        )
    assert len(reads.where) == 1, reads.where
    with HostReads() as reads:
        y.square().sum().backward()
    assert reads.where == []


def test_prepare_routing_reads_once_and_keeps_its_errors():
    L = 10
    gen = torch.tensor([1, 4, 7])
    with HostReads() as reads:
        und, g = prepare_routing(L, None, gen, "cpu")  # und: every token not in gen, without nonzero
    assert len(reads.where) == 1, reads.where
    assert und.tolist() == [0, 2, 3, 5, 6, 8, 9] and g.tolist() == [1, 4, 7]
    with pytest.raises(
        ValueError, match=r"packed_und_token_indexes \(7\) and packed_gen_token_indexes \(4\)"
    ):
        prepare_routing(L, None, torch.tensor([1, 4, 7, 7]), "cpu")
    with pytest.raises(ValueError, match="packed_gen_token_indexes has entries outside"):
        prepare_routing(L, None, torch.tensor([1, 12]), "cpu")
    with pytest.raises(ValueError, match="overlap"):
        prepare_routing(L, torch.tensor([0, 1, 2, 3, 5, 6, 8]), gen, "cpu")


def test_validated_grouping_computes_what_the_checked_paths_compute():
    """The grouping the model builds after its one read-back (GroupedOrder.from_checked, group_rows,
    ungroup_rows, with_row_index(order)) gives bit for bit what the checked functions give, and reads
    nothing back; the checked ones keep refusing bad input."""
    und, gen = torch.tensor([0, 2, 3, 5]), torch.tensor([1, 4])
    assert not mot.GroupedOrder.partition_flags(und, gen, 6).any()
    assert mot.GroupedOrder.partition_flags(und, torch.tensor([1, 1]), 6).any()
    with HostReads() as reads:
        order = mot.GroupedOrder.from_checked(und, gen, 6)
    assert reads.where == []
    checked = mot.grouped_order(und, gen, 6)
    assert all(torch.equal(a, b) for a, b in zip(order[:2], checked[:2], strict=True))
    backends = ["torch"] + (["triton"] if TRITON else [])
    und, gen = torch.arange(0, 37, 2), torch.arange(1, 37, 2)
    order = mot.GroupedOrder.from_checked(und, gen, 37)
    for backend in backends:
        x1 = torch.randn(37, 5, 3, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_()
        g = torch.randn(37, 5, 3)
        y1 = mot.permute_rows(x1, order.perm, backend=backend)
        with HostReads() as reads:
            y2 = mot.group_rows(x2, order, backend=backend)
            y2.backward(g)
            back = mot.ungroup_rows(y2.detach(), order, backend=backend)
        assert reads.where == [], (backend, reads.where)
        y1.backward(g)
        assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad) and torch.equal(back, x1.detach()), (
            backend
        )
        with pytest.raises(ValueError, match="not a permutation"):
            mot.permute_rows(x1, torch.zeros(37, dtype=torch.long), backend=backend)
    mask = PackedMask.from_splits([6, 4], [2, 4, 4], ["causal", "full", "causal"])
    with pytest.raises(ValueError, match="not a permutation"):
        mask.with_row_index(torch.zeros(10, dtype=torch.long))
    order = mot.GroupedOrder.from_checked(torch.tensor([0, 1, 2, 3, 6, 7]), torch.tensor([4, 5, 8, 9]), 10)
    assert torch.equal(mask.with_row_index(order).row_index, mask.with_row_index(order.inv).row_index)

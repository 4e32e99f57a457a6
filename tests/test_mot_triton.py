"""MoT Triton kernels (``bagel_kernels.mot_triton``) at edges the API accepts: eps = 0.

With eps = 0, padded lanes (rows beyond a program's segment, heads beyond the head count) have
rsqrt(0) = inf, and inf * 0 = NaN once they reach a sum: they must contribute exactly zero, so that
the weight and cos/sin gradients equal the float64 reference.
"""

from __future__ import annotations

import torch

from bagel_kernels import mot, reference
from bagel_kernels.testing import tolerance


def _close(actual, expected, dtype, direction, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    atol, rtol = tolerance(dtype, direction)
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def test_rms_norm_eps_zero_gradients_finite():
    n, h, n_und = 45, 97, 17  # 45 rows: the backward programs' last row blocks are partly padding
    x = torch.randn(n, h).requires_grad_()
    wu = (1 + 0.5 * torch.randn(h)).requires_grad_()
    wg = (1 + 0.5 * torch.randn(h)).requires_grad_()
    y = mot.mot_rms_norm(x, n_und, wu, wg, 0.0, backend="triton")
    g = torch.randn(n, h)
    y.backward(g)
    x64, wu64, wg64 = (t.detach().double().requires_grad_() for t in (x, wu, wg))
    ref = reference.mot_rms_norm_reference(x64, n_und, wu64, wg64, 0.0)
    ref.backward(g.double())
    _close(y, ref, torch.float32, "fwd", "y")
    for name, a, b in (
        ("dx", x.grad, x64.grad),
        ("dw_und", wu.grad, wu64.grad),
        ("dw_gen", wg.grad, wg64.grad),
    ):
        _close(a, b, torch.float32, "bwd", name)


def test_qk_norm_rope_eps_zero_gradients_finite():
    n, hq, hkv, d, n_und = 29, 3, 1, 72, 11  # 3 and 1 heads pad to 4 and 1 lanes; 36 halves pad to 64
    q = torch.randn(n, hq, d).requires_grad_()
    k = torch.randn(n, hkv, d).requires_grad_()
    ws = [(1 + 0.3 * torch.randn(d)).requires_grad_() for _ in range(4)]
    cos, sin = mot.rope_cos_sin(torch.randint(0, 4096, (n,)), d, 1e6)
    cos, sin = cos.requires_grad_(), sin.requires_grad_()
    qo, ko = mot.mot_qk_norm_rope(q, k, n_und, *ws, cos, sin, 0.0, backend="triton")
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    ((qo * gq).sum() + (ko * gk).sum()).backward()
    ins = [q, k, *ws, cos, sin]
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    qr, kr = reference.mot_qk_norm_rope_reference(
        ins64[0], ins64[1], n_und, *ins64[2:6], ins64[6], ins64[7], 0.0
    )
    ((qr * gq.double()).sum() + (kr * gk.double()).sum()).backward()
    _close(qo, qr, torch.float32, "fwd", "q_out")
    _close(ko, kr, torch.float32, "fwd", "k_out")
    names = ["q", "k", "q_weight_und", "q_weight_gen", "k_weight_und", "k_weight_gen", "cos", "sin"]
    for name, a, b in zip(names, ins, ins64, strict=True):
        _close(a.grad, b.grad, torch.float32, "bwd", f"d{name}")

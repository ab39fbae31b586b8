"""``approxbp::grouped_mm_shared``: a grouped (per-expert) matmul on gathered rows of a norm's output.

References: a grouped matmul written as one ``mm`` per expert with plain autograd (float64 where the
model's op supports it), ``F.rms_norm``/``F.layer_norm`` for the norm, torch's dropout with the same seed;
the bytes kept are computed from shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from approxbp_fx import saved_activation_bytes
from approxbp_fx.ops import grouped_mm_shared, ms_layer_norm, ms_rms_norm
from approxbp_fx.ops.dropout import dropout_packed, dropout_scale

D, N, E = 16, 8, 3


def grouped_reference(rows, weight, offs):
    """One mm per expert on rows offs[e-1]:offs[e]; rows past offs[-1] give zeros."""
    parts, start = [], 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            parts.append(rows[start:end] @ weight[e])
        start = max(start, end)
    parts.append(rows.new_zeros(rows.shape[0] - start, weight.shape[2]))
    return torch.cat(parts)


def _transformers_impl() -> bool:
    try:
        import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)
    except ImportError:
        return False
    return hasattr(torch.ops.transformers, "grouped_mm_fallback")


@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("trailing", [False, True], ids=["all_rows", "rows_past_offs"])
def test_matches_autograd_float64(rms, dropout, trailing):
    """norm -> rows z[index] -> [dropout] -> grouped matmul: output and every gradient equal plain
    autograd's in float64 (transformers' mm loop runs in float64; torch._grouped_mm does not)."""
    if not _transformers_impl():
        pytest.skip("transformers' grouped_mm_fallback is not installed")
    p = 0.3
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(D, dtype=torch.float64) + 0.5).requires_grad_()
    beta = None if rms else (torch.rand(D, dtype=torch.float64) - 0.5).requires_grad_()
    weight = torch.randn(E, D, N, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([9, 0, 3, 3, 7, -1, 2, 5, 0, 4, 8, 1])  # repeated and negative rows, as advanced indexing allows
    # expert 1 gets no rows; with trailing, the last 2 rows belong to no expert
    offs = torch.tensor([4, 4, index.numel() - (2 if trailing else 0)], dtype=torch.int32)
    params = [t for t in (x, gamma, beta, weight) if t is not None]

    def reference():
        z = F.rms_norm(x, (D,), gamma, 1e-6) if rms else F.layer_norm(x, (D,), gamma, beta)
        rows = z.reshape(-1, D)[index]
        torch.manual_seed(3)
        return grouped_reference(F.dropout(rows, p, True) if dropout else rows, weight, offs)

    def ours():
        n = ms_rms_norm(x, D, gamma, 1e-6) if rms else ms_layer_norm(x, D, gamma, beta)
        rows, mask = n.z.reshape(-1, D)[index], None
        torch.manual_seed(3)
        if dropout:
            rows, mask = dropout_packed(rows, p)
        return grouped_mm_shared(rows, n.y_hat, weight, offs, index, gamma, beta, mask=mask,
                                 mask_scale=dropout_scale(p, x.dtype) if dropout else 1.0, impl="transformers")

    grad = torch.randn(index.numel(), N, dtype=torch.float64)
    expected, actual = reference(), ours()
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for e, a in zip(torch.autograd.grad(expected, params, grad), torch.autograd.grad(actual, params, grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_aten_forward_is_the_models_and_gradients_match():
    """impl="aten": the forward is torch._grouped_mm's bit for bit; gradients (float32) match the mm loop."""
    x = torch.randn(4, 8, D, requires_grad=True)
    gamma = (torch.rand(D) + 0.5).requires_grad_()
    weight = torch.randn(E, D, N, requires_grad=True)
    index = torch.randperm(32)[:24]
    offs = torch.tensor([10, 10, 24], dtype=torch.int32)

    n = ms_rms_norm(x, D, gamma, 1e-6)
    rows = n.z.reshape(-1, D)[index]
    out = grouped_mm_shared(rows, n.y_hat, weight, offs, index, gamma, impl="aten")
    assert torch.equal(out, torch._grouped_mm(rows.detach(), weight.detach(), offs=offs))
    ref = grouped_reference(F.rms_norm(x, (D,), gamma, 1e-6).reshape(-1, D)[index], weight, offs)
    grad = torch.randn_like(ref)
    for e, a in zip(torch.autograd.grad(ref, (x, gamma, weight), grad), torch.autograd.grad(out, (x, gamma, weight), grad)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_frozen_weight_gives_input_gradients_only():
    x = torch.randn(12, D, requires_grad=True)
    weight = torch.randn(E, D, N)  # frozen
    offs = torch.tensor([3, 8, 12], dtype=torch.int32)
    n = ms_layer_norm(x, D)
    out = grouped_mm_shared(n.z, n.y_hat, weight, offs, impl="aten")
    ref = grouped_reference(F.layer_norm(x, (D,)), weight, offs)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0],
                               rtol=1e-4, atol=1e-5)


def test_keeps_y_hat_not_the_rows():
    """Kept for backward: y_hat and rstd (norm), the index, and nothing of the gathered rows."""
    x = torch.randn(64, D, requires_grad=True)
    weight = torch.randn(E, D, N, requires_grad=True)
    index = torch.randint(0, 64, (128,))
    offs = torch.tensor([40, 90, 128], dtype=torch.int32)

    def run():
        n = ms_layer_norm(x, D)
        return grouped_mm_shared(n.z[index], n.y_hat, weight, offs, index, impl="aten")

    kept = saved_activation_bytes(run, exclude=[x, weight])
    y_hat, rstd = 64 * D * 4, 64 * 4
    assert kept <= y_hat + rstd + index.numel() * 8 + offs.numel() * 4, kept
    rows = 128 * D * 4  # what the gather feeding a plain grouped matmul keeps: more than everything above
    assert kept < rows


def test_opcheck():
    x = torch.randn(12, D)
    n = ms_layer_norm(x, D)
    weight = torch.randn(E, D, N, requires_grad=True)
    index = torch.tensor([0, 5, 5, 11, 2, 3, 7, 1])
    rows = n.z[index].detach().requires_grad_()
    offs = torch.tensor([2, 2, 8], dtype=torch.int32)
    torch.library.opcheck(torch.ops.approxbp.grouped_mm_shared.default,
                          (rows, n.y_hat.detach(), index, weight, offs, None, None, 0.0, None, 1.0, "aten"))


def test_bad_arguments_raise():
    n = ms_layer_norm(torch.randn(6, D), D)
    weight, offs = torch.randn(E, D, N), torch.tensor([2, 4, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="impl must be"):
        grouped_mm_shared(n.z, n.y_hat, weight, offs, impl="cutlass")
    with pytest.raises(ValueError, match="rows .* are not 4 rows"):
        grouped_mm_shared(n.z, n.y_hat, weight, offs, index=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="offs must be"):
        grouped_mm_shared(n.z, n.y_hat, weight, offs.float())
    with pytest.raises(TypeError, match="index must be"):
        grouped_mm_shared(n.z, n.y_hat, weight, offs, index=torch.zeros(6))
    with pytest.raises(ValueError, match=r"weight \[E, D, N\]"):
        grouped_mm_shared(n.z, n.y_hat, weight[0], offs)

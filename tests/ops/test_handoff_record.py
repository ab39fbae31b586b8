"""The record by which a norm's output carries its y_hat to the next graph (``approxbp_fx/ops/handoff.py``)."""

from __future__ import annotations

import gc
import weakref

import torch

from approxbp_fx.ops import handoff


def _norm_output(requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(3, 8, requires_grad=requires_grad)
    w, b = torch.randn(8), torch.randn(8)
    y_hat = torch.nn.functional.layer_norm(x, (8,))
    return y_hat * w + b, y_hat, w, b


def test_received_gives_what_was_published_for_that_object_only():
    z, y_hat, w, b = _norm_output()
    handoff.publish(z, y_hat, w, b, 0.5)
    y, w2, b2, offset = handoff.received(z)
    assert y is y_hat and w2 is w and b2 is b and offset == 0.5
    same_values = z.detach().clone().requires_grad_()
    assert handoff.received(same_values) == (same_values, None, None, 0.0)


def test_changed_in_place_after_publishing_is_a_miss():
    z, y_hat, w, b = _norm_output()
    handoff.publish(z, y_hat, w, b, 0.0)
    with torch.no_grad():
        z.mul_(2)  # z no longer equals affine(y_hat)
    assert handoff.received(z)[0] is z


def test_forgotten_once_the_norm_backward_ran():
    z, y_hat, w, b = _norm_output()
    handoff.publish(z, y_hat, w, b, 0.0)
    z.sum().backward()
    assert handoff.received(z)[0] is z  # y_hat must not outlive what the norm's graph keeps


def test_record_keeps_neither_z_nor_y_hat_alive():
    z, y_hat, w, b = _norm_output()
    handoff.publish(z, y_hat, w, b, 0.0)
    z_ref, y_ref = weakref.ref(z), weakref.ref(y_hat)
    del z, y_hat
    gc.collect()
    assert z_ref() is None and y_ref() is None


def test_output_without_gradient_is_not_recorded():
    z, y_hat, w, b = _norm_output(requires_grad=False)
    handoff.publish(z, y_hat, w, b, 0.0)
    assert handoff.received(z)[0] is z

"""``saved_activation_bytes`` against byte counts done by hand from what eager autograd keeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from approxbp_fx import saved_activation_bytes, saved_tensors

BATCH, D_IN, HIDDEN, D_OUT = 5, 8, 16, 3
FP32 = 4


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, D_OUT),
    )


def test_three_layer_mlp_hand_count():
    # Eager autograd on a 2-D input (linear = addmm):
    #   linear1 keeps its input x (its weight needs a grad)      BATCH * D_IN
    #   relu1   keeps its output h1                              BATCH * HIDDEN
    #   linear2 keeps its input h1: the same storage, not again
    #   relu2   keeps its output h2                              BATCH * HIDDEN
    #   linear3 keeps its input h2: the same storage, not again
    #   weights kept by the linears are parameters: not counted
    x = torch.randn(BATCH, D_IN)
    expected = (BATCH * D_IN + 2 * BATCH * HIDDEN) * FP32
    assert saved_activation_bytes(mlp(), x) == expected == 800


def test_three_layer_mlp_3d_input():
    # a [2, BATCH, D_IN] input goes through matmul's view/reshape path; views of one storage count once
    x = torch.randn(2, BATCH, D_IN)
    assert saved_activation_bytes(mlp(), x) == 2 * (BATCH * D_IN + 2 * BATCH * HIDDEN) * FP32


def test_frozen_first_layer_keeps_no_input():
    model = mlp()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    x = torch.randn(BATCH, D_IN)
    # linear1 needs neither its input (weight frozen) nor anything else: x is not kept
    assert saved_activation_bytes(model, x) == 2 * BATCH * HIDDEN * FP32


def test_parameters_are_excluded():
    model = mlp()
    x = torch.randn(BATCH, D_IN, requires_grad=True)  # now the first linear also keeps its weight
    kept = saved_tensors(model, x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(t.untyped_storage().data_ptr() in params for t in kept)
    assert saved_activation_bytes(model, x) == (BATCH * D_IN + 2 * BATCH * HIDDEN) * FP32


def test_buffers_are_excluded():
    # training-mode batch norm keeps x, weight, running_mean, running_var, save_mean, save_invstd
    bn = nn.BatchNorm1d(D_IN)
    x = torch.randn(BATCH, D_IN, requires_grad=True)
    activations = (BATCH * D_IN + 2 * D_IN) * FP32  # x, save_mean, save_invstd
    assert saved_activation_bytes(bn, x) == activations
    # seen through a plain function, the weight and both running stats are counted too
    assert saved_activation_bytes(lambda t: bn(t), x) == activations + 3 * D_IN * FP32


def test_exclude_modules_and_tensors():
    lin = nn.Linear(D_IN, HIDDEN)
    x = torch.randn(BATCH, D_IN, requires_grad=True)

    def fn(t):  # a plain function: the meter cannot know lin's weight is a parameter
        return lin(t)

    x_bytes, w_bytes = BATCH * D_IN * FP32, HIDDEN * D_IN * FP32
    assert saved_activation_bytes(fn, x) == x_bytes + w_bytes
    assert saved_activation_bytes(fn, x, exclude=[lin]) == x_bytes
    assert saved_activation_bytes(fn, x, exclude=[lin.weight]) == x_bytes
    assert saved_activation_bytes(fn, x, exclude=[x]) == w_bytes
    assert saved_activation_bytes(fn, x, exclude=(lin, x)) == 0


def test_views_of_one_storage_count_once():
    x = torch.randn(8, 4, requires_grad=True)

    def fn(t):
        a = t * 2  # a fresh [8, 4] storage
        return a[:4] * a[4:]  # mul keeps both halves: two views of a

    assert saved_activation_bytes(fn, x) == 8 * 4 * FP32


def test_kwargs_are_forwarded():
    x = torch.randn(3, 7, requires_grad=True)
    assert saved_activation_bytes(torch.nn.functional.gelu, x, approximate="tanh") == 3 * 7 * FP32


@pytest.mark.parametrize("bad", [[3], ["weight"], [None], "abc"])
def test_bad_exclude_raises_type_error(bad):
    with pytest.raises(TypeError):
        saved_activation_bytes(mlp(), torch.randn(BATCH, D_IN), exclude=bad)

"""``F.multi_head_attention_forward`` as a consumer of a norm's output: its in-projection shares y_hat.

Dynamo keeps ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``) as one opaque call of
``F.multi_head_attention_forward``, whose in-projection keeps its own copy of the query (the norm's output)
for the projection weight's gradient. The norm family splits the call where the query (and for
self-attention key and value, the same tensor) is the norm's output:

    before:  z = layer_norm(x); query = z.transpose(1, 0)
             out = F.multi_head_attention_forward(query, query, query, E, H, in_proj_weight, ...)
    after:   proj = approxbp::linear_shared(query, y_hat.transpose(1, 0), in_proj_weight, in_proj_bias, ...)
             out = mha_after_projection(proj, None, None, "qkv", H, out_proj_weight, ...)

The projections are torch's own (``_in_projection_packed``: one linear of the packed weight when query,
key and value are one tensor, ``w[:E]`` and ``w[E:]`` when key is value, ``w.chunk(3)`` otherwise;
``_in_projection`` with ``use_separate_proj_weight``), each a ``linear_shared`` where it reads the norm's
output and a plain linear where it reads another tensor (cross attention's key and value).
``mha_after_projection`` is the rest of torch's function, op for op, so the output is torch's bit for bit.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from ._graph import is_call, value

__all__ = ["MhaCall", "mha_in_projection", "mha_after_projection", "emit"]

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


@dataclass
class MhaCall:
    """A call of ``F.multi_head_attention_forward`` the rewrite can split (arguments as bound by its signature)."""

    args: dict[str, Any]
    layout: str  # "qkv": one projection of the packed weight; "kv": q and packed kv; "": three projections
    inputs: tuple[Any, Any, Any]  # query, key, value
    weights: tuple[Any, Any, Any]  # the three projections' weights: nodes, or (packed weight, start, stop)
    biases: tuple[Any, Any, Any]  # the same for biases (None: no bias)


def _bind(u: fx.Node) -> dict[str, Any] | None:
    try:
        bound = _SIGNATURE.bind(*u.args, **u.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def mha_in_projection(u: fx.Node, cur: fx.Node) -> MhaCall | str | None:
    """u as an MHA call whose in-projection reads cur: what the rewrite needs, or the reason it cannot split
    the call, or None when u is no MHA call reading cur."""
    if not is_call(u, (F.multi_head_attention_forward,)):
        return None
    a = _bind(u)
    if a is None:
        return f"{u.name}: arguments of multi_head_attention_forward this rewrite does not read"
    query, key, val = a["query"], a["key"], a["value"]
    if not any(t is cur for t in (query, key, val)):
        return f"{u.name} reads the output as something other than query, key or value"
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            return f"{u.name} has {name}"
    if a["add_zero_attn"] is not False:
        return f"{u.name} adds zero attention"
    for name in ("need_weights", "training", "average_attn_weights", "is_causal", "use_separate_proj_weight"):
        if not isinstance(a[name], bool):
            return f"{u.name}: {name} is known only at run time"
    for name in ("embed_dim_to_check", "num_heads"):
        if not isinstance(a[name], int):
            return f"{u.name}: {name} is known only at run time"
    if not isinstance(a["dropout_p"], (int, float)):
        return f"{u.name}: dropout_p is known only at run time"
    qv = value(query)
    if qv is None or qv.dim() != 3:
        return f"{u.name}: unbatched (2-D) or unknown query"  # torch unsqueezes it, and q is k no longer holds
    e = qv.shape[-1]
    bias = a["in_proj_bias"]
    thirds = tuple((bias, i * e, (i + 1) * e) if bias is not None else None for i in range(3))
    if a["use_separate_proj_weight"]:
        weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
        if any(not isinstance(w, fx.Node) for w in weights):
            return f"{u.name}: separate projection weights missing"
        return MhaCall(a, "", (query, key, val), weights, thirds)
    w = a["in_proj_weight"]
    if not isinstance(w, fx.Node):
        return f"{u.name}: no in_proj_weight"
    if key is val and query is key:
        return MhaCall(a, "qkv", (query, None, None), (w, None, None), (bias, None, None))
    if key is val:  # torch's w.split([E, 2E]): q from the first E rows, k and v from the rest
        return MhaCall(a, "kv", (query, key, None), ((w, 0, e), (w, e, 3 * e), None),
                       ((bias, 0, e) if bias is not None else None, (bias, e, 3 * e) if bias is not None else None,
                        None))
    return MhaCall(a, "", (query, key, val), tuple((w, i * e, (i + 1) * e) for i in range(3)), thirds)


def emit(edit: Any, u: fx.Node, call: MhaCall, cur: fx.Node, shared_linear: Callable[[Any, Any], fx.Node]) -> fx.Node:
    """The nodes replacing u (insert before u): each projection, ``shared_linear(weight, bias)`` where it
    reads cur and a plain linear elsewhere, then ``mha_after_projection``. Returns the node standing for u."""

    def part(ref: Any) -> Any:
        if isinstance(ref, tuple):  # rows [start, stop) of the packed tensor: the view torch's split gives
            return edit.call(operator.getitem, (ref[0], slice(ref[1], ref[2])))
        return ref

    projections = []
    for inp, w, b in zip(call.inputs, call.weights, call.biases):
        if inp is None:
            projections.append(None)
            continue
        w, b = part(w), part(b)
        projections.append(shared_linear(w, b) if inp is cur else edit.call(F.linear, (inp, w, b)))
    a = call.args
    return edit.call(mha_after_projection, (
        *projections, call.layout, a["num_heads"], a["out_proj_weight"], a["out_proj_bias"], float(a["dropout_p"]),
        a["training"], a["key_padding_mask"], a["need_weights"], a["attn_mask"], a["average_attn_weights"],
        a["is_causal"], value(call.inputs[0]).dtype))


def _canonical_mask(mask: Tensor | None, target_type: torch.dtype) -> Tensor | None:
    """torch's ``_canonical_mask`` (less its warning): a bool mask becomes 0 / -inf of ``target_type``."""
    if mask is not None and not torch.is_floating_point(mask):
        if mask.dtype != torch.bool:
            raise AssertionError("only bool and floating types of masks are supported")
        mask = torch.zeros_like(mask, dtype=target_type).masked_fill_(mask, float("-inf"))
    return mask


def mha_after_projection(
    q: Tensor, k: Tensor | None, v: Tensor | None, layout: str, num_heads: int, out_proj_weight: Tensor,
    out_proj_bias: Tensor | None, dropout_p: float, training: bool, key_padding_mask: Tensor | None,
    need_weights: bool, attn_mask: Tensor | None, average_attn_weights: bool, is_causal: bool,
    query_dtype: torch.dtype,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` from its in-projection on, for batched input without bias_k/bias_v,
    zero attention or static keys: torch's code, in its order. ``layout`` says what q, k, v hold: "qkv" q is
    the packed projection [L, N, 3E], "kv" k the packed key-value projection [S, N, 2E], "" three projections.
    ``query_dtype`` is the query's dtype (the masks' dtype; a projection under autocast has another)."""
    if layout == "qkv":
        e = q.size(-1) // 3
        proj = q.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q, k, v = proj[0], proj[1], proj[2]
    elif layout == "kv":
        e = q.size(-1)
        kv = k.unflatten(-1, (2, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        k, v = kv[0], kv[1]
    tgt_len, bsz, embed_dim = q.shape
    head_dim = embed_dim // num_heads
    key_padding_mask = _canonical_mask(key_padding_mask, query_dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = _canonical_mask(attn_mask, query_dtype)
        if key_padding_mask is not None:
            is_causal = False
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0
    if need_weights:
        _b, _nt, e = q.shape
        q_scaled = q * math.sqrt(1.0 / float(e))
        if is_causal and attn_mask is None:
            raise AssertionError("FIXME: is_causal not implemented for need_weights")
        if attn_mask is not None:
            attn_output_weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            attn_output_weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        attn_output_weights = F.softmax(attn_output_weights, dim=-1)
        if dropout_p > 0.0:
            attn_output_weights = F.dropout(attn_output_weights, p=dropout_p)
        attn_output = torch.bmm(attn_output_weights, v)
        attn_output = attn_output.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        attn_output = F.linear(attn_output, out_proj_weight, out_proj_bias)
        attn_output = attn_output.view(tgt_len, bsz, attn_output.size(1))
        attn_output_weights = attn_output_weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            attn_output_weights = attn_output_weights.mean(dim=1)
        return attn_output, attn_output_weights
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    attn_output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    attn_output = attn_output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    attn_output = F.linear(attn_output, out_proj_weight, out_proj_bias)
    attn_output = attn_output.view(tgt_len, bsz, attn_output.size(1))
    return attn_output, None

"""``nn.MultiheadAttention`` traced through, its packed q/k/v projection a Linear site (``<mha>.in_proj``).

torch's MHA keeps q, k and v in one packed parameter (``in_proj_weight``) and runs
``F.multi_head_attention_forward``, whose Python control flow fx cannot trace: as one leaf call it gives
tuners nothing to attach to (PEFT wraps it in a layer of its own). The tracer instead records a
self-attention MHA (query is key is value; packed weights; no ``bias_k``/``bias_v``, no zero attention, no
dropout; no masks; ``need_weights=False``, as torchvision's ViT calls it) as the ops its forward computes
in training mode, op for op::

    qkv = in_proj(x)                    # PackedLinear: a Linear whose weight and bias ARE in_proj_weight/bias
    q, k, v = heads(qkv);  o = scaled_dot_product_attention(q, k, v);  out = out_proj(merge_heads(o))

so every kind attaches as on a timm ViT: LoRA and IA³ on ``in_proj`` (a fused qkv: ``slices`` work),
prefix tuning on the sdpa's keys and values, P-Prefix/P-Prompt through ``in_proj``, adapters and SSF on
``out_proj``. The view registers no parameter of its own, so state-dict keys stay the plain model's; it
says where its tensors live (:func:`state_key`) so a merge folds into ``in_proj_weight``. In eager eval
mode torch runs a fused kernel for the same attention instead (equal within float rounding); the graph
computes the training-mode ops in both modes. Any other MHA call stays one leaf module (tuners refuse it).
"""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

IN_PROJ = "in_proj"  # the view's name under the MHA's path


class PackedLinear(nn.Linear):
    """A Linear view of a packed projection: ``weight``/``bias`` are the owner's ``in_proj_weight``/``bias``."""

    fused_qkv = True  # q, k, v stacked on the output dim, as in a timm qkv Linear
    state_keys = {"weight": "in_proj_weight", "bias": "in_proj_bias"}  # relative to the owner's path

    def __init__(self, owner: nn.Module) -> None:
        nn.Module.__init__(self)
        self.__dict__["_owner"] = owner  # not a submodule: its tensors stay registered (and keyed) where they are
        w = self.weight
        self.in_features, self.out_features = int(w.shape[1]), int(w.shape[0])

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]  # the owner's tensor, read at each call
        return cast(nn.Parameter, self.__dict__["_owner"].in_proj_weight)

    @property
    def bias(self) -> nn.Parameter:  # type: ignore[override]
        return cast(nn.Parameter, self.__dict__["_owner"].in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def state_key(module: nn.Module, path: str, name: str) -> str:
    """The state-dict key of tensor ``name`` (weight, bias) of the layer at ``path``: ``path.name``, or where a
    view's tensors really live (``<mha>.in_proj_weight`` for ``<mha>.in_proj.weight``)."""
    keys = getattr(module, "state_keys", None)
    if isinstance(keys, dict) and name in keys:
        return f"{path.rpartition('.')[0]}.{keys[name]}".lstrip(".")
    return f"{path}.{name}"


_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def why_leaf(m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why this call of ``m`` stays one leaf module (None: it is traced through)."""
    try:
        bound = _SIGNATURE.bind(m, *args, **kwargs)
    except TypeError as e:
        return f"unexpected arguments ({e})"
    bound.apply_defaults()
    a = bound.arguments
    checks = [
        (a["query"] is a["key"] and a["key"] is a["value"], "it is not self-attention (query, key, value differ)"),
        (bool(m._qkv_same_embed_dim) and m.in_proj_weight is not None, "its q, k, v weights are not packed"),
        (m.bias_k is None and m.bias_v is None and not m.add_zero_attn, "it adds bias_k/bias_v or zero attention"),
        (float(m.dropout) == 0.0, "it has attention dropout (its graph would differ in train and eval mode)"),
        (a["key_padding_mask"] is None and a["attn_mask"] is None and not a["is_causal"], "it is called with a mask"),
        (a["need_weights"] is False, "it is called with need_weights=True"),
    ]
    return next((why for ok, why in checks if not ok), None)


def traced_forward(m: nn.MultiheadAttention) -> Any:
    """``m.forward`` as the ops ``F.multi_head_attention_forward`` runs for a self-attention call."""

    def forward(query: torch.Tensor, *_: Any, **__: Any) -> tuple[torch.Tensor, None]:
        x = query.transpose(1, 0) if m.batch_first else query  # (L, B, E)
        tgt_len, bsz, embed = x.size(0), x.size(1), m.embed_dim
        heads, hd = m.num_heads, m.head_dim
        proj = F.linear(x, m.in_proj_weight, m.in_proj_bias)  # becomes in_proj(x) (see expand_in_proj)
        proj = proj.unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q = proj[0].view(tgt_len, bsz * heads, hd).transpose(0, 1)
        k = proj[1].view(proj[1].size(0), bsz * heads, hd).transpose(0, 1)
        v = proj[2].view(proj[2].size(0), bsz * heads, hd).transpose(0, 1)
        src_len = k.size(1)
        q, k, v = q.view(bsz, heads, tgt_len, hd), k.view(bsz, heads, src_len, hd), v.view(bsz, heads, src_len, hd)
        o = F.scaled_dot_product_attention(q, k, v, None, 0.0, False)
        o = m.out_proj(o.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed))
        o = o.view(tgt_len, bsz, o.size(1))
        return (o.transpose(1, 0) if m.batch_first else o), None

    return forward


def expand_in_proj(graph: fx.Graph, paths: list[str]) -> None:
    """Each traced MHA's ``F.linear(x, in_proj_weight, in_proj_bias)`` becomes a call of ``<path>.in_proj``."""
    for path in paths:
        lin = next(
            n
            for n in graph.nodes
            if n.op == "call_function"
            and n.target is F.linear
            and isinstance(n.args[1], fx.Node)
            and n.args[1].target == f"{path}.in_proj_weight"
        )
        attrs = [a for a in lin.args[1:] if isinstance(a, fx.Node)]
        with graph.inserting_before(lin):
            call = graph.call_module(f"{path}.{IN_PROJ}", (lin.args[0],))
        call.meta = dict(lin.meta)
        lin.replace_all_uses_with(call)
        graph.erase_node(lin)
        for a in attrs:
            if not a.users:
                graph.erase_node(a)


def install_views(gm: fx.GraphModule, paths: list[str]) -> None:
    """The ``PackedLinear`` views the expanded graph calls, in ``gm`` only (the base model is not touched)."""
    for path in paths:
        gm.add_submodule(f"{path}.{IN_PROJ}", PackedLinear(gm.get_submodule(path)))

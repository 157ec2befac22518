"""Finding the parts of an attention inside a traced site: the q/k/v values (graph nodes, for the rewriter's
``kv_concat`` join) and the projection layers (module paths, for kinds that plan a tap through them)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from utune.graph.mha import IN_PROJ
from utune.graph.sites import Site

_SOFTMAX: set[object] = {F.softmax, torch.softmax}
_MATMUL: set[object] = {operator.matmul, torch.matmul, torch.bmm}


@dataclass
class AttentionCall:
    """The q/k/v values feeding one attention in the graph and where they are consumed."""

    form: str  # "sdpa" | "explicit"
    q: fx.Node
    k: fx.Node
    v: fx.Node
    k_user: fx.Node  # node that reads k (sdpa, or the transpose before q @ k^T)
    v_user: fx.Node  # node that reads v (sdpa, or attn @ v)
    mask: fx.Node | None = None  # sdpa attn_mask


def _is(node: fx.Node, fns: set[object], method: str) -> bool:
    if node.op == "call_function":
        try:
            return node.target in fns
        except TypeError:
            return False
    return node.op == "call_method" and node.target == method


def _sdpa_arg(node: fx.Node, i: int, name: str) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def find_attention(site: Site) -> AttentionCall | str:
    """The single attention computed inside ``site``, or a string saying why there is none."""
    sdpa = [n for n in site.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    if len(sdpa) == 1:
        n = sdpa[0]
        q, k, v = (_sdpa_arg(n, i, nm) for i, nm in enumerate(("query", "key", "value")))
        mask = _sdpa_arg(n, 3, "attn_mask")
        if _sdpa_arg(n, 5, "is_causal") is True:
            return "it is causal attention (is_causal=True)"
        if not all(isinstance(t, fx.Node) for t in (q, k, v)):
            return "its q/k/v are not graph values"
        return AttentionCall("sdpa", q, k, v, n, n, mask if isinstance(mask, fx.Node) else None)  # type: ignore[arg-type]
    if len(sdpa) > 1:
        return f"it holds {len(sdpa)} attention calls; select one attention module"
    soft = [n for n in site.nodes if _is(n, _SOFTMAX, "softmax")]
    if len(soft) != 1:
        return "no scaled_dot_product_attention and no single softmax inside (an attention utune cannot see into)"
    return _explicit(soft[0])


def _explicit(softmax: fx.Node) -> AttentionCall | str:
    # back from softmax to q @ k^T through ops whose other operands are constants
    node = softmax.args[0]
    while isinstance(node, fx.Node) and not _is(node, _MATMUL, "matmul"):
        tensors = [a for a in node.args[1:] if isinstance(a, fx.Node)]
        if tensors or not node.args or not isinstance(node.args[0], fx.Node):
            return "its attention scores get an additive bias or mask before softmax; use placement: parallel"
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return "cannot find q @ k^T before the softmax"
    q, kt = node.args[0], node.args[1]
    if not (isinstance(kt, fx.Node) and kt.op == "call_method" and kt.target == "transpose"):
        return "cannot find k^T (a transpose) in q @ k^T"
    k = kt.args[0]
    # forward from softmax to attn @ v through single-use ops (dropout, ...)
    node = softmax
    for _ in range(6):
        users = list(node.users)
        if len(users) != 1:
            break
        node = users[0]
        if _is(node, _MATMUL, "matmul") and node.args[0] is not None:
            v = node.args[1]
            if isinstance(v, fx.Node) and isinstance(q, fx.Node) and isinstance(k, fx.Node):
                return AttentionCall("explicit", q, k, v, kt, node)
            break
    return "cannot find attn @ v after the softmax"


_Q_NAMES = ("qkv", "q", "q_proj", "query", "to_q")
_KV_NAMES = {
    "qkv": ("qkv", "qkv"),
    "q": ("k", "v"),
    "q_proj": ("k_proj", "v_proj"),
    "query": ("key", "value"),
    "to_q": ("to_k", "to_v"),
}


@dataclass
class Projections:
    """Frozen projection layers of an attention, by module path, and how to slice a fused qkv."""

    q: str
    k: str
    v: str
    fused: bool
    dim: int
    num_heads: int


def find_projections(root: nn.Module, path: str) -> Projections | None:
    """The attention projections at or under ``path``, or under its parent block (for FFN/Block sites)."""
    candidates = [path]
    parts = path.split(".")
    while parts:
        parts = parts[:-1]
        candidates.append(".".join(parts))
        if len(candidates) > 3:
            break
    for base in candidates:
        try:
            mod = root.get_submodule(base) if base else root
        except AttributeError:
            continue
        for name, sub in mod.named_modules():
            leaf = name.rpartition(".")[2]
            if isinstance(sub, nn.MultiheadAttention) and sub._qkv_same_embed_dim:  # its packed view (graph.mha)
                packed = f"{base}.{name}.{IN_PROJ}".strip(".").replace("..", ".")
                return Projections(packed, packed, packed, True, int(sub.embed_dim), int(sub.num_heads))
            if leaf in _Q_NAMES and isinstance(sub, nn.Linear):
                owner_path = name.rpartition(".")[0]
                owner = mod.get_submodule(owner_path) if owner_path else mod
                heads = getattr(owner, "num_heads", None)
                prefix = f"{base}.{owner_path}".strip(".") if owner_path else base
                kname, vname = _KV_NAMES[leaf]
                if heads is None or (kname != "qkv" and not hasattr(owner, kname)):
                    continue
                fused = leaf == "qkv"
                dim = sub.out_features // 3 if fused else sub.out_features
                q, k, v = (f"{prefix}.{n}" if prefix else n for n in (leaf, kname, vname))
                return Projections(q, k, v, fused, dim, int(heads))
    return None


def pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """An sdpa mask over N keys -> over L + N keys, the ``length`` prepended keys always visible."""
    if mask.dtype == torch.bool:
        return F.pad(mask, (length, 0), value=True)
    return F.pad(mask, (length, 0), value=0.0)

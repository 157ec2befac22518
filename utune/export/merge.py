"""Folding tuners into the base weights (``utune export --merge``).

The merged state dict is keyed exactly like the plain backbone, so ``timm.create_model(name,
num_classes=K).load_state_dict(state, strict=True)`` loads it. It starts from the base model's own state
(which already holds trained ``trainable:`` parameters such as the head, shared with the tuned model)
and folds each tuner into copies of the weights of the layer it acts on; the live model is never changed.

Every foldable tuner is an affine map on the layer's input or output channels, applied to ``y = W x + b``:

- per-channel ``y <- s ⊙ y + t`` (SSF, IA³, BitFit ``bias``):    ``W' = s[:, None] W``, ``b' = s ⊙ b + t``;
  on a norm layer the same on its affine weight and bias;
- ``y <- y + ΔW x + c`` (LoRA ``ΔW = (alpha/r) B A``, a linear adapter beside the layer): ``W' = W + ΔW``;
- ``y <- A y + c`` (a linear adapter after the layer, ``A = I + s ⊙ W_up W_down``): ``W' = A W``, ``b' = A b + c``.

Where the tuner sits is read from the graph: walking back from the value the tuner changes, through
earlier tuners on the same value, ``Identity`` and ``Dropout`` (the identity in eval mode, which is what a
merged model is for), to the one base layer that produced it. Several tuners on one layer fold in graph
order (the order they act on the value), whatever the order of their rules. The fold is refused, with the
reason, when the tuner reads anything but the layer's own input or output, when the layer's output is also
used elsewhere, when the layer is called more than once, or when the layer cannot hold the result (a shift
on a layer without a bias, a channel mix on a norm, a non-linear adapter).

Reading the graph (:func:`locate`) is generic; the math is the tuner module's own ``fold(layer, tap)``
(in its kind's file), built from the moves of :class:`utune.tuners.fold.Layer`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from utune.errors import ExportError
from utune.export._sites import TunerSite, refusal, tuner_sites
from utune.graph.rewrite import TUNER_ROOT
from utune.tuners.fold import Layer, NotMergeable, f64, layer_kind

TUNERS_ONLY_HINT = "export the tuners with --tuners-only instead (`utune apply SPEC --tuners FILE` loads them back)"


# ---- the graph around a tuner ------------------------------------------------------------------------


class _Graph:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.calls: dict[str, list[fx.Node]] = {}
        self.attrs: list[str] = []
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.calls.setdefault(str(n.target), []).append(n)
            elif n.op == "get_attr":
                self.attrs.append(str(n.target))

    def tuner_node(self, ts: TunerSite) -> fx.Node:
        nodes = self.calls.get(ts.module, [])
        if len(nodes) != 1:
            raise NotMergeable(f"its module is called {len(nodes)} times in the graph")
        return nodes[0]

    def join_add(self, node: fx.Node) -> fx.Node:
        """The ``out + T(tap)`` node joining tuner call ``node``."""
        users = [u for u in node.users if not _plumbing(u)]
        if len(users) != 1 or not _is_add(users[0]) or users[0].args[1] is not node:
            raise NotMergeable("its output is not simply added to the layer's output")
        return users[0]


def _plumbing(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is getattr) or (n.op == "call_method" and n.target in ("size", "dim"))


def _is_add(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (operator.add, torch.add) and len(n.args) == 2 and not n.kwargs


def _is_tuner(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_module" and str(n.target).startswith(TUNER_ROOT + ".")


def _describe(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"module {n.target}"
    return f"{getattr(n.target, '__name__', n.target)} ({n.op})"


def _resolve_layer(g: _Graph, value: fx.Node, ts: TunerSite) -> fx.Node:
    """The call of the base layer whose output ``value`` is (through earlier tuners, Identity, Dropout)."""
    chain: list[fx.Node] = []
    node = value
    while True:
        chain.append(node)
        if _is_tuner(node) and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        elif _is_add(node) and _is_tuner(node.args[1]) and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        elif node.op == "call_module":
            mod = g.gm.get_submodule(str(node.target))
            if isinstance(mod, (nn.Identity, nn.Dropout)) and node.args and isinstance(node.args[0], fx.Node):
                node = node.args[0]
                continue
            break
        else:
            raise NotMergeable(f"the value it changes comes from {_describe(node)}, not from a Linear, Conv or Norm")
    path = str(node.target)
    mod = g.gm.get_submodule(path)
    act = getattr(mod, "act", None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):  # timm's BatchNormAct2d, GroupNormAct...
        raise NotMergeable(f"{path} ({type(mod).__name__}) applies {type(act).__name__} after its affine weights")
    if layer_kind(mod) is None:
        raise NotMergeable(f"the value it changes comes from {path} ({type(mod).__name__}), not a Linear, Conv or Norm")
    site = ts.site.split("@")[0]
    if path != site and not path.startswith(site + "."):
        raise NotMergeable(f"the value it changes comes from {path}, outside its site")
    if len(g.calls.get(path, [])) != 1:
        raise NotMergeable(f"{path} is called {len(g.calls[path])} times; folding would change every call")
    if any(a.startswith(path + ".") for a in g.attrs):
        raise NotMergeable(f"{path}'s weights are also read directly elsewhere in the graph")
    inside = set(chain)
    for n in chain:
        for u in n.users:
            if u in inside or _plumbing(u) or _is_tuner(u) or (_is_add(u) and _is_tuner(u.args[1])):
                continue
            raise NotMergeable(f"{path}'s output is also used by {_describe(u)}, which would see the folded weights")
    return node


# ---- where a tuner joins, and the per-kind math ------------------------------------------------------------


def locate(g: _Graph, ts: TunerSite) -> tuple[fx.Node, int, str]:
    """``(layer call, graph position of the join, tap)`` for one tuner, read from the graph.

    ``tap`` says how the tuner joins the layer's output ``y``: ``replace`` (``y <- T(y)``), ``input``
    (``y <- y + T(x)`` with ``x`` the layer's own input) or ``output`` (``y <- y + T(y)``).
    """
    node = g.tuner_node(ts)
    users = [u for u in node.users if not _plumbing(u)]
    if len(users) == 1 and _is_add(users[0]) and users[0].args[1] is node:  # join_add: y + T(tap)
        add = users[0]
        leaf = _resolve_layer(g, add.args[0], ts)  # type: ignore[arg-type]
        if len(node.args) != 1 or node.kwargs:
            raise NotMergeable("it reads more than one value")
        tap = node.args[0]
        if leaf.args and tap is leaf.args[0]:
            return leaf, g.order[add], "input"
        if tap is add.args[0]:
            return leaf, g.order[add], "output"
        raise NotMergeable(f"it reads {_describe(tap)}, neither the input nor the output of {leaf.target}")  # type: ignore[arg-type]
    if len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs:  # join_replace: T(y)
        return _resolve_layer(g, node.args[0], ts), g.order[node], "replace"
    raise NotMergeable("its output is not joined to a single layer's output")


MergeFn = Callable[[Layer, str], None]


def _merger(mod: nn.Module) -> MergeFn | None:
    """The tuner module's own ``fold(layer, tap)``, when its kind can fold at all."""
    return getattr(mod, "fold", None)


@dataclass
class FoldStep:
    """One tuner's fold: into the layer called by ``layer_node``, at graph position ``order``."""

    ts: TunerSite
    tuner: nn.Module
    merge: MergeFn
    layer_node: fx.Node
    order: int
    tap: str

    @property
    def layer(self) -> str:
        return str(self.layer_node.target)


# ---- the merge -----------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    state: dict[str, torch.Tensor]  # keyed like the plain backbone
    folds: list[tuple[str, str, str, str]]  # (rule, kind, site, layer), in the order folded
    layers: int  # how many base layers changed


def _why_not(kind: str, mod: nn.Module) -> str:
    return f"{kind} tuners ({type(mod).__name__}) add computation that no base weight can express"


def merged_state_dict(built: Any) -> MergeResult:
    """The base state with every tuner folded in; ExportError listing every tuner that cannot fold."""
    gm: fx.GraphModule = built.model
    g = _Graph(gm)
    steps: list[FoldStep] = []
    refused: list[tuple[TunerSite, str]] = []
    for ts in tuner_sites(built):
        mod = gm.get_submodule(ts.module)
        merge = _merger(mod)
        if merge is None:
            refused.append((ts, _why_not(ts.kind, mod)))
            continue
        try:
            leaf, order, tap = locate(g, ts)
        except NotMergeable as e:
            refused.append((ts, str(e)))
            continue
        steps.append(FoldStep(ts, mod, merge, leaf, order, tap))
    live = gm.state_dict()
    state = {k: live.get(k, v).detach().to("cpu").clone() for k, v in built.base.state_dict().items()}
    layers: dict[str, Layer] = {}
    folds: list[tuple[str, str, str, str]] = []
    for step in sorted(steps, key=lambda s: s.order):
        layer = layers.get(step.layer)
        if layer is None:
            mod = gm.get_submodule(step.layer)
            meta = step.layer_node.meta.get("tensor_meta")
            ndim = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
            w, b = f"{step.layer}.weight", f"{step.layer}.bias"
            if (getattr(mod, "weight", None) is not None and w not in state) or (
                getattr(mod, "bias", None) is not None and b not in state
            ):
                refused.append((step.ts, f"{step.layer}'s weights are not in the base model's state dict"))
                continue
            kind = layer_kind(mod)
            assert kind is not None  # _resolve_layer checked it
            layer = layers[step.layer] = Layer(step.layer, mod, kind, ndim, f64(state.get(w)), f64(state.get(b)))
        try:
            step.merge(layer, step.tap)
        except NotMergeable as e:
            refused.append((step.ts, str(e)))
            continue
        layer.folded.append(step.ts.rule)
        folds.append((step.ts.rule, step.ts.kind, step.ts.site, step.layer))
    if refused:
        raise refusal("cannot merge these tuners into the base weights", refused, TUNERS_ONLY_HINT)
    for path, layer in layers.items():
        for name, value in (("weight", layer.weight), ("bias", layer.bias)):
            key = f"{path}.{name}"
            if value is not None and key in state:
                state[key] = value.to(state[key].dtype).contiguous()
    return MergeResult(state, folds, len(layers))


# ---- verification ---------------------------------------------------------------------------------------


@dataclass
class Verification:
    max_abs_diff: float
    scale: float  # max |tuned output|
    tolerance: float  # allowed max_abs_diff
    ok: bool

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"verify: max |merged - tuned| = {self.max_abs_diff:.3g} (output scale {self.scale:.3g}, "
            f"tolerance {self.tolerance:.3g}): {verdict}"
        )


def relative_tolerance(model: nn.Module) -> float:
    """1e-4 of the output scale in fp32 (1e-2 when the weights are half precision)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return 1e-2 if dtypes & {torch.float16, torch.bfloat16} else 1e-4


@torch.no_grad()
def forward_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        dev = next((p.device for p in model.parameters()), x.device)
        out = model(x.to(dev))
    finally:
        model.train(was)
    out = out if isinstance(out, torch.Tensor) else out[0]
    return out.detach().to("cpu", torch.float32)


def plain_model(built: Any) -> nn.Module:
    """A fresh, untuned model of the spec's architecture (random weights, nothing downloaded)."""
    from utune.models import create_model

    m = built.spec.model
    return create_model(m.name, pretrained=False, num_classes=m.num_classes, kwargs=dict(m.kwargs), img_size=m.img_size)


def verify_merged(built: Any, state: dict[str, torch.Tensor], *, batch: int = 2, seed: int = 0) -> Verification:
    """Load ``state`` strictly into a fresh plain model; compare it with the tuned model on a random batch."""
    plain = plain_model(built)
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(
            f"the merged weights do not load strictly into a plain {built.spec.model.name}: {str(e).splitlines()[0]}",
            hint="this is a bug in the export; report it with the spec",
        ) from None
    x = torch.randn(batch, *built.input_size, generator=torch.Generator().manual_seed(seed))
    tuned, merged = forward_eval(built.model, x), forward_eval(plain, x)
    diff = float((tuned - merged).abs().max())
    scale = float(tuned.abs().max())
    tol = relative_tolerance(built.model) * max(scale, 1e-6)
    return Verification(diff, scale, tol, diff <= tol)

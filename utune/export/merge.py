"""Folding tuners into the base weights (``utune export --merge``).

The merged state dict is keyed exactly like the plain backbone, so ``timm.create_model(name,
num_classes=K).load_state_dict(state, strict=True)`` loads it. It starts from the base model's own state
(which already holds trained ``trainable:`` parameters such as the head, shared with the tuned model)
and folds each tuner into copies of the weights of the layer it acts on; the live model is never changed.

Every foldable tuner is an affine map on the layer's input or output channels, applied to ``y = W x + b``:

- per-channel ``y <- s ⊙ y + t`` (SSF, IA³, BitFit ``bias``):    ``W' = s[:, None] W``, ``b' = s ⊙ b + t``;
  on a norm layer the same on its affine weight and bias;
- ``y <- y + ΔW x + c`` (LoRA ``ΔW = (alpha/r) B A``, a linear adapter beside the layer): ``W' = W + ΔW``;
- ``y <- A y + c`` (a linear adapter after the layer, ``A = I + s ⊙ W_up W_down``): ``W' = A W``, ``b' = A b + c``;
- ``x <- M x + c`` (a ``replace_input`` tuner the layer reads instead of its input: OFT's rotation, RepAdapter's
  re-parameterisation): ``W' = W M``, ``b' = b + W c``.

A tuner may read its own layer's frozen tensors (DoRA's weight norm, GLoRA's ``W ⊙ A``): those reads are the
original tensors, so such a tuner folds with them (``layer.module``), not with what earlier folds made.

How each tuner joins (``y <- T(y)`` or ``y <- y + T(tap)``) and which value it changes are read from the
build's manifest (``Built.manifest``), never guessed from the graph's shape (a residual ``out + shortcut``
whose shortcut ends in an SSF looks like an add-join). From that value the walk goes back through earlier
tuners' joins on it, ``Identity`` and ``Dropout`` (the identity in eval mode, which is what a merged model is
for), to the one base layer that produced it. Several tuners on one layer fold in graph
order (the order they act on the value), whatever the order of their rules. The fold is refused, with the
reason, when the tuner reads anything but the layer's own input or output, when the layer's output is also
used elsewhere, when the layer is called more than once, or when the layer cannot hold the result (a shift
on a layer without a bias, a channel mix on a norm, a non-linear adapter).

Finding the layer (:func:`locate`) is generic; the math is the tuner module's own ``fold(layer, tap)``
(in its kind's file), built from the moves of :class:`utune.tuners.fold.Layer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from utune.errors import ExportError
from utune.export._sites import TunerSite, refusal, tuner_sites
from utune.graph.manifest import Entry
from utune.graph.mha import state_key
from utune.tuners.fold import Layer, NotMergeable, f64, layer_kind

if TYPE_CHECKING:
    from utune.engine.record import Built

TUNERS_ONLY_HINT = "export the tuners with --tuners-only instead (`utune apply SPEC --tuners FILE` loads them back)"


# ---- the graph around a tuner ------------------------------------------------------------------------


class _Graph:
    """The rewritten graph, indexed: who calls which module, and the manifest's record of every join."""

    def __init__(self, gm: fx.GraphModule, entries: Iterable[Entry] = ()) -> None:
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.calls: dict[str, list[fx.Node]] = {}
        self.attrs: list[fx.Node] = []  # direct reads of tensors (get_attr)
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.calls.setdefault(str(n.target), []).append(n)
            elif n.op == "get_attr":
                self.attrs.append(n)
        self.attached = {e.module: e for e in entries if e.module}
        # the value each add/replace join stands for now -> the value it changed (walking back to the layer)
        self.replaced: dict[fx.Node, fx.Node] = {
            e.nodes["joined"]: e.nodes["onto"]
            for e in self.attached.values()
            if e.join in ("add", "replace") and "joined" in e.nodes and "onto" in e.nodes
        }
        self.tuner_calls = {e.nodes["call"] for e in self.attached.values() if "call" in e.nodes}
        # a replace_input tuner's output -> the input the layer read before it (what other tuners there read)
        self.read_instead = {
            e.nodes["call"]: e.nodes["onto"]
            for e in self.attached.values()
            if e.join == "replace_input" and "call" in e.nodes
        }

    def attachment(self, ts: Entry) -> Entry:
        """The manifest entry of ``ts``'s module; refused when it has no nodes or they are stale."""
        att = self.attached.get(ts.module)
        call = att.nodes.get("call") if att is not None else None
        if att is None or call is None:
            raise NotMergeable("there is no record of how it was attached (build the model with utune.build)")
        if call.graph is not self.gm.graph:
            raise NotMergeable("the record of how it was attached belongs to another copy of the model's graph")
        n = len(self.calls.get(ts.module, []))
        if n != 1:
            raise NotMergeable(f"it runs {n} times in one forward pass; a fold needs it in exactly one place")
        return att


def _plumbing(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is getattr) or (n.op == "call_method" and n.target in ("size", "dim"))


def _owner(n: fx.Node) -> str:
    """The module whose forward ``n`` is part of, for messages."""
    stack = n.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return path or "the model's top level"


def _op_name(n: fx.Node) -> str:
    return str(n.target if n.op == "call_method" else getattr(n.target, "__name__", n.target)).strip("_")


def _op(g: _Graph, n: fx.Node) -> str:
    """A user's words for one node: ``layer1.0.act1 (ReLU)``, ``the add in layer1.0``, ``the model's input``."""
    if n.op == "call_module":
        return f"{n.target} ({type(g.gm.get_submodule(str(n.target))).__name__})"
    if n.op == "placeholder":
        return "the model's input"
    if n.op == "output":
        return "the model's output"
    if n.op == "get_attr":
        return f"the tensor {n.target}"
    return f"the {_op_name(n)} in {_owner(n)}"


def _not_a_layer(g: _Graph, n: fx.Node) -> NotMergeable:
    """Why a tuner on a value that ``n`` (no Linear, Conv or norm) produces cannot fold."""
    if n.op in ("call_function", "call_method") and _op_name(n) in ("add", "iadd"):
        return NotMergeable(
            f"it changes the sum of two branches (the add in {_owner(n)}), which no single layer's weights "
            "produce; put it on a BatchNorm, Linear or Conv layer inside a branch instead"
        )
    return NotMergeable(
        f"it changes the output of {_op(g, n)}, which has no weights to fold it into; "
        "put it on a Linear, Conv or norm layer instead"
    )


def _walk_back(g: _Graph, value: fx.Node) -> list[fx.Node]:
    """``value`` and what it was made from through earlier tuners' joins, Identity and Dropout (the
    identity in eval mode, which is what a merged model is for); the last node is the producer."""
    chain = [value]
    node = value
    while True:
        if node in g.replaced:
            node = g.replaced[node]
        elif node.op == "call_module" and isinstance(g.gm.get_submodule(str(node.target)), (nn.Identity, nn.Dropout)):
            if not node.args or not isinstance(node.args[0], fx.Node):
                return chain
            node = node.args[0]
        else:
            return chain
        chain.append(node)


def _resolve_layer(g: _Graph, value: fx.Node, ts: TunerSite) -> fx.Node:
    """The call of the one base layer whose output ``value`` is; NotMergeable saying why it is not."""
    chain = _walk_back(g, value)
    node = chain[-1]
    if node.op != "call_module" or layer_kind(g.gm.get_submodule(str(node.target))) is None:
        raise _not_a_layer(g, node)
    path = str(node.target)
    mod = g.gm.get_submodule(path)
    act = getattr(mod, "act", None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):  # timm's BatchNormAct2d, GroupNormAct...
        raise NotMergeable(
            f"{path} ({type(mod).__name__}) applies {type(act).__name__} after its weights, so a change of its "
            "output cannot move into them; put it on a layer without a built-in activation"
        )
    site = ts.site.split("@")[0]
    if path != site and not path.startswith(site + "."):
        raise NotMergeable(f"the value it changes is made by {path}, outside its site; folding would change that layer")
    _alone(g, path)
    inside = set(chain)
    for n in chain:
        for u in n.users:  # besides the chain itself: tuners reading the value, and the joins onto it
            if u in inside or _plumbing(u) or u in g.tuner_calls or g.replaced.get(u) is n:
                continue
            raise NotMergeable(
                f"{path}'s output also feeds {_op(g, u)}, which would see the tuner's change once it is in "
                f"{path}'s weights"
            )
    return node


def _alone(g: _Graph, path: str) -> None:
    """The layer runs once and nothing but the tuners on it reads its tensors directly (they fold with them)."""
    if len(g.calls.get(path, [])) != 1:
        raise NotMergeable(
            f"{path} runs {len(g.calls.get(path, []))} times in one forward pass (shared weights); "
            "folding would change every use"
        )
    own = {e.nodes.get("call") for e in g.attached.values() if e.site.split("@")[0] == path}
    mod = g.gm.get_submodule(path)
    keys = {state_key(mod, path, t) for t in ("weight", "bias")}  # where a view's tensors live (MHA's in_proj)
    direct = [a for a in g.attrs if str(a.target).startswith(path + ".") or str(a.target) in keys]
    if any(not set(a.users) <= own for a in direct):
        raise NotMergeable(f"the model also reads {path}'s weights directly, and that use would see the folded weights")


def _own_tensor(value: object, layer: str) -> bool:
    """A frozen tensor of ``layer`` itself (or the None of a missing bias) that a tuner reads beside its tap."""
    if value is None:
        return True
    return isinstance(value, fx.Node) and value.op == "get_attr" and str(value.target).startswith(layer + ".")


def _input_map(g: _Graph, att: Entry) -> fx.Node:
    """The call of the Linear/Conv at ``att``'s site that reads ``T(x)`` instead of its input ``x``."""
    call, onto = att.nodes.get("call"), att.nodes["onto"]
    layer = att.site.split("@")[0]
    if not g.calls.get(layer) or layer_kind(g.gm.get_submodule(layer)) not in ("linear", "conv"):
        why = _JOIN_WHY["replace_input"].format(site=att.site)
        raise NotMergeable(f"{why}, and the site is not one Linear/Conv to fold it into")
    users = list(call.users) if call is not None else []
    if len(users) != 1 or users[0].op != "call_module" or str(users[0].target) != layer:
        raise NotMergeable(_JOIN_WHY["replace_input"].format(site=att.site))
    assert call is not None  # users came from it
    args = [a for a in [*call.args, *call.kwargs.values()] if not _own_tensor(a, layer)]
    if args != [onto]:
        raise NotMergeable(f"it reads {att.reads()}, not just the input of {layer}")
    _alone(g, layer)
    return users[0]


# ---- where a tuner joins, and the per-kind math ------------------------------------------------------------

_JOIN_WHY = {
    "replace_input": "it changes what {site} reads, not the output of one layer",
    "kv_concat": "it adds keys and values to the attention in {site}, which no base weight can hold",
    "side": "it is a step of a side network beside {site}, not a change of one layer's output",
}


def _add_tap(g: _Graph, att: Entry, leaf: fx.Node) -> str:
    """``input`` (``y + T(x)``, x the layer's own input, before any ``replace_input`` tuner changed what the
    layer reads: such a tuner folds first) or ``output`` (``y + T(y)``): what T reads now."""
    call = att.nodes["call"]
    args = [a for a in [*call.args, *call.kwargs.values()] if not _own_tensor(a, str(leaf.target))]
    if len(args) != 1:
        raise NotMergeable(f"it reads {len(args)} values ({att.reads()}), not just {leaf.target}'s input or output")
    x = leaf.args[0] if leaf.args and isinstance(leaf.args[0], fx.Node) else None
    if x is not None and args[0] is g.read_instead.get(x, x):
        return "input"
    if args[0] is att.nodes["onto"]:
        return "output"
    raise NotMergeable(
        f"it reads {att.reads()}, which is neither the input nor the output of {leaf.target}, so what it adds "
        "is not a function of that layer alone"
    )


def locate(g: _Graph, ts: Entry) -> tuple[fx.Node, int, str]:
    """``(layer call, graph position of the join, tap)`` for one tuner, from the manifest.

    ``tap`` says how the tuner joins the layer's output ``y``: ``replace`` (``y <- T(y)``), ``input``
    (``y <- y + T(x)`` with ``x`` the layer's own input) or ``output`` (``y <- y + T(y)``); or, for a tuner
    the layer reads instead of its input, ``input_map`` (``y = layer(T(x))``: it folds before any other).
    """
    att = g.attachment(ts)
    onto, joined = att.nodes.get("onto"), att.nodes.get("joined")
    if att.join == "replace_input" and onto is not None and joined is not None:
        return _input_map(g, att), g.order[joined], "input_map"
    if att.join not in ("add", "replace") or onto is None or joined is None:
        raise NotMergeable(_JOIN_WHY.get(att.join, _JOIN_WHY["side"]).format(site=att.site))
    leaf = _resolve_layer(g, onto, ts)
    tap = "replace" if att.join == "replace" else _add_tap(g, att, leaf)
    return leaf, g.order[joined], tap


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


def merged_state_dict(built: Built) -> MergeResult:
    """The base state with every tuner folded in; ExportError listing every tuner that cannot fold."""
    gm: fx.GraphModule = built.model
    g = _Graph(gm, built.manifest)
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
            w, b = state_key(mod, step.layer, "weight"), state_key(mod, step.layer, "bias")  # views: where they live
            if (getattr(mod, "weight", None) is not None and w not in state) or (
                getattr(mod, "bias", None) is not None and b not in state
            ):
                why = f"{step.layer}'s weights are not in the model's state dict; the fold has nowhere to go"
                refused.append((step.ts, why))
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
            key = state_key(gm.get_submodule(path), path, name)
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
    what: str = "merged"  # what was compared with the tuned model (onnxruntime, torch.export)

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"verify: max |{self.what} - tuned| = {self.max_abs_diff:.3g} (output scale {self.scale:.3g}, "
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


def plain_model(built: Built) -> nn.Module:
    """A fresh, untuned model of the spec's architecture (random weights, nothing downloaded); for a model
    given to ``build(spec, model=net)`` a copy of that module (its own class and constructor arguments: no
    name can rebuild it), its floating-point tensors back in float32 when ``model.frozen_dtype`` held them
    in bf16."""
    import copy

    from utune.models import create_model

    m = built.spec.model
    if built.given or m.name is None:
        plain = copy.deepcopy(built.base)
        if m.frozen_dtype != "float32":
            plain.float()
        return plain
    return create_model(m.name, pretrained=False, num_classes=m.num_classes, kwargs=dict(m.kwargs), img_size=m.img_size)


def verify_merged(built: Built, state: dict[str, torch.Tensor], *, batch: int = 2, seed: int = 0) -> Verification:
    """Load ``state`` strictly into a fresh plain model; compare it with the tuned model on a random batch."""
    plain = plain_model(built)
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(
            f"the merged weights do not load strictly into a plain {built.model_label}: {str(e).splitlines()[0]}",
            hint="this is a bug in the export; report it with the spec",
        ) from None
    x = torch.randn(batch, *built.input_size, generator=torch.Generator().manual_seed(seed))
    tuned, merged = forward_eval(built.model, x), forward_eval(plain, x)
    diff = float((tuned - merged).abs().max())
    scale = float(tuned.abs().max())
    tol = relative_tolerance(built.model) * max(scale, 1e-6)
    return Verification(diff, scale, tol, diff <= tol)

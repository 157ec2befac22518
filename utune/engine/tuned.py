"""The tuned model keeps the base model's public API, computed by the tuned graph where it computes.

``build`` returns a GraphModule: it has the rewritten ``forward`` but none of timm's methods and
attributes (``forward_features``, ``pretrained_cfg``, ``num_classes``...), which code written for the
base model reads. :class:`TunedModel` is that same GraphModule (same parameters, buffers, submodules,
graph and state-dict keys) with the base model kept beside it, not registered as a submodule:

- a public attribute the graph module lacks is read from the base model;
- ``forward_features`` / ``forward_head`` are generated from the *rewritten* graph, so the features
  carry every tuner's effect (see :mod:`utune.graph.split`); never the untuned base methods;
- ``reset_classifier`` runs the base's, then the graph calls the new head modules;
- base methods that would run or reshape the untuned model are refused, with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn
from torch.fx.graph import PythonCode

from utune.engine.tuned_ops import BASE as _BASE
from utune.engine.tuned_ops import DISABLED, RECORD, TunedOps
from utune.engine.tuned_ops import SIZE as _SIZE
from utune.engine.tuned_ops import SPLIT as _SPLIT
from utune.errors import TunedModelError, UnavailableAttributeError
from utune.graph.manifest import Manifest
from utune.graph.rewrite import TUNER_ROOT
from utune.graph.shapes import NodeFailure, propagate_shapes
from utune.graph.split import FEATURES, HEAD, Split, compile_graph, extract, find_split
from utune.graph.trace import forget_unpatchable_wraps, modes_kept

_PARTS = "_utune_parts"

# what the tuned model computes itself, when the base model has the method
_OWN = {FEATURES: "_forward_features", HEAD: "_forward_head", "reset_classifier": "_reset_classifier"}
_UNTUNED = "it would run the untuned base model"
_REFUSED = {
    "get_intermediate_layers": _UNTUNED,
    "prune_intermediate_layers": "it would remove layers of the base model, not of the tuned graph",
    "set_input_size": "the tuned graph is traced at one input size; set model.img_size in the spec",
    "set_grad_checkpointing": "the tuned graph does not checkpoint activations",
    # utune.train.optim reads it when present: forwarding it would regroup weight decay (and no longer
    # resume runs) for models whose position embeddings or tokens are trainable
    "no_weight_decay": "utune's optimizer groups weight decay by parameter shape, without it",
}


def _refusal(name: str) -> str | None:
    """Why the tuned model does not forward base attribute ``name`` (None: it does)."""
    if name in _OWN:
        return None
    return _REFUSED.get(name) or (_UNTUNED if name.startswith("forward") else None)


def _instance_class() -> type[TunedModel]:
    # fx gives each GraphModule its own class (forward is installed on it); GraphModule.__new__ skips
    # classes of this name when it makes the next one, so deepcopy makes a TunedModel again
    class GraphModuleImpl(TunedModel):
        pass

    return GraphModuleImpl


class TunedModel(TunedOps, fx.GraphModule):
    """The rewritten GraphModule with the base model's public API (see the module docstring)."""

    @classmethod
    def adopt(
        cls, gm: fx.GraphModule, base: nn.Module, input_size: tuple[int, ...], record: dict[str, Any] | None = None
    ) -> TunedModel:
        """Make ``gm`` a TunedModel of ``base``, in place: the same object, nothing copied or re-registered.
        ``record``: what merge and load need of the build (:func:`utune.engine.tuned_ops.make_record`)."""
        state: dict[str, Any] = {_BASE: base, _SIZE: tuple(input_size)}
        if record is not None:
            state[RECORD] = record
        tuned = _adopt_state(gm, state)
        try:
            tuned.__dict__[_SPLIT] = find_split(tuned, base)
        except TunedModelError as e:
            tuned.__dict__[_SPLIT] = e.message  # why forward_features is absent
        except Exception as e:  # a model the analysis did not foresee: no split, but the build stands
            tuned.__dict__[_SPLIT] = f"finding the features/head split failed: {type(e).__name__}: {e}"
        return tuned

    # ----- the base model's attributes -----
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of the graph
        except AttributeError:
            base = self.__dict__.get(_BASE)
            if base is None or name.startswith("_"):  # private and dunder names stay the graph module's
                raise
        return self._from_base(base, name)

    def _from_base(self, base: nn.Module, name: str) -> Any:
        if name in _OWN and hasattr(base, name):
            if name != "reset_classifier":
                self._split(name)  # absent (UnavailableAttributeError) when the graph has no split
            return getattr(self, _OWN[name])
        why = _refusal(name)
        if why is not None and hasattr(base, name):
            raise UnavailableAttributeError(
                f"the tuned {type(self).__name__} does not offer {name}: {why}",
                hint="Built.base is the untuned model" if why == _UNTUNED else None,
            )
        try:
            return getattr(base, name)
        except AttributeError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'") from None

    def __dir__(self) -> list[str]:
        base = self.__dict__.get(_BASE)
        names = set(super().__dir__())
        if base is not None:
            names |= {n for n in dir(base) if not n.startswith("_") and _refusal(n) is None}
        return sorted(names)

    # ----- features and head -----
    def _split(self, name: str) -> Split:
        split = self.__dict__.get(_SPLIT)
        if not isinstance(split, Split):
            raise UnavailableAttributeError(
                f"the tuned {type(self).__name__} has no {name}: {split}",
                hint="the tuned model's forward is the whole model; Built.base has the untuned methods",
            )
        return split

    def _part(self, which: str) -> Callable[..., Any]:
        """The generated function for ``features``, ``head`` or ``pre_logits``, made once per graph."""
        parts = self.__dict__.setdefault(_PARTS, {})
        if which not in parts:
            parts[which] = compile_graph(self._part_graph(which), f"{type(self).__name__}.{which}")
        return parts[which]

    def _part_graph(self, which: str) -> fx.Graph:
        split = self._split(FEATURES if which == "features" else HEAD)
        nodes = {n.name: n for n in self.graph.nodes}
        ends = [split.features] + ([split.pre_logits] if which == "pre_logits" and split.pre_logits else [])
        if any(e not in nodes for e in ends):
            raise TunedModelError(f"the tuned graph changed since build: a node of {ends} is gone")
        features = nodes[split.features]
        if which == "features":
            return extract(self.graph, features)
        output = next(n for n in self.graph.nodes if n.op == "output")
        return extract(self.graph, nodes[ends[-1]] if which == "pre_logits" else output.args[0], cut=features)

    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The tuned features: the value the tuned head reads, every tuner before it applied."""
        return self._part("features")(self, x)

    def _forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The tuned head on features ``x``; ``pre_logits=True``: the value its classifier reads."""
        split = self._split(HEAD)
        if pre_logits and split.pre_logits_error:
            raise TunedModelError(f"forward_head(pre_logits=True) of the tuned model: {split.pre_logits_error}")
        which = "pre_logits" if pre_logits and split.pre_logits is not None else "head"
        return self._part(which)(self, x)

    def recompile(self) -> PythonCode:
        self.__dict__.pop(_PARTS, None)  # the parts are generated from the graph: regenerate them
        return super().recompile()

    # ----- a new head -----
    def _reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """The base model's ``reset_classifier``; the tuned graph then calls the new head modules.

        Trainability follows the old head's; the new modules go to its device and dtype. A change the
        traced graph cannot follow (pooling built into the graph, a head it traced through, a tuner
        sized for the old head) is undone and raises TunedModelError.
        """
        base = self.__dict__[_BASE]
        _follow_head(self, base, lambda: base.reset_classifier(num_classes, *args, **kwargs))

    # ----- copies -----
    def __deepcopy__(self, memo: dict[int, Any]) -> TunedModel:
        record = self.__dict__.get(RECORD)
        if record is not None:  # its manifest names graph nodes: copied below, onto the copy's own nodes
            memo[id(record)] = None
        res = cast(TunedModel, super().__deepcopy__(memo))  # a TunedModel: see _instance_class
        res.__dict__.pop(DISABLED, None)
        for key in _STATE:  # the base is copied with the same memo, so it shares the copied parameters
            if key in self.__dict__:
                res.__dict__[key] = copy.deepcopy(self.__dict__[key], memo)
        if record is not None:
            portable = _portable(record, self.graph)
            res.__dict__[RECORD] = _rebound(copy.deepcopy(portable, memo), res.graph)
        type(res).__name__ = type(self).__name__
        return res

    def __copy__(self) -> TunedModel:
        res = super().__copy__()  # a plain GraphModule sharing the modules (DataParallel replicas)
        kept = {k: self.__dict__[k] for k in (*_STATE, RECORD) if k in self.__dict__}  # shared, not copied
        return _adopt_state(res, kept, type(self).__name__)

    def __reduce__(self) -> tuple[Any, ...]:
        fn, (body, import_block) = super().__reduce__()
        state = {k: body.pop(k) for k in _STATE if k in body}
        for key in (_PARTS, RECORD, DISABLED):
            body.pop(key, None)
        if isinstance(state.get(_SPLIT), Split):  # unpickling re-traces the code, which renames nodes
            state[_SPLIT] = _positions(self.graph, state[_SPLIT])
        if RECORD in self.__dict__:
            state[RECORD] = _portable(self.__dict__[RECORD], self.graph)
        return (_unpickle, (fn, body, import_block, state, type(self).__name__))


_STATE = (_BASE, _SIZE, _SPLIT)


def _portable(record: dict[str, Any], graph: fx.Graph) -> dict[str, Any]:
    """The record with its manifest's graph nodes as positions (among non-placeholder nodes, which a copy
    and a re-trace keep in order); :func:`_rebound` maps them onto another graph's nodes."""
    order = {n: i for i, n in enumerate(n for n in graph.nodes if n.op != "placeholder")}
    positions: Any = lambda e: {k: order[n] for k, n in e.nodes.items()}  # noqa: E731  # stands for nodes
    return {**record, "manifest": Manifest([dataclasses.replace(e, nodes=positions(e)) for e in record["manifest"]])}


def _rebound(record: dict[str, Any], graph: fx.Graph) -> dict[str, Any]:
    nodes = [n for n in graph.nodes if n.op != "placeholder"]
    manifest: Manifest = record["manifest"]
    for e in manifest:
        at: dict[str, Any] = e.nodes  # positions, from _portable
        e.nodes = {k: nodes[i] for k, i in at.items()}
    return record


def _adopt_state(gm: fx.GraphModule, state: dict[str, Any], name: str | None = None) -> TunedModel:
    name = name or type(gm).__name__
    gm.__class__ = _instance_class()
    tuned = cast(TunedModel, gm)
    type(tuned).__name__ = name
    tuned.__dict__.update(state)  # in __dict__: the base is no submodule, so no ``base.*`` keys
    tuned.recompile()  # installs forward on the new class
    return tuned


def _positions(graph: fx.Graph, split: Split) -> tuple[Any, ...]:
    """The split by position among non-placeholder nodes: code re-traced keeps their order, not their names."""
    order = {n.name: i for i, n in enumerate(n for n in graph.nodes if n.op != "placeholder")}
    pre = order[split.pre_logits] if split.pre_logits is not None else None
    return (order[split.features], pre, split.pre_logits_error)


def _unpickle(
    fn: Callable[..., nn.Module], body: dict[str, Any], import_block: str, state: dict[str, Any], name: str
) -> TunedModel:
    gm = cast(fx.GraphModule, fn(body, import_block))
    if isinstance(state.get(_SPLIT), tuple):
        nodes = [n.name for n in gm.graph.nodes if n.op != "placeholder"]
        features, pre, error = state[_SPLIT]
        state[_SPLIT] = Split(nodes[features], nodes[pre] if pre is not None else None, error)
    if RECORD in state:
        state[RECORD] = _rebound(state[RECORD], gm.graph)
    tuned = _adopt_state(gm, state, name)
    forget_unpatchable_wraps()  # its re-traced code registered one: keep later traces in this process working
    return tuned


# ----- reset_classifier: the graph follows the base's new head -----


def _targets(graph: fx.Graph) -> list[str]:
    """Paths of the base modules and tensors the graph reads (tuners aside)."""
    found = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    return sorted(t for t in found if t != TUNER_ROOT and not t.startswith(TUNER_ROOT + "."))


def _resolve(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _put(root: nn.Module, path: str, obj: Any) -> None:
    """Set ``obj`` at ``path`` in the slot (module, parameter or buffer) that holds it now."""
    prefix, _, field = path.rpartition(".")
    parent = root.get_submodule(prefix) if prefix else root
    for store in ("_modules", "_parameters", "_buffers"):
        slots = parent.__dict__[store]
        if field in slots:
            slots[field] = obj
            return
    setattr(parent, field, obj)


@dataclass
class _Before:
    """The base model before ``reset_classifier``: enough to undo it, and to see what it changed."""

    state: list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]]
    modules: dict[str, nn.Module]
    attrs: dict[str, Any]  # the root's public attributes (num_classes, global_pool...)
    objects: dict[str, Any]  # the base's objects at the graph's targets

    @classmethod
    def take(cls, base: nn.Module, targets: list[str]) -> _Before:
        state = [(m, dict(m.__dict__), dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in base.modules()]
        attrs = {k: v for k, v in vars(base).items() if not k.startswith("_")}
        objects = {}
        for t in targets:
            try:
                objects[t] = _resolve(base, t)
            except AttributeError:  # the graph's own (tensor constants): no head of the base
                continue
        return cls(state, dict(base.named_modules(remove_duplicate=False)), attrs, objects)

    def restore(self) -> None:
        for m, attrs, modules, params, buffers in self.state:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for live, saved in ((m._modules, modules), (m._parameters, params), (m._buffers, buffers)):
                live.clear()
                live.update(saved)


def _reached(name: str, targets: list[str]) -> bool:
    """Whether the graph calls module ``name``, something inside it, or a module holding it."""
    return any(t == name or t.startswith(name + ".") or name.startswith(t + ".") for t in targets) or not name


def _changes(base: nn.Module, before: _Before) -> dict[str, Any]:
    """Target path -> the base's new object there; TunedModelError for a change the graph cannot follow."""
    now = {k: v for k, v in vars(base).items() if not k.startswith("_")}
    baked = sorted(
        k for k in set(now) | set(before.attrs) if k != "num_classes" and not _same(before.attrs.get(k), now.get(k))
    )
    if baked:
        raise TunedModelError(
            f"reset_classifier changed {', '.join(baked)}, which the traced graph has built in",
            hint="build the model with that setting instead (model.kwargs in the spec)",
        )
    new = [n for n, m in base.named_modules(remove_duplicate=False) if before.modules.get(n) is not m]
    stray = [n for n in new if not _reached(n, list(before.objects))]
    if stray:
        raise TunedModelError(
            f"reset_classifier made {stray[0]}, which the tuned graph does not call "
            "(it traced through what was there, e.g. the Identity head of num_classes=0)",
            hint="build the model with the new num_classes instead",
        )
    changed: dict[str, Any] = {}
    for t, was in before.objects.items():
        try:
            obj = _resolve(base, t)
        except AttributeError:
            raise TunedModelError(f"reset_classifier removed {t}, which the tuned graph calls") from None
        if obj is not was:
            changed[t] = obj
    return changed


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # tensors and other values without a truth value
        return False


def _adapt(new: Any, old: Any, ref: torch.Tensor | None) -> None:
    """The new head module takes the old one's trainability (frozen if it had no parameters), mode, device, dtype."""
    if not isinstance(new, nn.Module):
        return
    flags = {n: p.requires_grad for n, p in old.named_parameters()} if isinstance(old, nn.Module) else {}
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    for n, p in new.named_parameters():
        p.requires_grad_(flags.get(n, any(flags.values())))
    new.train(old.training if isinstance(old, nn.Module) else True)


def _follow_head(tuned: TunedModel, base: nn.Module, reset: Callable[[], None]) -> None:
    """Run ``reset`` (the base's reset_classifier), then make the tuned graph call the new head modules."""
    before = _Before.take(base, _targets(tuned.graph))
    old: dict[str, Any] = {}
    try:
        reset()
        changed = _changes(base, before)
        old = {t: _resolve(tuned, t) for t in changed}
        fallback = next(iter(tuned.parameters()), None)
        for t, obj in changed.items():
            ref = next(iter(old[t].parameters()), fallback) if isinstance(old[t], nn.Module) else fallback
            _adapt(obj, old[t], ref)
            _put(tuned, t, obj)
        _propagate(tuned)
    except BaseException as e:
        for t, obj in old.items():
            _put(tuned, t, obj)
        before.restore()
        if isinstance(e, NodeFailure):
            with contextlib.suppress(NodeFailure):
                _propagate(tuned)  # the old head's shapes again
            raise _misfit(e) from e
        raise


def _propagate(tuned: TunedModel) -> None:
    """Run the graph once on a dummy batch, recording each node's shape (export reads them)."""
    ref = next((p for p in tuned.parameters() if p.is_floating_point()), None)
    x = torch.zeros(2, *tuned.__dict__[_SIZE], device=ref.device if ref is not None else None)
    x = x.to(ref.dtype) if ref is not None else x
    with modes_kept(tuned):
        propagate_shapes(tuned, x)


def _misfit(e: NodeFailure) -> TunedModelError:
    rule = e.node.meta.get("utune_rule")
    who = f" (a node of rule {rule!r}, sized for the old head)" if rule else ""
    first = str(e.cause).splitlines()[0] if str(e.cause) else ""
    return TunedModelError(
        f"the tuned graph fails with the new head at node {e.node.name}{who}: {type(e.cause).__name__}: {first}",
        hint="build the model with the new num_classes instead; reset_classifier was undone",
    )

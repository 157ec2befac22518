"""The only tracer: torch.fx with timm's no-trace registries and addressable leaf layers.

Linear/Conv/Norm instances (subclasses included: timm's LayerNorm subclasses torch's) stay leaf
calls so they are sites a tuner can attach to. Optional forward arguments are passed as their
concrete defaults. timm's ``fused_attn`` flag is pinned to True (in the model too, so eager ==
traced) so attention always traces to ``F.scaled_dot_product_attention``. The graph is traced in
train mode while every read of a module's ``training`` flag is counted: with none, the code that ran
could not tell the modes apart and the graph serves both (leaf layers read their flag when they run,
not when traced). Otherwise it is traced in eval mode too; when the two differ, the model's Python
control flow depends on the mode and one graph cannot serve both.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from utune._reference import reference_build
from utune.errors import TraceError
from utune.graph.mha import expand_in_proj, install_views, traced_forward, why_leaf

LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose2d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.Dropout,
)  # nn.MultiheadAttention: traced through where utune.graph.mha can, else a leaf (its forward is untraceable)


def _timm_leaves() -> tuple[set[type[nn.Module]], tuple[Any, ...]]:
    from timm.layers import DropPath, get_notrace_functions, get_notrace_modules

    # DropPath branches on self.training: as a leaf the graph is the same in train and eval mode
    return set(get_notrace_modules()) | {DropPath}, tuple(get_notrace_functions())


PORTS = "utune_ports"  # GraphModule.meta key: module path -> (argument node names, returned node names)
Ports = dict[str, tuple[list[str | None], list[str | None]]]


def _node_names(values: Any) -> list[str | None]:
    """The graph value at each position of a tuple of arguments or of a return value (None: not a graph
    value, e.g. a size or a nested tuple)."""
    if isinstance(values, dict):
        values = list(values.values())
    elif not isinstance(values, tuple | list):
        values = [values]
    return [v.node.name if isinstance(v, fx.Proxy) else None for v in values]


class UtuneTracer(fx.Tracer):
    """fx tracer whose leaves are utune's addressable layers plus timm's no-trace modules.

    It records, for every traced-through module, the values its ``forward`` took and returned in order
    (``ports``): the graph itself inlines the call and keeps no trace of which returned value was first.
    """

    def __init__(self) -> None:
        leaves, functions = _timm_leaves()
        super().__init__(autowrap_functions=functions, param_shapes_constant=True)
        self._leaf_types = tuple(leaves)
        self.ports: Ports = {}
        self.expanded: list[str] = []  # paths of the MultiheadAttention modules traced through
        self._through: set[int] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.MultiheadAttention):
            return id(m) not in self._through
        if isinstance(m, LEAF_TYPES) or isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(m, nn.MultiheadAttention) and id(m) not in self._through and why_leaf(m, args, kwargs) is None:
            self._through.add(id(m))  # the first call decides; a model calls its MHA once
            self.expanded.append(self.path_of_module(m))
            forward = traced_forward(m)
        out = super().call_module(m, forward, args, kwargs)
        try:
            path = self.path_of_module(m)
        except NameError:  # a module that is not a submodule of the root (created in forward)
            return out
        if path not in self.ports and not self.is_leaf_module(m, path):  # the first call names the site
            self.ports[path] = (_node_names([*args, *kwargs.values()]), _node_names(out))
        return out


def pin_attention(model: nn.Module) -> int:
    """Set timm's per-module ``fused_attn`` flag to True, for good: eager and traced then agree.

    Returns how many modules were pinned. The model keeps the flag so that eager runs of it compute
    what the traced graph computes (``scaled_dot_product_attention``), bit for bit.
    """
    pinned = 0
    for m in model.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            setattr(m, "fused_attn", True)  # noqa: B010 (an attribute of timm's attention, not of nn.Module)
            pinned += 1
    return pinned


def _concrete_args(model: nn.Module) -> dict[str, Any]:
    """Optional forward arguments (``mask=None``, ``is_causal=False``) become concrete defaults."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    params = list(sig.parameters.values())[1:]  # the first is the image
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty and p.kind in kinds}


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag afterwards (``model.train(was)`` would set them all alike).

    A tuned model shares its leaf layers with the base model, so a mode set on one for a while must not
    leak into the other.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def trace_calls(model: nn.Module, methods: tuple[str, ...]) -> tuple[fx.Graph, dict[str, list[tuple[Any, ...]]]]:
    """Trace ``model`` (train mode) recording each call ``forward`` makes to ``methods``.

    fx records no node for a Python method call, so each method is shadowed by an instance attribute
    for the length of the trace; each call appends ``(args, kwargs, result)`` (proxies) to its list.
    fx names nodes in call order, so the names are those of :func:`trace`'s graph (whose train and
    eval graphs have the same nodes).
    """
    calls: dict[str, list[tuple[Any, ...]]] = {name: [] for name in methods}
    missing = object()
    saved = {name: model.__dict__.get(name, missing) for name in methods}

    def watch(name: str) -> Any:
        method = getattr(model, name)

        def watched(*args: Any, **kwargs: Any) -> Any:
            out = method(*args, **kwargs)
            calls[name].append((args, kwargs, out))
            return out

        return watched

    try:
        for name in methods:
            model.__dict__[name] = watch(name)
        with modes_kept(model):
            model.train()
            tracer = UtuneTracer()
            graph = tracer.trace(model, concrete_args=_concrete_args(model))
            expand_in_proj(graph, tracer.expanded)
    finally:
        for name, old in saved.items():
            if old is missing:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = old
    return graph, calls


class _CountReads:
    """A data descriptor for ``nn.Module.training`` that counts reads (it wins over the instance dict)."""

    def __init__(self) -> None:
        self.reads = 0

    def __get__(self, obj: nn.Module | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        self.reads += 1
        return obj.__dict__.get("training", True)

    def __set__(self, obj: nn.Module, value: bool) -> None:
        obj.__dict__["training"] = value


@contextmanager
def training_reads() -> Iterator[_CountReads]:
    """Count every read of any module's ``training`` flag inside the block (``self.training``, ``getattr``;
    not ``vars(m)["training"]``). A read from another thread counts too: that only costs a second trace."""
    if "training" in nn.Module.__dict__:  # nested, or torch defines it one day: count nothing, claim reads
        counter = _CountReads()
        counter.reads = 1
        yield counter
        return
    counter = _CountReads()
    nn.Module.training = counter  # type: ignore[assignment]
    try:
        yield counter
    finally:
        del nn.Module.training


def _trace_once(model: nn.Module, name: str) -> tuple[fx.GraphModule, int]:
    """The GraphModule and how many times the traced code read a ``training`` flag."""
    tracer = UtuneTracer()
    with training_reads() as counter:
        graph = tracer.trace(model, concrete_args=_concrete_args(model))
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta[PORTS] = tracer.ports
    if tracer.expanded:  # the in_proj views exist only in gm: add them, then call them
        install_views(gm, tracer.expanded)
        expand_in_proj(gm.graph, tracer.expanded)
        gm.recompile()
    return gm, counter.reads


def mode_value(module: nn.Module, train: Any, eval_: Any) -> Any:
    """``train`` while ``module`` is in training mode, else ``eval_``: what ``p if self.training else 0.0``
    computed in the traced code (called from the graph at run time)."""
    return train if module.training else eval_


_CONSTANT = (int, float, bool, type(None))


def _node_name(node: fx.Node) -> str:
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", node.name)  # numbered per tracer instance


def _arg_key(node: fx.Node) -> Any:
    return fx.node.map_arg((node.args, node.kwargs), lambda a: ("node", _node_name(a)))


def _constant_diffs(a: fx.GraphModule, b: fx.GraphModule) -> list[tuple[fx.Node, int | str, Any, Any]] | None:
    """Where two graphs of the same ops differ only in constant top-level arguments (attention's
    ``dropout_p``, ``F.dropout(..., training=self.training)``): (node of ``a``, position or keyword, value in
    ``a``, value in ``b``). None when they differ in anything else."""
    diffs: list[tuple[fx.Node, int | str, Any, Any]] = []
    for x, y in zip(a.graph.nodes, b.graph.nodes, strict=True):
        if _arg_key(x) == _arg_key(y):
            continue
        if len(x.args) != len(y.args) or set(x.kwargs) != set(y.kwargs):
            return None
        pairs = [*zip(range(len(x.args)), x.args, y.args, strict=True)]
        pairs += [(k, x.kwargs[k], y.kwargs[k]) for k in x.kwargs]
        for where, u, v in pairs:
            if isinstance(u, fx.Node) or isinstance(v, fx.Node):
                if not (isinstance(u, fx.Node) and isinstance(v, fx.Node) and _node_name(u) == _node_name(v)):
                    return None
            elif u != v:
                if not (isinstance(u, _CONSTANT) and isinstance(v, _CONSTANT)):
                    return None
                diffs.append((x, where, u, v))
    return diffs


def _switch_by_mode(gm: fx.GraphModule, model: nn.Module, diffs: list[tuple[fx.Node, int | str, Any, Any]]) -> bool:
    """Each differing constant of the train graph ``gm`` becomes ``mode_value(owner, train, eval)``, the owner
    being the module whose code read ``self.training`` (added to ``gm`` from ``model`` when the graph did not
    need it: torchvision's parameter-free ``StochasticDepth``); False (``gm`` unchanged) when a node has none."""
    # nn_module_stack's keys name a module's second call ``path@1``
    owners = [[re.sub(r"@\d+$", "", k) for k in list(n.meta.get("nn_module_stack", {}))[-1:]] for n, *_ in diffs]
    if not all(owners):
        return False
    for path in {o[0] for o in owners}:
        try:
            gm.get_submodule(path)
        except AttributeError:
            gm.add_submodule(path, model.get_submodule(path))
    for (node, where, train, eval_), owner in zip(diffs, owners, strict=True):
        with gm.graph.inserting_before(node):
            module = gm.graph.get_attr(owner[0])
            value = gm.graph.call_function(mode_value, (module, train, eval_))
        if isinstance(where, int):
            node.update_arg(where, value)
        else:
            node.update_kwarg(where, value)
    gm.recompile()
    return True


def _signature(gm: fx.GraphModule) -> list[tuple[str, str]]:
    # tensor constants are numbered per tracer instance: compare their presence, not their names
    return [(n.op, re.sub(r"_tensor_constant\d+", "_tensor_constant", str(n.target))) for n in gm.graph.nodes]


@torch.no_grad()
def _same_in_eval(
    model: nn.Module, gm: fx.GraphModule, img_size: int | None = None, size: tuple[int, int, int] | None = None
) -> bool:
    from utune.models import input_size

    was = model.training
    model.eval()
    gm.eval()
    try:
        x = torch.randn(2, *input_size(model, img_size, size), generator=torch.Generator().manual_seed(0))
        a, b = model(x), gm(x)
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    except Exception:
        return False
    finally:
        model.train(was)


def refuse_untraceable(model: nn.Module) -> None:
    """Libraries whose models torch.fx cannot trace, refused with the reason before fx fails inside them."""
    if type(model).__module__.split(".")[0] == "transformers":
        raise TraceError(
            f"{type(model).__name__} is a Hugging Face transformers model: transformers 5 removed its torch.fx "
            "tracer (transformers.utils.fx) and its models' forward cannot be traced symbolically",
            hint="tune the timm (or torchvision, open_clip) version of the architecture, e.g. "
            "vit_base_patch16_224, or use PEFT on the transformers model",
        )


def trace(
    model: nn.Module, name: str = "model", img_size: int | None = None, size: tuple[int, int, int] | None = None
) -> fx.GraphModule:
    """Trace ``model`` to a GraphModule sharing its parameters; TraceError names the model and cause.

    ``img_size``/``size``: the size the model was built at (the eval-mode check below runs it at that size)."""
    forget_unpatchable_wraps()  # a torch.fx leftover from an unpickled graph would fail this trace
    refuse_untraceable(model)
    was_training = model.training
    try:
        pin_attention(model)
        model.train()
        gm_train, reads = _trace_once(model, type(model).__name__)
        if reads == 0 and not reference_build():
            gm_train.train(was_training)
            return gm_train  # no code asked for the mode: the eval graph is this one
        model.eval()
        gm_eval, _ = _trace_once(model, type(model).__name__)
    except TraceError:
        raise
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... on Python control flow
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"torch.fx cannot trace {name}: {type(e).__name__}: {cause}",
            hint="the model's forward uses Python control flow on tensor values; register the offending "
            "module with timm.layers.register_notrace_module, or pick another model",
        ) from e
    finally:
        model.train(was_training)
    if _signature(gm_train) != _signature(gm_eval):
        # Some models only cache in eval mode (LeViT's attention biases): the train-mode graph is then
        # right in both modes. Accept it when, in eval mode, it computes exactly what the model computes.
        if _same_in_eval(model, gm_train, img_size, size):
            gm_train.train(was_training)
            return gm_train
        diff = next(
            (a, b)
            for a, b in zip(_signature(gm_train) + [("", "")], _signature(gm_eval) + [("", "")], strict=False)
            if a != b
        )
        raise TraceError(
            f"{name} traces to different graphs in train and eval mode (first difference: {diff[0]} vs {diff[1]})",
            hint="its forward branches on self.training outside a leaf module; utune cannot rewrite it safely",
        )
    diffs = _constant_diffs(gm_train, gm_eval)
    if diffs and _switch_by_mode(gm_train, model, diffs):  # e.g. attention dropout: p in training, 0.0 in eval
        gm_train.train(was_training)
        return gm_train
    gm_eval.train(was_training)
    return gm_eval


def forget_unpatchable_wraps() -> None:
    """Drop torch.fx wrap registrations that name no global of their module.

    Re-tracing a graph that specialised an optional argument to None (``concrete_args``), as unpickling a
    GraphModule does, registers ``torch.fx._symbolic_trace._assert_is_none`` by its dotted name in the
    generated module's globals, where no such key exists; every later ``symbolic_trace`` in the process then
    fails with a KeyError while patching it. Such an entry can never be patched, so forgetting it is safe.
    """
    import builtins

    import torch.fx._symbolic_trace as st

    table = st._wrapped_fns_to_patch
    for key in [k for k, frame in table.items() if k[1] not in frame and not hasattr(builtins, k[1])]:
        del table[key]

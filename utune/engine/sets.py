"""Several named tuner sets on one backbone: each set from its own spec or tuner file, all attached once.

``utune.build_sets({"cifar": "a.yaml", "flowers": "tuners.safetensors"})`` builds every set on the *same*
backbone object (its frozen weights are in memory once); each set gets its own tuners and its own copy of
the modules its spec trains (the head, with that set's class count). ``set_active(name)`` picks the set
that ``forward`` runs. ``forward_sets(x, names)`` runs several sets on one batch and computes every value
that no set's tuners reach only once: for Res-Tuning-Bypass sets (side networks on detached block outputs)
the whole backbone runs once for all of them; for sets that change the backbone (LoRA, adapters) only the
part before their first tuner is shared.
"""

from __future__ import annotations

import copy
import operator
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, cast

import torch
from torch import fx, nn

from utune.engine.sets_code import ROWS, SharedSets, _narrow, _rows_of, compile_sets
from utune.errors import UserInputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_CODE_CACHE = 16  # generated forwards kept per TunerSets (one per combination of sets and rows mode)


def _copy_path(root: nn.Module, path: str) -> None:
    """Give ``root`` its own copy of the module at ``path`` (its parents copied shallowly on the way)."""
    parent = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = copy.copy(parent.get_submodule(part))
        child._modules = dict(child._modules)
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = copy.deepcopy(parent.get_submodule(parts[-1]))


def derive(base: nn.Module, trainable_owners: Sequence[str], num_classes: int | None) -> nn.Module:
    """A root sharing every module of ``base`` but its own copies of ``trainable_owners`` (and of the head,
    reset to ``num_classes`` when that differs)."""
    root = copy.copy(base)
    root._modules, root._parameters, root._buffers = dict(base._modules), dict(base._parameters), dict(base._buffers)
    for path in sorted(set(trainable_owners)):
        if path:
            _copy_path(root, path)
    if num_classes is not None and getattr(base, "num_classes", num_classes) != num_classes:
        if not hasattr(root, "reset_classifier"):
            raise UserInputError(
                f"the sets need {num_classes} classes but this model has no reset_classifier",
                hint="give every set the same num_classes",
            )
        head = getattr(root, "pretrained_cfg", {}).get("classifier", "head")
        _copy_path(root, head) if isinstance(head, str) else None
        reset: Any = root.reset_classifier
        reset(num_classes)
    return root


def _owners(built_spec: Any, base: nn.Module) -> list[str]:
    from utune.graph.glob import glob_match
    from utune.graph.trainable import TypeSelector, typed_parameters

    names = [n for n, _ in base.named_parameters()]
    hit: set[str] = set()
    for g in built_spec.trainable:  # a glob of names, or {type: LayerNorm}
        if isinstance(g, TypeSelector):
            hit |= set(typed_parameters(base, g))
        else:
            hit |= {n for n in names if glob_match(g, n) or glob_match(g + ".**", n)}
    return sorted({n.rpartition(".")[0] for n in hit})


def _spec_of(source: Any) -> tuple[Any, Path | None]:
    """A spec (path, dict or Spec) as is; a tuner file: the spec it carries, and the file to load after."""
    from utune.spec import load_spec, load_spec_text

    if isinstance(source, str | Path) and str(source).endswith(".safetensors"):
        from utune.export.tuners_only import read_tuners

        _, meta = read_tuners(Path(source))
        # a data file: the code its spec names is imported only if the user named it too (utune._imports)
        text, path = meta["utune.spec"], Path(source)  # its paths are relative to the file
        return load_spec_text(text, f"{source} (embedded spec)", path=path, trusted=False), path
    return load_spec(source), None


class TunerSets(nn.Module):
    """Named tuner sets over one backbone (see the module docstring)."""

    def __init__(self, sets: Mapping[str, Any]) -> None:
        super().__init__()
        self.sets = nn.ModuleDict({name: b.model for name, b in sets.items()})
        self.built = dict(sets)
        self.active = next(iter(sets))
        self._dims: dict[str, Any] = {}

    def set_active(self, name: str) -> None:
        if name not in self.built:
            raise UserInputError(f"no tuner set named {name!r}", hint=f"the sets: {', '.join(self.built)}")
        self.active = name

    def forward(self, x: torch.Tensor) -> Any:
        return self.sets[self.active](x)

    def forward_sets(
        self, x: torch.Tensor, names: Sequence[str] | None = None, rows: Rows | None = None
    ) -> dict[str, Any]:
        """Each named set's output on ``x``; values no set's tuners reach are computed once.

        ``rows`` (a slice per set): ``x`` concatenates the sets' own batches (tasks from different datasets);
        each set's output is on its rows only, and its tuners and head run on those rows only.
        """
        names = list(names or (rows or self.built))
        for n in names:
            self.set_active(n)
        row_args = {f"{ROWS}{i}": rows[n] for i, n in enumerate(names)} if rows is not None else {}
        outs = self._compiled(names, rows is not None)(x, **row_args)
        return dict(zip(names, outs, strict=True))

    def _compiled(self, names: list[str], with_rows: bool) -> SharedSets:
        """The sets' graphs as one generated forward (:func:`utune.engine.sets_code.compile_sets`), kept
        while the graphs and what each trains stay the same (what is shared depends on both)."""
        graphs = [cast(fx.GraphModule, self.sets[n]) for n in names]
        untouched = tuple(_untouched(gm) for gm in graphs)  # the same object while nothing changed: hashed once
        key = (tuple(names), with_rows, tuple((id(gm), id(gm.graph)) for gm in graphs), untouched)
        cache = self.__dict__.setdefault("_code", {})
        if key not in cache:
            inputs = [{p.name for p in gm.graph.nodes if p.op == "placeholder"} for gm in graphs]
            shared = [u | i for u, i in zip(untouched, inputs, strict=True)]
            rows = None
            if with_rows:
                dims = [self.batch_dims(n) or {} for n in names]
                rows = [(_narrowable(gm.graph, sh, d), d) for gm, sh, d in zip(graphs, shared, dims, strict=True)]
            if len(cache) >= _CODE_CACHE:
                cache.pop(next(iter(cache)))
            cache[key] = compile_sets(graphs, shared, rows)
        return cast(SharedSets, cache[key])

    def batch_dims(self, name: str) -> Any:
        """The batch dim of every value of set ``name``'s graph (:func:`utune.graph.batch.batch_dims`), once."""
        from utune.graph.batch import batch_dims

        if name not in self._dims:
            gm = cast(fx.GraphModule, self.sets[name])
            self._dims[name] = batch_dims(gm, self.built[name].input_size)
        return self._dims[name]

    def losses(
        self,
        x: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        loss_fn: LossFn | None = None,
        rows: Rows | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each named set's loss on one batch ``x`` against its own ``targets[name]``, from one shared pass
        (:meth:`forward_sets`); their sum back-propagates into each set's own tuners and head only.
        ``rows``: each set's rows of ``x`` (its targets are for those rows)."""
        fn = loss_fn or nn.functional.cross_entropy
        out = self.forward_sets(x, list(targets), rows)
        return {n: fn(out[n], targets[n]) for n in targets}

    def train_step(
        self,
        x: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn | None = None,
        rows: Rows | None = None,
    ) -> dict[str, float]:
        """One multi-task training step: one backbone pass for every set in ``targets``, the sum of their
        losses backward, one ``optimizer`` step (over every set's trainable tensors, e.g.
        ``AdamW(p for p in sets.parameters() if p.requires_grad)``). The sum's gradient in each set is that
        set's own loss's (no set's tensors reach another's loss), so this equals one step per task.
        ``rows``: ``x`` concatenates the tasks' batches, each set's targets are for its rows."""
        losses = self.losses(x, targets, loss_fn, rows)
        optimizer.zero_grad(set_to_none=True)
        cast(torch.Tensor, sum(losses.values())).backward()
        optimizer.step()
        return {n: float(v.detach()) for n, v in losses.items()}


_Params = tuple[tuple[int, int], list[str], list[nn.Parameter]]
_PARAMS: weakref.WeakKeyDictionary[fx.GraphModule, _Params] = weakref.WeakKeyDictionary()
_UNTOUCHED: weakref.WeakKeyDictionary[fx.GraphModule, tuple[tuple[bool, ...], frozenset[str]]] = (
    weakref.WeakKeyDictionary()
)
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _named_parameters(gm: fx.GraphModule) -> _Params:
    """``gm``'s parameter names and parameters, remembered while its graph and code stay the same: walking the
    modules costs more than a small model's forward (0.25 ms of test_vit's 3 ms), and every forward_sets asks."""
    version = (id(gm.graph), id(gm.__dict__.get("_code")))
    known = _PARAMS.get(gm)
    if known is None or known[0] != version:
        named = list(gm.named_parameters())
        known = (version, [n for n, _ in named], [p for _, p in named])
        _PARAMS[gm] = known
    return known


def _untouched(gm: fx.GraphModule) -> frozenset[str]:
    """Names of the nodes no tuner affects (not downstream of a node a rule added, nor of a trained head);
    remembered per graph while the same parameters are trainable (every step asks: a few microseconds)."""
    _, names, params = _named_parameters(gm)
    flags = tuple(map(_REQUIRES_GRAD, params))
    known = _UNTOUCHED.get(gm)
    if known is not None and known[0] == flags:
        return known[1]
    found = _walk_untouched(gm, frozenset(n for n, on in zip(names, flags, strict=True) if on))
    _UNTOUCHED[gm] = (flags, found)
    return found


def _walk_untouched(gm: fx.GraphModule, trained: frozenset[str]) -> frozenset[str]:
    touched: set[fx.Node] = set()
    for node in gm.graph.nodes:
        added = "utune_rule" in node.meta
        target = str(node.target)
        reads_trained = (node.op == "call_module" and any(t.startswith(target + ".") for t in trained)) or (
            node.op == "get_attr" and any(t == target or t.startswith(target + ".") for t in trained)
        )
        if added or reads_trained or any(a in touched for a in node.all_input_nodes):
            touched.add(node)
    return frozenset(n.name for n in gm.graph.nodes if n not in touched and n.op not in ("placeholder", "output"))


Rows = Mapping[str, slice]  # each set's rows of a batch that concatenates the tasks' batches


class _SharedRun(fx.Interpreter):
    """Runs a set's graph, reusing (and filling) the values of untouched nodes that other sets computed.

    ``rows``: the set's own rows of the batch. The shared values are computed on the whole batch; what the
    set's own nodes read of them is narrowed to its rows (the batch dim of each value, and every size that
    is the batch size, from :func:`utune.graph.batch.batch_dims`), so its tuners and head run on its rows
    only. Where a value it reads hides the batch in another dim, the set runs on the whole batch and its
    output is narrowed instead.
    """

    def __init__(self, gm: nn.Module, cache: dict[str, Any], rows: slice | None = None, dims: Any = None) -> None:
        super().__init__(gm)
        self.cache = cache
        graph = cast(fx.GraphModule, gm).graph
        self.shared = _untouched(gm) | {n.name for n in graph.nodes if n.op == "placeholder"}  # type: ignore[arg-type]
        self.rows, self.dims, self.out_rows = rows, dims or {}, None
        if rows is not None and not _narrowable(graph, self.shared, self.dims):
            self.rows, self.out_rows = None, rows  # the whole batch, then the rows of the output

    def run(self, *args: Any, **kwargs: Any) -> Any:
        out = super().run(*args, **kwargs)
        return _rows_of(out, self.out_rows) if self.out_rows is not None else out

    def run_node(self, n: fx.Node) -> Any:
        if n.name not in self.shared:
            return super().run_node(n)
        if n.op == "placeholder":  # the whole batch (or a default): the same for every set
            self.cache.setdefault(n.name, super().run_node(n))
        elif n.name not in self.cache:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self.cache[a.name])
            self.cache[n.name] = getattr(self, n.op)(n.target, args, kwargs)
        return _narrow(self.cache[n.name], self.dims.get(n.name), self.rows)


def _narrowable(graph: fx.Graph, shared: AbstractSet[str], dims: Mapping[str, Any]) -> bool:
    """Every shared value a set's own nodes read has a known batch dim (or none)."""
    from utune.graph.batch import UNKNOWN

    frontier = {a.name for n in graph.nodes if n.name not in shared for a in n.all_input_nodes if a.name in shared}
    return bool(dims) and all(dims.get(name, UNKNOWN) != UNKNOWN for name in frontier)


_SET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def check_set_names(names: Iterable[Any]) -> None:
    """Set (task) names are plain names: they name submodules and, in ``utune multitask``, folders under
    ``--out`` (a ``/``, ``..`` or ``.`` would write elsewhere or break the module tree)."""
    for name in names:
        if not isinstance(name, str) or not _SET_NAME.fullmatch(name):
            raise UserInputError(
                f"task name {name!r} is not a plain name (letters, digits, _ and -, at most 64, no . or /)",
                hint="name the task, e.g. utune multitask cifar=specs/a.yaml (it becomes the folder --out/cifar)",
            )


def build_sets(sources: Mapping[str, Any], model: nn.Module | None = None) -> TunerSets:
    """Build every named set on one backbone (the first set's model, created once, or ``model``: any
    ``nn.Module`` of yours); a tuner file's set loads its tensors. The sets must share the architecture:
    model name, kwargs, size, base weights."""
    from utune.engine.build import _resolve_classes, build
    from utune.export.tuners_only import load_tuners

    if not sources:
        raise UserInputError("build_sets needs at least one named set", hint="build_sets({'task': 'spec.yaml'})")
    check_set_names(sources)
    built: dict[str, Any] = {}
    base: nn.Module | None = None
    first: Any = None
    for name, source in sources.items():
        spec, tuners = _spec_of(source)
        spec = _resolve_classes(spec)[0]  # num_classes left out: the dataset's, before the head is copied
        if first is None:
            built[name] = build(spec, model=model)
            first, base = spec, built[name].base
        else:
            _same_backbone(first, spec, name)
            assert base is not None
            built[name] = build(spec, base=derive(base, _owners(spec, base), spec.model.num_classes))
        if tuners is not None:
            load_tuners(built[name], tuners)
    return TunerSets(built)


def _same_backbone(first: Any, spec: Any, name: str) -> None:
    a, b = first.model, spec.model
    for key in ("name", "kwargs", "img_size", "pretrained", "frozen_dtype"):
        if getattr(a, key) != getattr(b, key):
            raise UserInputError(
                f"tuner set {name!r} is for another backbone: model.{key} {getattr(b, key)!r}, the first set's "
                f"{getattr(a, key)!r}",
                hint="every set of build_sets tunes the same model (name, kwargs, img_size, weights)",
            )

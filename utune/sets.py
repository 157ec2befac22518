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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import fx, nn

from utune.errors import UserInputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _copy_path(root: nn.Module, path: str) -> None:
    """Give ``root`` its own copy of the module at ``path`` (its parents copied shallowly on the way)."""
    parent = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = copy.copy(parent._modules[part])
        child._modules = dict(child._modules)
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = copy.deepcopy(parent._modules[parts[-1]])


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
        root.reset_classifier(num_classes)
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
        return load_spec_text(meta["utune.spec"], f"{source} (embedded spec)"), Path(source)
    return load_spec(source), None


class TunerSets(nn.Module):
    """Named tuner sets over one backbone (see the module docstring)."""

    def __init__(self, sets: Mapping[str, Any]) -> None:
        super().__init__()
        self.sets = nn.ModuleDict({name: b.model for name, b in sets.items()})
        self.built = dict(sets)
        self.active = next(iter(sets))

    def set_active(self, name: str) -> None:
        if name not in self.built:
            raise UserInputError(f"no tuner set named {name!r}", hint=f"the sets: {', '.join(self.built)}")
        self.active = name

    def forward(self, x: torch.Tensor) -> Any:
        return self.sets[self.active](x)

    def forward_sets(self, x: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, Any]:
        """Each named set's output on ``x``; values no set's tuners reach are computed once."""
        names = list(names or self.built)
        for n in names:
            self.set_active(n)
        cache: dict[str, Any] = {}
        return {n: _SharedRun(self.sets[n], cache).run(x) for n in names}

    def losses(
        self, x: torch.Tensor, targets: Mapping[str, torch.Tensor], loss_fn: LossFn | None = None
    ) -> dict[str, torch.Tensor]:
        """Each named set's loss on one batch ``x`` against its own ``targets[name]``, from one shared pass
        (:meth:`forward_sets`); their sum back-propagates into each set's own tuners and head only."""
        fn = loss_fn or nn.functional.cross_entropy
        out = self.forward_sets(x, list(targets))
        return {n: fn(out[n], targets[n]) for n in targets}

    def train_step(
        self,
        x: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn | None = None,
    ) -> dict[str, float]:
        """One multi-task training step: one backbone pass for every set in ``targets``, the sum of their
        losses backward, one ``optimizer`` step (over every set's trainable tensors, e.g.
        ``AdamW(p for p in sets.parameters() if p.requires_grad)``). The sum's gradient in each set is that
        set's own loss's (no set's tensors reach another's loss), so this equals one step per task."""
        losses = self.losses(x, targets, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        cast(torch.Tensor, sum(losses.values())).backward()
        optimizer.step()
        return {n: float(v.detach()) for n, v in losses.items()}


def _untouched(gm: fx.GraphModule) -> set[str]:
    """Names of the nodes no tuner affects (not downstream of a node a rule added, nor of a trained head)."""
    touched: set[fx.Node] = set()
    trained = {n for n, p in gm.named_parameters() if p.requires_grad}
    for node in gm.graph.nodes:
        added = "utune_rule" in node.meta
        target = str(node.target)
        reads_trained = (node.op == "call_module" and any(t.startswith(target + ".") for t in trained)) or (
            node.op == "get_attr" and any(t == target or t.startswith(target + ".") for t in trained)
        )
        if added or reads_trained or any(a in touched for a in node.all_input_nodes):
            touched.add(node)
    return {n.name for n in gm.graph.nodes if n not in touched and n.op not in ("placeholder", "output")}


class _SharedRun(fx.Interpreter):
    """Runs a set's graph, reusing (and filling) the values of untouched nodes that other sets computed."""

    def __init__(self, gm: nn.Module, cache: dict[str, Any]) -> None:
        super().__init__(gm)  # type: ignore[arg-type]
        self.cache = cache
        self.shared = _untouched(gm)  # type: ignore[arg-type]

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.shared and n.name in self.cache:
            return self.cache[n.name]
        value = super().run_node(n)
        if n.name in self.shared:
            self.cache[n.name] = value
        return value


def build_sets(sources: Mapping[str, Any]) -> TunerSets:
    """Build every named set on one backbone (the first set's model, created once); a tuner file's set
    loads its tensors. The sets must share the architecture: model name, kwargs, size, base weights."""
    from utune.api import build
    from utune.export.tuners_only import load_tuners

    if not sources:
        raise UserInputError("build_sets needs at least one named set", hint="build_sets({'task': 'spec.yaml'})")
    built: dict[str, Any] = {}
    base: nn.Module | None = None
    first: Any = None
    for name, source in sources.items():
        spec, tuners = _spec_of(source)
        if first is None:
            built[name] = build(spec)
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

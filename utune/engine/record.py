"""The build record: what :func:`utune.build` returns and every consumer reads.

A leaf of the package: it imports the graph layer (sites, the manifest) and nothing that consumes a build,
so the export code, runs, drawings and the CLI may all import it without a cycle. The tuned model carries
the parts of the record that merge and load need (:data:`RECORD`, see :mod:`utune.engine.tuned`), so a copied or
unpickled model can still ``merge_and_unload()``: :func:`utune.engine.tuned_ops.built_of` makes the record back.

:class:`BuildReport` is the typed, read-only summary of a build, derived from the manifest: a rule's
parameter count and attachments are its entries'. It reads like the mapping it replaced
(``report["tuner_params"]``) and :meth:`BuildReport.as_dict` gives the JSON document. Nothing writes into it:
a change (tuners loaded from a file, say) makes a new one (:meth:`BuildReport.replace`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from utune.graph.manifest import Entry, Manifest
from utune.graph.sites import Site

if TYPE_CHECKING:
    from utune.spec import Spec


class _Record(Mapping[str, Any]):
    """A frozen dataclass read as a mapping of its fields (``record["name"]``, ``.get``, ``in``, ``==`` a dict)."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        """A plain, JSON-able copy (tuples as lists, nested records as dicts)."""
        return {k: _plain(getattr(self, k)) for k in self._keys()}


def _plain(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, eq=False)
class RuleReport(_Record):
    """One rule of the spec as built: where its tuners went and what they cost."""

    name: str
    kind: str
    placement: str
    sites: tuple[str, ...]
    params: int  # each tensor once (a tensor shared across the rule's sites counts once)
    identity_at_init: bool
    mergeable: bool
    attachments: tuple[Mapping[str, Any], ...]  # Entry.as_dict() of each manifest entry, in order


@dataclass(frozen=True, eq=False)
class BuildReport(_Record):
    """The build's summary (see the module docstring); ``as_dict()`` is ``utune apply --format json``'s report."""

    model: str
    num_classes: int | None
    num_outputs: int | None  # the size of the model's last output dim, from the traced shapes
    total_params: int
    trainable_params: int
    trainable_pct: float
    tuner_params: int
    base_trainable_params: int  # base parameters the spec's ``trainable:`` opens
    trainable: tuple[str, ...]
    tuners: tuple[RuleReport, ...]
    input_size: tuple[int, int, int]
    identity_max_abs_diff: float | None = None  # --verify: max |tuned - base| on a random batch
    output_scale: float | None = None  # --verify: max |base| on that batch
    build_seconds: float | None = None
    timings: Mapping[str, float] = field(default_factory=dict)  # model creation, trace + shapes, passes
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    tuners_file: str | None = None  # tuner weights loaded after the build (``--tuners``)

    def replace(self, **changes: Any) -> BuildReport:
        """A new report with ``changes`` (this one is left as it is)."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def rule(
        name: str, kind: str, placement: str, identity_at_init: bool, mergeable: bool, entries: Sequence[Entry]
    ) -> RuleReport:
        """A rule's row, from its manifest entries."""
        sites = tuple(dict.fromkeys(e.site for e in entries))
        return RuleReport(
            name=name,
            kind=kind,
            placement=placement,
            sites=sites,
            params=sum(e.params for e in entries),
            identity_at_init=identity_at_init,
            mergeable=mergeable,
            attachments=tuple(e.as_dict() for e in entries),
        )


def model_label(spec: Spec, model: nn.Module, given: bool) -> str:
    """How reports and files name the model: the spec's ``model.name``, else the module's class."""
    if spec.model.name is not None:
        return str(spec.model.name)
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class Traced:
    """A traced model with its sites, shapes propagated on a dummy batch."""

    name: str
    model: nn.Module
    gm: fx.GraphModule
    sites: dict[str, Site]
    input_size: tuple[int, int, int]


@dataclass
class Built:
    """The result of :func:`utune.build`: the rewritten model (trainable parameters set) and its report."""

    spec: Spec
    model: fx.GraphModule  # a utune.engine.tuned.TunedModel: the rewritten graph, with the base model's public API
    base: nn.Module  # the untouched model object (shares the frozen parameters with ``model``)
    report: BuildReport
    input_size: tuple[int, int, int]
    data_config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    manifest: Manifest = field(default_factory=Manifest)  # what the rewriter attached, in order
    verify_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, base output) when verify=True
    given: bool = False  # the model was passed in (``model=``/``base=``), not created from the spec's name

    @property
    def model_label(self) -> str:
        """The spec's model name, or the given module's class (``package.module.Class``)."""
        return model_label(self.spec, self.base, self.given)

    @property
    def tuner_modules(self) -> dict[str, list[str]]:
        """Rule name -> the names of its tuner modules in ``model``, in the order they were attached."""
        return {rule.name: self.manifest.modules(rule.name) for rule in self.spec.tuners}

"""Attachments as data: what a tuner kind *plans*, what the rewriter *applied*.

The U-Tuning view says every method is a frozen op plus a tuner with a tap (what it reads) and a join
(where its output goes). A kind returns :class:`Attachment` values, nothing else; the one rewriter
(:mod:`utune.graph.rewrite`) turns each into graph nodes and records an :class:`Entry` of the
:class:`Manifest`. Everything downstream (the build report, tuner-only keys, merge, the PEFT filter,
drawings) reads the manifest; nothing parses a printed report or infers a join from the graph's shape.

Values a tuner reads (its ``inputs``):

- :class:`Tap`: the input or output of a site (or of its parent), optionally through frozen base layers
  (``through``: e.g. a block's pre-norm, then the attention's query projection) and detached;
- :class:`Frozen`: a frozen base tensor as it is (``blocks.0.attn.qkv.weight``; a missing bias is None);
- :class:`Ref`: the output of an earlier attachment of the same plan (a side network's previous step).

Joins (:data:`JOINS`): ``add`` ``y = out + T(inputs)``; ``replace`` ``y = T(inputs)`` in place of the
site's output; ``replace_input`` the site reads ``T(inputs)`` (or ``inputs[0]`` when there is no module)
instead of its input; ``kv_concat`` the attention inside the site reads ``T(k, v)`` as its keys and
values (its mask padded by ``options["mask_pad"]``); ``side`` the module runs on its inputs and its output
is only read by later attachments (a side network).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import fx, nn

    from utune.graph.sites import Site

Where = Literal["input", "output", "parent.input", "parent.output"]
WHERE: tuple[Where, ...] = ("input", "output", "parent.input", "parent.output")
Join = Literal["add", "replace", "replace_input", "kv_concat", "side"]
JOINS: tuple[Join, ...] = ("add", "replace", "replace_input", "kv_concat", "side")


@dataclass(frozen=True)
class Tap:
    """A value of the graph: ``where`` of ``site`` (None: the attachment's own), then ``through`` frozen
    base layers in order, then detached when ``detach``."""

    where: Where = "input"
    site: str | None = None
    through: tuple[str, ...] = ()
    detach: bool = False

    def describe(self, own: str) -> str:
        """In words: ``the input of blocks.0 through blocks.0.norm1, blocks.0.attn.qkv``."""
        site = self.site or own
        if self.where.startswith("parent."):
            text = f"the {self.where.split('.')[1]} of the module around {site}"
        else:
            text = f"the {self.where} of {site}"
        if self.through:
            text += f" through {', '.join(self.through)}"
        return text + (" (detached)" if self.detach else "")


@dataclass(frozen=True)
class Frozen:
    """A frozen base tensor, read as it is (``<module path>.<attribute>``)."""

    path: str


@dataclass(frozen=True)
class Ref:
    """The output of attachment ``index`` of the same plan."""

    index: int


Value = Tap | Frozen | Ref


@dataclass
class Attachment:
    """One planned tuner: ``module`` joins ``site`` by ``join``, reading ``inputs``.

    ``role`` tells two modules of one rule at one site apart (VPT's token removal at the last block);
    ``options`` holds what a join needs beyond its inputs (``kv_concat``: ``mask_pad``); ``reshapes`` says
    the join changes the shapes of values after it (prompt tokens), so shapes are recorded again.
    ``shared`` names tensors of ``module`` (``lora_A.weight``, a buffer ``vera_A``) that are one tensor for
    every attachment of the rule naming them: the rewriter ties them to the first one's, so they train,
    checkpoint, export and count once and every site that reads them folds with the same values.
    """

    site: Site
    module: nn.Module | None
    join: Join
    inputs: tuple[Value, ...] = ()
    role: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    reshapes: bool = False
    shared: tuple[str, ...] = ()


@dataclass
class Entry:
    """What the rewriter attached for one :class:`Attachment`.

    ``module`` is the tuner module's name in the GraphModule (``""`` for a join without one);
    ``nodes`` the nodes it made or joined: ``call`` (runs the module), ``onto`` (the value the join changes),
    ``joined`` (what now stands for it); they belong to ``Built.model.graph``. ``params`` counts the
    module's parameters once per rule (a tensor shared with an earlier site is not counted again);
    ``shared`` names its tensors tied across the rule's sites.
    """

    rule: str
    kind: str
    site: str
    module: str
    join: Join
    inputs: tuple[Value, ...]
    role: str
    params: int
    nodes: dict[str, fx.Node] = field(default_factory=dict)
    shared: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The site-name form of tuner-only files: ``<rule>/<site>`` (``#<role>`` for a second module)."""
        return f"{self.rule}/{self.site}" + (f"#{self.role}" if self.role else "")

    @property
    def tap(self) -> Tap | None:
        """The first value the tuner reads from the graph."""
        return next((v for v in self.inputs if isinstance(v, Tap)), None)

    def reads(self) -> str:
        tap = self.tap
        return tap.describe(self.site) if tap is not None else "no value of the graph"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (for the report): no graph nodes."""
        tap = self.tap
        return {
            "site": self.site,
            "module": self.module,
            "join": self.join,
            "role": self.role,
            "tap": tap.where if tap is not None else None,
            "reads": self.reads(),
            "params": self.params,
            "shared": list(self.shared),
        }


@dataclass
class Manifest:
    """Every :class:`Entry` in the order the rewriter applied them."""

    entries: list[Entry] = field(default_factory=list)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def rule(self, name: str) -> list[Entry]:
        return [e for e in self.entries if e.rule == name]

    def tuners(self) -> list[Entry]:
        """The entries that added a module (the ones that own tensors, checkpoints and exports see)."""
        return [e for e in self.entries if e.module]

    def modules(self, rule: str) -> list[str]:
        """The names of ``rule``'s tuner modules that hold parameters (a token-dropping join holds none)."""
        return [e.module for e in self.entries if e.rule == rule and e.module and e.params > 0]

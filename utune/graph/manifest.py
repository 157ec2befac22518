"""The record of what the rewriter attached: one :class:`Attachment` per tuner module.

The rewriter writes it at insertion time; everything downstream (merge, exports) reads it instead of
guessing from the graph's shape how a tuner was joined (a residual ``out + shortcut`` whose shortcut
ends in a tuner looks like an add-join, and is not one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import fx

Join = Literal["add", "replace", "replace_input", "custom"]


@dataclass(frozen=True, eq=False)
class Attachment:
    """How one tuner module joins the model: ``add`` ``y = out + T(tap)``; ``replace`` ``y = T(out)``;
    ``replace_input`` the site reads ``T(in)``; ``custom`` anything a kind wires itself (prefix K/V, side nets).

    The nodes are those of the rewritten GraphModule (``Built.model.graph``): ``call`` runs the tuner
    module, ``onto`` is the value the join changes (the site's output, or its input for ``replace_input``),
    ``joined`` is the node that now stands for it (the add; the call itself for ``replace``). Nodes a kind
    wired itself are ``None`` where the rewriter cannot know them.
    """

    rule: str  # the spec rule's name
    site: str  # the site path, as `utune inspect` prints it
    module: str  # the tuner module's name in the GraphModule (``utune.<rule>.<site>``)
    join: Join = "custom"
    tap: str | None = None  # what the tuner reads: input, output, parent.input, parent.output (or a description)
    call: fx.Node | None = None
    onto: fx.Node | None = None
    joined: fx.Node | None = None

"""The public API for writing a tuner kind outside utune (docs/adding-a-kind.md walks one).

A kind is a class, found by the name a spec's ``kind:`` gives it:

- ``kind: my_pkg.kinds:GatedAdapter``: imported from your code (only when you named it: a spec you
  pass, ``--trust``, ``UTUNE_TRUST``; a tuner file or other data file naming it is refused);
- ``kind: gated_adapter``: published by an installed package in the entry-point group ``utune.kinds``
  (``[project.entry-points."utune.kinds"] gated_adapter = "my_pkg.kinds:GatedAdapter"``).

The contract (kept from utune 0.2 on; changes are recorded in the CHANGELOG):

- subclass :class:`TunerKind`; set ``Options`` to a :class:`TunerOptions` subclass whose fields (with
  defaults and a ``description``) are the rule's own keys, written flat in the rule and validated at the
  spec's FILE:LINE; ``summary`` (one line: the math and the paper); ``placements`` / ``default_placement`` /
  ``taps`` (what a rule may ask; the spec refuses the rest); ``identity_at_init`` and ``identity_atol`` (the
  tuned model equals the base at init within that tolerance; the contract kit holds the kind to it);
  ``mergeable`` (it folds). ``kind`` may be left out: the name the spec uses is then its name.
- per site, :meth:`TunerKind.build` returns the tuner module ``U`` and the engine attaches it as
  ``x' = OP(x) + U(tap)`` (tap: the site's input for ``parallel``, its output for ``sequential``); or
  :meth:`TunerKind.plan` returns :class:`Attachment` values (a module, a join: ``add``, ``replace``,
  ``replace_input``..., and the values it reads: :class:`Tap`) for other shapes of tuner. A kind never
  touches the graph; it asks :class:`PlanContext` for shapes and layouts, and raises
  :meth:`TunerKind.fail` (a clear refusal naming the site) for a site it cannot serve.
- a kind whose modules fold into the base weights (``export --merge``) sets ``mergeable = True`` and gives
  its module a ``fold(layer: Layer, tap: str)`` method: ``tap`` is ``"input"`` (``y + U(x)``),
  ``"output"`` (``y + U(y)``), ``"replace"`` (``U(y)``) or ``"input_map"`` (the layer reads ``U(x)``); the
  method applies its algebra with :class:`Layer`'s moves on float64 copies (``add_input_map``,
  ``mix_outputs``, ``scale_shift``, ``map_inputs``, ``scale_shift_inputs``) or raises :class:`NotMergeable`
  saying why. Merged must equal unmerged: :func:`utune.testing.check_kind` checks it.
"""

from __future__ import annotations

from utune.graph.context import PlanContext
from utune.graph.manifest import Attachment, Frozen, Ref, Tap
from utune.graph.sites import Site
from utune.tuners.base import TunerKind, TunerOptions
from utune.tuners.fold import Layer, NotMergeable, f64
from utune.tuners.modules import Scale, ScaleMode
from utune.tuners.registry import ENTRY_POINT_GROUP, get_kind, kinds

__all__ = [
    "ENTRY_POINT_GROUP",
    "Attachment",
    "Frozen",
    "Layer",
    "NotMergeable",
    "PlanContext",
    "Ref",
    "Scale",
    "ScaleMode",
    "Site",
    "Tap",
    "TunerKind",
    "TunerOptions",
    "f64",
    "get_kind",
    "kinds",
]

"""Graph passes that attach tuners: one tap (what the tuner reads), one join (where its value goes).

Joins:
- ``add``: ``y = out + T(tap)`` at a site's output (parallel: tap = the site's input; sequential:
  tap = its output);
- ``replace``: ``y = T(out)`` (SSF, IA³: scale and shift the output);
- ``replace_input``: the site reads ``T(in)`` instead of ``in`` (prompt tokens);
- custom joins (attention K/V) are built from :meth:`Rewriter.call` and :meth:`Rewriter.redirect`.

Every tuner module gets an :class:`~utune.graph.manifest.Attachment` when it is added, completed by the
join that wires it (:attr:`Rewriter.attachments`, in insertion order): the one record of how it was
attached, which merge and the exports read instead of re-inferring joins from the graph.

Each pass inserts nodes, then the graph is linted and recompiled; a failure names the rule and the
site. New nodes get the module stack of the site's parent, so later passes still see one composite
site per module. Values a pass replaced are tracked, so rules stack on the same site in spec order.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from utune.errors import RewriteError, SelectionError
from utune.graph.manifest import Attachment, Join
from utune.graph.shapes import NodeFailure, propagate_shapes
from utune.graph.sites import Site

TUNER_ROOT = "utune"


def module_key(path: str) -> str:
    """A site path as a module name: ``blocks.3.attn::sdpa`` -> ``blocks_3_attn__sdpa``."""
    return re.sub(r"[^0-9A-Za-z_]", "_", path)


class Rewriter:
    """Holds a GraphModule under rewrite and the helpers every tuner kind's ``insert`` uses."""

    def __init__(
        self,
        gm: fx.GraphModule,
        sites: dict[str, Site],
        root: nn.Module | None = None,
        example: torch.Tensor | None = None,
    ) -> None:
        self.example = example  # a dummy batch: shapes of nodes inserted by earlier passes are re-propagated
        self.gm = gm
        self.root = root if root is not None else gm  # the original model: attributes gm did not copy
        self.graph = gm.graph
        self.sites = sites
        self._current: dict[fx.Node, fx.Node] = {}
        self._attached: dict[str, Attachment] = {}  # tuner module name -> how it was attached
        self.rule = ""
        self.site: Site | None = None
        if not hasattr(gm, TUNER_ROOT):
            gm.add_module(TUNER_ROOT, nn.Module())

    # ----- values -----
    def current(self, node: fx.Node) -> fx.Node:
        """The latest value standing for ``node`` after earlier joins replaced it."""
        while node in self._current:
            node = self._current[node]
        return node

    def tap(self, site: Site, where: str) -> fx.Node:
        """The node a tuner reads: ``input``, ``output``, ``parent.input`` or ``parent.output``."""
        target = site
        if where.startswith("parent."):
            parent_path = site.enclosing.rpartition(".")[0]
            if site.op in ("function", "method"):
                parent_path = site.enclosing
            if parent_path not in self.sites:
                raise SelectionError(
                    f"rule {self.rule!r}: site {site.path} has no parent module to tap",
                    hint="use tap: input or tap: output",
                )
            target = self.sites[parent_path]
            where = where.split(".", 1)[1]
        node = target.input if where == "input" else target.output
        if node is None:
            what = "no input" if where == "input" else f"{len(target.outputs)} outputs"
            raise SelectionError(
                f"rule {self.rule!r}: site {target.path} has {what}, so a tuner cannot read its {where}",
                hint="select a module with one input and one output (`utune inspect` shows them)",
            )
        return self.current(node)

    def output(self, site: Site) -> fx.Node:
        node = site.output
        if node is None:
            raise SelectionError(
                f"rule {self.rule!r}: site {site.path} has {len(site.outputs)} outputs; a tuner joins one value",
                hint="select a module or op with a single output",
            )
        return self.current(node)

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        """Output shape of ``node``; nodes new since the last propagation trigger one more ShapeProp."""
        meta = node.meta.get("tensor_meta")
        if meta is None and self.example is not None:
            self.propagate(self.rule)
            meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def propagate(self, rule: str | None = None) -> None:
        """Run the rewritten graph on the dummy batch (eval, no grad), recording every node's shape.

        Called when a pass needs shapes of nodes inserted earlier, and once after all rules: a rewrite
        that lints but fails at run time (a token count a relative-position table cannot take, say) is
        caught here and named by the rule whose nodes it broke, not at training time.
        """
        if self.example is None:
            return
        self.gm.recompile()
        try:
            propagate_shapes(self.gm, self.example)
        except NodeFailure as e:
            culprit = e.node.meta.get("utune_rule")
            who = f"rule {culprit or rule!r}" if (culprit or rule) else "the rewritten model"
            by = f" (a node added by rule {culprit!r})" if culprit else ""
            first = str(e.cause).splitlines()[0] if str(e.cause) else ""
            raise RewriteError(
                f"{who}: the rewritten model fails on a dummy batch at node {e.node.name}{by}: "
                f"{type(e.cause).__name__}: {first}",
                hint="this kind does not fit these sites of this model (e.g. extra tokens where the model expects "
                "a fixed count); select other sites or another kind",
            ) from e

    # ----- the record of what was attached -----
    @property
    def attachments(self) -> list[Attachment]:
        """One record per tuner module, in insertion order."""
        return list(self._attached.values())

    def _owner(self, target: str) -> str | None:
        """The tuner module ``target`` is (or is a submodule of), when it is one."""
        if target in self._attached:
            return target
        return next((name for name in self._attached if target.startswith(name + ".")), None)

    def record(self, target: str, join: Join, tap: str | None, call: fx.Node, onto: fx.Node, joined: fx.Node) -> None:
        """Complete the record of tuner module ``target`` (kinds with custom joins may call this too)."""
        owner = self._owner(target)
        if owner is None:  # a kind calling a module it did not add through add_module: nothing to record
            return
        self._attached[owner] = dataclasses.replace(
            self._attached[owner], join=join, tap=tap, call=call, onto=onto, joined=joined
        )

    # ----- insertion -----
    def add_module(self, site: Site, module: nn.Module) -> str:
        name = f"{TUNER_ROOT}.{module_key(self.rule)}.{module_key(site.path)}"
        self.gm.add_submodule(name, module)
        self._attached[name] = Attachment(self.rule, site.path, name)  # "custom" until a join completes it
        return name

    def _stack_for(self, site: Site) -> dict[str, Any]:
        anchor = site.output or (site.nodes[0] if site.nodes else None)
        stack = dict(anchor.meta.get("nn_module_stack", {})) if anchor is not None else {}
        # the new nodes belong to the site's parent, not to the site itself
        keep = {}
        for k, v in stack.items():
            if v[0] == site.enclosing and site.op in ("module", "composite"):
                break
            keep[k] = v
        return keep

    def _new(self, node: fx.Node) -> fx.Node:
        if self.site is not None:
            node.meta["nn_module_stack"] = copy.copy(self._stack_for(self.site))
            node.meta["utune_rule"] = self.rule
        return node

    def call(self, target: str, args: tuple[Any, ...], after: fx.Node, kwargs: dict[str, Any] | None = None) -> fx.Node:
        with self.graph.inserting_after(after):
            node = self._new(self.graph.call_module(target, args, kwargs or {}))
        owner = self._owner(target)
        if owner is not None and self._attached[owner].call is None:  # custom joins: at least the call is known
            self._attached[owner] = dataclasses.replace(self._attached[owner], call=node)
        return node

    def call_function(self, fn: Callable[..., Any], args: tuple[Any, ...], after: fx.Node) -> fx.Node:
        with self.graph.inserting_after(after):
            return self._new(self.graph.call_function(fn, args))

    def redirect(self, old: fx.Node, new: fx.Node, keep: set[fx.Node]) -> None:
        """Every use of ``old`` except those in ``keep`` now reads ``new``."""
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in keep)
        self._current[old] = new

    def call_base(self, path: str, args: tuple[Any, ...], after: fx.Node) -> fx.Node:
        """Call a frozen base layer again (e.g. a query projection on a tuner's tap)."""
        site = self.sites.get(path)
        if site is None or site.op != "module":
            raise SelectionError(
                f"rule {self.rule!r}: the base layer {path} is not called as a module in the graph",
                hint="this model reads that layer's weights directly; pick another site or kind",
            )
        return self.call(path, args, after=after)

    def later(self, *nodes: fx.Node) -> fx.Node:
        """The node that comes last in graph order (insert after it so every input exists)."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return max(nodes, key=lambda n: order[n])

    # ----- the standard joins -----
    def join_add(
        self,
        site: Site,
        target: str,
        tap: str | fx.Node,
        extra: tuple[Any, ...] = (),
        reads: str | None = None,
    ) -> fx.Node:
        """``y = out + T(tap, *extra)``; ``tap`` names what T reads (``input``, ``parent.output``...) or is
        a node a kind computed itself, then described by ``reads`` for the record."""
        where = tap if isinstance(tap, str) else (reads or "custom")
        node = self.tap(site, tap) if isinstance(tap, str) else tap
        out = self.output(site)
        inputs = [node, *[e for e in extra if isinstance(e, fx.Node)]]
        t = self.call(target, (node, *extra), after=self.later(out, *inputs))
        y = self.call_function(operator.add, (out, t), after=t)
        if "tensor_meta" in out.meta:  # same shape as the value it replaces
            y.meta["tensor_meta"] = out.meta["tensor_meta"]
        self.redirect(out, y, keep={t, y})
        self.record(target, "add", where, call=t, onto=out, joined=y)
        return y

    def join_replace(self, site: Site, target: str) -> fx.Node:
        """``y = T(out)``: every reader of the site's output reads the tuner's instead."""
        out = self.output(site)
        y = self.call(target, (out,), after=out)
        if "tensor_meta" in out.meta:
            y.meta["tensor_meta"] = out.meta["tensor_meta"]
        self.redirect(out, y, keep={y})
        self.record(target, "replace", "output", call=y, onto=out, joined=y)
        return y

    def join_replace_input(self, site: Site, target: str) -> fx.Node:
        """``site`` (and only it) reads ``T(in)`` instead of its input ``in``."""
        inp = self.tap(site, "input")
        y = self.call(target, (inp,), after=inp)
        inside = set(site.nodes)
        for user in list(inp.users):
            if user in inside:
                user.replace_input_with(inp, y)
        self.record(target, "replace_input", "input", call=y, onto=inp, joined=y)
        return y

    # ----- bookkeeping -----
    @contextmanager
    def pass_for(self, rule: str, site: Site) -> Iterator[None]:
        """Run one insertion; lint and recompile; name the rule and site when anything breaks."""
        self.rule, self.site = rule, site
        try:
            yield
            self.graph.lint()  # cheap; the code is regenerated (recompile) before the graph next runs
        except (SelectionError, RewriteError):
            raise
        except Exception as e:
            raise RewriteError(
                f"rule {rule!r}: inserting the tuner at {site.path} failed: {type(e).__name__}: {e}",
                hint="run with UTUNE_DEBUG=1 for the traceback and report it with the spec",
            ) from e
        finally:
            self.site = None

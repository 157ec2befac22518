"""The one rewriter: it turns planned :class:`~utune.graph.manifest.Attachment` values into graph nodes.

Every tuner kind only *plans* (see :mod:`utune.graph.manifest` for taps, values and joins); this module is
the only place that inserts nodes for tuners. Each attachment is one pass: the module is added under
``utune.<rule>.<site>``, its inputs are resolved to nodes (taps through frozen layers, frozen tensors,
earlier attachments' outputs), the join wires its output in, and the graph is linted; a failure names the
rule and the site. The pass records an :class:`~utune.graph.manifest.Entry` with the nodes it made.

New nodes get the module stack of the site's parent, so later passes still see one composite site per
module. Values a join replaced are tracked (:meth:`Rewriter.current`), so rules stack on the same site in
spec order.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from utune.errors import RewriteError, SelectionError
from utune.graph.attention import find_attention, pad_mask
from utune.graph.manifest import Attachment, Entry, Frozen, Ref, Value
from utune.graph.mha import state_key
from utune.graph.shapes import NodeFailure, propagate_shapes
from utune.graph.share import Share, has_tensor, tensor_names, tie
from utune.graph.sites import Site

TUNER_ROOT = "utune"
Nodes = dict[str, fx.Node]


def module_key(path: str) -> str:
    """A site path as a module name: ``blocks.3.attn::sdpa`` -> ``blocks_3_attn__sdpa``."""
    return re.sub(r"[^0-9A-Za-z_]", "_", path)


def _nodes(values: Sequence[Any]) -> list[fx.Node]:
    return [v for v in values if isinstance(v, fx.Node)]


class Rewriter:
    """A GraphModule under rewrite: resolves values, applies joins, records the manifest entries."""

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
        self._ties: dict[str, dict[str, torch.Tensor]] = {}  # rule -> shared tensor name -> the tensor
        self._counted: dict[str, set[int]] = {}  # rule -> ids of the parameters already counted
        self._site_input: dict[str, fx.Node] = {}  # site -> the value it reads after a replace_input
        self._stacking = False  # planning a replace_input: its tap of the site's input is what the site reads now
        self.rule = ""
        self.site: Site | None = None
        if not hasattr(gm, TUNER_ROOT):
            gm.add_module(TUNER_ROOT, nn.Module())

    # ----- values ---------------------------------------------------------------------------------------
    def current(self, node: fx.Node) -> fx.Node:
        """The latest value standing for ``node`` after earlier joins replaced it."""
        while node in self._current:
            node = self._current[node]
        return node

    def tapped_site(self, site: Site, where: str) -> tuple[Site, str]:
        """The site whose ``input``/``output`` ``where`` names (its parent for ``parent.*``)."""
        if not where.startswith("parent."):
            return site, where
        parent_path = site.enclosing if site.op in ("function", "method") else site.enclosing.rpartition(".")[0]
        if parent_path not in self.sites:
            raise SelectionError(
                f"rule {self.rule!r}: site {site.path} has no parent module to tap", hint="use tap: input or output"
            )
        return self.sites[parent_path], where.split(".", 1)[1]

    def tap(self, site: Site, where: str) -> fx.Node:
        """The node a tuner reads: ``input``, ``output``, ``parent.input`` or ``parent.output`` of ``site``."""
        target, where = self.tapped_site(site, where)
        node = target.input if where == "input" else target.output
        if node is None:
            what = "no input" if where == "input" else f"{len(target.outputs)} outputs"
            raise SelectionError(
                f"rule {self.rule!r}: site {target.path} has {what}, so a tuner cannot read its {where}",
                hint="say which with `output: N` in the rule (its position in what the module returns), or select "
                "a module with one output (`utune inspect` shows them)"
                if where == "output"
                else "select a module that reads a tensor (`utune inspect` shows them)",
            )
        if where == "input" and self._stacking and target.path in self._site_input:  # replace_inputs stack
            return self._site_input[target.path]
        return self.current(node)

    def output(self, site: Site) -> fx.Node:
        node = site.output
        if node is None:
            raise SelectionError(
                f"rule {self.rule!r}: site {site.path} has {len(site.outputs)} outputs; a tuner joins one value",
                hint="say which with `output: N` in the rule (N: its position in what the module's forward returns, "
                "from 0), or select a module or op with a single output",
            )
        return self.current(node)

    def value(self, v: Value, site: Site, made: Sequence[fx.Node | None]) -> Any:
        """The node (or constant) standing for a planned value."""
        if isinstance(v, Ref):
            node = made[v.index]
            if node is None:
                raise RewriteError(f"rule {self.rule!r}: attachment {v.index} of its plan has no output to read")
            return node
        if isinstance(v, Frozen):
            return self._frozen(v.path)
        node = self.tap(self.sites[v.site] if v.site else site, v.where)
        for layer in v.through:
            node = self.call_base(layer, (node,), after=node)
        if v.detach:
            node = self.call_function(torch.detach, (node,), after=node)
        return node

    def _frozen(self, path: str) -> fx.Node | None:
        owner, _, attr = path.rpartition(".")
        layer = self.gm.get_submodule(owner)
        if getattr(layer, attr, None) is None:  # e.g. a Linear without bias
            return None
        path = state_key(layer, owner, attr)  # a view's tensor (an MHA's in_proj.weight) is read where it lives
        first = next(n for n in self.graph.nodes if n.op != "placeholder")
        with self.graph.inserting_before(first):
            return self._new(self.graph.get_attr(path))

    # ----- shapes ---------------------------------------------------------------------------------------
    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        """Output shape of ``node``; nodes new since the last propagation trigger one more ShapeProp."""
        meta = node.meta.get("tensor_meta")
        if meta is None and self.example is not None:
            self.propagate(self.rule)
            meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def propagate(self, rule: str | None = None, *, real: bool = False) -> None:
        """Run the rewritten graph on the dummy batch (eval, no grad), recording every node's shape.

        Called when a plan needs shapes of nodes inserted earlier, and once after all rules: a rewrite
        that lints but fails at run time (a token count a relative-position table cannot take, say) is
        caught here and named by the rule whose nodes it broke, not at training time. On the meta device
        (shape errors show there; a meta failure is re-run for real) unless ``real``.
        """
        if self.example is None:
            return
        self.gm.recompile()
        try:
            propagate_shapes(self.gm, self.example, real=real)
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

    # ----- applying a plan --------------------------------------------------------------------------------
    def apply(self, rule: str, kind: str, plan: Sequence[Attachment], share: Share | None = None) -> list[Entry]:
        """Apply every attachment of one plan, each as its own pass; returns their manifest entries.

        ``share`` (the rule's ``share:``) ties the named tensors of every attachment's module that has them.
        """
        entries: list[Entry] = []
        made: list[fx.Node | None] = []  # each attachment's output, for Ref values
        for att in plan:
            with self.pass_for(rule, att.site):
                name = self._add_module(rule, att) if att.module is not None else ""
                shared = self._tie(rule, att, share) if att.module is not None else ()
                # a replace_input stacks on an earlier one (it reads what the site reads now); any other tuner
                # reading the site's input reads the original value (it folds beside the input maps)
                self._stacking = att.join == "replace_input"
                try:
                    values = [self.value(v, att.site, made) for v in att.inputs]
                    nodes = _JOINS[att.join](self, att, name, values)
                finally:
                    self._stacking = False
            made.append(nodes.get("call") or nodes.get("joined"))
            params = self._new_params(rule, att.module)
            entry = Entry(rule, kind, att.site.path, name, att.join, att.inputs, att.role, params, nodes, shared)
            entries.append(entry)
        if any(att.reshapes for att in plan):
            self.propagate(rule)  # later plans read the shapes this one changed (token counts)
        return entries

    def _new_params(self, rule: str, module: nn.Module | None) -> int:
        """Parameters of ``module`` not counted for ``rule`` yet (a shared tensor counts once)."""
        if module is None:
            return 0
        seen = self._counted.setdefault(rule, set())
        fresh = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        return sum(p.numel() for p in fresh)

    def _tie(self, rule: str, att: Attachment, share: Share | None) -> tuple[str, ...]:
        """Make ``att.module``'s shared tensors the rule's first ones (see :func:`utune.graph.share.tie`)."""
        assert att.module is not None  # the caller checked
        names = list(att.shared)
        if share is not None:
            names += [n for n in share.tensors if n not in names and has_tensor(att.module, n)]
            if att.role == "" and (absent := [n for n in share.tensors if not has_tensor(att.module, n)]):
                raise SelectionError(
                    f"rule {rule!r}: `share` names {', '.join(absent)}, which the tuner at {att.site.path} does "
                    "not have",
                    hint=f"its tensors: {', '.join(tensor_names(att.module)) or 'none'}",
                )
        frozen = set(share.tensors) if share is not None and not share.trainable else set()
        return tie(self._ties.setdefault(rule, {}), att.module, names, frozen, f"rule {rule!r} at {att.site.path}")

    def _add_module(self, rule: str, att: Attachment) -> str:
        assert att.module is not None  # the caller checked
        name = f"{TUNER_ROOT}.{module_key(rule)}.{module_key(att.site.path)}"
        if att.role:
            name += f"__{module_key(att.role)}"
        try:
            self.gm.get_submodule(name)
        except AttributeError:
            self.gm.add_submodule(name, att.module)
            return name
        raise RewriteError(
            f"rule {rule!r} attaches two modules named {name}",
            hint="a kind that attaches twice at one site gives each attachment a role",
        )

    # ----- the joins --------------------------------------------------------------------------------------
    def _join_add(self, att: Attachment, name: str, values: list[Any]) -> Nodes:
        """``y = out + T(values)``."""
        out = self.output(att.site)
        t = self.call(name, tuple(values), after=self.later(out, *_nodes(values)))
        y = self.call_function(operator.add, (out, t), after=t)
        if "tensor_meta" in out.meta:  # same shape as the value it replaces
            y.meta["tensor_meta"] = out.meta["tensor_meta"]
        self.redirect(out, y, keep={t, y})
        return {"call": t, "onto": out, "joined": y}

    def _join_replace(self, att: Attachment, name: str, values: list[Any]) -> Nodes:
        """``y = T(values)`` (usually ``T(out)``): every other reader of the site's output reads ``y``."""
        out = self.output(att.site)
        args = tuple(values) if values else (out,)
        y = self.call(name, args, after=self.later(out, *_nodes(args)))
        if "tensor_meta" in out.meta:
            y.meta["tensor_meta"] = out.meta["tensor_meta"]
        self.redirect(out, y, keep={y})
        return {"call": y, "onto": out, "joined": y}

    def _join_replace_input(self, att: Attachment, name: str, values: list[Any]) -> Nodes:
        """``site`` (and only it) reads ``T(values)``, or ``values[0]`` without a module, instead of its input."""
        inp = self.tap(att.site, "input")
        if name:
            args = tuple(values) if values else (inp,)
            y = self.call(name, args, after=self.later(inp, *_nodes(args)))
        elif len(values) == 1 and isinstance(values[0], fx.Node):
            y = values[0]
        else:
            raise RewriteError(f"rule {self.rule!r}: a replace_input without a module reads exactly one value")
        inside = set(att.site.nodes)
        for user in list(inp.users):
            if user in inside:
                user.replace_input_with(inp, y)
        self._site_input[att.site.path] = y  # a later replace_input on this site stacks onto what it reads now
        nodes = {"onto": inp, "joined": y}
        return {**nodes, "call": y} if name else nodes

    def _join_kv_concat(self, att: Attachment, name: str, values: list[Any]) -> Nodes:
        """The attention inside the site reads ``T(k, v)`` as its keys and values; its mask is padded."""
        found = find_attention(att.site)
        if isinstance(found, str):
            raise SelectionError(f"rule {self.rule!r}: no attention to extend at {att.site.path}: {found}")
        k, v = self.current(found.k), self.current(found.v)
        kv = self.call(name, (k, v), after=self.later(k, v))
        k2 = self.call_function(operator.getitem, (kv, 0), after=kv)
        v2 = self.call_function(operator.getitem, (kv, 1), after=k2)
        found.k_user.replace_input_with(k, k2)
        found.v_user.replace_input_with(v, v2)
        if found.mask is not None:
            mask = self.current(found.mask)
            padded = self.call_function(pad_mask, (mask, att.options["mask_pad"]), after=self.later(mask, v2))
            found.k_user.replace_input_with(mask, padded)
        return {"call": kv, "onto": k, "joined": k2}

    def _join_side(self, att: Attachment, name: str, values: list[Any]) -> Nodes:
        """``T(values)`` runs; only later attachments read its output (a side network's step)."""
        t = self.call(name, tuple(values), after=self.later(*_nodes(values)))
        return {"call": t}

    # ----- node helpers ---------------------------------------------------------------------------------
    def _stack_for(self, site: Site) -> dict[str, Any]:
        anchor = site.output or (site.nodes[0] if site.nodes else None)
        stack = dict(anchor.meta.get("nn_module_stack", {})) if anchor is not None else {}
        keep = {}  # the new nodes belong to the site's parent, not to the site itself
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

    def call(self, target: str, args: tuple[Any, ...], after: fx.Node) -> fx.Node:
        with self.graph.inserting_after(after):
            return self._new(self.graph.call_module(target, args, {}))

    def call_function(self, fn: Callable[..., Any], args: tuple[Any, ...], after: fx.Node) -> fx.Node:
        with self.graph.inserting_after(after):
            return self._new(self.graph.call_function(fn, args))

    def call_base(self, path: str, args: tuple[Any, ...], after: fx.Node) -> fx.Node:
        """Call a frozen base layer again (e.g. a query projection on a tuner's tap)."""
        site = self.sites.get(path)
        if site is None or site.op != "module":
            raise SelectionError(
                f"rule {self.rule!r}: the base layer {path} is not called as a module in the graph",
                hint="this model reads that layer's weights directly; pick another site or kind",
            )
        return self.call(path, args, after=after)

    def redirect(self, old: fx.Node, new: fx.Node, keep: set[fx.Node]) -> None:
        """Every use of ``old`` except those in ``keep`` now reads ``new``."""
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in keep)
        self._current[old] = new

    def later(self, *nodes: fx.Node) -> fx.Node:
        """The node that comes last in graph order (insert after it so every input exists)."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return max(nodes, key=lambda n: order[n])

    @contextmanager
    def pass_for(self, rule: str, site: Site, *, lint: bool = True) -> Iterator[None]:
        """Run one pass; lint (planning changes nothing: no lint); name the rule and site when anything breaks."""
        self.rule, self.site = rule, site
        try:
            yield
            if lint:
                self.graph.lint()  # the code is regenerated (recompile) before the graph next runs
        except (SelectionError, RewriteError):
            raise
        except Exception as e:
            raise RewriteError(
                f"rule {rule!r}: attaching the tuner at {site.path} failed: {type(e).__name__}: {e}",
                hint="run with UTUNE_DEBUG=1 for the traceback and report it with the spec",
            ) from e
        finally:
            self.site = None


_JOINS: dict[str, Callable[[Rewriter, Attachment, str, list[Any]], Nodes]] = {
    "add": Rewriter._join_add,
    "replace": Rewriter._join_replace,
    "replace_input": Rewriter._join_replace_input,
    "kv_concat": Rewriter._join_kv_concat,
    "side": Rewriter._join_side,
}

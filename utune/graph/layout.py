"""Which dim of a value holds channels, decided from the graph: what produced the value, what reads it.

Convolutions and batch/group norms make and read channels first (``(B, C, H, W)``, ``(B, C, L)``); Linear
layers and a LayerNorm over the last dim make and read channels last (tokens ``(B, N, C)``, NHWC maps).
Ops that keep the rank and the meaning of each dim (activations, residual sums, concatenation, slicing,
pooling, dropout, scales) pass the layout through; ``permute`` and ``transpose`` move it; anything that
reshapes ends the walk. The walk goes back from the value to its producers and forward to its readers,
a few ops each way. Evidence that disagrees, or none at all on a 4-d map, is an error asking the rule to
say ``channel_dim: 1`` or ``channel_dim: -1``: never a guess from the sizes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx, nn

from utune.errors import SelectionError
from utune.graph.sites import Site

_CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_FIRST_NAMES = ("LayerNorm2d", "RmsNorm2d", "LayerNormAct2d", "BatchNormAct2d", "GroupNormAct", "FrozenBatchNorm2d")
_LAST_NAMES = ("RmsNorm", "RmsNormFp32", "SimpleNorm", "SimpleNormFp32")
# modules that keep each dim's meaning: the layout passes through them
_KEEP_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.PReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)  # fmt: skip
_KEEP_NAMES = ("DropPath", "LayerScale", "LayerScale2d", "GELUTanh", "QuickGELU", "Swish", "HardSwish")
_FIRST_FUNCTIONS: set[object] = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm, F.instance_norm}
_LAST_FUNCTIONS: set[object] = {F.linear}
# ops whose output dims are not their input's dims in order: the walk stops there
_STOP = {
    "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "einsum",
    "matmul", "bmm", "mm", "baddbmm", "linear", "sum", "mean", "amax", "max", "min", "softmax", "contiguous_format",
    "unbind", "pixel_shuffle", "pixel_unshuffle", "t",
}  # fmt: skip
_RESHAPES = {"reshape", "view", "flatten", "unflatten"}  # the layout survives only where the sizes say so
_SPLITS = {"chunk", "split", "tensor_split"}  # a tuple of same-rank pieces: each piece keeps the layout
_MOVES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}  # dims move, meanings kept
_DEPTH = 12


@dataclass
class Evidence:
    """Where channels sit in a value (a non-negative dim) and why: ``{dim: [reasons]}``."""

    found: dict[int, list[str]] = field(default_factory=dict)

    def add(self, dim: int | None, why: str) -> None:
        if dim is not None:
            self.found.setdefault(dim, []).append(why)


def module_channels(mod: nn.Module) -> tuple[int, int] | None:
    """(dim, channels) a leaf module produces: (1, C) for convs/BN/LayerNorm2d, (-1, C) for Linear/LN."""
    names = {c.__name__ for c in type(mod).__mro__}
    norm2d = "norm" in type(mod).__name__.lower() and "2d" in type(mod).__name__.lower()  # LayerNorm2dNoBias...
    first = isinstance(mod, _CHANNEL_FIRST) or bool(names & set(_FIRST_NAMES)) or norm2d
    if first:
        c = getattr(mod, "out_channels", None) or getattr(mod, "num_features", None)
        c = c or getattr(mod, "num_channels", None)
        weight = getattr(mod, "weight", None)
        if c is None and isinstance(weight, nn.Parameter):
            c = weight.shape[0]
        return (1, int(c)) if c else None
    if isinstance(mod, nn.Linear):
        return (-1, mod.out_features)
    if isinstance(mod, nn.LayerNorm | nn.RMSNorm) or bool(names & set(_LAST_NAMES)):
        shape = getattr(mod, "normalized_shape", None)
        if isinstance(shape, tuple | list) and len(shape) == 1:
            return (-1, int(shape[0]))
        weight = getattr(mod, "weight", None)
        return (-1, int(weight.shape[0])) if isinstance(weight, nn.Parameter) and weight.ndim == 1 else None
    return None


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def _module(node: fx.Node) -> nn.Module | None:
    owner = node.graph.owning_module
    if node.op != "call_module" or owner is None:
        return None
    try:
        return owner.get_submodule(str(node.target))
    except AttributeError:
        return None


def _keeps(mod: nn.Module) -> bool:
    """The layout passes through: activations, pools, dropouts, and utune's own tuner modules (a sequential
    tuner maps a value to one of its layout; checked with the shapes by the callers)."""
    return (
        isinstance(mod, _KEEP_MODULES)
        or type(mod).__name__ in _KEEP_NAMES
        or type(mod).__module__.startswith("utune.tuners")
    )


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return str(getattr(node.target, "__name__", node.target)).strip("_")


def _pos(dim: int, rank: int) -> int:
    return dim % rank


def _dims_arg(node: fx.Node) -> list[int] | None:
    """The permutation of a ``permute`` node (``x.permute(0, 2, 3, 1)``, ``torch.permute(x, (0, 2, 3, 1))``)."""
    args = list(node.args[1:]) + list(node.kwargs.values())
    if len(args) == 1 and isinstance(args[0], tuple | list):
        args = list(args[0])
    ints = [a for a in args if isinstance(a, int)]
    return ints if args and len(ints) == len(args) else None


def _moved(node: fx.Node, dim: int, rank: int, to_input: bool) -> int | None:
    """Where ``dim`` of a permute/transpose/swapaxes/movedim's input lands in its output (``to_input``: the
    reverse)."""
    perm = _permutation(node, rank)
    if perm is None:
        return None
    return perm[dim] if to_input else perm.index(dim)


def _permutation(node: fx.Node, rank: int) -> list[int] | None:
    """``perm`` with output dim ``i`` = input dim ``perm[i]`` (as ``permute`` takes it), or None: not known."""
    name = _name(node)
    if name == "permute":
        perm = _dims_arg(node)
        return [_pos(p, rank) for p in perm] if perm is not None and len(perm) == rank else None
    a, b = node.args[1:3] if len(node.args) >= 3 else (None, None)
    if not isinstance(a, int) or not isinstance(b, int):
        return None
    a, b = _pos(a, rank), _pos(b, rank)
    order = list(range(rank))
    if name in ("movedim", "moveaxis"):
        order.pop(a)
        order.insert(b, a)
    else:  # transpose, swapaxes, swapdims
        order[a], order[b] = b, a
    return order


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _reshaped(src: tuple[int, ...], out: tuple[int, ...], dim: int, to_input: bool) -> int | None:
    """Channels through a reshape: still last when the last dim keeps its size ((B, N, C) -> (B, H, W, C)),
    still at 1 when the batch and channel dims keep theirs ((B, C, H, W) -> (B, C, HW)); else unknown (a row-major
    reshape that keeps a prefix or a suffix of the sizes keeps those dims' meaning)."""
    a, b = (out, src) if to_input else (src, out)
    if dim == len(a) - 1 and a[-1] == b[-1]:
        return len(b) - 1
    if dim == 1 and len(a) >= 2 and len(b) >= 2 and a[:2] == b[:2]:  # (B, C, 1, 1) -> (B, C) too
        return 1
    return None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)  # type: ignore[func-returns-value]
    return [n for n in out if _rank(n) is not None]


def _hashable_in(target: object, table: set[object]) -> bool:
    try:
        return target in table
    except TypeError:
        return False


def _function_layout(node: fx.Node, rank: int) -> int | None:
    """The layout a functional conv/norm/linear makes or reads (None: not one of them)."""
    if _hashable_in(node.target, _FIRST_FUNCTIONS):
        return 1
    if _hashable_in(node.target, _LAST_FUNCTIONS):
        return rank - 1
    if node.target is F.layer_norm or (node.op == "call_method" and node.target == "layer_norm"):
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return rank - 1 if isinstance(shape, tuple | list) and len(shape) == 1 else None
    return None


Found = tuple[int, str]  # (non-negative channel dim, why)


class _Walk:
    """Back to the producers and forward to the readers of a value, a few ops deep, memoised per node."""

    def __init__(self) -> None:
        self._made: dict[fx.Node, Found | None] = {}

    def produced(self, node: fx.Node, depth: int = _DEPTH) -> Found | None:
        if node not in self._made:
            self._made[node] = None  # cycles cannot occur in a graph, but a re-entry must not recurse
            self._made[node] = self._produce(node, depth)
        return self._made[node]

    def _produce(self, node: fx.Node, depth: int) -> Found | None:
        rank = _rank(node)
        if rank is None or depth <= 0:
            return None
        if node.op == "call_module":
            mod = _module(node)
            if mod is None:
                return None
            found = module_channels(mod)
            if found is not None:
                return _pos(found[0], rank), f"{node.target} ({type(mod).__name__}) makes it"
            src = node.args[0] if node.args else None
            if not _keeps(mod):
                inside = _inside(mod, _shape(node), "out")
                return (inside, f"{_leaf(node, mod, inside)} makes it") if inside is not None else None
            return self.produced(src, depth - 1) if isinstance(src, fx.Node) and _rank(src) == rank else None
        if node.op not in ("call_function", "call_method"):
            return None
        dim = _function_layout(node, rank)
        if dim is not None:
            return dim, f"the {_name(node)} that makes it"
        name = _name(node)
        src = node.args[0] if node.args else None
        if node.target is operator.getitem and isinstance(src, fx.Node) and _name(src) in _SPLITS and src.args:
            whole = src.args[0]  # a piece of x.chunk(...) / torch.split(x, ...)
            return self.produced(whole, depth - 1) if isinstance(whole, fx.Node) and _rank(whole) == rank else None
        if name in _RESHAPES and isinstance(src, fx.Node):
            inner, shapes = self.produced(src, depth - 1), (_shape(src), _shape(node))
            dim = _reshaped(shapes[0], shapes[1], inner[0], False) if inner and shapes[0] and shapes[1] else None
            return (dim, f"{inner[1]}, then a {name}") if inner is not None and dim is not None else None
        if name in _MOVES:
            inner = self.produced(src, depth - 1) if isinstance(src, fx.Node) and _rank(src) == rank else None
            moved = _moved(node, inner[0], rank, to_input=False) if inner is not None else None
            return (moved, f"{inner[1]}, then a {name}") if inner is not None and moved is not None else None
        if name in _STOP:
            return None
        same = [self.produced(a, depth - 1) for a in _tensor_args(node) if _rank(a) == rank]
        dims = {f[0] for f in same if f is not None}
        return next(f for f in same if f is not None) if len(dims) == 1 else None

    def read(self, node: fx.Node, depth: int = _DEPTH) -> list[Found]:
        """What the readers of ``node`` say about its layout."""
        rank = _rank(node)
        meta = node.meta.get("tensor_meta")
        if rank is None or depth <= 0 or meta is None:
            return []
        shape = tuple(meta.shape)
        out: list[Found] = []
        for user in node.users:
            out += self._reader(user, node, shape, depth)
        return out

    def _reader(self, user: fx.Node, node: fx.Node, shape: tuple[int, ...], depth: int) -> list[Found]:
        rank = len(shape)
        reads_first = bool(user.args) and user.args[0] is node
        if user.op == "call_module":
            mod = _module(user)
            if mod is None or not reads_first:
                return []
            found = _reads(mod, shape)
            if found is not None:
                return [(found, f"{user.target} ({type(mod).__name__}) reads it")]
            inside = None if _keeps(mod) or module_channels(mod) is not None else _inside(mod, shape, "in")
            if inside is not None:
                return [(inside, f"{_leaf(user, mod, inside)} reads it")]
            return self._passed(user, rank, depth) if _keeps(mod) else []
        if user.op not in ("call_function", "call_method"):
            return []
        dim = _function_layout(user, rank) if reads_first else None
        if dim is not None:
            return [(dim, f"the {_name(user)} that reads it")]
        name = _name(user)
        if name in _SPLITS and reads_first:  # the pieces are read through getitem
            return [f for piece in user.users for f in self._passed(piece, rank, depth)]
        if name in _RESHAPES and reads_first and (after := _shape(user)) is not None:
            back = [
                (_reshaped(shape, after, d, True), f"{why}, after a {name}") for d, why in self.read(user, depth - 1)
            ]
            return [(d, why) for d, why in back if d is not None]
        if name in _MOVES and reads_first:
            outs = self.read(user, depth - 1)
            back = [(_moved(user, d, rank, to_input=True), f"{why}, after a {name}") for d, why in outs]
            return [(d, why) for d, why in back if d is not None]
        if name in _STOP:
            return []
        return self._passed(user, rank, depth)

    def _passed(self, user: fx.Node, rank: int, depth: int) -> list[Found]:
        return self.read(user, depth - 1) if _rank(user) == rank else []


def _reads(mod: nn.Module, shape: tuple[int, ...]) -> int | None:
    """The dim of its input a layer reads as channels, when the sizes agree (None: not a layer, or no fit)."""
    found = module_channels(mod)
    if found is None:
        return None
    c_in = getattr(mod, "in_channels", None) or getattr(mod, "in_features", None)
    if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.Linear):
        dim = 1 if found[0] == 1 else len(shape) - 1
        return dim if c_in == shape[dim] else None
    dim = 1 if found[0] == 1 else len(shape) - 1  # norms read what they make
    return dim if found[1] == shape[dim] else None


def _leaf(node: fx.Node, mod: nn.Module, dim: int) -> str:
    kind = "channels-first" if dim == 1 else "channels-last"
    return f"{node.target} ({type(mod).__name__}, a leaf whose layers are all {kind})"


def _sizes(mod: nn.Module, side: str) -> set[int]:
    """The channel counts a layer reads (``side="in"``) or makes (``"out"``); a norm's are its own."""
    names = ("in_channels", "in_features") if side == "in" else ("out_channels", "out_features")
    found = {int(v) for n in names if isinstance(v := getattr(mod, n, None), int)}
    own = module_channels(mod)
    return found or ({own[1]} if own is not None else set())


def _inside(mod: nn.Module, shape: tuple[int, ...] | None, side: str) -> int | None:
    """The layout of a value an opaque leaf module (timm's no-trace blocks, e.g. NFNet's ``NormFreeBlock``)
    reads or makes, from the layers inside it: only when every one of them keeps the same layout and one of
    them reads (makes) as many channels as the value has. A leaf that mixes convolutions with Linear layers or
    LayerNorms says nothing."""
    if shape is None or len(shape) < 3:
        return None
    layers = [m for m in mod.modules() if m is not mod and module_channels(m) is not None]
    dims = {module_channels(m)[0] for m in layers}  # type: ignore[index]
    if len(dims) != 1:
        return None
    dim = 1 if dims == {1} else len(shape) - 1
    return dim if any(shape[dim] in _sizes(m, side) for m in layers) else None


def channel_dim(site: Site, shape: tuple[int, ...], override: int | None = None, node: fx.Node | None = None) -> int:
    """Which dim of ``shape`` (the site's output, or ``node``) holds channels: -1 (last) or a dim index."""
    rank = len(shape)
    if override is not None:
        if rank < 2 or not -rank <= override < rank:
            raise SelectionError(f"channel_dim {override} does not exist in {site.path}'s output {list(shape)}")
        return override
    if rank <= 2:
        return -1
    if site.module is not None and site.op == "module" and (found := module_channels(site.module)) is not None:
        if shape[found[0]] == found[1]:
            return found[0]
    node = node if node is not None else site.output
    walk = _Walk()
    evidence = Evidence()
    if node is not None:
        made = walk.produced(node)
        if made is not None:
            evidence.add(*made)
        for dim, why in walk.read(node):
            evidence.add(dim, why)
    return _decide(site, shape, evidence)


def _decide(site: Site, shape: tuple[int, ...], evidence: Evidence) -> int:
    rank = len(shape)
    hint = "set layout: channels_first (NCHW, channel_dim 1) or channels_last (NHWC, tokens: -1) in the rule"
    if len(evidence.found) == 1:
        dim = next(iter(evidence.found))
        return -1 if dim == rank - 1 else dim
    if len(evidence.found) > 1:
        said = "; ".join(f"dim {d}: {whys[0]}" for d, whys in sorted(evidence.found.items()))
        raise SelectionError(
            f"cannot tell the channel dim of {site.path} (shape {list(shape)}): the layers around it disagree ({said})",
            hint=hint,
        )
    if rank == 3:
        return -1  # a token sequence (B, N, C): nothing around it says otherwise
    raise SelectionError(
        f"cannot tell the channel dim of {site.path} (shape {list(shape)}): no convolution, norm or Linear makes "
        "or reads it within a few ops",
        hint=hint,
    )


def input_channel_dim(site: Site, shape: tuple[int, ...], override: int | None = None) -> int:
    """Which dim of the site's input (of ``shape``) holds channels: the layer's own input layout."""
    if override is not None:
        return override
    mod = site.module if site.op == "module" else None
    if isinstance(mod, nn.Linear) and shape[-1] == mod.in_features:
        return -1
    if isinstance(mod, _CHANNEL_FIRST) and len(shape) > 2:
        c = (
            getattr(mod, "in_channels", None)
            or getattr(mod, "num_features", None)
            or getattr(mod, "num_channels", None)
        )
        if c == shape[1]:
            return 1
    if len(shape) <= 3:
        return -1
    raise SelectionError(
        f"cannot tell the channel dim of the input of {site.path} (shape {list(shape)})",
        hint="set layout: channels_first (NCHW) or layout: channels_last (NHWC) in the rule",
    )

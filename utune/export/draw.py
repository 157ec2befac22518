"""Pictures: where a spec's tuners sit on a backbone (``utune draw``), and training curves (``utune plot``).

The structure drawing reads the build's manifest only: every attachment's site is placed in its *block*
(the part of the path up to the last numbered segment: ``blocks.3``, ``layers.1.blocks.0``, ``layer2.1``,
``encoder.layers.encoder_layer_5``); consecutive blocks that carry the same tuners at the same places are
drawn as one row (``blocks.0-11 x12``), so a 24-block ViT or a 4-stage ResNet both fit on a page. Sites
outside any block (a stem, the final norm, the head) get their own rows. Matplotlib's Agg backend; SVGs
keep text as text (the rule names are searchable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from utune.errors import UserInputError

if TYPE_CHECKING:
    from utune.engine.record import Built

COLORS = ["#6fa8dc", "#93c47d", "#e69138", "#c27ba0", "#8e7cc3", "#e06666", "#76a5af", "#ffd966"]
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def block_of(path: str) -> tuple[str, str]:
    """(its block, the path inside it): ``blocks.3.attn.qkv`` -> (``blocks.3``, ``attn.qkv``); a site outside
    every block is its own row (``head`` -> (``head``, ``(the module)``))."""
    parts = path.split("::")[0].split(".")
    op = f"::{path.split('::')[1]}" if "::" in path else ""
    cut = max((i for i, p in enumerate(parts) if _NUMBERED.match(p)), default=-1)
    if cut < 0:
        return path.split("::")[0], "(the module)" + op
    inner = ".".join(parts[cut + 1 :]) + op
    return ".".join(parts[: cut + 1]), inner or "(the block)"


@dataclass
class Row:
    """Consecutive blocks that carry the same tuners at the same places (none: a frozen stretch)."""

    blocks: list[str]
    marks: tuple[tuple[str, str, str, str], ...]  # (inner site, rule tag, kind, how it joins)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if len(self.blocks) == 1:
            return self.blocks[0] or "(model)"
        first, last = self.blocks[0], self.blocks[-1]
        m1, m2 = _NUMBERED.match(first), _NUMBERED.match(last)
        if m1 and m2 and m1.group(1) == m2.group(1):
            return f"{first}-{m2.group(2)}  x{len(self.blocks)}"
        return f"{first} ... {last}  x{len(self.blocks)}"


def model_blocks(base: nn.Module) -> list[str]:
    """The model's repeated blocks, innermost level: numbered children of a ModuleList/Sequential that have
    layers of their own (``blocks.3``, ``layers.1.blocks.0``, ``layer2.1``), in module order."""
    found = []
    for name, module in base.named_modules():
        parent = base.get_submodule(name.rpartition(".")[0]) if "." in name else base
        leaf = name.rpartition(".")[2]
        numbered = bool(_NUMBERED.match(leaf)) and isinstance(parent, nn.ModuleList | nn.Sequential)
        if name and numbered and any(True for _ in module.children()):
            found.append(name)
    return [b for b in found if not any(o != b and o.startswith(b + ".") for o in found)]


def rows_of(built: Built) -> list[Row]:
    """The drawing's rows, in model order, from the manifest; frozen stretches of blocks included."""
    marks: dict[str, list[tuple[str, str, str, str]]] = {}
    for e in built.manifest:
        block, inner = block_of(e.site)
        how = e.join + (f", reads {e.tap.where}" if e.tap is not None and e.tap.where != "input" else "")
        marks.setdefault(block, []).append((inner, e.rule if not e.role else f"{e.rule} ({e.role})", e.kind, how))
    order = model_blocks(built.base)
    order += [b for b in marks if b not in order]
    rows: list[Row] = []
    for block in order:
        mark = tuple(marks.get(block, ()))
        if rows and rows[-1].marks == mark and _successor(rows[-1].blocks[-1], block):
            rows[-1].blocks.append(block)
        elif mark or _NUMBERED.match(block.rpartition(".")[2]):
            rows.append(Row([block], mark))
    return rows


def _successor(a: str, b: str) -> bool:
    ma, mb = _NUMBERED.match(a), _NUMBERED.match(b)
    return bool(ma and mb and ma.group(1) == mb.group(1) and int(mb.group(2)) == int(ma.group(2)) + 1)


def draw_structure(built: Built, path: Path | str, title: str | None = None) -> Path:
    """Draw where every rule's tuners sit (PNG or SVG by the file's suffix); returns the path."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UserInputError(f"cannot draw into {path.name}", hint="use a .png, .svg or .pdf file name")
    plt = _pyplot()
    rows = rows_of(built)
    rules = [r["name"] for r in built.report["tuners"]]
    color = {name: COLORS[i % len(COLORS)] for i, name in enumerate(rules)}
    lanes = max((len(r.marks) for r in rows), default=1)
    fig, ax = plt.subplots(figsize=(3.0 + 2.6 * lanes, 1.4 + 0.62 * max(len(rows), 1)), dpi=110)
    ax.set_xlim(0, 2.6 + 2.6 * lanes)
    ax.set_ylim(-0.5 - len(rows), 1.4)
    ax.axis("off")
    for y, row in enumerate(rows):
        ax.text(0.05, -y - 0.5, row.label, va="center", fontsize=8, family="monospace")
        if not row.marks:
            _chip(ax, 2.4, -y - 0.78, "frozen", "#e8e8e8")
        for x, (inner, tag, kind, how) in enumerate(row.marks):
            rule = tag.split(" (")[0]
            _chip(ax, 2.4 + 2.6 * x, -y - 0.78, f"{inner}\n{tag} ({kind}): {how}", color.get(rule, "#cccccc"))
    legend = ", ".join(f"{r['name']} ({r['kind']}, {r['params']:,})" for r in built.report["tuners"])
    ax.text(0.05, 1.0, title or _title(built), fontsize=10, weight="bold")
    ax.text(0.05, 0.55, legend or "no tuners", fontsize=7.5, color="#444")
    return _save(fig, plt, path)


def _chip(ax: Any, x: float, y: float, text: str, fc: str) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), 2.3, 0.56, boxstyle="round,pad=0.02,rounding_size=0.08", fc=fc, ec="#444"))
    ax.text(x + 1.15, y + 0.28, text, ha="center", va="center", fontsize=6.5)


def _title(built: Built) -> str:
    r = built.report
    return f"{r['model']}: {r['trainable_params']:,} trainable of {r['total_params']:,} ({r['trainable_pct']:.2f} %)"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text in SVGs
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, plt: Any, path: Path) -> Path:
    from utune._fs import make_dir

    make_dir(path.parent if str(path.parent) else Path("."), "folder")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_runs(runs: list[Path], path: Path | str) -> Path:
    """Training loss and evaluation accuracy against the step, one line per run (from ``metrics.jsonl``)."""
    from utune.train.metrics import read_metrics

    path = Path(path)
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for i, run in enumerate(runs):
        records = read_metrics(Path(run) / "metrics.jsonl")
        if not records:
            raise UserInputError(
                f"{run} has no metrics.jsonl records", hint="pass run folders of `utune apply --train`"
            )
        c = COLORS[i % len(COLORS)]
        train = [(r["step"], r["loss"]) for r in records if "split" not in r and r.get("loss") is not None]
        if train:
            loss_ax.plot(*zip(*train, strict=True), color=c, label=Path(run).name)
        for split, style in (("val", "-"), ("test", "--")):
            acc = [(r["step"], 100 * r["acc"]) for r in records if r.get("split") == split]
            if acc:
                acc_ax.plot(
                    *zip(*acc, strict=True), style, color=c, marker="o", ms=3, label=f"{Path(run).name} {split}"
                )
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss")
    acc_ax.set(xlabel="step", ylabel="accuracy (%)", title="evaluation")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plt, path)


def confusion_png(confusion: list[list[int]], names: list[str], path: Path | str, title: str = "") -> Path:
    """The confusion matrix as a picture: rows the true class, columns the predicted one, each row
    normalised (the share of that class's images). Readable up to ~100 classes: the figure grows with the
    class count, labels shrink, and counts are written in the cells only for up to 20 classes."""
    import io

    import numpy as np

    from utune.export.io import write_bytes_atomic

    plt = _pyplot()
    counts = np.asarray(confusion, dtype=np.float64)
    k = len(counts)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(40.0, max(5.0, 0.22 * k + 2.5))
    font = max(5.0, min(10.0, 160 / max(k, 1)))  # 5 pt in a 0.22 in cell at 100 classes
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="share of the true class's images")
    ax.set_xticks(range(k), [str(n) for n in names], rotation=90, fontsize=font)
    ax.set_yticks(range(k), [str(n) for n in names], fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    color = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=font, color=color)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100 if k <= 30 else 150)  # small labels stay legible when zoomed
    plt.close(fig)
    path = Path(path)
    write_bytes_atomic(path, buffer.getvalue(), force=True)
    return path

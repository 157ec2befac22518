"""How the CLI shows what the library returns: the build report, training progress, the run summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

from rich.markup import escape

from utune import _output as out


def print_report(report: Mapping[str, Any]) -> None:
    """The build report: one row per rule, then the totals (and the --verify result)."""
    rows = [
        [
            t["name"],
            t["kind"],
            t["placement"],
            len(t["sites"]),
            ", ".join(t["sites"][:3]) + (" ..." if len(t["sites"]) > 3 else ""),
            out.fmt_int(t["params"]),
        ]
        for t in report["tuners"]
    ]
    if rows:
        out.table(
            f"{report['model']}",
            ["rule", "kind", "placement", "sites", "first sites", "params"],
            rows,
            {"params": "right", "sites": "right"},
        )
    for note in report.get("notes", []):
        out.info(f"[dim]note:[/] {escape(note)}", markup=True)
    if report["trainable"]:
        out.info(
            f"trainable base parameters ({', '.join(report['trainable'])}): "
            f"{out.fmt_int(report['base_trainable_params'])}"
        )
    out.info(
        f"trainable params: {out.fmt_int(report['trainable_params'])} || all params: "
        f"{out.fmt_int(report['total_params'])} || trainable%: {report['trainable_pct']:.4f}"
    )
    if report.get("identity_max_abs_diff") is not None:
        claims = [t["identity_at_init"] for t in report["tuners"]]
        note = "identity at init" if all(claims) else "not all tuners start as the identity"
        if None in claims and False not in claims:  # kind: module promises nothing: the figure says it
            note = "the identity at init" if report["identity_max_abs_diff"] == 0 else "not the identity at init"
        if report.get("tuners_file"):
            note = f"the effect of the tuners loaded from {report['tuners_file']}"
        out.info(f"verify: max |tuned - base| = {report['identity_max_abs_diff']:.3g} on a random batch ({note})")


def print_summary(summary: Mapping[str, Any]) -> None:
    """The run's summary as a two-column table (stdout; not drawn in JSON mode)."""
    rows = []
    for key, value in summary.items():
        if isinstance(value, dict):
            continue
        if isinstance(value, float):
            shown = f"{100 * value:.2f}%" if key.endswith("acc") else f"{value:.4g}"
        else:
            shown = "-" if value is None else str(value)
        rows.append([key, shown])
    out.table("training summary", ["metric", "value"], rows)


def _ips(record: Mapping[str, Any]) -> str:
    # None when a log window held only the warm-up step (left out of the throughput)
    ips = record.get("images_per_s")
    return "-" if ips is None else f"{ips:.0f}"


class TrainProgress:
    """Training progress on stderr: a live bar in a terminal, one plain line per log step otherwise
    (piped output, CI logs). Silent with ``UTUNE_QUIET=1`` and on ranks other than 0."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and not out.quiet()
        self.live = self.enabled and sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()

    def start(self, total: int, step: int) -> None:
        if not self.enabled or total <= 0:
            self.enabled = self.live = False
            return
        self._t0 = time.perf_counter()
        if not self.live:
            out.note(f"training: step {step} of {total}")
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            console=out.err_console(),
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=step, loss="-", acc="-", ips="-")
        self._progress.start()

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            if "split" in record:
                self._progress.console.print(f"step {record['step']}: {record['split']} acc {100 * record['acc']:.2f}%")
            else:
                fields = {"loss": f"{record['loss']:.4f}", "acc": f"{100 * record['train_acc']:.1f}%"}
                self._progress.update(self._task, ips=_ips(record), **fields)
            return
        total = record.get("total", "?")
        if "split" in record:
            out.note(
                f"step {record['step']}/{total} (epoch {record['epoch']:.2f}): {record['split']} acc "
                f"{100 * record['acc']:.2f}%, loss {record['loss']:.4f}"
            )
        else:
            out.note(
                f"step {record['step']}/{total} (epoch {record['epoch']:.2f}): loss {record['loss']:.4f}, "
                f"lr {record['lr']:.3g}, {_ips(record)} img/s, {time.perf_counter() - self._t0:.0f} s"
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

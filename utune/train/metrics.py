"""What a run reports: ``metrics.jsonl`` lines, a Rich progress bar and the closing summary table."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def quiet() -> bool:
    return os.environ.get("UTUNE_QUIET", "") not in ("", "0")


def _json_value(v: Any) -> Any:
    # NaN/inf are not JSON; a diverged loss is written as null rather than breaking every reader.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    """Append-only ``metrics.jsonl`` plus the same records in memory (they go into each checkpoint).

    Only the writing rank has ``enabled=True``; the others keep the records but touch no file.
    """

    def __init__(self, path: Path, *, enabled: bool, records: Sequence[dict] = ()) -> None:
        self.path = path
        self.enabled = enabled
        self.records: list[dict] = [dict(r) for r in records]
        if enabled:
            # Rewriting from the checkpoint's records drops the lines an interrupted run wrote after
            # that checkpoint, so a resumed run's file reads like an uninterrupted one.
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w") as f:
                for r in self.records:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._file = open(path, "a")  # noqa: SIM115 - kept open for the run; closed in close()

    def write(self, record: Mapping[str, Any]) -> None:
        rec = {k: _json_value(v) for k, v in record.items()}
        self.records.append(rec)
        if self.enabled:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()  # a killed run keeps every line written so far

    def close(self) -> None:
        if self.enabled and not self._file.closed:
            self._file.close()


def read_metrics(path: Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` (a torn last line from a killed writer is skipped)."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class ProgressBar:
    """Rich progress (loss, acc, images/s, ETA) on rank 0 in a terminal; a no-op elsewhere."""

    def __init__(self, total: int, *, start: int, enabled: bool) -> None:
        self.enabled = enabled and sys.stdout.isatty() and not quiet() and total > 0
        self._progress: Progress | None = None
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, loss="-", acc="-", ips="-")
        self._progress.start()

    def update(
        self, step: int, *, loss: float | None = None, acc: float | None = None, ips: float | None = None
    ) -> None:
        if self._progress is None:
            return
        fields: dict[str, str] = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if acc is not None:
            fields["acc"] = f"{100 * acc:.1f}%"
        if ips is not None:
            fields["ips"] = f"{ips:.0f}"
        self._progress.update(self._task, completed=step, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def print_summary(summary: Mapping[str, Any]) -> None:
    """The run's summary as a two-column table on stdout (suppressed by UTUNE_QUIET=1)."""
    if quiet():
        return
    table = Table(title="training summary", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        if isinstance(value, dict):
            continue
        if isinstance(value, float):
            shown = f"{100 * value:.2f}%" if key.endswith("acc") else f"{value:.4g}"
        else:
            shown = "-" if value is None else str(value)
        table.add_row(key, shown)
    Console().print(table)

"""What a run records: ``metrics.jsonl``, one JSON object a line, appended as training goes."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utune._fs import make_dir, storage_error, write_text_atomic


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
            make_dir(path.parent, "run folder")
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records), what="metrics log")
            try:
                self._file = open(path, "a")  # noqa: SIM115 - kept open for the run; closed in close()
            except OSError as e:
                raise storage_error(e, path, what="metrics log") from None

    def write(self, record: Mapping[str, Any]) -> None:
        rec = {k: _json_value(v) for k, v in record.items()}
        self.records.append(rec)
        if self.enabled:
            try:
                self._file.write(json.dumps(rec) + "\n")
                self._file.flush()  # a killed run keeps every line written so far
            except OSError as e:  # a torn last line is skipped by read_metrics; checkpoints hold every record
                raise storage_error(e, self.path, what="metrics log", intact="the last checkpoint is intact") from None

    def close(self) -> None:
        if self.enabled and not self._file.closed:
            try:
                self._file.close()
            except OSError:  # the buffered tail could not be flushed: write() already raised for it
                pass


def read_metrics(path: Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` (a torn last line from a killed writer is skipped)."""
    out: list[dict] = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out

"""Size a rule's tuners before building them: ``rank: 100000000`` must be a clear refusal naming the rule
and the bytes, not an allocation that fails deep in a kind (exit 1, "report it") or one that succeeds and
takes the machine's memory.

The kind plans every site once more on the ``meta`` device (shapes only, no memory, microseconds a site);
the parameters and buffers it would create are counted and compared with the memory this process can
have. A kind whose planning cannot run on ``meta`` (it computes from the real weights) is simply not
sized here: building it for real is then the check.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utune.errors import SelectionError

_MEMINFO = Path("/proc/meminfo")
_CGROUP_MAX = Path("/sys/fs/cgroup/memory.max")


def available_memory() -> int | None:
    """Bytes this process may still allocate on the host: MemAvailable, bounded by a cgroup's limit (None:
    unknown, e.g. not Linux)."""
    found: list[int] = []
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = _CGROUP_MAX.read_text().strip()
        if limit.isdigit():
            found.append(int(limit))
    except OSError:
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def _bytes(modules: list[nn.Module]) -> tuple[int, int]:
    seen: set[int] = set()
    count = size = 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                count += t.numel()
                size += t.numel() * t.element_size()
    return count, size


def planned_size(plan_all: Callable[[], list[Any]]) -> tuple[int, int] | None:
    """(elements, bytes) of the modules ``plan_all`` returns when run on the meta device; None when it
    cannot run there."""
    try:
        with torch.device("meta"):
            attachments = plan_all()
    except Exception:  # a kind that reads real values while planning: sized by building it
        return None
    return _bytes([a.module for a in attachments if getattr(a, "module", None) is not None])


def check_rule_size(rule: Any, kind_cls: type, sites: list[Any], ctx: Any) -> None:
    """Refuse (SelectionError, exit 2) a rule whose tuners would hold more bytes than the host has free."""
    free = available_memory()
    if free is None or not sites:
        return
    kind = kind_cls(rule)  # a fresh instance: planning here leaves the one that builds untouched

    def plan_all() -> list[Any]:
        whole = kind.plan_selection(sites, ctx)
        if whole is not None:
            return list(whole)
        return [a for site in sites for a in kind.plan(site, ctx)]

    sized = planned_size(plan_all)
    if sized is None:
        return
    count, size = sized
    if size > free:
        raise SelectionError(
            f"rule {rule.name!r}: its tuners would hold {count:,} values ({size:,} bytes, {_human(size)}) on "
            f"{len(sites)} site(s), more than the {_human(free)} of memory free",
            hint="lower the rule's rank/dim (tuners are usually well under 1 % of the model), or select fewer sites",
        )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

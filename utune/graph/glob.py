"""Globs over dotted paths: ``*`` matches one segment, ``**`` any number (zero included)."""

from __future__ import annotations

import fnmatch
import functools
import re


@functools.lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile a dotted-path glob to a regex. Within a segment, ``*``/``?``/``[..]`` act like fnmatch."""
    parts = pattern.split(".")
    out: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            # any number of whole segments, including none
            out.append(r"(?:[^.]+(?:\.[^.]+)*)?" if last else r"(?:[^.]+\.)*")
            continue
        seg = fnmatch.translate(part)
        # fnmatch.translate gives '(?s:...)\Z'; keep the body and stop '*' from crossing a dot
        body = seg[seg.index(":") + 1 : seg.rindex(")")].replace(".*", "[^.]*")
        out.append(body if last else body + r"\.")
    regex = "".join(out)
    return re.compile(rf"\A{regex}\Z")


def glob_match(pattern: str, path: str) -> bool:
    return compile_glob(pattern).match(path) is not None

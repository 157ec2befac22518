"""Model names, known without importing torch: a typo in ``model.name`` is reported in a second.

timm's and torchvision's registries are only readable after importing them (about 3 s). The lists are
cached in ``$UTUNE_CACHE`` (default ``$XDG_CACHE_HOME/utune`` or ``~/.cache/utune``) under a name that
holds both packages' versions, so an upgrade refreshes them. Without a cache (or where it cannot be
written) the registries are read directly: slower, never wrong.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from importlib import metadata
from pathlib import Path

TORCHVISION_PREFIX = "torchvision:"
MODELS_GROUP = "utune.models"  # entry points installed packages publish: name -> a factory of nn.Module


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def cache_dir() -> Path:
    if os.environ.get("UTUNE_CACHE"):
        return Path(os.environ["UTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "utune"


def _cache_file() -> Path:
    return cache_dir() / f"model-names-timm-{_version('timm')}-torchvision-{_version('torchvision')}.txt"


def _from_registries() -> tuple[tuple[str, ...], tuple[str, ...]]:
    import timm
    import torchvision

    return tuple(timm.list_models()), tuple(torchvision.models.list_models(module=torchvision.models))


def _write(path: Path, timm_names: tuple[str, ...], tv_names: tuple[str, ...]) -> None:
    from utune._fs import write_text_atomic
    from utune.errors import StorageError

    lines = [*timm_names, *(TORCHVISION_PREFIX + n for n in tv_names)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "\n".join(lines) + "\n", what="model-name cache")
    except (OSError, StorageError):  # a read-only home: the registries are read again next time
        pass


@functools.lru_cache(maxsize=1)
def model_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(timm names, torchvision names), from the cache when it is there."""
    path = _cache_file()
    try:
        lines = path.read_text().split()
    except OSError:
        lines = []
    if lines:
        tv = tuple(n[len(TORCHVISION_PREFIX) :] for n in lines if n.startswith(TORCHVISION_PREFIX))
        return tuple(n for n in lines if not n.startswith(TORCHVISION_PREFIX)), tv
    timm_names, tv_names = _from_registries()
    _write(path, timm_names, tv_names)
    return timm_names, tv_names


def unknown_model(name: str) -> tuple[str, str] | None:
    """``(message, hint)`` when ``name`` is no timm or torchvision model; None when it is (or may be)."""
    if "/" in name or name.startswith("hf-hub:") or name.startswith("hf_hub:"):
        return None  # a hub model: only the hub knows
    timm_names, tv_names = model_names()
    if name.startswith(TORCHVISION_PREFIX):
        if name[len(TORCHVISION_PREFIX) :] in tv_names:
            return None
    elif name.split(".")[0] in timm_names:  # 'vit_base_patch16_224.augreg_in21k' names a pretrained tag
        return None
    elif "timm" in sys.modules and sys.modules["timm"].is_model(name.split(".")[0]):
        return None  # registered at run time by the caller's code (timm.register_model): not in the cache
    candidates = [TORCHVISION_PREFIX + n for n in tv_names] + list(timm_names)
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else "list timm names with `python -c 'import timm; print(timm.list_models(\"*vit*\"))'`"
    )
    return f"unknown model {name!r}", hint

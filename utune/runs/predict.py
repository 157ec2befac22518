"""A tuned or exported model on image files: ``utune predict`` and :func:`predict`.

The model comes from one of several kinds of source, each opened by a small runner (:data:`RUNNERS`) that
returns a :class:`Predictor`: the model, its data config (for the evaluation transform) and its class
names. A new kind of artifact (an ONNX file, a ``.pt2``) is one more runner and one more line in
:func:`source_kind`.

- ``run``: a run directory (``utune apply SPEC --train``): its spec rebuilt, its checkpoint loaded;
- ``tuners``: a tuner file (``utune export --tuners-only``) on the spec given with ``--spec`` (else the spec
  the file carries);
- ``tuner-folder``: a folder from ``utune export --tuners-only --folder`` (its file and its spec);
- ``timm-folder``: a folder from ``utune export --merge --folder``, loaded by timm itself
  (``timm.create_model("local-dir:...")``): the plain model, with the class names in its config.

Images are files, folders (every image file under them, sorted) or glob patterns. Each is read as RGB,
resized and centre-cropped as the model's evaluation transform does (the one ``utune eval`` uses), batched,
and scored: the ``top_k`` classes with their softmax probabilities.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utune.data.datasets import _images as images
from utune.errors import CheckpointError, UserInputError

Progress = Callable[[int, int], None]


@dataclass
class Predictor:
    """A model ready to score images: ``model`` (in eval mode) takes normalised float batches."""

    model: nn.Module
    data_config: dict[str, Any]
    class_names: list[str] | None
    kind: str
    img_size: int | None = None
    notes: list[str] = field(default_factory=list)


def _from_run(source: Path, spec: Path | None, which: str, overrides: Sequence[str]) -> Predictor:
    from utune.runs import restore_run

    if spec is not None:
        raise UserInputError("--spec goes with a tuner file, not a run directory", hint=f"utune predict {source} ...")
    built = restore_run(source, overrides, which=which)
    s = built.spec
    return Predictor(built.model, built.data_config, s.model.class_names, "run", s.data.img_size)


def _from_tuners(source: Path, spec: Path | None, which: str, overrides: Sequence[str]) -> Predictor:
    from utune.engine.build import build
    from utune.export.tuners_only import load_tuners, read_tuners
    from utune.spec import load_spec_text

    _, meta = read_tuners(source)
    notes = []
    if spec is None:  # the spec the file carries: a data file, so the code it names is not trusted
        resolved = load_spec_text(meta["utune.spec"], f"{source} (its spec)", overrides, trusted=False)
        notes.append(f"using the spec stored in {source} (pass --spec SPEC to use another)")
        built = build(resolved)
    else:
        built = build(spec, list(overrides))
    load_tuners(built, source)
    names = json.loads(meta["utune.class_names"]) if "utune.class_names" in meta else built.spec.model.class_names
    return Predictor(built.model, built.data_config, names, "tuners", built.spec.data.img_size, notes)


def _from_tuner_folder(source: Path, spec: Path | None, which: str, overrides: Sequence[str]) -> Predictor:
    found = _from_tuners(source / "tuners.safetensors", spec, which, overrides)  # the file carries the spec too
    found.kind = "tuner-folder"
    return found


def _from_timm_folder(source: Path, spec: Path | None, which: str, overrides: Sequence[str]) -> Predictor:
    import timm
    from timm.data import resolve_model_data_config

    if spec is not None or overrides:
        raise UserInputError(
            f"{source} is a merged model folder: it takes no --spec or overrides", hint=f"utune predict {source} ..."
        )
    try:
        model = timm.create_model(f"local-dir:{source.resolve()}", pretrained=True)
    except Exception as e:  # a hand-edited or partial folder: timm's reason, in one line
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"timm cannot load {source}: {type(e).__name__}: {why}",
            hint="pass a folder written by `utune export RUN --merge --folder`",
        ) from None
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return Predictor(model, dict(resolve_model_data_config(model)), list(names) if names else None, "timm-folder")


RUNNERS: dict[str, Callable[[Path, Path | None, str, Sequence[str]], Predictor]] = {
    "run": _from_run,
    "tuners": _from_tuners,
    "tuner-folder": _from_tuner_folder,
    "timm-folder": _from_timm_folder,
}


def source_kind(source: Path) -> str:
    """Which runner opens ``source`` (a UserInputError listing the accepted kinds when none does)."""
    if source.is_dir():
        if (source / "spec.yaml").is_file():
            return "run"
        if (source / "config.json").is_file() and any(source.glob("model.*")):
            return "timm-folder"
        if (source / "tuners.safetensors").is_file() and (source / "utune_spec.yaml").is_file():
            return "tuner-folder"
    elif source.is_file() and source.suffix == ".safetensors":
        return "tuners"
    what = "does not exist" if not source.exists() else "is not a model utune can run"
    raise UserInputError(
        f"{source} {what}",
        hint="pass a run folder (runs/<spec>-<time>), a tuner file with --spec SPEC, or a folder from "
        "`utune export RUN --merge --folder` (or --tuners-only --folder)",
    )


def open_model(
    source: Path | str, *, spec: Path | str | None = None, which: str = "latest", overrides: Sequence[str] = ()
) -> Predictor:
    """The model of ``source`` (see the module docstring), ready to score images."""
    path = Path(source)
    found = RUNNERS[source_kind(path)](path, Path(spec) if spec is not None else None, which, overrides)
    found.model.eval()
    return found


def collect_images(items: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders: every image file under them (sorted); patterns (``*``, ``?``, ``[``): their
    matches (``**`` crosses folders). A name that matches nothing is a UserInputError."""
    found: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and images.is_image(p))
            if not inside:
                raise UserInputError(
                    f"no image files under {path}", hint=f"image files end in {images.IMAGE_EXTENSIONS}"
                )
            found += inside
        elif path.is_file():
            found.append(path)
        elif any(c in str(item) for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise UserInputError(
                    f"no file matches {item}", hint="check the pattern (quote it to let utune expand it)"
                )
            found += matches
        else:
            raise UserInputError(f"image {item} not found", hint="pass image files, folders or glob patterns")
    if not found:
        raise UserInputError("no images given", hint="utune predict SOURCE photo.jpg [more.jpg | folder/ | '*.png']")
    return list(dict.fromkeys(found))


def _transform(found: Predictor) -> Callable[[Any], torch.Tensor]:
    from utune.data.datasets.transforms import build_transform

    return build_transform(found.data_config, found.img_size, training=False)


@torch.no_grad()
def predict(
    source: Path | str,
    inputs: Sequence[str | Path],
    *,
    spec: Path | str | None = None,
    top_k: int = 5,
    batch_size: int = 32,
    which: str = "latest",
    overrides: Sequence[str] = (),
    skip_bad_images: bool = False,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score image files with a tuned or exported model.

    Returns ``{"source", "kind", "classes", "class_names", "top_k", "predictions": [{"path", "top": [{"label",
    "index", "prob"}, ...]}, ...], "skipped", "warnings", "notes"}``: one entry per image, in input order, the
    ``top_k`` most probable classes first. Unreadable images stop it with their names (a DataError) unless
    ``skip_bad_images``, which leaves them out (listed under ``skipped``, with one warning).
    """
    if top_k < 1 or batch_size < 1:
        raise UserInputError("--top-k and --batch-size must be at least 1")
    source_kind(Path(source))  # the cheap checks first: the source, then the images
    paths, bad, warnings = _readable(collect_images(inputs), skip_bad_images)
    found = open_model(source, spec=spec, which=which, overrides=overrides)
    model = found.model.to(device)
    transform = _transform(found)
    rows: list[dict[str, Any]] = []
    classes = None
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        x = torch.stack([transform(images.read_image(p)) for p in chunk]).to(device)
        out = model(x)
        logits = (out if isinstance(out, torch.Tensor) else out[0]).float()
        classes = logits.shape[-1]
        probs = logits.softmax(dim=-1)
        values, indices = probs.topk(min(top_k, classes), dim=-1)
        for path, vs, ix in zip(chunk, values.tolist(), indices.tolist(), strict=True):
            top = [{"label": _name(found.class_names, i), "index": i, "prob": v} for v, i in zip(vs, ix, strict=True)]
            rows.append({"path": str(path), "top": top})
        if progress is not None:
            progress(len(rows), len(paths))
    if found.class_names is None:
        warnings.append(
            "the model carries no class names: labels are class indices (train with this utune to record them)"
        )
    return {
        "source": str(source),
        "kind": found.kind,
        "classes": classes,
        "class_names": found.class_names,
        "top_k": min(top_k, classes or top_k),
        "predictions": rows,
        "skipped": sorted(bad) if skip_bad_images else [],
        "warnings": warnings,
        "notes": found.notes,
    }


def _readable(paths: list[Path], skip: bool) -> tuple[list[Path], set[str], list[str]]:
    """The images that can be read, the bad ones, and the warning when ``skip`` left some out (else a
    DataError naming them)."""
    bad = images.check_images([str(p) for p in paths], cache_dir=None, key="")
    if not bad:
        return paths, set(bad), []
    if not skip:
        raise images.refuse(bad, "the images given")
    warning = images.skipped(bad, "the images given").replace("data.skip_bad_images", "--skip-bad-images")
    kept = [p for p in paths if str(p) not in bad]
    if not kept:
        raise UserInputError("every image given is unreadable", hint="check the files")
    return kept, set(bad), [warning]


def _name(names: list[str] | None, index: int) -> str:
    return names[index] if names is not None and index < len(names) else str(index)

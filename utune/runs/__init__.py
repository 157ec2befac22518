"""Run folders, above the library: ``utune apply --train``, ``utune eval`` and ``utune export`` of a run.

A run directory holds ``spec.yaml`` (the resolved spec), ``metrics.jsonl``, ``summary.json`` and
``checkpoints/``.

Runs default to ``runs/<spec>-<time>``; ``eval``, ``export`` and ``--resume`` without a run take the most
recent run that has a checkpoint. A run that fails before its first checkpoint removes its folder, so a
failed start is never what a later default picks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from utune._fs import make_dir, remove_tree, write_text_atomic
from utune._lock import run_lock
from utune.engine.record import Built
from utune.errors import CheckpointError, DataError, SpecError, UserInputError
from utune.spec.sections import DataConfig, TrainConfig
from utune.train import distributed as du
from utune.train.checkpoint import (
    STATE,
    WEIGHTS,
    check_frozen,
    has_checkpoint,
    load_trainable,
    read_state,
    read_weights,
    resolve_checkpoint,
)
from utune.train.loop import Reporter, evaluate, fit

if TYPE_CHECKING:
    from utune.spec import Spec

RUNS = Path("runs")

# Keys a resumed run may change: where the data lives, how it is loaded, how often the run logs,
# evaluates and checkpoints, how the host allocator returns memory, and how it exports. None of them
# changes the trained weights.
RESUME_SAFE = (
    "data.root",
    "data.num_workers",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_best",
    "train.release_freed_memory",
    "export.*",
    "model.class_names",
    "data.skip_bad_images",
)


def build_loaders(
    data_cfg: DataConfig,
    data_config: dict,
    train_cfg: TrainConfig,
    splits: Sequence[str] = ("train", "val"),
    *,
    datasets: Mapping[str, Dataset] | None = None,
    evaluation: bool = False,
) -> dict[str, DataLoader]:
    """The one place loaders are made from a spec (swap point for tests and other data back-ends). They yield
    uint8 images; each loader's ``input_norm`` normalises them on the device (``evaluate`` and ``fit`` use it).

    ``datasets`` (already opened and transformed) skips reading; ``evaluation``: every split is read with
    the evaluation transform and in full (no shuffling, no dropped tail), the ``train`` split included.
    """
    import utune.data as data

    if datasets is None:
        datasets = data.build_datasets(
            data_cfg, data_config, splits=tuple(splits), augment_training=not evaluation, device_normalize=True
        )
    loaders = {
        name: data.build_loader(
            ds,
            train_cfg.batch_size,
            train=name == "train" and not evaluation,
            num_workers=data_cfg.num_workers,
            seed=train_cfg.seed,
            distributed=du.world() > 1,
        )
        for name, ds in datasets.items()
        if name in splits
    }
    for loader in loaders.values():  # uint8 batches: the loader says how they become the model's input, so
        loader.input_norm = input_norm(data_config)  # fit/evaluate find it
    return loaders


def input_norm(data_config: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The device-side normalisation of the model's input (for datasets built with ``device_normalize``)."""
    from utune.data import InputNorm

    return InputNorm.from_data_config(data_config)


# ---- where runs live ----------------------------------------------------------------------------------


def default_run_dir(spec_name: str | Path, base: Path = RUNS) -> Path:
    """``runs/<spec-stem>-<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``... if that second is taken)."""
    stem = Path(str(spec_name)).stem or "run"
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base / name, 2
    while path.exists():
        path, n = base / f"{name}-{n}", n + 1
    return path


def latest_run(base: Path = RUNS, stem: str | None = None) -> Path:
    """The most recently started (or resumed) run under ``base`` that has a checkpoint.

    ``stem``: only runs of that spec (``runs/<stem>-<time>``).
    """
    base = Path(base)
    runs = [d for d in base.iterdir() if (d / "spec.yaml").is_file()] if base.is_dir() else []
    if stem is not None:
        runs = [d for d in runs if d.name.startswith(f"{stem}-")]
    done = [d for d in runs if has_checkpoint(d / "checkpoints")]
    if not done:
        what = f"runs of {stem}" if stem else "training runs"
        extra = f" ({len(runs)} without a checkpoint)" if runs else ""
        raise CheckpointError(
            f"no {what} with a checkpoint under {base}/{extra}",
            hint="train one with `utune apply SPEC --train`, or pass the run directory explicitly",
        )
    return max(done, key=lambda d: ((d / "spec.yaml").stat().st_mtime_ns, d.name))


def resolve_run_dir(spec_source: str | None, out: Path | None, resume: bool) -> Path:
    """Where ``apply --train`` writes: ``--out``, else (resume) the latest run of this spec, else a new
    ``runs/<spec>-<time>``."""
    if out is not None:
        if resume and not has_checkpoint(Path(out) / "checkpoints"):
            raise CheckpointError(
                f"nothing to resume in {out}: it holds no checkpoint", hint="drop --resume to start a new run there"
            )
        if Path(out).exists() and not Path(out).is_dir():
            raise CheckpointError(f"--out {out} is a file, not a folder", hint="choose a folder for the run")
        return Path(out)
    stem = Path(spec_source or "run").stem
    if resume:
        return latest_run(RUNS, stem=stem)
    return default_run_dir(stem)


def recorded_spec(run_dir: Path) -> Any:
    """The spec a run recorded (``run/spec.yaml``): a data file, so a factory it names is imported only when
    the user names it too (``utune --trust PKG``, ``UTUNE_TRUST``, or a spec they pass: utune._imports)."""
    from utune.spec import load_spec

    path = Path(run_dir) / "spec.yaml"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} is not a utune run directory (no spec.yaml)",
            hint="pass a folder made by `utune apply SPEC --train`, e.g. runs/<spec>-<time>",
        )
    return load_spec(path, trusted=False)


def check_resume_spec(run_dir: Path, spec: Any) -> list[str]:
    """Refuse to resume with settings that change the result; returns the safe keys that differ."""
    from utune.graph.glob import glob_match
    from utune.spec import spec_to_dict

    old, new = _flat(spec_to_dict(recorded_spec(run_dir))), _flat(spec_to_dict(spec))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    safe = [k for k in changed if any(glob_match(p, k) for p in RESUME_SAFE)]
    bad = [k for k in changed if k not in safe]
    if bad:
        lines = [f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} now" for k in bad]
        raise SpecError(
            f"cannot resume {run_dir} with a different spec ({len(bad)} setting(s) would change the result)",
            problems=lines,
            hint="resume with the run's own settings (they are in its spec.yaml); only "
            + ", ".join(RESUME_SAFE)
            + " may differ. To train with new settings, start a new run (drop --resume)",
        )
    return safe


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


# ---- training -----------------------------------------------------------------------------------------


def train_run(
    built: Built,
    out_dir: Path,
    resume: bool,
    *,
    datasets: Mapping[str, Dataset] | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Train a built model as its spec says, in ``out_dir``; returns the summary of :func:`fit`.

    ``datasets``: opened and transformed splits (``utune.data.open_datasets``); read from the spec when
    None. A new run writes its resolved ``spec.yaml``; a resumed one keeps the one it recorded. A new run
    that fails before its first checkpoint removes its folder. Under torchrun every rank calls this; rank
    0's ``out_dir`` wins and only rank 0 writes.
    """
    from utune.spec import spec_to_yaml

    spec = built.spec
    check_steps(spec.train)
    du.setup(spec.train.device)
    created = False
    with contextlib.ExitStack() as hold:
        try:
            out_dir = Path(du.broadcast_object(str(out_dir)))
            if du.is_main():
                created = not out_dir.exists()
                make_dir(out_dir, "run folder")
                hold.enter_context(run_lock(out_dir))  # one writer per run, until this function returns
            if not resume and has_checkpoint(out_dir / "checkpoints"):
                raise CheckpointError(
                    f"{out_dir} already holds a run's checkpoints",
                    hint="pass --resume to continue it, or choose another output directory",
                )
            if du.is_main() and not resume:
                write_text_atomic(out_dir / "spec.yaml", spec_to_yaml(spec), what="run spec")
            du.barrier()
            return _train(built, out_dir, resume, datasets, reporter)
        except BaseException:
            if created and du.is_main() and not has_checkpoint(out_dir / "checkpoints"):
                remove_tree(out_dir)  # a failed start is not a run a later default export would pick
            raise
        finally:
            du.cleanup()


def check_steps(cfg: TrainConfig) -> None:
    """A run must have a step to train: ``epochs: 0`` without ``max_steps`` would leave a run with no checkpoint."""
    if cfg.epochs == 0 and cfg.max_steps is None:
        raise SpecError(
            "train.epochs is 0 and train.max_steps is not set: nothing to train",
            hint="set train.epochs (e.g. train.epochs=1) or train.max_steps; to score the model as built, "
            "use `utune apply SPEC` without --train",
        )


def _train(
    built: Built,
    out_dir: Path,
    resume: bool,
    datasets: Mapping[str, Dataset] | None,
    reporter: Reporter | None,
) -> dict:
    from utune.spec import spec_to_yaml

    spec = built.spec
    loaders = build_loaders(spec.data, built.data_config, spec.train, datasets=datasets)
    meta = {"model": built.model_label, "dataset": spec.data.dataset, "processes": du.world()}
    if "tensorboard" in spec.train.log and du.is_main():
        from utune.train.tensorboard import Reporters, TensorBoardReporter

        reporter = Reporters([reporter, TensorBoardReporter(out_dir / "tensorboard", spec_to_yaml(spec))])
    return fit(
        built.model,
        spec.train,
        loaders,
        out_dir,
        resume=resume,
        run_meta=meta,
        reporter=reporter,
        input_norm=input_norm(built.data_config),
    )


@dataclass
class TrainResult:
    """What :func:`train_spec` did: the run folder, the build (its report), the summary of :func:`fit`."""

    run_dir: Path
    built: Built
    summary: dict[str, Any]


def train_spec(
    spec: str | Path | dict[str, Any] | Spec,
    overrides: Sequence[str] = (),
    *,
    out: Path | None = None,
    resume: bool = False,
    tuners: Path | None = None,
    download: bool = False,
    verify: bool = False,
    reporter: Reporter | None = None,
    on_built: Callable[[Built, Path, list[str]], None] | None = None,
) -> TrainResult:
    """Train a spec: ``utune apply SPEC --train`` as one call.

    The spec, then the run folder (``out``; default ``runs/<spec>-<time>``, or this spec's latest run with
    ``resume``) and the data, all checked before the slow build; ``model.num_classes`` defaults to the
    dataset's (:func:`utune.engine.build.resolve_classes`); a resumed run must keep the settings that change the result.
    Then build, check the head against the classes, load ``tuners`` (a tuner-only file) if given, and train.
    ``on_built(built, run_dir, notes)`` runs before training starts (the CLI shows the report there); ``notes``
    says what was resolved (the resumed run's harmless changes).
    """
    from utune.data import open_datasets
    from utune.engine.build import build, resolve_classes, with_tuners
    from utune.spec import load_spec
    from utune.train.distributed import check_environment

    loaded = load_spec(spec, list(overrides))
    check_environment(loaded.train.device)
    name = str(spec) if isinstance(spec, str | Path) else (loaded.source_path or loaded.source)
    run_dir = resolve_run_dir(str(name), out, resume)
    opened = open_datasets(loaded.data, splits=("train", "val"), download=download)
    loaded, class_notes, warnings = resolve_classes(loaded, opened.classes)
    loaded = with_class_names(loaded, opened)  # the run, its exports and `utune predict` carry them
    warnings = [*opened.warnings, *warnings]
    notes: list[str] = []
    if resume:
        safe = check_resume_spec(run_dir, loaded)
        notes.append(f"resuming {run_dir}" + (f" (changed, harmless: {', '.join(safe)})" if safe else ""))
    built = build(loaded, verify=verify)
    built = dataclasses.replace(
        built,
        report=built.report.replace(notes=(*class_notes, *built.report.notes)),
        warnings=[*warnings, *built.warnings],
    )
    check_classes(built, opened.classes, loaded.data.dataset)
    if tuners is not None:
        built, loaded_file = with_tuners(built, tuners, verify=verify)
        notes.append(f"loaded {loaded_file['tensors']} tensors from {tuners}")
    if on_built is not None:
        on_built(built, run_dir, notes)
    datasets = opened.attach(built.data_config, device_normalize=True)  # normalised on the device
    summary = train_run(built, run_dir, resume, datasets=datasets, reporter=reporter)
    return TrainResult(run_dir, built, summary)


# ---- evaluation ---------------------------------------------------------------------------------------


def restore_run(run_dir: Path, overrides: Sequence[str] = (), *, which: str = "latest") -> Built:
    """Rebuild a run's model from its ``spec.yaml`` and load its checkpoint (``latest`` or ``best``).

    The frozen weights must be the ones the run trained against (checked by fingerprint); the trainable
    tensors load strictly by name. Shared by ``utune eval`` and ``utune export``.
    """
    from utune.engine.build import build

    recorded_spec(run_dir)  # a clear error for a folder that is not a run
    folder = resolve_checkpoint(Path(run_dir), which)
    weights = read_weights(folder / WEIGHTS)
    built = build(Path(run_dir) / "spec.yaml", list(overrides), trusted=False)  # the run folder is data
    check_frozen(built.model, read_state(folder / STATE), folder)
    load_trainable(built.model, weights, source=folder / WEIGHTS)
    return built


def eval_run(
    run_dir: Path,
    dataset: str | None = None,
    split: str | None = None,
    *,
    which: str = "latest",
    overrides: Sequence[str] = (),
    download: bool = False,
) -> dict:
    """Rebuild a run's model, load its checkpoint and score every image of ``split`` with the evaluation
    transform (the ``train`` split too: no augmentation, no dropped tail).

    ``split`` None: ``test`` when the task has one, else ``val`` (a carved val split included), with a
    ``note`` saying so. ``dataset`` evaluates on another dataset (``data.dataset=...``); its classes must
    match the trained head. ``which`` is ``latest`` or ``best``; ``overrides`` apply to the run's spec (e.g.
    ``data.root=...``). Returns top-1 ``acc``, ``top5``, ``loss``, ``n``, ``per_class`` (name, images,
    accuracy) and ``confusion`` (rows: true class, columns: predicted), and ``class_names``.
    """
    from utune.data import open_datasets, scored_split
    from utune.spec import load_spec

    run_dir = Path(run_dir)
    ov = [*overrides, *([f"data.dataset={dataset}"] if dataset else [])]
    recorded_spec(run_dir)
    spec = load_spec(run_dir / "spec.yaml", ov, trusted=False)
    split, note = scored_split(spec.data, split)
    opened = open_datasets(spec.data, splits=(split,), download=download)  # data checked before the model
    built = restore_run(run_dir, ov, which=which)
    check_classes(built, opened.classes, spec.data.dataset)
    datasets = opened.attach(built.data_config, augment_training=False, device_normalize=True)
    loaders = build_loaders(spec.data, built.data_config, spec.train, (split,), datasets=datasets, evaluation=True)
    device = du.resolve_device(spec.train.device)
    norm = input_norm(built.data_config)
    classes = built.report.get("num_outputs") or opened.classes
    result = evaluate(
        built.model.to(device), loaders[split], device, amp=spec.train.amp, input_norm=norm, classes=classes
    )
    names = getattr(spec.model, "class_names", None) or opened.class_names or [str(i) for i in range(classes)]
    folder = resolve_checkpoint(run_dir, which)
    return {
        "run": str(run_dir),
        "checkpoint": str(folder),
        "dataset": spec.data.dataset,
        "split": split,
        "note": note,
        **result,
        "class_names": names,
        "per_class": per_class(result["confusion"], names),
        "warnings": opened.warnings,
    }


def per_class(confusion: list[list[int]], names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class: its name, how many images of it were scored and the share predicted right."""
    rows = []
    for i, row in enumerate(confusion):
        n = sum(row)
        rows.append({"index": i, "name": names[i], "n": n, "correct": row[i], "acc": row[i] / n if n else None})
    return rows


def with_class_names(spec: Any, opened: Any) -> Any:
    """The spec with ``model.class_names`` from the dataset (``OpenedData.class_names``) when it does not
    name them and the head has one output per class: the run, its exports and ``predict`` then carry them."""
    from utune.spec import with_model

    names = opened.class_names
    if spec.model.class_names is not None or not names or spec.model.num_classes not in (None, len(names)):
        return spec
    return with_model(spec, class_names=list(names))


def check_classes(built: Built, classes: int, dataset: str | None) -> None:
    """The model's outputs must be the dataset's classes (a clear error, not an IndexError mid-run)."""
    outputs = built.report.get("num_outputs")
    if outputs is None or outputs == classes:
        return
    raise DataError(
        f"the model has {outputs} outputs but {dataset!r} has {classes} classes",
        hint=f"set model.num_classes={classes} (or leave num_classes out of the spec: utune then takes it "
        "from the dataset)",
    )


# ---- a run or a spec, for export ---------------------------------------------------------------------


def load_run(run_dir: Path | str | None = None, overrides: Sequence[str] = (), which: str = "latest") -> Built:
    """Rebuild a run's model from its ``spec.yaml`` and load its checkpoint's trainable tensors.

    ``run_dir`` None: the most recent run under ``runs/``. ``which``: ``latest`` or ``best``.
    """
    run = Path(run_dir) if run_dir is not None else latest_run()
    return restore_run(run, list(overrides), which=which)


def load_source(
    source: Path | str | None,
    overrides: Sequence[str] = (),
    *,
    tuners: Path | str | None = None,
    which: str = "latest",
) -> Built:
    """A run directory (its checkpoint), or a spec file (plus a tuner file, when given)."""
    from utune.engine.build import build
    from utune.export.tuners_only import load_tuners

    if source is not None and str(source).endswith((".yaml", ".yml")):
        built = build(source, list(overrides))
        if tuners is not None:
            load_tuners(built, tuners)
        return built
    if tuners is not None:
        raise UserInputError(
            "--tuners goes with a spec file, not a run directory",
            hint="`utune export SPEC.yaml --tuners FILE --merge -o OUT`",
        )
    return load_run(source, overrides, which)


def default_output(source: Path | str | None, mode: str) -> Path:
    if source is not None and str(source).endswith((".yaml", ".yml")):
        raise UserInputError("exporting from a spec needs -o/--output")
    from utune.export.run import DEFAULT_NAMES

    run = Path(source) if source is not None else latest_run()
    return run / "export" / DEFAULT_NAMES[mode]


EXPORT_FLAGS = ("--merge", "--tuners-only", "--peft", "--onnx", "--torch-export")


def choose_mode(
    merge: bool = False,
    tuners_only: bool = False,
    peft: bool = False,
    spec_export: Any = None,
    *,
    onnx: bool = False,
    torch_export: bool = False,
) -> str:
    """The export mode: the one flag given (two exclude each other), else the spec's ``export:`` section
    (``merge: true`` or ``format: peft``), else ``tuners-only``."""
    flags = (merge, tuners_only, peft, onnx, torch_export)
    chosen = [name for name, on in zip(EXPORT_FLAGS, flags, strict=True) if on]
    if len(chosen) > 1:
        raise UserInputError(f"{' and '.join(chosen)} exclude each other", hint="choose one export mode")
    if chosen:
        return chosen[0].lstrip("-")
    if spec_export is not None:
        if getattr(spec_export, "merge", False):
            return "merge"
        if getattr(spec_export, "format", None) == "peft":
            return "peft"
    return "tuners-only"


def export_source(
    source: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    merge: bool = False,
    tuners_only: bool = False,
    peft: bool = False,
    onnx: bool = False,
    torch_export: bool = False,
    output: Path | None = None,
    force: bool = False,
    verify: bool = True,
    which: str = "latest",
    tuners: Path | None = None,
    folder: bool = False,
    notify: Callable[[str, str], None] | None = None,
) -> tuple[str, dict[str, Any]]:
    """``utune export`` as one call: the mode and what :func:`utune.export.run.export` (or, with ``folder``,
    :func:`utune.export.hub.export_folder`) returned.

    ``source``: a run folder (default: the latest run with a checkpoint) or a spec file (then ``output`` is
    required, and ``tuners`` loads trained tuners onto it). Bad flags and an existing output are refused before
    the (slow) rebuild. ``notify(level, text)`` hears what was chosen for the user (``note``/``warn``).
    """
    from utune.export.io import check_target
    from utune.export.run import export

    say = notify or (lambda level, text: None)
    flags = {"onnx": onnx, "torch_export": torch_export}
    choose_mode(merge, tuners_only, peft, **flags)  # bad flags fail before anything is read
    from_spec = source is not None and str(source).endswith((".yaml", ".yml"))
    if output is not None:
        check_target(output, force)
    elif from_spec:
        raise UserInputError("exporting from a spec needs -o/--output", hint=f"utune export {source} ... -o FILE")
    if from_spec and tuners is None:
        say("warn", f"exporting {source} without --tuners: its tuners are as initialised, not trained")
    if source is None:
        source = latest_run(RUNS)
        say("note", f"using the latest run: {source}")
    built = load_source(source, overrides, tuners=tuners, which=which)
    mode = choose_mode(merge, tuners_only, peft, getattr(built.spec, "export", None), **flags)
    if folder:
        from utune.export.hub import export_folder

        if mode in ("peft", "onnx", "torch-export"):
            raise UserInputError(f"--{mode} writes its own format; --folder goes with --merge or --tuners-only")
        run = None if from_spec else Path(source)
        path = output if output is not None else Path(source) / "export" / ("merged" if mode == "merge" else "tuners")
        return mode, export_folder(built, mode, path, run=run, force=force, verify=verify)
    path = output if output is not None else default_output(source, mode)
    return mode, export(built, mode, path, force=force, verify=verify, source=tuners if from_spec else source)


def import_peft(
    folder: Path | str, model: dict[str, Any], output: Path | str, *, force: bool = False, verify: bool = True
) -> dict[str, Any]:
    """Convert a PEFT folder: build the spec on ``model``, load the tensors, check against PEFT, write
    ``output`` (a tuner file) and its spec beside it (``.yaml``). Returns a summary."""
    from utune._imports import is_ref, trust
    from utune.engine.build import build
    from utune.export.io import check_target, write_bytes_atomic
    from utune.export.peft_import import load_into, peft_to_spec, verify_with_peft
    from utune.export.tuners_only import export_tuners
    from utune.spec import load_spec, spec_to_yaml

    folder, output = Path(folder), Path(output)
    spec_path = output.with_suffix(".yaml")
    check_target(output, force)
    check_target(spec_path, force)
    spec_dict, files = peft_to_spec(folder, model)
    if is_ref(model.get("name")):
        trust([model["name"]])  # the model section is the caller's (--model, --spec): its factory is theirs
    built = build(load_spec(spec_dict, trusted=False))  # the rules come from the folder, a data file
    load_into(built, files, folder)
    check = verify_with_peft(built, folder) if verify else None
    result = export_tuners(built, output, force=force)
    write_bytes_atomic(spec_path, spec_to_yaml(load_spec(spec_dict)).encode(), force=force)
    result.update(spec=str(spec_path), rules=[r["name"] for r in spec_dict["tuners"]], verify=check)
    return result

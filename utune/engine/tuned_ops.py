"""What PEFT users reach for on a tuned model, named as PEFT names it where the meaning is the same.

:class:`TunedOps` is mixed into :class:`utune.engine.tuned.TunedModel`: ``disable_tuners()`` (a context manager:
inside, the output is the base model's), ``merge_and_unload()`` (the plain backbone with every tuner folded
in, the algebra of ``utune export --merge``), ``print_trainable_parameters()``, ``load_tuners(path)`` (a
tuner-only file or a run folder). They need what the build recorded on the model (its spec, manifest,
report and data config, under :data:`RECORD`): data, not a pointer back to the build, so a deep copy or a
pickled round trip keeps it (:mod:`utune.engine.tuned` carries it through both).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import fx, nn

from utune.engine.record import Built
from utune.errors import TunedModelError

if TYPE_CHECKING:
    from utune.engine.record import BuildReport
    from utune.graph.manifest import Manifest
    from utune.spec import Spec

# what the tuned model keeps in its __dict__ (not as submodules: no state-dict keys): the base model, the
# input size, the features/head split, the build's record, and the disable_tuners depth
BASE, SIZE, SPLIT, RECORD, DISABLED = (
    "_utune_base",
    "_utune_input_size",
    "_utune_split",
    "_utune_record",
    "_utune_disabled",
)


def make_record(
    spec: Spec, manifest: Manifest, report: BuildReport, data_config: dict[str, Any], given: bool = False
) -> dict[str, Any]:
    """What the tuned model keeps of its build (see the module docstring)."""
    return {"spec": spec, "manifest": manifest, "report": report, "data_config": data_config, "given": given}


def built_of(model: nn.Module, what: str = "this") -> Built:
    """The build record of a tuned model, from what the model carries (TunedModelError for another model)."""
    record = model.__dict__.get(RECORD)
    if record is None:
        raise TunedModelError(
            f"{what} needs a model made by utune.build (this {type(model).__name__} carries no build record)",
            hint="call it on utune.build(spec).model, or a copy of it",
        )
    return Built(
        spec=record["spec"],
        model=cast(fx.GraphModule, model),
        base=model.__dict__[BASE],
        report=record["report"],
        input_size=cast(tuple[int, int, int], tuple(model.__dict__[SIZE])),
        data_config=record["data_config"],
        warnings=list(record["report"].warnings),
        manifest=record["manifest"],
        given=record.get("given", False),
    )


class TunedOps(nn.Module):
    """PEFT-style operations of a tuned model (see the module docstring)."""

    def _built(self, what: str) -> Built:
        return built_of(self, what)

    # ----- the base model's output --------------------------------------------------------------------
    @contextmanager
    def disable_tuners(self) -> Iterator[None]:
        """Inside, the model computes the base model: every tuner bypassed, bit-exact. Base parameters the
        spec made trainable (``trainable: [head]``) keep their current values, as PEFT's modules_to_save do
        not: there is no untrained copy of them."""
        self.__dict__[DISABLED] = self.__dict__.get(DISABLED, 0) + 1
        try:
            yield
        finally:
            self.__dict__[DISABLED] -= 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get(DISABLED):
            base: nn.Module = self.__dict__[BASE]
            shared = {id(m) for m in self.modules()}
            for m in base.modules():  # the base's own containers follow the tuned model's mode
                if id(m) not in shared:
                    m.training = self.training
            held = {p.dtype for p in base.parameters() if p.is_floating_point()} - {torch.float32}
            if not held:
                return base(*args, **kwargs)
            # model.frozen_dtype: the base holds bf16 weights beside float32 ones: autocast reconciles them
            from utune.graph.precision import to_dtype

            device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
            with torch.autocast(device, dtype=held.pop()):
                return to_dtype(base(*args, **kwargs), torch.float32)
        return super().__call__(*args, **kwargs)

    # ----- merging ----------------------------------------------------------------------------------------
    def merge_and_unload(self) -> nn.Module:
        """A fresh plain backbone (the spec's architecture) holding the base weights with every tuner
        folded in, as ``utune export --merge`` writes them; ExportError naming the tuners that cannot fold.

        The tuned model is left as it is (its frozen weights are the plain model's source, not changed)."""
        from utune.export.merge import merged_state_dict, plain_model

        built = self._built("merge_and_unload")
        state = merged_state_dict(built).state
        plain = plain_model(built)
        plain.load_state_dict(state, strict=True)
        ref = next((p for p in self.parameters()), None)
        if ref is not None:
            plain.to(ref.device)
        return plain.train(self.training)

    # ----- parameters ---------------------------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, each tensor once."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """``trainable params: N || all params: M || trainable%: P`` (PEFT's line)."""
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ----- loading ----------------------------------------------------------------------------------------
    def load_tuners(self, path: str | Path) -> dict[str, Any]:
        """Load trained tuners: a tuner-only file (``utune export --tuners-only``) or a run folder (its
        latest checkpoint). The spec and the base weights must be those the tuners were trained with."""
        built = self._built("load_tuners")
        path = Path(path)
        if path.is_dir():
            from utune.train.checkpoint import (
                STATE,
                WEIGHTS,
                check_frozen,
                load_trainable,
                read_state,
                read_weights,
                resolve_checkpoint,
            )

            _same_tuners(built, path)
            folder = resolve_checkpoint(path, "latest")
            check_frozen(self, read_state(folder / STATE), folder)
            load_trainable(self, read_weights(folder / WEIGHTS), source=folder / WEIGHTS)
            return {"path": str(folder), "checkpoint": folder.name}
        from utune.export.tuners_only import load_tuners

        return load_tuners(built, path)


def _same_tuners(built: Built, run: Path) -> None:
    """A run folder's tuners must be the spec's (architecture, rules, trainable): else a clear refusal."""
    from utune.errors import CheckpointError
    from utune.export.tuners_only import spec_differences
    from utune.spec import load_spec

    if not (run / "spec.yaml").is_file():
        raise CheckpointError(f"{run} is not a utune run directory (no spec.yaml)", hint="pass a run folder")
    problems = spec_differences(load_spec(run / "spec.yaml", trusted=False), built.spec)
    if problems:
        raise CheckpointError(
            f"{run} was trained with another spec: " + "; ".join(problems[:4]),
            hint="build the model from the run's own spec.yaml (`utune spec show RUN`)",
        )

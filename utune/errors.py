"""The error taxonomy.

Every failure utune expects is a :class:`UtuneError`. Each carries a one-line message naming the
problem and, where there is one, a ``hint`` naming the next thing to try. ``exit_code`` is 2 for bad
input (the user can fix it) and 1 for internal failures. The CLI prints ``message`` and ``hint``
and exits with ``exit_code``; it shows a traceback only when ``UTUNE_DEBUG=1``.
"""

from __future__ import annotations

from collections.abc import Iterable


class UtuneWarning(UserWarning):
    """Something utune changed or doubts but carries on with (the CLI prints it as one ``warning:`` line)."""


class UtuneError(Exception):
    """Base of every error utune raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UserInputError(UtuneError):
    """Something the user gave us is wrong; they can fix it."""

    exit_code = 2


class SpecError(UserInputError):
    """A spec file or override is malformed. ``problems`` lists every problem found, with its line."""

    def __init__(self, message: str, problems: Iterable[str] = (), hint: str | None = None) -> None:
        self.problems = list(problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message, hint)


class OverrideError(SpecError):
    """A ``key.path=value`` override on the command line is malformed or invalid."""


class SelectionError(UserInputError):
    """A rule's ``at:`` selector matched nothing, or matched a site its tuner cannot serve."""


class ModelError(UserInputError):
    """An unknown model name, an unreadable or mismatched weights file."""


class DataError(UserInputError):
    """A dataset that cannot be found or read."""


class CheckpointError(UserInputError):
    """A run directory, checkpoint or tuner file that is missing, corrupt or does not match."""


class TraceError(UtuneError):
    """torch.fx could not trace the model."""

    exit_code = 2  # the model is the user's input: a different model or an issue report is the fix


class RewriteError(UtuneError):
    """A graph pass failed while inserting a tuner."""


class TunedModelError(UtuneError):
    """The tuned model cannot do what the base model's method would (no features/head split in its
    graph, a new head the traced graph cannot call)."""

    exit_code = 2  # the model or the call is the user's choice


class UnavailableAttributeError(TunedModelError, AttributeError):
    """A base model attribute the tuned model does not offer, with the reason.

    Also an AttributeError, so ``hasattr`` and ``getattr(model, name, default)`` see it as absent.
    """


class ExportError(UtuneError):
    """An export that cannot be done (non-mergeable tuner, verification failure, existing file)."""

    exit_code = 2


class StorageError(UserInputError):
    """A file or folder utune must write cannot be written (full disk, no permission, a file in the way).

    Raised only after the partial file is removed: what was there before (the previous checkpoint, an
    existing export) is intact.
    """


class TrainingDiverged(UserInputError):
    """The training loss became NaN or infinite (a learning rate too high, no gradient clipping)."""


class DeviceError(UserInputError):
    """The requested device (or the process group torchrun describes) is not available."""


class Interrupted(UtuneError):
    """SIGINT or SIGTERM stopped a command. ``exit_code`` follows the shell convention (128 + signal)."""

    def __init__(self, message: str, hint: str | None = None, *, signal_number: int = 2) -> None:
        super().__init__(message, hint)
        self.exit_code = 128 + signal_number


class TrainingInterrupted(Interrupted):
    """Training stopped on a signal; ``checkpoint_step`` is the step ``--resume`` continues from (or None)."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        signal_number: int = 2,
        out_dir: str = "",
        step: int = 0,
        checkpoint_step: int | None = None,
    ) -> None:
        super().__init__(message, hint, signal_number=signal_number)
        self.out_dir, self.step, self.checkpoint_step = out_dir, step, checkpoint_step


class DistributedError(UtuneError):
    """Another process of a multi-process run failed or vanished; this one stopped because of it."""

"""The spec's schema: its sections (``model``, ``tuners``, ``trainable``, ``export``; ``data`` and ``train`` are
:mod:`utune.spec.sections`) as pydantic models, and the field types they share.

:mod:`utune.spec.load` reads a file into them, collecting every problem with its line; a tuner kind's own
options are the kind's ``Options`` model, checked in a second phase (see there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from utune._imports import is_ref
from utune._schema import Section
from utune.errors import UserInputError
from utune.graph.select import Selector
from utune.graph.share import Share
from utune.graph.trainable import TypeSelector
from utune.spec.sections import DataConfig, TrainConfig
from utune.spec.yamlpos import Loc
from utune.tuners.registry import get_kind

SPEC_VERSION = 1
_HINT = "fix the lines above; `utune spec schema` prints the schema"
_OVERRIDE_HINT = "write overrides as key.path=value, e.g. train.lr=1e-3, tuners.0.dim=16, trainable=[head]"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_STR_OR_LIST = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
# rule keys that are not the kind's options
_COMMON = ("name", "kind", "at", "placement", "tap", "share", "output", "input")


@dataclass(frozen=True)
class _Problem:
    loc: Loc
    message: str
    missing: bool = False  # the key at loc[-1] is absent: point at its parent's line
    line: int | None = None  # already known (duplicate YAML keys)


def _duplicate_names(names: list[Any]) -> list[_Problem]:
    first: dict[str, int] = {}
    problems = []
    for i, name in enumerate(names):
        if isinstance(name, str) and name in first:
            msg = f"duplicate rule name {name!r} (also used by tuners.{first[name]}); names must be unique"
            problems.append(_Problem(("tuners", i, "name"), msg))
        elif isinstance(name, str):
            first[name] = i
    return problems


# --- field types ---------------------------------------------------------------------------------


def _as_list(value: Any) -> Any:
    """A lone string is a one-item list: ``trainable: head`` means ``[head]``."""
    return [value] if isinstance(value, str) else value


def _check_globs(globs: list[str]) -> list[str]:
    for glob in globs:
        if any(not seg.strip() for seg in glob.split(".")):
            raise ValueError(f"bad glob {glob!r}: empty path segment")
    return globs


Globs = Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_check_globs), WithJsonSchema(_STR_OR_LIST)]


def _trainable_items(value: Any) -> Any:
    """Each item a glob or a ``{type: ..., path: ...}`` mapping, with one clear message per bad item."""
    items = _as_list(value)
    if not isinstance(items, list):
        return items  # the list type reports it
    out: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            try:
                item = TypeSelector.model_validate(item)
            except ValidationError as exc:
                why = "; ".join(_selector_problem(e) for e in exc.errors())
                raise ValueError(f"item {i} ({item}): {why}") from None
        elif not isinstance(item, str | TypeSelector):
            raise ValueError(f"item {i} is {item!r}: write a glob over parameter names or {{type: LayerNorm}}")
        out.append(item)
    return out


def _selector_problem(err: Any) -> str:
    key = ".".join(map(str, err["loc"])) or "type"
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r} (a type entry takes: type, path)"
    if err["type"] == "missing":
        return f"`{key}` is missing (e.g. {{type: LayerNorm}})"
    return f"{key}: {err['msg'][:1].lower()}{err['msg'][1:]}"


def _check_trainable(entries: list[str | TypeSelector]) -> list[str | TypeSelector]:
    _check_globs([e for e in entries if isinstance(e, str)])
    return entries


_TRAINABLE_ITEM = {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/TypeSelector"}]}
# globs over base parameter names, or {type: LayerNorm} mappings (utune.graph.trainable); the schema's items
# get their TypeSelector reference in spec_json_schema
Trainable = Annotated[
    list[str | TypeSelector],
    BeforeValidator(_trainable_items),
    AfterValidator(_check_trainable),
    WithJsonSchema(_STR_OR_LIST),
]
_LAYERS_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*$"},
        {"type": "array", "items": {"type": "integer", "minimum": 0}},
        {"type": "null"},
    ]
}


# --- sections ------------------------------------------------------------------------------------


class ModelConfig(Section):
    name: str | None = Field(
        default=None,
        min_length=1,
        description="timm name, 'torchvision:<name>', a factory 'package.module:function' (or a name a package "
        "publishes in the utune.models entry points); null: the model is given in Python (utune.build(spec, "
        "model=net))",
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str | None) -> str | None:
        from utune.models.names import TORCHVISION_PREFIX, unknown_model

        if name is None or (is_ref(name) and not name.startswith(TORCHVISION_PREFIX)):  # imported when built
            return name
        found = unknown_model(name)
        if found is not None:
            from utune._imports import entry_points
            from utune.models.names import MODELS_GROUP

            if name in entry_points(MODELS_GROUP):
                return name
            raise ValueError(f"{found[0]}; {found[1]} (or a factory: package.module:function)")
        return name

    pretrained: bool | str = Field(default=False, description="true, false, or a .safetensors/.pth path")
    num_classes: int | None = Field(
        default=None, gt=0, description="classes of the head; null: the dataset's class count (else the model's)"
    )
    img_size: int | None = Field(
        default=None, gt=0, description="input size: builds ViT/Swin/... at this size; null: the model's own"
    )
    # the names of the head's outputs, in order; filled in from the dataset when a run starts (class folder
    # names, CSV labels), and carried by the run, tuner files and exports, so predictions come with names
    class_names: list[str] | None = Field(
        default=None, description="names of the outputs, in order; null: taken from the dataset when training"
    )
    input_size: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None,
        min_length=3,
        max_length=3,
        description="[C, H, W] of one input, for models that do not say (a user's own module); null: "
        "model.img_size, else the model's own",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the model factory")
    frozen_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="bfloat16: the ops that need no gradient (a bypass's whole backbone) hold their frozen weights "
        "and run in bf16 (half the memory); the trainable part stays float32",
    )

    @model_validator(mode="after")
    def _one_name_per_class(self) -> ModelConfig:
        names, n = self.class_names, self.num_classes
        if names is not None and n is not None and len(names) != n:
            raise ValueError(f"class_names has {len(names)} names but num_classes is {n}")
        return self

    @model_validator(mode="after")
    def _one_size(self) -> ModelConfig:
        size = self.input_size
        if size is not None and self.img_size is not None and (size[1] != self.img_size or size[2] != self.img_size):
            raise ValueError(
                f"input_size {size} and img_size {self.img_size} disagree: set one of them "
                "(img_size: N means input_size: [3, N, N])"
            )
        return self

    @property
    def size(self) -> tuple[int, int, int] | None:
        """(C, H, W) when the spec says it (``input_size``); ``img_size`` alone leaves C to the model."""
        return (self.input_size[0], self.input_size[1], self.input_size[2]) if self.input_size else None

    @property
    def label(self) -> str:
        """The name, or ``(given in Python)`` for a model passed to ``utune.build(spec, model=...)``."""
        return self.name or "(given in Python)"


def _options_class(kind: str) -> type[Section]:
    return getattr(get_kind(kind), "Options", Section)


class TunerRule(Section):
    """One item of ``tuners:``; ``options`` holds the kind's own keys, written flat in the YAML."""

    name: str
    kind: str
    at: Selector
    placement: Literal["parallel", "sequential", "concat"] | None = None  # the kind says which it offers
    tap: Literal["input", "output", "parent.input", "parent.output"] | None = None
    share: Share | None = None  # tensors one for every selected site (utune.graph.share)
    output: int | None = Field(
        default=None,
        ge=0,
        description="sites returning several values: the one the tuner joins (and reads with tap: output), "
        "by its position in what the module's forward returns, from 0",
    )
    input: int | None = Field(
        default=None,
        ge=0,
        description="sites taking several tensors: the one the tuner reads with tap: input, by its position among "
        "the forward's arguments, from 0; null: the same position as `output`, or the one input",
    )
    options: SkipJsonSchema[SerializeAsAny[Section] | None] = None

    @field_validator("name")
    @classmethod
    def _identifier(cls, name: str) -> str:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"bad rule name {name!r}: use letters, digits, '_' and '-', not starting with a digit")
        return name

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        """A built-in or published kind, or ``package.module:Class`` from the user's code (imported here, so a
        missing module, an untrusted name or a class that is no kind is reported at the rule's line)."""
        try:
            get_kind(kind)
        except UserInputError as exc:
            raise ValueError(f"{exc.message}; {exc.hint}" if exc.hint else exc.message) from None
        return kind

    @model_validator(mode="after")
    def _options_of_kind(self) -> TunerRule:
        """Fill the kind's defaults when built in code without options; reject another kind's options."""
        options_cls = _options_class(self.kind)
        if self.options is None:
            self.__dict__["options"] = options_cls()
        elif not isinstance(self.options, options_cls):
            got = type(self.options).__qualname__
            raise ValueError(f"options of kind {self.kind!r} must be {options_cls.__qualname__}, not {got}")
        return self

    @field_validator("placement")
    @classmethod
    def _offered(cls, placement: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        offered = getattr(get_kind(kind), "placements", None) if isinstance(kind, str) else None
        if placement is not None and offered is not None and placement not in offered:
            raise ValueError(f"kind {kind!r} has no placement {placement!r}; it offers: {', '.join(offered)}")
        return placement

    @field_validator("tap")
    @classmethod
    def _accepted(cls, tap: str | None, info: ValidationInfo) -> str | None:
        """A kind reads only the taps it declares (``lora`` reads its layer's input, ``ssf`` its output)."""
        kind = info.data.get("kind")
        if tap is None or not isinstance(kind, str) or "placement" not in info.data:
            return tap
        cls_ = get_kind(kind)
        declared = getattr(cls_, "taps", None)
        if declared is None:  # a kind that declares no taps reads any
            return tap
        placement = info.data.get("placement") or getattr(cls_, "default_placement", None)
        allowed = declared.get(placement, ())
        if tap not in allowed:
            where = f"kind {kind!r}" + (f" ({placement})" if len(cls_.placements) > 1 else "")
            if not allowed:
                raise ValueError(f"{where} takes no tap (it reads what its placement says); remove `tap: {tap}`")
            raise ValueError(f"{where} does not read tap {tap!r}; it reads: {', '.join(allowed)}")
        return tap


class ExportConfig(Section):
    merge: bool = False
    format: Literal["safetensors", "peft"] = "safetensors"
    tuners_only: bool = False


class Spec(Section):
    """A loaded spec. ``source_text``/``source``/``overrides`` record where it came from."""

    version: Literal[1]
    model: ModelConfig = Field(default_factory=ModelConfig)
    tuners: list[TunerRule] = Field(default_factory=list)
    trainable: Trainable = Field(
        default_factory=list, description="globs over base parameter names, or {type: LayerNorm} (modules by class)"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    _source: str = PrivateAttr(default="<spec>")
    _source_path: Path | None = PrivateAttr(default=None)
    _source_text: str | None = PrivateAttr(default=None)
    _overrides: tuple[str, ...] = PrivateAttr(default=())
    _trusted: bool = PrivateAttr(default=True)  # the user gave it (else read from a data file: utune._imports)

    @model_validator(mode="after")
    def _one_image_size(self) -> Spec:
        """``data.img_size`` alone sizes the model too (the data and the model must agree)."""
        if self.model.img_size is None and self.data.img_size is not None:
            self.model.__dict__["img_size"] = self.data.img_size
        return self

    @field_validator("tuners")
    @classmethod
    def _unique_names(cls, rules: list[TunerRule], info: ValidationInfo) -> list[TunerRule]:
        if not (info.context or {}).get("names_checked"):  # the loader checks the raw YAML, with lines
            for problem in _duplicate_names([rule.name for rule in rules]):
                raise ValueError(problem.message)
        return rules

    @property
    def source(self) -> str:
        """The file the spec was read from, or ``<dict>``/``<spec>``."""
        return self._source

    @property
    def source_path(self) -> Path | None:
        return self._source_path

    @property
    def source_text(self) -> str | None:
        """The file's text as written (before overrides); ``None`` when not loaded from text."""
        return self._source_text

    @property
    def overrides(self) -> tuple[str, ...]:
        return self._overrides

    @property
    def trusted(self) -> bool:
        """Whether the user gave this spec (a file, dict or text they passed), so that the code it names
        (``package.module:attr``) may be imported; False for a spec read from a data file."""
        return self._trusted

    def __eq__(self, other: object) -> bool:
        """Equal when the resolved settings are; where the spec came from does not matter."""
        if not isinstance(other, Spec):
            return NotImplemented
        return self.__dict__ == other.__dict__

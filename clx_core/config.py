"""Typed, validated experiment configuration.

Every notebook's parameters pass through one frozen dataclass derived from :class:`Config`.
It rejects unknown keys and bad values with one error that names the parameter, the value and
what is allowed, and its hash keys the result cache (see :mod:`clx_core.results`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

PROFILES = ("smoke", "quick", "paper")

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A parameter value that is not allowed; the message names parameter, value and range."""


def fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"parameter {name!r} = {value!r} is not allowed: {allowed}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(name, value, "choose one of " + ", ".join(repr(c) for c in choices))


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(name, value, "must be an integer")
    if low is not None and value < low:
        fail(name, value, f"must be >= {low}")
    if high is not None and value > high:
        fail(name, value, f"must be <= {high}")


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Reject non-numbers, NaN/inf and values outside [low, high] (or open ends)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(name, value, "must be a finite number")
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    span = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if low is not None and (value < low or (low_open and value == low)):
        fail(name, value, f"must lie in {span}")
    if high is not None and (value > high or (high_open and value == high)):
        fail(name, value, f"must lie in {span}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(name, value, "must be True or False")


def env_offline() -> bool:
    """Offline mode from the environment: ``CLX_OFFLINE=1`` (or true/yes)."""
    return os.environ.get("CLX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every experiment configuration.

    Subclasses declare fields with commented defaults (the ``paper`` protocol unless said
    otherwise), put smaller settings in ``PROFILES`` and validate in :meth:`validate`.
    """

    #: per-profile overrides of the defaults, e.g. ``{"smoke": {"seeds": 2}}``
    PROFILE_OVERRIDES: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    profile: str = "quick"

    def __post_init__(self) -> None:
        check_choice("profile", self.profile, PROFILES)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on any bad value (override in subclasses)."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def for_profile(cls: type[C], profile: str = "quick", **overrides: Any) -> C:
        """The configuration of ``profile`` with explicit overrides.

        ``None`` overrides mean "profile default", so a notebook's parameters cell can leave
        any value at ``None``. Unknown keys are rejected.
        """
        check_choice("profile", profile, PROFILES)
        known = set(cls.field_names())
        unknown = sorted(set(overrides) - known)
        if unknown:
            fail(unknown[0], overrides[unknown[0]], "unknown parameter; known: " + ", ".join(sorted(known)))
        values: dict[str, Any] = dict(cls.PROFILE_OVERRIDES.get(profile, {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["profile"] = profile
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            fail(unknown[0], changes[unknown[0]], "unknown parameter")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    """JSON-friendly copy: tuples become lists, nested configs become dicts."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value

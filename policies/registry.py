"""The policy registry: config ``type`` -> factory(parameters) -> :class:`Policy`.

No import-time side effects: a :class:`Registry` starts empty and :func:`register_builtins`
fills it. The gateway builds its policy from ``scheduler.policy``::

    policy = build_policy(settings.scheduler.policy.model_dump())

Unknown keys, types and parameters are :class:`PolicyConfigError`\\ s naming the key, e.g.
``scheduler.policy.parameters.agin_s: unknown parameter of policy 'priority'; known: [...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from typing import TYPE_CHECKING, Any, TypeVar

from policies.base import Policy

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Factory = Callable[[Mapping[str, Any]], Policy]
P = TypeVar("P", bound="DataclassInstance")
_PREFIX = "scheduler.policy"


class PolicyConfigError(ValueError):
    """Invalid ``scheduler.policy``; the message names the offending key."""


class Registry:
    """Maps a policy ``type`` to its factory. Built once at start-up, read-only after."""

    __slots__ = ("_factories",)

    def __init__(self) -> None:
        self._factories: dict[str, Factory] = {}

    def register(self, type_: str, factory: Factory) -> None:
        if type_ in self._factories:
            raise ValueError(f"policy type {type_!r} is already registered")
        self._factories[type_] = factory

    def types(self) -> tuple[str, ...]:
        return tuple(sorted(self._factories))

    def build(self, config: Mapping[str, Any]) -> Policy:
        """Build from a ``{type, parameters}`` mapping (``PolicyConfig.model_dump()``)."""
        for k in config:
            if k not in ("type", "parameters"):
                raise PolicyConfigError(
                    f"{_PREFIX}.{k}: unknown key; known: ['parameters', 'type']"
                )
        type_ = config.get("type", "fcfs")
        factory = self._factories.get(type_) if isinstance(type_, str) else None
        if factory is None:
            raise PolicyConfigError(
                f"{_PREFIX}.type: unknown policy {type_!r}; known: {list(self.types())}"
            )
        parameters = config.get("parameters") or {}
        if not isinstance(parameters, Mapping):
            raise PolicyConfigError(f"{_PREFIX}.parameters: must be a mapping")
        return factory(parameters)


def register_builtins(registry: Registry | None = None) -> Registry:
    """Register fcfs, priority, fair and driftsched; returns the (new) registry."""
    from policies import driftsched, fair, fcfs, priority

    registry = Registry() if registry is None else registry
    for module in (fcfs, priority, fair, driftsched):
        registry.register(module.TYPE, module.build)
    return registry


def build_policy(config: Mapping[str, Any], registry: Registry | None = None) -> Policy:
    """Build the configured policy with ``registry`` (default: a fresh one with built-ins)."""
    return (registry or register_builtins()).build(config)


def parse_parameters(
    type_: str, parameters: Mapping[str, Any], cls: type[P], prefix: str = ""
) -> P:
    """Validate ``parameters`` against the frozen dataclass ``cls`` (every field has a
    default, whose type is the expected one; ints are accepted for floats). The dataclass's
    ``__post_init__`` raises ``ValueError("<field>: <why>")`` for bad values."""
    where = f"{_PREFIX}.parameters.{prefix}"
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for name, value in parameters.items():
        f = known.get(name)
        if f is None:
            raise PolicyConfigError(
                f"{where}{name}: unknown parameter of policy {type_!r}; known: {sorted(known)}"
            )
        default = f.default if f.default is not MISSING else None
        values[name] = _coerce(f"{where}{name}", value, default)
    try:
        return cls(**values)
    except ValueError as e:
        raise PolicyConfigError(f"{where}{e}") from None


def _coerce(where: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool) or default is None:
        if isinstance(default, bool) and not isinstance(value, bool):
            raise PolicyConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int | float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(default, int) and not isinstance(value, int):
            raise PolicyConfigError(f"{where}: expected an integer, got {value!r}")
        return float(value) if isinstance(default, float) else value
    if isinstance(default, str) and not isinstance(value, str):
        raise PolicyConfigError(f"{where}: expected a string, got {value!r}")
    return value


def check(name: str, value: float, lo: float = 0.0, *, strict: bool = True) -> None:
    """For ``__post_init__``: ``value`` must be finite and above ``lo`` (``>=`` if not strict)."""
    ok = math.isfinite(value) and (value > lo if strict else value >= lo)
    if not ok:
        raise ValueError(f"{name}: must be a finite number {'>' if strict else '>='} {lo}")

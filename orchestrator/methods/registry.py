"""Registries: one per method family (SFT objectives, rewards, KL estimators, advantage scalings, loss
aggregations, lr schedules), so that every method is a name a config can hold and a grid can sweep.

An entry is any object (a function or a class) registered under a name, with an optional config section:
a pydantic model whose fields are the method's parameters. The config takes its allowed names, and the
parameter fields of its stage sections, from the registries, so a method added here is configurable and
documented without touching the config. Registering a name twice is an error: a silently replaced method
would change what a result means."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class MethodParams(BaseModel):
    """Base of a method's parameter section. Like every config section (config.base.StrictSection) it refuses
    unknown fields and validates assignments; it lives here so that methods/ never imports the config
    package, which imports the registries."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    params: type | None  # a pydantic model: the method's parameters as a documented config section
    source: str  # where the method comes from (a paper, a framework), shown in the docs


class Registry(Generic[T]):
    """Named implementations of one method family, in registration order."""

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, params: type | None = None, source: str = "") -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name", params=Section, source="paper")` above a function or class."""

        def add(value: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._entries[name] = Entry(name, value, params, source)
            return value

        return add

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise ValueError(f"unknown {self.family} {name!r}; allowed: {', '.join(self._entries)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.entry(name).value

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(list(self._entries.values()))

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def param_sections(self) -> tuple[type, ...]:
        """Every entry's parameter section, each once. Two sections may not declare the same field: a
        stage config holds them side by side."""
        sections: list[type] = []
        owner: dict[str, str] = {}
        for entry in self._entries.values():
            if entry.params is None or entry.params in sections:
                continue
            for field in entry.params.model_fields:
                if field in owner:
                    raise ValueError(
                        f"{self.family} {entry.name!r} and {owner[field]!r} both declare the parameter {field!r}"
                    )
                owner[field] = entry.name
            sections.append(entry.params)
        return tuple(sections)

    def params_of(self, name: str, settings: Any) -> Any:
        """The parameter section of `name`, filled from `settings` (a stage config holding its fields; None
        takes the section's defaults); None for a method without parameters."""
        section = self.entry(name).params
        if section is None:
            return None
        if settings is None:
            return section()
        return section(**{field: getattr(settings, field) for field in section.model_fields})

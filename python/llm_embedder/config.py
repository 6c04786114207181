"""One way to build, read and check every configuration: ``TrainConfig``, ``LabelConfig``,
``EvalConfig`` all derive from :class:`Config`.

A config is a dataclass. It is built from keyword arguments, a plain dict (``from_dict``) or a
YAML/JSON file (``load``), and validated field by field against its type hints, so a YAML value
of the wrong type (``lr: 1e-4`` is a *string* in YAML 1.1, ``batch_size: "32"``,
``self_paced: "nope"``, ``max_steps: 1.5``) is an error naming the key, never a crash later.

Example:
    >>> from llm_embedder.train import TrainConfig
    >>> TrainConfig.load("train.yaml")            # or .load({"tasks": {...}, "lr": 1e-4})
    >>> TrainConfig.from_dict({"batch_size": "32"})
    Traceback (most recent call last):
    ConfigError: config key 'batch_size': expected an integer, got the string '32'
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Dict, Mapping, Type, TypeVar, Union

PathLike = Union[str, "os.PathLike[str]"]
C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; names the key."""


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint (the subset of typing our configs use)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict, Dict):
        return isinstance(value, Mapping)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _expected(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Union:
        parts = [_expected(a) for a in typing.get_args(hint) if a is not type(None)]
        text = " or ".join(parts)
        return text + (" or null" if type(None) in typing.get_args(hint) else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict, Dict):
        return "a mapping"
    if origin in (list, tuple, typing.Sequence):
        return "a list"
    return getattr(hint, "__name__", str(hint))


class Config:
    """Base class of the dataclass configs: construction, file reading and type validation.

    Subclasses are ``@dataclass``es and may add checks of value ranges in :meth:`check`.
    """

    @classmethod
    def _hints(cls) -> Dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls: Type[C], values: Mapping[str, Any]) -> C:
        """Build from a plain mapping (e.g. parsed YAML); unknown keys and wrong types are
        :class:`ConfigError`\\ s naming the key. Does not run the range checks (see
        :meth:`load`)."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config must be a mapping of keys to values, got "
                              f"{type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(names)}")
        cls._check_types(values)
        return cls(**dict(values))

    @classmethod
    def _check_types(cls, values: Mapping[str, Any]) -> None:
        hints = cls._hints()
        for key, value in values.items():
            hint = hints.get(key, Any)
            if not _matches(value, hint):
                hint_text = _expected(hint)
                extra = ""
                if isinstance(value, str) and "number" in hint_text:
                    extra = (" (YAML reads a number like 1e-4 without a dot as a string: "
                             "write 1.0e-4)")
                raise ConfigError(f"config key {key!r}: expected {hint_text}, got "
                                  f"{_describe(value)}{extra}")

    @classmethod
    def load(cls: Type[C], source: Union[C, Mapping[str, Any], PathLike]) -> C:
        """A validated config from an instance (copied), a mapping, or a YAML/JSON file.

        Example:
            >>> config = TrainConfig.load("train.yaml")
        """
        if isinstance(source, cls):
            config = dataclasses.replace(source)  # type: ignore[type-var]
        elif isinstance(source, Mapping):
            config = cls.from_dict(source)
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            try:
                config = cls.from_dict(read_config_file(path))
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        else:
            raise ConfigError(f"expected a {cls.__name__}, a mapping or a config file path, got "
                              f"{type(source).__name__}")
        config.validate()
        return config

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def validate(self) -> None:
        """Check every field's type, then the subclass's value checks; raise ConfigError."""
        type(self)._check_types(self.to_dict_shallow())
        self.check()

    def to_dict_shallow(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore

    def check(self) -> None:
        """Value checks of a subclass (ranges, choices); raise :class:`ConfigError`."""


def read_config_file(path: PathLike) -> Dict[str, Any]:
    """The mapping in a ``.json`` or YAML config file; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise different types; both mean "malformed"
        raise ConfigError(f"{path}: cannot parse the config ({exc})") from None
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return dict(values)


def check(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``condition`` holds (for :meth:`Config.check`)."""
    if not condition:
        raise ConfigError(f"config key {key!r}: {message}")


__all__ = ["Config", "ConfigError", "check", "read_config_file"]

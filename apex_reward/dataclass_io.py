"""One mechanism for every typed config: dataclass <-> dict/JSON/YAML, and dataclass -> CLI flags.

Every config in apex-reward (the model's ``config.json``, the extraction, training and serving jobs)
is a dataclass whose fields carry ``metadata={"help": ...}``. This module

* converts such a dataclass to plain JSON-able data (:func:`to_dict`) and back with strict
  validation (:func:`from_dict`: unknown fields, wrong types and bad choices raise
  :class:`~apex_reward.errors.ConfigError` naming the field path and the value);
* generates ``argparse`` flags from the fields (:func:`add_dataclass_arguments`) and builds the
  dataclass from parsed flags layered over an optional ``--config file.yaml|json``
  (:func:`dataclass_from_args`): defaults < config file < explicit flags.

A field whose type is a dataclass and whose metadata says ``"flatten": True`` (job configs embed
:class:`~apex_reward.loading.ModelOptions` this way) contributes its own fields as top-level
flags, and a config file may give them flat (``device: cpu``) or nested (``model: {device: cpu}``);
a plain string stands for the inner field of the same name (``model: path/to/ckpt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

T = TypeVar("T")

__all__ = [
    "to_dict",
    "finite_or_none",
    "from_dict",
    "load_config_file",
    "add_dataclass_arguments",
    "dataclass_from_args",
]


def to_dict(obj: Any) -> Any:
    """Convert a (nested) dataclass to JSON-able data: tuples become lists, paths strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (valid JSON: ``null``).

    Recurses into dicts, lists and tuples (tuples become lists); numpy scalars become Python
    numbers.
    """
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert JSON forms (list -> tuple, ...)."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value))
            )
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: cannot interpret {value!r} as {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], *, where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``, strictly.

    Unknown keys, values of the wrong type and values outside a ``Literal`` raise
    :class:`ConfigError` naming the field path (``encoder.layers[2]``). Missing keys take the
    field default. The dataclass's own ``__post_init__`` runs afterwards (for cross-field checks).
    """
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = _gather_flattened(cls, data, hints, where)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def flattened_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """The fields of dataclass ``cls`` marked ``flatten``, with their dataclass types."""
    hints = get_type_hints(cls)
    return [
        (f, hints[f.name])
        for f in dataclasses.fields(cls)
        if f.init and f.metadata.get("flatten") and dataclasses.is_dataclass(hints[f.name])
    ]


def _gather_flattened(
    cls: type, data: dict[str, Any], hints: dict[str, Any], where: str
) -> dict[str, Any]:
    """Move the flat keys of ``cls``'s flattened fields into their nested objects."""
    flat = flattened_fields(cls)
    if not flat:
        return data
    data = dict(data)
    outer = {f.name for f in dataclasses.fields(cls)}
    for f, inner_cls in flat:
        inner_names = {g.name for g in dataclasses.fields(inner_cls) if g.init}
        value = data.get(f.name)
        if isinstance(value, inner_cls):
            value = to_dict(value)
        if value is None:
            nested: dict[str, Any] = {}
        elif isinstance(value, str) and f.name in inner_names:
            nested = {f.name: value}
        elif isinstance(value, dict):
            nested = dict(value)
        else:
            raise ConfigError(
                f"{where}.{f.name}: expected an object for {inner_cls.__name__}, got {value!r}"
            )
        for name in inner_names - outer:
            if name in data:
                nested[name] = data.pop(name)
        data[f.name] = nested
    return data


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from e
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - pyyaml ships with the train extra
            raise ConfigError(
                f"{p}: YAML configs need pyyaml: pip install 'apex-reward[train]'"
            ) from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of field names to values")
    return data


# ----------------------------------------------------------------------------------------------
# argparse generation


def _scalar_parser(tp: Any):
    if tp is bool:
        return None
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return str
    return None


def _flag_spec(tp: Any) -> dict[str, Any] | None:
    """argparse keyword arguments for a field annotation, or None if it is not a flag."""
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _flag_spec(args[0])
        return {"type": json.loads, "metavar": "JSON"}
    origin = get_origin(tp)
    if origin is Literal:
        choices = list(get_args(tp))
        return {"choices": choices, "type": type(choices[0])}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin in (list, tuple) or tp in (list, tuple):
        args = get_args(tp)
        item = args[0] if args else str
        parser = _scalar_parser(item)
        if parser is None:
            return {"type": json.loads, "metavar": "JSON"}
        return {"nargs": "+", "type": parser}
    if origin is dict or tp is dict:
        return {"type": json.loads, "metavar": "JSON"}
    parser = _scalar_parser(tp)
    if parser is not None:
        return {"type": parser}
    if dataclasses.is_dataclass(tp):
        return None
    return {"type": json.loads, "metavar": "JSON"}


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    config_flag: bool = True,
) -> None:
    """Add one ``--field-name`` flag per field of dataclass ``cls`` to ``parser``.

    The help text comes from each field's ``metadata["help"]``. Flags default to "not given"
    (``argparse.SUPPRESS``) so that :func:`dataclass_from_args` can layer them over a config file.
    With ``config_flag``, also adds ``--config FILE`` (YAML or JSON).
    """
    hints = get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    if config_flag:
        group.add_argument(
            "--config",
            dest="_config_file",
            metavar="FILE",
            default=None,
            help="YAML or JSON file with any of these options (flags given here override it)",
        )
    flat = {f.name: inner for f, inner in flattened_fields(cls)}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude or f.name.startswith("_"):
            continue
        if f.name in flat:
            inner_hints = get_type_hints(flat[f.name])
            for g in dataclasses.fields(flat[f.name]):
                if g.init and g.name not in exclude:
                    _add_flag(group, g, inner_hints[g.name], dest=f"{f.name}.{g.name}")
            continue
        _add_flag(group, f, hints[f.name], dest=f.name)


def _add_flag(group: Any, f: dataclasses.Field, tp: Any, dest: str) -> None:
    spec = _flag_spec(tp)
    if spec is None:
        return
    default = f.default
    if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    help_text = f.metadata.get("help", "")
    if default is not dataclasses.MISSING and "(default" not in help_text:
        shown = to_dict(default)
        if shown is None:
            if "(required" not in help_text:  # a required option has no default to show
                help_text = f"{help_text} (default: unset)"
        elif shown != "":  # an empty default is a required option's placeholder
            text = json.dumps(shown) if not isinstance(shown, str) else shown
            help_text = f"{help_text} (default: {text})"
    if "action" not in spec and "choices" not in spec:
        # a flattened field's dest is "outer.inner": name the value after the flag, not the path
        spec = {**spec, "metavar": f.metadata.get("metavar", spec.get("metavar", f.name.upper()))}
    flag = "--" + f.name.replace("_", "-")
    group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help_text, **spec)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from flags parsed by a parser set up with :func:`add_dataclass_arguments`.

    Precedence: field defaults < ``--config`` file < explicit flags < ``overrides``.
    """
    data: dict[str, Any] = {}
    config_file = getattr(args, "_config_file", None)
    if config_file:
        data.update(load_config_file(config_file))
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    flat = {f.name for f, _ in flattened_fields(cls)}
    data = _gather_flattened(cls, data, get_type_hints(cls), str(config_file or cls.__name__))
    for name in names:
        if name in flat:
            prefix = f"{name}."
            given = {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}
            data[name] = {**data.get(name, {}), **given}
        elif name in vars(args):
            data[name] = getattr(args, name)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data, where=cls.__name__ if not config_file else str(config_file))

"""Config dataclasses <-> YAML <-> CLI flags.

Every trainer's config is a dataclass whose fields carry `metadata={"help": ...}`. Precedence: the dataclass
defaults, then the YAML file (`--config x.yaml`), then explicit flags. Flags are the field names with `_` -> `-`
(`learning_rate` -> `--learning-rate`), the same names as the Python API. Validation uses pydantic, so a wrong
type names the field: `config.yaml: field 'learning_rate': expected a number, got 'fast'`.

Renamed fields (`@renamed_fields({"old": "new"})` on a config class) keep working under their old names for one
release, as a Python keyword, a YAML key and a (hidden) CLI flag, each time with a FutureWarning naming the new one.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click
import pydantic
import yaml

from alignloop.errors import ConfigError


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


REMOVED_IN = "0.3"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def apply_renames(cls, values: dict[str, Any], source: str, stacklevel: int = 3) -> dict[str, Any]:
    """Map the old names of renamed fields to their new ones, warning once per name (FutureWarning)."""
    renamed = getattr(cls, "renamed_fields", {})
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in renamed:
            new = renamed[key]
            warnings.warn(f"{source}: '{key}' ({_flag(key)}) is deprecated and will be removed in alignloop "
                          f"{REMOVED_IN}: use '{new}' ({_flag(new)})", FutureWarning, stacklevel=stacklevel)
            if new in values:
                raise ConfigError(f"{source}: give '{new}' or its deprecated name '{key}', not both")
            key = new
        out[key] = value
    return out


def renamed_fields(mapping: dict[str, str]):
    """Class decorator for a config dataclass: `{old name: new name}` of fields renamed in this release."""

    def decorator(cls):
        cls.renamed_fields = dict(mapping)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **apply_renames(cls, kwargs, cls.__name__))

        cls.__init__ = __init__
        return cls

    return decorator


def _on_off(tp) -> bool:
    """A Literal with "on" and "off" among its values (e.g. packing: auto / on / off)."""
    return get_origin(tp) is Literal and {"on", "off"} <= set(get_args(tp))


def on_off_from_bools(cfg) -> None:
    """In a config object: an on/off knob given a boolean (Python keyword of an older release) becomes "on"/"off"."""
    for name, tp in _field_types(type(cfg)).items():
        if _on_off(tp) and isinstance(getattr(cfg, name, None), bool):
            setattr(cfg, name, "on" if getattr(cfg, name) else "off")


def _validate(cls, values: dict[str, Any], source: str):
    values = apply_renames(cls, values, source, stacklevel=4)
    types_ = _field_types(cls)
    values = {k: ("on" if v else "off") if isinstance(v, bool) and k in types_ and _on_off(types_[k]) else v
              for k, v in values.items()}   # an on/off knob also takes true/false (YAML, older configs)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown field '{key}'{hint}. Valid fields: {', '.join(sorted(names))}")
    try:
        return pydantic.TypeAdapter(cls).validate_python(values)
    except pydantic.ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            msgs.append(f"field '{loc}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(msgs)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of field: value at the top level, got {type(data).__name__}")
    return data


def load_config(cls, yaml_path: str | Path | None = None, **overrides):
    """Build `cls` from its defaults, then a YAML file, then keyword overrides (None means "not given")."""
    source = str(yaml_path) if yaml_path is not None else "config"
    # renamed fields are mapped in each source apart, so that a flag overrides an older file's old spelling
    values = apply_renames(cls, read_yaml(yaml_path), source) if yaml_path is not None else {}
    values.update(apply_renames(cls, {k: v for k, v in overrides.items() if v is not None}, "command line"))
    return _validate(cls, values, source)


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _unwrap_optional(tp):
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _one_or_many(tp) -> bool:
    """`str | list[str]`: one value or several (a repeatable flag; YAML takes a string or a list)."""
    return get_origin(tp) in (typing.Union, types.UnionType) and any(get_origin(a) is list for a in get_args(tp))


def click_options_from_dataclass(cls):
    """A decorator adding one `--field-name` option per dataclass field (default None = "not given", so YAML
    values are not overridden by flag defaults). Help text: the field's help plus its default."""
    types_ = _field_types(cls)

    def decorator(fn):
        # the config's own fields first in --help, then the ones it inherits
        own = set(inspect.get_annotations(cls))
        ordered = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)
        for f in reversed(ordered):
            tp = _unwrap_optional(types_[f.name])
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore
            help_text = f"{help_of(f)}  [default: {default!r}]"
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"default": None, "help": help_text, "show_default": False}
            origin = get_origin(tp)
            if tp is bool:
                fn = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, **kwargs)(fn)
                continue
            if origin is Literal:
                kwargs["type"] = click.Choice([str(a) for a in get_args(tp)])
                if _on_off(tp):   # a bare --flag means on
                    kwargs.update(is_flag=False, flag_value="on")
            elif origin in (list, tuple) or _one_or_many(tp):
                inner = get_args(tp)[0] if get_args(tp) and origin in (list, tuple) else str
                kwargs.update(type=inner if inner in (int, float, str) else str, multiple=True)
                kwargs["help"] += " (repeat the flag for several values)"
            elif tp in (int, float, str):
                kwargs["type"] = tp
            else:
                kwargs["type"] = str
            fn = click.option(flag, f.name, **kwargs)(fn)
        for old, new in getattr(cls, "renamed_fields", {}).items():  # deprecated spellings, hidden from --help
            tp = _unwrap_optional(types_[new])
            if tp is bool:
                fn = click.option(f"{_flag(old)}/--no-{old.replace('_', '-')}", old, default=None, hidden=True)(fn)
            else:
                many = get_origin(tp) in (list, tuple)
                fn = click.option(_flag(old), old, default=None, hidden=True, multiple=many,
                                  type=tp if tp in (int, float, str) else str)(fn)
        return fn

    return decorator


def config_from_cli(cls, config_path: str | None, flag_values: dict[str, Any]):
    """Merge `--config` and the flags given on the command line (multiple-value flags: empty tuple = not given)."""
    overrides = {}
    for k, v in flag_values.items():
        if v is None or (isinstance(v, tuple) and len(v) == 0):
            continue
        overrides[k] = list(v) if isinstance(v, tuple) else v
    return load_config(cls, config_path, **overrides)


def make_config_command(name: str, cls, run, help: str):
    """A click command: `--config x.yaml` plus every field of `cls` as a flag; calls `run(config)`."""

    @click.command(name=name, help=help, context_settings={"max_content_width": 120})
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="YAML file of config fields; flags given on the command line override it.")
    @click_options_from_dataclass(cls)
    def command(config_path, **flags):
        cfg = config_from_cli(cls, config_path, flags)
        run(cfg)

    return command

"""Build argparse options from a pydantic config, so the CLI, the YAML and the docs share one
signature: every field is an option, its description is the help text, nested groups get a
prefix (`render.modes` -> `--render-modes`)."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from tkllm_ray.config.base import ConfigModel


class Parser(argparse.ArgumentParser):
    """A wrong option is one line, not a usage dump or a traceback."""

    def error(self, message: str) -> typing.NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "",
                      skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(prefix.rstrip("-") or None) if prefix else parser
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        tp, _ = _unwrap(field.annotation)
        flag = "--" + (prefix + name).replace("_", "-")
        dest = (prefix + name).replace("-", "_")
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            add_model_options(parser, tp, prefix=f"{prefix}{name}-")
            continue
        default = field.get_default(call_default_factory=True) if not field.is_required() else None
        help_text = (field.description or "") + ("" if field.is_required() else f" (default: {default})")
        kwargs: dict = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            kwargs.update(nargs="+", **_scalar(item))
        elif typing.get_origin(tp) is dict:
            continue  # mappings are YAML-only
        else:
            kwargs.update(_scalar(tp))
        group.add_argument(flag, **kwargs)


def _scalar(tp: Any) -> dict:
    if typing.get_origin(tp) is Literal:
        choices = list(typing.get_args(tp))
        return {"choices": choices, "type": type(choices[0])}
    if tp in (int, float):
        return {"type": tp, "metavar": tp.__name__.upper()}
    return {"type": str, "metavar": "VALUE"}


def overrides_from_args(args: argparse.Namespace, model: type[ConfigModel], prefix: str = "") -> dict:
    """Nested dict of the options the user actually gave (unset options stay out)."""
    out: dict = {}
    given = vars(args)
    for name, field in model.model_fields.items():
        tp, _ = _unwrap(field.annotation)
        dest = (prefix + name).replace("-", "_")
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            sub = overrides_from_args(args, tp, prefix=f"{prefix}{name}_")
            if sub:
                out[name] = sub
        elif dest in given:
            out[name] = given[dest]
    return out

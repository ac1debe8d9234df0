"""Typed, validated config fields: the checks every config section runs in ``__post_init__``.

Every check raises ``ConfigError`` naming ``section.field`` and what is accepted, so a typo in a
config file or on the command line fails before anything is traced by JAX. Every field is
type-checked on construction (``check_field_types``): bools are bools, integers are integers,
floats are finite. ``parse_field_value`` turns a ``--set`` text into a value of the field's
declared type (``model.use_ffn=false`` is the bool ``False``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import typing
from typing import Any

from tinyonn_jax.errors import ConfigError

# Rotary positions (nn.positions): none, the index in the packed sequence, or grid coordinates.
ROPE_MODES = ("none", "rope1d", "rope2d")
# Model compute (activation) dtypes; "auto" = bfloat16 on gpu/tpu, float32 on cpu
# (tinyonn_jax.backend.compute_dtype). Parameters and routing decisions stay float32.
DTYPES = ("auto", "float32", "bfloat16")

def check(cond: bool, section: str, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"config {section}.{name}={value!r}: {why}")


BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
              "false": False, "0": False, "no": False, "off": False}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_error(section: str, name: str, value: Any, typ: Any) -> ConfigError | None:
    """Why ``value`` is not of the declared type ``typ`` (None when it is)."""
    if typ is Any:
        return None
    if typ is bool:
        ok, what = isinstance(value, bool), "a bool (true/false)"
    elif typ is int:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif typ is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        what = "a finite number"
    elif typ is str:
        ok, what = isinstance(value, str), "a string"
    elif typing.get_origin(typ) is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, tuple):
            return ConfigError(f"config {section}.{name}={value!r}: must be a tuple")
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        for i, v in enumerate(value):
            sub = inner if inner is not None else (args[i] if i < len(args) else Any)
            err = _type_error(section, f"{name}[{i}]", v, sub)
            if err is not None:
                return err
        return None
    else:  # nested dataclasses and other declared types: checked by their own classes
        return None
    return None if ok else ConfigError(f"config {section}.{name}={value!r}: must be {what}")


def check_field_types(section: str, obj: Any) -> None:
    """Raise ``ConfigError`` naming the first field whose value does not have its declared type.

    bool fields take only bools, int fields only integers (not bools), float fields any finite
    int or float (never inf or NaN), str fields strings, tuple fields tuples of their element type.
    """
    types = field_types(type(obj))
    for f in dataclasses.fields(obj):
        err = _type_error(section, f.name, getattr(obj, f.name), types[f.name])
        if err is not None:
            raise err


def parse_field_value(path: str, typ: Any, text: str) -> Any:
    """Parse the ``--set`` text of the field ``path`` by its declared type ``typ``.

    bool: true/false, 1/0, yes/no, on/off in any case; int: an integer literal; float: a finite
    number; str: the text (surrounding quotes removed); tuple: a Python literal (``(1, 0.5)``,
    ``1,0.5``, ``()``, a dict for keyword tuples); anything else: a Python literal, else the text.
    """
    text = text.strip()

    def bad(accepted: str) -> ConfigError:
        return ConfigError(f"config {path}={text!r}: expected {accepted}")

    if typ is bool:
        word = text.lower()
        if word not in BOOL_WORDS:
            raise bad("a bool: true/false, 1/0, yes/no or on/off (any case)")
        return BOOL_WORDS[word]
    if typ is int:
        try:
            return int(text.replace("_", ""), 10)
        except ValueError:
            raise bad("an integer, e.g. 3") from None
    if typ is float:
        try:
            value = float(text)
        except ValueError:
            raise bad("a number, e.g. 3e-4") from None
        if not math.isfinite(value):
            raise bad("a finite number (not inf or nan)")
        return value
    if typ is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return text
    try:
        value = ast.literal_eval(text) if text else ()
    except (ValueError, SyntaxError):
        if typing.get_origin(typ) is tuple:
            raise bad("a tuple literal, e.g. (1.0, 0.5) or ()") from None
        return text
    if typing.get_origin(typ) is tuple:
        if isinstance(value, dict):
            return tuple(sorted(value.items()))
        if isinstance(value, list):
            return tuple(value)
        if not isinstance(value, tuple):
            return (value,)
    return value


def positive_int(section: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(isinstance(v, int) and not isinstance(v, bool) and v > 0, section, n, v,
               "must be a positive integer")


def non_negative(section: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, section, n, v,
               "must be a non-negative number")


def choice(section: str, obj: Any, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(obj, name)
    check(v in choices, section, name, v, f"must be one of {choices}")


def check_rope(section: str, obj: Any, width: int, what: str) -> None:
    """``obj.rope`` is a ``ROPE_MODES`` entry the rotated width ``width`` (named ``what``) fits,
    and ``obj.rope_base > 1``: 1D RoPE needs an even width, grid RoPE an even width of at least
    6 (a rotation pair for each of grid, row and column)."""
    choice(section, obj, "rope", ROPE_MODES)
    if obj.rope == "rope1d":
        check(width % 2 == 0, section, "rope", obj.rope,
              f"1D RoPE needs an even {what}, got {width}")
    if obj.rope == "rope2d":
        check(width % 2 == 0 and width >= 6, section, "rope", obj.rope,
              f"2D grid RoPE needs an even {what} of at least 6 (one rotation pair each for "
              f"grid, row and column), got {width}")
    check(obj.rope_base > 1.0, section, "rope_base", obj.rope_base, "must be > 1")

"""Command-line plumbing shared by every script: dataclass fields become flags, bad input one line.

Conventions:
- Library code raises `InputError("what is wrong, naming the file/flag")` for bad user input.
- Scripts wrap their `main` with `run_cli(main)`: an InputError prints `error: <message>` on stderr
  and exits with status 2; Ctrl-C exits with 130 after whatever cleanup the code did.
- A config dataclass documents each field with `field(metadata={"help": ...})`; `add_dataclass_args`
  turns the fields into `--name` flags whose help is that text.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sae.util.errors import InputError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) for a field annotation such as `int`, `float | None`, `list[int]`."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (list, Sequence, tuple) and args:
        return args[0], True
    if args and origin is not None and len(args) == 1:  # Optional[X]
        return _base_type(args[0])
    return tp, False


def add_dataclass_args(parser: argparse._ActionsContainer, cls: type, skip: Sequence[str] = ()) -> None:
    """Add one `--field` flag per dataclass field of `cls` (help from the field's metadata)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, is_list = _base_type(hints[f.name])
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        help_text = f.metadata.get("help", "")
        if default is not None:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp if tp in (int, float, str) else str
            if is_list:
                kwargs["nargs"] = "+"
        parser.add_argument(f"--{f.name}", **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build `cls` from the parsed flags that `add_dataclass_args` added (plus explicit overrides)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main(argv)` and exit: InputError -> 'error: ...' and status 2, as is a disk that is full or
    read-only (errors naming the file); Ctrl-C -> status 130."""
    try:
        code = main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
            raise
        print(
            f"error: {e.filename or 'a file'}: {e.strerror}; free some space (or choose a writable folder)",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(code or 0)

"""What the command lines (``elastic-train``, ``elastic-eval``) share: usage errors, option names,
tyro's reading of JSON-object options, and signal handling. Imports neither torch nor tyro at
module level, so a command line is checked before anything slow is imported."""
from __future__ import annotations

import json
import signal
import sys
from typing import NoReturn

__all__ = ["UsageError", "option_name", "usage_exit", "json_dict_registry", "terminate_as_interrupt"]


class UsageError(Exception):
    """A bad command line: ``option`` (e.g. ``--lr``) and what is wrong with it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


def option_name(field_name: str) -> str:
    """``"kd_temperature"`` -> ``"--kd-temperature"``."""
    return "--" + field_name.replace("_", "-")


def usage_exit(prog: str, err: UsageError) -> NoReturn:
    """Print ``err`` as a usage error and exit with status 2."""
    print(f"usage: {prog} [-h] [OPTIONS]\n{prog}: error: {err}\nFor full helptext, run {prog} --help",
          file=sys.stderr)
    raise SystemExit(2)


def json_dict_registry():
    """A tyro constructor registry that reads ``dict`` fields as one JSON-object argument."""
    import tyro

    registry = tyro.constructors.ConstructorRegistry()

    @registry.primitive_rule
    def _json_object(info):
        if info.type is not dict:
            return None

        def parse(args: list[str]) -> dict:
            try:
                value = json.loads(args[0])
            except json.JSONDecodeError as e:
                raise ValueError(f"expected a JSON object, got {args[0]!r} ({e})") from None
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object, got {args[0]!r}")
            return value

        return tyro.constructors.PrimitiveConstructorSpec(
            nargs=1, metavar="JSON", instance_from_str=parse, is_instance=lambda x: isinstance(x, dict),
            str_from_instance=lambda d: [json.dumps(d)])

    return registry


class terminate_as_interrupt:
    """``with terminate_as_interrupt():`` SIGTERM raises KeyboardInterrupt (like Ctrl-C) while
    inside, when SIGTERM is at its default; ``.signum`` tells which signal ended the block."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._installed = False

    def _handler(self, signum, frame) -> None:
        self.signum = signum
        raise KeyboardInterrupt

    def __enter__(self) -> "terminate_as_interrupt":
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, self._handler)
                self._installed = True
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

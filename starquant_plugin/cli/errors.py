"""Turning a user's mistake into one line that names the fix, and a bug into a traceback.

A user error is one the user can fix from the command line: a ``UserError`` the CLI raises
itself, a recipe that does not parse or validate (YAML, pydantic), or a ``ValueError`` /
``TypeError`` / ``FileNotFoundError`` / ``FileExistsError`` / ``NotADirectoryError`` /
``CalibrationError`` raised by starquant's own checks (the innermost frame of the traceback is
in ``starquant_plugin``). The same exception types raised deep inside torch or transformers are
bugs and keep their traceback; ``starquant --debug`` shows the traceback for everything.
"""

from __future__ import annotations

import argparse
import reprlib
import sys
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130

_CHECK_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError)


class UserError(Exception):
    """A problem with the command's input; the message says what was wrong and the fix."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog as written and shows each option's default (not None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "%(default)" not in text
                and action.default is not None and action.default is not False
                and action.default != argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def add_command(commands: argparse._SubParsersAction, name: str, help: str, doc: str,
                example: str) -> argparse.ArgumentParser:
    """A subcommand whose description is the first line of its module docstring ``doc`` and
    whose epilog is its ``example`` text, kept as written; options show their defaults."""
    return commands.add_parser(name, help=help, description=doc.splitlines()[0].replace("``", ""),
                               epilog=example, formatter_class=HelpFormatter)


def positive_int(text: str) -> int:
    """argparse type: a count of rows, tokens, draws or steps."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: epochs (0 = no fit)."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text!r}")
    return value


def _innermost_file(error: BaseException) -> Path | None:
    traceback = error.__traceback__
    if traceback is None:
        return None
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return Path(traceback.tb_frame.f_code.co_filename).resolve()


def _raised_by_starquant(error: BaseException) -> bool:
    path = _innermost_file(error)
    return path is not None and PACKAGE_DIR in path.parents


_QUOTE = reprlib.Repr()
"""How an error quotes what the user gave: a few dozen characters, not a 500 KB field."""
_QUOTE.maxstring = _QUOTE.maxother = 60
_QUOTE.maxlist = _QUOTE.maxdict = 6
_QUOTE.maxlevel = 3


def _validation_line(error: Exception) -> str:
    """pydantic's multi-line ValidationError as one line: each field, what it got, why."""
    parts = []
    for detail in error.errors():
        where = ".".join(str(part) for part in detail.get("loc", ())) or "recipe"
        got = f" (got {_QUOTE.repr(detail['input'])})" if "input" in detail and detail.get(
            "type") != "missing" else ""
        parts.append(f"{where}: {detail.get('msg', 'invalid')}{got}")
    return (f"{error.title} is invalid: {'; '.join(parts)}. Fix these fields (see "
            "docs/recipes.md for every knob).")


def user_error_message(error: BaseException) -> str | None:
    """The one-line message for a user error, or None for a bug (which keeps its traceback)."""
    from pydantic import ValidationError
    from yaml import YAMLError

    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, ValidationError):
        return _validation_line(error)
    if isinstance(error, YAMLError):
        return f"The recipe is not valid YAML: {' '.join(str(error).split())}."
    if isinstance(error, _CHECK_ERRORS) and _raised_by_starquant(error):
        return str(error)
    return None


def first_line_and_detail(message: str) -> tuple[str, str]:
    """The message's first line (what went wrong and the fix) and the rest (an example)."""
    first, _, rest = message.strip().partition("\n")
    return first, rest


def run_reporting_errors(command: str, function: Callable[[], None], debug: bool) -> int:
    """Run ``function``; a user error prints ``starquant <command>: error: <message>`` to
    stderr and returns 1 (130 for Ctrl-C); a bug propagates with its traceback."""
    try:
        function()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"starquant {command}: interrupted; nothing more was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001  sorted into user errors and bugs below
        message = None if debug else user_error_message(error)
        if message is None:
            raise
        first, detail = first_line_and_detail(message)
        print(f"starquant {command}: error: {first}", file=sys.stderr)
        if detail:
            print(detail, file=sys.stderr)
        return EXIT_USER_ERROR
    return 0

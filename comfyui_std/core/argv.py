"""Command lines: the one place where a signed special number reaches its option.

argparse takes a token that starts with ``-`` and is not a plain negative number for an option, so
``--gamma -inf`` ended in "expected one argument" instead of reaching the option's range check. :func:`attach_values`
joins such a token to the option before it (``--gamma=-inf``) when that option takes a value, so the value is
checked like any other: ``gamma: got -inf, allowed range is [0.0, 1.0]``.
"""

from __future__ import annotations

import argparse
import re
import sys

#: values argparse would mistake for options: signed infinities and NaNs, and exponent forms such as -1e-3
SIGNED_SPECIAL = re.compile(r"-(?:inf|infinity|nan|(?:\d+\.?\d*|\.\d+)e[-+]?\d+)\Z", re.I)


def attach_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with every ``--option -inf`` (an option of ``parser`` that takes a value, then a signed special
    number) written as ``--option=-inf``; everything else unchanged."""
    options = {opt: action.nargs != 0 for action in parser._actions for opt in action.option_strings}  # noqa: SLF001

    def takes_value(token: str) -> bool:
        if token in options:
            return options[token]
        matches = [o for o in options if o.startswith(token)] if parser.allow_abbrev and token.startswith("--") else []
        return len(matches) == 1 and options[matches[0]]  # an abbreviation argparse would accept

    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":  # the rest are positionals, as argparse reads them
            return out + list(argv[i:])
        if out and SIGNED_SPECIAL.match(arg) and takes_value(out[-1]):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` over :func:`attach_values` of ``argv`` (the process's arguments when None)."""
    return parser.parse_args(attach_values(parser, list(sys.argv[1:] if argv is None else argv)))

"""The parser every textenc command line uses: :class:`CommandParser` (help that shows
every default, one-line usage errors with exit status 2 from the sub-command's own parser,
"did you mean" for a mistyped option or choice) and its small helpers.

>>> parser = CommandParser(prog="demo")
>>> _ = parser.add_argument("--size", type=int, default=3, help="how big")
>>> "(default: 3)" in parser.format_help()
True
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Callable

__all__ = ["EXIT_USAGE", "CommandParser", "HelpFormatter", "did_you_mean", "one_line", "positive_int"]

EXIT_USAGE = 2


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(message).split())


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default and writes choices as typed, ``{a|b|c}``.

    A comma inside a choice (``cond,pooled``) stays readable because choices
    are separated by ``|``. An option whose help already says ``default`` is
    left alone; a flag (``store_true``) shows ``(default: off)``; an option
    whose default is None must say in its help what happens without it.
    """

    def _metavar_formatter(self, action: argparse.Action, default_metavar: str):
        if action.metavar is None and action.choices is not None and action.option_strings:
            text = "{" + "|".join(str(choice) for choice in action.choices) + "}"
            return lambda size: (text,) * size
        return super()._metavar_formatter(action, default_metavar)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if not action.option_strings or "default" in help_text or action.default is argparse.SUPPRESS:
            return help_text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{help_text} (default: off)"
        if action.default is not None:
            return f"{help_text} (default: %(default)s)"
        return help_text


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with textenc's help layout and one-line usage errors.

    Sub-command parsers made with ``add_subparsers().add_parser`` are of the
    same class, so every sub-command behaves alike.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._checks: list[Callable[[argparse.Namespace], str | None]] = []

    def add_check(self, check: Callable[[argparse.Namespace], str | None]) -> None:
        """After parsing, ``check(namespace)`` returns None or the problem of a combination
        of options (``--steps`` with a syntax that has no schedules); a problem is a
        usage error of this parser (one line, status 2), before anything runs."""
        self._checks.append(check)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._typed = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        for check in self._checks:
            problem = check(namespace)
            if problem:
                self.error(problem)
        return namespace, extras

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but arguments nobody knows are a usage error of the sub-command
        that was chosen (its usage line, "did you mean" for a mistyped option)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._chosen_parser(namespace)
            parser.error(f"unrecognized arguments: {' '.join(extras)}{parser._option_hints(extras)}")
        return namespace

    def _chosen_parser(self, namespace: argparse.Namespace) -> "CommandParser":
        """The innermost sub-command parser ``namespace`` was parsed with (else this one)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None) or "")
                if isinstance(chosen, CommandParser):
                    return chosen._chosen_parser(namespace)
        return self

    def _visible_options(self) -> list[str]:
        return [option for action in self._actions if action.help is not argparse.SUPPRESS
                for option in action.option_strings]

    def _is_unknown_option(self, word: str) -> bool:
        if not word.startswith("-") or word == "-" or word == "--" or _is_number(word):
            return False
        name = word.split("=", 1)[0]
        return not any(option == name or (self.allow_abbrev and name.startswith("--") and option.startswith(name))
                       for option in self._option_string_actions)

    def _option_hints(self, words: list[str]) -> str:
        """`` (did you mean --clip-skip?)`` for the unknown options among ``words``, or ''."""
        names = [word.split("=", 1)[0] for word in words if self._is_unknown_option(word)]
        hints = []
        for name in names:
            match = did_you_mean(name, self._visible_options())
            if match:
                hints.append(f"{match} for {name}" if len(names) > 1 else match)
        return f" (did you mean {', '.join(hints)}?)" if hints else ""

    def _check_value(self, action: argparse.Action, value) -> None:
        """argparse's check of ``choices``, plus the closest choice to what was typed."""
        if action.choices is None or value in action.choices:
            return
        choices = ", ".join(repr(choice) for choice in action.choices)
        match = did_you_mean(str(value), [str(choice) for choice in action.choices])
        hint = f"; did you mean {match!r}?" if match else ""
        raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices}{hint})")

    def error(self, message: str):  # type: ignore[override]
        """Print ``PROG: error: MESSAGE; see 'PROG --help'`` and exit with status 2.

        A missing required option names the unknown options typed instead (``--modle x``:
        "did you mean --model?")."""
        if message.startswith("the following arguments are required"):
            unknown = [word for word in getattr(self, "_typed", ()) if self._is_unknown_option(word)]
            if unknown:
                message += f"; unrecognized arguments: {' '.join(unknown)}{self._option_hints(unknown)}"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}; see '{self.prog} --help'\n")


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def did_you_mean(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``word`` (difflib), or None when none is close.

    >>> did_you_mean("--clipskip", ["--clip-skip", "--model"])
    '--clip-skip'
    """
    bare = {candidate.lstrip("-"): candidate for candidate in candidates}  # "--" alone makes options alike
    matches = difflib.get_close_matches(word.lstrip("-"), list(bare), n=1, cutoff=0.6)
    return bare[matches[0]] if matches else None


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1 (a bad one is a usage error).

    >>> positive_int("3")
    3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value

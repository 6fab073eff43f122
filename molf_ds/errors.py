"""Exceptions raised for user mistakes: each message names what is wrong and how to fix it."""

import argparse
from typing import Any, NoReturn


def one_line(err: object, limit: int = 300) -> str:
    """``err``'s text as one line of at most ``limit`` characters (whitespace runs joined)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MoLFError(ValueError):
    """Base class of molf_ds's user-facing errors (a ``ValueError``, as in PEFT).

    The message is one line whatever it quotes: a path or value holding a newline (or another
    line break) is joined with spaces, so every command's ``prog: error: ...`` stays one line.
    """

    def __str__(self) -> str:
        return " ".join(super().__str__().splitlines())


class EveryRankError(MoLFError):
    """Raised on every rank at the same point with the same message (from a collective or an
    all-reduced value), so a multi-rank command prints it once, on rank 0."""


class MoLFConfigError(MoLFError):
    """An invalid `MoLFConfig` or optimizer value."""


class NoMatchingModulesError(MoLFError):
    """`molf_ds.wrap` found no linear layer matching `target_modules`."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose own errors (an unknown flag, a missing value) are one line too, like every
    other error of molf_ds's commands: ``prog: error: ... (hint)``, exit status 2, no usage block.
    """

    def __init__(self, *args: Any, error_hint: str = "see --help", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error_hint = error_hint

    def error(self, message: str) -> NoReturn:
        # argparse quotes the bad value whole: a 100,000-character argument stays one short line
        text = one_line(message, 500).encode("utf-8", "backslashreplace").decode("utf-8")
        self.exit(2, f"{self.prog}: error: {text} ({self.error_hint})\n")

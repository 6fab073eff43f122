"""Exceptions raised for user mistakes: each message names what is wrong and how to fix it."""


class MoLFError(ValueError):
    """Base class of molf_ds's user-facing errors (a ``ValueError``, as in PEFT).

    The message is one line whatever it quotes: a path or value holding a newline (or another
    line break) is joined with spaces, so every command's ``prog: error: ...`` stays one line.
    """

    def __str__(self) -> str:
        return " ".join(super().__str__().splitlines())


class MoLFConfigError(MoLFError):
    """An invalid `MoLFConfig` or optimizer value."""


class NoMatchingModulesError(MoLFError):
    """`molf_ds.wrap` found no linear layer matching `target_modules`."""

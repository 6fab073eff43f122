"""Exceptions raised for user mistakes: each message names what is wrong and how to fix it."""


class MoLFError(ValueError):
    """Base class of molf_ds's user-facing errors (a ``ValueError``, as in PEFT)."""


class MoLFConfigError(MoLFError):
    """An invalid `MoLFConfig` or optimizer value."""


class NoMatchingModulesError(MoLFError):
    """`molf_ds.wrap` found no linear layer matching `target_modules`."""

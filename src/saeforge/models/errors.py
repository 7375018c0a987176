"""The errors of the models package: both say what to pass instead."""

from __future__ import annotations

from saeforge.config import UserError


class ModelLoadError(UserError, ValueError):
    """A model that could not be found or loaded; the message says what to pass instead."""


class HookError(UserError, ValueError):
    """A hook name that does not resolve, or a hook that cannot do what was asked; says what works."""

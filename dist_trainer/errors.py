"""The error a user's mistake raises: at the bottom of the package, so every module can raise it.

`ConfigError` names the config key that is wrong and how to fix it; the command line prints
it as one line, before any worker starts where the mistake can be seen without one. It is
also importable as `dist_trainer.config.ConfigError`, where it was first defined.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and how to fix it."""

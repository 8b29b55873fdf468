"""Errors every floor of the package may raise (no imports: the bottom of the house)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the source."""

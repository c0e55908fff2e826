"""The tool's own errors: one base class, so the command line turns exactly these into messages.

Every error a user can act on (a bad option, a broken data folder, a damaged cache, a checkpoint
that does not fit) derives from :class:`ToolError` and says what is wrong and what to do. Anything
else (a shape bug inside torch, a failed assertion) is a bug and keeps its traceback.
"""
from __future__ import annotations


class ToolError(Exception):
    """An error the user can act on; the message names the input and what to do."""


class ConfigError(ToolError, ValueError):
    """An option or configuration value that cannot be used (also a ValueError, as before)."""


class LockedError(ToolError):
    """Another process is writing the same output."""

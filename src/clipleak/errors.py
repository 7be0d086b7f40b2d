"""Errors that are the user's to fix (bad input, missing files, mismatched artefacts).

The CLI turns :class:`ClipleakError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class ClipleakError(Exception):
    """A problem with the user's input that clipleak can explain in one sentence."""

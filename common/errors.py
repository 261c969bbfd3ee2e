"""Errors of the user's input: a config key, a data file, a weights file. Their message says what to fix.

Entry points print such errors as one message without a traceback (``QGNET_DEBUG=1`` shows it); anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(RuntimeError):
    """Bad input from the user; the message names the file or config key and what is wrong with it."""


class DataError(InputError):
    """A data file (image, mask, label map, annotation) that cannot be used; the message names the file."""


class WeightsError(InputError, ValueError):
    """A weights file that is missing, unreadable or does not fit the network; the message names the file."""

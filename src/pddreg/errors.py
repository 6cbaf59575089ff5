"""Errors that reach the user as one line (the command line prints ``pddreg: error: <message>``)."""

from __future__ import annotations


class PddregError(Exception):
    """Base class of the errors pddreg reports to the user as one line."""


class InputError(PddregError, ValueError):
    """Bad user input: a missing or unreadable file, a wrong shape, non-finite values, ...

    The message names the file (or argument) and the problem, on one line.
    """


class RegistrationError(PddregError):
    """A registration that cannot give a valid result (e.g. a field with NaN from a broken
    model); the message names the images and the problem."""


class TrainingError(PddregError):
    """Training stopped on a fault it cannot continue from (a non-finite loss or gradient);
    the message says what happened and which checkpoint is kept."""

"""The trainer's user errors: problems the user can fix (bad data, a full disk for the bank, ...), which the CLI
answers with ``error: <message>`` and exit 2 instead of a traceback (:func:`training.common.cli.user_error`).

A method raises a subclass of :class:`TrainingUserError` for its own such problems, so the skeleton never imports
a method to recognise them.
"""


class TrainingUserError(Exception):
    """A problem with the user's input or machine, stated so that they can fix it."""

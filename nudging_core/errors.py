"""Errors the nodes turn into messages that name the node, the input and the fix."""


class NudgeInputError(ValueError):
    """Bad input a user can fix (wrong file, wrong size, NaN...). The message says how."""

"""The one exception type users see: bad input, unloadable models, incompatible drafters.

Anything raised as `InputError` is printed by the CLI and shown by the app as a plain message;
anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """A problem with what the user asked for, explained in words they can act on."""

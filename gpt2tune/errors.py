"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, data, model path...), not a bug."""

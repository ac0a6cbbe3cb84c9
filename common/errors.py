"""Errors that mean "the input is wrong", as opposed to a bug.

Command-line entry points print these as one line naming the file and the field and
exit 1; everything else keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a config, a manifest, a path. The message says where."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the config dataclass."""


class DataError(UserError, ValueError):
    """A data file or manifest row that cannot be used."""

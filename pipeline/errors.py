"""Errors that carry a message for the user: what was wrong and what to do. The CLI prints them, exit 2."""


class DistilyError(RuntimeError):
    """Bad input or configuration, found before expensive work starts."""


class CacheError(DistilyError):
    """A cache is missing, corrupt, or does not fit the run that uses it."""


class ConfigError(DistilyError):
    """An option has an unknown name, a value of the wrong type, or a config file is unreadable."""

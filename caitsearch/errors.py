"""User-facing errors: one sentence, printed by the CLI as one line with exit code 2."""


class CaitsearchError(Exception):
    """Bad input or an unmet requirement the user can fix; never a bug."""


class ConfigError(CaitsearchError):
    """A compression config that does not fit its model."""

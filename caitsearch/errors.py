"""User-facing errors: one sentence, printed by the CLI as one line with exit code 2."""


class CaitsearchError(Exception):
    """Bad input or an unmet requirement the user can fix; never a bug."""


class ConfigError(CaitsearchError):
    """A compression config that does not fit its model."""


def reason(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), for quoting
    another library's error inside one of ours."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__

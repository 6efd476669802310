"""How an error message quotes what a user passed: whole when short, cut when not, so one bad
input (a 20,000-character id, a path in a deep tree) still gives one readable line."""


def shown(value: object, limit: int = 120) -> str:
    """``value`` as text for a message, cut to about ``limit`` characters (its start and end).

    >>> shown("a" * 10)
    'aaaaaaaaaa'
    >>> len(shown("b" * 1000, limit=80))
    80
    """
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}...{text[-17:]}"

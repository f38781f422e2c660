"""Checks of a collection's per-pair columns (ids, captions, image refs, metadata), shared by the in-memory
collection and the store, so both refuse the same input with the same words."""


def as_ids(ids):
    """`ids` as a list of str; a single string is refused (it would be read as one id per character)."""
    if isinstance(ids, str):
        raise TypeError(f"ids must be a list of strings, got the single string {ids!r}: wrap it in a list")
    return [str(i) for i in ids]


def aligned(values, n, what):
    """`values` as a list of `n` (None: n Nones); a different length raises ValueError naming `what`."""
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} ids")
    return values

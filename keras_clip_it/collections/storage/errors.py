"""The errors of stored collections, and how their messages name ids and encoders."""


class CollectionStorageError(ValueError):
    """A stored collection cannot be read or written as asked; the message says which file and what to do."""


class CorruptCollectionError(CollectionStorageError):
    """A file of a stored collection is missing, truncated, or does not match its manifest."""


class UnsupportedSchemaError(CollectionStorageError):
    """The collection was written with a storage schema this version of keras-clip-it cannot read."""


class ReadOnlyStorageError(CollectionStorageError):
    """The URI points into a read-only filesystem (a zip or tar archive, http)."""


class ConcurrentWriteError(CollectionStorageError):
    """Another writer committed the same generation first; this call changed nothing."""


def encoder_keys(keys):
    """(kind, fingerprint) keys as a message shows them: [image:0123456789ab, ...]."""
    return "[" + ", ".join(f"{kind}:{str(fp)[:12]}" for kind, fp in keys) + "]"


def preview(items, limit=10):
    """The first `limit` items for a message, and how many more there are."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")

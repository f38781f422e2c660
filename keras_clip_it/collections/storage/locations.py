"""A collection directory on one fsspec filesystem: paths, listing, durable writes, atomic publish, delete.

Local paths are written with plain os calls so that every new file and rename can be fsynced; every other
filesystem goes through fsspec, where a single-object write is the commit point (see the package docstring).
"""

import hashlib
import os
import posixpath
import secrets

import fsspec
from fsspec.implementations.local import LocalFileSystem

from keras_clip_it.collections.storage.errors import CollectionStorageError
from keras_clip_it.collections.storage.errors import ReadOnlyStorageError
from keras_clip_it.collections.storage.errors import preview

SEGMENTS = "segments"
READ_ONLY_PROTOCOLS = frozenset({"zip", "tar", "http", "https", "github", "libarchive", "reference"})
HASH_CHUNK = 16 << 20


class Location:
    """A collection directory on one fsspec filesystem, with the few operations storage needs."""

    def __init__(self, uri):
        if isinstance(uri, os.PathLike):
            uri = os.fspath(uri)
        if not isinstance(uri, str) or not uri:
            raise TypeError(f"a collection location is a path or fsspec URI string, got {uri!r}")
        self.uri = uri
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.root = root.rstrip("/") if root not in ("", "/") else root
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.read_only = bool(protocols & READ_ONLY_PROTOCOLS)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, relative):
        return posixpath.join(self.root, relative) if self.root else relative

    def check_writable(self):
        if self.read_only:
            raise ReadOnlyStorageError(
                f"{self.uri!r} is read-only ({type(self.fs).__name__}): open it with open_collection, then "
                "save it to a writable location (col.save('/some/dir')) and change it there"
            )

    def listdir(self, relative=""):
        """Base names in a directory; an empty list when it does not exist."""
        path = self.path(relative) if relative else self.root
        if self.local:
            return os.listdir(path) if os.path.isdir(path) else []
        self.fs.invalidate_cache(path)  # listings are cached per filesystem instance; others may have written
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [posixpath.basename(entry.rstrip("/")) for entry in entries]

    def check_no_foreign_files(self):
        foreign = [n for n in self.listdir() if n != SEGMENTS and not is_temporary_manifest(n)]
        if foreign:
            raise CollectionStorageError(
                f"{self.uri!r} holds files that are not an analogy collection ({preview(sorted(foreign))}): "
                "save to a new or empty directory"
            )

    def size(self, relative):
        path = self.path(relative)
        if self.local:
            return os.stat(path).st_size
        return self.fs.size(path)

    def read(self, relative):
        path = self.path(relative)
        if self.local:
            with open(path, "rb") as f:
                return f.read()
        return self.fs.cat_file(path)

    def sha256(self, relative):
        digest = hashlib.sha256()
        with self.fs.open(self.path(relative), "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def write_file(self, relative, chunks):
        """Writes a new file from byte chunks (durably when local); returns its manifest entry."""
        path = self.path(relative)
        digest, size = hashlib.sha256(), 0
        if self.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            with open(path, "xb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        else:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        return {"path": relative, "bytes": size, "sha256": digest.hexdigest()}

    def publish(self, name, data):
        """Makes a manifest visible under `name` in one step, refusing to replace an existing one."""
        path = self.path(name)
        if not self.local:
            if self.fs.exists(path):
                raise Taken(name)
            self.fs.pipe_file(path, data)
            return
        _fsync_directory(self.path(SEGMENTS))
        temporary = self.path(f".{name}.{secrets.token_hex(4)}.tmp")
        with open(temporary, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            os.unlink(temporary)
            raise Taken(name) from None
        except OSError:
            # Filesystems without hard links (FAT, some network mounts): an atomic rename, racing writers
            # are then only caught by this check.
            if os.path.exists(path):
                os.unlink(temporary)
                raise Taken(name) from None
            os.replace(temporary, path)
        else:
            os.unlink(temporary)
        _fsync_directory(self.root)

    def delete(self, relative):
        path = self.path(relative)
        try:
            if self.local:
                os.unlink(path)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass


class Taken(Exception):
    """The manifest generation a writer wanted was committed by someone else first."""


def _fsync_directory(path):
    """Makes renames and new files in a directory durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def is_temporary_manifest(name):
    return name.startswith(".manifest-") and name.endswith(".tmp")

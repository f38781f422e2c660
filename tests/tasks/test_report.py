import numpy as np
import pytest

pytest.importorskip("matplotlib")

import keras_clip_it as kci  # noqa: E402
from keras_clip_it.tasks.report import Report  # noqa: E402


def test_report_embeds_figures_and_escapes_text(tmp_path):
    report = Report("Demo <ASIF>")
    report.text("Nota", "perché <b> non è HTML")
    report.table("Risultati", ["etichetta", "punteggio"], [["gatto", 0.41234], ["cane", 2]])
    report.figure("Mappa", kci.plot.heatmap(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8))), caption="un gatto")
    path = report.save(str(tmp_path / "out" / "report.html"))
    page = open(path, encoding="utf-8").read()
    assert "Demo &lt;ASIF&gt;" in page and "perché &lt;b&gt;" in page
    assert "<td>0.412</td>" in page and "data:image/png;base64," in page

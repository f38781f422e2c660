"""`keras-clip-it evaluate | classify | retrieve | localize` run in-process on real encoders and emoji.

ASIF runs over a small stored collection (the first 100 English training emoji, embedded once per module)
so the commands load it without embedding; the encoders are loaded once per process by the commands.
Batches of 8 and inputs of 5 to 8 items keep the encoders to a few compiled shapes.
"""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

import keras_clip_it as kci  # noqa: E402
from keras_clip_it import cli  # noqa: E402
from keras_clip_it.collections.analogy_collection import AnalogyCollection  # noqa: E402
from keras_clip_it.tasks import commands  # noqa: E402

ANCHORS = 100
SHOWN = [3, 17, 40, 62, 77, 95]  # anchor pairs whose images are written to files


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    """The stored collection, PNG files of six of its images, their captions, and a 2x2 scene."""
    folder = tmp_path_factory.mktemp("commands")
    ids, images, captions = kci.datasets.emoji_pairs("en", split="train", return_ids=True)
    image_encoder = commands._encoder("image", commands.IMAGE_PRESET)
    text_encoder = commands._encoder("text", commands.TEXT_PRESETS["en"])
    collection = AnalogyCollection(name="emoji-en-100", language="en")
    collection.add(
        ids[:ANCHORS],
        captions=captions[:ANCHORS],
        embeddings={
            "image": {image_encoder.fingerprint: image_encoder.embed(images[:ANCHORS], batch_size=8)},
            "text": {text_encoder.fingerprint: text_encoder.embed(captions[:ANCHORS], batch_size=8)},
        },
    )
    collection.save(str(folder / "collection"))
    files = []
    for i in SHOWN:
        path = folder / f"emoji_{i}.png"
        Image.fromarray(images[i]).save(path)
        files.append(str(path))
    tiles = [images[i] for i in SHOWN[:4]]
    scene = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)
    Image.fromarray(scene).save(folder / "scene.png")
    return {
        "folder": folder,
        "collection": str(folder / "collection"),
        "files": files,
        "captions": [captions[i] for i in SHOWN],
        "ids": [ids[i] for i in SHOWN],
        "scene": str(folder / "scene.png"),
    }


def run(emoji, tmp_path, *argv):
    """Runs a command with the small English ASIF and returns (exit status, JSON results)."""
    output = tmp_path / "results.json"
    status = cli.main([*argv, "--lang", "en", "--collection", emoji["collection"], "--batch-size", "8",
                       "--output", str(output)])
    return status, json.loads(output.read_text(encoding="utf-8")) if status == 0 else None


def is_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_classify_anchor_images_among_their_captions(emoji, tmp_path):
    names = emoji["captions"]
    status, result = run(emoji, tmp_path, "classify", *emoji["files"], "--labels", *names, "--truth", *names,
                         "--figures", str(tmp_path / "figures"))
    assert status == 0
    assert result["model"]["family"] == "ASIF" and result["model"]["anchors"] == ANCHORS
    assert [p["image"] for p in result["predictions"]] == emoji["files"]
    for prediction in result["predictions"]:
        scores = [top["score"] for top in prediction["top"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert prediction["label"] == prediction["top"][0]["label"]
    right = np.mean([p["label"] == name for p, name in zip(result["predictions"], names)])
    assert result["accuracy_top1"] == pytest.approx(right)
    assert result["accuracy_top1"] >= 5 / 6  # each image is an anchor paired with its own caption
    assert result["figures"] == [str(tmp_path / "figures" / "confusion_matrix.png")] and is_png(result["figures"][0])


def test_retrieve_text_to_image_finds_the_named_emoji(emoji, tmp_path):
    folder = str(emoji["folder"] / "emoji_*.png")  # a glob, expanded in sorted order
    status, result = run(emoji, tmp_path, "retrieve", "--texts", *emoji["captions"], "--images", folder, "--top-k", "4",
                         "--figures", str(tmp_path))
    assert status == 0 and result["gallery_size"] == len(emoji["files"])
    best = [r["matches"][0]["item"] for r in result["results"]]
    assert np.mean([b == f for b, f in zip(best, emoji["files"])]) >= 5 / 6
    assert all(len(r["matches"]) == 4 and r["matches"][0]["rank"] == 1 for r in result["results"])
    assert is_png(tmp_path / "retrieval.png")


def test_retrieve_image_to_text_and_faiss_on_asif_is_refused(emoji, tmp_path, capsys):
    status, result = run(emoji, tmp_path, "retrieve", "--direction", "image-to-text", "--images", *emoji["files"],
                         "--texts", *emoji["captions"], "--top-k", "2")
    assert status == 0 and [r["query"] for r in result["results"]] == emoji["files"]
    best = [r["matches"][0]["item"] for r in result["results"]]
    assert np.mean([b == c for b, c in zip(best, emoji["captions"])]) >= 5 / 6
    status, _ = run(emoji, tmp_path, "retrieve", "--images", *emoji["files"][:2], "--texts", "x", "--backend", "faiss")
    assert status == 1 and "backend='numpy'" in capsys.readouterr().err


@pytest.mark.slow
def test_localize_writes_maps_and_heatmaps(emoji, tmp_path):
    text = emoji["captions"][1]  # the top-right tile of the scene
    status, result = run(emoji, tmp_path, "localize", emoji["scene"], "--texts", text, "--patch-fraction", "0.5",
                         "--grid", "4", "--figures", str(tmp_path))
    assert status == 0
    (found,) = result["maps"]
    assert found["shape"] == [256, 256] and found["text"] == text
    assert np.array(found["grid"]).shape == (4, 4)
    assert found["peak"]["y"] < 128 and found["peak"]["x"] >= 128  # hiding the named tile costs the most
    assert len(result["figures"]) == 1 and is_png(result["figures"][0])


def test_evaluate_emoji_with_accuracy_against_anchors(emoji, tmp_path):
    status, result = run(emoji, tmp_path, "evaluate", "--limit", "12", "--anchors", "20,60", "--figures", str(tmp_path))
    assert status == 0 and result["dataset"] == "emoji-en:test" and result["images"] == 12
    assert "held_out_removed_from_collection" not in result  # the test split is not in the collection
    metrics = result["metrics"]
    for key in ("image_to_text_R@1", "text_to_image_R@10", "image_to_text_MRR@10", "zero_shot_top1", "zero_shot_top5"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["image_to_text_R@1"] <= metrics["image_to_text_R@5"] <= metrics["image_to_text_R@10"]
    assert [point["anchors"] for point in result["anchors_curve"]] == [20, 60, ANCHORS]
    assert result["anchors_curve"][-1]["zero_shot_top1"] == metrics["zero_shot_top1"]
    assert sorted(result["figures"]) == sorted(str(tmp_path / n) for n in ("accuracy_vs_anchors.png", "confusion_matrix.png"))


def test_evaluate_pairs_file_removes_evaluated_pairs_from_the_collection(emoji, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    lines = [{"id": i, "image": f, "label": c} for i, f, c in zip(emoji["ids"], emoji["files"], emoji["captions"])]
    pairs.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    status, result = run(emoji, tmp_path, "evaluate", "--pairs", str(pairs), "--templates", "none")
    assert status == 0 and result["held_out_removed_from_collection"] == len(lines)
    assert result["model"]["anchors"] == ANCHORS - len(lines) and result["classes"] == len(lines)
    assert set(result["metrics"]) == {"zero_shot_top1", "zero_shot_top5"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["classify", "missing.png", "--labels", "a"], "'missing.png' does not exist"),
        (["classify", "{tmp}/*.jpg", "--labels", "a"], "no file matches"),
        (["classify", "{file}", "--labels", "a", "b", "--truth", "a", "b"], "2 labels for 1 images"),
        (["classify", "{file}", "--labels", "a", "a"], "repeats ['a']"),
        (["classify", "{file}", "--labels", "a", "--templates", "a photo"], "has no '{}'"),
        (["classify", "{file}", "--labels", "a", "--model", "model.h5"], "not a .keras file"),
        (["classify", "{file}", "--labels", "a", "--model", "{tmp}/none.keras"], "does not exist"),
        (["evaluate", "--anchors", "10,ten"], "comma-separated integers"),
        (["evaluate", "--pairs", "{tmp}/none.jsonl"], "does not exist"),
        (["localize", "{file}", "--texts", " "], "non-empty text"),
    ],
)
def test_bad_inputs_are_clear_errors(emoji, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, file=emoji["files"][0]) for a in argv]
    assert cli.main(argv) == 1
    assert message in capsys.readouterr().err


def test_unknown_collection_is_a_clear_error(emoji, capsys):
    assert cli.main(["classify", emoji["files"][0], "--labels", "a", "--lang", "en", "--collection", "no-such-thing"]) == 1
    assert "no-such-thing" in capsys.readouterr().err


@pytest.mark.slow
def test_dual_encoder_from_a_keras_file(emoji, tmp_path):
    """A saved DualEncoder serves the commands; its dense embeddings also work with the FAISS backend."""
    model = kci.DualEncoder(
        image_encoder=commands._encoder("image", commands.IMAGE_PRESET),
        text_encoder=commands._encoder("text", commands.TEXT_PRESETS["en"]),
        projection_dim=32,
    )
    path = str(tmp_path / "dual.keras")
    model.save(path)
    argv = ["--images", *emoji["files"], "--texts", *emoji["captions"], "--model", path, "--top-k", "3", "--batch-size", "8"]
    results = {}
    for backend in ("numpy", "faiss") if _has_faiss() else ("numpy",):
        output = tmp_path / f"{backend}.json"
        assert cli.main(["retrieve", *argv, "--backend", backend, "--output", str(output)]) == 0
        results[backend] = json.loads(output.read_text())
    assert results["numpy"]["model"] == {"family": "DualEncoder", "model": path, "projection_dim": 32}
    expected = kci.retrieve(model, emoji["captions"], emoji["files"], top_k=3)
    for result in results.values():
        assert [[m["index"] for m in r["matches"]] for r in result["results"]] == expected.indices.tolist()
    assert cli.main(["evaluate", "--model", path, "--anchors", "10"]) == 1  # anchors are an ASIF notion


def _has_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True

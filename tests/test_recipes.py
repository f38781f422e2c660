"""The training recipes run end to end (--quick: a few steps on a few pairs) and report held-out recall."""

import json
import os
import subprocess
import sys

import pytest

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes")
METRICS = [f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)]


def run(recipe, *options, check=True):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, os.path.join(RECIPES, recipe), *options], capture_output=True, text=True, env=env, timeout=1200
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_results(path, recipe, lang, **expected):
    with open(path) as handle:
        results = json.load(handle)
    assert results["recipe"] == recipe and results["lang"] == lang and results["quick"]
    assert results["test_pairs"] == 32 and results["train_pairs"] == 64
    for name in METRICS:
        assert 0.0 <= results["metrics"][name] <= 1.0
    # Recall can only grow with k.
    for direction in ("image_to_text", "text_to_image"):
        r = [results["metrics"][f"{direction}_R@{k}"] for k in (1, 5, 10)]
        assert r == sorted(r)
    for key, value in expected.items():
        assert results[key] == value, key
    return results


# Minutes each (model loading and compilation dominate a --quick run), hence slow. The CLIP recipe runs
# data-parallel on two CPU devices under TensorFlow: the MirroredStrategy path with the gathering loss.
# The pretrained text towers train only their top block (--text-unlocked-groups 1): the backward pass
# through all of e5's or MiniLM's blocks is most of a quick run's compile and step time, and proves
# nothing more about the recipe.
@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, lang, options, expected",
    [
        ("train_clip.py", "it", ("--backend", "tensorflow", "--distribution", "data-parallel", "--cpu-devices", "2"),
         {"backend": "tensorflow", "distribution": "data-parallel", "devices": 2}),
        ("train_lit.py", "en", ("--text-unlocked-groups", "1"),
         {"backend": "jax", "devices": 1, "text_unlocked_groups": 1}),
        ("train_clip_italian.py", "it", ("--text-unlocked-groups", "1"), {"backend": "jax", "devices": 1}),
    ],
)
def test_recipe_quick_run_prints_and_writes_recall(tmp_path, recipe, lang, options, expected):
    output = tmp_path / "results.json"
    result = run(recipe, "--quick", "--lang", lang, "--output", str(output), *options)
    assert "| image -> caption |" in result.stdout and "| caption -> image |" in result.stdout
    results = check_results(output, recipe[len("train_"): -len(".py")], lang, **expected)
    if recipe == "train_lit.py":
        asif = results["asif"]["metrics"]
        assert 0.0 <= asif["image_to_text_R@1"] <= asif["image_to_text_R@10"] <= 1.0
    if recipe == "train_clip_italian.py":
        assert results["schedule"]["unlock_epoch"] == 1 and results["schedule"]["text_unlocked_groups"] == 1


def test_bad_options_say_what_is_wrong():
    result = run("train_clip.py", "--batch-size", "1", check=False)
    assert result.returncode != 0 and "--batch-size must be at least 2" in result.stderr
    result = run("train_lit.py", "--distribution", "gpus", check=False)
    assert result.returncode != 0 and "invalid choice: 'gpus'" in result.stderr

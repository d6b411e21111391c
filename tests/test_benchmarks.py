"""The benchmark scripts run and write the fields the book reads (no timing assertions here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "looksam_step_time.py"
RECORDED = ROOT / "book" / "results" / "looksam_step_time.json"
TINY = ["--threads", "1", "--repeats", "2", "--steps", "10", "--warmup", "10", "--batch", "2",
        "--image-size", "8", "--channels", "2"]


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "looksam.json"
    done = _run(*TINY, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "LookSAM k=10" in done.stdout and str(out) in done.stdout
    return json.loads(out.read_text())


def test_looksam_benchmark_records_hardware_settings_and_all_four(tiny_record):
    for key in ("cpu_model", "cpu_cores", "torch_threads", "torch_version", "device"):
        assert key in tiny_record["hardware"], key
    assert tiny_record["hardware"]["torch_threads"] == 1
    settings = tiny_record["settings"]
    assert settings["repeats"] == 2
    assert (settings["steps_per_repeat"], settings["warmup_steps"]) == (10, 10)
    assert settings["input_shape"] == [2, 3, 8, 8]
    names = [res["name"] for res in tiny_record["results"]]
    assert names == ["SGD", "SAM", "LookSAM k=5", "LookSAM k=10"]
    for res, cost in zip(tiny_record["results"], (1.0, 2.0, 1.2, 1.1)):
        assert res["cost_model"] == pytest.approx(cost)
        # the closure was called exactly 1 + 1/k times per timed step
        assert res["gradient_evaluations_per_step"] == pytest.approx(cost)
        assert len(res["step_ms_per_repeat"]) == 2
        assert all(t > 0 for t in res["step_ms_per_repeat"])
        assert res["step_ms_q1"] <= res["step_ms_median"] <= res["step_ms_q3"]
        assert res["ratio_to_base"] > 0
    assert tiny_record["results"][0]["ratio_to_base"] == 1.0


def test_recorded_results_have_the_fields_the_script_writes(tiny_record):
    recorded = json.loads(RECORDED.read_text())
    assert recorded.keys() == tiny_record.keys()
    for part in ("hardware", "settings"):
        assert recorded[part].keys() == tiny_record[part].keys(), part
    assert [r.keys() for r in recorded["results"]] == [r.keys() for r in tiny_record["results"]]
    assert [r["name"] for r in recorded["results"]] == [r["name"] for r in tiny_record["results"]]


@pytest.mark.parametrize("bad", [["--steps", "15"], ["--warmup", "5"], ["--repeats", "0"]])
def test_looksam_benchmark_rejects_settings_that_break_the_comparison(bad, tmp_path):
    done = _run(*bad, "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and bad[0] in done.stderr
    assert not (tmp_path / "x.json").exists()

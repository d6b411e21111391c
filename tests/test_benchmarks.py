"""The benchmark scripts run and write the fields the book reads (no timing assertions here)."""

import json
import os
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


# --- benchmarks/step_cost.py (issue 8): every framework's rows, tiny; no timing assertions ---

STEP_COST = ROOT / "benchmarks" / "step_cost.py"
STEP_COST_RECORDED = ROOT / "book" / "results" / "step_cost_cpu.json"
OURS = ["SAM", "ASAM", "GSAM", "WSAM", "bSAM", "LookSAM k=5"]
TORCH_PEERS = [f"pytorch_optimizer {name}" for name in ("SAM", "GSAM", "WSAM", "bSAM",
                                                         "LookSAM k=5")]
STEP_COST_ROWS = {
    # framework -> (case the test runs, every row name in order)
    "torch": ("all", ["SGD", "floor", "floor bSAM", *OURS, *TORCH_PEERS]),
    "jax": ("mlp", ["SGD", "floor", "floor bSAM", "floor LookSAM k=5", *OURS,
                    "SAM (adversarial_sam)", "optax.contrib.sam"]),
    "tf": ("mlp", ["SGD", "SGD (graph)", "floor", "floor (graph)", "floor bSAM", *OURS]),
}
STEP_COST_MODULES = {"torch": ["torch", "pytorch_optimizer"], "jax": ["jax", "optax"],
                     "tf": ["tensorflow", "keras"]}


def _step_cost(*args):
    return subprocess.run([sys.executable, str(STEP_COST), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=list(STEP_COST_ROWS))
def step_cost_record(request, tmp_path_factory):
    framework = request.param
    for module in STEP_COST_MODULES[framework]:
        pytest.importorskip(module)
    case, _ = STEP_COST_ROWS[framework]
    out = tmp_path_factory.mktemp("step_cost") / f"{framework}.json"
    done = _step_cost("--tiny", "--framework", framework, "--case", case, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(out) in done.stdout and "targets" in done.stdout or framework == "jax"
    return framework, json.loads(out.read_text())


def test_step_cost_records_machine_versions_settings_and_every_row(step_cost_record):
    framework, record = step_cost_record
    case, names = STEP_COST_ROWS[framework]
    assert record["schema_version"] == 1
    for key in ("cpu_model", "cpu_cores", "cpu_cores_available", "platform", "threads"):
        assert key in record["machine"], key
    for key in ("python", "numpy", "torch", "jax", "optax", "tensorflow", "keras",
                "pytorch_optimizer", "sam_edu_commit", "sam_edu_dirty"):
        assert key in record["versions"], key
    settings = record["settings"]
    assert settings["tiny"] is True and settings["frameworks"] == [framework]
    assert (settings["repeats"], settings["steps_per_repeat"], settings["warmup_steps"]) == \
        (2, 5, 5)
    assert settings["hyperparameters"]["looksam_k"] == 5
    cases = ["cnn", "mlp", "tensors"] if case == "all" else [case]
    assert [run["case"] for run in record["runs"]] == cases
    for run in record["runs"]:
        assert run["framework"] == framework and run["parameters"] > 0
        expected = [n for n in names if not (run["case"] == "tensors" and n == "floor"
                                             and framework == "torch")]
        assert [row["name"] for row in run["rows"]] == expected
        base = run["rows"][0]
        assert base["role"] == "base" and base["ratio_to_base"] == 1.0
        by_name = {row["name"]: row for row in run["rows"]}
        for row in run["rows"]:
            assert row["role"] in ("base", "floor", "ours", "peer"), row["name"]
            assert len(row["step_ms_per_repeat"]) == len(row["ratio_per_repeat"]) == 2
            assert all(t > 0 for t in row["step_ms_per_repeat"])
            assert row["ratio_to_base"] > 0 and row["step_ms_median"] > 0
            if row["role"] in ("ours", "peer"):
                assert row["weights_changed"] is True, row["name"]  # the guard ran
            for ref in (row["floor"], row["peer"]):
                assert ref is None or ref in by_name, (row["name"], ref)
            if row["floor"]:
                assert row["floor_ratio"] > 0 and row["overhead_above_floor"] is not None
            # where time can go besides arithmetic: page faults and kernel time (Linux here)
            assert row["minor_faults_per_step"] >= 0 and row["system_ms_per_step"] >= 0
            if framework == "jax" and row["name"] != "floor LookSAM k=5":  # one jitted step
                assert isinstance(row["temp_bytes"], int) and row["temp_bytes"] >= 0
            else:
                assert row["temp_bytes"] is None
        if framework == "torch" and run["case"] != "tensors":
            # the forward passes were counted: LookSAM k=5 runs 1 + 1/5 of them, the peer 2
            assert by_name["LookSAM k=5"]["passes_measured"] == pytest.approx(1.2)
            assert by_name["pytorch_optimizer LookSAM k=5"]["passes_measured"] == \
                pytest.approx(2.0)
            assert by_name["SAM"]["passes_measured"] == pytest.approx(2.0)
    for target in record["targets"]:
        assert target["framework"] == framework
        assert target["passed"] == (target["value"] <= target["limit"])
        assert target["text"].endswith("pass" if target["passed"] else "FAIL")
    if framework == "torch":
        ids = {t["id"] for t in record["targets"]}
        assert {"sam_overhead_half_of_peer", "looksam_k5_ratio", "sam_two_steps_ratio",
                "bsam_within_0.3_of_floor"} <= ids


def test_recorded_step_cost_has_the_fields_the_script_writes(step_cost_record):
    if not STEP_COST_RECORDED.exists():
        pytest.skip("no recorded run yet")
    framework, tiny = step_cost_record
    recorded = json.loads(STEP_COST_RECORDED.read_text())
    assert recorded.keys() == tiny.keys()
    for part in ("machine", "versions", "settings"):
        assert recorded[part].keys() == tiny[part].keys(), part
    assert recorded["settings"]["tiny"] is False
    runs = [run for run in recorded["runs"] if run["framework"] == framework]
    assert [run["case"] for run in runs] == ["cnn", "mlp", "tensors"]
    for run in runs:
        assert run.keys() == tiny["runs"][0].keys()
        # the tiny JAX and TF runs hold case mlp only; their rows are the same in every case
        tiny_run = next((r for r in tiny["runs"] if r["case"] == run["case"]), tiny["runs"][0])
        assert [row["name"] for row in run["rows"]] == [row["name"] for row in tiny_run["rows"]]
        assert [row.keys() for row in run["rows"]] == [row.keys() for row in tiny_run["rows"]]


@pytest.mark.parametrize("bad", [["--steps", "7"], ["--warmup", "0"], ["--repeats", "0"],
                                 ["--tensors-steps", "12"]])
def test_step_cost_rejects_settings_that_break_the_comparison(bad, tmp_path):
    done = _step_cost(*bad, "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and bad[0] in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_step_cost_markdown_prints_the_headline_table(step_cost_record, tmp_path):
    framework, record = step_cost_record
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    done = _step_cost("--markdown", str(path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| step time / base step |") and "Targets of issue 8" in lines[-1]
    assert any(line.startswith("| SAM |") for line in lines)


STEP_COST_NO_MMAP_RECORDED = ROOT / "book" / "results" / "step_cost_cpu_jax_no_mmap.json"
NO_MMAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


@pytest.fixture(scope="module")
def no_mmap_record(tmp_path_factory):
    for module in STEP_COST_MODULES["jax"]:
        pytest.importorskip(module)
    out = tmp_path_factory.mktemp("step_cost") / "jax_no_mmap.json"
    done = _step_cost("--tiny", "--framework", "jax", "--case", "mlp", "--malloc", "no-mmap",
                      "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_step_cost_malloc_no_mmap_reaches_the_worker_and_is_recorded(no_mmap_record,
                                                                     step_cost_record):
    """``--malloc no-mmap`` starts the worker with glibc's variables set; the default does not
    add any (the worker sees the environment it was started with)."""
    assert no_mmap_record["settings"]["malloc"] == "no-mmap"
    assert no_mmap_record["settings"]["malloc_environment"] == NO_MMAP
    (run,) = no_mmap_record["runs"]
    assert {k: run["framework_info"]["malloc_environment"][k] for k in NO_MMAP} == NO_MMAP
    assert [row["name"] for row in run["rows"]] == STEP_COST_ROWS["jax"][1]
    framework, record = step_cost_record
    assert record["settings"]["malloc"] == "default"
    assert record["settings"]["malloc_environment"] == {}
    inherited = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    for run in record["runs"]:
        assert run["framework_info"]["malloc_environment"] == inherited, framework


def test_recorded_no_mmap_run_has_the_fields_the_script_writes(no_mmap_record):
    recorded = json.loads(STEP_COST_NO_MMAP_RECORDED.read_text())
    assert recorded.keys() == no_mmap_record.keys()
    for part in ("machine", "versions", "settings"):
        assert recorded[part].keys() == no_mmap_record[part].keys(), part
    assert recorded["settings"]["malloc_environment"] == NO_MMAP
    assert recorded["settings"]["tiny"] is False and recorded["settings"]["frameworks"] == ["jax"]
    assert [run["case"] for run in recorded["runs"]] == ["cnn", "mlp", "tensors"]
    for run in recorded["runs"]:
        assert run["framework_info"]["malloc_environment"] == NO_MMAP
        assert [row.keys() for row in run["rows"]] == \
            [row.keys() for row in no_mmap_record["runs"][0]["rows"]]

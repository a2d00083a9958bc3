"""Every benchmark script starts in both of its forms, and the small ones run on tiny settings.

Each script in benchmarks/ (a file with a `__main__` guard) must run from the repository root both as
`python benchmarks/<name>.py` and as `python -m benchmarks.<name>`; `--help` checks both forms without
doing any work. The scripts that finish in seconds on tiny settings (their own size flags) also run,
and their closing summary line is checked. tests/test_oesdn_benchmark.py runs benchmarks/oesdn.py.

Importing torch, Dask and Prefect costs each subprocess several seconds of CPU, so the module starts
all its subprocesses at once on a pool of one worker per core; each test waits for its own.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
MAIN_GUARD = 'if __name__ == "__main__":'

# Modules the scripts import; they have no command line of their own.
HELPERS = {"oesdn_protocols", "overrides", "rss"}
SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("*.py") if MAIN_GUARD in path.read_text())
FORMS = ("script", "module")

# Tiny settings through each script's own flags, and the keys of the summary line it ends with, in order.
TINY_RUNS: dict[str, tuple[list[str], str, tuple[str, ...]]] = {
    "bank_size": (["--limit", "24", "--ratios", "0.02"], "bank_size",
                  ("line", "ratio", "rows", "auroc", "exact_ms", "indexed_ms", "max_rel_diff")),
    "coreset": (["--n", "2000", "--dim", "16", "--patches", "100", "--ratio", "0.1", "--threads", "1"],
                "coreset", ("data", "n", "dim", "ratio", "exact_s", "dask_s", "speedup", "radius_ratio",
                            "random_radius_ratio")),
    "out_of_core": (["--gb", "0.001", "--dim", "8", "--threads", "1"],
                    "out_of_core", ("store_gb", "peak_rss_gb", "coreset_s", "radius_ratio_vs_sample")),
    "throughput": (["--train", "2", "--test", "4", "--bank-rows", "200"],
                   "throughput", ("device", "extract_img_s", "score_img_s")),
    "poison": (["--limit", "30", "--levels", "0.1", "--set", "image_size=64",
                "--set", "patchcore.backbone=efficientnet-lite0", "--set", "evaluation.detectors=[patchcore,darkness]"],
               "poison", ("line", "levels", "quarantine_recall", "champion_detection_rate", "false_quarantine",
                          "auroc_clean", "auroc_screened", "auroc_unscreened", "promoted_unscreened",
                          "promoted_screened")),
}
# Why the other scripts are only started with --help here.
NOT_RUN_HERE = {
    "cli_latency": "times a nightly of three lines and a running `patchline ui`: minutes; "
                   "tests/test_watching.py runs the same commands",
    "elpv": "a whole rebuild flow (Prefect, MLflow, training): too slow here even with --set source.limit_per_class",
    "fusion_weights": "the rebuild's Prefect tasks on a whole bundled ELPV line; no flag reads less",
    "gpu_check": "needs a CUDA device",
    "incremental": "four rebuild flows of a whole bundled ELPV line; tests/test_incremental.py runs them on a tiny one",
    "oesdn": "run on tiny settings by tests/test_oesdn_benchmark.py",
    "patchcore_sweep": "extracts features of every image of the issue-10 split; no flag reads less",
    "peer_settings": "checks the issue-10 split's counts, so it always reads a whole line",
    "scoring": "needs a rebuilt line: tests/test_export.py runs it on the tiny line that it rebuilds",
}


def _command(name: str, form: str, *args: str) -> list[str]:
    target = [f"benchmarks/{name}.py"] if form == "script" else ["-m", f"benchmarks.{name}"]
    return [sys.executable, *target, *args]


def _env(home: Path) -> dict[str, str]:
    """The test's environment with every state and scratch folder under `home`, one torch thread."""
    env = {**os.environ, "PATCHLINE_HOME": str(home / "patchline"), "TMPDIR": str(home),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("PREFECT_HOME", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def _run(command: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, ...], Future]]:
    """Futures of the subprocesses of every selected test of this module, all started at once."""
    selected: list[tuple[str, ...]] = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is not request.module or callspec is None:
            continue
        if item.originalname == "test_help_in_both_forms":
            selected.append(("help", callspec.params["name"], callspec.params["form"]))
        elif item.originalname == "test_tiny_run_ends_with_its_summary_line":
            selected.append(("tiny", callspec.params["name"]))
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        futures: dict[tuple[str, ...], Future] = {}
        # The longest runs first, so the pool ends about when its last help finishes.
        for key in sorted(selected, key=lambda key: key[0] != "tiny"):
            home = tmp_path_factory.mktemp("-".join(key))
            if key[0] == "help":
                command = _command(key[1], key[2], "--help")
            else:
                args = TINY_RUNS[key[1]][0] + (["--root", str(home)] if key[1] == "out_of_core" else [])
                command = _command(key[1], "module", *args)
            futures[key] = pool.submit(_run, command, home)
        yield futures
        for future in futures.values():
            future.cancel()


def test_every_benchmark_file_is_a_script_or_a_known_helper() -> None:
    files = {path.stem for path in BENCHMARKS.glob("*.py")}
    assert {"coreset", "elpv", "oesdn", "throughput"} <= set(SCRIPTS)
    # A new file is either a script (and so covered below) or must be added to HELPERS.
    assert files - HELPERS == set(SCRIPTS), f"files without a __main__ guard that are not known helpers: " \
                                            f"{sorted(files - HELPERS - set(SCRIPTS))}"
    assert not HELPERS & set(SCRIPTS), f"helpers with a __main__ guard: {sorted(HELPERS & set(SCRIPTS))}"
    for name in SCRIPTS:
        source = (BENCHMARKS / f"{name}.py").read_text()
        assert "argparse.ArgumentParser(" in source and "def main()" in source, \
            f"benchmarks/{name}.py has no argparse main"


def test_every_script_is_run_tiny_or_says_why_not() -> None:
    assert not set(TINY_RUNS) & set(NOT_RUN_HERE)
    assert set(TINY_RUNS) | set(NOT_RUN_HERE) == set(SCRIPTS), \
        f"scripts to add to TINY_RUNS or NOT_RUN_HERE: {sorted(set(SCRIPTS) - set(TINY_RUNS) - set(NOT_RUN_HERE))}"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SCRIPTS)
def test_help_in_both_forms(name: str, form: str, runs: dict[tuple[str, ...], Future]) -> None:
    result = runs["help", name, form].result()
    shown = " ".join(_command(name, form, "--help")[1:])
    assert result.returncode == 0, f"python {shown} exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert "usage:" in result.stdout, f"python {shown} printed no usage:\n{result.stdout[-2000:]}"


@pytest.mark.parametrize("name", sorted(TINY_RUNS))
def test_tiny_run_ends_with_its_summary_line(name: str, runs: dict[tuple[str, ...], Future]) -> None:
    args, prefix, keys = TINY_RUNS[name]
    result = runs["tiny", name].result()
    assert result.returncode == 0, f"benchmarks/{name}.py {' '.join(args)} exited {result.returncode}:\n" \
                                   f"{result.stderr[-3000:]}"
    last = result.stdout.strip().splitlines()[-1]
    first, *pairs = last.split()
    assert first == prefix, last
    fields = dict(pair.split("=", 1) for pair in pairs)
    assert list(fields) == list(keys), last
    numbers = {key: float(value) for key, value in fields.items() if key not in ("data", "device", "line")}
    assert all(math.isfinite(value) and value >= 0 for value in numbers.values()), last
    if name == "coreset":
        assert fields["data"] == "clustered" and numbers["n"] == 2000 and numbers["dim"] == 16, last
        # Greedy k-center covers clustered rows better than a random sample of the same size.
        assert 0 < numbers["radius_ratio"] < numbers["random_radius_ratio"], last
    elif name == "out_of_core":
        assert 0 < numbers["radius_ratio_vs_sample"] < 1 and numbers["peak_rss_gb"] > 0, last
    elif name == "bank_size":
        assert fields["line"] == "elpv-mono" and numbers["ratio"] == 0.02 and numbers["rows"] > 0, last
        assert numbers["auroc"] <= 1 and numbers["max_rel_diff"] <= 1e-6, last
    elif name == "poison":
        assert fields["line"] == "elpv-mono" and numbers["levels"] == 1, last
        assert all(numbers[key] <= 1 for key in ("quarantine_recall", "false_quarantine", "auroc_screened")), last
        assert "level 10% (3 cells) screened: " in result.stdout, result.stdout
    else:
        assert fields["device"] in ("cpu", "cuda", "mps"), last
        assert numbers["extract_img_s"] > 0 and numbers["score_img_s"] > 0, last

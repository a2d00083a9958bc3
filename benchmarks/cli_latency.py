"""How long the commands a watcher types take, each a fresh `patchline` process (issue 33).

    python -m benchmarks.cli_latency [--repeats 3] [--keep]

Under a fresh temporary PATCHLINE_HOME (deleted afterwards): three small lines of real ELPV cells (12 good
training cells, 6 good and 6 cracked test cells each, 64 px, PatchCore alone) are built by one
`patchline nightly`; then `patchline ui` is started, as a watcher has it running, and each command is
timed `--repeats` times (the median is reported), wall clock from process start to exit:
- `skip_s`: `patchline rebuild LINE` of an unchanged line (the nightly's usual case), which runs its flow on
  the running UI's Prefect API;
- `promote_s`: `patchline promote LINE 1`, which touches the registry only;
- `status_s`: `patchline status` of the three lines.
With the UI stopped, the same skipped rebuild starts a Prefect API of its own: printed as `skip_without_ui_s`
on the line before the summary.

Ends with one line:
    cli_latency skip_s=<s> promote_s=<s> status_s=<s>
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LINES = ("latency-a", "latency-b", "latency-c")


def write_line(root: Path, name: str, offset: int) -> Path:
    """A small line of real mono ELPV cells in the MVTec layout, and its config file."""
    import numpy as np
    import yaml
    from PIL import Image

    from patchline.storage.sources.elpv import elpv_arrays

    images, levels, types = elpv_arrays()
    good = np.flatnonzero((levels == 0) & (types == "mono"))[offset:offset + 18]
    bad = np.flatnonzero((levels == 3) & (types == "mono"))[offset:offset + 6]
    folder = root / name
    for split, indices in (("train/good", good[:12]), ("test/good", good[12:]), ("test/crack", bad)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for index in indices:
            Image.fromarray(images[index]).save(folder / split / f"{index}.png")
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "name": name, "source": {"kind": "mvtec", "root": str(folder)}, "image_size": 64,
        "patchcore": {"coreset_ratio": 0.1}, "evaluation": {"calibration_fraction": 0.25, "detectors": ["patchcore"]},
        "promotion": {"min_test_images": 0}}))
    return config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed(command: list[str], env: dict[str, str], repeats: int, expect: str) -> tuple[float, str]:
    """Median wall seconds of `repeats` runs of `command`, and the last run's output (which must hold `expect`)."""
    seconds, output = [], ""
    for _ in range(repeats):
        began = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        seconds.append(time.perf_counter() - began)
        output = done.stdout + done.stderr
        if done.returncode != 0 or expect not in output:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode} without {expect!r}:\n{output[-3000:]}")
    return statistics.median(seconds), output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command; the median is reported")
    parser.add_argument("--keep", action="store_true", help="keep the temporary PATCHLINE_HOME and print its path")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="patchline-cli-latency-"))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env["PATCHLINE_HOME"] = str(home / "home")
    cli = [sys.executable, "-m", "patchline"]
    ui = None
    try:
        configs = [str(write_line(home, name, 30 * i)) for i, name in enumerate(LINES)]
        built = subprocess.run([*cli, "nightly", *configs], env=env, capture_output=True, text=True, timeout=1800)
        if built.returncode != 0:
            raise RuntimeError(f"the first nightly failed:\n{built.stdout[-2000:]}\n{built.stderr[-3000:]}")
        print(f"three lines built under {home}", file=sys.stderr)
        ui = subprocess.Popen([*cli, "ui", "--prefect-port", str(free_port()), "--mlflow-port", str(free_port())], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in ui.stdout:
            if line.startswith("Ctrl-C"):
                break
        skip_s, _ = timed([*cli, "rebuild", configs[0]], env, args.repeats, "unchanged since v1")
        promote_s, _ = timed([*cli, "promote", configs[0], "1"], env, args.repeats, "champion is now v1")
        status_s, shown = timed([*cli, "status", *configs], env, args.repeats, "latency-c")
        print(shown, file=sys.stderr)
        ui.terminate()
        ui.wait(timeout=60)
        ui = None
        cold_s, _ = timed([*cli, "rebuild", configs[0]], env, 1, "unchanged since v1")
    finally:
        if ui is not None:
            ui.terminate()
            ui.wait(timeout=60)
        if args.keep:
            print(f"kept {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)
    print(f"skip_without_ui_s={cold_s:.1f}")
    print(f"cli_latency skip_s={skip_s:.1f} promote_s={promote_s:.1f} status_s={status_s:.1f}")


if __name__ == "__main__":
    main()

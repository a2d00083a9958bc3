"""Defective cells dropped into a champion's `train/good/`: rebuilt with and without the screen (issue 32).

    nice python -m benchmarks.poison [--line elpv-mono] [--levels 0.02,0.05,0.1,0.2] [--limit N]
                                     [--new-share 0.2] [--set FIELD=VALUE ...] [--keep]

Under a fresh temporary PATCHLINE_HOME (deleted afterwards), the line's ELPV cells are written as an
MVTec-layout folder and rebuilt with the line's model settings (`--set` overrides them):
- the poison pool: cracked cells (probability 1), as many as the largest level needs, drawn at random and
  left out of the test split, which keeps the other cracked cells and the test normals (the published
  protocol tests on every cracked cell; this one cannot, since the poison must be cells it does not test on);
- v1, the clean champion, is built on `1 - new_share` of the train normals; `champion_detection_rate` is the
  share of the test defects it flags at its threshold (its deciding detector, 1 - miss rate);
- the clean rebuild adds the other `new_share` of the train normals (the nightly's new good images):
  `auroc_clean`;
- each level adds, beside those new normals, that share of the train set in poison cells to `train/good/`
  and rebuilds twice, each time from champion v1 (put back with `patchline promote` before each rebuild):
  unscreened (every image fitted on) and screened. A challenger fitted on at least one poison cell that the
  gate promotes counts in `promoted_unscreened` / `promoted_screened`.
- a first build has no champion to screen with: a second line is built on the base normals, the new ones and
  the largest level's poison, and the training images it reports as unlike the rest (leave one image out,
  models/patchcore/outliers.py) are counted; it is rebuilt without them, to see whether leaving them out
  would help (printed before the summary, not in it).
AUROCs are image AUROC of the deciding detector on the test split; `auroc_screened` and
`auroc_unscreened` are the lowest over the levels. `quarantine_recall` is the share of the poison cells
that the screen quarantined over every level, `false_quarantine` the share of the new normals it did.

Ends with one line:
    poison line=<l> levels=<n> quarantine_recall=<r> champion_detection_rate=<d> false_quarantine=<f> auroc_clean=<a> auroc_screened=<b> auroc_unscreened=<c> promoted_unscreened=<n> promoted_screened=<m>
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.overrides import apply_settings  # noqa: E402
from patchline.models.config import LineConfig, MvtecSource  # noqa: E402
from patchline.storage.line_config import load_line  # noqa: E402


def split_cells(config: LineConfig, limit: int | None, new_share: float, poison_count: int,
                seed: int) -> dict[str, list[str]]:
    """The line's ELPV cells ("elpv:<index>") by role: base and new train normals, test normals, test
    defects and the poison pool."""
    from patchline.storage.sources.elpv import elpv_rows

    if config.source.kind != "elpv":
        raise ValueError(f"line {config.name!r} reads a {config.source.kind} source; this benchmark is for ELPV lines")
    rows = elpv_rows(config.source.model_copy(update={"limit_per_class": limit}))
    rng = np.random.default_rng(seed)
    train = [row.source for row in rows if row.split == "train"]
    defects = [row.source for row in rows if row.label == "anomaly"]
    if poison_count >= len(defects):
        raise ValueError(f"the levels need {poison_count} poison cells but the line has only {len(defects)} "
                         "cracked cells; use lower --levels or a larger --limit")
    train = [train[i] for i in rng.permutation(len(train))]
    defects = [defects[i] for i in rng.permutation(len(defects))]
    new = max(1, round(new_share * len(train)))
    return {"base": train[new:], "new": train[:new], "test_good": [r.source for r in rows if r.split == "test" and
                                                                  r.label == "good"],
            "test_defect": defects[poison_count:], "poison": defects[:poison_count]}


def write_cells(folder: Path, sources: list[str]) -> list[Path]:
    from patchline.storage.pixels import read_pixels

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sources:
        path = folder / f"{source.replace(':', '_')}.png"
        Image.fromarray(read_pixels(source)[:, :, 0]).save(path)
        paths.append(path)
    return paths


def first_build_report(config: LineConfig, good: Path, poison: list[str], rebuild) -> str:
    """A first version built on the normals and the poison: how many of each it reports as unlike the rest,
    and its AUROC with and without the reported images."""
    first = config.model_copy(update={"name": f"{config.name}-first"})
    poisoned = {str(path) for path in write_cells(good, poison)}
    built = rebuild(first)
    flagged = {path for path, _ in built.screening.unlike.images}
    normals = {str(path) for path in good.iterdir()} - poisoned
    moved = good.parent / "reported"
    moved.mkdir()
    for path in flagged:
        Path(path).rename(moved / Path(path).name)
    without = rebuild(first, force=True, screen=False)
    before = built.image_auroc[built.decision_detector]
    after = without.image_auroc[built.decision_detector]
    return (f"first build on {len(normals)} normals and {len(poisoned)} poison cells: reported {len(flagged & poisoned)}"
            f"/{len(poisoned)} poison and {len(flagged & normals)}/{len(normals)} normals as unlike the rest; "
            f"auroc {before:.4f} with them, {after:.4f} without")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--line", default="elpv-mono", help="bundled ELPV line (elpv, elpv-mono, elpv-poly) or a config path")
    parser.add_argument("--levels", default="0.02,0.05,0.1,0.2",
                        help="poison shares of the train set, comma-separated (default 0.02,0.05,0.1,0.2)")
    parser.add_argument("--limit", type=int, help="read at most this many cells per class (default: all)")
    parser.add_argument("--new-share", type=float, default=0.2,
                        help="share of the train normals held back from v1 and added as new good images (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws of poison and new cells")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a line-config field (YAML value), e.g. --set image_size=128")
    parser.add_argument("--keep", action="store_true", help="keep the temporary PATCHLINE_HOME and print its path")
    args = parser.parse_args()
    levels = [float(level) for level in args.levels.split(",")]
    if not levels or not all(0 < level < 1 for level in levels) or not 0 < args.new_share < 1:
        parser.error("--levels and --new-share must lie in (0, 1)")
    bundled = load_line(args.line)
    bundled = LineConfig.model_validate(apply_settings(bundled.model_dump(), args.set))
    unpoisoned = split_cells(bundled, args.limit, args.new_share, 0, args.seed)
    train_size = len(unpoisoned["base"]) + len(unpoisoned["new"])
    counts = [max(1, round(level * train_size)) for level in levels]
    cells = split_cells(bundled, args.limit, args.new_share, max(counts), args.seed)

    home = Path(tempfile.mkdtemp(prefix="patchline-poison-benchmark-"))
    os.environ["PATCHLINE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from patchline.storage.paths import configure_environment
    configure_environment()
    # Prefect and the flow are imported only now, so they pick up the temporary home.
    from patchline.flows.rebuild import rebuild_product_line
    from patchline.storage.registry import champion_version, promote
    from patchline.storage.tracking import configure_mlflow

    root = home / "line"
    good = root / "train" / "good"
    write_cells(good, cells["base"])
    write_cells(root / "test" / "good", cells["test_good"])
    write_cells(root / "test" / "crack", cells["test_defect"])
    config = bundled.model_copy(update={"source": MvtecSource(root=root)})
    print(f"line {config.name}: {len(cells['base'])} + {len(cells['new'])} train normals, poison levels "
          f"{levels} ({counts} cells), test {len(cells['test_good'])} good + {len(cells['test_defect'])} "
          f"cracked; PATCHLINE_HOME {home}", file=sys.stderr)

    def rebuilt(label: str, **options) -> dict:
        promote(client, config.name, "1", f"benchmark: {label} starts from the clean champion v1")
        result = rebuild_product_line(config, force=True, **options)
        print(f"{label}: version {result.version}, promoted {result.promoted}: {result.reason}",
              file=sys.stderr)
        return result

    try:
        first = rebuild_product_line(config)
        client = configure_mlflow()
        metrics = client.get_run(first.run_id).data.metrics
        detection_rate = 1 - metrics["miss_rate_at_threshold"]
        new_paths = {str(path) for path in write_cells(good, cells["new"])}
        clean = rebuilt("clean", screen=False)
        auroc = {"clean": clean.image_auroc[clean.decision_detector]}
        caught = wrongly = poisoned_total = 0
        promoted = {"screened": 0, "unscreened": 0}
        lowest = {"screened": 1.0, "unscreened": 1.0}
        for level, count in zip(levels, counts):
            poison = {str(path) for path in write_cells(good, cells["poison"][:count])}
            for mode in ("unscreened", "screened"):
                result = rebuilt(f"{level:.0%} {mode}", screen=mode == "screened")
                value = result.image_auroc[result.decision_detector]
                lowest[mode] = min(lowest[mode], value)
                quarantined = {item.path for item in result.screening.quarantined}
                leaked = len(poison - quarantined)
                promoted[mode] += bool(result.promoted and leaked)
                after = client.get_run(result.run_id).data.metrics
                line = (f"level {level:.0%} ({count} cells) {mode}: auroc {value:.4f} (clean {auroc['clean']:.4f}), "
                        f"miss rate {after['miss_rate_at_threshold']:.4f} (v1 {metrics['miss_rate_at_threshold']:.4f}), "
                        f"promoted {result.promoted}")
                if mode == "screened":
                    caught += len(quarantined & poison)
                    wrongly += len(quarantined & new_paths)
                    poisoned_total += count
                    line += f", quarantined {len(quarantined & poison)}/{count} poison and {len(quarantined & new_paths)}/{len(new_paths)} new normals"
                print(line)
            for path in poison:
                Path(path).unlink()
        if champion_version(client, config.name) is None:
            raise RuntimeError("the line lost its champion")
        print(first_build_report(config, good, cells["poison"][:max(counts)], rebuild_product_line))
    finally:
        if args.keep:
            print(f"kept {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)
    print(f"poison line={config.name} levels={len(levels)} quarantine_recall={caught / poisoned_total:.4f} "
          f"champion_detection_rate={detection_rate:.4f} false_quarantine={wrongly / (len(new_paths) * len(levels)):.4f} "
          f"auroc_clean={auroc['clean']:.4f} auroc_screened={lowest['screened']:.4f} "
          f"auroc_unscreened={lowest['unscreened']:.4f} promoted_unscreened={promoted['unscreened']} "
          f"promoted_screened={promoted['screened']}")


if __name__ == "__main__":
    main()

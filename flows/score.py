"""Batch scoring with a line's champion model: a CSV of decisions and heat-map PNGs."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from patchline.tasks.run_logs import quiet_completed_states
from patchline.tasks.scoring import load_champion_task, read_images_task, score_batch_task, write_scores_task

quiet_completed_states()


@flow(name="score-images", flow_run_name="score-{line}")
def score_images(line: str, inputs: list[str], out: str, batch_size: int = 16, recursive: bool = False) -> str:
    """Score image files (or folders of them) with the line's champion version; returns the CSV path.

    Every path given or found in a given folder (and its subfolders with `recursive`) gets one CSV row:
    its scores, or the reason it was not scored."""
    champion = load_champion_task(line)
    read = read_images_task(inputs, recursive)
    out_dir = Path(out)
    rows = [{"index": item.index, "path": str(item.path), "error": reason, "model_version": champion.version}
            for item, reason in read.unreadable]
    for start in range(0, len(read.images), batch_size):
        rows += score_batch_task(champion, read.images[start:start + batch_size], out_dir)
    csv_path = write_scores_task(rows, out_dir)
    get_run_logger().info("scored %d images with %s v%s on %s → %s", len(read.images), line, champion.version,
                          champion.runtime, csv_path)
    return str(csv_path)

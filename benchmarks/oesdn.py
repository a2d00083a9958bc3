"""OE-SDN against its baselines: the AE (L2 and SSIM residuals) and the SDN without outlier exposure.

    python benchmarks/oesdn.py --protocol digits [--split val] [--seeds 0 1 2]
    python benchmarks/oesdn.py --protocol digits --image-size 64 --defaults
    python benchmarks/oesdn.py --protocol texture|objects [--split val] [--defaults] [--self-check]
    python benchmarks/oesdn.py --line elpv-mono
    python benchmarks/oesdn.py --protocol digits|texture|objects [--image-size 64] --survey
    (each also as python -m benchmarks.oesdn ...; --set FIELD=VALUE overrides an OeSdnConfig field)

digits: scikit-learn's 8×8 digits, each class in turn the only normal class (the paper's one-class
protocol); --image-size scales them up as a user's folder of them would hold them. texture:
scikit-image's brick, grass and gravel photographs, good 64 px crops to train on, test crops with
painted scratches, blobs and transplanted patches (exact masks). objects: scikit-image's coffee, chelsea
and rocket colour photographs, 128 px shots of each (framing, exposure and noise drawn per shot), test
shots with painted defects. --line: a bundled ELPV line on its published split. --defaults trains at
the settings `patchline init-line` writes for the case's training images (storage/line_survey.py)
instead of the protocol's own. Every case trains once per seed (the network seed; the data split is
fixed); each per-seed line is printed, then one line of means over the seeds:
    oesdn protocol=digits auroc_ae=<a> auroc_ae_ssim=<b> auroc_sdn=<c> auroc_oesdn=<d> train_s=<s>
    oesdn protocol=texture auroc_ae=... auroc_sdn=... auroc_oesdn=... pixel_auroc_ae=... pixel_auroc_sdn=...
          pixel_auroc_oesdn=... aupro_ae=... aupro_oesdn=... train_s=<s>
    oesdn protocol=objects ... (the texture line's fields)
    oesdn line=<line> auroc_ae=... auroc_ae_ssim=... auroc_sdn=... auroc_oesdn=... train_s=<s>
and with --defaults each line ends with defaults=init-line. --self-check adds to each per-case line, after
train_s, the self-check a line runs (models/scoring/self_check.py) of the AE and OE-SDN on the case's
validation goods (for --line: the goods a rebuild of the line holds out, then not trained on) and
painted copies of them, and the detectors it leaves out of the line:
    ... train_s=<s> selfcheck_ae=<a> selfcheck_oesdn=<b> left_out=<ae,oesdn|none> defaults=init-line
Settings are chosen with --split val (the protocols' validation images); the test split is the default.
--survey trains nothing and prints, per case, what init-line reads in its training images and writes:
    survey protocol=digits image_size=64 case=digit-0 contrast_lost_16=<a> contrast_lost_32=<b>
           oesdn_image_size=16 smoothing_sigma=1
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.oesdn_protocols import (  # noqa: E402
    OBJECTS, TEXTURES, Protocol, Split, digits_protocols, object_protocol, texture_protocol)
from benchmarks.overrides import apply_settings  # noqa: E402
from patchline.models.config import ElpvSource, EvaluationConfig, LineConfig, MvtecSource, OeSdnConfig  # noqa: E402
from patchline.models.detectors import DETECTORS as DETECTORS_BY_NAME  # noqa: E402
from patchline.models.images import pick_device  # noqa: E402
from patchline.models.oesdn.scoring import score_autoencoder, score_oesdn  # noqa: E402
from patchline.models.oesdn.training import train_autoencoder, train_sdn  # noqa: E402
from patchline.models.scoring.detection import Detections  # noqa: E402
from patchline.models.scoring.metrics import aupro, image_auroc, pixel_auroc  # noqa: E402
from patchline.models.scoring.self_check import judge_self_check, painted_copies  # noqa: E402
from patchline.storage.line_config import load_line  # noqa: E402
from patchline.storage.line_survey import LineSurvey, contrast_lost, detail_sample, fitted_config  # noqa: E402
from patchline.storage.manifest import hold_out_calibration  # noqa: E402
from patchline.storage.sources.elpv import SOURCE_PREFIX, elpv_arrays, elpv_rows  # noqa: E402

logger = logging.getLogger("benchmarks.oesdn")
DETECTORS = ("ae", "ae_ssim", "sdn", "oesdn")
# The protocols' networks, chosen on their validation splits (benchmarks/README.md, section OE-SDN).
PROTOCOL_CONFIGS = {
    "digits": OeSdnConfig(image_size=16, ae_base_width=16, ae_latent_dim=16, sdn_base_width=32, sdn_depth=2,
                          epochs=80, sdn_epochs=80, smoothing_sigma=0.0, image_score="mean"),
    "texture": OeSdnConfig(image_size=64, epochs=40, sdn_epochs=40),
    "objects": OeSdnConfig(channels=3),
}
# The protocols whose test images have masks: pixel AUROC and AUPRO are reported for them.
MASKED = ("texture", "objects")


def elpv_protocol(line_name: str, hold_out: bool = False) -> tuple[Protocol, OeSdnConfig]:
    """A bundled ELPV line's published split (train goods; test goods and anomalies) and its OE-SDN config.
    With `hold_out`, the goods a rebuild of the line holds out for calibration are not trained on: they are
    the protocol's validation split (goods only), for the self-check."""
    line = load_line(line_name)
    if not isinstance(line.source, ElpvSource):
        raise ValueError(f"line {line.name!r}: this benchmark reads the bundled ELPV set, got a {line.source.kind} source")
    images, _, _ = elpv_arrays()
    rows = elpv_rows(line.source)
    pixels = {row.source: images[int(row.source.removeprefix(SOURCE_PREFIX))] for row in rows}
    train_rows = [row for row in rows if row.split == "train"]
    held: list = []
    if hold_out:
        train_rows, held = hold_out_calibration(train_rows, line.evaluation.calibration_fraction)
    train = [pixels[row.source] for row in train_rows]
    test_rows = [row for row in rows if row.split == "test" and row.label in ("good", "anomaly")]
    test = Split([pixels[row.source] for row in test_rows], np.array([row.label == "anomaly" for row in test_rows], int))
    val = Split([pixels[row.source] for row in held], np.zeros(len(held), int)) if hold_out else test
    return Protocol(line.name, train, val, test), line.oesdn


def init_line_survey(protocol: Protocol) -> LineSurvey:
    """What `patchline init-line` would find in a folder of `protocol`'s images."""
    train, test = protocol.train, protocol.test
    short = sorted(min(image.shape[:2]) for image in train)
    sizes = sorted(((image.shape[1], image.shape[0]) for image in [*train, *test.images]), key=lambda s: s[0] * s[1])
    defective = int(test.labels.sum())
    # The networks fit every training image of a protocol (no calibration images are held out here).
    return LineSurvey(len(train), len(train), (short[0], short[len(short) // 2], short[-1]), (sizes[0], sizes[-1]),
                      any(image.ndim == 3 for image in train), 8, defective,
                      0 if test.masks is None else defective, contrast_lost(detail_sample(train)))


def init_line_settings(protocol: Protocol, survey: LineSurvey | None = None) -> OeSdnConfig:
    """The OE-SDN settings `patchline init-line` writes for a folder of `protocol`'s images (`survey` of them)."""
    config, _ = fitted_config(LineConfig(name="benchmark", source=MvtecSource(root=Path("."))),
                              survey or init_line_survey(protocol))
    return config.oesdn


def survey_line(label: str, protocol: Protocol) -> str:
    """One line of what init-line reads in `protocol`'s training images and the networks' size and σ it writes."""
    survey = init_line_survey(protocol)
    lost = "".join(f" contrast_lost_{size}={share:.4f}" for size, share in survey.contrast_lost)
    config = init_line_settings(protocol, survey)
    return (f"survey {label} case={protocol.name}{lost} oesdn_image_size={config.image_size} "
            f"smoothing_sigma={config.smoothing_sigma:g}")


def run_case(protocol: Protocol, config: OeSdnConfig, split: str, device: torch.device,
             self_check: bool = False) -> dict[str, float | str]:
    """Train the AE, the SDN and OE-SDN on `protocol.train`; every detector's metrics on `split` and the time.
    With `self_check`, also the line's self-check of the AE and OE-SDN (models/scoring/self_check.py) on
    the validation split's good images, which no network fitted, and which of them it leaves out."""
    started = time.perf_counter()
    autoencoder, _ = train_autoencoder(protocol.train, config, device)
    sdn, _ = train_sdn(protocol.train, autoencoder, config, oe_lambda=0.0, device=device)
    oesdn, _ = train_sdn(protocol.train, autoencoder, config, device=device)
    train_s = time.perf_counter() - started
    data = protocol.val if split == "val" else protocol.test
    found: dict[str, Detections] = {
        "ae": score_autoencoder(autoencoder, data.images, config, "l2"),
        "ae_ssim": score_autoencoder(autoencoder, data.images, config, "ssim"),
        "sdn": score_oesdn(autoencoder, sdn, data.images, config),
        "oesdn": score_oesdn(autoencoder, oesdn, data.images, config),
    }
    metrics = {"train_s": train_s}
    masks = None if data.masks is None else _masks_at(data.masks, config.image_size)
    for name, detections in found.items():
        metrics[f"auroc_{name}"] = image_auroc(detections.scores, data.labels)
        if masks is not None:
            metrics[f"pixel_auroc_{name}"] = pixel_auroc(detections.maps, masks)
            metrics[f"aupro_{name}"] = aupro(detections.maps, masks)
    if self_check:
        metrics.update(_self_check(protocol, autoencoder, oesdn, config))
    return metrics


def _self_check(protocol: Protocol, autoencoder, oesdn, config: OeSdnConfig) -> dict[str, float | str]:
    """The self-check a line with the default detectors runs on its held-out goods, here the validation goods."""
    goods = [image for image, label in zip(protocol.val.images, protocol.val.labels) if not label]
    painted = painted_copies(goods, config.seed)
    score = {"ae": lambda images: score_autoencoder(autoencoder, images, config, "l2").scores,
             "oesdn": lambda images: score_oesdn(autoencoder, oesdn, images, config).scores}
    line = EvaluationConfig()
    check = judge_self_check({name: fn(goods) for name, fn in score.items()},
                             {name: fn(painted) for name, fn in score.items()},
                             line.self_check_min_auroc, line.detectors, {"oesdn": DETECTORS_BY_NAME["oesdn"].after},
                             line.self_check_max_gap)
    return {**{f"selfcheck_{name}": auroc for name, auroc in check.aurocs.items()},
            "left_out": ",".join(sorted(check.left_out)) or "none"}


Job = tuple[Protocol, OeSdnConfig, int, str, torch.device, int | None, bool]


def _run_job(job: Job) -> dict[str, float | str]:
    protocol, config, seed, split, device, threads, self_check = job
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if threads:
        torch.set_num_threads(threads)
    return run_case(protocol, config.model_copy(update={"seed": seed}), split, device, self_check)


def _masks_at(masks: np.ndarray, size: int) -> np.ndarray:
    if masks.shape[1:] == (size, size):
        return masks
    resized = torch.nn.functional.interpolate(torch.from_numpy(masks[:, None].astype(np.float32)), size=(size, size))
    return resized[:, 0].numpy() > 0.5


def summary(label: str, metrics: dict[str, float | str], keys: list[str], defaults: bool) -> str:
    checked = "".join(f" {key}={metrics[key]:.4f}" for key in ("selfcheck_ae", "selfcheck_oesdn") if key in metrics)
    checked += f" left_out={metrics['left_out']}" if "left_out" in metrics else ""
    return (f"oesdn {label} " + " ".join(f"{key}={metrics[key]:.4f}" for key in keys)
            + f" train_s={metrics['train_s']:.0f}{checked}" + (" defaults=init-line" if defaults else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--protocol", choices=sorted(PROTOCOL_CONFIGS))
    chosen.add_argument("--line", help="a bundled ELPV line (elpv, elpv-mono, elpv-poly)")
    parser.add_argument("--split", choices=("val", "test"), default="test",
                        help="the protocols' validation images (to choose settings on) or their test images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="network seeds")
    parser.add_argument("--cases", nargs="+", help="only these cases (digits 0-9, texture or object names)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an OeSdnConfig field (YAML value), e.g. --set sdn_depth=3")
    parser.add_argument("--image-size", type=int, help="digits only: scale the 8 × 8 digits up to this many px")
    parser.add_argument("--defaults", action="store_true",
                        help="train at the settings init-line writes for each case's images (--set still applies)")
    parser.add_argument("--self-check", action="store_true",
                        help="also run each case's self-check on its validation goods (per-case lines); with "
                             "--line, on the goods a rebuild holds out, which then are not trained on")
    parser.add_argument("--survey", action="store_true",
                        help="train nothing: print, per case, how much contrast its training images lose at the "
                             "networks' smaller sizes and the size and smoothing init-line writes from that")
    parser.add_argument("--threads", type=int, help="torch CPU threads (of each job)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cases and seeds trained side by side in this many processes (use --threads 1 with it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.line:
        if args.split == "val":
            parser.error("--split val needs --protocol: an ELPV line has no labelled validation split")
        protocol, base = elpv_protocol(args.line, hold_out=args.self_check)
        cases, label = [protocol], f"line={protocol.name}"
    elif args.protocol == "digits":
        cases, base, label = digits_protocols(image_size=args.image_size), PROTOCOL_CONFIGS["digits"], "protocol=digits"
        label += f" image_size={args.image_size}" if args.image_size else ""
    elif args.protocol == "texture":
        cases, base, label = [texture_protocol(name) for name in TEXTURES], PROTOCOL_CONFIGS["texture"], "protocol=texture"
    else:
        cases, base, label = [object_protocol(name) for name in OBJECTS], PROTOCOL_CONFIGS["objects"], "protocol=objects"
    if args.image_size and args.protocol != "digits":
        parser.error("--image-size scales the digits; the texture and object crops have their own sizes")
    if args.cases:
        cases = [case for case in cases if case.name.removeprefix("digit-") in args.cases]
        if not cases:
            parser.error(f"--cases {args.cases} match no case of {label}")
    if args.survey:
        for case in cases:
            print(survey_line(label, case))
        return
    keys = [f"{metric}_{name}" for metric in ("auroc", "pixel_auroc", "aupro") for name in DETECTORS
            if metric == "auroc" or args.protocol in MASKED]
    # The closing line's fields, in the order the issue that asked for this benchmark (18) gave them.
    closing = (["auroc_ae", "auroc_sdn", "auroc_oesdn", "pixel_auroc_ae", "pixel_auroc_sdn", "pixel_auroc_oesdn",
                "aupro_ae", "aupro_oesdn"] if args.protocol in MASKED else keys)
    device = pick_device()
    configs = {case.name: OeSdnConfig.model_validate(apply_settings(
        (init_line_settings(case) if args.defaults else base).model_dump(), args.set)) for case in cases}
    for name, config in configs.items():
        logger.info("config of %s: %s", name, config.model_dump(exclude={"seed"}))
    jobs = [(case, configs[case.name], seed, args.split, device, args.threads, args.self_check)
            for seed in args.seeds for case in cases]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run_job, jobs))
    else:
        results = [_run_job(job) for job in jobs]
    per_seed = []
    for index, seed in enumerate(args.seeds):
        of_seed = dict(zip((case.name for case in cases), results[index * len(cases):(index + 1) * len(cases)]))
        for name, metrics in of_seed.items():
            print(summary(f"{label} case={name} seed={seed} split={args.split}", metrics, keys, args.defaults))
        per_seed.append({key: float(np.mean([r[key] for r in of_seed.values()])) for key in keys})
        per_seed[-1]["train_s"] = sum(r["train_s"] for r in of_seed.values())
        print(summary(f"{label} seed={seed} split={args.split} mean-over-cases", per_seed[-1], keys, args.defaults),
              flush=True)
    means = {key: float(np.mean([s[key] for s in per_seed])) for key in [*keys, "train_s"]}
    print(summary(label if args.split == "test" else f"{label} split=val", means, closing, args.defaults))


if __name__ == "__main__":
    main()

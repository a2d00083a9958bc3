"""Every MLflow tag name patchline writes or reads, in one place: runs, registered models and versions.

What a name means is said where it is written; the names live here so that no module spells one twice.
"""

from __future__ import annotations

# Run tags.
LINE_TAG = "patchline.line"
ERROR_TAG = "patchline.error"
SKIPPED_TAG = "patchline.skipped"
KILLED_TAG = "patchline.killed"
DATA_FINGERPRINT_TAG = "patchline.data_fingerprint"
MODEL_CONFIG_TAG = "patchline.model_config_fingerprint"
# Identity of a run's test set, so the gate only compares metrics measured on the same images.
TEST_FINGERPRINT_TAG = "patchline.test_fingerprint"
BEST_DETECTOR_TAG = "patchline.best_detector"
DECISION_DETECTOR_TAG = "patchline.decision_detector"
# Why that detector decides; when the rebuild chose it by its test AUROC, the tag says that figure is optimistic.
DECISION_REASON_TAG = "patchline.decision_detector.reason"
# `patchline.incremental` for the rebuild as a whole, `patchline.incremental.<detector>` for each detector.
REUSE_TAG = "patchline.incremental"
# `patchline.left_out.<detector>`: why the self-check (models/scoring/self_check.py) left it out of the decisions.
LEFT_OUT_TAG_PREFIX = "patchline.left_out."
# Two rebuilds of the same images and settings give the same bank on any Dask cluster: this tag shows it.
BANK_TAG = "patchline.memory_bank_digest"
# What a run's name says, as tags a run list can filter on (tasks/outcome.py).
OUTCOME_TAG = "patchline.outcome"
VERSION_TAG = "patchline.version"
FIGURE_TAG = "patchline.deciding_figure"

# Model version tags.
PROMOTED_AT_TAG = "patchline.promoted_at"
DECISION_TAG = "patchline.gate.decision"
REASON_TAG = "patchline.gate.reason"
APPROVAL_TAG = "patchline.approval"

# Registered model tags.
# Champions before the event record: a comma list of versions, read as the start of the timeline.
LEGACY_HISTORY_TAG = "patchline.champion_history"
# One tag per change of champion, keyed by time so the keys sort as the timeline.
EVENT_TAG_PREFIX = "patchline.champion_event."
# One tag per training image a reviewer accepted after the screen quarantined it.
ACCEPTED_TAG_PREFIX = "patchline.accepted."

# Experiment tags. MLflow 3's UI opens an experiment in its GenAI view (traces, prompts) unless this tag
# names model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

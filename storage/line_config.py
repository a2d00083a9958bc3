"""Product-line configs as YAML files under version control, read into `patchline.models.config.LineConfig`.

Flows take a `LineConfig` as their parameter so the Prefect UI shows it and MLflow logs it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import yaml
from pydantic import ValidationError

from patchline.models.config import LineConfig

# Bundled line configs live beside the deployments that schedule them, as package data (read as files,
# not imported, so storage does not depend on the deployments layer).
LINES_PACKAGE = "patchline.deployments"


class LineConfigError(ValueError):
    """A line name or config file that cannot be used, with the file and the reason."""


class _AliasRefused(yaml.YAMLError):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: a few lines of nested aliases (a "billion laughs" file) expand to a structure
    that validating walks for hours; a line config has no use for them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not accepted "
                                "in line configs; write the value out")
        return super().compose_node(parent, index)


def bundled_line_files() -> dict[str, Path]:
    """Configured line name → its YAML file, for the lines kept in the repo."""
    lines = Path(str(files(LINES_PACKAGE).joinpath("lines")))
    return {path.stem: path for path in sorted(lines.glob("*.yaml"))}


def load_line(name_or_path: str | Path) -> LineConfig:
    """A configured line's name or the path of a line config file → its validated `LineConfig`."""
    candidate = Path(name_or_path)
    bundled = bundled_line_files()
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        path = candidate
    elif str(name_or_path) in bundled:
        path = bundled[str(name_or_path)]
    else:
        known = ", ".join(bundled) or "none"
        raise LineConfigError(f"unknown product line {name_or_path!r}: not a config file and not one of {known}")
    if not path.is_file():
        raise LineConfigError(f"{path}: line config file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_NoAliasLoader)
    except _AliasRefused as refused:
        raise LineConfigError(f"{path}: {refused}") from None
    except yaml.YAMLError as error:
        raise LineConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise LineConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    if isinstance(raw.get("source"), dict) and raw["source"].get("kind") == "mvtec":
        root = Path(raw["source"].get("root", ""))
        # A relative data root is read from the config file's folder, so configs can travel with data.
        if not root.is_absolute():
            raw["source"]["root"] = str((path.parent / root).resolve())
    try:
        return LineConfig.model_validate(raw)
    except ValidationError as error:
        raise LineConfigError(f"{path}: invalid line config:\n{error}") from error


def save_line(config: LineConfig, path: Path) -> Path:
    """Write `config` as YAML that `load_line` reads back to an equal object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path

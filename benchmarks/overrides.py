"""`--set FIELD=VALUE` overrides of a config, shared by the benchmarks that sweep settings."""

from __future__ import annotations

from typing import Any

import yaml


def apply_settings(values: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    """`values` (a config's `model_dump()`) with each `FIELD=VALUE` applied in place and returned.

    FIELD may be dotted into nested sections (`patchcore.backbone`); VALUE is parsed as YAML, so
    `--set patchcore.layers=[3,5]` gives a list. An unknown field is an error naming the known ones.
    """
    for setting in settings:
        field, separator, value = setting.partition("=")
        *sections, name = field.split(".")
        target = values
        for section in sections:
            target = target.get(section) if isinstance(target, dict) else None
        if not separator or not isinstance(target, dict) or name not in target:
            known = ", ".join(sorted(target)) if isinstance(target, dict) else "none at that path"
            raise ValueError(f"--set expects FIELD=VALUE with FIELD one of {known}, got {setting!r}")
        target[name] = yaml.safe_load(value)
    return values

"""The `patchline` command line."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from storage.paths import configure_environment

configure_environment()

from storage.ingest import IngestError, build_manifest  # noqa: E402  (environment first)
from storage.line_config import (  # noqa: E402
    ElpvSource, LineConfig, LineConfigError, MvtecSource, bundled_line_files, load_line, save_line)
from storage.mvtec import MvtecLayoutError  # noqa: E402
from deployments.services import ServiceError, block_until_one_exits, running_uis  # noqa: E402

app = typer.Typer(help="Nightly anomaly-detection model rebuilds, one per product line.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

LineArg = Annotated[str, typer.Argument(help="A configured line's name or the path of a line config file.")]


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _load(line: str) -> LineConfig:
    try:
        return load_line(line)
    except LineConfigError as error:
        _fail(error)
        raise  # unreachable; keeps type checkers content


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command("lines")
def lines_command() -> None:
    """List the configured product lines."""
    for name, path in bundled_line_files().items():
        config = _load(str(path))
        source = config.source.kind
        if isinstance(config.source, ElpvSource) and config.source.cell_type:
            source += f" ({config.source.cell_type})"
        typer.echo(f"{name:<16} {source:<14} {config.image_size}px  {config.patchcore.backbone:<18} "
                   f"cron '{config.schedule.cron}' {config.schedule.timezone}")


@app.command("ingest")
def ingest_command(
    lines: Annotated[list[str] | None, typer.Argument(help="Lines to ingest (names or config files); default: all configured.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write each manifest as <out>/<line>.csv.")] = None,
) -> None:
    """Discover, decode and validate a line's images and print the manifest summary."""
    for line in lines or list(bundled_line_files()):
        config = _load(line)
        try:
            manifest = build_manifest(config)
        except (IngestError, MvtecLayoutError) as error:
            _fail(error)
        typer.echo(manifest.summary())
        if out is not None:
            typer.echo(f"  manifest written to {manifest.write_csv(out / f'{config.name}.csv')}")


@app.command("init-line")
def init_line_command(
    name: Annotated[str, typer.Argument(help="Name of the new product line (lowercase, digits, dashes).")],
    mvtec_root: Annotated[Path, typer.Option(help="Folder in the MVTec AD layout (train/good, test/<defect>, ground_truth).")],
    out: Annotated[Path | None, typer.Option(help="Where to write the config; default ./<name>.yaml.")] = None,
) -> None:
    """Write a line config with sensible defaults for an MVTec-layout folder of your own."""
    try:
        config = LineConfig(name=name, description=f"MVTec-layout data in {mvtec_root.resolve()}",
                            source=MvtecSource(root=mvtec_root.resolve()))
    except ValueError as error:
        _fail(error)
    if not (mvtec_root / "train" / "good").is_dir():
        _fail(MvtecLayoutError(f"{mvtec_root / 'train' / 'good'}: missing; expected the MVTec AD layout"))
    path = save_line(config, out or Path(f"{name}.yaml"))
    typer.echo(f"wrote {path}; try it with: patchline ingest {path}")


def _interrupt(signum: int, frame: object) -> None:
    # Further Ctrl-C presses must not cut the shutdown short and orphan a server (it is bounded anyway).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


@app.command("ui")
def ui_command(
    prefect_port: Annotated[int, typer.Option(help="Port of the Prefect UI and API.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
) -> None:
    """Start the Prefect and MLflow UIs on 127.0.0.1 with their data under PATCHLINE_HOME; Ctrl-C stops both."""
    # SIGTERM (`kill`, a service manager) takes the same clean path as Ctrl-C; SIGINT is set explicitly
    # because a shell that starts us in the background leaves it ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with running_uis(prefect_port, mlflow_port) as uis:
            typer.echo(f"Prefect UI: {uis.prefect.url}")
            typer.echo(f"MLflow UI:  {uis.mlflow.url}")
            typer.echo("Ctrl-C stops both.")
            block_until_one_exits(uis)
    except KeyboardInterrupt:
        typer.echo("Stopped the Prefect and MLflow servers.")
    except (ValueError, ServiceError) as error:
        _fail(error)

"""The `patchline` command line."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from patchline.models.config import ElpvSource, LineConfig, MvtecSource
from patchline.storage.image_files import max_image_pixels
from patchline.storage.ingest import IngestError, build_manifest
from patchline.storage.line_config import LineConfigError, bundled_line_files, load_line, save_line
from patchline.storage.line_survey import LineSurvey, fitted_config
from patchline.storage.paths import NotWritableError, configure_environment, ensure_writable, ensure_writable_home
from patchline.storage.sources.mvtec import MvtecLayoutError

if TYPE_CHECKING:
    from patchline.tasks.outcome import RebuildResult

# None of the imports above loads Prefect or MLflow (storage imports no Prefect; the commands import the
# flows when they run), so the environment they read is set before either is loaded.
configure_environment()

app = typer.Typer(help="Nightly anomaly-detection model rebuilds, one per product line.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

LineArg = Annotated[str, typer.Argument(help="A configured line's name or the path of a line config file.")]


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _require_home() -> None:
    """Commands that keep state check the home first: one line naming the folder, not a traceback later."""
    try:
        ensure_writable_home()
    except NotWritableError as error:
        _fail(error)


def _require_writable(folder: Path, option: str) -> None:
    try:
        ensure_writable(folder, option, "choose a folder you can write")
    except NotWritableError as error:
        _fail(error)


def _load(line: str) -> LineConfig:
    try:
        return load_line(line)
    except LineConfigError as error:
        _fail(error)
        raise  # unreachable; keeps type checkers content


def _load_all(lines: list[str] | None) -> list[LineConfig]:
    """The given lines (names or config files), or every bundled line."""
    return [_load(line) for line in lines or [str(path) for path in bundled_line_files().values()]]


class _RunMessagesOnly(logging.Filter):
    """The console without -v: patchline's own lines and every warning, not third-party INFO chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or record.name.startswith("patchline"):
            return True
        # Prefect's run loggers carry the tasks' own lines (their "Finished in state Completed()" lines are
        # dropped at the source, tasks/run_logs.py).
        return record.name in ("prefect.flow_runs", "prefect.task_runs")


def _raised_on_purpose(error: BaseException) -> bool:
    """An error patchline defines, or a ValueError its code raised: bad input or a bad setting, whose
    message says what is wrong, unlike a bug's."""
    if type(error).__module__.startswith("patchline."):
        return True
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return isinstance(error, ValueError) and frame is not None and \
        frame.tb_frame.f_globals.get("__name__", "").startswith("patchline.")


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _MessageOnlyForInputErrors(logging.Formatter):
    """Prefect logs a failed task's exception with its traceback; for bad input the message is the news."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.exc_info[1] is not None and _raised_on_purpose(record.exc_info[1]):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(record)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Debug logging, Prefect's, MLflow's and Dask's INFO lines included.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=_LOG_FORMAT)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_RunMessagesOnly())
            handler.setFormatter(_MessageOnlyForInputErrors(_LOG_FORMAT))
        # MLflow logs through a handler of its own (database migrations, artifact uploads), set up when
        # it is imported, at the level this variable names; `mlflow models serve` children inherit it.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    # One line per request to the local Prefect API would bury the run's own messages.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        max_image_pixels()  # a bad setting stops every command at once, not the first image read
    except ValueError as error:
        _fail(error)


@app.command("lines")
def lines_command(
    lines: Annotated[list[str] | None, typer.Argument(help="Lines to show (names or config files); default: all bundled.")] = None,
) -> None:
    """List product lines with their schedule and current champion."""
    _require_home()
    from patchline.storage.registry import champion_version
    from patchline.storage.tag_names import PROMOTED_AT_TAG
    from patchline.storage.tracking import configure_mlflow

    configs = _load_all(lines)
    client = configure_mlflow()
    for config in configs:
        name = config.name
        source = config.source.kind
        if isinstance(config.source, ElpvSource) and config.source.cell_type:
            source += f" ({config.source.cell_type})"
        typer.echo(f"{name:<16} {source:<14} {config.image_size}px  {config.patchcore.backbone:<18} "
                   f"cron '{config.schedule.cron}' {config.schedule.timezone}")
        champion = champion_version(client, name)
        if champion is None:
            typer.echo("    champion: none yet")
            continue
        metrics = client.get_run(champion.run_id).data.metrics
        shown = ", ".join(f"{key} {metrics[key]:.4f}" for key in ("image_auroc", "image_f1_max", "fpr_at_threshold")
                          if key in metrics)
        typer.echo(f"    champion: v{champion.version} ({shown}), promoted {champion.tags.get(PROMOTED_AT_TAG, '?')}")


@app.command("ingest")
def ingest_command(
    lines: Annotated[list[str] | None, typer.Argument(help="Lines to ingest (names or config files); default: all configured.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write each manifest as <out>/<line>.csv.")] = None,
) -> None:
    """Discover, decode and validate a line's images and print the manifest summary."""
    if out is not None:
        _require_writable(out, "--out")
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
    force: Annotated[bool, typer.Option(help="Overwrite the file if it exists.")] = False,
) -> None:
    """Write a line config with sensible defaults for an MVTec-layout folder of your own."""
    try:
        config = LineConfig(name=name, description=f"MVTec-layout data in {mvtec_root.resolve()}",
                            source=MvtecSource(root=mvtec_root.resolve()))
    except ValueError as error:
        _fail(error)
    if not (mvtec_root / "train" / "good").is_dir():
        _fail(MvtecLayoutError(f"{mvtec_root / 'train' / 'good'}: missing; expected the MVTec AD layout"))
    target = out or Path(f"{name}.yaml")
    _require_writable(target.resolve().parent, "--out")
    if target.exists() and not force:
        _fail(FileExistsError(f"{target} exists; it may hold your edits, so it is left as it is (--force "
                              "overwrites it)"))
    # Surveyed past bad files: `ingest` reports those, with the config this writes.
    try:
        survey = LineSurvey.of(build_manifest(config.model_copy(update={"on_bad_input": "skip"})),
                               config.evaluation.calibration_fraction)
    except (IngestError, MvtecLayoutError, ValueError) as error:
        typer.echo(f"the images could not be surveyed ({error}); the defaults are kept")
    else:
        config, reasons = fitted_config(config, survey)
        for reason in reasons:
            typer.echo(f"  {reason}")
    path = save_line(config, target)
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
    _require_home()
    from patchline.deployments.services import ServiceError, block_until_one_exits, running_uis
    from patchline.storage.tracking import MODEL_TRAINING_VIEW

    # SIGTERM (`kill`, a service manager) takes the same clean path as Ctrl-C; SIGINT is set explicitly
    # because a shell that starts us in the background leaves it ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with running_uis(prefect_port, mlflow_port) as uis:
            typer.echo(f"Prefect UI: {uis.prefect.url}")
            typer.echo(f"MLflow UI:  {uis.mlflow.url}/#/{MODEL_TRAINING_VIEW}")
            typer.echo("Ctrl-C stops both.")
            block_until_one_exits(uis.services)
    except KeyboardInterrupt:
        typer.echo("Stopped the Prefect and MLflow servers.")
    except (ValueError, ServiceError) as error:
        _fail(error)


@app.command("serve")
def serve_command(
    line: LineArg,
    port: Annotated[int, typer.Option(help="Port of the model's REST API.")] = 5001,
    version: Annotated[str | None, typer.Option(help="Model version to serve; default: the champion.")] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body; a larger one gets 413.")] = 32.0,
    max_request_pixels: Annotated[int, typer.Option(
        help="Decoded pixels one request's images may come to; more gets 413.")] = 40_000_000,
    max_concurrent: Annotated[int, typer.Option(help="Requests scored at once; one more gets 429.")] = 2,
    allow_path_root: Annotated[Path | None, typer.Option(
        help="Let requests name image files ({'path': [...]}) under this folder; off by default.")] = None,
) -> None:
    """Serve the line's champion over MLflow's REST API on 127.0.0.1 (POST /invocations), within limits;
    Ctrl-C stops it."""
    _require_home()
    from patchline.deployments.services import ServiceError, block_until_one_exits, serving_model
    from patchline.storage.serving import ServingLimits

    if min(max_body_mb, max_request_pixels, max_concurrent) <= 0:
        _fail(ValueError("--max-body-mb, --max-request-pixels and --max-concurrent must be above 0"))
    if allow_path_root is not None and not allow_path_root.is_dir():
        _fail(ValueError(f"--allow-path-root {allow_path_root}: not a folder"))
    limits = ServingLimits(round(max_body_mb * 2**20), max_request_pixels, max_concurrent, allow_path_root)
    config = _load(line)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with serving_model(config.name, port, version, limits=limits) as server:
            typer.echo(f"Serving {config.name} {'v' + version if version else '@champion'}: POST {server.url}/invocations")
            typer.echo("Ctrl-C stops it.")
            block_until_one_exits((server,))
    except KeyboardInterrupt:
        typer.echo("Stopped the model server.")
    except (ValueError, ServiceError) as error:
        _fail(error)


def _prefect_api() -> contextlib.AbstractContextManager:
    """The Prefect API that PREFECT_API_URL (or the Prefect profile) names, else one for this command alone."""
    from prefect.settings import PREFECT_API_URL

    from patchline.deployments.services import local_prefect_api

    return contextlib.nullcontext() if PREFECT_API_URL.value() else local_prefect_api()


DetectorsOption = Annotated[str | None, typer.Option(
    help="Comma-separated detectors to build instead of the config's (patchcore, oesdn, ae, darkness).")]


def _with_detectors(config: LineConfig, detectors: str | None) -> LineConfig:
    if not detectors:
        return config
    chosen = tuple(d.strip() for d in detectors.split(",") if d.strip())
    try:
        evaluation = config.evaluation.model_validate({**config.evaluation.model_dump(), "detectors": chosen})
    except ValueError as error:
        _fail(error)
    return config.model_copy(update={"evaluation": evaluation})


ForceOption = Annotated[bool, typer.Option(
    help="Rebuild even a line whose images and model settings equal its champion's (default: skip it).")]
FullOption = Annotated[bool, typer.Option(
    help="Rebuild from nothing even when only new good images arrived (default: grow the champion's bank; "
         "the networks are trained on all the images either way).")]


def _print_screening(line_arg: str, screening) -> None:
    if screening.screened or screening.accepted:
        typer.echo(f"  screen: {screening.note}")
    for item in screening.quarantined:
        typer.secho(f"  quarantined {item.path}: score {item.score:.4f} >= threshold {item.threshold:.4f} "
                    f"(0-1 score {item.score_unit:.3f}); heat map: screening/{item.heatmap} in the run's artifacts",
                    fg=typer.colors.YELLOW)
    if screening.unlike is not None and screening.unlike.images:
        typer.echo(f"  first build: {len(screening.unlike.images)} training images unlike the rest (leave-one-image-out "
                   f"score above {screening.unlike.cutoff:.4f}); fitted on, check them:")
        for path, score in screening.unlike.images:
            typer.echo(f"    {path}: {score:.4f}")
    if screening.quarantined:
        typer.echo(f"  a reviewer who finds one good passes it with: patchline accept {line_arg} PATH --reason '...'")


def _print_rebuild(result: RebuildResult, line_arg: str) -> None:
    """`line_arg`: how the user named the line (a name or a config file), for the commands it suggests."""
    if result.skipped:
        typer.echo(f"{result.line}: {result.reason}")
        _print_screening(line_arg, result.screening)
        return
    typer.echo(f"{result.line}: image AUROC " + ", ".join(
        f"{name} {value:.4f}" for name, value in result.image_auroc.items()))
    verdict = "promoted to champion" if result.promoted else "not promoted"
    typer.echo(f"  version {result.version} {verdict}: {result.reason}")
    typer.echo(f"  decisions by: {result.decision_detector} ({result.decision_reason}); "
               f"MLflow run {result.run_id}")
    for name, why in result.left_out.items():
        typer.echo(f"  {name} {why}")
    _print_screening(line_arg, result.screening)
    for part, note in result.reuse.items():
        typer.echo(f"  {part}: {note}")


@app.command("rebuild")
def rebuild_command(
    line: LineArg, detectors: DetectorsOption = None,
    wait: Annotated[bool, typer.Option(help="When a rebuild of this line is running: wait for it to end, "
                                            "or (--no-wait) stop at once, naming it.")] = True,
    force: ForceOption = False, full: FullOption = False,
) -> None:
    """Rebuild one product line now: features, coreset, OE-SDN, evaluation, MLflow, gate."""
    _require_home()
    from patchline.flows.rebuild import rebuild_product_line

    config = _with_detectors(_load(line), detectors)
    with _prefect_api():
        state = rebuild_product_line(config, wait, force, full, return_state=True)
    if not state.is_completed():
        _fail(RuntimeError(f"rebuild of {config.name} failed: {state.message}"))
    _print_rebuild(state.result(), line)


@app.command("nightly")
def nightly_command(
    lines: Annotated[list[str] | None, typer.Argument(help="Lines to rebuild; default: every configured line.")] = None,
    force: ForceOption = False, full: FullOption = False,
) -> None:
    """Rebuild every configured line (or the given ones); one line's failure does not stop the others."""
    _require_home()
    from patchline.flows.nightly import nightly
    from patchline.tasks.outcome import NightlySummary

    with _prefect_api():
        state = nightly(lines or None, force, full, return_state=True)
    summary = state.result(raise_on_failure=False)
    summary = summary if isinstance(summary, NightlySummary) else NightlySummary({}, {})
    given = {}
    for arg in lines or []:
        try:
            given[load_line(arg).name] = arg
        except LineConfigError:
            pass  # the nightly reports it as failed
    for name, result in summary.rebuilt.items():
        _print_rebuild(result, given.get(name, name))
    for name, reason in summary.failed.items():
        typer.secho(f"{name}: FAILED: {reason}", fg=typer.colors.RED, err=True)
    typer.echo("Look at the runs with: .venv/bin/patchline ui   (Prefect UI and MLflow UI)")
    if not state.is_completed():
        raise typer.Exit(code=1)


@app.command("export")
def export_command(
    line: LineArg,
    out: Annotated[Path, typer.Option(help="Folder for the graph and line.json.")],
    version: Annotated[str | None, typer.Option(help="Model version to export; default: the champion.")] = None,
    format: Annotated[str, typer.Option("--format", help="onnx (model.onnx: ONNX Runtime or OpenVINO) or "
                                                         "openvino (OpenVINO's IR, model.xml + model.bin).")] = "onnx",
) -> None:
    """Export a line's model version as one graph, checked on each installed runtime to score as the version
    does, for `patchline.runtime.ExportedLine` (NumPy and ONNX Runtime or OpenVINO, no PyTorch)."""
    _require_home()
    _require_writable(out, "--out")
    config = _load(line)
    from patchline.storage.export import ExportError, export_version, runtime_summary
    from patchline.storage.tracking import configure_mlflow

    try:
        exported = export_version(configure_mlflow(), config.name, out, version, model_format=format)
    except ExportError as error:
        _fail(error)
    typer.echo(f"exported {config.name} version {exported.version} to {out} ({exported.model_format}, line.json); "
               f"PyTorch scores {exported.torch_img_s:.1f} images/s")
    for runtime, found in exported.runtimes.items():
        typer.echo(f"  {runtime_summary(runtime, found)}")
    typer.echo(f"the runtime scorer will use {exported.runtime} (the fastest that passed)")


@app.command("score")
def score_command(
    line: LineArg,
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    out: Annotated[Path, typer.Option(help="Folder for scores.csv and heatmaps/.")] = Path("scores"),
    recursive: Annotated[bool, typer.Option(help="Score the images in subfolders of the given folders too "
                                                 "(default: only the files directly inside).")] = False,
) -> None:
    """Score images with the line's champion model. Every path given or found gets one row of scores.csv:
    its scores and heat map, or the reason it was not scored."""
    _require_home()
    from patchline.flows.score import score_images

    name = _load(line).name
    _require_writable(out, "--out")
    try:
        with _prefect_api():
            csv_path = score_images(name, [str(p) for p in paths], str(out), recursive=recursive)
    except ValueError as error:
        _fail(error)
    typer.echo(f"wrote {csv_path} and heat maps in {out / 'heatmaps'}")


@app.command("deploy")
def deploy_command(
    lines: Annotated[list[str] | None, typer.Argument(help="Lines to deploy; default: every configured line.")] = None,
    serve: Annotated[bool, typer.Option(help="Serve the deployments here after registering them.")] = True,
    pool: Annotated[str | None, typer.Option(help="Register them to this Prefect work pool, whose workers run "
                                                   "them (`prefect worker start --pool NAME`), instead of serving "
                                                   "them here.")] = None,
) -> None:
    """Register one nightly deployment per line (its cron) plus batch scoring in the Prefect API, and serve them."""
    _require_home()
    from patchline.deployments.schedules import WorkPoolError, register, serve_deployments

    if pool is not None:
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            _fail(ValueError(f"--pool {pool}: a work pool lives in a Prefect server; set PREFECT_API_URL to its API "
                             "(e.g. http://127.0.0.1:4200/api)"))
        try:
            ids = register(lines or None, work_pool=pool)
        except WorkPoolError as error:
            _fail(error)
        typer.echo(f"registered {len(ids)} deployments to work pool {pool!r}")
        return
    if not serve:
        ids = register(lines or None)
        typer.echo(f"registered {len(ids)} deployments")
        return
    typer.echo("serving the deployments; stop with SIGTERM or Ctrl-C")
    serve_deployments(lines or None)


@app.command("promote")
def promote_command(
    line: LineArg, version: Annotated[str, typer.Argument(help="Model version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why, kept on the version.")] = "promoted by hand",
) -> None:
    """Move the line's champion alias to VERSION."""
    _require_home()
    from mlflow.exceptions import MlflowException

    from patchline.storage.registry import promote
    from patchline.storage.tracking import configure_mlflow

    name = _load(line).name
    try:
        chosen = promote(configure_mlflow(), name, version, reason)
    except MlflowException as error:
        _fail(ValueError(f"line {name}: cannot promote version {version}: {error.message}"))
    typer.echo(f"{name}: champion is now v{chosen.version}")


@app.command("rollback")
def rollback_command(
    line: LineArg,
    reason: Annotated[str, typer.Option(help="Why, kept in the line's champion record.")] = "rolled back by hand",
) -> None:
    """Give the champion alias back to the version that held it before; again, to the one before that."""
    _require_home()
    from patchline.storage.registry import rollback
    from patchline.storage.tracking import configure_mlflow

    name = _load(line).name
    try:
        restored = rollback(configure_mlflow(), name, reason)
    except ValueError as error:
        _fail(error)
    typer.echo(f"{name}: champion is back to v{restored.version}")


@app.command("status")
def status_command(
    lines: Annotated[list[str] | None, typer.Argument(help="Lines to show (names or config files); default: all bundled.")] = None,
) -> None:
    """The fleet: per line, the champion and its age, the last rebuild's outcome and why, and a scheduled
    rebuild that did not run."""
    _require_home()
    from datetime import datetime, timezone

    from patchline.storage.fleet import line_status
    from patchline.storage.tracking import configure_mlflow

    configs = _load_all(lines)
    client = configure_mlflow()
    now = datetime.now(timezone.utc)
    for config in configs:
        row = line_status(client, config, now).row(now)
        typer.echo(f"{row['line']:<16} champion {row['champion']:<5} age {row['champion age']:<8} "
                   f"last: {row['last rebuild']}")
        if row["why"]:
            typer.echo(f"    why: {row['why']}")
        if row["missed schedule"]:
            typer.secho(f"    missed: no rebuild since its schedule ran at {row['missed schedule']} "
                        f"('{config.schedule.cron}' {config.schedule.timezone})", fg=typer.colors.RED)


@app.command("history")
def history_command(line: LineArg) -> None:
    """The line's champion timeline: each version that became champion, when, by whom or which rule, and why."""
    _require_home()
    from patchline.storage.registry import champion_stack, champion_timeline
    from patchline.storage.tracking import configure_mlflow

    name = _load(line).name
    events = champion_timeline(configure_mlflow(), name)
    if not events:
        typer.echo(f"{name}: no champion yet")
        return
    for event in events:
        typer.echo(f"{event.at:<25} v{event.version:<5} {event.action:<17} by {event.by}: {event.reason}")
    stack = champion_stack(events)
    typer.echo(f"champion now: v{stack[-1]}" if stack else "champion now: none")


@app.command("accept")
def accept_command(
    line: LineArg,
    images: Annotated[list[Path], typer.Argument(help="Quarantined training images a reviewer found good.")],
    reason: Annotated[str, typer.Option(help="Why they are good, kept with the line's model.")] = "reviewed: good",
) -> None:
    """Pass training images that the screen quarantined: later rebuilds fit on them, and the record keeps who
    accepted them, when and why."""
    _require_home()
    from patchline.storage.image_files import BadImageError, decode_image
    from patchline.storage.manifest import content_hash
    from patchline.storage.registry import accept_images
    from patchline.storage.tracking import configure_mlflow

    name = _load(line).name
    found = {}
    for path in images:
        try:
            found[content_hash(decode_image(path))] = str(path.resolve())
        except BadImageError as error:
            _fail(error)
    try:
        accept_images(configure_mlflow(), name, found, reason)
    except ValueError as error:
        _fail(error)
    typer.echo(f"{name}: accepted {len(found)} images; the next rebuild fits on them")

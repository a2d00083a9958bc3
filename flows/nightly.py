"""The nightly fan-out: every configured line (or the ones named) rebuilt as its own subflow."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed, State

from patchline.flows.rebuild import rebuild_product_line
from patchline.tasks.lines import configured_lines, load_line_task, publish_fleet_task
from patchline.tasks.outcome import NightlySummary
from patchline.tasks.run_logs import quiet_completed_states

quiet_completed_states()


@flow(name="nightly")
def nightly(lines: list[str] | None = None, force: bool = False, full: bool = False) -> State:
    """Rebuild each line in turn; one line's failure does not stop the others, and the final state names it.
    Lines unchanged since their champion are skipped, unless `force`; lines with only new good images are
    updated from their champion, unless `full`."""
    log = get_run_logger()
    names = lines or configured_lines()
    results, failed, configs = {}, {}, []
    for name in names:
        loaded = load_line_task(name, return_state=True)
        if not loaded.is_completed():
            failed[name] = loaded.message or loaded.type.value
            log.error("line %s: %s", name, failed[name])
            continue
        config = loaded.result()
        configs.append(config)
        state = rebuild_product_line(config, force=force, full=full, return_state=True)
        if state.is_completed():
            results[config.name] = state.result()
        else:
            failed[config.name] = state.message or state.type.value
            log.error("line %s failed: %s", config.name, failed[config.name])
    if configs:
        publish_fleet_task(configs)
    summary = NightlySummary(results, failed)
    if failed:
        return Failed(message=f"{len(failed)} of {len(names)} lines failed: {', '.join(failed)}", data=summary)
    skipped = sum(1 for result in results.values() if result.skipped)
    return Completed(message=f"all {len(names)} lines done: {len(names) - skipped} rebuilt, {skipped} unchanged",
                     data=summary)

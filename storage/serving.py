"""A line's model over HTTP, with limits: the app `patchline serve` runs under uvicorn on 127.0.0.1.

It speaks MLflow's scoring protocol (`POST /invocations` with the bodies `mlflow models serve` takes, and
`/ping`, `/health`, `/version`): MLflow's own scoring app does the parsing and the predicting. Around it:
- a request body above `max_body_bytes` gets 413 before it is read whole;
- more than `max_concurrent` requests in progress: the next gets 429 with `Retry-After`;
- the images of one request may decode to at most `max_request_pixels` pixels (the pyfunc counts them
  before decoding each, storage/pyfunc_model.py), beyond that 413;
- `{"path": [...]}` inputs are refused unless the server was started with `path_root`, and then only
  inside it;
- an error answer carries patchline's one-line reason, never a stack trace, the request's data or a
  server path.
The limits reach the pyfunc as environment variables of the server process: a model carries its own copy
of patchline's code (`code_paths`), so nothing but the environment is shared with it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

# Set in the server's environment; read by the pyfunc while it serves (storage/pyfunc_model.py).
SERVING_ENV = "PATCHLINE_SERVING"
MAX_REQUEST_PIXELS_ENV = "PATCHLINE_SERVE_MAX_REQUEST_PIXELS"
PATH_ROOT_ENV = "PATCHLINE_SERVE_PATH_ROOT"
MODEL_URI_ENV = "PATCHLINE_SERVE_MODEL_URI"
MAX_BODY_ENV = "PATCHLINE_SERVE_MAX_BODY_BYTES"
MAX_CONCURRENT_ENV = "PATCHLINE_SERVE_MAX_CONCURRENT"


class RequestTooLargeError(ValueError):
    """A served request whose images decode to more pixels than the server allows; raised by the pyfunc,
    its name in MLflow's error answer turns that answer into a 413."""


@dataclass(frozen=True)
class ServingLimits:
    # 32 MiB holds a few dozen camera frames as PNG, or base64 of them.
    max_body_bytes: int = 32 * 2**20
    # 40 megapixels: ten 2k x 2k frames per request; decoded RGB that is 120 MB, far from gigabytes.
    max_request_pixels: int = 40_000_000
    # Scoring uses every core; two at once keep the cores busy while one request is read or answered.
    max_concurrent: int = 2
    path_root: Path | None = None

    def environment(self) -> dict[str, str]:
        """The server process's environment entries that carry these limits."""
        env = {SERVING_ENV: "1", MAX_REQUEST_PIXELS_ENV: str(self.max_request_pixels),
               MAX_BODY_ENV: str(self.max_body_bytes), MAX_CONCURRENT_ENV: str(self.max_concurrent)}
        if self.path_root is not None:
            env[PATH_ROOT_ENV] = str(self.path_root.resolve())
        return env

    @classmethod
    def from_environment(cls) -> ServingLimits:
        root = os.environ.get(PATH_ROOT_ENV)
        defaults = cls()
        return cls(int(os.environ.get(MAX_BODY_ENV, defaults.max_body_bytes)),
                   int(os.environ.get(MAX_REQUEST_PIXELS_ENV, defaults.max_request_pixels)),
                   int(os.environ.get(MAX_CONCURRENT_ENV, defaults.max_concurrent)),
                   Path(root) if root else None)


def one_line_reason(body: bytes) -> tuple[str, bool]:
    """An MLflow error answer → (patchline's one-line reason, whether it is a too-large request).

    MLflow answers a failed prediction with a generic message that echoes the request's data, and the
    stack trace whose last line holds the model's own exception; only that line's message is kept,
    with any server path in it cut to its file name."""
    try:
        answer = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        answer = {"message": body.decode("utf-8", "replace")}
    trace = str(answer.get("stack_trace") or "") if isinstance(answer, dict) else ""
    lines = [line for line in trace.strip().splitlines() if line.strip() and not line.startswith(" ")]
    if lines:
        kind, _, reason = lines[-1].partition(": ")
        too_large = kind.rsplit(".", 1)[-1] == RequestTooLargeError.__name__
    else:
        message = str(answer.get("message", "")) if isinstance(answer, dict) else str(answer)
        reason, too_large = message.strip().splitlines()[0] if message.strip() else "request failed", False
    reason = re.sub(r"(?<![\w.])/(?:[^\s/:'\"]+/)+([^\s/:'\"]+)", r"\1", reason)
    return reason[:500], too_large


def create_app():
    """The ASGI app: MLflow's scoring app for the model at `$PATCHLINE_SERVE_MODEL_URI`, within the limits
    of `ServingLimits.from_environment()`."""
    from mlflow.pyfunc import scoring_server

    limits = ServingLimits.from_environment()
    inner = scoring_server.init(scoring_server.load_model_with_mlflow_config(os.environ[MODEL_URI_ENV]))
    return LimitedScoring(inner, limits)


class LimitedScoring:
    """ASGI middleware: the limits of `ServingLimits` around MLflow's scoring app."""

    def __init__(self, app, limits: ServingLimits) -> None:
        self.app, self.limits, self.in_flight = app, limits, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            await _drain(receive)
            await _answer(send, 413, f"request body of {int(declared):,} bytes is above the server's limit of "
                                     f"{self.limits.max_body_bytes:,} ({MAX_BODY_ENV})")
            return
        if self.in_flight >= self.limits.max_concurrent:
            await _answer(send, 429, f"{self.in_flight} requests in progress, the server's limit "
                                     f"({MAX_CONCURRENT_ENV}); retry shortly", retry_after=True)
            return
        self.in_flight += 1
        try:
            await self._limited(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _limited(self, scope, receive, send) -> None:
        chunks, size = [], 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if size > self.limits.max_body_bytes:
                if message.get("more_body"):
                    await _drain(receive)
                await _answer(send, 413, f"request body above the server's limit of {self.limits.max_body_bytes:,} "
                                         f"bytes ({MAX_BODY_ENV})")
                return
            chunks.append(message)
            if not message.get("more_body"):
                break
        replay = iter(chunks)

        async def replayed():
            return next(replay, {"type": "http.disconnect"})

        started: dict = {}
        failed: list[bytes] = []

        async def filtered(message) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
                if message["status"] < 400:
                    await send(message)
                return
            if started.get("status", 200) < 400:
                await send(message)
                return
            failed.append(message.get("body", b""))
            if not message.get("more_body"):
                reason, too_large = one_line_reason(b"".join(failed))
                await _answer(send, 413 if too_large else started["status"], reason)

        await self.app(scope, replayed, filtered)


async def _drain(receive) -> None:
    """Read the rest of a refused body without keeping it: a client still sending would otherwise meet a
    closed connection instead of the answer."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def _answer(send, status: int, reason: str, retry_after: bool = False) -> None:
    body = json.dumps({"error_code": "REQUEST_TOO_LARGE" if status == 413 else "TOO_MANY_REQUESTS" if status == 429
                       else "BAD_REQUEST" if status == 400 else "ERROR", "message": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

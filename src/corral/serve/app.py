"""``corral serve``: ROCK's sandbox protocol over HTTP, on one ``Host`` or a Ray pool.

Every route is under ``/apis/envs/sandbox/v1/`` and answers HTTP 200 with ROCK's
envelope (see ``protocol``), except a missing or wrong token: HTTP 401, before any
sandbox is touched. The live view (``/live``, ``/apis/live/v1/``) and ``/metrics`` are
``live``'s. Routes are plain functions, run in FastAPI's thread pool; requests to
one sandbox take turns (``Host.using``), requests to different sandboxes run at once.
What the routes ask of the sandboxes is ``sandboxes.Sandboxes``.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at
# runtime, and some name types local to create_app.
import contextlib
import shlex
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from corral import __version__
from corral.errors import CorralError
from corral.host import Host
from corral.host.metrics import Exposition, HostMetrics
from corral.host.usage import UsageSampler
from corral.policy.schema import parse_size
from corral.serve import live
from corral.serve import protocol as p
from corral.serve.auth import LOCAL_USER, Tokens, labels_from, token_from
from corral.serve.fleet import Fleet, HostFleet
from corral.serve.sandboxes import LocalSandboxes, Sandboxes, Status

PREFIX = "/apis/envs/sandbox/v1"
UPLOAD_LIMIT = 256 << 20


class _Refused(Exception):
    """Ends a request with a Failed envelope (``message`` is the operation)."""

    def __init__(self, message: str, error: str) -> None:
        super().__init__(error)
        self.message, self.error = message, error


def create_app(
    host: Host | Sandboxes,
    tokens: Tokens | None,
    *,
    live_view: bool = True,
    fleet: Fleet | None = None,
    metrics: Exposition | None = None,
) -> FastAPI:
    """The API over ``host``: one ``Host`` in this process, or any ``Sandboxes`` (a Ray
    pool's). ``tokens`` None: no token asked for (loopback only; the caller checks the
    address it binds). ``live_view``: serve the live page and its API (``/metrics`` is
    served either way). Over a ``Host`` the fleet and metrics are that host's; otherwise
    pass the ``fleet`` (None: no live view) and ``metrics`` to serve."""
    sampler: UsageSampler | None = None
    owned: list[Any] = []  # what this app made, and closes
    if isinstance(host, Host):
        sandboxes: Sandboxes = LocalSandboxes(host)
        metrics = HostMetrics(host)
        owned.append(metrics)
        if live_view:
            sampler = UsageSampler(host)
            fleet = HostFleet(host, sampler)
            owned.append(fleet)
    else:
        sandboxes = host
    if not live_view:
        fleet = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if sampler is not None:
            sampler.start()
        try:
            yield
        finally:
            if app.state.streams is not None:
                app.state.streams.close()
            if sampler is not None:
                sampler.close()
            for part in owned:
                part.close()

    app = FastAPI(
        title="corral", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.state.host = host
    app.state.sandboxes = sandboxes
    app.state.metrics = metrics
    app.state.streams = live.mount(app, fleet, metrics, tokens)

    def caller(request: Request) -> str:
        if tokens is None:
            return LOCAL_USER
        user = tokens.user(token_from(request.headers))
        if user is None:
            raise _Unauthorized()
        return user

    User = Annotated[str, Depends(caller)]

    @app.exception_handler(_Unauthorized)
    def _unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse(
            p.failed(
                "unauthorized",
                "a valid API token is required (XRL-Authorization: Bearer TOKEN, "
                "Authorization: Bearer TOKEN or X-API-Key: TOKEN)",
            ),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @contextmanager
    def answering(what: str) -> Iterator[None]:
        try:
            yield
        except (CorralError, OSError, UnicodeError, ValueError) as e:
            raise _Refused(what, str(e)) from None

    @app.exception_handler(_Refused)
    def _refused(request: Request, exc: _Refused) -> JSONResponse:
        return JSONResponse(p.failed(exc.message, exc.error))

    def server_ip(request: Request) -> str:
        server = request.scope.get("server")
        if server and server[0] and server[0] not in ("0.0.0.0", "::"):
            return str(server[0])
        return "127.0.0.1"

    def status_of(st: Status, request: Request) -> dict[str, Any]:
        stage = {"status": "success", "message": "corral sandbox ready"}
        return {
            "sandbox_id": st.id,
            "status": {"image_pull": stage, "docker_run": stage},
            "state": "running" if st.alive else "stopped",
            "is_alive": st.alive,
            "host_name": st.host_name,
            "host_ip": server_ip(request),
            "image": st.profile,
            "user_id": st.labels.get("user_id"),
            "experiment_id": st.labels.get("experiment_id"),
            "namespace": st.labels.get("namespace"),
            "cpus": st.cpus,
            "memory": p.size_text(st.memory),
            "start_time": _iso(st.created),
            "stop_time": _iso(st.stopped_at) if st.stopped_at else None,
            # corral's own: where the workspace is, and why it stopped.
            "workdir": st.workdir,
            "policy": st.policy,
            "stopped": st.stopped,
            "episode_ended": st.episode_ended,
            "alerts": st.alerts,
        }

    # ---------------------------------------------------------------- lifecycle
    @app.post(f"{PREFIX}/start_async")
    @app.post(f"{PREFIX}/start")
    def start(body: p.StartRequest, request: Request, user: User) -> dict[str, Any]:
        with answering("start sandbox failed"):
            minutes = body.auto_clear_time_minutes or body.auto_clear_time
            memory = parse_size(body.memory) if body.memory else None
            st = sandboxes.start(
                body.image,
                owner=user,
                sandbox_id=body.sandbox_id,
                labels=labels_from(request.headers),
                idle_ttl=minutes * 60.0 if minutes else None,
                memory=memory,
                cpus=p.parse_cpus(body.cpus),
            )
        return p.envelope(
            {
                "sandbox_id": st.id,
                "host_name": st.host_name,
                "host_ip": server_ip(request),
                "cpus": st.cpus,
                "memory": p.size_text(st.memory),
            }
        )

    @app.get(f"{PREFIX}/get_status")
    def get_status(sandbox_id: str, request: Request, user: User) -> dict[str, Any]:
        with answering("get sandbox status failed"):
            st = sandboxes.status(sandbox_id, user)
        return p.envelope(status_of(st, request))

    @app.get(f"{PREFIX}/is_alive")
    def is_alive(sandbox_id: str, user: User) -> dict[str, Any]:
        try:
            st = sandboxes.status(sandbox_id, user)
        except CorralError:
            return p.envelope({"is_alive": False, "message": f"no sandbox {sandbox_id!r}"})
        return p.envelope({"is_alive": st.alive, "message": st.host_name})

    @app.post(f"{PREFIX}/stop")
    def stop(body: p.SandboxRef, user: User) -> dict[str, Any]:
        with answering("stop sandbox failed"):
            sandboxes.stop(body.sandbox_id, user, "stopped by the client")
        return p.envelope(f"{body.sandbox_id} stopped")

    @app.post(f"{PREFIX}/delete")
    def delete(body: p.SandboxRef, user: User) -> dict[str, Any]:
        with contextlib.suppress(CorralError):  # ROCK: deleting an unknown one succeeds
            sandboxes.delete(body.sandbox_id, user)
        return p.envelope(f"{body.sandbox_id} deleted")

    @app.get(f"{PREFIX}/get_token")
    def get_token(user: User) -> dict[str, Any]:
        # ROCK hands out object-storage credentials here; corral has no object store, and
        # the SDK then uploads through /upload instead.
        return p.failed(
            "get token failed", "corral has no object storage; upload files with /upload"
        )

    # ---------------------------------------------------------------- sessions
    @app.post(f"{PREFIX}/create_session")
    def create_session(body: p.CreateSessionRequest, user: User) -> dict[str, Any]:
        what = "create session failed"
        if body.remote_user not in (None, "", "root"):
            raise _Refused(what, "remote_user is not supported: a sandbox has one user")
        with answering(what):
            output = sandboxes.open_session(
                body.sandbox_id, user, body.session, body.env, body.startup_source
            )
        return p.envelope({"session_type": "bash", "output": output})

    @app.post(f"{PREFIX}/close_session")
    def close_session(body: p.CloseSessionRequest, user: User) -> dict[str, Any]:
        with answering("close session failed"):
            sandboxes.close_session(body.sandbox_id, user, body.session)
        return p.envelope({"session_type": "bash"})

    @app.post(f"{PREFIX}/run_in_session")
    def run_in_session(body: p.BashAction, user: User) -> dict[str, Any]:
        with answering("run in session failed"):
            r = sandboxes.run(
                body.sandbox_id, user, body.command, timeout=body.timeout, session=body.session
            )
        return p.observation(
            body, r.exit_code, r.stdout + r.stderr, r.failure, r.timed_out, r.limit
        )

    @app.post(f"{PREFIX}/execute")
    def execute(body: p.CommandRequest, user: User) -> dict[str, Any]:
        with answering("execute command failed"):
            r = sandboxes.run(body.sandbox_id, user, _command_line(body), timeout=body.timeout)
        # The sandbox already says on stderr that it was stopped; not twice.
        said = set(r.stderr.splitlines())
        extra = "".join(f"{line}\n" for line in r.failure.splitlines() if line not in said)
        return p.envelope(
            {"stdout": r.stdout, "stderr": r.stderr + extra, "exit_code": r.exit_code}
        )

    # ---------------------------------------------------------------- files
    @app.post(f"{PREFIX}/read_file")
    def read_file(body: p.ReadFileRequest, user: User) -> dict[str, Any]:
        with answering("read file failed"):
            data = sandboxes.read_file(body.sandbox_id, user, body.path)
            content = data.decode(body.encoding or "utf-8", body.errors or "strict")
        return p.envelope({"content": content})

    @app.post(f"{PREFIX}/write_file")
    def write_file(body: p.WriteFileRequest, user: User) -> dict[str, Any]:
        with answering("write file failed"):
            sandboxes.write_file(body.sandbox_id, user, body.path, body.content.encode())
        return p.envelope({"success": True, "message": f"wrote {body.path}"})

    @app.post(f"{PREFIX}/upload")
    def upload(
        user: User,
        file: Annotated[UploadFile, File()],
        target_path: Annotated[str, Form()],
        sandbox_id: Annotated[str, Form()],
    ) -> dict[str, Any]:
        what = "upload file failed"
        data = file.file.read(UPLOAD_LIMIT + 1)
        if len(data) > UPLOAD_LIMIT:
            raise _Refused(what, f"the file is larger than {UPLOAD_LIMIT} bytes")
        with answering(what):
            sandboxes.write_file(sandbox_id, user, target_path, data, "file uploaded")
        return p.envelope(
            {"success": True, "message": f"uploaded to {target_path}", "file_name": file.filename}
        )

    # ---------------------------------------------------------------- corral's own
    @app.get(f"{PREFIX}/alerts")
    def alerts(sandbox_id: str, user: User, since: int = 0) -> dict[str, Any]:
        """Every alert of the sandbox from index ``since`` on, and whether its episode
        was ended: what a trainer reads to penalise or drop a trajectory."""
        with answering("get alerts failed"):
            got = sandboxes.alerts(sandbox_id, user, since)
        return p.envelope(
            {
                "sandbox_id": sandbox_id,
                "alerts": got.alerts,
                "next": got.next,
                "episode_ended": got.episode_ended,
                "stopped": got.stopped,
            }
        )

    @app.get("/")
    def root() -> dict[str, Any]:
        return {"service": "corral", "version": __version__, "protocol": "rock-sandbox-v1"}

    return app


class _Unauthorized(Exception):
    pass


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def _command_line(body: p.CommandRequest) -> str:
    """``execute``: a list is an argv, a string goes through a shell; either way in a
    subshell, so its ``cwd`` and ``env`` do not stay in the sandbox's shell."""
    cmd = body.command
    line = " ".join(shlex.quote(a) for a in cmd) if isinstance(cmd, list) else cmd
    prefix = ""
    if body.cwd:
        prefix += f"cd {shlex.quote(body.cwd)} && "
    for k, v in (body.env or {}).items():
        if not k.isidentifier():
            raise _Refused("execute command failed", f"bad environment variable name {k!r}")
        prefix += f"export {k}={shlex.quote(v)} && "
    return f"( {prefix}{line}\n)" if prefix else line

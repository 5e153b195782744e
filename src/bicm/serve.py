"""``bicm serve``: a local web page to try BiCM on an uploaded photo or a bundled example.

The page (``bicm/static/index.html``, one file of HTML + JavaScript, no external assets) posts
the image, the phrases (one per line), the proposal source and the components to
``/api/ground`` and shows, per phrase, the picture of :func:`bicm.viz.render_visualization`
(heatmap, candidates, chosen box), a table of the top candidates' component scores, and a
download of the JSON result (:meth:`bicm.api.GroundingResult.to_dict` per phrase).

This module is the web app only: the grounding itself (caching, limits, the CPU lock, the
bundled examples) is :class:`bicm.service.DemoService`, which needs no web package.

Why starlette + uvicorn and not Gradio: the page needs four widgets and one table. Gradio
would add a large dependency tree (its own FastAPI, pydantic, pandas, a bundled frontend and
more) and, by default, fonts and analytics fetched from the network, which bicm's offline
machines do not have. starlette (the toolkit FastAPI is built on), uvicorn and
python-multipart are three small pure-Python packages; they live in the ``serve`` extra
(``pip install "bicm[serve]"``) so that the library and the other commands do not need them.

What the HTTP side adds to the service:

* upload bytes are checked from ``Content-Length`` and again while reading, and a stalled
  upload is cut at the request timeout;
* mistakes come back as HTTP 4xx with ``{"error": "..."}``, shown on the page;
* it binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import BicmError
from .service import MB, DemoError, DemoService, Example, ServeLimits

if TYPE_CHECKING:  # pragma: no cover
    from .options import ModelOptions, SourceOptions
    from PIL import Image

__all__ = [
    "create_app",
    "run_server",
    "serve_command",
    "start_service",
]

#: Bytes a multipart form adds around the image (boundaries, headers, the text fields).
FORM_OVERHEAD = 256 * 1024

#: Seconds the HTTP side waits beyond the deadline, so that a worker still queueing for the
#: CPU answers 503 (busy) itself rather than the client getting 504.
LOCK_GRACE_S = 0.5

WEB_PACKAGES = {"starlette": "starlette", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def static_file(name: str) -> bytes:
    """A file of ``bicm/static`` (the page)."""
    return resources.files("bicm").joinpath("static", name).read_bytes()


# ----------------------------------------------------------------------------------------
def require_web() -> None:
    """Raise :class:`BicmError` with the install command when the web packages are missing."""
    missing = [pip for module, pip in WEB_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise BicmError(f"bicm serve needs {', '.join(missing)}: pip install \"bicm[serve]\"")


def create_app(service: DemoService):
    """The ASGI app (starlette) around ``service``.

    Routes: ``GET /`` the page, ``GET /api/info``, ``GET /api/examples/{name}.png``,
    ``POST /api/ground`` (multipart: ``image`` file or ``example`` name, ``queries``,
    ``proposals``, ``components``). Every error is JSON ``{"error": "..."}``.
    """
    require_web()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    limits = service.limits
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
    page_headers = {
        **headers,
        "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    }

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def page(request: Request) -> Response:
        return Response(static_file("index.html"), media_type="text/html; charset=utf-8", headers=page_headers)

    async def info(request: Request) -> Response:
        return JSONResponse(service.info(), headers=headers)

    async def example_image(request: Request) -> Response:
        try:
            found = service.example(request.path_params["name"])
        except DemoError as exc:
            return error(str(exc), exc.status)
        return Response(found.path.read_bytes(), media_type="image/png", headers=headers)

    async def ground(request: Request) -> Response:
        length = request.headers.get("content-length", "")
        allowed = limits.max_upload_bytes + FORM_OVERHEAD
        if length.isdigit() and int(length) > allowed:
            return error(f"the request is {int(length) / MB:.1f} MB; this server accepts images up to {limits.max_upload_bytes / MB:g} MB", 413)
        capped = Request(request.scope, _capped_receive(request.receive, allowed, HTTPException))
        try:
            # a stalled upload is cut at the request timeout, not waited for forever
            form = await asyncio.wait_for(capped.form(max_files=1, max_fields=8, max_part_size=64 * 1024), timeout=limits.timeout_s)
        except ClientDisconnect:  # the client left mid-upload: nobody to answer, nothing to log
            return Response(status_code=400)
        except asyncio.TimeoutError:
            return error(f"the upload did not arrive within {limits.timeout_s:g} s", 408)
        except MultiPartException as exc:
            return error(f"malformed form: {exc}", 400)
        except HTTPException as exc:
            return error(str(exc.detail), exc.status_code)
        except (AssertionError, KeyError, ValueError):
            return error("send the fields as multipart/form-data", 400)
        deadline = time.monotonic() + limits.timeout_s
        try:
            upload = form.get("image")
            example_name = form.get("example")
            if upload is not None and not isinstance(upload, str):
                data = await upload.read()
                await form.close()
                image_name = str(upload.filename or "upload")
                image = await asyncio.get_running_loop().run_in_executor(None, service.decode_upload, data, image_name)
            elif isinstance(example_name, str) and example_name:
                found = service.example(example_name)
                image_name = f"example:{found.name}"
                image = await asyncio.get_running_loop().run_in_executor(None, _load_example, found)
            else:
                raise DemoError("choose an image to upload or a bundled example")
            queries = service.parse_queries(_text(form.get("queries")))
            components = service.parse_components(_text(form.get("components")) or "qam,com,sf")
            proposals = _text(form.get("proposals")) or next(iter(service.sources))
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(
                service.executor,
                lambda: service.ground(
                    image, queries, proposals=proposals, components=components, image_name=image_name, deadline=deadline
                ),
            )
            # the worker gives up waiting for the CPU at the deadline (503); a computation that
            # runs past it cannot be interrupted, so the client gets 504 while it finishes (its
            # image features are then cached, and a retry is quick)
            remaining = max(deadline - time.monotonic(), 0.0) + LOCK_GRACE_S
            payload = await asyncio.wait_for(work, timeout=remaining)
        except asyncio.TimeoutError:
            return error(
                f"no answer within {limits.timeout_s:g} s (a large image, or a busy server); "
                "the image's features are kept when the work finishes, so a retry may be quick",
                504,
            )
        except DemoError as exc:
            return error(str(exc), exc.status)
        except BicmError as exc:  # what the method refuses (e.g. SF without QAM, COM without proposals)
            return error(str(exc), 400)
        return JSONResponse(payload, headers=headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "") or "error"
        return error(str(detail) if status != 404 else f"not found: {request.url.path[:80]}", status)

    async def server_error(request: Request, exc: Exception) -> Response:
        return error(f"internal error ({type(exc).__name__}); see the server's log", 500)

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/api/info", info, methods=["GET"]),
        Route("/api/examples/{name}.png", example_image, methods=["GET"]),
        Route("/api/ground", ground, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.service = service
    return app


def _load_example(example: Example) -> "Image.Image":
    from .imageio import load_image

    return load_image(example.path)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _capped_receive(receive, limit: int, http_exception):
    """An ASGI ``receive`` that refuses (HTTP 413) a body longer than ``limit`` bytes."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise http_exception(413, f"the request is larger than this server accepts ({limit / MB:.1f} MB)")
        return message

    return wrapped


def run_server(
    service: DemoService,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    log_level: str = "warning",
) -> None:
    """Serve the page with uvicorn until interrupted."""
    require_web()
    import uvicorn

    app = create_app(service)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        service.close()


def _check_bind(host: str, port: int) -> None:
    """Refuse an address that cannot be bound, with one line instead of a traceback."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise BicmError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def start_service(
    model: Optional["ModelOptions"] = None,
    source: Optional["SourceOptions"] = None,
    *,
    kam: Optional[Path] = None,
    limits: Optional[ServeLimits] = None,
) -> DemoService:
    """Load the model the way ``bicm ground`` does and build the :class:`DemoService`.

    ``model`` and ``source`` are the command line's option groups (:mod:`bicm.options`;
    default: their defaults on the CPU-or-GPU ``auto`` device). Without a model name,
    pretrained tag or checkpoint it loads the shipped ``shapes`` CLIP (offline), with the
    shapes detector, proposals named over the shapes vocabulary, the phrase protocol's
    selection and the model's calibrated ``lambda_t``, exactly as ``bicm demo``. ``kam`` (a
    ``bicm train-kam`` model of this backbone) adds KAM to the components, on by default.
    """
    from .checkpoints import SHAPES_MODEL, recorded_lambda_t
    from .config import BiCMConfig
    from .options import ModelOptions, SourceOptions

    require_web()
    model = model or ModelOptions()
    source = source or SourceOptions()
    shapes = model.model in (None, SHAPES_MODEL) and model.pretrained is None and model.checkpoint is None
    config, detector = None, None
    if shapes:
        from dataclasses import replace

        from .proposals.sources import make_source
        from .shapes.examples import EXAMPLE_SELECTION

        model = replace(model, model=SHAPES_MODEL)
        source = replace(source, name_with=source.name_with or "shapes")
        detector = make_source("shapes-detector", top_n=source.top_n)  # the shapes world's own detector, as bicm demo
        lambda_t = recorded_lambda_t(SHAPES_MODEL)
        config = BiCMConfig(selection=EXAMPLE_SELECTION, **({} if lambda_t is None else {"lambda_t": lambda_t}))
        if kam is not None:
            config = config.replace(components=config.components + ("kam",))
    grounder = model.grounder(config, source=source, kam=kam)
    return DemoService(
        grounder, model_name=grounder.backbone.name, limits=limits, top_n=source.top_n, ss_mode=source.ss_mode, detector=detector
    )


def serve_command(host: str, port: int, **options: Any) -> None:
    """What ``bicm serve`` does: check the address, load, say where, serve."""
    import sys

    require_web()
    _check_bind(host, port)
    service = start_service(**options)
    shown = f"[{host}]" if ":" in host else host
    print(f"bicm: serving {service.model_name} on http://{shown}:{port}/ (Ctrl+C to stop)", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"bicm: warning: listening on {host}: anyone who can reach this machine can use the demo", file=sys.stderr)
    run_server(service, host, port)

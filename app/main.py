"""The app factory: ``create_app(settings)``; ``app`` is what ``uvicorn app.main:app`` serves."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import web
from app.api import problems
from app.api.fastpath import FastPath
from app.api.metrics import Metrics
from app.api.middleware import ServiceMiddleware
from app.api.openapi import install_openapi
from app.api.routes import activity, attributes, explorer, host, inspect, memslots, system, testing, vms
from app.core import Engine
from app.core.journal import SqliteJournal
from app.logs import configure
from app.settings import Settings

log = logging.getLogger("kvm_memattr")

try:
    __version__ = version("kvm-memattr")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

DESCRIPTION = """
A **virtual KVM memory-attribute controller**. Each VM keeps which guest frames (gfns) are
*private* or *shared*, its memslots, its mappings (SPTEs) and the MMU invalidation state
(`mmu_invalidate_seq`, `mmu_invalidate_in_progress`, `mmu_invalidate_range_start/_end`), and
follows one of two semantics: `rfc-v9` (the Oct-2022 *Register/unregister the guest private
memory regions* patch) or `linux` (the design merged in 6.8: `KVM_SET_MEMORY_ATTRIBUTES`).

**Try it:** `POST /v1/vms` → `PUT .../memslots/0` → `POST .../faults` →
`PUT .../memory-attributes` (or `POST .../memory-encrypt/reg-region` on `rfc-v9`) → `GET .../events`.

Integers that mirror a kernel `__u64`/`__u32` accept a JSON integer or a decimal/`0x`-hex string.
Errors are RFC 9457 `application/problem+json` with the kernel `errno` name.

**Why the order matters:** `POST /v1/explorer/runs` races a vCPU fault against a conversion over
every interleaving and shows the shortest one that breaks an invariant.

The full reference (behaviour per kernel function, the errno table, an API guide) is in the
`docs/` folder of the source tree.
"""

TAGS = [
    {"name": "vms", "description": "KVM_CREATE_VM, kvm_destroy_vm, KVM_CHECK_EXTENSION on a VM"},
    {"name": "memslots", "description": "KVM_SET_USER_MEMORY_REGION2"},
    {"name": "guest-memfds", "description": "KVM_CREATE_GUEST_MEMFD and close()"},
    {"name": "memory-attributes", "description": "Private/shared conversions, both APIs, and reading attributes"},
    {"name": "state", "description": "Per-gfn view, MMU state, mappings and the event trace"},
    {"name": "guest and host activity", "description": "vCPU faults, prefault and host MMU-notifier invalidations"},
    {"name": "test support", "description": "Fault injection"},
    {"name": "explorer", "description": "Every interleaving of a vCPU fault with a conversion, checked"},
    {"name": "capabilities", "description": "KVM_CHECK_EXTENSION on /dev/kvm"},
    {"name": "service", "description": "Health and metrics"},
]


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the service. Tests pass their own settings and/or engine."""
    settings = settings or Settings()
    configure(settings.log_level, settings.log_json)
    if engine is None:  # not `or`: an empty Engine is falsy (it has a __len__)
        engine = Engine(settings.engine_limits(), settings.host_profile())
    journal = None
    if settings.state_file:  # StateFileError: one line for the operator (kvm-memattr serve exits 2)
        journal = SqliteJournal(settings.state_file, settings.journal_compact_after)
        snapshots, calls = engine.restore(journal)
        engine.attach_journal(journal)
        log.info(
            "loaded %d snapshot(s) and replayed %d journaled call(s) from %s: %d VM(s)",
            snapshots,
            calls,
            settings.state_file,
            len(engine),
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Start-up objects (routes, schemas) never die: keep them out of every GC pass (p99).
        gc.collect()
        gc.freeze()
        url = f"http://{settings.host}:{settings.port}"
        log.info(
            "kvm-memattr %s ready at %s: memory map %s/ui, API docs %s/docs (host profile %s)",
            __version__,
            url,
            url,
            url,
            engine.host.name,
        )
        yield
        log.info("kvm-memattr shutting down with %d VM(s)", len(engine))
        if journal is not None:
            engine.compact_all()  # the next start loads snapshots instead of replaying history
            journal.close()

    app = FastAPIOffline(
        lifespan=lifespan,
        title="kvm-memattr",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        redoc_url=None,
        swagger_ui_parameters={"defaultModelsExpandDepth": 0, "tryItOutEnabled": True, "displayRequestDuration": True},
    )
    # /v1/vms/ is not /v1/vms: a 404 problem that says so beats an empty 307 redirect.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.engine = engine
    app.state.open_streams = 0  # Server-Sent Event streams (the live trace), against max_event_streams
    app.state.started = time.monotonic()
    metrics = Metrics(engine)
    app.state.metrics = metrics

    problems.install(app)
    fast = FastPath(app, enabled=settings.fast_path)
    fast.include_router(system.router)
    web.install(app, fast.include_router)
    # Hot paths first: routing tries routes in order.
    for router in (
        attributes.router,
        activity.router,
        memslots.router,
        memslots.gmem_router,
        host.router,
        inspect.router,
        vms.router,
        testing.router,
        explorer.router,
    ):
        fast.include_router(router)

    @app.get(
        "/metrics",
        tags=["service"],
        summary="Prometheus metrics",
        description="HTTP requests and latency by route template, and engine gauges and counters.",
        operation_id="metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
    )
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        max_import_bytes=settings.max_import_bytes,
        api_token=settings.api_token,
        allowed_hosts=settings.host_names(),
        import_room=lambda: engine.budget.limit - engine.budget.used,
    )

    install_openapi(app, token=settings.api_token is not None)
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    """``app.main:app`` for ``uvicorn app.main:app``, built on first use so that importing
    ``create_app`` (CLI, tests) does not build a second app or replay the journal twice."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = create_app()
    return _app

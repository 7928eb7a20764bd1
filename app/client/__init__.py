"""A typed Python client for kvm-memattr, sync and async, on httpx.

    from kvm_memattr_client import Client
    with Client("http://127.0.0.1:8000") as kvm:          # or Client.in_process()
        vm = kvm.create_vm(type="sw_protected", semantics="linux")
        kvm.set_memory_attributes(vm.id, address=0x1_0000_0000, size=0x20_0000, attributes=8)

Every method is one API operation and returns the pydantic model of the sibling package
``models``; every failure raises :class:`KvmMemattrError` carrying the kernel errno and the
problem body.

This package and ``models`` are installed under two names from the same files: ``app.client`` and
``app.models`` in the service, ``kvm_memattr_client.client`` and ``kvm_memattr_client.models`` in
the client distribution (``client/pyproject.toml``), which has no ``app`` package. So they import
each other relatively, and the service (``app.main``, for ``in_process()``) only when asked.
"""

from __future__ import annotations

import inspect
import os
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import httpx

from . import operations as ops
from .operations import Op

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_URL = "http://127.0.0.1:8000"


class KvmMemattrError(Exception):
    """An API call failed: ``errno`` is the kernel errno name (``EINVAL``, ``ENOTTY``, ...)."""

    def __init__(self, status: int, errno: str, detail: str, problem: dict[str, Any]) -> None:
        super().__init__(f"{errno}: {detail}")
        self.status, self.errno, self.detail, self.problem = status, errno, detail, problem


def _json(response: httpx.Response) -> Any:
    """The answer's JSON (None for a 204), or KvmMemattrError with the problem's errno."""
    if response.status_code >= 400:
        try:
            problem = response.json()
        except ValueError:
            problem = {"errno": "EIO", "detail": response.text[:200]}
        errno = str(problem.get("errno", "EIO"))
        raise KvmMemattrError(response.status_code, errno, str(problem.get("detail", "")), problem)
    return response.json() if response.content else None


def _result(op: Op[T], response: httpx.Response) -> T:
    data = _json(response)
    if op.parse is None:
        return None  # type: ignore[return-value]  # Op[None]: the answer has no body
    return op.parse(data)


def _verify(url: str) -> ssl.SSLContext | bool:
    """TLS verification for ``url``: httpx's default (CA bundle loaded) for https. A plain-http URL
    never negotiates TLS, so it gets a context that trusts nothing (and would fail closed) instead
    of the CA bundle, which takes 60 ms to load: a third of a CLI call."""
    if url.lower().startswith("https:"):
        return True
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _headers(token: str | None) -> dict[str, str]:
    token = token or os.environ.get("KVM_MEMATTR_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _sync(builder: Callable[P, Op[T]]) -> Callable[Concatenate[Client, P], T]:
    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.send(builder(*args, **kwargs))

    return _like(method, builder)


def _async(builder: Callable[P, Op[T]]) -> Callable[Concatenate[AsyncClient, P], Awaitable[T]]:
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.send(builder(*args, **kwargs))

    return _like(method, builder)


_SELF = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)


def _like(method: F, builder: Callable[..., Any]) -> F:
    """The builder's name, doc and parameters on the method, so ``help()``, a REPL and
    ``inspect.signature`` show ``(self, vm_id, gpa, ...)`` rather than ``(*args, **kwargs)``."""
    signature = inspect.signature(builder)
    returns = signature.return_annotation  # "Op[X]": the method returns (or awaits to) the parsed X
    if isinstance(returns, str) and returns.startswith("Op[") and returns.endswith("]"):
        returns = returns[3:-1]
    method.__name__, method.__qualname__, method.__doc__ = builder.__name__, builder.__name__, builder.__doc__
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[_SELF, *signature.parameters.values()], return_annotation=returns
    )
    return method


def _service_app() -> Any:
    """A fresh app of the kvm-memattr service, for ``in_process()``: imported now, since the client
    distribution does not ship it, and only from the service's own distribution."""
    if __name__.partition(".")[0] != "app":  # the client alone (kvm_memattr_client): is the service here too?
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            distribution("kvm-memattr")
        except PackageNotFoundError:
            raise RuntimeError(
                "in_process() runs the kvm-memattr service inside this process, and it is not installed"
                " here (kvm-memattr-client is the client alone): install the service beside it"
                " (pip install kvm-memattr) or use Client(url) against a running one"
            ) from None
    try:
        from app.main import create_app
        from app.settings import Settings
    except ImportError as e:
        raise RuntimeError(
            f"in_process() cannot import the kvm-memattr service ({e}); where a project's own `app`"
            " package shadows the service's, use Client(url) against a running service"
        ) from e
    return create_app(Settings(log_level="warning"))


class Client:
    """Synchronous client. ``Client(url)`` talks to a server; ``Client.in_process()`` to an app in this process."""

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        http: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        url = url or os.environ.get("KVM_MEMATTR_URL") or DEFAULT_URL
        self.http = http or httpx.Client(
            base_url=url, headers=_headers(token), timeout=30.0, verify=_verify(url), transport=transport
        )

    @classmethod
    def in_process(cls, app: Any = None) -> Client:
        """A client onto an ASGI app in this process (a fresh ``create_app()`` by default): no server needed."""
        app = app or _service_app()
        from .inprocess import InProcessTransport

        transport = InProcessTransport(app)
        return cls(http=httpx.Client(transport=transport, base_url="http://localhost"))

    def send(self, op: Op[T]) -> T:
        """Make the call and parse its answer into the operation's model."""
        return _result(op, self.http.request(op.method, op.path, json=op.json, params=op.params))

    def send_json(self, op: Op[Any]) -> Any:
        """Make the call and return its JSON as is: no pydantic (the CLI's way)."""
        return _json(self.http.request(op.method, op.path, json=op.json, params=op.params))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    healthz = _sync(ops.healthz)
    health = healthz  # the CLI's name for it
    capabilities = _sync(ops.capabilities)
    list_host_profiles = _sync(ops.list_host_profiles)
    get_host_profile = _sync(ops.get_host_profile)
    create_vm = _sync(ops.create_vm)
    list_vms = _sync(ops.list_vms)
    get_vm = _sync(ops.get_vm)
    delete_vm = _sync(ops.delete_vm)
    delete_all_vms = _sync(ops.delete_all_vms)
    get_vm_snapshot = _sync(ops.get_vm_snapshot)
    import_vm = _sync(ops.import_vm)
    reset = _sync(ops.delete_all_vms)
    vm_capabilities = _sync(ops.vm_capabilities)
    set_memslot = _sync(ops.set_memslot)
    list_memslots = _sync(ops.list_memslots)
    get_memslot = _sync(ops.get_memslot)
    delete_memslot = _sync(ops.delete_memslot)
    create_guest_memfd = _sync(ops.create_guest_memfd)
    list_guest_memfds = _sync(ops.list_guest_memfds)
    get_guest_memfd = _sync(ops.get_guest_memfd)
    close_guest_memfd = _sync(ops.close_guest_memfd)
    fallocate_guest_memfd = _sync(ops.fallocate_guest_memfd)
    get_guest_memfd_pages = _sync(ops.get_guest_memfd_pages)
    mmap_guest_memfd = _sync(ops.mmap_guest_memfd)
    list_host_mappings = _sync(ops.list_host_mappings)
    get_host_mapping = _sync(ops.get_host_mapping)
    touch_host_mapping = _sync(ops.touch_host_mapping)
    munmap_host_mapping = _sync(ops.munmap_host_mapping)
    set_guest_memfd_memory_attributes = _sync(ops.set_guest_memfd_memory_attributes)
    pin_host_mapping = _sync(ops.pin_host_mapping)
    list_host_pins = _sync(ops.list_host_pins)
    get_host_pin = _sync(ops.get_host_pin)
    unpin_host_pin = _sync(ops.unpin_host_pin)
    reg_region = _sync(ops.reg_region)
    unreg_region = _sync(ops.unreg_region)
    list_enc_regions = _sync(ops.list_enc_regions)
    set_memory_attributes = _sync(ops.set_memory_attributes)
    get_memory_attributes = _sync(ops.get_memory_attributes)
    get_gfn = _sync(ops.get_gfn)
    get_mmu = _sync(ops.get_mmu)
    get_mappings = _sync(ops.get_mappings)
    get_memory_map = _sync(ops.get_memory_map)
    get_events = _sync(ops.get_events)
    fault = _sync(ops.fault)
    prefault = _sync(ops.prefault)
    start_invalidation = _sync(ops.start_invalidation)
    end_invalidation = _sync(ops.end_invalidation)
    list_invalidations = _sync(ops.list_invalidations)
    set_fault_injection = _sync(ops.set_fault_injection)
    get_fault_injection = _sync(ops.get_fault_injection)
    list_explorer_variants = _sync(ops.list_explorer_variants)
    run_explorer = _sync(ops.run_explorer)


class AsyncClient:
    """Asynchronous client; the same operations as :class:`Client`, awaited."""

    def __init__(
        self, url: str | None = None, *, token: str | None = None, http: httpx.AsyncClient | None = None
    ) -> None:
        url = url or os.environ.get("KVM_MEMATTR_URL") or DEFAULT_URL
        self.http = http or httpx.AsyncClient(base_url=url, headers=_headers(token), timeout=30.0, verify=_verify(url))
        self._app: Any = None  # in process: the app whose lifespan ``async with`` runs
        self._lifespan: Any = None

    @classmethod
    def in_process(cls, app: Any = None) -> AsyncClient:
        """A client onto an ASGI app in this process (``httpx.ASGITransport``); ``async with`` runs
        the app's lifespan (asgi-lifespan), as a server would."""
        asgi_app = app or _service_app()
        transport = httpx.ASGITransport(app=asgi_app)
        client = cls(http=httpx.AsyncClient(transport=transport, base_url="http://localhost"))
        client._app = asgi_app
        return client

    async def send(self, op: Op[T]) -> T:
        return _result(op, await self.http.request(op.method, op.path, json=op.json, params=op.params))

    async def aclose(self) -> None:
        await self.http.aclose()
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)
            self._lifespan = None

    async def __aenter__(self) -> Self:
        if self._app is not None:
            from asgi_lifespan import LifespanManager

            self._lifespan = LifespanManager(self._app)
            await self._lifespan.__aenter__()
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    healthz = _async(ops.healthz)
    health = healthz  # the CLI's name for it
    capabilities = _async(ops.capabilities)
    list_host_profiles = _async(ops.list_host_profiles)
    get_host_profile = _async(ops.get_host_profile)
    create_vm = _async(ops.create_vm)
    list_vms = _async(ops.list_vms)
    get_vm = _async(ops.get_vm)
    delete_vm = _async(ops.delete_vm)
    delete_all_vms = _async(ops.delete_all_vms)
    get_vm_snapshot = _async(ops.get_vm_snapshot)
    import_vm = _async(ops.import_vm)
    reset = _async(ops.delete_all_vms)
    vm_capabilities = _async(ops.vm_capabilities)
    set_memslot = _async(ops.set_memslot)
    list_memslots = _async(ops.list_memslots)
    get_memslot = _async(ops.get_memslot)
    delete_memslot = _async(ops.delete_memslot)
    create_guest_memfd = _async(ops.create_guest_memfd)
    list_guest_memfds = _async(ops.list_guest_memfds)
    get_guest_memfd = _async(ops.get_guest_memfd)
    close_guest_memfd = _async(ops.close_guest_memfd)
    fallocate_guest_memfd = _async(ops.fallocate_guest_memfd)
    get_guest_memfd_pages = _async(ops.get_guest_memfd_pages)
    mmap_guest_memfd = _async(ops.mmap_guest_memfd)
    list_host_mappings = _async(ops.list_host_mappings)
    get_host_mapping = _async(ops.get_host_mapping)
    touch_host_mapping = _async(ops.touch_host_mapping)
    munmap_host_mapping = _async(ops.munmap_host_mapping)
    set_guest_memfd_memory_attributes = _async(ops.set_guest_memfd_memory_attributes)
    pin_host_mapping = _async(ops.pin_host_mapping)
    list_host_pins = _async(ops.list_host_pins)
    get_host_pin = _async(ops.get_host_pin)
    unpin_host_pin = _async(ops.unpin_host_pin)
    reg_region = _async(ops.reg_region)
    unreg_region = _async(ops.unreg_region)
    list_enc_regions = _async(ops.list_enc_regions)
    set_memory_attributes = _async(ops.set_memory_attributes)
    get_memory_attributes = _async(ops.get_memory_attributes)
    get_gfn = _async(ops.get_gfn)
    get_mmu = _async(ops.get_mmu)
    get_mappings = _async(ops.get_mappings)
    get_memory_map = _async(ops.get_memory_map)
    get_events = _async(ops.get_events)
    fault = _async(ops.fault)
    prefault = _async(ops.prefault)
    start_invalidation = _async(ops.start_invalidation)
    end_invalidation = _async(ops.end_invalidation)
    list_invalidations = _async(ops.list_invalidations)
    set_fault_injection = _async(ops.set_fault_injection)
    get_fault_injection = _async(ops.get_fault_injection)
    list_explorer_variants = _async(ops.list_explorer_variants)
    run_explorer = _async(ops.run_explorer)


__all__ = ["AsyncClient", "Client", "KvmMemattrError", "Op"]

"""kvm-memattr's typed client: ``Client`` (sync) and ``AsyncClient``, on httpx, with pydantic models.

    from kvm_memattr_client import Client, KvmMemattrError
    with Client("http://127.0.0.1:8000") as kvm:  # or Client.in_process() where the service is installed
        vm = kvm.create_vm(type="sw_protected", semantics="linux")

``kvm_memattr_client.client`` is the service's ``app.client`` and ``kvm_memattr_client.models`` its
``app.models`` (the answers' models, e.g. ``kvm_memattr_client.models.state.Vm``), the same files
under a name of their own: no ``app`` package, no server.
"""

from .client import DEFAULT_URL, AsyncClient, Client, KvmMemattrError, Op

__all__ = ["DEFAULT_URL", "AsyncClient", "Client", "KvmMemattrError", "Op"]

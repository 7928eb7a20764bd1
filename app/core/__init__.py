"""The kvm-memattr engine: a virtual KVM memory-attribute controller, no HTTP."""

from app.core.engine import Engine
from app.core.errors import KvmError
from app.core.limits import EngineLimits

__all__ = ["Engine", "EngineLimits", "KvmError"]

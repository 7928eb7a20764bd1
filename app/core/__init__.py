"""The kvm-memattr engine: a virtual KVM memory-attribute controller, no HTTP."""

from app.core.engine import Engine, EngineLimits
from app.core.errors import KvmError

__all__ = ["Engine", "EngineLimits", "KvmError"]

"""Pydantic models mirroring the kernel structs and the VM state."""

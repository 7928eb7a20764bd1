"""Pydantic models mirroring the kernel structs and the VM state; and, pydantic-free for the CLI
and the client, the names every surface shares (``names``) and the explorer's scenario (``scenario``)."""

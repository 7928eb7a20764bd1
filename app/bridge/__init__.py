"""The ``/dev/kvm`` bridge: run an unmodified program with its KVM ioctls answered by the engine.

``kvm-memattr exec -- PROGRAM ARGS...`` forks; the child installs a seccomp filter that hands
``open``/``openat``/``openat2``, every ioctl of KVM's type byte and a few file calls on fds from
``FAKE_FD_BASE`` up to a supervisor (``SECCOMP_FILTER_FLAG_NEW_LISTENER``), then execs the
program. The supervisor, this process, answers them: ``/dev/kvm``, VM, vCPU and guest_memfd fds
are files it injects (``SECCOMP_IOCTL_NOTIF_ADDFD``), struct arguments are read and written in the
program's memory, and each ioctl is decoded exactly as the uapi lays it out and answered by the
engine, in process or in a running service. One module a layer:

- ``seccomp``: the kernel interface (the BPF filter, the listener's ioctls, the program's memory,
  inotify), ctypes and ``fcntl`` only;
- ``backend``: the engine behind the device, in process (``EngineBackend``) or over HTTP
  (``ServiceBackend``), both answering in errno;
- ``device``: the fake files and their ioctls, one method per ioctl, as ``virt/kvm/kvm_main.c``
  decodes them; knows nothing of seccomp;
- ``supervisor``: the launcher and the loop (which call on which file, the fds, releases, exit).

Only the CLI imports this package (lazily: ``kvm-memattr exec``).
"""

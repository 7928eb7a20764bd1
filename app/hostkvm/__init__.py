"""This host's real KVM: a thin ioctl layer (``ioctls``) and a differential check of the engine
against it (``verify``, ``kvm-memattr verify-host``)."""

"""kvm-memattr: a virtual KVM memory-attribute controller behind HTTP."""

"""What the tests and the benches share, and neither owns: a live ``kvm-memattr serve`` in a
subprocess (``live``), Debian's Chromium as both drive it (``chromium``), and the naive per-gfn
model of semantics.md (``reference``: the stateful test's oracle, the engine bench's baseline).

Not part of the product: the package installs ``app`` alone and the image copies ``app/`` alone.
"""

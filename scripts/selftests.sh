#!/usr/bin/env bash
# The kernel's own KVM selftests as a conformance suite of `kvm-memattr exec`: Debian's
# linux-source-6.12, its tools/testing/selftests/kvm built here, run under the bridge on the
# linux-6.12 profile. Every vCPU-free test: all of guest_memfd_test, and the four vCPU-free functions
# of set_memory_region_test through tests/bridge/selftests/set_memory_region_novcpu.c (its main()
# runs vCPU tests first). Nothing of the kernel tree is kept in this repository.
#
#   scripts/selftests.sh            install the source package if needed, build, run; 0 if all pass
#
# Environment: KVM_MEMATTR_SELFTESTS_DIR (default ~/.cache/kvm-memattr/selftests) keeps the
# unpacked tree and the binaries between runs (delete it to rebuild); KVM_MEMATTR (default
# kvm-memattr) is the command that runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
package=linux-source-6.12
tarball=/usr/src/$package.tar.xz
work=${KVM_MEMATTR_SELFTESTS_DIR:-$HOME/.cache/kvm-memattr/selftests}
kvm_memattr=${KVM_MEMATTR:-kvm-memattr}
tree=$work/$package
tests=$tree/tools/testing/selftests/kvm
wrapper=set_memory_region_novcpu

if [ ! -f "$tarball" ]; then
  echo "== apt-get install $package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$package" >/dev/null; }
fi
for tool in gcc make xz; do
  command -v "$tool" >/dev/null || { echo "selftests.sh: $tool is needed" >&2; exit 1; }
done

mkdir -p "$work"
if [ ! -f "$tree/usr/include/linux/kvm.h" ]; then
  echo "== unpack the parts of $tarball the selftests build from, and make headers"
  rm -rf "$tree"
  parts=(Makefile Kbuild Kconfig arch/Kconfig arch/x86 include scripts tools usr)
  nice tar -xJf "$tarball" -C "$work" "${parts[@]/#/$package/}"
  nice make -s -C "$tree" headers >/dev/null
fi

echo "== build guest_memfd_test and $wrapper ($(sed -n 's/^SUBLEVEL = //p' "$tree/Makefile" | sed 's/^/6.12./'))"
cp "$repo/tests/bridge/selftests/$wrapper.c" "$tests/"
nice make -s -j"$(nproc)" -C "$tests" TEST_GEN_PROGS_x86_64="guest_memfd_test $wrapper" \
  "$tests/guest_memfd_test" "$tests/$wrapper" >/dev/null

passed=0 failed=0
for test in guest_memfd_test "$wrapper"; do
  echo "== $kvm_memattr exec --profile linux-6.12 -- $test"
  start=$EPOCHREALTIME
  if (cd "$tests" && $kvm_memattr exec --profile linux-6.12 -- "./$test"); then
    passed=$((passed + 1))
    echo "PASS $test ($(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $start }") s)"
  else
    failed=$((failed + 1))
    echo "FAIL $test"
  fi
done
echo "selftests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

#!/usr/bin/env bash
# Install what pytest-isolate needs on a Debian machine: system packages (as root, via
# apt-get) and a virtualenv with the plugin and its test tools. Idempotent and quiet
# when everything is already there. Sourced by test.sh and demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
command -v linux.uml >/dev/null 2>&1 || need_apt+=(user-mode-linux)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing system packages (${need_apt[*]}); run as root or: sudo apt-get install ${need_apt[*]}" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Test tools at the versions in scripts/constraints.txt (the set the suite last passed
# with), or the newest ones with ISOLATE_UNPINNED=1.
if [ "${ISOLATE_UNPINNED:-0}" = 1 ]; then
  pins=(--upgrade --upgrade-strategy eager)
  stamp=.venv/.installed-unpinned-$(date +%F)-$(sha1sum pyproject.toml | cut -c1-12)
else
  pins=(-c scripts/constraints.txt)
  stamp=.venv/.installed-$(cat pyproject.toml scripts/constraints.txt | sha1sum | cut -c1-12)
fi
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q "${pins[@]}" -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# No PATH change: the plugin looks for a UML kernel beside the interpreter it runs with
# (.venv/bin, where scripts/uml-kernel.sh puts one) before PATH, and the tests start
# their subprocesses with sys.executable. uml_kernel: the kernel the plugin would boot.
uml_kernel() {
  .venv/bin/python -c 'from pytest_isolate.tiers import uml_kernel
print(uml_kernel.find_kernel())' 2>/dev/null || echo "(none)"
}
# A UML kernel that boots on this CPU: Debian 12's panics on AVX-512/AMX hosts
# ("ptrace set fp regs failed"); then fetch a newer one into .venv (scripts/uml-kernel.sh).
uml_probe() {
  .venv/bin/python -c 'from pytest_isolate.tiers import uml_kernel
try:
    print(uml_kernel.boot_probe(uml_kernel.find_kernel()) or "ok")
except Exception as e:
    print(e)'
}
# A kernel that boots but predates UML's seccomp mode (6.16) traps every guest system
# call with ptrace: ~3x slower per test. As root, fetch the newer one then too; keep
# the old one if that fails or the new one does not boot here.
uml_seccomp() {
  .venv/bin/python -c 'from pytest_isolate.tiers import uml_kernel
print("yes" if uml_kernel.seccomp_mode(uml_kernel.find_kernel()) else "no")' 2>/dev/null || echo no
}
if command -v linux.uml >/dev/null 2>&1 || [ -x .venv/bin/linux.uml ]; then
  uml_why=$(uml_probe)  # one probe boot (~1 s); say why once, not boot again to say it
  if [ "$uml_why" != ok ]; then
    echo "setup: $uml_why"
    bash scripts/uml-kernel.sh --force
    echo "setup: uml kernel check: $(uml_probe)"
  elif [ "$(uml_seccomp)" = no ] && [ "$(id -u)" = 0 ] && [ ! -e .venv/.uml-kernel-tried ]; then
    echo "setup: $(uml_kernel) has no seccomp mode (UML < 6.16); fetching a newer kernel"
    touch .venv/.uml-kernel-tried  # once per venv, also when it fails
    if bash scripts/uml-kernel.sh --force && [ "$(uml_probe)" = ok ]; then
      echo "setup: uml kernel: $(uml_kernel)"
    else
      rm -f .venv/bin/linux.uml
      echo "setup: keeping $(uml_kernel) (ptrace mode)"
    fi
  fi
fi

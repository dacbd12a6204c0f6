#!/usr/bin/env bash
# A User-Mode Linux kernel that runs on this CPU, installed into .venv/ (never system-wide).
#
# Why: Debian 12's linux.uml (6.1) and Debian 13's (6.12) panic on CPUs whose XSAVE area
# is larger than they expect (AVX-512, AMX): "userspace - ptrace set fp regs failed,
# errno = 14". Newer UML kernels size it from the host. This script takes Debian
# unstable's user-mode-linux package and the C library it was built against, unpacks
# both under .venv/uml/, points the kernel's ELF interpreter at that C library
# (patchelf), and links .venv/bin/linux.uml to it. The host's own packages are untouched.
#
# Usage: bash scripts/uml-kernel.sh [--force]   (sourced by setup.sh when needed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dest=.venv/uml
if [ -x "$dest/usr/bin/linux.uml" ] && [ "${1:-}" != "--force" ]; then
  exit 0
fi
if ! command -v patchelf >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq patchelf >/dev/null
  else
    echo "uml-kernel: patchelf is missing: sudo apt-get install patchelf" >&2
    exit 1
  fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/uml-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/debs"
echo "deb http://deb.debian.org/debian sid main" >"$work/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
  -o APT::Sandbox::User=root -q
)
echo "uml-kernel: fetching user-mode-linux and libc6 from Debian unstable into $dest"
apt-get "${apt_opts[@]}" update >/dev/null
(cd "$work/debs" && apt-get "${apt_opts[@]}" download user-mode-linux/sid libc6/sid >/dev/null)

rm -rf "$dest.new"
mkdir -p "$dest.new"
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$dest.new"
done
lib="$(realpath "$dest")/usr/lib/x86_64-linux-gnu"
patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --set-rpath "$lib" "$dest.new/usr/bin/linux.uml"
rm -rf "$dest"
mv "$dest.new" "$dest"
mkdir -p .venv/bin
ln -sf ../uml/usr/bin/linux.uml .venv/bin/linux.uml
echo "uml-kernel: $(.venv/bin/linux.uml --version) in .venv/bin/linux.uml"

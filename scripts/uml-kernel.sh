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
# Where from: the Debian archive this machine's apt already uses (apt reads its own
# sources: sources.list, sources.list.d/*.list and deb822 *.sources), with "sid" as the
# suite, so a mirror, an apt-cacher URI or an apt proxy (Acquire::http::Proxy) set up
# for apt applies here too. apt runs with a sources list, state and cache of its own in
# a temp dir: the system's apt configuration and lists are not changed. A machine whose
# sources hold no Debian archive (Ubuntu) gets http://deb.debian.org/debian.
# The archive's key: /usr/share/keyrings/debian-archive-keyring.gpg (Debian; Ubuntu
# with the package debian-archive-keyring installed), else taken out of the
# debian-archive-keyring package of the machine's own archive (Ubuntu's universe).
#
# Usage: bash scripts/uml-kernel.sh [--force]   (sourced by setup.sh when needed)
# Environment: UML_KERNEL_MIRROR=URL   the Debian archive to use (e.g. http://mirror/debian)
#              UML_KERNEL_KEYRING=FILE  the keyring that signs it
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dest=.venv/uml
if [ -x "$dest/usr/bin/linux.uml" ] && [ "${1:-}" != "--force" ]; then
  exit 0
fi
as_root() { [ "$(id -u)" = 0 ]; }
if ! command -v patchelf >/dev/null 2>&1; then
  if as_root; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq patchelf >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq patchelf >/dev/null; }
  else
    echo "uml-kernel: patchelf is missing: sudo apt-get install patchelf" >&2
    exit 1
  fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/uml-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/state/lists/partial" "$work/cache/archives/partial" "$work/debs" \
  "$work/keyring" "$work/empty"

# The Debian archive among the machine's apt sources: apt lists them itself. First by
# what the downloaded Release files say (Origin and Label "Debian": not the security
# archive, not backports), else, before any apt-get update, by the suite's name.
debian_suites='^(sid|unstable|experimental|testing|stable|oldstable|oldoldstable|buster|bullseye|bookworm|trixie|forky|duke)(-updates|-proposed-updates|-backports)?$'
# shellcheck disable=SC2016  # $(FIELD) is apt's format syntax, not the shell's
debian_mirror() {
  {
    apt-get indextargets --format '$(TARGET_OF) $(ORIGIN) $(LABEL) $(REPO_URI)' 2>/dev/null \
      | awk '$1 == "deb" && $2 == "Debian" && $3 == "Debian" { print $4 }'
    apt-get indextargets --no-release-info --format '$(TARGET_OF) $(RELEASE) $(REPO_URI)' \
      2>/dev/null | awk -v re="$debian_suites" '$1 == "deb" && $2 ~ re { print $3 }'
  } | head -n 1
}
# Shown without user:password@ in case the URI holds them.
shown() { sed -E 's#://[^/@]*@#://#' <<<"$1"; }

if [ -n "${UML_KERNEL_MIRROR:-}" ]; then
  mirror=$UML_KERNEL_MIRROR
  echo "uml-kernel: Debian archive $(shown "$mirror") (UML_KERNEL_MIRROR)"
else
  mirror=$(debian_mirror || true)
  if [ -n "$mirror" ]; then
    echo "uml-kernel: Debian archive $(shown "$mirror") (from this machine's apt sources)"
  else
    mirror=http://deb.debian.org/debian
    echo "uml-kernel: no Debian archive in this machine's apt sources; using $mirror" \
      "(UML_KERNEL_MIRROR=URL picks another)"
  fi
fi

debian_keyring() {
  if [ -n "${UML_KERNEL_KEYRING:-}" ]; then
    echo "$UML_KERNEL_KEYRING"
    return
  fi
  local k
  for k in /usr/share/keyrings/debian-archive-keyring.gpg \
           /usr/share/keyrings/debian-archive-keyring.pgp; do
    if [ -r "$k" ]; then
      echo "$k"
      return
    fi
  done
  # Not installed (Ubuntu): the package from the machine's own, trusted archive,
  # unpacked here only. Its lists may be missing on a fresh machine: update them once.
  echo "uml-kernel: no Debian archive keyring installed; taking it from the package" \
    "debian-archive-keyring" >&2
  local get=(apt-get -q -o APT::Sandbox::User=root download debian-archive-keyring)
  if ! (cd "$work/keyring" && "${get[@]}" >/dev/null 2>&1); then
    as_root && apt-get update -qq >/dev/null 2>&1 || true
    (cd "$work/keyring" && "${get[@]}" >/dev/null) || return 1
  fi
  dpkg-deb -x "$work"/keyring/debian-archive-keyring_*.deb "$work/keyring/root"
  for k in "$work"/keyring/root/usr/share/keyrings/debian-archive-keyring.{gpg,pgp}; do
    if [ -f "$k" ]; then
      echo "$k"
      return
    fi
  done
  return 1
}
if ! keyring=$(debian_keyring); then
  echo "uml-kernel: no keyring for the Debian archive: install it" \
    "(sudo apt-get install debian-archive-keyring; on Ubuntu it is in universe)" \
    "or set UML_KERNEL_KEYRING=FILE" >&2
  exit 1
fi

arch=$(dpkg --print-architecture)
echo "deb [arch=$arch signed-by=$keyring] $mirror sid main" >"$work/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/empty"
  -o "Dir::Etc::Preferences=$work/empty/none" -o "Dir::Etc::PreferencesParts=$work/empty"
  -o "Dir::State=$work/state" -o "Dir::Cache=$work/cache"
  -o Acquire::Languages=none -o APT::Sandbox::User=root -q
)
echo "uml-kernel: fetching user-mode-linux and libc6 from Debian unstable into $dest"
if ! apt-get "${apt_opts[@]}" update >"$work/update.log" 2>&1 \
  || grep -qE '^(W|E): .*(NO_PUBKEY|not signed|Failed to fetch)' "$work/update.log"; then
  sed 's/^/uml-kernel: apt: /' "$work/update.log" >&2
  echo "uml-kernel: could not read Debian unstable from $(shown "$mirror")" \
    "(keyring $keyring); the kernel in $dest, if any, is kept" >&2
  exit 1
fi
(cd "$work/debs" && apt-get "${apt_opts[@]}" download user-mode-linux/sid libc6/sid >/dev/null)

rm -rf "$dest.new" "$dest.old"
mkdir -p "$dest.new"
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$dest.new"
done
lib="$(realpath -m "$dest")/usr/lib/x86_64-linux-gnu"
patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --set-rpath "$lib" "$dest.new/usr/bin/linux.uml"
# Swap in the new kernel; put the old one back when the new one does not even start.
if [ -e "$dest" ]; then
  mv "$dest" "$dest.old"
fi
mv "$dest.new" "$dest"
if ! version=$("$dest/usr/bin/linux.uml" --version 2>&1); then
  echo "uml-kernel: the new kernel does not start: $version" >&2
  rm -rf "$dest"
  if [ -e "$dest.old" ]; then
    mv "$dest.old" "$dest"
    echo "uml-kernel: kept the previous kernel in $dest" >&2
  fi
  exit 1
fi
rm -rf "$dest.old"
mkdir -p .venv/bin
ln -sf ../uml/usr/bin/linux.uml .venv/bin/linux.uml
echo "uml-kernel: $version in .venv/bin/linux.uml"

#!/usr/bin/env bash
# Installs what building kvtransfer from source needs, on Debian or Ubuntu.
#
#   scripts/setup.sh          install what is missing (as root, or through sudo), then say what is there
#   scripts/setup.sh --check  install nothing: exit 1 with one line naming what is missing and its packages
#
# Each prerequisite is checked by what the build actually uses, not by a file that looks like it:
#   - a C compiler that can build a program (rdma-mummy-sys builds its verbs loader);
#   - cmake and make (rdma-mummy-sys's build script runs cmake with its default Makefile generator);
#   - a libclang that bindgen will open: clang-sys's file names and directories, the libclang-cpp look-alike
#     excluded, and the library must export clang_createIndex;
#   - cargo ≥ 1.85 and Node.js ≥ 18 (not installed here: they come from rustup and Node.js's own packages).
# `npm run build` runs the --check form first, so a missing tool stops the build with one line, never a
# build-script panic. .ci/run runs the installing form.
set -euo pipefail

mode=install
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

# The shared library bindgen's clang-sys would open (it loads libclang at run time), or nothing.
find_libclang() {
  local dirs=() d f
  # LIBCLANG_PATH may name the library itself, or its directory (as clang-sys takes it).
  if [ -n "${LIBCLANG_PATH:-}" ] && [ -f "$LIBCLANG_PATH" ]; then echo "$LIBCLANG_PATH"; return 0; fi
  [ -n "${LIBCLANG_PATH:-}" ] && dirs+=("$LIBCLANG_PATH")
  if command -v llvm-config >/dev/null 2>&1; then dirs+=("$(llvm-config --libdir 2>/dev/null || true)"); fi
  for d in /usr/local/llvm*/lib* /usr/local/lib* /usr/local/lib*/* /usr/local/lib*/*/* /usr/lib* /usr/lib*/* /usr/lib*/*/*; do
    [ -d "$d" ] && dirs+=("$d")
  done
  for d in "${dirs[@]}"; do
    [ -n "$d" ] && [ -d "$d" ] || continue
    for f in "$d"/libclang.so "$d"/libclang-*.so "$d"/libclang.so.* "$d"/libclang-*.so.*; do
      [ -e "$f" ] || continue
      case "$f" in *-cpp.*) continue ;; esac   # libclang-cpp is the C++ API, which bindgen cannot use
      if command -v nm >/dev/null 2>&1; then
        nm -D --defined-only "$f" 2>/dev/null | grep -w clang_createIndex >/dev/null || continue   # grep -q would end nm early (SIGPIPE fails the pipe)
      fi
      echo "$f"
      return 0
    done
  done
  return 1
}

compiles() { # compiles LANGUAGE COMPILER: builds and links a program (COMPILER may be a command line: "ccache gcc")
  local tmp rc
  tmp=$(mktemp -d)
  printf 'int main(void) { return 0; }\n' > "$tmp/main"
  # shellcheck disable=SC2086 # a compiler command line, as CC may hold
  $2 -x "$1" "$tmp/main" -o "$tmp/a.out" >/dev/null 2>&1 && rc=0 || rc=1
  rm -rf "$tmp"
  return $rc
}

version_at_least() { # version_at_least HAVE WANT (dotted numbers)
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" = "$2" ]
}

missing_tools=() missing_pkgs=()
need() { missing_tools+=("$1"); shift; missing_pkgs+=("$@"); }

survey() {
  missing_tools=() missing_pkgs=()
  compiles c "${CC:-cc}" || need "a C compiler (${CC:-cc})" gcc libc6-dev
  command -v cmake >/dev/null || need cmake cmake
  command -v make >/dev/null || need make make
  find_libclang >/dev/null || need "libclang (for bindgen)" libclang-dev
}

toolchains() { # cargo and node: not installed by this script
  local errs=() v
  if ! command -v cargo >/dev/null; then
    errs+=("cargo not found: install Rust 1.85 or later with rustup (https://rustup.rs)")
  else
    v=$(cargo --version | awk '{print $2}')
    version_at_least "${v%%-*}" 1.85.0 || errs+=("cargo $v is too old: kvtransfer needs Rust 1.85 or later (rustup update)")
  fi
  if ! command -v node >/dev/null; then
    errs+=("node not found: install Node.js 18 or later, 20 or later to run the tests (https://nodejs.org)")
  else
    v=$(node --version); v=${v#v}
    version_at_least "$v" 18.0.0 || errs+=("node $v is too old: kvtransfer needs Node.js 18 or later (its tests 20)")
  fi
  if [ ${#errs[@]} -gt 0 ]; then
    printf 'kvtransfer: %s\n' "${errs[@]}" >&2
    return 1
  fi
}

report_missing() {
  local tools pkgs
  tools=$(IFS=,; echo "${missing_tools[*]}" | sed 's/,/, /g')
  pkgs=$(printf '%s\n' "${missing_pkgs[@]}" | awk '!seen[$0]++' | tr '\n' ' ')
  echo "kvtransfer: the build needs ${tools}; install them with \`scripts/setup.sh\` as root (Debian/Ubuntu packages: ${pkgs% })" >&2
}

survey
if [ "$mode" = check ]; then
  toolchains || exit 1
  if [ ${#missing_tools[@]} -gt 0 ]; then report_missing; exit 1; fi
  exit 0
fi

if [ ${#missing_tools[@]} -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    # Through sudo: asking for a password where someone can type it, never where nobody can.
    if command -v sudo >/dev/null && [ -t 0 ]; then sudo=(sudo)
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=(sudo -n)
    else report_missing; exit 1; fi
  fi
  if ! command -v apt-get >/dev/null; then
    report_missing
    echo "kvtransfer: this machine has no apt-get: install the equivalent packages with its own package manager" >&2
    exit 1
  fi
  pkgs=$(printf '%s\n' "${missing_pkgs[@]}" | awk '!seen[$0]++' | tr '\n' ' ')
  echo "kvtransfer setup: installing ${pkgs% }"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  # shellcheck disable=SC2086 # one word per package
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  survey
  if [ ${#missing_tools[@]} -gt 0 ]; then
    echo "kvtransfer setup: installed the packages, yet still missing:" >&2
    report_missing
    exit 1
  fi
fi
toolchains
echo "kvtransfer setup: build prerequisites present (cargo $(cargo --version | awk '{print $2}'), node $(node --version), cmake $(cmake --version | awk 'NR==1{print $3}'), libclang $(find_libclang))"

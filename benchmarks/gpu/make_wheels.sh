#!/usr/bin/env bash
# Builds .whl/ in the project root: the packages of benchmarks/gpu/wheels.txt for the GPU machine (Python 3.12,
# x86-64, no network there). Run here, where pip reaches the index:  make gpu-wheels
# Binary packages are downloaded for cp312 manylinux; a package published only as a source archive (deepspeed,
# sqlitedict, word2number, rouge-score) is built here into a pure-Python wheel (deepspeed compiles its ops at
# run time, on the GPU machine). Then benchmarks/gpu/check_wheels.sh installs them into a Python 3.12 that
# mimics the GPU image and imports everything, so a device call never fails on a missing package.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p "$out"
plat=()
for n in 17 24 27 28 31 34; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
have() {  # a wheel of this name and version is already in .whl/
  local n; n=$(echo "$1" | tr 'A-Z-' 'a-z_')
  ls "$out" | tr 'A-Z-' 'a-z_' | grep -q "^${n}-${2}-"
}
grep -v '^\s*#' benchmarks/gpu/wheels.txt | grep -v '^\s*$' | while read -r spec; do
  name=${spec%%==*}; version=${spec##*==}
  if have "$name" "$version"; then continue; fi
  if python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${plat[@]}" -d "$out" "$spec" 2>/dev/null; then
    echo "downloaded $spec"
  else
    rm -rf "$tmp"/*
    python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$tmp" "$spec"
    python3 -m pip wheel -q --disable-pip-version-check --no-deps -w "$out" "$tmp"/*
    echo "built $spec from its source archive"
  fi
done
du -sh "$out"
size=$(du -sm "$out" | cut -f1)
if [ "$size" -ge 60 ]; then echo "error: $out is ${size} MiB; a device call carries at most 64 MiB" >&2; exit 1; fi
echo
echo "Carry .whl on each device call (carry: [\".whl\"]) and start its command with:"
echo '  bash benchmarks/gpu/session.sh STAGES   (it installs .whl into /tmp/site itself)'

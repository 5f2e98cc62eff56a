#!/usr/bin/env bash
# Build the non-Python shards of the training corpus on a machine that reaches the Debian
# and npm registries; the result (.work/carry/shards/*.jsonl.xz) is carried to the GPU box.
# Run from the repository root: bash models/train/build_carry.sh   (needs apt-get, dpkg, npm)
set -euo pipefail
WORK=${WORK:-.work}
OUT=$WORK/carry/shards
mkdir -p "$WORK/debs" "$WORK/src" "$WORK/npm" "$OUT"
CORPUS="python3 -m models.train.corpus"

DEBS="golang-1.19-src rust-src openjdk-17-source glibc-source linux-source-6.1 libc6-dev
      libabsl-dev libgtest-dev libboost1.81-dev libeigen3-dev libstdc++-12-dev"
(cd "$WORK/debs" && apt-get download $DEBS)
for deb in "$WORK"/debs/*.deb; do
  dir="$WORK/src/$(basename "$deb" .deb)"
  [ -d "$dir" ] || { mkdir -p "$dir" && dpkg -x "$deb" "$dir"; }
done
NPM="react react-dom vue @vue/runtime-core @vue/reactivity @vue/compiler-core typescript rxjs
     three d3-array d3-scale d3-shape d3-selection jquery @types/node @types/react eslint webpack
     preact redux @reduxjs/toolkit immer zod date-fns mobx svelte @angular/core ramda underscore
     vitest prettier @babel/parser acorn esprima marked highlight.js socket.io ws graphql uuid semver"
(cd "$WORK/npm" && ls ./*.tgz >/dev/null 2>&1 || npm pack $NPM >/dev/null)

S=$WORK/src
XZ="--compression xz --out $OUT"
$CORPUS files $XZ --prefix go --root "$(echo $S/golang-1.19-src_*/usr/share/go-1.19/src)" \
  --name golang-1.19-src --version 1.19.8 --path-prefix src/ --exclude testdata \
  --keep-fraction 0.8 --max-bytes 30000000
$CORPUS files $XZ --prefix rust --root "$(echo $S/rust-src_*/usr/src/rustc-*)" \
  --name rust-src --version 1.63.0 --include library/ compiler/ src/librustdoc/ \
  --exclude vendor tests --max-bytes 25000000
$CORPUS files $XZ --prefix java --root "$(echo $S/openjdk-17-source_*/usr/lib/jvm/openjdk-17/lib/src.zip)" \
  --name openjdk-17-source --version 17.0.21 --keep-fraction 0.25 --max-bytes 30000000
$CORPUS files $XZ --prefix c-linux --root "$(echo $S/linux-source-6.1_*/usr/src/linux-source-6.1.tar.xz)" \
  --name linux-source-6.1 --version 6.1 --keep-fraction 0.5 --max-bytes 25000000 \
  --include linux-source-6.1/kernel/ linux-source-6.1/mm/ linux-source-6.1/fs/ linux-source-6.1/lib/ \
  linux-source-6.1/net/core/ linux-source-6.1/net/ipv4/ linux-source-6.1/block/ linux-source-6.1/ipc/ \
  linux-source-6.1/crypto/ linux-source-6.1/init/ linux-source-6.1/include/linux/ linux-source-6.1/drivers/base/
$CORPUS files $XZ --prefix c-glibc --root "$(echo $S/glibc-source_*/usr/src/glibc/glibc-*.tar.xz)" \
  --name glibc-source --version 2.36 --max-bytes 8000000 --keep-fraction 0.5
$CORPUS files $XZ --prefix c-libc6-dev --root "$(echo $S/libc6-dev_*/usr/include)" \
  --name libc6-dev --version 2.36 --path-prefix include/
$CORPUS files $XZ --prefix cpp-boost --root "$(echo $S/libboost1.81-dev_*/usr/include)" \
  --name libboost1.81-dev --version 1.81.0 --lang cpp --keep-fraction 0.08 --max-bytes 8000000
for pkg in libabsl-dev libgtest-dev libeigen3-dev libstdc++-12-dev; do
  $CORPUS files $XZ --prefix "cpp-$pkg" --root "$(echo $S/${pkg}_*/usr)" --name "$pkg" --lang cpp \
    --max-bytes 3000000
done
$CORPUS npm $XZ --prefix npm --tgz "$WORK"/npm/*.tgz --max-bytes 30000000 --max-source-bytes 3000000
$CORPUS manifest "$OUT"
du -sh "$OUT"

#!/bin/sh
# Builds and runs the host-emulated kernel tests (optionally one group: small gemm grouped attn
# router dispatch loss bwd-small bwd-gemm bwd-attn bwd-router bwd-loss optim). SAN=1 adds AddressSanitizer/UBSan (catches out-of-bounds global reads).
set -e
here=$(cd "$(dirname "$0")" && pwd)
flags="-std=c++17 -O1 -g"
[ "${SAN:-0}" = 1 ] && flags="$flags -fsanitize=address,undefined -fno-sanitize=alignment"
out=${TMPDIR:-/tmp}/vpmoe-host-emu-test
g++ $flags -I"$here/inc" -I"$here/.." -o "$out" "$here/test.cpp" "$here/emu.cpp"
exec "$out" "$@"

#!/bin/sh
# Builds and runs the host-emulated kernel tests (optionally one group: small gemm grouped attn
# router dispatch loss bwd-small bwd-gemm bwd-attn bwd-router bwd-loss optim, as `--groups`
# lists them, or a broken-* group of deliberately wrong kernels). SAN=address adds AddressSanitizer/UBSan (out-of-bounds global
# reads); SAN=thread builds the kernels under ThreadSanitizer (races; emu.cpp's EMU_TSAN). The
# schedule follows VPMOE_EMU_SEED and VPMOE_EMU_MODE (emu.cpp). A build is reused while no source
# is newer.
set -e
here=$(cd "$(dirname "$0")" && pwd)
flags="-std=c++17 -O1 -g -I$here/inc -I$here/.."
link="-Wl,-T,$here/shared.ld"
san=${SAN:-none}
out=${TMPDIR:-/tmp}/vpmoe-host-emu-test-$san
if [ ! -x "$out" ] || [ -n "$(find "$here" "$here/.." -maxdepth 1 -newer "$out" -type f)" ] || [ -n "$(find "$here/inc" -newer "$out" -type f)" ]; then
    case $san in
    none) g++ $flags -o "$out" "$here/test.cpp" "$here/emu.cpp" $link ;;
    address) g++ $flags -fsanitize=address,undefined -fno-sanitize=alignment -o "$out" "$here/test.cpp" "$here/emu.cpp" $link ;;
    thread)
        g++ $flags -DEMU_TSAN -c -o "$out.emu.o" "$here/emu.cpp"
        g++ $flags -fsanitize=thread -o "$out" "$here/test.cpp" "$out.emu.o" $link ;;
    *) echo "run.sh: SAN=$san is not one of address, thread" >&2; exit 2 ;;
    esac
fi
exec "$out" "$@"

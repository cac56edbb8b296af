#!/usr/bin/env bash
# Installs smpft as an emulator libvirt can run: the binary, the QEMU persona link libvirt
# names in a domain's <emulator>, and the qemu hook that hands FT settings to smpft. libvirt's qemu.conf needs no change: smpft runs as
# libvirt-qemu in group kvm, as QEMU does, and gets its taps and monitor socket from libvirt.
#
#   contrib/libvirt/install.sh [SMPFT_BINARY] [--default-emulator]
#
# --default-emulator also links /usr/local/bin/qemu-system-x86_64, so that libvirtd (when
# /usr/local/bin comes first in its PATH) lists smpft in `virsh capabilities` and uses it for
# x86_64 domains that name no <emulator>. Leave it out on hosts that also run QEMU guests.
set -euo pipefail

bin="" default=0
for a in "$@"; do
    case "$a" in
        --default-emulator) default=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) bin="$a" ;;
    esac
done
if [[ -z $bin ]]; then
    here="$(cd "$(dirname "$0")/../.." && pwd)"
    bin="$here/target/release/smpft"
    [[ -x $bin ]] || (cd "$here" && cargo build --release -p smp-ft >&2)
fi
[[ -x $bin ]] || { echo "install.sh: $bin is not an executable smpft binary" >&2; exit 1; }

install -m 0755 "$bin" /usr/local/bin/smpft
ln -sf /usr/local/bin/smpft /usr/local/bin/smpft-qemu
echo "installed /usr/local/bin/smpft and the persona /usr/local/bin/smpft-qemu (use it as <emulator>)"
hooks=/etc/libvirt/hooks
mkdir -p "$hooks"
if [[ -e $hooks/qemu ]] && ! grep -q "smpft" "$hooks/qemu"; then
    echo "install.sh: $hooks/qemu exists and is not smpft's: merge contrib/libvirt/hooks/qemu into it by hand" >&2
else
    install -m 0755 "$(dirname "$0")/hooks/qemu" "$hooks/qemu"
    echo "installed the qemu hook $hooks/qemu (FT settings from domain metadata): restart libvirtd"
fi
if ((default)); then
    ln -sf /usr/local/bin/smpft /usr/local/bin/qemu-system-x86_64
    echo "linked /usr/local/bin/qemu-system-x86_64: restart libvirtd for virsh capabilities to list it"
fi
# libvirt caches what it probed per emulator path, keyed on the file's ctime: a new binary is
# probed again at the next use.

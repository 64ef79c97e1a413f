#!/bin/bash
# PID 1 of the guest started by scripts/uml-guest (or, with GUEST_KIND=qemu, by
# scripts/qemu-guest on Debian's own kernel): prepare a minimal system, run the job from
# $UML_GUEST_DIR/job, leave its exit code in $UML_GUEST_DIR/status and power off.
# PID 1 must never exit (the kernel would panic), so every path ends in halt.
set -u
kind=${GUEST_KIND:-uml}

stop() {
    sync                          # hostfs writes sit in the guest's page cache until synced
    echo 0 >/proc/sys/kernel/printk # no "reboot: System halted" after the job's output
    if [[ $kind == qemu ]]; then exec poweroff -f >/dev/null 2>&1; fi # halt leaves qemu running
    exec halt -f >/dev/null 2>&1
}
fail() {
    echo "uml-guest init: $*" >&2
    stop
}

exec </dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
stty -F /dev/console -onlcr # no CR before every LF in the host's copy of the output

guest=/run/uml-guest
mkdir -p "$guest/bin"
if [[ $kind == qemu ]]; then
    # The root is the host's over 9p, where AF_UNIX sockets (charon's VICI) cannot live.
    # The host's /tmp stays reachable below /run: a checkout there is bound back below.
    mkdir -p /run/host-tmp && mount --bind /tmp /run/host-tmp
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    # A distribution kernel: modules load from /lib/modules the real way. First what udev
    # loads at a node's boot for its CPU (AES-NI, ...), then only the `modules` init
    # container's own script; the kernel's own requests go to /sbin/modprobe as usual.
    modprobe -a -q "$(</sys/devices/system/cpu/modalias)"
    sh -c "$(<"$UML_GUEST_DIR/modules.sh")" >"$guest/modules.log" 2>&1
    echo $? >"$guest/modules.status"
else
    # Modules live in $UML_MODULES/<version> (from scripts/uml-guest: Debian's
    # /usr/lib/uml/modules or the ones next to a kernel built by scripts/uml-kernel); modprobe
    # only looks below <dir>/lib/modules. The kernel itself asks for modules too (cryptomgr,
    # gcm, ... when an AEAD SA is added), so the same wrapper goes into /proc/sys/kernel/modprobe.
    release=$(uname -r)
    mkdir -p "$guest/modules/lib/modules"
    ln -s "${UML_MODULES:-/usr/lib/uml/modules}/$release" "$guest/modules/lib/modules/$release"
    printf '#!/bin/sh\nexec /sbin/modprobe -d %s "$@"\n' "$guest/modules" >"$guest/bin/modprobe"
    chmod +x "$guest/bin/modprobe"
    echo "$guest/bin/modprobe" >/proc/sys/kernel/modprobe
    modules=(
        xfrm_user esp4 ipip # IPsec and Calico's tunl0
        # AES-GCM ESP and the stdrng its IVs come from: loaded now, the first SA waits for fewer
        # modprobe calls (the kernel still asks for each template it instantiates, ~70 ms each)
        gcm ctr ghash-generic seqiv drbg hmac sha512_generic
        veth bridge # the nodes' links
        x_tables ip_tables iptable_filter iptable_raw xt_policy xt_comment # iptables-legacy counters
    )
    "$guest/bin/modprobe" -a "${modules[@]}" || fail "loading kernel modules failed"
    # The drbg's noise source. 6.1.192's (SHA3) version, in the kernel scripts/uml-kernel
    # builds, fails its start-up health test now and then under UML; drbg seeds without it.
    for _ in 1 2 3; do "$guest/bin/modprobe" jitterentropy_rng 2>/dev/null && break; done
fi
ip link set lo up

job=${UML_GUEST_DIR:-}
[[ -r $job/job ]] || fail "no job file (UML_GUEST_DIR=$job)"
workdir=
command=()
# shellcheck source=/dev/null
source "$job/job"
export PATH="$guest/bin:$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export OVERLAY_VICI_UML=1
export OVERLAY_VICI_GUEST=$kind
if [[ $kind == qemu && $workdir == /tmp/* ]]; then
    # A checkout below /tmp (a CI clone, say) is hidden by the guest's own /tmp.
    mkdir -p "$workdir"
    mount --bind "/run/host-tmp/${workdir#/tmp/}" "$workdir" ||
        fail "cannot bind the host's $workdir into the guest"
fi
cd "$workdir" || fail "cannot cd to $workdir"
"${command[@]}"
echo $? >"$job/status"
stop

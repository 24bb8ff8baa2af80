#!/bin/sh
# L2 guest script of the `passthrough` scenario (run by the guest init via aivmm.script=).
# Shows the passed-through function as the guest sees it, then drives it with edu-test:
# BAR access, DMA through the host IOMMU and MSI; then, in a second run with the device
# bound to uio_pci_generic (which requests its IRQ), the INTx routing of the DSDT's _PRT
# (not delivery: the rig's INTx stops in L1, see docs/passthrough.md). Stays up a moment
# so L1 can sample the VMM.
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    echo "GUEST-PCI=$(cat "$d/vendor"):$(cat "$d/device")@${d##*/} irq=$(cat "$d/irq")"
done
if [ -x /bin/edu-test ]; then
    /bin/edu-test
    rc=$?
    if insmod /mods/uio.ko && insmod /mods/uio_pci_generic.ko; then
        /bin/edu-test --intx || rc=1
    else
        echo "EDU-TEST FAIL intx: cannot load uio_pci_generic from /mods"
        rc=1
    fi
else
    echo "EDU-TEST FAIL /bin/edu-test is not in the guest image"
    rc=1
fi
sleep "${PASSTHROUGH_CHECK_SLEEP:-3}"
exit "$rc"

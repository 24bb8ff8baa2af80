#!/bin/sh
# L2 guest script of `make demo`: shows what the tenant microVM looks like from inside,
# then returns (the init powers the VM off).
echo "==== aivmm tenant microVM ===="
echo "kernel:  $(uname -srm)"
echo "cmdline: $(cat /proc/cmdline)"
echo "vCPUs:   $(nproc)"
free -m
if grep -q hugetlbfs /proc/mounts; then
    echo "hugetlbfs: mounted on /dev/hugepages"
fi
echo "AIVMM-DEMO-DONE"

# aivmm: the two entry points of the README, and setup.
#   make setup  install host packages (QEMU, busybox-static, cpio), fetch the guest kernel, build
#   make demo   build everything and boot one tenant microVM, showing its console
#   make test   the whole test suite (unit, /dev/kvm and end-to-end rig tests) with a summary

.PHONY: all setup demo test

all: test

setup:
	tests/rig/deps.sh
	cargo build --workspace --all-targets

demo:
	tests/rig/demo.sh

test:
	tests/run.sh

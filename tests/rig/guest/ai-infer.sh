#!/bin/sh
# L2 guest script of the `ai_infer` scenario. Both tenants list their models and run the MLP
# (ONNX) and MiniLM (safetensors) models once, printing the outputs as hex for the host to
# compare with its own run of the same models. Then:
#   ai.role=a  runs a stream of MLP requests that must all succeed (tenant B meanwhile sends
#              garbage);
#   ai.role=b  stops the guest's agent daemon and plays a hostile driver (ai-agent garbage):
#              every malformed chain must get its error, and the device must still serve it.
role=a
for arg in $(cat /proc/cmdline); do
    case $arg in ai.role=*) role=${arg#ai.role=} ;; esac
done
hexout() { od -An -v -tx1 "$1" | tr -d ' \n'; }

echo "GUEST-AI role=$role"
# If the script is still running after 450 s (it needs about 100, 300 on a slow host),
# print what every agent process is blocked on: the rig kills a stuck VM (at 600 s)
# without asking it anything.
(
    sleep 450
    for p in $(pidof ai-agent); do
        echo "GUEST-AI-STUCK pid=$p cmd=$(tr '\0' ' ' <"/proc/$p/cmdline")"
        for t in /proc/"$p"/task/*; do
            echo "GUEST-AI-STUCK   task ${t##*/} $(cut -d' ' -f2,3 "$t/stat") wchan=$(cat "$t/wchan") syscall=$(cat "$t/syscall" 2>/dev/null)"
            sed 's/^/GUEST-AI-STUCK     /' "$t/stack" 2>/dev/null
        done
    done
    timeout 20 ai-agent trace 2>&1 | sed 's/^/GUEST-AI-STUCK trace: /'
) &
watchdog=$!
ai-agent models
echo "GUEST-AI models_rc=$?"
ai-agent infer --model mlp --input /scripts/mlp-input.bin --dtype f32 --shape 2,16 --output /tmp/mlp.out
echo "GUEST-AI infer_mlp_rc=$?"
echo "GUEST-AI-OUT model=mlp hex=$(hexout /tmp/mlp.out)"
ai-agent infer --model all-MiniLM-L6-v2 --input /scripts/sentence.txt --output /tmp/minilm.out
echo "GUEST-AI infer_minilm_rc=$?"
echo "GUEST-AI-OUT model=minilm hex=$(hexout /tmp/minilm.out)"

if [ "$role" = b ]; then
    killall ai-agent 2>/dev/null
    sleep 1
    ai-agent --direct garbage
    echo "GUEST-AI garbage_rc=$?"
else
    ok=0
    n=0
    while [ "$n" -lt "${AI_LOOP:-30}" ]; do
        if ai-agent infer --model mlp --input /scripts/mlp-input.bin --dtype f32 --shape 2,16 \
            --output /tmp/loop.out >/dev/null; then
            cmp -s /tmp/loop.out /tmp/mlp.out && ok=$((ok + 1))
        fi
        n=$((n + 1))
    done
    echo "GUEST-AI loop_ok=$ok loop_n=$n"
fi
ai-agent trace
echo "GUEST-AI trace_rc=$?"
kill "$watchdog" 2>/dev/null
exit 0

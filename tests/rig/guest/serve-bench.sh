#!/bin/sh
# L2 guest script of the serving benchmark (tests/rig/scenarios/serve-bench.sh): the same MLP
# request through `ai-agent bench` (the agent's own path to the device) and through the
# tenant's `ai-agent serve` over HTTP on the guest's loopback (rig-io http-load), at 1, 4 and
# 16 concurrent clients, alternating, for sb.rounds= rounds of sb.n= requests each.
# Prints, per measurement:
#   SB-RUN round=<r> way=agent concurrency=<c> rps=<f> p50_us=<f> p99_us=<f> failed=<n>
#   SB-RUN round=<r> way=http concurrency=<c> rps=<f> p50_us=<n> p99_us=<n> failed=<n>
# and SB-DONE rc=<n> (0 when every request succeeded).

# shellcheck source=tests/rig/guest/lib.sh
. /scripts/lib.sh

n=$(karg sb.n 300)
rounds=$(karg sb.rounds 3)
rc=0
i=0
while ! rig-io http tcp:127.0.0.1:8000 GET /v2/health/ready --timeout 5 >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -lt 120 ] || { echo "SB-DONE rc=1 (the endpoint never became ready)"; exit 1; }
    sleep 1
done

r=1
while [ "$r" -le "$rounds" ]; do
    for c in 1 4 16; do
        out=$(ai-agent bench --model mlp --input /scripts/mlp-input.bin --dtype f32 \
            --shape 2,16 -n "$n" --concurrency "$c" 2>&1)
        rps=$(echo "$out" | sed -n 's/.* s with [0-9]* thread(s): \([0-9.]*\) req\/s.*/\1/p')
        failed=$(echo "$out" | sed -n 's/^[0-9]* requests (\([0-9]*\) not OK).*/\1/p')
        p50=$(echo "$out" | sed -n 's/.* p50 \([0-9.]*\) .*/\1/p')
        p99=$(echo "$out" | sed -n 's/.* p99 \([0-9.]*\) .*/\1/p')
        echo "SB-RUN round=$r way=agent concurrency=$c rps=${rps:-na} p50_us=${p50:-na} p99_us=${p99:-na} failed=${failed:-na}"
        [ "${failed:-1}" = 0 ] || { rc=1; echo "$out" | sed 's/^/SB-AGENT-OUT /'; }

        line=$(rig-io http-load tcp:127.0.0.1:8000 POST /v2/models/mlp/infer \
            --body-file /scripts/serve/mlp-request.json --concurrency "$c" --count "$n" \
            --timeout 120 2>&1 | grep -m 1 '^RIG-IO')
        echo "SB-RUN round=$r way=http concurrency=$c rps=$(field "$line" rps) p50_us=$(field "$line" p50_us) p99_us=$(field "$line" p99_us) failed=$(($(field "$line" requests) - $(field "$line" ok) + $(field "$line" errors)))"
        [ "$(field "$line" ok)" = "$n" ] || { rc=1; echo "SB-HTTP-OUT $line"; }
    done
    r=$((r + 1))
done
echo "SB-DONE rc=$rc"
exit "$rc"

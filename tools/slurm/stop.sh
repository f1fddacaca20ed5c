#!/bin/bash
# Stop the daemons that tools/slurm/start.sh DIR started (by the pids in their pid files).
S="$1"
for name in slurmd slurmctld munged; do
    f="$S/$name.pid"
    if [ -f "$f" ]; then
        pid="$(cat "$f")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$f"
    fi
done

#!/bin/bash
# Bring up a single-node SLURM on this machine with every file under one folder:
#   tools/slurm/start.sh DIR      (then: export SLURM_CONF=DIR/slurm.conf; sinfo; sbatch ...)
#   tools/slurm/stop.sh DIR
# munged + slurmctld + slurmd as the current user (root), no systemd, no cgroups, node on 127.0.0.1,
# CPUs = nproc, partition "debug". Prints the SLURM_CONF line on success; exits 1 (with the daemons'
# logs) when the node does not become idle within 30 s. Recipe: environment-notes.md.
set -euo pipefail
S="$(mkdir -p "$1" && cd "$1" && pwd)"
HOST="$(hostname -s)"
CPUS="$(nproc)"
USER_NAME="$(id -un)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CTLD_PORT="$(free_port)"
SLURMD_PORT="$(free_port)"
mkdir -p "$S/state" "$S/spool" "$S/log"
umask 077
head -c 1024 /dev/urandom > "$S/munge.key"
chmod 400 "$S/munge.key"
munged --key-file="$S/munge.key" --socket="$S/munge.socket" --pid-file="$S/munged.pid" \
    --log-file="$S/log/munged.log" --seed-file="$S/munge.seed" --force
umask 022
cat > "$S/slurm.conf" <<CONF
ClusterName=icmlab
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
AuthType=auth/munge
AuthInfo=socket=${S}/munge.socket
CredType=cred/munge
SlurmUser=${USER_NAME}
SlurmdUser=${USER_NAME}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
StateSaveLocation=${S}/state
SlurmdSpoolDir=${S}/spool
SlurmctldPidFile=${S}/slurmctld.pid
SlurmdPidFile=${S}/slurmd.pid
SlurmctldLogFile=${S}/log/slurmctld.log
SlurmdLogFile=${S}/log/slurmd.log
KillWait=30
MinJobAge=600
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$S/slurm.conf"
echo "export SLURM_CONF=$SLURM_CONF" > "$S/env"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
    if sinfo -h -N -o "%t" 2>/dev/null | grep -qE "^idle"; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "slurm node did not become idle; logs:" >&2
tail -n 20 "$S"/log/*.log >&2 || true
exit 1

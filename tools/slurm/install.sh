#!/bin/bash
# Install a SLURM (slurmctld + slurmd + client tools) and munge from Debian's packages, for
# tools/slurm/start.sh and tests/test_slurm.py. Needs root (or sudo) and the apt mirror; ~1 min.
# Does nothing when the binaries are already there.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    echo "slurm and munge already installed: $(slurmctld -V)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge
echo "installed: $(slurmctld -V)"

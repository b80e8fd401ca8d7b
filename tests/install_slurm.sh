#!/bin/sh
# Install the SLURM daemons + client and MUNGE for tests/test_slurm.py (Debian/Ubuntu, run as root).
# Idempotent: exits 0 at once when everything is already there. The test cluster is configured and started by
# tests/slurm_cluster.py, so the services the packages may enable are stopped/ignored (no systemd needed).
set -eu

need=""
for bin in slurmctld slurmd sinfo sbatch squeue sacct scontrol munged mungekey; do
    command -v "$bin" >/dev/null 2>&1 || need="yes"
done
[ -z "$need" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh: needs root (apt-get); run: sudo $0" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: the packages' postinst must not try to start services (no init system in CI containers).
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy="yes"
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
[ -n "$created_policy" ] && rm -f "$policy"

for bin in slurmctld slurmd sinfo sbatch squeue sacct scontrol munged mungekey; do
    command -v "$bin" >/dev/null 2>&1 || { echo "install_slurm.sh: $bin still missing after apt-get" >&2; exit 1; }
done
exit 0

#!/bin/sh
# Install the SLURM daemons + client and MUNGE for tests/test_slurm.py (Debian/Ubuntu, run as root).
# Idempotent: exits 0 at once when everything is already there. The test cluster is configured and started by
# tests/slurm_cluster.py, so the services the packages may enable are stopped/ignored (no systemd needed).
set -eu

BINS="slurmctld slurmd slurmstepd sinfo sbatch srun squeue scancel scontrol sacct munged mungekey"
# the daemons live in /usr/sbin, which a non-root PATH may lack
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

need=""
for bin in $BINS; do
    have "$bin" || need="yes"
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
log=$(mktemp)
# quiet on success; the whole apt output on failure
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } \
        >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_slurm.sh: apt-get failed (output above)" >&2
    [ -n "$created_policy" ] && rm -f "$policy"
    rm -f "$log"
    exit 1
fi
rm -f "$log"
if [ -n "$created_policy" ]; then rm -f "$policy"; fi

for bin in $BINS; do
    have "$bin" || { echo "install_slurm.sh: $bin still missing after apt-get" >&2; exit 1; }
done
exit 0

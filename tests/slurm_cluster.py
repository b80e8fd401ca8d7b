"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd started by hand (no systemd).

Everything lives in one temp dir: a munge key made for the run, slurm.conf, state/spool dirs, logs, pid files.
The daemons listen on free ports picked at start, so two test sessions on one machine do not collide, and
clients find the cluster through SLURM_CONF (see `SlurmCluster.env`). No accounting database: slurmdbd needs
MySQL, so `sacct` does not work here and job status comes from `squeue`/`scontrol` (MinJobAge keeps finished
jobs visible to slurmctld for 10 minutes). Install the binaries with tests/install_slurm.sh.

    with start_cluster() as cluster:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env())
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "srun", "scancel")
INSTALL_HINT = "run tests/install_slurm.sh (as root) to install slurmctld, slurmd, slurm-client and munge"
MIN_JOB_AGE_S = 600  # finished jobs stay in slurmctld this long: the squeue status check must still see them


class SlurmUnavailable(RuntimeError):
    """SLURM/MUNGE binaries are missing or the cluster did not come up."""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    cpus: int
    real_memory_mb: int
    partition: str = "cpu"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self, base: dict[str, str] | None = None, path_prepend: list[Path] | None = None) -> dict[str, str]:
        """The environment a client (sbatch, squeue, snakemake --executor slurm) needs to reach this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        # bin/ holds the srun shim (see _write_srun_shim); it goes first so jobs find it
        env["PATH"] = os.pathsep.join(
            [str(self.root / "bin"), *(str(p) for p in path_prepend or []), env.get("PATH", "")]
        )
        # a SLURM_* variable inherited from an outer job would redirect our clients to that job's cluster
        for key in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SRUN_"))]:
            del env[key]
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout, check=check)

    def node_state(self) -> str:
        out = self.run("sinfo", "--noheader", "--nodes", self.node, "--format=%T", check=False)
        return out.stdout.strip().lower() if out.returncode == 0 else ""

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Comment, WorkDir, StdOut, ...)."""
        out = self.run("scontrol", "--oneliner", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            log = self.root / "log" / name
            if log.exists():
                parts.append(f"--- {name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    def cancel_all_jobs(self, timeout: float = 20) -> None:
        """scancel every job still queued or running and wait for slurmd to end their steps."""
        active = "--states=PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING"
        ids = self.run("squeue", "--noheader", "--format=%i", active, check=False).stdout.split()
        if not ids:
            return
        self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.run("squeue", "--noheader", active, check=False).stdout.strip():
            time.sleep(0.3)

    def stop(self) -> None:
        if all(p.poll() is None for p in self.procs.values()) and len(self.procs) == 3:
            try:
                self.cancel_all_jobs()  # while slurmd is up, so it kills the jobs' process trees itself
            except subprocess.TimeoutExpired:
                pass  # a hung slurmctld: the daemons are killed below and _kill_leftovers sweeps the jobs
        # slurmd first (it talks to slurmctld on shutdown), munged last (both authenticate through it)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        _kill_leftovers(self.conf)


def _search_path(search_path: str | None) -> str:
    # daemons live in /usr/sbin, which a non-login PATH may lack
    return (
        search_path if search_path is not None else os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    )


def missing_binaries(search_path: str | None = None) -> list[str]:
    """The SLURM/MUNGE programs not found on `search_path` (default: PATH plus the sbin dirs)."""
    path = _search_path(search_path)
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=_search_path(None))
    if found is None:
        raise SlurmUnavailable(f"{name} not found; {INSTALL_HINT}")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _detect_node() -> tuple[int, int]:
    """CPUs and RealMemory (MB) as slurmd itself sees them, so the node is not drained for a mismatch."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    cpus = int(re.search(r"CPUs=(\d+)", out).group(1)) if "CPUs=" in out else os.cpu_count() or 1
    mem = int(re.search(r"RealMemory=(\d+)", out).group(1)) if "RealMemory=" in out else 1024
    return cpus, int(mem * 0.9)  # a margin: slurmd drains a node whose memory reads below the configured value


def write_config(root: Path, node: str, cpus: int, real_memory_mb: int, partition: str = "cpu") -> Path:
    for sub in ("state", "spool", "log", "run", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    socket_path = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=wsitest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "run" / "slurmctld.pid"}
SlurmdPidFile={root / "run" / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# no slurmdbd: sacct cannot answer, status checks go through squeue/scontrol
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
DefMemPerCPU=1000
MinJobAge={MIN_JOB_AGE_S}
InactiveLimit=0
KillWait=5
Waittime=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_memory_mb} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _write_srun_shim(root: Path, conf: Path) -> None:
    """srun that finds this cluster's slurm.conf even when the caller dropped SLURM_CONF.

    snakemake-executor-plugin-slurm-jobstep (0.6.x) strips every SLURM_* variable, SLURM_CONF included, before
    the `srun` it runs inside each job; a real cluster reads /etc/slurm/slurm.conf there, which a test must not
    overwrite. Everything else about the call is the real srun.
    """
    shim = root / "bin" / "srun"
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(f'#!/bin/sh\nSLURM_CONF="{conf}" exec {_which("srun")} "$@"\n')
    shim.chmod(0o755)


def _kill_leftovers(conf: Path) -> None:
    """SIGKILL what this cluster started and left behind (stepds, job scripts): their environment names our conf.

    A normal teardown leaves nothing (jobs are cancelled first); this covers a slurmd that died mid-job.
    """
    marker = f"SLURM_CONF={conf}".encode()
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            environ = (proc_dir / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            try:
                os.kill(int(proc_dir.name), signal.SIGKILL)
            except OSError:
                pass


def _wait(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(
                    f"{name} exited with code {proc.returncode} while waiting for {what}\n" + cluster.log_tail()
                )
        if predicate():
            return
        time.sleep(0.3)
    raise SlurmUnavailable(f"timed out after {timeout:.0f}s waiting for {what}\n" + cluster.log_tail())


def _spawn(cluster: SlurmCluster, name: str, cmd: list[str]) -> None:
    out = open(cluster.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 - lives as long as the daemon
    cluster.procs[name] = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env=cluster.env(), start_new_session=True
    )


@contextmanager
def start_cluster(
    root: Path | None = None, partition: str = "cpu", timeout: float = 60, search_path: str | None = None
) -> Iterator[SlurmCluster]:
    """Start munged + slurmctld + slurmd, wait until the node is idle, yield, then stop them and clean up."""
    missing = missing_binaries(search_path)
    if missing:
        raise SlurmUnavailable(f"{', '.join(missing)} not found; {INSTALL_HINT}")
    if os.geteuid() != 0:  # slurmd must be root to start job steps; SlurmUser=root keeps it one user
        raise SlurmUnavailable("the test cluster runs slurmctld/slurmd as root; run the SLURM tests as root")
    own_root = root is None
    # short path: the munge socket path must fit in sun_path (108 bytes)
    root = Path(tempfile.mkdtemp(prefix="slurm-")) if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    node = socket.gethostname().split(".")[0]
    cpus, mem = _detect_node()
    conf = write_config(root, node, cpus, mem, partition)
    _write_srun_shim(root, conf)
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus, real_memory_mb=mem, partition=partition)
    munge = root / "munge"
    key = munge / "munge.key"
    try:
        subprocess.run(
            [_which("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True, timeout=30
        )
        key.chmod(0o600)
        _spawn(
            cluster,
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={munge / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={root / 'log' / 'munged.log'}",
                f"--seed-file={munge / 'seed'}",
            ],
        )
        _wait(lambda: (munge / "munge.socket").exists(), 20, "munged's socket", cluster)
        _spawn(cluster, "slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)])
        _wait(
            lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0,
            timeout,
            "slurmctld to answer `scontrol ping`",
            cluster,
        )
        _spawn(cluster, "slurmd", [_which("slurmd"), "-D", "-f", str(conf), "-N", node])
        _wait(lambda: cluster.node_state() == "idle", timeout, f"node {node} to be idle in sinfo", cluster)
        yield cluster
    finally:
        cluster.stop()
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node cluster (partition "cpu"); fails, never skips, when SLURM is not installed."""
    try:
        with start_cluster() as cluster:
            yield cluster
    except SlurmUnavailable as exc:
        pytest.fail(f"SLURM test cluster: {exc}", pytrace=False)

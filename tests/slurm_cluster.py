"""A real two-node Slurm cluster on this machine for the Slurm tests.

munged + slurmctld + two slurmd daemons posing as nodes ``n1`` and ``n2`` (both 127.0.0.1, one
port each), all from Debian's packages (`scripts/install-slurm` installs them), configured by a
generated slurm.conf in a temporary directory and stopped by PID at the end. No systemd: every
daemon runs in the foreground (``-D``) as a child of the test process. Needs root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from molf_ds.train.distributed import free_port

NODES = ("n1", "n2")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# every program the cluster and the tests run; the daemons and mungekey live in /usr/sbin, which
# is not on a non-root user's PATH on Debian
BINARIES = (
    "slurmctld",
    "slurmd",
    "sbatch",
    "sinfo",
    "squeue",
    "scontrol",
    "scancel",
    "munged",
    "munge",
    "mungekey",
    "runuser",
)
CPUS_PER_NODE = 2  # the CI machine's cores: two 1-CPU ranks per node (tiny models oversubscribe)

SLURM_CONF = """\
ClusterName=molftest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# node definitions win over what slurmd detects (two "nodes" share this host's cores)
SlurmdParameters=config_overrides
ReturnToService=2
# finished jobs leave the controller quickly, so `sbatch --wait` returns within seconds
MinJobAge=4
# a requeued job waits this long before it may start again (default 120 s)
AuthInfo=cred_expire=5
KillWait=30
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def unusable() -> str | None:
    """Why this machine cannot run the cluster, in one line (what to do about it), or None."""
    missing = [name for name in BINARIES if shutil.which(name, path=_path()) is None]
    if missing:
        return (
            f"Slurm is not installed: apt-get install {' '.join(PACKAGES)} "
            f"(missing: {' '.join(missing)})"
        )
    if os.geteuid() != 0:
        return "the Slurm tests need root: they run munged, slurmctld and slurmd as root"
    return None


class SlurmCluster:
    """Start with ``start()``, stop with ``stop()``; ``env`` is what client commands need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=_path())

    def start(self, timeout: float = 60) -> None:
        for sub in ("state", "spool/n1", "spool/n2"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(
            f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} "
            f"Port={free_port()} CPUs={CPUS_PER_NODE} State=UNKNOWN"
            for name in NODES
        )
        self.conf.write_text(
            SLURM_CONF.format(
                root=self.root, ctld_port=free_port(), nodes=nodes, node_list=",".join(NODES)
            )
        )
        self._start_munge()
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for name in NODES:
            self._spawn(["slurmd", "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}.out")
        self._wait_idle(timeout)

    def _start_munge(self) -> None:
        """munged must run as the munge user, with a key only munge can read."""
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, env=self.env)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        ping = subprocess.run(["munge", "-n"], capture_output=True, env=self.env)
        if ping.returncode == 0:
            return  # a munged is already serving this machine: share it
        self._spawn(["runuser", "-u", "munge", "--", "munged", "-F", "--force"], "munged.out")
        deadline = time.monotonic() + 20
        while subprocess.run(["munge", "-n"], capture_output=True, env=self.env).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("munged did not start")
            time.sleep(0.1)

    def _spawn(self, command: list[str], log: str) -> None:
        out = (self.root / log).open("w")
        self.procs.append(
            subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        )

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            result = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env
            )
            states = result.stdout.strip()
            idle = [line.split()[0] for line in states.splitlines() if line.endswith(" idle")]
            if sorted(idle) == sorted(NODES):
                return
            time.sleep(0.2)
        raise RuntimeError(f"Slurm nodes not idle after {timeout} s: {states!r}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"== {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, **kwargs)

    def stop(self) -> None:
        """Cancel what is left of the jobs (slurmstepd and the ranks outlive slurmd), then stop
        the daemons we started, newest first, by PID (SIGTERM, then SIGKILL)."""
        if self.procs:
            self.run("scancel", "--partition=debug", "--full", timeout=30)
            deadline = time.monotonic() + 40  # KillWait, then SIGKILL
            while time.monotonic() < deadline:
                queued = self.run("squeue", "-h", "-o", "%i", timeout=30)
                if queued.returncode != 0 or not queued.stdout.strip():
                    break
                time.sleep(0.5)
        for proc in reversed(self.procs):  # munged last: the others talk to it while stopping
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

"""A throw-away Slurm cluster on this machine, for the ``slurm`` tests.

Every compute node is a set of Linux namespaces (network, UTS, mount) held open by a ``sleep``
process: it has its own host name (``node1``, ``node2``, ...), its own address on a private
test subnet behind a bridge that this module creates, and a bind-mounted ``/etc/hosts`` that
names every node. ``slurmd -N nodeI`` runs inside each node; ``munged`` and ``slurmctld`` run in
the root namespace and listen on the bridge address. All files (config, state, spool, logs,
munge key and socket) live under one folder. The file system is shared, like a cluster's shared
file system. Nodes advertise ``Gres=gpu:G`` backed by device files made with ``mknod`` in that
folder, so scripts that ask for ``--gpus-per-node`` are exercised as written (no CUDA behind).

Needs root, ``slurm-wlm``, ``munge``, ``iproute2`` and ``util-linux`` (``.ci/install_slurm.sh``).
Installs nothing. :meth:`SlurmCluster.stop` ends whatever runs in each node's namespace (job
processes outlive ``scontrol shutdown``), by pid, then the daemons, then removes the bridge.

Run by hand for debugging::

    sudo .venv/bin/python tests/slurm_cluster.py /tmp/slurmtest   # prints the env to export
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REQUIRED_TOOLS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "munged",
                  "ip", "unshare", "nsenter", "mknod")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
_REGISTRY = Path("/run/lock/redi-ds-slurm-test")  # one JSON per running cluster; lets a later run reap a dead one


def missing_requirements() -> Optional[str]:
    """None when a cluster can be started here; else a one-line reason."""
    if sys.platform != "linux":
        return "Slurm tests need Linux"
    if os.geteuid() != 0:
        return "Slurm tests need root (network namespaces, slurmd)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"Slurm tests need {', '.join(missing)} (bash .ci/install_slurm.sh installs slurm-wlm and munge)"
    return None


def _sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _netns_id(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _pids_in_netns(ns: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _netns_id(int(entry)) == ns:
            out.append(int(entry))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def reap_dead_clusters() -> None:
    """Tear down clusters whose owning process died without stop() (SIGKILL): namespaces, daemons, bridge."""
    for f in _REGISTRY.glob("*.json"):
        try:
            rec = json.loads(f.read_text())
            status = Path(f"/proc/{rec['owner']}/status").read_text()
            if "\nState:\tZ" not in status:
                continue  # owner alive
        except FileNotFoundError:
            pass  # owner gone
        except (OSError, ValueError, KeyError):
            continue
        for pid in rec.get("pids", []):
            cmd = _cmdline(pid)
            if cmd.startswith("sleep infinity") or cmd.startswith("unshare "):  # a node's namespace holder
                ns = _netns_id(pid)
                if ns and ns != _netns_id(os.getpid()):
                    for p in _pids_in_netns(ns):
                        try:
                            os.kill(p, signal.SIGKILL)
                        except OSError:
                            pass
            elif rec["root"] in cmd:  # munged / slurmctld / slurmd of that cluster
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        _sh("ip", "link", "del", rec["bridge"], check=False)
        f.unlink(missing_ok=True)


class SlurmCluster:
    """``SlurmCluster(folder, nodes=2).start()``; then ``env`` for client commands; ``stop()``."""

    def __init__(self, root: os.PathLike, nodes: int = 2, gpus_per_node: int = 2, cpus: Optional[int] = None,
                 partition: str = "test"):
        self.root = Path(root).resolve()
        self.n = nodes
        self.gpus = gpus_per_node
        self.cpus = cpus or max(1, os.cpu_count() or 1)
        self.partition = partition
        self.node_names = [f"node{i + 1}" for i in range(nodes)]
        self.bridge: Optional[str] = None
        self.subnet: Optional[ipaddress.IPv4Network] = None
        self.addr: dict[str, str] = {}
        self._holders: dict[str, subprocess.Popen] = {}
        self._netns: dict[str, str] = {}
        self._daemons: list[subprocess.Popen] = []
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.started = False

    # ------------------------------------------------------------------ environment

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: what client commands (sbatch, squeue, ...) need."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del env[k]  # a test run inside a real allocation must not leak it into ours
        return env

    # ------------------------------------------------------------------ bring-up

    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        reason = missing_requirements()
        if reason:
            raise RuntimeError(reason)
        atexit.register(self.stop)  # stop() is idempotent; also runs when the test session exits early
        try:
            self._layout()
            self._network()
            self._write_config()
            self._start_munge()
            self._start_slurmctld()
            for name in self.node_names:
                self._start_node(name)
            self.started = True
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _layout(self) -> None:
        for sub in ("etc", "state", "spool", "log", "munge", "dev", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for name in self.node_names:
            (self.root / "spool" / name).mkdir(exist_ok=True)  # slurmd does not create it
        os.chmod(self.root / "munge", 0o755)  # munged: socket dir must be world-executable
        for i in range(self.gpus):
            dev = self.root / "dev" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(195, i))  # character device, like /dev/nvidiaN

    def _network(self) -> None:
        _REGISTRY.mkdir(parents=True, exist_ok=True)
        with open(_REGISTRY / "lock", "w") as lock:  # another test session may be choosing a subnet right now
            fcntl.flock(lock, fcntl.LOCK_EX)
            reap_dead_clusters()
            used = _sh("ip", "-4", "-o", "addr", "show").stdout + _sh("ip", "-4", "route", "show", "table", "all").stdout
            links = _sh("ip", "-o", "link", "show").stdout
            candidates = list(range(1, 255))
            random.shuffle(candidates)
            for third in candidates:
                net = ipaddress.ip_network(f"10.213.{third}.0/24")
                if f"10.213.{third}." not in used:
                    break
            else:
                raise RuntimeError("no free 10.213.x.0/24 test subnet")
            while True:
                bridge = f"rdsbr{random.randrange(16 ** 6):06x}"
                if bridge not in links:
                    break
            _sh("ip", "link", "add", bridge, "type", "bridge")
            self.bridge, self.subnet = bridge, net
            _sh("ip", "addr", "add", f"{net[1]}/24", "dev", bridge)
            _sh("ip", "link", "set", bridge, "up")
            self._register()
        self.ctl_addr = str(net[1])
        for i, name in enumerate(self.node_names):
            self.addr[name] = str(net[11 + i])
        hosts = ["127.0.0.1\tlocalhost", f"{self.ctl_addr}\tslurmctl"]
        hosts += [f"{a}\t{n}" for n, a in self.addr.items()]
        (self.root / "etc" / "hosts").write_text("\n".join(hosts) + "\n")

    def _write_config(self) -> None:
        r = self.root
        self.ctl_port = _free_port()
        ctl_host = socket.gethostname().split(".")[0]  # slurmctld checks it is the host it names
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={n} NodeAddr={a} CPUs={self.cpus} RealMemory=4000{gres} State=UNKNOWN"
            for n, a in self.addr.items())
        self.conf.write_text(f"""\
ClusterName=redids
SlurmctldHost={ctl_host}({self.ctl_addr})
SlurmctldPort={self.ctl_port}
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=10
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
MessageTimeout=10
MailProg=/bin/true
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
GresTypes=gpu
{nodes}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        if self.gpus:
            dev = f"{r}/dev/nvidia[0-{self.gpus - 1}]" if self.gpus > 1 else f"{r}/dev/nvidia0"
            (r / "etc" / "gres.conf").write_text(f"Name=gpu File={dev}\n")

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.out", "ab")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=self.env)
        log.close()
        self._daemons.append(p)
        self._register()
        return p

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = self.root / "munge" / "munge.socket"
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={self.root}/run/munged.pid", f"--log-file={self.log_dir}/munged.log",
                               f"--seed-file={self.root}/munge/munged.seed"])
        self._wait(lambda: sock.exists(), 10, "munged socket")

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait(lambda: _sh("scontrol", "ping", check=False, env=self.env).stdout.find("UP") >= 0, 20,
                   "slurmctld to answer")

    def _start_node(self, name: str) -> None:
        holder = subprocess.Popen(["unshare", "--net", "--uts", "--mount", "--propagation", "private",
                                   "sleep", "infinity"], start_new_session=True, stdin=subprocess.DEVNULL)
        self._holders[name] = holder
        own = _netns_id(os.getpid())
        self._wait(lambda: _netns_id(holder.pid) not in (None, own) and
                   Path(f"/proc/{holder.pid}/comm").read_text().strip() == "sleep", 10, f"{name} namespaces")
        self._netns[name] = _netns_id(holder.pid)
        self._register()
        pid = str(holder.pid)
        veth = f"{self.bridge[:9]}n{self.node_names.index(name)}"
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pid)
        _sh("ip", "link", "set", veth, "master", self.bridge, "up")
        ns = ["nsenter", "-t", pid]
        _sh(*ns, "-n", "ip", "link", "set", "lo", "up")
        _sh(*ns, "-n", "ip", "addr", "add", f"{self.addr[name]}/24", "dev", "eth0")
        _sh(*ns, "-n", "ip", "link", "set", "eth0", "up")
        _sh(*ns, "-u", "hostname", name)
        _sh(*ns, "-m", "mount", "--bind", str(self.root / "etc" / "hosts"), "/etc/hosts")
        self._spawn(f"slurmd-{name}", [*ns, "-n", "-u", "-m", "slurmd", "-D", "-N", name, "-f", str(self.conf)])

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = _sh("sinfo", "-h", "-N", "-o", "%N %t", check=False, env=self.env).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n) == "idle" for n in self.node_names)
        self._wait(idle, timeout, "nodes to become idle")

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self._daemons:
                if p.poll() is not None:
                    raise RuntimeError(f"{' '.join(map(str, p.args[:3]))}... exited ({p.returncode}) while waiting "
                                       f"for {what}; logs in {self.log_dir}:\n{self.log_tail()}")
            try:
                if cond():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.log_dir}:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for f in sorted(self.log_dir.glob("*")):
            if f.is_file() and f.stat().st_size:
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------ tear-down

    def _register(self) -> None:
        """Record what this cluster owns, so that a later session can clean up after a killed one."""
        if not self.bridge:
            return
        pids = [p.pid for p in self._daemons] + [h.pid for h in self._holders.values()]
        (_REGISTRY / f"{self.bridge}.json").write_text(json.dumps(
            {"owner": os.getpid(), "root": str(self.root), "bridge": self.bridge, "pids": pids}))

    def node_pids(self, name: str) -> list[int]:
        """Every process running inside node ``name`` (its network namespace), holder excluded."""
        ns = self._netns.get(name)
        holder = self._holders.get(name)
        if not ns:
            return []
        return [p for p in _pids_in_netns(ns) if not holder or p != holder.pid]

    def stop(self) -> None:
        if self.started:
            _sh("scontrol", "shutdown", check=False, env=self.env, timeout=15)
        # whatever still runs inside a node (jobs outlive scontrol shutdown), by pid
        for name in list(self._netns):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = self.node_pids(name)
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 3
                while pids and time.monotonic() < deadline:
                    time.sleep(0.05)
                    pids = self.node_pids(name)
        for p in reversed(self._daemons):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._daemons.clear()
        for holder in self._holders.values():  # the last process in a namespace: the veth goes with it
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        self._holders.clear()
        self._netns.clear()
        if self.bridge:
            _sh("ip", "link", "del", self.bridge, check=False)
            (_REGISTRY / f"{self.bridge}.json").unlink(missing_ok=True)
            self.bridge = None
        self.started = False

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs

    def sbatch(self, *args: str, cwd: Optional[os.PathLike] = None, env: Optional[dict] = None) -> int:
        p = _sh("sbatch", "--parsable", *args, cwd=cwd, env=env or self.env)
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Optional[dict[str, str]]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...); None once purged."""
        p = _sh("scontrol", "-o", "show", "job", str(job_id), check=False, env=self.env)
        if p.returncode or not p.stdout.strip():
            return self._jobcomp(job_id)
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout))

    def _jobcomp(self, job_id: int) -> Optional[dict[str, str]]:
        f = self.log_dir / "jobcomp.txt"
        last = None
        if f.exists():
            for line in f.read_text().splitlines():
                d = dict(re.findall(r"(\w+)=(\S*)", line))
                if d.get("JobId") == str(job_id):
                    last = d
        return last

    def wait(self, job_id: int, timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job reaches a final state; returns its record. Fails with the logs on timeout."""
        try:
            return self.wait_state(job_id, FINAL_STATES, timeout, poll)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.log_tail()}") from None

    def wait_state(self, job_id: int, states, timeout: float, poll: float = 0.2) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info and info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {set(states)} after {timeout:.0f}s "
                           f"(last: {info and info.get('JobState')})")


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/redi-ds-slurm")
    c = SlurmCluster(folder, nodes=int(os.environ.get("NODES", "2")))
    c.start()
    print(f"cluster up: export SLURM_CONF={c.conf}   (Ctrl-C tears it down)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()

"""The launch environment, resolved once from a Mapping (normally ``os.environ``).

Order, first match wins (torchrun also runs inside SLURM jobs, so it must come first):

1. ``RANK`` and ``WORLD_SIZE`` set by an engine: torchrun (``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
   ``GROUP_RANK``), Ray Train (the same names, and ``NODE_RANK``; it has already started the process
   group), or a Kubeflow PyTorchJob without torchrun (each pod one process: ``RANK`` is the pod's
   index, no ``LOCAL_RANK``; with torchrun inside the pod, torchrun's variables).
2. SLURM, one task per process (``srun python launch.py``): ``SLURM_PROCID``, ``SLURM_NTASKS``,
   ``SLURM_LOCALID``, ``SLURM_NODEID``; the main address is ``MASTER_ADDR`` or the first host of the
   job's node list, the port ``MASTER_PORT`` or one derived from the job id.
3. a single process.

Pure: nothing here touches the process environment.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping

from ..errors import ConfigError

Source = Literal["torchrun", "slurm", "ray", "kubeflow", "env", "single"]
# each engine's own variables, how it is recognised (the pod of any Kubernetes job has the first)
_KUBERNETES = "KUBERNETES_SERVICE_HOST"
_RAY = ("RAY_JOB_ID", "RAY_RAYLET_PID", "RAY_NODE_ID")
_TORCHRUN = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
ENGINES = {"torchrun": "torchrun", "slurm": "SLURM srun", "ray": "Ray Train", "kubeflow": "Kubeflow PyTorchJob",
           "env": "RANK/WORLD_SIZE variables", "single": "one process"}


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: Source = "single"
    inside: str = ""  # the engine around the launcher, when there is one (torchrun in a Kubeflow pod)

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only process that writes files."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: the process that prepares node-local files (demo data, caches)."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def engine(self) -> str:
        """Which engine started this process, for the launch line."""
        return ENGINES[self.source] + (f" in a {self.inside}" if self.inside else "")


def process_rank(env: Mapping[str, str]) -> int:
    """This process's global rank as far as the launcher's variables tell before anything is
    validated (``RANK``, else ``SLURM_PROCID``, else 0): who prints a shared error, who speaks for
    the job. :func:`resolve` is the checked reading."""
    raw = env.get("RANK") or env.get("SLURM_PROCID") or "0"
    try:
        return int(raw)
    except ValueError:
        return 0


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ConfigError(f"environment variable {key} is missing; the launcher sets it "
                              f"(start with torchrun or srun)")
        return default
    try:
        return int(raw.split("(")[0])  # SLURM_TASKS_PER_NODE-like "2(x3)" forms
    except ValueError:
        raise ConfigError(f"environment variable {key}={raw!r} is not a whole number") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: ``"node[01-04,07],gpu5"`` -> ``["node01", ..., "node07", "gpu5"]``.

    Zero padding of ranges is kept (``a[08-10]`` -> a08, a09, a10). Several bracket groups in one name
    (``r[1-2]n[1-2]``) expand as a product, like ``scontrol show hostnames``.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            if cur:
                parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ConfigError(f"SLURM node list {text!r} has unbalanced brackets")
    if cur:
        parts.append(cur)
    return parts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    out = []
    for part in m.group(1).split(","):
        lo, sep, hi = part.partition("-")
        if not sep:
            values = [lo]
        else:
            width = len(lo)
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        for v in values:
            out.extend(_expand_one(head + v + tail))
    return out


def _slurm_in_batch_shell(env: Mapping[str, str]) -> bool:
    """True in a job's batch script (or salloc shell), i.e. not inside an ``srun`` step."""
    return "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env


def resolve(env: Mapping[str, str]) -> LaunchEnv:
    """Resolve the launch environment from ``env``; raises ConfigError when it is inconsistent."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        pod = _KUBERNETES in env
        if "LOCAL_RANK" not in env:  # one process per host: a PyTorchJob's pod, or RANK set by hand
            local_rank, local_world, node_rank, source, inside = 0, 1, rank, "kubeflow" if pod else "env", ""
        else:
            local_rank, local_world = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE", world)
            node_rank = _int(env, "GROUP_RANK", _int(env, "NODE_RANK", rank // max(local_world, 1)))
            ray = any(k in env for k in _RAY) and not any(k in env for k in _TORCHRUN)
            source = "ray" if ray else "torchrun"
            inside = "Kubeflow PyTorchJob" if pod and not ray else ""
        return _checked(LaunchEnv(
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=max(1, world // max(local_world, 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
            source=source,
            inside=inside,
        ))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        ntasks = _int(env, "SLURM_NTASKS")
        if ntasks > 1 and _slurm_in_batch_shell(env):
            raise ConfigError(
                f"SLURM_NTASKS={ntasks} but this process was not started by srun (it runs in the job's "
                f"batch shell), so the other {ntasks - 1} ranks will never join; start it with "
                f"'srun python launch.py ...' or 'srun torchrun ... launch.py'")
        nodes = _int(env, "SLURM_NNODES", _int(env, "SLURM_JOB_NUM_NODES", 1))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        addr = env.get("MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1")
        job_id = _int(env, "SLURM_JOB_ID", 0)
        return _checked(LaunchEnv(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=ntasks,
            local_world_size=_int(env, "SLURM_NTASKS_PER_NODE", max(1, ntasks // max(nodes, 1)))
            if "SLURM_NTASKS_PER_NODE" in env else max(1, ntasks // max(nodes, 1)),
            node_rank=_int(env, "SLURM_NODEID", 0),
            num_nodes=nodes,
            master_addr=addr,
            master_port=_int(env, "MASTER_PORT", 20000 + job_id % 20000),
            source="slurm",
        ))
    return LaunchEnv()


def _checked(e: LaunchEnv) -> LaunchEnv:
    if not 0 <= e.rank < e.world_size:
        raise ConfigError(f"launch environment: rank {e.rank} is outside world size {e.world_size}")
    if not 0 <= e.local_rank < max(e.local_world_size, 1):
        raise ConfigError(f"launch environment: local rank {e.local_rank} is outside the "
                          f"{e.local_world_size} processes of this node")
    return e

"""Which GPU each rank drives, and when two ranks share one, decided from the environments srun and
torchrun set (no GPU needed: each task's view of the node is written out as CUDA would show it)."""
import pytest

from ddp_trainer.launch.dist import Placement, device_index, shared_gpus
from ddp_trainer.launch.environment import resolve
from ddp_trainer.launch.mode import decide_mode

pytestmark = pytest.mark.stacks


def srun_task(rank: int, visible: str | None, **extra: str) -> dict:
    """A task's environment as srun sets it (2 tasks on node n1 of job 42, step 0)."""
    env = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
           "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "n1",
           "SLURM_NTASKS_PER_NODE": "2", **extra}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return env


def torchrun_worker(rank: int, visible: str | None) -> dict:
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return env


# name: (each process's environment, the physical GPUs each process can see, in CUDA's order), shared?
SCENARIOS = {
    # --gpus-per-task=1 with device cgroups: each task sees one GPU, which CUDA calls 0 in both
    "srun --gpus-per-task=1 (cgroups)": ([srun_task(0, "0"), srun_task(1, "0")], [["GPU-A"], ["GPU-B"]], False),
    # --gpus-per-task=1 without cgroups: the variable names each task's own GPU
    "srun --gpus-per-task=1": ([srun_task(0, "0"), srun_task(1, "1")], [["GPU-A"], ["GPU-B"]], False),
    # --gres=gpu:2 --gpu-bind=none: both tasks see both GPUs; the local rank picks
    "srun --gres=gpu:2 --gpu-bind=none": ([srun_task(0, "0,1"), srun_task(1, "0,1")],
                                          [["GPU-A", "GPU-B"], ["GPU-A", "GPU-B"]], False),
    # --gres=gpu:1 with 2 tasks on the node: one GPU for both
    "srun --gres=gpu:1 --ntasks-per-node=2": ([srun_task(0, "0"), srun_task(1, "0")], [["GPU-A"], ["GPU-A"]], True),
    "torchrun --nproc_per_node=2, 2 GPUs": ([torchrun_worker(0, None), torchrun_worker(1, None)],
                                            [["GPU-A", "GPU-B"], ["GPU-A", "GPU-B"]], False),
    "torchrun --nproc_per_node=2, CUDA_VISIBLE_DEVICES=0": ([torchrun_worker(0, "0"), torchrun_worker(1, "0")],
                                                           [["GPU-A"], ["GPU-A"]], True),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_rank_drives_its_own_gpu_or_the_clash_is_named(name):
    envs, views, shared = SCENARIOS[name]
    placements = []
    for env_vars, view in zip(envs, views):
        env = resolve(env_vars)
        # was: "2 processes on this node but only 1 GPU(s)" for every task that sees one GPU
        decision = decide_mode("auto", "auto", env.world_size, env.local_world_size, len(view), launched=True)
        assert (decision.mode, decision.backend, decision.use_cuda) == ("ddp", "nccl", True)
        placements.append(Placement(env.rank, "n1", view[device_index(env.local_rank, len(view))]))
    message = shared_gpus(placements)
    if shared:
        assert message is not None and "ranks 0 and 1 on n1 both drive GPU GPU-A" in message
        assert "--gpus-per-task=1" in message and "dist.backend=gloo" in message
    else:
        assert message is None, message
        assert len({p.gpu for p in placements}) == 2


def test_the_same_gpu_on_two_hosts_is_not_shared_and_cpu_ranks_never_clash():
    assert shared_gpus([Placement(0, "a", "GPU-A"), Placement(1, "b", "GPU-A")]) is None
    assert shared_gpus([Placement(0, "a", None), Placement(1, "a", None)]) is None

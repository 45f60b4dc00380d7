"""LaunchEnv resolution from Mappings: torchrun > SLURM srun > single process."""
import pytest

from ddp_trainer.errors import ConfigError
from ddp_trainer.launch.environment import LaunchEnv, expand_nodelist, resolve

pytestmark = pytest.mark.stacks


def test_single_process_default():
    assert resolve({}) == LaunchEnv()
    assert resolve({"PATH": "/bin"}).source == "single"


def test_torchrun_variables():
    e = resolve({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                 "GROUP_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"})
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank, e.num_nodes) == (3, 1, 4, 2, 1, 2)
    assert (e.master_addr, e.master_port, e.source) == ("node0", 29400, "torchrun")
    assert not e.is_main and not e.is_local_main and e.distributed


def test_torchrun_wins_over_slurm():
    e = resolve({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0",
                 "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0"})
    assert e.source == "torchrun" and e.rank == 1


def test_slurm_one_task_per_process():
    e = resolve({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
                 "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "1234",
                 "SLURM_STEP_ID": "0"})
    assert (e.rank, e.local_rank, e.world_size, e.node_rank, e.num_nodes, e.local_world_size) == (5, 1, 8, 2, 4, 2)
    assert e.master_addr == "gpu07" and e.source == "slurm"
    assert e.master_port == 20000 + 1234


def test_slurm_master_from_environment_wins():
    e = resolve({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a[1-2]", "SLURM_STEP_ID": "0",
                 "SLURM_JOB_ID": "9", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "12345"})
    assert (e.master_addr, e.master_port) == ("10.0.0.5", 12345)


def test_multi_task_batch_shell_without_srun_is_explained():
    with pytest.raises(ConfigError, match="srun"):
        resolve({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1"})
    # one task in a batch shell is a fine single-process run
    assert resolve({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "77"}).world_size == 1


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[8-10],b3", ["a8", "a9", "a10", "b3"]),
    ("gpu[008-010]", ["gpu008", "gpu009", "gpu010"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x,y[1,3]", ["x", "y1", "y3"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


def test_bad_values_are_errors():
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        resolve({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="outside"):
        resolve({"RANK": "2", "WORLD_SIZE": "2"})

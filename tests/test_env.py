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


# a Kubeflow PyTorchJob (training-operator) pod's variables: the pod's index is its RANK, no LOCAL_RANK
KUBEFLOW_POD = {"MASTER_ADDR": "pytorchjob-demo-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2",
                "PYTHONUNBUFFERED": "1", "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_kubeflow_pytorchjob_pods_are_one_process_each():
    e = resolve(KUBEFLOW_POD)
    # was: read as torchrun on one node with 3 local processes (pod 2 waited for "local rank 0")
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank, e.num_nodes) == (2, 0, 3, 1, 2, 3)
    assert e.is_local_main and (e.master_addr, e.master_port) == ("pytorchjob-demo-master-0", 23456)
    assert e.source == "kubeflow" and e.engine == "Kubeflow PyTorchJob"
    by_hand = {k: v for k, v in KUBEFLOW_POD.items() if not k.startswith("KUBERNETES_")}
    assert resolve(by_hand).engine == "RANK/WORLD_SIZE variables" and resolve(by_hand).local_world_size == 1


def test_torchrun_inside_a_kubeflow_pod():
    # nprocPerNode: the operator sets PET_* for torchrun, which gives its workers their own variables
    worker = {**KUBEFLOW_POD, "PET_NPROC_PER_NODE": "2", "PET_NNODES": "3", "PET_NODE_RANK": "2", "RANK": "5",
              "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "2",
              "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0"}
    e = resolve(worker)
    assert (e.rank, e.local_rank, e.local_world_size, e.node_rank, e.num_nodes) == (5, 1, 2, 2, 3)
    assert e.source == "torchrun" and e.engine == "torchrun in a Kubeflow PyTorchJob"


def test_ray_train_workers():
    # Ray Train's torch backend sets torchrun's names and NODE_RANK, in a Ray worker process
    worker = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "0",
              "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "40123", "RAY_JOB_ID": "01000000", "RAY_RAYLET_PID": "77"}
    e = resolve(worker)
    assert (e.rank, e.local_rank, e.world_size, e.node_rank) == (1, 1, 2, 0)
    assert e.source == "ray" and e.engine == "Ray Train"

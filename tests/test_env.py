"""hpc.env on environments recorded from torchrun, sbatch/srun and srun+torchrun, and malformed ones."""

import pytest

from hpc.env import DistEnv, expand_nodelist, export_environ, port_for_job
from tests.fixtures.dist import torchrun

# Recorded from `srun -N2 --ntasks-per-node=4` (rank 5 = node 1, local 1).
SLURM_2x4 = {
    "SLURM_JOB_ID": "48213", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
    "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "dgx[03-04]",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8",
}
# Recorded in the batch script of `sbatch -N2 --ntasks-per-node=8` (no srun: the batch step itself).
SLURM_BATCH_STEP = {
    "SLURM_JOB_ID": "48214", "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "dgx[03-04]",
}
# Recorded from torchrun --nproc-per-node 2 on one host.
TORCHRUN_2 = {
    "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511",
}


def test_single_process_defaults():
    env = DistEnv.from_environ({})
    assert (env.rank, env.world_size, env.launcher, env.distributed) == (0, 1, "single", False)


def test_torchrun_environment():
    env = DistEnv.from_environ(TORCHRUN_2)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (1, 1, 2, "torchrun")
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 29511)


def test_slurm_environment_derives_master_from_nodelist_and_port_from_job():
    env = DistEnv.from_environ(SLURM_2x4)
    assert (env.rank, env.local_rank, env.world_size, env.node_rank, env.num_nodes) == (5, 1, 8, 1, 2)
    assert env.launcher == "slurm"
    assert env.nodes == ("dgx03", "dgx04") and env.master_addr == "dgx03"
    assert env.master_port == port_for_job("48213")
    assert 20000 <= env.master_port < 40000


def test_torchrun_under_srun_wins_over_slurm_procid():
    # srun starts one torchrun per node (SLURM_PROCID = node index); torchrun's RANK is the real rank.
    recorded = {
        "SLURM_JOB_ID": "77", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
        "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-a[7-8]",
        "RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
        "MASTER_ADDR": "gpu-a7", "MASTER_PORT": "29400",
    }
    env = DistEnv.from_environ(recorded)
    assert (env.rank, env.local_rank, env.world_size, env.node_rank) == (6, 2, 8, 1)
    assert env.launcher == "srun+torchrun" and env.job_id == "77" and env.num_nodes == 2


def test_the_batch_step_of_a_multi_task_allocation_is_refused_in_one_line():
    """`stroke-tss train` typed into a 16-task batch script (no srun) would wait for 15 ranks that never come."""
    with pytest.raises(ValueError) as info:
        DistEnv.from_environ(SLURM_BATCH_STEP)
    message = str(info.value)
    assert "\n" not in message and "batch step of Slurm job 48214" in message and "SLURM_NTASKS=16" in message
    assert "srun" in message


def test_the_batch_step_may_start_torchrun_or_run_one_task():
    # torchrun started from the batch script defines the world itself
    env = DistEnv.from_environ({**SLURM_BATCH_STEP, **TORCHRUN_2})
    assert (env.rank, env.world_size) == (1, 2)
    # a one-task batch step is one rank, and so is `srun --ntasks=1` inside a 16-task allocation
    assert DistEnv.from_environ({**SLURM_BATCH_STEP, "SLURM_NTASKS": "1"}).world_size == 1
    step = {**SLURM_BATCH_STEP, "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "1"}
    assert DistEnv.from_environ(step).world_size == 1


def test_slurm_ranks_export_the_torchrun_variables():
    """DeepSpeed asserts LOCAL_RANK and reads RANK/WORLD_SIZE/MASTER_*: under srun only Slurm's exist."""
    environ: dict[str, str] = {}
    export_environ(DistEnv.from_environ(SLURM_2x4), environ)
    assert environ == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                       "MASTER_ADDR": "dgx03", "MASTER_PORT": str(port_for_job("48213"))}
    # and what it exported reads back as the same rank
    again = DistEnv.from_environ({**SLURM_2x4, **environ})
    assert (again.rank, again.local_rank, again.world_size, again.master_addr) == (5, 1, 8, "dgx03")


def test_array_job_id_is_recorded():
    env = DistEnv.from_environ({**SLURM_2x4, "SLURM_ARRAY_JOB_ID": "900", "SLURM_ARRAY_TASK_ID": "3"})
    assert env.job_id == "900_3"


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("localhost", ["localhost"]),
        ("dgx[01-04,07],gpu-a7", ["dgx01", "dgx02", "dgx03", "dgx04", "dgx07", "gpu-a7"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a,b[009-010]", ["a", "b009", "b010"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        ({"SLURM_PROCID": "8"}, "SLURM_PROCID"),
        ({"SLURM_STEP_NUM_TASKS": "zero"}, "SLURM_STEP_NUM_TASKS"),
        ({"SLURM_JOB_NUM_NODES": "3"}, "SLURM_JOB_NUM_NODES"),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID"),
        ({"SLURM_JOB_NODELIST": "dgx[03-04"}, "SLURM_JOB_NODELIST"),
        ({"SLURM_JOB_NODELIST": "dgx[04-03]", "SLURM_JOB_NUM_NODES": "1"}, "SLURM_JOB_NODELIST"),
    ],
)
def test_inconsistent_slurm_variables_raise_naming_them(patch, names):
    with pytest.raises(ValueError, match=names):
        DistEnv.from_environ({**SLURM_2x4, **patch})


def test_inconsistent_torchrun_variables_raise():
    with pytest.raises(ValueError, match="RANK=2 is outside"):
        DistEnv.from_environ({**TORCHRUN_2, "RANK": "2"})


@pytest.mark.integration
def test_init_distributed_two_gloo_ranks(tmp_path):
    """Two real processes join through init_distributed and all_reduce."""
    import subprocess

    script = tmp_path / "ar.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from hpc.env import init_distributed, destroy_distributed\n"
        "env = init_distributed(timeout_s=60)\n"
        "t = torch.tensor([float(env.rank + 1)])\n"
        "dist.all_reduce(t)\n"
        f"open(r'{tmp_path}/rank%d.txt' % env.rank, 'w').write(f'{{dist.get_backend()}} {{t.item()}}')\n"
        "destroy_distributed()\n"
    )
    out = subprocess.run(
        [*torchrun(2), str(script)], capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["gloo 3.0", "gloo 3.0"]


@pytest.mark.integration
def test_finish_process_ends_a_rank_with_its_code_and_output_flushed(tmp_path):
    """A rank leaves through finish_process: its exit code reaches torchrun, buffered output is not lost, and
    nothing after the call runs. A process that never joined a group just gets its code back."""
    import subprocess

    from hpc.env import finish_process

    assert finish_process(7) == 7  # this pytest process never joined a group: no exit
    script = tmp_path / "fin.py"
    script.write_text(
        "import io, logging, logging.handlers, os, sys, time, torch.distributed as dist\n"
        "from hpc.env import init_distributed, finish_process\n"
        "env = init_distributed(timeout_s=60)\n"
        "# both buffered until flushed (torchrun's `python -u` would write stdout at once; srun does not)\n"
        "sys.stdout = io.TextIOWrapper(open(1, 'wb', closefd=False), write_through=False)\n"
        f"log_file = logging.FileHandler(r'{tmp_path}/rank%d.log' % env.rank)\n"
        "logging.getLogger().addHandler(logging.handlers.MemoryHandler(100, target=log_file))\n"
        "logging.getLogger().setLevel(logging.INFO)\n"
        "logging.info('rank %d logged', env.rank)\n"
        "print(f'rank {env.rank} printed')\n"
        "pids = [None, None]\n"
        "dist.all_gather_object(pids, os.getpid())\n"
        "def running(pid):\n"
        "    try:\n"
        "        return open(f'/proc/{pid}/stat').read().split()[2] != 'Z'\n"
        "    except FileNotFoundError:\n"
        "        return False\n"
        "while env.rank == 1 and running(pids[0]):  # fail once rank 0 is gone: torchrun cannot stop it unflushed\n"
        "    time.sleep(0.05)\n"
        "finish_process(5 if env.rank == 1 else 0)\n"
        f"open(r'{tmp_path}/after%d' % env.rank, 'w')\n"
    )
    out = subprocess.run(
        [*torchrun(2), str(script)], capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "exitcode  : 5" in out.stderr, out.stderr[-2000:]
    assert "rank 0 printed" in out.stdout and "rank 1 printed" in out.stdout
    assert [(tmp_path / f"rank{r}.log").read_text().strip() for r in (0, 1)] == \
        ["rank 0 logged", "rank 1 logged"]
    assert not list(tmp_path.glob("after*"))


@pytest.mark.integration
def test_train_in_the_batch_step_of_a_multi_task_allocation_is_one_line_not_a_hang(tmp_path):
    """`stroke-tss train` typed into a 4-task batch script without srun: refused at once, exit 2, one line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_data import make_store

    store = make_store(tmp_path / "store.zarr", num_subjects=8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    env.update({**SLURM_BATCH_STEP, "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "1",
                "SLURM_JOB_NODELIST": "localhost", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-m", "stroke_tss", "train", "configs/tiny.yaml", "--fold", "0",
                           f"data.store={store}", f"run.dir={tmp_path / 'run'}", "engine.timeout_s=20"],
                          cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "stroke-tss train: error: this process is the batch step of Slurm job 48214 (SLURM_NTASKS=4, no "
        "SLURM_STEP_ID): it is one process, and the other ranks would never join; start the ranks with srun "
        "(see slurm/*.sbatch), or run one process with `srun --ntasks=1 ...`"]

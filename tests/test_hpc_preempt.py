"""One preemption exit code, hpc.preempt.EXIT_CODE, printed for shell scripts; the sbatch templates requeue on the\nflag file instead (an exit code does not survive torchrun)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpc import preempt

REPO = Path(__file__).resolve().parents[1]
REQUEUING = ["ddp_multinode", "deepspeed", "fold_array"]


def test_exit_code_is_ex_tempfail_and_printed_for_shell_scripts():
    assert preempt.EXIT_CODE == os.EX_TEMPFAIL
    out = subprocess.run([sys.executable, "-m", "hpc.preempt", "exit-code"], capture_output=True, text=True,
                         check=True, cwd=REPO, timeout=120).stdout
    assert out == f"{preempt.EXIT_CODE}\n"


@pytest.mark.parametrize("name", REQUEUING)
def test_templates_requeue_on_the_flag_file_never_on_an_exit_code(name):
    # torchrun reports a worker's exit 75 as its own 1: the flag file a saved run leaves decides instead
    text = (REPO / "slurm" / f"{name}.sbatch").read_text()
    assert re.search(r'if \[ -e "\$STROKE_TSS_PREEMPT_FILE" \]; then\n.*\n\s+scontrol requeue', text)
    assert not re.search(rf"\b{preempt.EXIT_CODE}\b", text), f"{name}.sbatch holds a copy of the exit code"

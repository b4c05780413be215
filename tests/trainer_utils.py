"""Helpers for the trainer tests: a real process killed at a chosen point."""

import os
import subprocess
import sys


def killed_run(argv: list[str], kill_at_step: int, cwd) -> int:
    """Run the real trainer CLI (`python -m dreambooth_singlora.train_dreambooth argv`) in a child process
    that SIGKILLs itself in the middle of step `kill_at_step` (after the forward, before the update): a
    deterministic kill point, no timing involved. Returns the child's return code (-9)."""
    driver = ("import os, signal, sys\n"
              "import dreambooth_singlora.train_dreambooth as T\n"
              "real = T.group_losses\n"
              "def losses(denoise, sched, datas, step, micro, *a):\n"
              "    out = real(denoise, sched, datas, step, micro, *a)\n"
              f"    if step == {kill_at_step}:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return out\n"
              "T.group_losses = losses\n"
              "T.main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", driver, *argv], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # the same thread count as the tests' own runs
    return r.returncode

"""Helpers shared by the tests: a script of experiments/ or scripts/ loaded as a module, a real process killed
at a chosen point, accelerate's process-wide state reset around an in-process run."""

import importlib.util
import os
import subprocess
import sys
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_DIRS = [os.path.join(ROOT, "experiments"), os.path.join(ROOT, "scripts")]  # where load_script looks


@contextmanager
def fresh_accelerate_state():
    """accelerate's process-wide state reset before and after an in-process trainer run (as a process of
    its own would start and end), so its mixed precision does not leak into other tests."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def load_script(name: str):
    """<name>.py of experiments/ or scripts/ (the first that has it) as a fresh module (registered in
    sys.modules: dataclasses look their module up there; its folder on sys.path: the experiments import
    their siblings)."""
    folder = next(d for d in SCRIPT_DIRS if os.path.isfile(os.path.join(d, f"{name}.py")))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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


def noise_schedule(scheduler):
    """What the loss reads of a Base (base.py), from a diffusers noise scheduler alone: for unit tests of the loss
    that need no model."""
    from types import SimpleNamespace

    def target(latents, noise, t):
        v = scheduler.config.prediction_type == "v_prediction"
        return scheduler.get_velocity(latents, noise, t) if v else noise

    return SimpleNamespace(num_train_timesteps=scheduler.config.num_train_timesteps, add_noise=scheduler.add_noise,
                           target=target)

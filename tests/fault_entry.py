"""Test helper, not a test: ``tdlm/train.py``'s entry (``tdlm.tasks.cli``) with one fault injected, for launching in
a subprocess.

``TDLM_TEST_FAULT=kind:step[:rank]`` (rank: only that process; default every process; unset: no fault):
- ``sigkill:N`` / ``sigterm:N``: the process signals itself after step N, as the kernel or a scheduler would.
- ``kill_in_save:N``: SIGKILL in the middle of writing the step-N checkpoint (Accelerate's state written, the
  checkpoint not yet complete).
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator  # noqa: E402

from tdlm.engine.loop import Engine  # noqa: E402
from tdlm.tasks import cli  # noqa: E402


def inject(spec: str) -> None:
    kind, step, *rank = spec.split(":")
    step = int(step)
    mine = not rank or int(os.environ.get("RANK", "0")) == int(rank[0])
    sig = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "kill_in_save": signal.SIGKILL}[kind]
    if kind in ("sigkill", "sigterm"):
        next_batches = Engine._next_batches

        def _next_batches(self, n):
            if self.state.step == step and mine:  # step N is done, step N+1 is about to start
                os.kill(os.getpid(), sig)
            return next_batches(self, n)

        Engine._next_batches = _next_batches
    else:
        save_state = Accelerator.save_state

        def _save_state(self, output_dir=None, *args, **kwargs):
            out = save_state(self, output_dir, *args, **kwargs)
            if Path(output_dir).name == f".tmp_step_{step:07d}" and mine:
                os.kill(os.getpid(), sig)
            return out

        Accelerator.save_state = _save_state


if __name__ == "__main__":
    if os.environ.get("TDLM_TEST_FAULT"):
        inject(os.environ["TDLM_TEST_FAULT"])
    sys.exit(cli())

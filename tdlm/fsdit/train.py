"""Train FSDiT: a DiT that generates a 32x32 image of a class from a support set of other images of that class,
by flow matching, conditioned on the pooled SigLIP embedding of the support set.

    accelerate launch tdlm/fsdit/train.py configs/fsdit_cifar100.yaml [key=value ...]
    python tdlm/fsdit/train.py configs/fsdit_demo.yaml trainer.max_steps=50       # one process
    python tdlm/fsdit/train.py configs/fsdit_demo.yaml trainer.resume=auto        # continue where it stopped

The loop is ``tdlm.engine`` (the same as the text trainer's); the task is ``tdlm.fsdit.task.FlowMatchingTask``.
Exit codes: 0 done (or stopped by SIGTERM with a checkpoint), 2 bad input, 3 stopped by a health rule or a NaN.

This file is an entry point only: nothing imports it.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `python tdlm/fsdit/train.py` / `accelerate launch ...`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tdlm.fsdit.task import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(doc=__doc__))

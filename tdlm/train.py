"""Train a masked-diffusion (or, with ``model.causal=true``, autoregressive) language model.

    accelerate launch tdlm/train.py configs/quickstart.yaml trainer.max_steps=50
    python tdlm/train.py configs/quickstart.yaml                      # same, one process
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tdlm/train.py CONFIG   # 2 CPU procs
    python tdlm/train.py CONFIG trainer.resume=auto                    # continue where it stopped

The loss of a step is sum over masked tokens of w(t) * CE divided by the *global* number of valid tokens of
that optimizer step (all processes and micro-steps), so it does not depend on how the batch is split; exp() of
val/loss is a perplexity upper bound (AR: the exact perplexity). The loop is ``tdlm.engine``; the objectives are
``tdlm.tasks`` over ``tdlm.objective``. Exit codes: 0 done (or stopped by SIGTERM with a checkpoint), 2 bad
input, 3 stopped by a health rule or a NaN.

This file is an entry point only: nothing imports it.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `python tdlm/train.py` / `accelerate launch tdlm/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.tasks import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(doc=__doc__))

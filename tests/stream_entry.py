"""Test helper, not a test: ``tdlm/train.py``'s entry that appends each training micro-batch's row ids to
``$TDLM_TEST_BATCH_LOG.<rank>`` (JSON lines ``[step, ids]``), for launching in a subprocess; ``TDLM_TEST_FAULT`` as
in ``fault_entry.py``."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fault_entry import inject  # noqa: E402

from tdlm.engine.loop import Engine  # noqa: E402
from tdlm.tasks import cli  # noqa: E402


def record(path: str) -> None:
    next_batches = Engine._next_batches

    def recording(self, n):
        batches = next_batches(self, n)
        with open(path, "a") as f:
            f.writelines(json.dumps([self.state.step + 1, b["idx"].tolist()]) + "\n" for b in batches)
        return batches

    Engine._next_batches = recording


if __name__ == "__main__":
    record(f"{os.environ['TDLM_TEST_BATCH_LOG']}.{os.environ.get('RANK', '0')}")
    if os.environ.get("TDLM_TEST_FAULT"):
        inject(os.environ["TDLM_TEST_FAULT"])
    sys.exit(cli())

"""Test helper: train several configs one after the other in one process (one process group).

    python tests/run_configs.py '[["--config", "tiny", "--stage", "sft", ...], [...]]'
    torchrun --nproc_per_node 2 tests/run_configs.py '[...]'

Each entry is the argument list of launch/train.py (``--config`` and ``--stage`` first). Starting Python,
torch and DeepSpeed once for several short runs keeps the invariance tests affordable on two cores; each
run is the trainer's own ``train(cfg)``.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from redi_ds.config import load_config
    from redi_ds.trainer import train

    for args in json.loads(sys.argv[1]):
        config = args[args.index("--config") + 1]
        stage = args[args.index("--stage") + 1]
        rest = [a for i, a in enumerate(args) if a not in ("--config", "--stage")
                and (i == 0 or args[i - 1] not in ("--config", "--stage"))]
        train(load_config(config, stage=stage, overrides=rest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

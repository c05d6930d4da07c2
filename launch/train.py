"""Train one stage: ``deepspeed launch/train.py --stage sft|redi [--config NAME|PATH] [--section.key value ...]``.

Also runs under ``torchrun`` and plain ``python`` (one process), and is the same command as ``redi-ds train``
(``redi_ds.cli``): see there for the options and exit statuses.
"""

import sys

from redi_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="launch/train.py"))

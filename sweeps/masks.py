"""The masks sweep (see sweeps/configs/masks.yaml). `python sweeps/masks.py --help` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, also when not installed

from sweeps.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("masks"))

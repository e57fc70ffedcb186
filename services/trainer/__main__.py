"""Run the trainer service alone against external infrastructure: ``python -m services.trainer``."""

import logging

from services.common.settings import Settings
from services.platform import Platform, run

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(Platform(Settings(), services=("trainer",)))

"""Run the relabel service alone against external infrastructure: ``python -m services.relabel``."""

import asyncio
import logging

from services.common.settings import Settings
from services.platform import Platform, serve

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(Platform(Settings(), services=("relabel",))))

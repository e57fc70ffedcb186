"""Bring the catalog database to the latest Alembic revision, then exit:
``python -m services.api.migrations`` (the Helm chart's pre-install / pre-upgrade hook Job).

Reads ``DISTILLERY_DATABASE_URL`` like every service; never prints it (it carries a password).
"""

import asyncio
import logging

from services.common.db import migrate
from services.common.settings import Settings

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(migrate(Settings().resolved_database_url()))
    logging.getLogger("services.api.migrations").info("catalog schema is at the latest revision")

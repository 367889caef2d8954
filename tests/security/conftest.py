"""The security suite reuses the Data API per module (tests/api) and the running stack of
database, Toss sandbox and service (tests/loop) rather than building its own."""

from api.conftest import api_dbname, data_api
from loop.conftest import bl, stack

__all__ = ["api_dbname", "bl", "data_api", "stack"]

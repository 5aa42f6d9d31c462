"""The server fixtures of tests/api, for the end-to-end tests too."""

from tests.api.conftest import database_url, make_server, server, server_env  # noqa: F401

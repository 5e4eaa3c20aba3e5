"""The source file tests load with functions-framework's ``create_app``: it serves the service a
test built from explicit Settings (see ``tests.conftest.function_client``)."""

from shared.http import entry_point
from tests.conftest import service_being_loaded

handle = entry_point(service_being_loaded())

"""Token function entry point: functions-framework serves ``handle`` (``--target handle``)."""

from functions.token.service import create_service
from shared import config
from shared.http import entry_point

handle = entry_point(create_service(config.load()))

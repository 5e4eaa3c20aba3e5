"""Predict function entry point: functions-framework serves ``handle`` (``--target handle``).

The model (``MODEL_NAME`` in ``MODEL_DIR``) is loaded once per process, here, before serving.
"""

from functions.predict.model import load_model
from functions.predict.service import create_service
from shared import config
from shared.http import entry_point

settings = config.load()
handle = entry_point(create_service(settings, load_model(settings)))

"""The predict function without its access log and request metrics: the baseline against which
``bench_predict.py`` measures what observability costs a warm prediction.

    MODEL_NAME=shapes python -m shared.server bench/unobserved_function.py
"""

from functions.predict.model import load_model
from functions.predict.service import create_service
from shared import config
from shared.http import entry_point

settings = config.load()
handle = entry_point(create_service(settings, load_model(settings)), observe=False)

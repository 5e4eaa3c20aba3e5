"""What only a laptop runs: the ``./start.sh`` supervisor, the local gateway, the embedded Redis,
the routing table the gateway shares with the Istio manifest, and the helpers tests and benches
share. No image copies this package; it may import ``shared``, never the other way round."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

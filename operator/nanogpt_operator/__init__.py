"""nanogpt_operator: a kopf operator that serves NanoGPTModel resources
and rolls checkpoints out across many of them (NanoGPTRollout).

Run it with `kopf run -m nanogpt_operator --all-namespaces`. Importing the package registers the
handlers in kopf's default registry (see handlers.py).
"""

from nanogpt_operator import fleet_handlers as fleet_handlers
from nanogpt_operator import handlers as handlers

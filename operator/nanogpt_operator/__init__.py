"""nanogpt_operator: a kopf operator that serves NanoGPTModel resources.

Run it with `kopf run -m nanogpt_operator --all-namespaces`. Importing the package registers the
handlers in kopf's default registry (see handlers.py).
"""

from nanogpt_operator import handlers as handlers

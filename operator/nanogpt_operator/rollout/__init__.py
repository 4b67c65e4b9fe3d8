"""The NanoGPTRollout controller: roll one checkpoint out across many NanoGPTModels, in waves.

spec.py parses the rollout, model_view.py reads the models it selects, waves.py plans the waves,
state_machine.py decides each step and every write from the persisted status alone, smoke.py is the
smoke-test gate; reconcile.py runs one timer tick (the I/O around those pure decisions) through
client.py, and handlers.py registers it with kopf.
"""

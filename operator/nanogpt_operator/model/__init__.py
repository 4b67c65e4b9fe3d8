"""The NanoGPTModel controller: serve one checkpoint as a Deployment, Service and optional PVC, HPA, PDB.

Reconcile reads top to bottom: spec.py parses, build.py builds the desired children, apply.py (with
drift.py) converges the cluster on them, status.py derives status from the live children, and
rollback.py decides the model's own automatic rollback; reconcile.py runs one pass, handlers.py
registers it with kopf.
"""

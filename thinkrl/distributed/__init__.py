"""The distributed layer: FSDP2 sharding of the role models and sharded (torch distributed) checkpoints that resume
across process counts and across sharded and unsharded runs.

Imports ``models``, ``config`` and ``errors`` only.
"""

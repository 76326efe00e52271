"""Seed studies: the sweep over seeds and grid points (with compute-matched baselines), their aggregation into
``study.json``/``study.md``/plots, and the across-seed statistics (pure maths in ``stats``).

The top layer: may import ``eval``, ``cli``, ``run`` and everything below; nothing imports it.
"""

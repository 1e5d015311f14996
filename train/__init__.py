"""jaxblocks-train: the train loop (grain data, optax, Orbax checkpoints) over jaxblocks models.

``train.config.load(path, overrides)`` builds a validated :class:`train.config.Config`;
``train.loop.run(cfg)`` trains it. The command line is ``jaxblocks-train`` (``train.cli``).
"""

"""After training: read a workdir back (evaluate, export), predict on files, draw the curves.

``readback`` (a run's model and state from its checkpoints), ``predict``, ``plotting``.
"""

"""The command line: ``lsgd-jax train | evaluate | export | predict | curves``.

``main`` (the commands and their dispatch), ``train`` (the training flags, generated from
``TrainConfig``'s fields, and the guard that turns errors into one line and a status).
"""

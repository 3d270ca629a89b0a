"""The paper's rules as Optax pieces: linear scaling, warmup, decays, momentum, L2 mask, LARS.

jax and optax only: ``schedules`` (eq. 5, §2.2 warmup, step and poly decay), ``optim``
(momentum eq. 9/10 with Remark 2's correction, Remark 1's weight-decay mask, ``goyal_sgd``),
``lars`` (layer-wise rates with the paper's mask and momentum).
"""

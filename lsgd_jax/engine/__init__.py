"""The compiled step: batch layout, the train step (shard_map, per-worker BN, all-reduce), eval.

``layout`` (kn, n, K and devices checked for direct calls), ``step`` (``make_train_step``,
``make_eval_step``, normalisation on device).
"""

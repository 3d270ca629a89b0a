"""One run: config, plan, recipe, the loop, its records, checkpoints, workdir lock, logs.

``config`` (every flag), ``plan`` (every derived value and check), ``recipe`` (schedule
and optimizer from the flags), ``loop`` (``train_and_evaluate``), ``recording`` (train
records, saves), ``checkpoint``, ``workdir``, ``metrics``, ``preemption``, ``init_from``,
``model_file`` (the exported model's format), ``library_logs``, ``environment``,
``extras`` (a missing optional package: one line naming its install).
"""

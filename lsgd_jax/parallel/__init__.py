"""Processes and devices: jax.distributed start, the ("data",) mesh, feeding it, agreeing.

``distributed`` (start-up, mesh, shardings, host-to-global arrays, fake CPU devices),
``agreement`` (every decision the processes take alike, through one key-value ``exchange``),
``prefetch`` (host batches onto the mesh ahead of the step),
``failures`` (one process's error stops every process with its message).
"""

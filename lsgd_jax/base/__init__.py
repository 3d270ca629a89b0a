"""The lowest layer, standard library only: argument checks and this host's processes.

``checks`` (an integer or a number in a range, never a bool: every layer's argument checks
in one wording), ``host`` (whether a process is alive, when it started).
"""

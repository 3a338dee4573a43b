"""Stage 3, run: one planned job under ZeRO-3: the engine (:mod:`.engine`) and our fetch path (:mod:`.fetch`),
the model built or loaded as ZeRO-3 partitions it (:mod:`.loading`), warm-up and timed generates with their
measurements (:mod:`.measure`, :mod:`.inference`), a job of several devices (:mod:`.ranks`), progress output
and signals. Takes the plan's spec and DeepSpeed config; returns measurements as plain dicts, never logs them.
"""

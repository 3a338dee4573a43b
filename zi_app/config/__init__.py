"""Stage 1, configuration: the typed schema (:mod:`.schema`), the checks that name a bad key (:mod:`.checks`)
and validation, which turns a composed config into one frozen job spec (:mod:`.spec`). Imports nothing heavy.
"""

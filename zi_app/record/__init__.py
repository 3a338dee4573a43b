"""Stage 4, record: MLflow. The store (:mod:`.store`), one run per job and failures as data (:mod:`.runs`),
runs left RUNNING by a dead process (:mod:`.orphans`), secrets kept out (:mod:`.redaction`), a sweep's results
read back, tabled and plotted (:mod:`.results`), its end (:mod:`.sweep_end`) and its best run (:mod:`.best`).
Receives plain dicts and files; knows nothing of torch or DeepSpeed.
"""

"""A real ZeRO-3 run generates exactly the greedy tokens plain transformers generates from the same weights.

The weights are a seeded random tiny model built and saved in this process without DeepSpeed
(ZeRO-3's own random init differs from a plain one); the app loads them with ``model=pretrained``
in its own process, and its tokens are read back from the run's ``generation.json`` artifact.
"""

from __future__ import annotations

import pytest

BATCH, PROMPT_LEN, GEN_LEN = 2, 16, 8
CASES = [(model, offload, pin) for model in ("tiny-opt", "tiny-llama")
         for offload, pin in (("none", True), ("cpu", True), ("cpu", False))]


QUICK_CASE = ("tiny-opt", "cpu", True)  # the quick tier's (pyproject.toml's markers) one real ZeRO-3 job


@pytest.mark.parametrize("model,offload,pin",
                         [pytest.param(*case, marks=pytest.mark.quick if case == QUICK_CASE else ()) for case in CASES],
                         ids=[f"{m}-offload={o}-pin={p}" for m, o, p in CASES])
def test_greedy_tokens_equal_plain_transformers(model, offload, pin, tiny_checkpoint, run_app, mlflow_store,
                                                plain_greedy):
    """Bit-identical greedy tokens for offload none and cpu (pinned or not); tiny-llama has untied
    embeddings, so its LM head is a parameter of its own."""
    checkpoint = tiny_checkpoint(model)
    run_app("model=pretrained", f"model.path={checkpoint}", "model.dtype=float32", f"offload={offload}",
            f"pin={str(pin).lower()}", f"batch={BATCH}", f"prompt_len={PROMPT_LEN}", f"gen_len={GEN_LEN}",
            "warmup=0", "repeat=1").expect_success()

    [job] = mlflow_store.job_runs()
    assert job.info.status == "FINISHED"
    zero = mlflow_store.artifact_json(job, "ds_config.json")["zero_optimization"]
    expected_offload = {"device": "cpu", "pin_memory": pin} if offload == "cpu" else None
    assert zero.get("offload_param") == expected_offload
    tokens = mlflow_store.artifact_json(job, "generation.json")["generated_token_ids"]
    assert len({t for row in tokens for t in row}) > 2, f"degenerate output {tokens} would prove little"
    assert tokens == plain_greedy(checkpoint, BATCH, PROMPT_LEN, GEN_LEN)

"""NVMe offload for real: DeepSpeed's async I/O op writes the parameters to swap files and reads them back.

Needs libaio-dev; install.sh builds the async_io op (otherwise the first NVMe job JIT-builds it: minutes, cached in
<venv>/torch_extensions).
"""

from __future__ import annotations

from zi_app.config.spec import validate
from zi_app.plan.job import plan_job

AIO_MIN_BYTES = 2**20  # DeepSpeed swaps a partition only if it has max(1 MiB, aio.block_size) bytes or more
# tiny-opt with a wider MLP, so that its fc1/fc2 weights (2048 x 128 fp32 = 1 MiB) are swapped as well as
# the 2050 x 128 learned position table: 5 swapped parameters.
ARCH = {"ffn_dim": 2048}
BATCH, PROMPT_LEN, GEN_LEN = 2, 16, 8


def swappable_parameters(path) -> dict:
    """Name -> bytes of each parameter big enough for DeepSpeed to swap to NVMe (from the checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sizes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    return {name: size for name, size in sizes.items() if size >= AIO_MIN_BYTES}


def test_nvme_offload_swaps_parameters_through_files(tiny_checkpoint, run_app, compose, mlflow_store, plain_greedy,
                                                     tmp_path):
    """Each swappable parameter lives in its own swap file under <nvme_path>/zero_stage_3/, the job
    finishes with its metrics, greedy tokens equal plain transformers' on the same weights, and the files
    take the disk the job's plan said they would.

    aio.block_size is lowered to 1 MiB: DeepSpeed keeps any partition smaller than the block size in
    host memory, and the default 16 MiB is larger than every parameter of a tiny model.
    """
    checkpoint = tiny_checkpoint("tiny-opt", **ARCH)
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    overrides = ("model=pretrained", f"model.path={checkpoint}", "model.dtype=float32", "offload=nvme",
                 f"offload.nvme_path={nvme}", f"offload.aio.block_size={AIO_MIN_BYTES}", f"batch={BATCH}",
                 f"prompt_len={PROMPT_LEN}", f"gen_len={GEN_LEN}", "warmup=0", "repeat=1")
    run = run_app(*overrides).expect_success()

    [job] = mlflow_store.job_runs()
    assert job.info.status == "FINISHED"
    assert job.data.metrics["tokens_per_sec"] > 0 and job.data.metrics["decode_step_s"] > 0
    offload = mlflow_store.artifact_json(job, "ds_config.json")["zero_optimization"]["offload_param"]
    assert (offload["device"], offload["nvme_path"]) == ("nvme", str(nvme))

    swap_files = sorted((nvme / "zero_stage_3" / "float32params" / "rank0").glob("*_param.tensor.swp"))
    swapped = swappable_parameters(checkpoint)
    assert len(swap_files) == len(swapped) == 5, (swap_files, swapped, run.tail())
    # Files are padded to DeepSpeed's I/O alignment: each holds at least its parameter's bytes.
    file_sizes = sorted(f.stat().st_size for f in swap_files)
    assert all(written >= size for written, size in zip(file_sizes, sorted(swapped.values()))), file_sizes
    assert plan_job(validate(compose(*overrides)), cuda=False).predicted_nvme_bytes == sum(file_sizes)

    tokens = mlflow_store.artifact_json(job, "generation.json")["generated_token_ids"]
    assert tokens == plain_greedy(checkpoint, BATCH, PROMPT_LEN, GEN_LEN)

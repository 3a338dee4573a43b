"""``memory.fetch=overlap`` (zi_app/run/fetch.py) against DeepSpeed's coordinator as shipped (``memory.fetch=deepspeed``).

Every job runs the app in its own process (ZeRO-3's state is per process) on a seeded random tiny checkpoint
built plainly, with the tuned memory group (decoder layers as leaf modules, deep prefetch), so both fetch
paths stream every weight and prefetch the next layers. On DeepSpeed's CPU accelerator copies are
synchronous: the overlap path runs its own ordering and bookkeeping, without streams or events.
"""

from __future__ import annotations

import pytest

from conftest import profiled_step_events

BATCH, PROMPT_LEN, GEN_LEN = 2, 8, 4
WORKLOAD = (f"batch={BATCH}", f"prompt_len={PROMPT_LEN}", f"gen_len={GEN_LEN}", "warmup=0", "repeat=1")
AIO_MIN_BYTES = 2**20  # DeepSpeed swaps a partition to NVMe only from max(1 MiB, aio.block_size) bytes
# A wider MLP (2048 x 128 fp32 = 1 MiB) so that NVMe offload really swaps the MLP weights (tests/run/test_nvme.py).
WIDE_MLP = {"tiny-opt": {"ffn_dim": 2048}, "tiny-llama": {"intermediate_size": 2048}}
GRID = [(model, offload, quant) for model in ("tiny-opt", "tiny-llama") for offload in ("none", "cpu", "nvme")
        for quant in ("none", "int8")]
EVERY_WEIGHT_RESIDENT = "memory.persistence=1000000000"  # every parameter under ZeRO-3's persistence threshold


def _grid_id(case) -> str:
    model, offload, quant = case
    return f"{model}-offload={offload}-quant={quant}"


def _overrides(checkpoint, offload: str, quant: str, tmp_path) -> tuple:
    overrides = ["model=pretrained", f"model.path={checkpoint}", "model.dtype=float32", f"offload={offload}",
                 f"quant={quant}", "memory=tuned", "profile_step=true", *WORKLOAD]
    if offload == "nvme":
        nvme = tmp_path / "nvme"
        nvme.mkdir(exist_ok=True)
        overrides += [f"offload.nvme_path={nvme}", f"offload.aio.block_size={AIO_MIN_BYTES}"]
    return tuple(overrides)


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_greedy_tokens_identical_between_fetch_paths(case, tiny_checkpoint, job, plain_greedy, tmp_path):
    """Bit-identical greedy tokens from both fetch paths; unquantized, both equal plain transformers'."""
    model, offload, quant = case
    checkpoint = tiny_checkpoint(model, **(WIDE_MLP[model] if offload == "nvme" else {}))
    common = _overrides(checkpoint, offload, quant, tmp_path)
    shipped = job(*common, "memory.fetch=deepspeed")
    overlap = job(*common, "memory.fetch=overlap")
    assert len({t for row in shipped.tokens for t in row}) > 2, f"degenerate output {shipped.tokens} proves little"
    assert overlap.tokens == shipped.tokens
    if quant == "none":
        assert overlap.tokens == plain_greedy(checkpoint, BATCH, PROMPT_LEN, GEN_LEN)
    # The profiled step still sees ZeRO-3's hooks fetch every decoder layer on the overlap path.
    layers = 2
    assert overlap.metrics["profile_zero3_fetches"] == shipped.metrics["profile_zero3_fetches"] >= layers
    if "profile_host_sync_wait_s" in shipped.metrics:  # CUDA only: the CPU accelerator never synchronises
        assert overlap.metrics["profile_host_sync_wait_s"] < shipped.metrics["profile_host_sync_wait_s"]


def _calls(job, source: str, function: str) -> int:
    """Calls of ``function`` of the file ``source`` in the job's profiled decode step, read from its trace."""
    return sum(1 for e in profiled_step_events(job.artifacts) if e.get("cat") == "python_function"
               and e["name"].startswith(source) and e["name"].endswith(f": {function}"))


def _all_gathers(job) -> int:
    """DeepSpeed all-gather calls (one fetch each) in the job's profiled decode step."""
    return _calls(job, "deepspeed/runtime/zero/partition_parameters.py", "all_gather_coalesced")


def test_the_prefetch_fetches_each_module_on_its_own(tiny_checkpoint, job, tmp_path):
    """The overlap path prefetches each module's parameters in a fetch of their own (an event each on CUDA, so a
    module waits for its own copies only), where DeepSpeed's coordinator fetches the prefetch bucket's modules
    together: with every weight streamed and a bucket deeper than the model, more fetches a step."""
    checkpoint = tiny_checkpoint("tiny-opt")
    common = _overrides(checkpoint, "cpu", "none", tmp_path)
    shipped = job(*common, "memory.fetch=deepspeed")
    overlap = job(*common, "memory.fetch=overlap")
    layers = 2
    # At least one fetch for each layer and one for the token and position embeddings; DeepSpeed's takes 3.
    assert _all_gathers(overlap) >= layers + 2
    assert _all_gathers(overlap) > _all_gathers(shipped) > 0


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_linear_layers_skip_autograds_bookkeeping(quant, tiny_checkpoint, job, tmp_path):
    """On the overlap path a decode step's linear layers compute DeepSpeed's linear without its autograd Function
    (``apply`` binds its arguments on every call); on DeepSpeed's path every one goes through it. The tokens are
    the same (test_greedy_tokens_identical_between_fetch_paths), quantized weights included."""
    checkpoint = tiny_checkpoint("tiny-opt")
    common = _overrides(checkpoint, "cpu", quant, tmp_path)
    shipped = job(*common, "memory.fetch=deepspeed")
    overlap = job(*common, "memory.fetch=overlap")
    layers, linears_per_layer = 2, 6  # q, k, v, out, fc1, fc2
    linears = _calls(shipped, "deepspeed/runtime/zero/linear.py", "forward")
    assert linears >= layers * linears_per_layer
    assert _calls(overlap, "deepspeed/runtime/zero/linear.py", "forward") == linears
    # One autograd Function call fewer for each linear: the other calls are ZeRO-3's module hooks' own.
    applies = (_calls(job, "torch/autograd/function.py", "apply") for job in (shipped, overlap))
    assert next(applies) - next(applies) == linears
    assert overlap.tokens == shipped.tokens


def test_every_weight_resident_runs_without_hooks(tiny_checkpoint, job, plain_greedy, tmp_path):
    """With every parameter persistent, overlap removes ZeRO-3's module hooks (no fetch in a profiled step)
    and generates the same tokens as DeepSpeed's path, which still runs its hooks."""
    checkpoint = tiny_checkpoint("tiny-opt")
    common = (*_overrides(checkpoint, "cpu", "none", tmp_path), EVERY_WEIGHT_RESIDENT)
    shipped = job(*common, "memory.fetch=deepspeed")
    overlap = job(*common, "memory.fetch=overlap")
    assert shipped.metrics["profile_zero3_fetches"] > 0
    assert overlap.metrics["profile_zero3_fetches"] == 0
    assert "ZeRO-3's per-module fetch/release hooks removed" in overlap.output
    assert overlap.tokens == shipped.tokens == plain_greedy(checkpoint, BATCH, PROMPT_LEN, GEN_LEN)


def test_a_model_that_fits_is_told_offload_is_not_needed(job):
    """Under a GPU budget the whole model fits, ``tuned`` plans every weight resident, the run is tagged
    ``zi.offload_needed=false`` and the result line says so; nothing is fetched in a decode step."""
    fits = job("model=tiny-opt", "memory=tuned", "memory.gpu_budget_gib=2", "profile_step=true", *WORKLOAD)
    assert fits.tags["zi.offload_needed"] == "false"
    assert "offload not needed: every weight fits the GPU budget with offload=none" in fits.output
    assert fits.metrics["profile_zero3_fetches"] == 0


@pytest.mark.quick
def test_offload_needed_is_planned_against_the_budget(compose):
    """The planner's verdict: OPT-13B fp16 (26 GB of weights) needs offload under 24 GiB, not under 139 GiB;
    without a known budget (no GPU, no memory.gpu_budget_gib) there is no verdict."""
    from zi_app import validate
    from zi_app.plan.facts import model_facts
    from zi_app.plan.job import residency
    from zi_app.plan.workload import budget_bytes, workload

    spec = validate(compose("model=opt-13b", "batch=32"))
    facts = model_facts(spec.model.arch)

    def planned(device_bytes=None):
        return residency(spec, workload(spec), facts, budget_bytes(spec, device_bytes))

    assert planned(24 * 2**30).offload_needed is True
    whole_card = planned(139 * 2**30)
    assert whole_card.offload_needed is False
    assert whole_card.resident_bytes == 2 * sum(facts.param_numels)  # tuned then keeps every weight resident
    assert planned().offload_needed is None


@pytest.mark.quick
def test_overlap_refused_on_an_untested_deepspeed():
    """Any DeepSpeed other than the tested release refuses ``overlap``, naming the key and both versions;
    ``deepspeed`` is accepted on any version."""
    from zi_app.plan import preflight
    from zi_app import ConfigError

    with pytest.raises(ConfigError) as refused:
        preflight.check_fetch_supported("overlap", installed="0.20.1")
    assert refused.value.key == "memory.fetch"
    message = str(refused.value)
    assert message.startswith("memory.fetch='overlap' is not allowed") and "0.20.1" in message and "0.19.8" in message
    preflight.check_fetch_supported("deepspeed", installed="0.20.1")
    preflight.check_fetch_supported("overlap", installed="0.19.8")


@pytest.mark.quick
@pytest.mark.parametrize("override,key", [("memory.fetch=fast", "memory.fetch"),
                                          ("memory.max_inflight_fetches=0", "memory.max_inflight_fetches")])
def test_bad_fetch_settings_are_refused(override, key, compose):
    from zi_app import ConfigError, validate

    with pytest.raises(ConfigError) as refused:
        validate(compose(override))
    assert refused.value.key == key


def test_a_second_engine_in_the_same_process_keeps_deepspeeds_coordinator(run_python, tmp_path):
    """An app that runs our overlap engine and then trains its own ZeRO-3 engine in the same process: the
    second engine gets DeepSpeed's coordinator, unmodified, and trains (helpers/two_engines.py)."""
    from pathlib import Path

    helper = Path(__file__).parents[1] / "helpers" / "two_engines.py"
    run = run_python([helper], tmp_path).expect_success()
    assert "ours: OverlapCoordinator" in run.stdout, run.tail()
    assert "theirs: PartitionedParameterCoordinator" in run.stdout, run.tail()
    assert "theirs trained: loss" in run.stdout, run.tail()

"""One process, two DeepSpeed engines: zi_app's inference engine with ``memory.fetch=overlap``, then an app's
own ZeRO-3 training engine. Prints each engine's coordinator class and the training loss; exits non-zero
if the second engine's coordinator is not DeepSpeed's own or DeepSpeed's class was modified.

Usage: ``python two_engines.py`` (run by tests/run/test_fetch_path.py in a fresh process).
"""

from __future__ import annotations

import gc

import torch
from hydra import compose, initialize_config_dir

from zi_app import conf_dir, validate
from zi_app.run import engine
from zi_app.plan.job import ready
from zi_app.run.loading import load_model, zero3_construction
from zi_app.run.inference import random_prompts


def coordinators() -> dict:
    """Every live ZeRO-3 parameter offload object's module -> its coordinator."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    return {id(o.module): o.param_coordinator for o in gc.get_objects() if isinstance(o, DeepSpeedZeRoOffload)}


def main() -> None:
    import deepspeed
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    shipped_fetch = PartitionedParameterCoordinator._fetch_sub_module_impl
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        plan = ready(validate(compose("config", overrides=["memory=tuned", "memory.fetch=overlap"])), False)
    cfg, ds_config = plan.spec, plan.ds_config
    engine.init_distributed()
    with zero3_construction(ds_config):
        ours = engine.initialize(load_model(cfg), ds_config, overlap_fetches=cfg.memory.max_inflight_fetches)
    prompts = random_prompts(1, 8, ours.config.vocab_size, 0, engine.device())
    with torch.no_grad():
        ours.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=2, do_sample=False)
    print("ours:", type(coordinators()[id(ours)]).__name__)

    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1)
    config = {"train_batch_size": 4, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    trainer = deepspeed.initialize(model=theirs, optimizer=optimizer, config=config)[0]
    coordinator = coordinators()[id(trainer.module)]
    print("theirs:", type(coordinator).__name__)
    assert type(coordinator) is PartitionedParameterCoordinator, type(coordinator)
    assert PartitionedParameterCoordinator._fetch_sub_module_impl is shipped_fetch
    inputs, targets = torch.randn(4, 16), torch.randn(4, 1)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(trainer(inputs), targets)
        trainer.backward(loss)
        trainer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    print(f"theirs trained: loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()

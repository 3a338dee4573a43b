"""FlexGen's OPT benchmark (``flexgen.flex_opt``, FlexGen 0.1.8) on the lent GPU, beside ours (issue 21 item 4).

FlexGen runs OPT with dummy weights (``--path _DUMMY_``) and needs two things the device does not give it:
- a tokenizer: ``run_flexgen`` loads ``facebook/opt-30b``'s from the model hub, only to turn one prompt into ids
  (with dummy weights nothing is decoded). :class:`PromptIds` gives it those ids, padded on the left as
  OPT's tokenizer pads, with no network;
- a GPU budget: FlexGen has none of its own. ``--gpu-budget-gib`` caps the CUDA caching allocator at that many GiB
  (``torch.cuda.set_per_process_memory_fraction``), as ``memory.gpu_budget_gib`` caps our jobs.
Nothing else of FlexGen is changed. Its own arguments pass through; the line it prints last (its benchmark log)
is read back into one JSON line, ``flexgen-result {...}``, that benchmarks/peers/flexgen_sweep.sh collects.

    python benchmarks/peers/flexgen_opt.py --gpu-budget-gib 48 -- --model facebook/opt-30b --path _DUMMY_ \\
        --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1 --compress-weight
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
from pathlib import Path
from types import SimpleNamespace

OPT_PAD_ID = 1  # OPT's tokenizer: <pad> is 1, </s> (also its BOS) is 2
PROMPT_IDS = [2, 32826, 16, 5, 812, 343, 9]  # what OPT's tokenizer gives "Paris is the capital city of"


class PromptIds:
    """The part of OPT's tokenizer ``flex_opt.get_test_inputs`` uses: ``tokenizer(prompts, padding="max_length",
    max_length=n).input_ids``, each prompt as :data:`PROMPT_IDS` padded on the left to ``n`` ids."""

    @classmethod
    def from_pretrained(cls, name: str, **kwargs) -> "PromptIds":
        return cls()

    def __call__(self, prompts, padding: str = "max_length", max_length: int = len(PROMPT_IDS)):
        ids = PROMPT_IDS[-max_length:]
        return SimpleNamespace(input_ids=[[OPT_PAD_ID] * (max_length - len(ids)) + ids for _ in prompts])


LOG_FIELDS = {  # flexgen.utils.write_benchmark_log's words -> our keys
    "peak gpu mem": "peak_gpu_gb", "prefill latency": "prefill_s", "decode latency": "decode_s",
    "total latency": "total_s", "total throughput": "tokens_per_sec", "decode throughput": "decode_tokens_per_sec",
    "model size": "model_gb", "cache size": "cache_gb"}


def read_log(text: str) -> dict:
    """FlexGen's benchmark log as numbers (GB are 2**30 bytes there, seconds, tokens/s)."""
    found = {}
    for words, key in LOG_FIELDS.items():
        match = re.search(rf"{words}: ([0-9.]+)", text)
        if match:
            found[key] = float(match.group(1))
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-budget-gib", type=float, required=True, help="cap on the CUDA caching allocator")
    parser.add_argument("flexgen_args", nargs=argparse.REMAINDER, help="after --: flexgen.flex_opt's arguments")
    args = parser.parse_args(argv)
    flexgen_argv = [a for a in args.flexgen_args if a != "--"]

    import torch
    from flexgen import flex_opt

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_budget_gib * 2**30 / total))
    flex_opt.AutoTokenizer = PromptIds
    flexgen_parser = argparse.ArgumentParser()
    flex_opt.add_parser_arguments(flexgen_parser)
    options = flexgen_parser.parse_args(flexgen_argv)
    log_file = Path(options.log_file if options.log_file != "auto" else "flexgen_result.log")
    options.log_file = str(log_file)
    log_file.unlink(missing_ok=True)
    flex_opt.run_flexgen(options)
    # The process's peak resident set (Linux reports KiB): FlexGen's host memory, as our jobs log theirs.
    peak_host_gib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    result = {"argv": flexgen_argv, "gpu_budget_gib": args.gpu_budget_gib, "peak_host_gib": peak_host_gib,
              **read_log(log_file.read_text())}
    print("flexgen-result " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())

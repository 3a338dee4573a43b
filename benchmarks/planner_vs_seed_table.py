"""The planner against DeepSpeed's published ZeRO-Inference table (issue 21 item 3): for every cell of the table
(1x A6000, prompt 512, 32 new tokens, "the best throughput from a batch size sweep"), ``zi-plan``'s batch sweep on
``hardware=a6000`` (a preset never measured by us: the planner's constants were fitted on H200 runs only), its
best batch and tokens/s with our settings (``memory=tuned``; with the KV cache offloaded, our host cache at full
width or in int4, ``kvcache.quant``), and DeepSpeed's own settings (``memory=reference``,
which is what the published runs used) at the published batch, beside the published values. No GPU needed.

    python benchmarks/planner_vs_seed_table.py [--out docs/results/planner_vs_seed_table_<date>.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from hydra import initialize_config_dir

from zi_app.config.paths import conf_dir
from zi_app.zi_plan import best, composed, plan_point

# (weights, KV cache) -> model -> (published tokens/s, its batch, weights' offload); FlexGen's columns left out.
PUBLISHED: Dict[Tuple[str, str], Dict[str, Tuple[float, int, str]]] = {
    ("int4", "gpu"): {"opt-30b": (22.74, 24, "cpu"), "opt-66b": (7.68, 16, "cpu"), "opt-175b": (1.21, 8, "cpu"),
                      "bloom-176b": (0.65, 4, "cpu"), "llama-2-70b": (24.05, 96, "cpu")},
    ("none", "cpu"): {"opt-30b": (12.32, 96, "cpu"), "opt-66b": (3.63, 40, "cpu"), "opt-175b": (0.47, 32, "nvme"),
                      "bloom-176b": (0.47, 32, "nvme"), "llama-2-70b": (2.91, 96, "cpu")},
    ("int4", "cpu"): {"opt-30b": (19.34, 128, "cpu"), "opt-66b": (8.08, 64, "cpu"), "opt-175b": (2.26, 24, "cpu"),
                      "bloom-176b": (1.33, 24, "cpu"), "llama-2-70b": (3.65, 200, "cpu")},
}
BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 96, 128, 160, 200, 256)
COMMON = ("model.dtype=float16", "hardware=a6000", "prompt_len=512", "gen_len=32")  # float16: as the published runs


def cell_overrides(model: str, quant: str, kvcache: str, offload: str) -> List[str]:
    """The overrides of one cell, less batch and memory."""
    nvme = ["offload=nvme", "offload.nvme_path=/tmp"] if offload == "nvme" else []
    return [f"model={model}", f"quant={quant}", f"kvcache={kvcache}", *nvme, *COMMON]


def plan(point: List[str]) -> dict:
    """zi-plan's row of one point, planned for the preset's machine."""
    return plan_point(point, composed(point), cuda=True)


def describe(row: dict) -> str:
    """A planned point's batch, its host cache's width where quantized, and the layers whose cache the plan keeps
    on the GPU: "bsz 48, KV int4, 36 layers kept"."""
    values = dict(o.split("=", 1) for o in row["overrides"].split())
    width = values.get("kvcache.quant", "none")
    kept = row.get("kv_gpu_layers") or 0
    return (f"bsz {values['batch']}" + ("" if width == "none" else f", KV {width}")
            + (f", {kept} layers kept" if kept else ""))


def ratio(ours: Optional[float], published: float) -> str:
    return f"{ours / published:.2f}" if ours else ""


def rows() -> List[List[str]]:
    """One table row per cell."""
    table = []
    for (quant, kvcache), models in PUBLISHED.items():
        for model, (published, batch, offload) in models.items():
            common = cell_overrides(model, quant, kvcache, offload)
            # with the cache offloaded, our host cache at full width and quantized, what the budget holds of it kept
            # on the GPU, as seed_table.py sweeps them
            widths = ([[f"kvcache.quant={width}", "kvcache.gpu_layers=auto"] for width in ("none", "int4")]
                      if kvcache == "cpu" else [[]])
            sweep = [plan([*common, f"batch={b}", "memory=tuned", *width]) for b in BATCHES for width in widths]
            top = best(sweep)
            reference = plan([*common, f"batch={batch}", "memory=reference"])
            ref_speed = reference["predicted_tokens_per_sec"] if reference["fits"] else None
            why = "" if reference["fits"] else reference["reason"].split(": ", 1)[-1][:90]
            table.append([
                f"{'int4' if quant == 'int4' else 'fp16'}{', NVMe' if offload == 'nvme' else ''}", kvcache, model,
                f"{published:.2f} (bsz {batch})",
                f"{top['predicted_tokens_per_sec']:.2f} ({describe(top)})" if top else "none fits",
                ratio(top and top["predicted_tokens_per_sec"], published),
                f"{ref_speed:.2f}" if ref_speed else f"refused: {why}", ratio(ref_speed, published)])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = parser.parse_args()
    header = ["weights", "KV cache", "model", "published tokens/s", "planned best, tuned", "tuned / published",
              "planned at the published batch, reference", "reference / published"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        body = rows()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(f"### The planner against DeepSpeed's published table (hardware=a6000)\n\n"
                            f"Command: `python benchmarks/planner_vs_seed_table.py --out {args.out}`\n\n"
                            f"Batches swept: {', '.join(map(str, BATCHES))}; {' '.join(COMMON)}.\n\n{text}\n")


if __name__ == "__main__":
    main()

"""On a CUDA machine: greedy tokens of memory.fetch=deepspeed and overlap, one fresh process each, compared.

The CPU test suite proves the two identical on DeepSpeed's CPU accelerator, where copies are synchronous;
this checks the same on the GPU, where overlap's ordering rests on CUDA events across streams.

    python3 benchmarks/fetch_tokens_match.py model=opt-1.3b batch=4 [override ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

FETCHES = ("deepspeed", "overlap")
COMMON = ["memory=tuned", "memory.persistence=h", "prompt_len=64", "gen_len=16", "warmup=0", "repeat=1"]


def tokens(store: Path, fetch: str, overrides: list) -> list:
    """The generated token ids of one job run with ``memory.fetch=fetch``."""
    uri = f"sqlite:///{store}/mlflow.db"
    subprocess.run([sys.executable, "-m", "zi_app", *COMMON, *overrides, f"memory.fetch={fetch}",
                    f"tracking.uri={uri}", f"tracking.experiment=tokens-{fetch}"], check=True)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(f"tokens-{fetch}").experiment_id])
    path = client.download_artifacts(run.info.run_id, "generation.json", str(store))
    return json.loads(Path(path).read_text())["generated_token_ids"]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        got = {fetch: tokens(Path(tmp), fetch, sys.argv[1:]) for fetch in FETCHES}
    same = got["deepspeed"] == got["overlap"]
    print(f"greedy tokens, memory.fetch=deepspeed vs overlap ({' '.join(sys.argv[1:])}): "
          f"{'identical' if same else 'DIFFERENT'} ({sum(map(len, got['overlap']))} tokens)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

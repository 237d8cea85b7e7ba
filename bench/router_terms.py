"""Every intermediate-layer term on the reference pair: its raw value at initialisation and after a short run, and the
router's health (expert shares, gate entropy, each group's error).

A short crosskd run on the benchmark protocol's first windows (4 x 256 tokens per step, lr 2e-5) with every term
switched on and the curriculum off (`use_curriculum: false`, so each term is computed and reaches the student from
step 1): the student-aware router (feature, load-balancing, importance), layerwise, contrastive and attention terms
next to LM and KD. Raw values are what the trainer logs as `raw/<term>`: each term normalised by its positions
before its weight (and KD before τ²).

    python bench/router_terms.py            # writes bench/results/router_terms.json (about 10 minutes here)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from accelerate.state import AcceleratorState

from crosskd.train.recipe import train
from quality import RESULTS_DIR, RUNS_DIR, machine, protocol_config

TERMS = ("lm", "kd", "feature", "load_balance", "importance", "layerwise", "contrastive", "attention")
ALL_TERMS = (
    "router.enabled=true",
    "router.layerwise_alpha=0.1",
    "router.contrastive_alpha=0.1",
    "router.attention_alpha=0.1",
    "schedule.use_curriculum=false",
    "schedule.kd_warmup_start=1.0",
)
RESULT = RESULTS_DIR.parent / "router_terms.json"


def summarise(records: list[dict]) -> dict:
    first, last = records[0], records[-1]
    routing = {key: [record[key] for record in records] for key in first
               if key.startswith(("expert_share/", "group_mse/")) or key == "gate_entropy"}
    return {
        "raw_at_step_1": {term: first.get(f"raw/{term}") for term in TERMS},
        f"raw_at_step_{last['step']}": {term: last.get(f"raw/{term}") for term in TERMS},
        "routing_per_step": routing,
        "finite": all(value == value for record in records for key, value in record.items()
                      if key.startswith("raw/")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    config = protocol_config("router", args.steps, run_root=RUNS_DIR / "router-terms",
                             extra_overrides=(*ALL_TERMS, "optimizer.warmup_steps=0"))
    started = time.perf_counter()
    AcceleratorState._reset_state(reset_partial_state=True)
    train(config)
    lines = (Path(config.output.run_dir) / "log.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, lines) if record["kind"] == "train"]
    result = {
        "command": "python bench/router_terms.py" + ("" if args.steps == 10 else f" --steps {args.steps}"),
        "overrides": list(ALL_TERMS),
        "steps": args.steps,
        **summarise(records),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({key: result[key] for key in result if key != "routing_per_step"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

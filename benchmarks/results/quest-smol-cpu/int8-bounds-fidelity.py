"""Decode fidelity (KL / top-1 vs dense, 64 teacher-forced steps) of Quest with exact vs int8 page bounds on the
embedded model: ``python benchmarks/results/quest-smol-cpu/int8-bounds-fidelity.py 4096 OUT.json`` (CPU, fp32)."""

import json
import sys
import time
from pathlib import Path

import torch

import attnkit
from attnkit.eval.fidelity import compare_decode, corpus_ids
from attnkit.models import load_model

torch.manual_seed(0)
model, tok = load_model("llama", dtype="float32")
length = int(sys.argv[1])
ids = corpus_ids(tok, length)
rows = []
for budget in (256, 1024):
    for bounds in ("model", "int8"):
        start = time.time()
        step = {"method": "quest", "token_budget": budget, "bounds_dtype": bounds}
        attnkit.apply(model, {"attnkit": 1, "name": "q", "steps": [step]})
        row = compare_decode(model, ids, 64)
        attnkit.unpatch(model)
        rows.append({"length": length, "budget": budget, "bounds": bounds, **row, "s": round(time.time() - start)})
        print(json.dumps(rows[-1]), flush=True)
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))

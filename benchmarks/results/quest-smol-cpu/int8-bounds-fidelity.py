"""Decode fidelity (KL / top-1 vs dense, 64 teacher-forced steps) of Quest with exact vs int8 page bounds."""
import json, sys, time
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
        t = time.time()
        attnkit.apply(model, {"attnkit": 1, "name": "q", "steps": [{"method": "quest", "token_budget": budget, "bounds_dtype": bounds}]})
        r = compare_decode(model, ids, 64)
        attnkit.unpatch(model)
        rows.append({"length": length, "budget": budget, "bounds": bounds, **r, "s": round(time.time() - t)})
        print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(f"/tmp/int8q/fid-{length}.json", "w"), indent=1)

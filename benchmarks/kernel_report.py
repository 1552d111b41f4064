"""Compile the block-sparse kernel for a GPU architecture on any machine (no GPU needed) and report its resources.

    python -m benchmarks.kernel_report                                   # default configs, sm_90 (H100/H200)
    python -m benchmarks.kernel_report --configs '[{"BLOCK_M":128,"BLOCK_N":128,"num_warps":8,"num_stages":3,"USE_TMA":true}]'

Registers per thread, stack (spills), shared memory, and instruction counts from the SASS: HGMMA (Hopper tensor
cores), LDL/STL (local-memory traffic), UTMALDG (bulk tensor copies), MUFU.EX2 (exp2). It answers most "why is it
slow" questions before any device time is spent (see the device notes in CONTRIBUTING.md). Use the Triton version
the GPU machine has (3.6 there): a different version compiles a different kernel.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

DEFAULT_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": False},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "USE_TMA": True},
]
_CONSTEXPRS = ("CAUSAL", "HAS_PAD", "USE_TMA", "WARP_SPEC", "LARGE_INDEX", "BLOCK_M", "BLOCK_N", "MASK_BQ", "MASK_BK", "KB_POW2",
               "HEAD_DIM", "D_REAL", "IEEE")


def compile_kernel(cfg: dict, head_dim: int, mask_block: int, dtype: str, arch: int, kb_pow2: int = 1024):
    from attnkit.kernels.block_sparse import triton as tri

    fn = tri._block_sparse_fwd
    names = fn.arg_names
    consts = {
        "CAUSAL": True, "HAS_PAD": False, "USE_TMA": bool(cfg.get("USE_TMA")), "WARP_SPEC": bool(cfg.get("WARP_SPEC")),
        "LARGE_INDEX": bool(cfg.get("LARGE_INDEX")),
        "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "MASK_BQ": mask_block, "MASK_BK": mask_block,
        "KB_POW2": kb_pow2, "HEAD_DIM": head_dim, "D_REAL": head_dim, "IEEE": False,
    }
    sig: dict[str, str] = {}
    for name in names:
        if name in ("Q", "K", "V", "OUT"):
            sig[name] = "*" + dtype
        elif name in ("COUNTS", "INDICES", "PAD"):
            sig[name] = "*i32"
        elif name in ("desc_k", "desc_v"):
            if consts["USE_TMA"]:
                sig[name] = f"tensordesc<{dtype}[1,1,{cfg['BLOCK_N']},{head_dim}]>"
            else:
                sig[name] = "constexpr"
                consts[name] = None
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif name in _CONSTEXPRS:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    options = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def report(kernel) -> dict:
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True)
        sass = subprocess.run([tools / "cuobjdump", "--dump-sass", cubin], capture_output=True, text=True).stdout
    line = next((x.strip() for x in usage.stdout.splitlines() if "REG:" in x), "")
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {
        "registers": int(fields.get("REG", -1)),
        "stack_bytes": int(fields.get("STACK", -1)),
        "shared_bytes": kernel.metadata.shared,
        **{op: sass.count(op) for op in ("HGMMA", "HMMA", "LDL", "STL", "UTMALDG", "LDGSTS", "MUFU.EX2")},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=json.loads, default=DEFAULT_CONFIGS)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--mask-block", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = Hopper)")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}, head_dim {args.head_dim}, mask block {args.mask_block}")
    for cfg in args.configs:
        try:
            info = report(compile_kernel(cfg, args.head_dim, args.mask_block, args.dtype, args.arch))
        except Exception as exc:  # a config the compiler rejects is a result too
            info = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[-1][:160] if str(exc) else ''}"}
        print(json.dumps(cfg), json.dumps(info))


if __name__ == "__main__":
    main()

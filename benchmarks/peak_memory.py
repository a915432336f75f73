"""Peak memory of hessrank's Gram methods on ``run.py``'s architectures, one fresh subprocess per
case, measured as ``run.py`` measures it (a warm-up call, ``malloc_trim``, then the resident-set
high-water mark above the pre-call level)::

    python benchmarks/peak_memory.py --archs lstm,encoder,gpt            # fisher, n = 128
    python benchmarks/peak_memory.py --archs gpt --method ggn --mc-samples 1

For A/B comparisons of a change: run it in each source tree (``git worktree``), alternating.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import run  # noqa: E402  (benchmarks/run.py, next to this file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="lstm,encoder,gpt",
                        help="comma-separated architectures of run.py")
    parser.add_argument("--method", default="fisher", choices=("fisher", "ggn"))
    parser.add_argument("--mc-samples", type=int, default=None, help="ggn: Monte-Carlo columns")
    parser.add_argument("--n", type=int, default=run.ARCH_N, help="batch size")
    args = parser.parse_args()
    options: dict[str, object] = {"method": args.method}
    if args.mc_samples is not None:
        options["mc_samples"] = args.mc_samples
    for arch in args.archs.split(","):
        spec = {"model": arch, "n": args.n, "seed": 0, "tool": "hessrank", "opts": options,
                "warm": True, "device": "cpu"}
        out = run.memory_case(spec, 1200.0)
        if "error" in out:
            print(f"{arch:12} {args.method:6} error: {out['error']}")
            continue
        print(f"{arch:12} {args.method:6} peak {out['peak_bytes'] / 2**20:8.0f} MiB  "
              f"(one n x P float32 tensor: "
              f"{args.n * run.num_params(run.build_model(spec)) * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()

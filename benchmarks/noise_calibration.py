"""How far correct loading paths are from the fp32 reference, against the dtype's own noise on the same model.

For synthetic XComposer-like bases of growing depth and width, in bf16 (and fp16), with a correct adapter: the
base's own noise (the base in the dtype against its fp32 run, per row class), each path's error against the fp32
reference, their ratio, and the adapter's effect. The tolerance policy (README, Tolerance policy) takes
``noise_factor`` x noise as the band: the largest ratio printed here is what that factor must exceed.

    bash scripts/in-venv python benchmarks/noise_calibration.py --shapes 8x128 16x256 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness.synthetic import BundleSpec, build_bundle
from harness.synthetic.family import TINY


def dims_for(layers: int, hidden: int):
    return TINY.with_(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                      num_attention_heads=max(4, hidden // 64), num_key_value_heads=max(2, hidden // 256),
                      vocab_size=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4x128", "16x256"], help="LAYERSxHIDDEN")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cache", default=None, help="where to build the models (default: a temporary directory)")
    args = parser.parse_args()
    from harness.checks.measure.dynamic_run import DynamicRun
    from harness.loading.paths import PATHS

    cache = Path(args.cache or tempfile.mkdtemp(prefix="noise-calibration-"))
    print(f"{'shape':>8} {'dtype':>9} {'noise img':>9} {'noise txt':>9} {'effect':>8} {'worst path':>18} "
          f"{'err/noise':>9} {'band':>8}")
    for shape in args.shapes:
        layers, hidden = map(int, shape.split("x"))
        bundle = build_bundle(BundleSpec(dims=dims_for(layers, hidden), lora_r=args.rank, lora_alpha=args.rank), cache)
        for dtype in args.dtypes:
            run = DynamicRun(bundle.base_dir, bundle.adapter_dir, dtype=dtype, device="cpu")
            worst = ("", 0.0)
            for name in PATHS:
                c = run.outcome(name).comparison
                if c is None:
                    continue
                ratio = max(c.image_max_rel / max(run.noise["image"], 1e-12), c.text_max_rel / max(run.noise["text"], 1e-12))
                worst = max(worst, (name, ratio), key=lambda x: x[1])
            print(f"{shape:>8} {dtype:>9} {run.noise['image']:9.2e} {run.noise['text']:9.2e} "
                  f"{max(run.effect.values()):8.2e} {worst[0]:>18} {worst[1]:9.2f} {run.tolerance:8.2e}", flush=True)
            run.close()


if __name__ == "__main__":
    main()

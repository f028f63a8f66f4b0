"""Write the synthetic "shapes" world (images, Karpathy/COCO caption files, VQA files, class folders)."""

from __future__ import annotations

import argparse
import logging
import time

from evaluators.datasets.shapes import generate_shapes
from evaluators.errors import cli


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", required=True, help="output folder (created if missing)")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    root = generate_shapes(
        args.root, n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed
    )
    print(f"shapes world at {root} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    cli(main)

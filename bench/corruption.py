"""Benchmark of the image corruption: vectorised masking vs a per-cell loop vs the floor.

Per image, for RGB images of 224x224, 448x448 and 1024x1024 (14 px cells, p = 0.6):
- ``floor``: the bare PIL -> numpy -> PIL round trip any numpy-based implementation pays;
- ``vectorised``: ``trainer.core.corruption.patch_blackening`` on the PIL image (masked inside PIL,
  so it does not pay the round trip at all);
- ``array``: ``patch_blackening`` on the image as a numpy array (the numpy path; no PIL);
- ``loop``: a straightforward per-cell Python loop with the official semantics (written here as
  the baseline; seeded with the same Generator draws, so its output is checked to be identical);
- the Ray ``CorruptionPool`` with 1 and 2 actors, end to end from the driver: ``ray.put`` of the
  originals, ``submit``, ``ray.get`` of the masked images (object-store transfer both ways), and
  separately the driver-side ``submit`` cost alone (what the step's critical path pays when the
  masked refs are handed on without being fetched); images sent as PIL images and as arrays.

Not measured here: the overlap with generation in a real step (needs the rollout pool).

Prints a table and writes JSON (default ``bench/results/corruption.json``).
Run: ``.venv/bin/python bench/corruption.py [--quick] [--no-ray]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.corruption.pool import CorruptionPool
from services.corruption.service import MaskRequest
from trainer.core.corruption import patch_blackening  # noqa: E402

PATCH_SIZE = 14
PROB = 0.6


def floor(image: Image.Image) -> Image.Image:
    """The unavoidable round trip: pixels out of PIL into numpy and back."""
    return Image.fromarray(np.asarray(image))


def loop_baseline(image: Image.Image, patch_size: int = PATCH_SIZE, prob: float = PROB, seed: int = 0) -> Image.Image:
    """Per-cell loop with the official semantics (authors' ``random_patch_blackening``), seeded.

    Grid from the top-left corner, partial edge cells, one ``random() < prob`` draw per cell in
    row-major order. Works on the uint8 array directly (the official code also round-trips
    through float32, which would only make this baseline slower).
    """
    rng = np.random.default_rng(seed)
    array = np.array(image)  # writable copy
    height, width = array.shape[:2]
    for y in range(0, height, patch_size):
        for x in range(0, width, patch_size):
            if rng.random() < prob:
                array[y : y + patch_size, x : x + patch_size] = 0
    return Image.fromarray(array)


def vectorised(image: Image.Image, seed: int = 0) -> Image.Image:
    return patch_blackening(image, patch_size=PATCH_SIZE, prob=PROB, seed=seed)


def time_per_call(fn: Callable[[], object], min_time_s: float) -> float:
    """Seconds per call, averaged over enough calls to fill ``min_time_s``."""
    fn()  # warm up
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s:
            return elapsed / calls
        calls = max(calls * 2, int(calls * min_time_s / max(elapsed, 1e-9)) + 1)


def bench_functions(sizes: list[int], rounds: int, min_time_s: float) -> list[dict]:
    rows = []
    for size in sizes:
        rng = np.random.default_rng(size)
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        # Same semantics, cell for cell: the comparison is between equal outputs.
        expected = np.asarray(loop_baseline(image, seed=3))
        assert np.array_equal(np.asarray(vectorised(image, 3)), expected)
        array = np.asarray(image)
        methods = {
            "floor": lambda image=image: floor(image),
            "vectorised": lambda image=image: vectorised(image),
            "array": lambda array=array: patch_blackening(array, patch_size=PATCH_SIZE, prob=PROB, seed=0),
            "loop": lambda image=image: loop_baseline(image),
        }
        samples: dict[str, list[float]] = {name: [] for name in methods}
        # Interleave the methods round by round so load from other processes on this shared
        # machine hits them alike; report the median round.
        for _ in range(rounds):
            for name, fn in methods.items():
                samples[name].append(time_per_call(fn, min_time_s))
        ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}

        def ratio(numerator: str, denominator: str, samples: dict[str, list[float]] = samples) -> float:
            # Median of per-round ratios: both timings of a round saw the same machine load.
            pairs = zip(samples[numerator], samples[denominator])
            return statistics.median(a / b for a, b in pairs)

        rows.append(
            {
                "size": size,
                "floor_ms": ms["floor"],
                "vectorised_ms": ms["vectorised"],
                "array_ms": ms["array"],
                "loop_ms": ms["loop"],
                "min_ms": {name: 1e3 * min(values) for name, values in samples.items()},
                "vectorised_over_floor": ratio("vectorised", "floor"),
                "array_over_floor": ratio("array", "floor"),
                "loop_over_floor": ratio("loop", "floor"),
                "loop_over_vectorised": ratio("loop", "vectorised"),
                "samples_ms": {name: [1e3 * v for v in values] for name, values in samples.items()},
            }
        )
    return rows


def bench_ray(
    sizes: list[int],
    workers: list[int],
    images_per_size: dict[int, int],
    rounds: int,
    num_cpus: float,
) -> list[dict]:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for num_workers in workers:
            pool = CorruptionPool(num_workers=num_workers, num_cpus=num_cpus, patch_size=PATCH_SIZE, prob=PROB)
            with pool:
                for size, payload in itertools.product(sizes, ["pil", "array"]):
                    count = images_per_size[size]
                    rng = np.random.default_rng(size)
                    shape = (size, size, 3)
                    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
                    # PIL images pickle through tobytes/frombytes (the floor's round trip, on
                    # each side); numpy arrays are read zero-copy from the object store.
                    images = arrays if payload == "array" else [Image.fromarray(a) for a in arrays]
                    end_to_end, submit_only = [], []
                    for round_index in range(rounds + 1):  # round 0 warms the actors up
                        start = time.perf_counter()
                        refs = [ray.put(image) for image in images]
                        requests = [MaskRequest([ref], 0, row, round_index) for row, ref in enumerate(refs)]
                        submit_start = time.perf_counter()
                        masked_refs = pool.submit(requests)
                        submitted = time.perf_counter()
                        masked = pool.get(masked_refs, timeout_s=300)
                        done = time.perf_counter()
                        assert len(masked) == count and np.asarray(masked[0][0]).shape == shape
                        if round_index:
                            end_to_end.append((done - start) / count)
                            submit_only.append((submitted - submit_start) / count)
                        del refs, masked_refs, masked
                    rows.append(
                        {
                            "size": size,
                            "payload": payload,
                            "actors": num_workers,
                            "num_cpus_per_actor": num_cpus,
                            "images": count,
                            "end_to_end_ms_per_image": 1e3 * statistics.median(end_to_end),
                            "submit_ms_per_image": 1e3 * statistics.median(submit_only),
                        }
                    )
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per timing sample")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (smoke run)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray pool measurements")
    parser.add_argument("--ray-cpus", type=float, default=0.25, help="num_cpus per actor")
    default_out = Path(__file__).resolve().parent / "results" / "corruption.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.min_time = 2, 0.05

    functions = bench_functions(args.sizes, args.rounds, args.min_time)
    print(f"\nper-image time, RGB, {PATCH_SIZE} px cells, p = {PROB} (median of {args.rounds} rounds)")
    print("ms are medians over rounds; ratios are medians of per-round ratios")
    print(
        f"{'size':>6} {'floor ms':>9} {'vector ms':>10} {'array ms':>9} {'loop ms':>9} "
        f"{'vec/floor':>10} {'array/floor':>12} {'loop/floor':>11} {'loop/vec':>9}"
    )
    for row in functions:
        print(
            f"{row['size']:>6} {row['floor_ms']:>9.3f} {row['vectorised_ms']:>10.3f} {row['array_ms']:>9.3f} "
            f"{row['loop_ms']:>9.3f} {row['vectorised_over_floor']:>10.2f} {row['array_over_floor']:>12.2f} "
            f"{row['loop_over_floor']:>11.2f} {row['loop_over_vectorised']:>9.1f}"
        )

    ray_rows: list[dict] = []
    if not args.no_ray:
        # Enough images per round to pipeline through the actors, bounded in bytes.
        images_per_size = {size: max(8, min(64, (1 << 24) // (size * size))) for size in args.sizes}
        ray_rounds = max(2, args.rounds // 2 + 1)
        ray_rows = bench_ray(args.sizes, [1, 2], images_per_size, ray_rounds, args.ray_cpus)
        print("\nRay CorruptionPool, per image: put + submit + get (end to end) and submit alone")
        print(
            f"{'size':>6} {'payload':>8} {'actors':>7} {'images':>7} {'e2e ms':>8} {'submit ms':>10} {'e2e/floor':>10}"
        )
        floors = {row["size"]: row["floor_ms"] for row in functions}
        for row in ray_rows:
            row["end_to_end_over_floor"] = row["end_to_end_ms_per_image"] / floors[row["size"]]
            print(
                f"{row['size']:>6} {row['payload']:>8} {row['actors']:>7} {row['images']:>7} "
                f"{row['end_to_end_ms_per_image']:>8.3f} "
                f"{row['submit_ms_per_image']:>10.3f} {row['end_to_end_over_floor']:>10.2f}"
            )

    result = {
        "benchmark": "corruption",
        "patch_size": PATCH_SIZE,
        "prob": PROB,
        "rounds": args.rounds,
        "min_time_s": args.min_time,
        "functions": functions,
        "ray_pool": ray_rows,
        "not_measured": "overlap with generation in a real step (needs the rollout pool)",
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark of the weight sync: ``object_store`` vs ``cuda_ipc`` vs ``gloo`` for one publish + one receive.

A synthetic model of ``--params`` parameters laid out like a Qwen2.5 decoder (embedding, per
layer q/k/v/o and gate/up/down projections, norms) in ``--dtype`` is published from this process
and received by a second process (spawned, as a pool worker is) that holds the same-shaped
tensors on its own device and copies the published values into them. Each transport is timed
end to end (publish call + receive call, the receiver's copy included) and in parts:

- ``object_store``: publisher = device->host copy + safetensors blob + sha256 (what
  ``Learner.publish_weights`` does before ``ray.put``); receiver = sha256 check + blob -> tensors +
  copy into its parameters. The blob travels to the receiver through a /dev/shm file, as Ray's
  object store hands a local reader shared memory; Ray's own put/get are not in the numbers.
- ``cuda_ipc`` (GPU only): publisher = packing into GPU buckets + checksum + IPC handles;
  receiver = opening the handles + checksum + device-to-device copy into its parameters.
- ``gloo`` (CPU and GPU; the broadcast that ``nccl`` runs between GPUs): publisher = packing into
  host buckets + checksum, then the broadcast runs in the publisher's background thread;
  receiver = receiving the buckets over the two-process group + checksum + copy into its
  parameters. ``nccl`` needs a second GPU for the receiver, so it is not measured here.

Every receive is verified: the receiver returns a checksum of its parameters, which must equal
the publisher's. Prints a table (and the ratio object_store / cuda_ipc) and writes JSON
(default ``bench/results/weight_sync.json``).
Run: ``python bench/weight_sync.py [--params 1.5e9] [--dtype bfloat16] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import machine_info, warn_if_loaded, write_report  # noqa: E402
from trainer.core.weights import WeightsHandle, digest, pack_state_dict, unpack_state_dict
from trainer.learner.engine import free_port  # noqa: E402
from trainer.transport.broadcast import WeightGroup, join_weight_group
from trainer.transport.cuda_ipc import release_cuda_ipc, share_cuda_ipc
from trainer.transport.receive import load_handle


def model_shapes(params: float, vocab: int = 151_936) -> dict[str, tuple[int, ...]]:
    """Qwen2.5-like tensor shapes whose total is about ``params`` (at least one layer): hidden size
    2048 (Qwen2.5-3B's) from 1B parameters up, 896 (Qwen2.5-0.5B's) below."""
    hidden = 2048 if params >= 1e9 else 896
    inter = int(hidden * 5.5) // 64 * 64
    kv = hidden // 8
    per_layer = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "self_attn.q_proj.bias": (hidden,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    layer_params = sum(int(torch.Size(s).numel()) for s in per_layer.values())
    layers = max(1, round((params - vocab * hidden) / layer_params))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def param_checksum(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(t.double().sum().item() for t in tensors.values()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def receiver(conn: Any, shapes: dict[str, tuple[int, ...]], dtype: str, device: str) -> None:
    """The pool worker's side: own tensors, then one receive per message until told to stop."""
    dev = torch.device(device)
    params = {k: torch.zeros(s, dtype=getattr(torch, dtype), device=dev) for k, s in shapes.items()}
    conn.send_bytes(pickle.dumps("ready"))
    while True:
        msg = pickle.loads(conn.recv_bytes())
        if msg is None:
            break
        if msg[0] == "join":  # the gloo group: rank 1 of 2
            join_weight_group("bench", "127.0.0.1", msg[1], 1, 2, "gloo")
            conn.send_bytes(pickle.dumps("joined"))
            continue
        handle, blob_path = msg
        t0 = time.perf_counter()
        if handle.transport == "object_store":
            blob = Path(blob_path).read_bytes()
            t_read = time.perf_counter()
            state = unpack_state_dict(blob, expected_digest=handle.digest)
        else:
            t_read = t0
            state = load_handle(handle)
        t_open = time.perf_counter()
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v, non_blocking=True)
        _sync(dev)
        del state
        t1 = time.perf_counter()
        conn.send_bytes(
            pickle.dumps(
                {
                    "read_s": t_read - t0,
                    "open_s": t_open - t_read,
                    "copy_s": t1 - t_open,
                    "total_s": t1 - t0,
                    "checksum": param_checksum(params),
                }
            )
        )


def publish(
    transport: str, state: dict[str, torch.Tensor], version: int, shm: Path, group: WeightGroup | None = None
) -> tuple[WeightsHandle, str, dict]:
    device = next(iter(state.values())).device
    t0 = time.perf_counter()
    if transport == "cuda_ipc":
        handle = share_cuda_ipc(state, version)
        return handle, "", {"publish_s": time.perf_counter() - t0}
    if transport == "gloo":
        assert group is not None
        handle = group.publish(state, version)  # packed; the broadcast is now running
        return handle, "", {"publish_s": time.perf_counter() - t0}
    host = {k: v.to("cpu") for k, v in state.items()}
    _sync(device)
    t_host = time.perf_counter()
    blob = pack_state_dict(host)
    handle = WeightsHandle(version, "object_store", len(host), len(blob), digest(blob))
    t_pack = time.perf_counter()
    path = shm / f"papo-bench-v{version}.safetensors"
    path.write_bytes(blob)
    t1 = time.perf_counter()
    return (
        handle,
        str(path),
        {"publish_s": t1 - t0, "d2h_s": t_host - t0, "pack_digest_s": t_pack - t_host, "shm_write_s": t1 - t_pack},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=None, help="model size (default 1.5e9 on GPU, 2e8 on CPU)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--transports",
        nargs="+",
        default=None,
        choices=["object_store", "cuda_ipc", "gloo"],
        help="default: object_store, cuda_ipc and gloo on GPU; object_store and gloo on CPU",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "weight_sync.json"))
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    params = args.params or (1.5e9 if cuda else 2e8)
    transports = args.transports or (["object_store", "cuda_ipc", "gloo"] if cuda else ["object_store", "gloo"])
    shapes = model_shapes(params)
    n_params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    g = torch.Generator(device=device).manual_seed(0)
    state = {k: torch.randn(s, generator=g, device=device).to(getattr(torch, args.dtype)) for k, s in shapes.items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    want = param_checksum(state)
    warning = warn_if_loaded("start", "CPU-side times are inflated")
    print(
        f"{n_params / 1e9:.2f} B params ({len(state)} tensors, {nbytes / 2**30:.2f} GiB {args.dtype}) on {device}; "
        f"{args.repeats} timed syncs per transport after one warm-up",
        flush=True,
    )

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child, shapes, args.dtype, str(device)))
    proc.start()
    child.close()
    assert pickle.loads(parent.recv_bytes()) == "ready"
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    rows: list[dict[str, Any]] = []
    version = 0
    group = None
    try:
        if "gloo" in transports:
            port = free_port()
            parent.send_bytes(pickle.dumps(("join", port)))
            group = WeightGroup("bench", "127.0.0.1", port, 0, 2, "gloo")
            assert pickle.loads(parent.recv_bytes()) == "joined"
        for transport in transports:
            timings = []
            for rep in range(args.repeats + 1):
                version += 1
                t0 = time.perf_counter()
                handle, path, pub = publish(transport, state, version, shm, group)
                parent.send_bytes(pickle.dumps((handle, path)))
                got = pickle.loads(parent.recv_bytes())
                if transport == "gloo":
                    group.wait_sent()
                total = time.perf_counter() - t0
                if path:
                    Path(path).unlink(missing_ok=True)
                if got["checksum"] != want:
                    raise RuntimeError(f"{transport}: receiver's weights differ from the published ones")
                if rep:  # the first sync warms allocators, page cache and CUDA contexts
                    timings.append(
                        {"total_s": total, **pub, **{f"recv_{k}": v for k, v in got.items() if k != "checksum"}}
                    )
            release_cuda_ipc()
            row = {"transport": transport, **{k: statistics.median(t[k] for t in timings) for k in timings[0]}}
            row["GB/s"] = nbytes / 1e9 / row["total_s"]
            rows.append(row)
    finally:
        if group is not None:
            group.close()
        parent.send_bytes(pickle.dumps(None))
        proc.join(60)
        if proc.is_alive():
            proc.kill()

    base = rows[0]["total_s"]
    print(
        f"\n{'transport':<14}{'sync s':>9}{'GB/s':>8}{'publish s':>11}{'receive s':>11}"
        f"{'vs ' + rows[0]['transport']:>18}"
    )
    for r in rows:
        print(
            f"{r['transport']:<14}{r['total_s']:>9.3f}{r['GB/s']:>8.1f}{r['publish_s']:>11.3f}{r['recv_total_s']:>11.3f}"
            f"{base / r['total_s']:>17.1f}x"
        )
    write_report(
        args.out,
        {
            "machine": machine_info(),
            "warning": warning,
            "params": n_params,
            "bytes": nbytes,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()

"""Receivers for tests/gpu run in a second process (CUDA cannot open a process's own IPC handle)."""

from __future__ import annotations

import pickle
import traceback
from typing import Any


def receive(conn: Any, kind: str, handle: Any, payload: dict[str, Any]) -> None:
    """Open ``handle`` as a receiver of ``kind`` and send back what the parent compares.

    Replies are plain pickles (tensors by value): multiprocessing's own pickler would share CPU
    tensors through file descriptors that vanish when this process exits.
    """
    send = lambda obj: conn.send_bytes(pickle.dumps(obj))  # noqa: E731
    try:
        import torch

        if kind == "raw":
            import msgpack

            from trainer.core.weights import handle_from_dict
            from trainer.transport.receive import load_handle

            if isinstance(handle, bytes):  # sent through msgpack, as vLLM's collective_rpc sends it
                handle = handle_from_dict(msgpack.unpackb(handle))
            weights = load_handle(handle)
            send({k: v.cpu().clone() for k, v in weights.items()})
        elif kind == "logprob":
            from services.logprob.scorer import LogProbWorker

            worker = LogProbWorker(
                payload["model_path"],
                role="perception",
                dtype=payload["dtype"],
                min_pixels=payload["min_pixels"],
                max_pixels=payload["max_pixels"],
            )
            before = worker.compute_logprobs(payload["batch"], payload["images"])
            version = worker.receive_weights(handle)
            after = worker.compute_logprobs(payload["batch"], payload["images"])
            send(
                {
                    "version": version,
                    "before": before,
                    "after": after,
                    "device": str(next(worker.model.parameters()).device),
                }
            )
        elif kind == "rollout_hf":
            from services.rollout.worker import RolloutWorker

            worker = RolloutWorker(
                payload["model_path"],
                backend="hf",
                dtype=payload["dtype"],
                min_pixels=payload["min_pixels"],
                max_pixels=payload["max_pixels"],
            )
            from trainer.core.weights import hf_name_map
            from trainer.transport.object_store import fetch_blob

            blob = fetch_blob(handle) if handle.transport == "object_store" else None
            version = worker.receive_weights(handle, blob)
            model = worker.engine.model
            internal = model.state_dict()
            state = {saved: internal[name].detach().cpu().clone() for saved, name in hf_name_map(model).items()}
            send({"version": version, "state": state, "device": str(next(model.parameters()).device)})
        else:
            raise ValueError(kind)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except BaseException:
        send({"error": traceback.format_exc()})
    finally:
        conn.close()

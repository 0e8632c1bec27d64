"""Checkpoints with everything an exact resume needs.

A checkpoint holds the model, optimizer, lr scheduler and grad scaler states, the number of
completed epochs, the metrics so far, the options that determine the trajectory, and every
process's random number generator states (torch CPU and CUDA, numpy, Python's random), captured
at the end of an epoch, i.e. exactly where the next epoch starts.  The data order and the
augmentation need no state: they are functions of (seed, epoch, rank) (data.py).
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional

import torch

from .options import TrainError

FORMAT_VERSION = 1
LAST = "last.pt"


def rng_state() -> Dict[str, Any]:
    """This process's generator states."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's random."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2 ** 32)
    except ImportError:
        pass


def save(path: str, state: Dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save({"format": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)


def checkpoint_state(*, epoch: int, model, optimizer, scheduler, scaler, history: List[dict], config: dict,
                     rng: List[Dict[str, Any]]) -> Dict[str, Any]:
    """rng: one entry per process, in rank order."""
    return {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "history": history,
            "config": config, "rng": rng}


def load(path: str) -> Dict[str, Any]:
    """A checkpoint file, or a folder's last.pt; TrainError if absent or not one of ours."""
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.isfile(path):
        raise TrainError(f"--resume {path}: no such checkpoint")
    try:
        # weights_only=False: the states include numpy's and Python's RNG tuples; only load
        # checkpoints you wrote.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TrainError(f"--resume {path}: not a checkpoint ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise TrainError(f"--resume {path}: not a densenet-fast train checkpoint (format {FORMAT_VERSION})")
    return state


def check_config(state: Dict[str, Any], config: dict, path: str) -> None:
    """Exact resume needs the same trajectory options; name the ones that differ."""
    saved = state["config"]
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {config[k]!r}" for k in config
            if _norm(saved.get(k)) != _norm(config[k])]
    if diff:
        raise TrainError(f"--resume {path}: the checkpoint was trained with different options: {'; '.join(diff)}")


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def restore(state: Dict[str, Any], *, model, optimizer, scheduler, scaler, rank: int,
            world_size: int) -> Optional[str]:
    """Load the states into the objects and this process's RNG; returns a warning, if any."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    set_rng_state(rng[rank % len(rng)])
    if len(rng) != world_size:
        return (f"resume: the checkpoint comes from {len(rng)} processes and this run has {world_size}; "
                f"the data shards differ, so the run continues but is not the interrupted one")
    return None

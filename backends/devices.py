"""Device names and rules that a framework's rows share (its idiomatic and tuned backends), so
that `--device` means the same for both. Each function imports its framework when called:
importing this module imports none, and changes no framework setting.
"""
from __future__ import annotations

from backends.contract import BackendUnavailable

MLX_DEVICES = {"cpu": "cpu", "gpu": "gpu", "metal": "gpu", "cuda": "gpu"}
JAX_DEVICES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}


# ---- torch ---------------------------------------------------------------------------------
def mps_available() -> bool:
    import torch
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def synchronize_torch(device: str) -> None:
    """Wait for queued work on a CUDA or MPS device (the CPU runs synchronously)."""
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


def resolve_torch_device(name: str, requested: str | None) -> str:
    """None: CUDA, then MPS, then the CPU; an explicit device must exist here."""
    import torch
    if requested is None:
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_available() else "cpu"
    if requested == "gpu":  # the runner's generic name: whichever GPU this torch has
        if torch.cuda.is_available():
            return "cuda"
        if mps_available():
            return "mps"
        raise BackendUnavailable(
            f"backend {name}: device 'gpu' is not available: no CUDA device and no "
            f"MPS (torch {torch.__version__})")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError) as error:
        raise BackendUnavailable(
            f"backend {name}: {requested!r} is not a torch device ({error})") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise BackendUnavailable(f"backend {name}: device {requested!r} is not available: "
                                     f"{why} (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendUnavailable(
                f"backend {name}: device {requested!r} is not available: only "
                f"{torch.cuda.device_count()} CUDA device(s)")
        return str(device)
    if device.type == "mps":
        if not mps_available():
            raise BackendUnavailable(
                f"backend {name}: device 'mps' is not available (needs Apple silicon "
                f"and a torch built with MPS; torch {torch.__version__})")
        return "mps"
    raise BackendUnavailable(f"backend {name} runs on cpu, cuda or mps, not on {requested!r}")


# ---- MLX -------------------------------------------------------------------------------------
def mlx_gpu_available() -> bool:
    import mlx.core as mx
    return mx.is_available(mx.gpu)


def resolve_mlx_device(name: str, requested: str | None) -> str:
    """None: MLX's own choice, its GPU (Metal or CUDA) when it has one, else the CPU."""
    if requested is None:
        return "gpu" if mlx_gpu_available() else "cpu"
    if requested not in MLX_DEVICES:
        raise BackendUnavailable(f"backend {name} has no device {requested!r}; "
                                 f"choose cpu or gpu")
    device = MLX_DEVICES[requested]
    if device == "gpu" and not mlx_gpu_available():
        raise BackendUnavailable("MLX has no GPU here (needs Metal on macOS or mlx[cuda] "
                                 "with an NVIDIA GPU)")
    return device


# ---- JAX -------------------------------------------------------------------------------------
def jax_devices(platform: str) -> list:
    import jax
    try:
        return jax.devices(platform)
    except RuntimeError:  # JAX raises when it has no backend for that platform
        return []


def resolve_jax_device(name: str, requested: str | None) -> str:
    """None: JAX's own default, its GPU when jaxlib has one, else the CPU."""
    if requested is None:
        return "gpu" if jax_devices("gpu") else "cpu"
    if requested not in JAX_DEVICES:
        raise BackendUnavailable(f"backend {name} has no device {requested!r}; "
                                 f"choose cpu or gpu")
    device = JAX_DEVICES[requested]
    if not jax_devices(device):
        raise BackendUnavailable(f"JAX has no {device} here (a GPU needs a CUDA build of "
                                 f"jaxlib, e.g. pip install 'jax[cuda12]')")
    return device

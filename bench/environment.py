"""What a result was measured on: hardware, OS, Python, framework versions, thread settings and
the git commit, plus a stable machine fingerprint (a hash of what does not drift between runs
on the same machine) so that results from different machines are never compared by mistake.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

from bench.files import REPO_ROOT

# Variables that change how many threads a framework uses or where it runs. torch takes its
# intra-op thread count from OMP_NUM_THREADS / MKL_NUM_THREADS; the torch backend records the
# resulting torch.get_num_threads() in its own details (the environment never imports torch).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "OMP_PROC_BIND",
                    "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY", "MKL_DYNAMIC",
                    "TORCH_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS", "MLX_NUM_THREADS",
                    "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def nvidia_gpus() -> list[dict]:
    """GPUs as nvidia-smi reports them (empty where there is none or no driver)."""
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if output.returncode != 0:
        return []
    gpus = []
    for line in output.stdout.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return gpus


def cpu_affinity() -> str | None:
    """The CPUs this process may run on, as ranges ("0-3,6"): shows taskset pinning."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    ranges, start = [], None
    for index, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if index + 1 == len(cpus) or cpus[index + 1] != cpu + 1:
            ranges.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(ranges)


def cpu_frequency_governor() -> str | None:
    """Linux cpufreq governor ("performance" gives steadier timings than "powersave")."""
    try:
        return Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip()
    except OSError:
        return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages when the run started: a busy machine is a noisy one."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def apple_gpus() -> list[dict]:
    """The integrated GPU of Apple silicon (Metal; its 'driver' is the macOS version)."""
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return []
    return [{"name": f"Apple GPU ({cpu_model()})", "driver": f"macOS {platform.mac_ver()[0]}",
             "memory": "unified"}]


def git_state() -> dict:
    def git(*args):
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
        return result.stdout.strip() if result.returncode == 0 else None
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty if commit else None}


def machine_fingerprint(cpu: str, cores: int, memory: int | None, system: str,
                        machine: str, gpus: list[dict]) -> str:
    # Memory is rounded to GiB: MemTotal moves by a few kB between kernel versions.
    memory_gib = round((memory or 0) / 2 ** 30)
    identity = "|".join([cpu, str(cores), str(memory_gib), system, machine,
                         ",".join(gpu["name"] for gpu in gpus)])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def collect_environment() -> dict:
    """Everything about this machine and checkout that a result depends on. Framework versions
    are added per run by the backends themselves (see runner)."""
    cpu, cores, memory = cpu_model(), usable_cores(), memory_bytes()
    gpus = nvidia_gpus() + apple_gpus()
    uname = platform.uname()
    return {
        "machine_fingerprint": machine_fingerprint(cpu, cores, memory, uname.system,
                                                   uname.machine, gpus),
        "hostname": uname.node,
        "cpu": {"model": cpu, "usable_cores": cores, "logical_cores": os.cpu_count(),
                "architecture": uname.machine, "affinity": cpu_affinity(),
                "frequency_governor": cpu_frequency_governor()},
        "load_average": load_average(),
        "memory_bytes": memory,
        "accelerators": gpus,
        "os": {"system": uname.system, "release": uname.release,
               "platform": platform.platform()},
        "python": {"version": platform.python_version(),
                   "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "thread_settings": {name: os.environ[name] for name in THREAD_VARIABLES
                            if name in os.environ},
        "git": git_state(),
    }

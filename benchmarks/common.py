"""Shared helpers of the benchmarks: model loading, SEV prompts, timers, peak memory, JSON.

Every benchmark is a script with a ``main(argv) -> dict`` that measures the baseline and the
project in the same run and returns (and prints, as JSON) both numbers and their ratio.

Memory. Torch's CPU allocator keeps no statistics and ``tracemalloc`` does not see tensor
storage, so peak memory is the process's resident-set high-water mark (``VmHWM``): each
variant runs in a fresh subprocess, which loads the model and builds its inputs, resets the
mark (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0), runs, and reports
``VmHWM − VmRSS(before)``: the extra memory the variant needed at its peak (activations,
caches, transient buffers). On CUDA ``torch.cuda.max_memory_allocated`` is used instead.

Run the benchmarks under the shared CPU lock on a shared machine
(``flock /tmp/ec_heavy.lock benchmarks/run_all``): they time things.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY = ("tiny-llama", "tiny-gemma")


# ----------------------------------------------------------------------------- model & data


def add_common_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"any name load_model accepts, or {' / '.join(TINY)} (random, for tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    ap.add_argument("--device", default="cpu")
    return ap


def setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def load(name: str, device: str = "cpu"):
    """A TransformerBridge: ``tiny-llama``/``tiny-gemma`` (random, 3 layers) or ``load_model``."""
    from emocircuits import models

    if name in TINY:
        return models.tiny_model(name.split("-", 1)[1], seed=0)
    return models.load_model(name, device=device)


def sev_prompts(model, n: int, *, split: str = "builtin:train", emotions: Sequence[str] | None = None):
    """``n`` emotion-instructed SEV prompts (paper template, chat-templated when the model has a
    chat template), in dataset order: scenario × valence × emotion, cycling if ``n`` is larger."""
    from emocircuits.data import load_sev
    from emocircuits.emotions import EKMAN6
    from emocircuits.prompts import emotion_prompts

    emotions = list(emotions or EKMAN6)
    recs = list(load_sev(split))
    per = 3 * len(emotions)
    need = -(-n // per)
    recs = (recs * (need // len(recs) + 1))[:need]
    return emotion_prompts(model, recs, emotions)[:n]


def token_stats(model, prompts) -> dict[str, float]:
    from emocircuits.prompts import encode

    lens = [len(encode(model, p.text if hasattr(p, "text") else p)) for p in prompts]
    return {"n": len(lens), "mean_tokens": sum(lens) / len(lens), "max_tokens": max(lens),
            "total_tokens": sum(lens)}


# ----------------------------------------------------------------------------- timing


def sync(device: str | torch.device = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], *, repeat: int = 3, warmup: int = 1,
           device: str | torch.device = "cpu") -> dict[str, float]:
    """Wall time of ``fn()``: ``min``/``median`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return {"min_s": min(ts), "median_s": statistics.median(ts), "repeat": len(ts)}


def interleaved(fns: dict[str, Callable[[], Any]], *, repeat: int = 3, warmup: int = 1,
                device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Time several variants round-robin (A B A B ...), so that load drifts hit all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeat)):
        for k, f in fns.items():
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            ts[k].append(time.perf_counter() - t)
    return {k: {"min_s": min(v), "median_s": statistics.median(v), "repeat": len(v)}
            for k, v in ts.items()}


def ratio(num: float, den: float) -> float | None:
    return None if not den else num / den


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


class PeakMemory:
    """Extra peak memory of a block: ``with PeakMemory(device) as pm: ...; pm.extra_mb``.

    CPU: resets the RSS high-water mark on entry (``/proc/self/clear_refs``) and reports
    ``VmHWM − VmRSS(entry)``; ``method`` says which measure was used (``ru_maxrss`` fallback
    when the reset is not permitted: then only valid in a fresh process). CUDA: the
    allocator's ``max_memory_allocated`` above the allocation at entry.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.extra_mb: float | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._base_kb = _status_kb("VmRSS") or 0
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM-after-reset minus VmRSS-before"
        except OSError:
            self.method = "ru_maxrss (no reset: fresh process only)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        if self.method.startswith("VmHWM"):
            hwm = _status_kb("VmHWM") or 0
        else:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.extra_mb = max(0, hwm - self._base_kb) / 1024


def run_child(script: Path, args: Sequence[str], *, timeout: float = 900) -> dict:
    """Run ``script`` in a fresh interpreter (for a clean memory high-water mark); its last
    stdout line must be a JSON object."""
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    cmd = [sys.executable, str(script), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed (rc {p.returncode}):\n"
                           f"{p.stderr[-3000:]}")
    lines = [x for x in p.stdout.strip().splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"{script.name} printed no JSON; stdout tail: {p.stdout[-1000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- output


def env_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.machine(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import transformer_lens

        info["transformer_lens"] = getattr(transformer_lens, "__version__", None) or _dist_version("transformer-lens")
    except ImportError:  # pragma: no cover
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic write (tmp + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_default))
    os.replace(tmp, path)
    return path


def _default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def emit(result: dict, out: str | None = None) -> dict:
    """Print ``result`` as one JSON line (the last line of stdout) and optionally save it."""
    if out:
        write_json(out, result)
    print(json.dumps(result, default=_default))
    return result


def rounded(obj: Any, nd: int = 4) -> Any:
    """Floats rounded to ``nd`` significant digits, recursively (for readable JSON)."""
    if isinstance(obj, float):
        return float(f"{obj:.{nd}g}")
    if isinstance(obj, dict):
        return {k: rounded(v, nd) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, nd) for v in obj]
    return obj


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return "?"

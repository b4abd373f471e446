"""How the decoder runs fast: fused kernels (Liger), memory-budgeted activation checkpointing, optional compile.

Usage:
    from longalign_lib import kernels
    choice = kernels.apply_fused_kernels(model, "auto", device="cuda")   # Liger RMSNorm/SwiGLU/RoPE, or plain
    plan = kernels.plan_for_model(model, "auto", tokens=32768, budget_gib=80, bf16=True, chunk_tokens=4096)
    kernels.apply_checkpointing(model, plan)          # checkpoints plan.checkpointed layers, keeps the others
    print(kernels.describe(plan))   # "... 11 of 28 decoder layers, predicted peak 76.6 GiB of a 80.0 GiB budget ..."
`build_trainer` (train.py) does all of this from the `train.*` settings and writes the choices into every row of
train_log.jsonl (`kernels`, `ckpt_layers`, `ckpt_of`, `mem_budget_gib`, `mem_predicted_gib`).

Fused kernels. `liger-kernel` (the `gpu` extra) ships Triton kernels for RMSNorm, the SwiGLU/GeGLU MLP and RoPE
and a public function per architecture (`apply_liger_kernel_to_qwen2(..., model=model)`) that swaps them into a
loaded model. We call that function with its loss options off: the loss stays loss.py's chunked cross-entropy,
exactly weighted per token. Liger's RoPE (and its class swaps for models built later) are process-wide for that
architecture; a training process trains one model, so that is harmless there. On CPU/MPS, or where the package or
the architecture is missing, the model keeps its plain PyTorch path and a log line says why.

Checkpointing. Recomputing a decoder layer in backward saves its activations (~100 kB per token for a 1.5B Qwen2
layer in bf16 autocast with fp32 master weights) for one extra forward of that layer. Checkpointing every layer
wastes speed when memory is left over, so `auto` checkpoints the fewest layers whose predicted peak fits the
budget, predicted from short measured probes, never by trial and OOM in the user's face:

- on CUDA (`measured_memory`): two real forward + loss + backward steps on a row of the planned length, one with
  every layer checkpointed and one with the last two layers kept; their peaks (forward phase, backward phase) and
  the growth per kept layer give  peak(k) = optimizer states + max(F_all + (L-k)·ΔF, B_all + (L-k)·ΔB).
  Measured, so everything counts: autocast's bf16 weight copies, the loss chunk, kernel workspaces. (A first
  version modelled the step from parts and under-predicted an H200 run by 12-16 GiB: docs/performance.md.)
- elsewhere (`memory_model`, CPU/MPS with `train.memory_budget_gib`): the bytes autograd saves per decoder layer,
  counted through saved-tensor hooks on two short rows and extrapolated to the row length, plus parameters,
  optimizer states, gradients and the loss chunk:
      peak_forward(k)  = params + optimizer states + (L-k)·layer(T) + k·boundary(T) + loss chunk
      peak_backward(k) = params + optimizer states + grads + k·boundary(T) + 2·layer(T)
  where a checkpointed layer keeps only its input (`boundary`, T × hidden in the residual dtype).
The FIRST k layers are the checkpointed ones: their recomputation happens at the end of backward, when the later
layers' activations are already freed.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .attention import packed_kwargs
from .io import LongAlignError
from .loss import model_loss

GIB = 2 ** 30
# model_type → Liger's public apply function. Gemma-family MLPs are GeGLU: Liger's option for them is `geglu`.
LIGER_FUNCTIONS = {
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen2": "apply_liger_kernel_to_qwen2",
    "qwen3": "apply_liger_kernel_to_qwen3",
    "gemma": "apply_liger_kernel_to_gemma",
    "gemma2": "apply_liger_kernel_to_gemma2",
    "gemma3_text": "apply_liger_kernel_to_gemma3_text",
}
KERNEL_SETTINGS = ("auto", "liger", "none")
PLAN_SAFETY = 0.97  # `auto` plans the predicted peak to 97 % of the budget: room for the memory model's error


def _log(msg: str) -> None:
    print(f"[longalign] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- fused kernels
@dataclass
class KernelChoice:
    """What `apply_fused_kernels` did: `backend` is "liger" or "plain"; `ops` the kernels swapped in."""

    setting: str
    backend: str
    ops: list[str] = field(default_factory=list)
    note: str = ""


def liger_status(device: str, model_type: str | None = None) -> tuple[bool, str]:
    """(usable, why not) for Liger on `device` and an architecture (`model.config.model_type`)."""
    if device != "cuda":
        return False, f"fused kernels need a CUDA device (this run uses {device})"
    if model_type is not None and model_type not in LIGER_FUNCTIONS:
        return False, (f"no Liger kernels wired for model_type '{model_type}' "
                       f"(supported: {', '.join(sorted(LIGER_FUNCTIONS))})")
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        return False, f"liger-kernel is not installed ({e}); `pip install liger-kernel` or the `gpu` extra"
    return True, ""


def _base_model(model):
    """The transformers model under a peft wrapper (Liger and checkpoint flags act on the base model)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_fused_kernels(model, setting: str = "auto", device: str = "cuda") -> KernelChoice:
    """Swap Liger's fused RMSNorm, SwiGLU/GeGLU MLP and RoPE into a loaded model (its public API), or keep plain.

    `setting`: `auto` (Liger where usable, else the plain path with a log line), `liger` (the same, but an error
    on a CUDA device when the package or the architecture is missing), `none` (plain PyTorch). Liger's losses
    are never enabled: the loss stays loss.weighted_chunked_ce.
    """
    setting = "none" if setting is None else str(setting).lower()  # `--set train.fused_kernels=none` reads as None
    if setting not in KERNEL_SETTINGS:
        raise LongAlignError(f"train.fused_kernels={setting!r}: choose one of {', '.join(KERNEL_SETTINGS)}")
    if setting == "none":
        return KernelChoice(setting, "plain", note="fused kernels off (train.fused_kernels=none)")
    base = _base_model(model)
    model_type = getattr(base.config, "model_type", None)
    ok, why = liger_status(device, model_type)
    if not ok:
        if setting == "liger" and device == "cuda":
            raise LongAlignError(f"train.fused_kernels=liger: {why}; or set train.fused_kernels=auto")
        _log(f"fused kernels: plain PyTorch path ({why})")
        return KernelChoice(setting, "plain", note=why)
    import liger_kernel.transformers as lt

    fn = getattr(lt, LIGER_FUNCTIONS[model_type], None)
    if fn is None:
        msg = f"the installed liger-kernel has no {LIGER_FUNCTIONS[model_type]}"
        if setting == "liger":
            raise LongAlignError(f"train.fused_kernels=liger: {msg}; upgrade liger-kernel")
        _log(f"fused kernels: plain PyTorch path ({msg})")
        return KernelChoice(setting, "plain", note=msg)
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True,
              "cross_entropy": False, "fused_linear_cross_entropy": False}
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    fn(model=base, **kwargs)
    ops = [k for k, v in kwargs.items() if v]
    note = f"Liger kernels ({', '.join(ops)}) applied to the {model_type} model"
    _log(f"fused kernels: {note}; loss: our chunked weighted cross-entropy")
    return KernelChoice(setting, "liger", ops, note)


# ------------------------------------------------------------------------------------------- checkpointing: model
@dataclass
class CheckpointPlan:
    """Which decoder layers recompute their activations in backward, and the memory model behind the choice."""

    setting: str
    n_layers: int
    checkpointed: list[int]
    budget_gib: float | None = None
    predicted_peak_gib: float | None = None
    layer_gib: float | None = None
    boundary_gib: float | None = None
    static_gib: float | None = None
    tokens: int | None = None
    note: str = ""

    @property
    def n_checkpointed(self) -> int:
        return len(self.checkpointed)

    def log_fields(self) -> dict:
        """The few numbers every train_log.jsonl row carries."""
        return {"ckpt_layers": self.n_checkpointed, "ckpt_of": self.n_layers, "ckpt_setting": self.setting,
                "mem_budget_gib": _r(self.budget_gib), "mem_predicted_gib": _r(self.predicted_peak_gib)}

    def to_dict(self) -> dict:
        return {**asdict(self), "n_checkpointed": self.n_checkpointed}


def _r(x):
    return None if x is None else round(float(x), 3)


def parse_setting(setting, n_layers: int) -> int | str:
    """`auto` → "auto"; `all` → L; `none` → 0; `N` (0..L) → N layers. Anything else: one clear error."""
    s = "none" if setting is None else str(setting).strip().lower()  # `--set ...=none` reads as None
    if s in ("auto", "all", "none"):
        return {"auto": "auto", "all": n_layers, "none": 0}[s]
    try:
        n = int(s)
    except ValueError:
        n = -1
    if not 0 <= n <= n_layers or str(n) != s:
        raise LongAlignError(f"train.activation_checkpointing={setting!r}: choose auto, all, none or a number of "
                             f"layers from 0 to {n_layers}")
    return n


@dataclass
class MemoryModel:
    """Byte counts the planner needs, all for one micro-batch row of `tokens` tokens (see the module docstring)."""

    n_layers: int
    layer_bytes: float  # saved activations of one un-checkpointed layer
    boundary_bytes: float  # what a checkpointed layer keeps: its input
    static_bytes: float  # parameters + optimizer states
    grad_bytes: float  # gradients of the trainable parameters
    loss_bytes: float  # the chunked loss's transient (one chunk of fp32 logits, the head gradient)

    def peak(self, k: int) -> float:
        kept = self.n_layers - k
        forward = self.static_bytes + kept * self.layer_bytes + k * self.boundary_bytes + self.loss_bytes
        backward = self.static_bytes + self.grad_bytes + k * self.boundary_bytes + 2 * self.layer_bytes
        return max(forward, backward)


def plan_checkpointing(setting, mem: MemoryModel | None, budget_bytes: float | None, n_layers: int | None = None,
                       tokens: int | None = None) -> CheckpointPlan:
    """Choose the checkpointed layers. `auto` takes the fewest layers whose predicted peak fits `budget_bytes`
    (to PLAN_SAFETY of it).

    >>> m = MemoryModel(n_layers=4, layer_bytes=10, boundary_bytes=1, static_bytes=50, grad_bytes=5, loss_bytes=2)
    >>> plan_checkpointing("auto", m, budget_bytes=80).checkpointed  # max(50+2·10+2·1+2, 50+5+2·1+2·10) ≤ 0.97·80
    [0, 1]
    >>> plan_checkpointing("auto", m, budget_bytes=1000).checkpointed, plan_checkpointing("3", m, 80).checkpointed
    ([], [0, 1, 2])
    """
    n_layers = mem.n_layers if mem is not None else int(n_layers or 0)
    want = parse_setting(setting, n_layers)
    budget_gib = budget_bytes / GIB if budget_bytes else None
    if want == "auto":
        if mem is None or not budget_bytes:
            k, note = n_layers, "no memory budget known (CPU/MPS without train.memory_budget_gib): every layer"
        else:
            fits = [k for k in range(n_layers + 1) if mem.peak(k) <= PLAN_SAFETY * budget_bytes]
            if fits:
                k = fits[0]
                note = "fewest layers that fit the budget"
            else:
                k = n_layers
                note = (f"even with every layer checkpointed the predicted peak {mem.peak(k) / GIB:.1f} GiB exceeds "
                        f"the {budget_gib:.1f} GiB budget: shorten rows (batching.max_pack_tokens) or use more GPUs")
                _log(f"activation checkpointing: WARNING {note}")
    else:
        k, note = int(want), "as set"
    plan = CheckpointPlan(str(setting), n_layers, list(range(k)), budget_gib, tokens=tokens, note=note)
    if mem is not None:
        plan.predicted_peak_gib = mem.peak(k) / GIB
        plan.layer_gib, plan.boundary_gib = mem.layer_bytes / GIB, mem.boundary_bytes / GIB
        plan.static_gib = mem.static_bytes / GIB
    return plan


def describe(plan: CheckpointPlan) -> str:
    s = f"activation checkpointing ({plan.setting}): {plan.n_checkpointed} of {plan.n_layers} decoder layers"
    if plan.predicted_peak_gib is not None:
        s += f", predicted peak {plan.predicted_peak_gib:.1f} GiB"
        if plan.budget_gib:
            s += f" of a {plan.budget_gib:.1f} GiB budget"
        s += f" ({plan.layer_gib:.2f} GiB per kept layer at {plan.tokens} tokens)"
    return f"{s} — {plan.note}"


# ------------------------------------------------------------------------------------------- checkpointing: probe
def decoder_layers(model) -> list[nn.Module]:
    """The repeated decoder blocks of a causal LM (transformers' `model.layers` under the decoder)."""
    dec = _base_model(model).get_decoder()
    layers = getattr(dec, "layers", None)
    if layers is None:
        raise LongAlignError(f"{type(dec).__name__}: no `layers` list; activation checkpointing cannot plan it")
    return list(layers)


def _saved_bytes(model, length: int, autocast_dtype) -> tuple[list[int], int]:
    """Bytes autograd saves inside each decoder layer for one [1, length] row (one document), and the element
    size of the hidden states entering the layers."""
    base = _base_model(model)
    layers = decoder_layers(base)
    dev = next(base.parameters()).device
    params = {p.data_ptr() for p in base.parameters()}
    per, seen, current, elem = [0] * len(layers), set(), [None], [4]

    def pack(t):
        i = current[0]
        if i is not None and torch.is_tensor(t):
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in seen and ptr not in params:
                seen.add(ptr)
                per[i] += st.nbytes()
        return t

    def pre(i):
        def hook(module, args, kwargs):
            current[0] = i
            h = args[0] if args else kwargs.get("hidden_states")
            if torch.is_tensor(h):
                elem[0] = h.element_size()
        return hook

    def post(module, args, out):
        current[0] = None

    handles = [m.register_forward_pre_hook(pre(i), with_kwargs=True) for i, m in enumerate(layers)]
    handles += [m.register_forward_hook(post) for m in layers]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, length), generator=g).to(dev)
    cu = torch.tensor([0, length], dtype=torch.int32, device=dev)
    ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    try:
        with torch.enable_grad(), ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = base.get_decoder()(input_ids=ids, position_ids=torch.arange(length, device=dev)[None],
                                     use_cache=False, **packed_kwargs(cu, length))
        del out
    finally:
        for h in handles:
            h.remove()
    return per, elem[0]


def measure_layer_bytes(model, tokens: int, autocast_dtype=None, probe_tokens: int = 1024) -> tuple[float, float]:
    """(bytes one decoder layer saves for backward at `tokens` tokens, element size of the residual stream).

    Measured, not modelled: the model's real kernels (Liger or plain, the attention backend, autocast) run a
    forward over rows of `probe_tokens` and 2·`probe_tokens` tokens with checkpointing off, saved tensors are
    counted per layer (each storage once; parameters excluded), and the largest layer is extrapolated linearly
    (attention kernels save O(T) here: q, k, v, output and log-sum-exp). Per-length constants (autocast's bf16
    weight copies) come out of the two-point fit.
    """
    base = _base_model(model)
    layers = decoder_layers(base)
    flags = [getattr(m, "gradient_checkpointing", False) for m in layers]
    was_training = base.training
    t1 = max(16, min(probe_tokens, tokens // 2 or 16))
    try:
        for m in layers:
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False
        base.train()
        a, elem = _saved_bytes(base, t1, autocast_dtype)
        b, _ = _saved_bytes(base, 2 * t1, autocast_dtype)
    finally:
        for m, f in zip(layers, flags, strict=False):
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = f
        base.train(was_training)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    slope = max((y - x) / t1 for x, y in zip(a, b, strict=False))
    const = max(max(x - slope * t1 for x in a), 0.0)
    return const + slope * tokens, float(elem)


def memory_model(model, tokens: int, autocast_dtype=None, chunk_tokens: int = 4096, trainable_head: bool | None = None,
                 layer_bytes: float | None = None, residual_elem: float | None = None) -> MemoryModel:
    """The planner's byte counts for `model` on rows of `tokens` tokens (probe run unless `layer_bytes` is given).

    Optimizer states: AdamW's two moments per trainable parameter, in the parameter's dtype.
    """
    base = _base_model(model)
    layers = decoder_layers(base)
    if layer_bytes is None:
        layer_bytes, residual_elem = measure_layer_bytes(base, tokens, autocast_dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    head = base.get_output_embeddings().weight
    if trainable_head is None:
        trainable_head = head.requires_grad
    vocab, hidden = head.shape
    rows = min(chunk_tokens, tokens)
    loss = rows * vocab * (4 + 4 + 2) + (vocab * hidden * 4 if trainable_head else 0)
    boundary = tokens * base.config.hidden_size * (residual_elem or 4)
    return MemoryModel(len(layers), float(layer_bytes), float(boundary), float(params + 2 * grads), float(grads),
                       float(loss))


@dataclass
class MeasuredMemory:
    """The planner's model from two real training steps on the device (CUDA): peak memory of forward + loss and
    of backward with every layer checkpointed (`*_all`) and its growth per kept layer (`*_slope`), measured with
    the last `kept` layers not checkpointed. Everything the step allocates is in it (autocast weight copies, the
    loss chunk, attention workspaces, allocator rounding); the optimizer states, absent before the first
    optimizer step, are added from the parameter count."""

    n_layers: int
    optimizer_bytes: float
    forward_all: float
    forward_slope: float
    backward_all: float
    backward_slope: float

    @property
    def layer_bytes(self) -> float:
        return self.forward_slope

    boundary_bytes = 0.0

    @property
    def static_bytes(self) -> float:
        return self.optimizer_bytes

    def peak(self, k: int) -> float:
        kept = self.n_layers - k
        return self.optimizer_bytes + max(self.forward_all + kept * self.forward_slope,
                                          self.backward_all + kept * self.backward_slope)


def _probe_step(model, tokens: int, chunk_tokens: int, autocast_dtype, kept: int) -> tuple[float, float]:
    """(forward + loss peak, backward peak) in bytes of one [1, tokens] step (one document, the last
    min(tokens - 1, chunk_tokens) positions are targets: a full loss chunk) with the last `kept` layers kept."""
    base = _base_model(model)
    layers = decoder_layers(base)
    n = len(layers)
    apply_checkpointing(base, CheckpointPlan("probe", n, list(range(n - kept))))
    dev = next(base.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, tokens), generator=g)
    labels = torch.full_like(ids, -100)
    n_tgt = min(tokens - 1, chunk_tokens)
    labels[0, tokens - n_tgt:] = ids[0, tokens - n_tgt:]
    batch = {"input_ids": ids.to(dev), "labels": labels.to(dev), "loss_weights": torch.ones(1, tokens, device=dev),
             "position_ids": torch.arange(tokens, device=dev)[None],
             "cu_seq_lens": torch.tensor([0, tokens], dtype=torch.int32, device=dev), "max_seqlen": tokens}
    ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    base.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with ctx:
        loss, _ = model_loss(base, batch, chunk_tokens)
    forward = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    backward = torch.cuda.max_memory_allocated()
    del loss
    base.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return float(forward), float(backward)


def measured_memory(model, tokens: int, autocast_dtype=None, chunk_tokens: int = 4096) -> MeasuredMemory:
    """CUDA: the planner's model from two measured steps (every layer checkpointed; the last two kept)."""
    base = _base_model(model)
    layers = decoder_layers(base)
    flags = [getattr(m, "gradient_checkpointing", False) for m in layers]
    was_training = base.training
    kept = min(2, len(layers))
    try:
        base.train()
        f_all, b_all = _probe_step(model, tokens, chunk_tokens, autocast_dtype, 0)
        f_k, b_k = _probe_step(model, tokens, chunk_tokens, autocast_dtype, kept)
    finally:
        for m, f in zip(layers, flags, strict=False):
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = f
        base.train(was_training)
    optimizer = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return MeasuredMemory(len(layers), float(optimizer), f_all, max(0.0, (f_k - f_all) / kept), b_all,
                          max(0.0, (b_k - b_all) / kept))


def default_budget_bytes(device: str, margin: float = 0.08) -> float | None:
    """CUDA: what this process may still take (free memory + what it already holds) less `margin` of the card
    (allocator fragmentation, cuBLAS workspaces); CPU/MPS: None (no device memory to plan against)."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_allocated() - margin * total


def plan_for_model(model, setting="auto", tokens: int = 2048, budget_gib: float | None = None, device: str = "cuda",
                   bf16: bool = False, chunk_tokens: int = 4096) -> CheckpointPlan:
    """Plan checkpointing for `model` on micro-batches of `tokens` tokens (probe only for `auto` with a budget)."""
    n_layers = len(decoder_layers(model))
    budget = budget_gib * GIB if budget_gib else default_budget_bytes(device)
    if parse_setting(setting, n_layers) != "auto" or not budget:
        return plan_checkpointing(setting, None, budget, n_layers=n_layers, tokens=tokens)
    dtype = torch.bfloat16 if bf16 else None
    if device == "cuda" and torch.cuda.is_available():
        mem = measured_memory(model, tokens, autocast_dtype=dtype, chunk_tokens=chunk_tokens)
    else:
        mem = memory_model(model, tokens, autocast_dtype=dtype, chunk_tokens=chunk_tokens)
    return plan_checkpointing(setting, mem, budget, tokens=tokens)


def apply_checkpointing(model, plan: CheckpointPlan) -> None:
    """Non-reentrant checkpointing on exactly `plan.checkpointed` decoder layers (transformers' per-layer flag)."""
    base = _base_model(model)
    layers = decoder_layers(base)
    if plan.n_checkpointed == 0:
        for m in layers:
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False
        return
    kwargs = {"use_reentrant": False}
    enable = getattr(base, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    keep = set(plan.checkpointed)
    for i, m in enumerate(layers):
        if not hasattr(m, "gradient_checkpointing"):
            raise LongAlignError(f"{type(m).__name__} has no per-layer checkpointing flag: use "
                                 f"train.activation_checkpointing=all or none")
        m.gradient_checkpointing = i in keep


def compile_layers(model, device: str) -> str:
    """torch.compile each decoder layer in place (`nn.Module.compile`); CUDA only. Returns a note."""
    if device != "cuda":
        return f"compile skipped on {device}"
    for m in decoder_layers(model):
        m.compile()
    return "decoder layers compiled (torch.compile)"


def setup_for_training(model, tcfg, tokens: int, device: str, bf16: bool) -> dict:
    """Apply the `train.*` speed settings to a loaded model, in order: fused kernels (so the probe measures the
    kernels that will run), the checkpointing plan, then compilation. Returns what to log and report."""
    choice = apply_fused_kernels(model, tcfg.fused_kernels, device)
    setting = tcfg.activation_checkpointing if tcfg.gradient_checkpointing else "none"
    plan = plan_for_model(model, setting, tokens=tokens, budget_gib=tcfg.memory_budget_gib, device=device, bf16=bf16,
                          chunk_tokens=tcfg.loss_chunk_tokens)
    apply_checkpointing(model, plan)
    _log(describe(plan))
    compiled = compile_layers(model, device) if tcfg.compile_layers else "not compiled"
    return {"kernels": choice, "checkpointing": plan, "compile": compiled,
            "log_fields": {"kernels": choice.backend, **plan.log_fields(), "compiled": bool(tcfg.compile_layers
                                                                                          and device == "cuda")}}

"""Configuration: one dataclass per recipe stage, presets in YAML, `--set key=value` overrides.

Usage:
    from longalign_lib.config import load_config
    cfg = load_config("cpu-demo", overrides=["train.lr=1e-5", "model.name=./my-model"])
Presets live in longalign_lib/presets/*.yaml (cpu-demo, gpu-small, paper); a preset may also be a path to a YAML file.
Each stage owns one section; stages add their own fields to their own dataclass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .io import LongAlignError, write_text

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_MODEL = "smollm2-135m-instruct"
# List prices in USD per 1M tokens: [input, output, cache_read, cache_write] (read 2026-11-30; sources and dates
# in docs/howto.md "What synthesis costs"). OpenAI bills no cache write; both Batch APIs bill 50 %.
LIST_PRICES = {
    "gpt-4o-mini": [0.15, 0.60, 0.075, 0.15],
    "gpt-4o": [2.50, 10.00, 1.25, 2.50],
    "gpt-5-mini": [0.25, 2.00, 0.025, 0.25],
    "claude-haiku-4-5": [1.00, 5.00, 0.10, 1.25],
    "claude-sonnet-4-5": [3.00, 15.00, 0.30, 3.75],
    "claude-3-5-haiku": [0.80, 4.00, 0.08, 1.00],
}


@dataclass
class ModelConfig:
    """Which model to load (models.py). `name`: HF id, local path, `smollm2-135m-instruct`, or `random:<config>`."""

    # name: HF id, local folder, `smollm2-135m-instruct` (bundled, offline) or `random:<id or folder>`
    name: str = DEFAULT_MODEL
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cuda | mps | cpu
    attn_implementation: str = "auto"  # auto | varlen | flex | flash | sdpa | eager (see attention.py)
    rope_base_factor: float = 1.0  # context extension: multiply rope_theta (the paper: 200)
    max_position_embeddings: int | None = None  # raise the window together with the RoPE base
    lora: bool = False  # train a LoRA adapter (peft) instead of all weights
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    # lora_target_modules: module names that get adapters
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trust_remote_code: bool = False  # allow model code from the checkpoint (only for models you trust)


@dataclass
class CorpusConfig:
    """Stage 1a — long documents (corpus.py)."""

    # sources: stdlib | pydoc_topics | debian_docs | data | dir:<path> (missing optional sources are skipped with a note)
    sources: list[str] = field(default_factory=lambda: ["stdlib", "pydoc_topics", "debian_docs", "data"])
    dirs: list[str] = field(default_factory=list)  # extra directories of .txt/.md/.rst/.py files
    hf_datasets: list[dict] = field(default_factory=list)  # [{path, split, text_column, name?}]
    n_docs: int = 8  # documents to keep
    min_tokens: int = 1000  # shortest document after chunking/merging (tokens)
    max_tokens: int = 6000  # longest document after chunking (tokens)
    upsample_long: float = 1.0  # weight of long documents when sampling (the paper upsamples long ones)
    max_chunks_per_doc: int = 2  # documents cut from one long text at most (diversity)
    tokenizer: str | None = None  # token counting; default: model.name
    seed: int = 0  # random seed of this stage


@dataclass
class SynthConfig:
    """Stage 1b — Self-Instruct long tasks and short chat data (llm.py, synth.py)."""

    backend: str = "local"  # local | openai | anthropic
    model: str = DEFAULT_MODEL  # model name for the backend (API model id, or a model spec for `local`)
    base_url: str | None = None  # any OpenAI-compatible server (vLLM, llama.cpp, Ollama)
    api_key_env: str | None = None  # name of the environment variable holding the key
    # task_types: Self-Instruct task types to draw from (general, summary, reasoning, extraction)
    task_types: list[str] = field(default_factory=lambda: ["general", "summary", "reasoning", "extraction"])
    n_questions: int = 5  # questions asked for per document (one is chosen)
    temperature: float = 0.7  # sampling temperature for question generation
    max_new_tokens: int = 256  # token limit of each answer
    concurrency: int = 4  # requests in flight at once
    max_retries: int = 5  # retries on 408/409/429/5xx, time-outs, dropped connections (the SDK's backoff + Retry-After)
    timeout_s: float = 120.0  # per-request time-out (seconds), passed to the SDK client
    # mode: interactive (one request at a time, answers now) | batch (OpenAI Batch / Anthropic Message Batches:
    # half the price, answers within 24 h; the batch ids are kept in <run_dir>/batches/ and a rerun resumes them)
    mode: str = "interactive"
    batch_poll_s: float = 30.0  # seconds between two status polls of a running batch
    batch_retry: str = "batch"  # failed batch items: batch (in a follow-up batch) | interactive (at once, full price)
    batch_max_attempts: int = 3  # batch submissions of one request before the stage stops with the errors
    batch_discount: float = 0.5  # price factor of batch requests (both providers: 50 %)
    # prompt_caching: put the document first, identical in the question and the answer call, and mark it for
    # the provider's prompt cache (Anthropic cache_control; OpenAI caches identical prefixes >= 1,024 tokens)
    prompt_caching: bool = True
    n_short: int = 4  # short general-chat records to add (Magpie-style generation or import)
    short_files: list[str] = field(default_factory=list)  # ShareGPT-style JSON/JSONL to import
    question_max_new_tokens: int | None = None  # budget of the question-list call; default max_new_tokens
    question_attempts: int = 2  # fresh samples of the question list when none could be parsed
    # retry_truncated_factor: replies cut at their token cap: 0 = rejected (reason truncated); > 1 = regenerated once
    # with the cap times this factor (rejected as `truncated` when cut again); never kept as training data.
    # A question list cut by its cap keeps its complete lines instead (docs/howto.md §5)
    retry_truncated_factor: float = 0.0
    answer_temperature: float = 0.3  # sampling temperature for answers
    min_answer_words: int = 8  # filter: shorter answers are rejected (words, or Han characters)
    max_repetition: float = 0.5  # filter: share of repeated word 3-grams above which an answer is degenerate
    min_grounding: float = 0.3  # filter: share of answer content words that must occur in the document
    corpus_file: str | None = None  # default: <run_dir>/corpus.jsonl (built on the fly when absent)
    max_docs: int = 0  # 0 = every corpus document
    cache_dir: str | None = None  # LLM request cache; default $LONGALIGN_HOME/llm_cache
    short_backend: str = "local"  # Magpie needs raw completions: local, or an OpenAI-compatible server
    short_model: str = DEFAULT_MODEL  # model for short data (default: synth.model)
    # short_tokenizer: chat template used to write Magpie prompts for a served model (a hub id, local folder or
    # `smollm2-135m-instruct`); default: short_model when short_backend is local. A server's model name is
    # often not a hub id, so set it for short_backend=openai
    short_tokenizer: str | None = None
    short_question_tokens: int = 64  # token limit of a Magpie-style self-written question
    short_max_new_tokens: int = 192  # token limit of a short answer
    local_threads: int = 0  # torch CPU threads for the local backend (0 = torch default; 1 on shared machines)
    local_prefix_cache: bool = True  # local backend: reuse the document's KV cache between question and answer
    local_batch_size: int = 0  # local backend: requests decoded together (0 = auto: 64 on a GPU, 1 on a CPU)
    local_max_batch_tokens: int = 0  # local backend: padded prompt+answer tokens per batch (0 = auto: 131072 GPU)
    # prices: USD per 1M tokens [input, output, cache_read, cache_write] by model name (a prefix matches dated
    # snapshots); list prices read 2026-11-30, sources in docs/howto.md "What synthesis costs". Batch = x batch_discount
    prices: dict = field(default_factory=lambda: dict(LIST_PRICES))
    seed: int = 0  # random seed of this stage


@dataclass
class DataConfig:
    """Stage 2 — tokenized, mixed training set (formatting.py, lengths.py)."""

    long_file: str | None = None  # default: <run_dir>/long.jsonl
    short_file: str | None = None  # default: <run_dir>/short.jsonl
    extra_files: list[str] = field(default_factory=list)  # any LongAlign-10k-format JSONL
    # also train on the bundled sample (data/sample_longalign.jsonl, its long and short records as sources
    # sample_long / sample_short): the offline presets set it, since a 135M model finishes few replies within its
    # caps and synth rejects every cut one (reason `truncated`)
    mix_sample: bool = False
    max_length: int = 2048  # longest training sequence (tokens); longer records follow data.truncation
    truncation: str = "middle"  # middle | right | skip
    long_ratio: float | None = None  # share of long records in the mix; None keeps all
    n_long: int | None = None  # exact counts instead of a ratio (more than available = repeat records)
    n_short: int | None = None  # short records to keep (None: all)
    num_proc: int = 1  # tokenizer worker processes
    # tokenized_dir: stage-2 dataset that tokenize writes and analyze/pack/train read as is; default <run_dir>/tokenized
    tokenized_dir: str | None = None
    buckets: list[int] | None = None  # length-bucket edges for `analyze`; default: max_length × 1/8, 1/4, 1/2, 1
    seed: int = 0  # random seed of this stage


@dataclass
class BatchConfig:
    """Stage 3 — batch plans and loss weighting (batching.py)."""

    strategy: str = "packed"  # naive | sorted | packed
    packer: str = "bfd"  # bfd | next_fit
    # pack_mix: none | window — none: global BFD, rows in random order (its rows are long-only or short-only, so
    # steps are as biased as sorted batching); window: BFD inside shuffled windows of pack_window steps' worth of
    # tokens (a little less fill, steps as mixed as random ones). bfd only; balance regroups steps after it.
    pack_mix: str = "none"
    pack_window: int = 1  # steps' worth of tokens per BFD window (pack_mix=window)
    max_pack_tokens: int = 2048  # tokens per packed row (what `pack` plans is what `train` trains)
    batch_size: int = 1  # sequences per micro-batch (naive/sorted) or packs per micro-batch (packed)
    grad_accum: int = 1  # micro-batches per rank per optimizer step
    world_size: int = 1  # data-parallel ranks the plan is made for (torchrun's world size)
    loss_reduction: str = "sequence"  # token | pack_mean | sequence
    overlong: str = "truncate"  # truncate | skip | split (sequences longer than max_pack_tokens)
    truncate_side: str = "middle"  # right | middle (keep the start and the end)
    # split: tokens before each later piece that it repeats as context (never as targets); ≥ 1 trains every target
    split_overlap: int = 1
    sorted_mode: str = "fixed"  # fixed: groups of batch_size | token_budget: groups fill sort_token_budget
    sort_token_budget: int | None = None  # padded tokens per sorted group; default batch_size * max_pack_tokens
    # balance: auto | none | tokens | cost: group micro-batches into steps/ranks by token count or modelled cost
    # (auto: cost when world_size > 1, so no rank idles on a light step; none on one GPU)
    balance: str = "auto"
    balance_window: int = 8  # steps per window regrouped by the balancer
    drop_last: bool = False  # drop a last, incomplete optimizer step
    cost_a: float = 1.0e-4  # cost model: seconds per token (linear layers), 7B-class model on one H100, bf16
    cost_b: float = 2.0e-9  # cost model: seconds per token^2 (attention)
    cost_c: float = 0.0  # cost model: fixed seconds per micro-batch
    sim_world_size: int = 8  # K devices in the idle-time simulation of `longalign pack`
    seed: int = 0  # random seed of this stage


@dataclass
class TrainConfig:
    """Stage 4 — supervised fine-tuning (train.py, loss.py, attention.py)."""

    lr: float = 2e-5  # peak learning rate (the paper: 2e-5)
    lr_scheduler: str = "cosine"  # transformers scheduler name (the paper: cosine)
    warmup_ratio: float = 0.03  # share of steps for linear warm-up (the paper: 3 %)
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.95  # Adam beta2 (the paper: 0.95)
    weight_decay: float = 0.0  # AdamW weight decay (the paper: 0)
    epochs: float = 2.0  # passes over the data (the paper: 2); `pack` writes one plan per started epoch
    max_steps: int = -1  # stop after this many optimizer steps (-1: run all epochs)
    bf16: bool = True  # bf16 autocast on GPUs that support it
    gradient_checkpointing: bool = True  # false: no activation checkpointing at all, whatever the setting below says
    # activation_checkpointing: auto (the fewest decoder layers whose measured peak fits memory_budget_gib) | all | none | N
    activation_checkpointing: str = "auto"  # N: checkpoint the first N layers; the choice is in every train_log row
    memory_budget_gib: float | None = None  # peak memory `auto` plans for; default: the GPU's free memory less 8 %
    fused_kernels: str = "auto"  # auto | liger | none: Liger's fused RMSNorm/SwiGLU/RoPE on CUDA (plain on CPU/MPS)
    compile_layers: bool = False  # torch.compile each decoder layer (CUDA; off unless measured to help, docs/performance.md)
    loss_chunk_tokens: int = 4096  # target tokens per LM-head chunk in the loss
    save_steps: int = 50  # checkpoint every N optimizer steps
    logging_steps: int = 1  # log every N optimizer steps
    seed: int = 42  # random seed of this stage
    max_grad_norm: float = 1.0  # gradient clipping norm
    master_fp32: bool = True  # full fine-tuning keeps fp32 weights + Adam states and computes in bf16 (autocast)
    save_total_limit: int = 2  # checkpoints kept
    tensorboard: bool = True  # also write TensorBoard events
    matmul_tflops: float | None = None  # MFU denominator; None: measured once per device and cached
    cpu_threads: int = 0  # torch threads while training on CPU (0 = torch default; 1 is faster on shared cores)
    # sequence_parallel: GPUs that share one packed row (Ulysses, sequence_parallel.py); each runs T/N tokens of
    # a T-token row. The processes form world/N data-parallel groups: set batching.world_size = world / N
    sequence_parallel: int = 1


@dataclass
class EvalConfig:
    """Stage 5 — generation, judge and needle test (generate.py, judge.py, needle.py)."""

    # model: evaluated model (eval, needle); default: <run_dir>/model from `train`, else model.name
    model: str | None = None
    bench_file: str | None = None  # JSONL: idx, query, context, answer, few_shots (benchmarks.py documents it)
    bench_limit: int | None = None  # evaluate only the first N cases
    bench_context_tokens: int = 1500  # offline set (no bench_file): context length of each built case
    bench_n_per_task: int = 1  # offline set: cases per task type (retrieve, count, order, multihop, quote)
    max_input_tokens: int | None = None  # default: the model's window; longer prompts lose their middle
    max_new_tokens: int = 128  # answer length limit during evaluation
    batch_size: int = 4  # prompts generated together (grouped by length)
    # local_threads: torch CPU threads while generating / judging locally (0 = torch default; 1 on shared machines)
    local_threads: int = 0
    max_batch_tokens: int = 16384  # padded prompt+answer tokens per generation batch
    # judge_mode: llm (LongBench-Chat judge + proxy scores) | batch (the same judge requests through the
    # provider's Batch API: half price, resumable) | proxy (reference overlap only, offline)
    judge_mode: str = "llm"
    judge_batch_poll_s: float = 30.0  # judge_mode=batch: seconds between two status polls
    judge_backend: str = "local"  # local | openai (any OpenAI-compatible server: vLLM, llama.cpp) | anthropic
    judge_model: str = DEFAULT_MODEL  # judge model name (API id or model spec for `local`)
    judge_base_url: str | None = None  # set it (e.g. http://localhost:8000/v1) and local switches to openai
    judge_api_key_env: str | None = None  # env variable holding the key (default OPENAI_/ANTHROPIC_API_KEY)
    judge_runs: int = 2  # each case judged this many times (few-shots reshuffled), scores averaged
    judge_prompt_file: str | None = None  # a template path, or a bundled name: default | rating_first
    judge_temperature: float = 0.0  # judge sampling temperature
    judge_max_new_tokens: int = 256  # judge reply length limit
    judge_max_attempts: int = 3  # tries per run when the reply has no parseable [[rating]]
    judge_concurrency: int = 4  # judge requests in flight
    # judge_scoring: auto (probability-weighted for a local judge, parsed [[n]] otherwise) | probs | parse.
    # probs: each rating = Σ r·p(r) over the judge's next-token distribution at the rating position (local
    # transformers, or an OpenAI-compatible server returning logprobs); every score records its method
    judge_scoring: str = "auto"
    judge_top_logprobs: int = 20  # probs on an OpenAI-compatible server: top_logprobs requested per token
    # judge_prefill: probs on an OpenAI-compatible server: how the reply is begun with "[[" so the next token is the
    # rating. chat (continue a final assistant message: vLLM, llama.cpp, SGLang) | completions (/v1/completions,
    # prompt written with judge_tokenizer's chat template) | none (no prefill: api.openai.com) | auto (completions
    # with a judge_tokenizer, chat with a judge_base_url, none otherwise)
    judge_prefill: str = "auto"
    judge_tokenizer: str | None = None  # the served judge's tokenizer (hub id or folder), for judge_prefill=completions
    reliability_boot: int = 1000  # bootstrap resamples for the CIs of the judge reliability statistics
    # length_buckets: input-token edges of the buckets in which scores are reported (controls)
    length_buckets: list[int] = field(default_factory=lambda: [1000, 4000, 16000])
    # no_document_pass: eval also answers every question without its document; items answered right
    # without reading are flagged in predictions.jsonl and the judge report
    no_document_pass: bool = False
    # short_tasks: eval also answers the short-task regression set (short_tasks.py) with the evaluated model and,
    # when that is a trained model, with the base model: does long-context training keep short-task answers?
    short_tasks: bool = False
    short_tasks_file: str | None = None  # JSONL {idx, query, answers}; default: the bundled data/short_tasks.jsonl
    judge_cache_dir: str | None = None  # judge replies cache; default $LONGALIGN_HOME/llm_cache
    # judge_prices: USD per 1M tokens [input, output, cache_read, cache_write] for judge cost (see synth.prices)
    judge_prices: dict = field(default_factory=lambda: dict(LIST_PRICES))
    # needle_lengths: context lengths of the needle grid (tokens)
    needle_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    # needle_depths: needle positions as a fraction of the context (0 = start, 1 = end)
    needle_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    needle_haystack_dir: str | None = None  # folder of .txt files; default: the bundled data/kjv_*.txt
    # needle_text: the planted sentence
    needle_text: str = "The secret ingredient in Grandmother Odile's plum cake is a spoonful of smoked cardamom."
    # needle_question: the question asked about it
    needle_question: str = "What is the secret ingredient in Grandmother Odile's plum cake?"
    needle_key_fact: str = "smoked cardamom"  # an answer scores 1 when it contains these words
    needle_scorer: str = "contains"  # contains | judge
    needle_max_new_tokens: int = 32  # answer length limit in the needle test
    seed: int = 0  # random seed of this stage


@dataclass
class Config:
    preset: str = "cpu-demo"
    run_dir: str = "runs/demo"
    data_file: str | None = None  # records `check` formats (default: the bundled data/sample_longalign.jsonl)
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batching: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _apply(obj: Any, data: dict, where: str) -> None:
    """Set fields of dataclass `obj` from `data`, recursing into nested sections; unknown keys are errors."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in names:
            raise LongAlignError(f"{where}: unknown setting '{key}'; valid: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise LongAlignError(f"{where}.{key}: expected a mapping of settings, got {value!r}")
            _apply(current, value, f"{where}.{key}")
        else:
            setattr(obj, key, _coerce(value, current, f"{where}.{key}"))


def _coerce(value: Any, current: Any, where: str) -> Any:
    if current is None or value is None:
        return _number(value) if isinstance(value, str) else value
    if isinstance(value, str) and isinstance(current, (int, float)) and not isinstance(current, bool):
        value = _number(value)  # YAML 1.1 reads "1e-5" as a string
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise LongAlignError(f"{where}: expected true/false, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise LongAlignError(f"{where}: expected an integer, got {value!r}")
    if isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise LongAlignError(f"{where}: expected a number, got {value!r}")
    if isinstance(current, list) and not isinstance(value, list):
        return [value]
    return value


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise LongAlignError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise LongAlignError(f"{path}: expected a mapping of settings at the top level")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-5` → (['train', 'lr'], 1e-5); the value is parsed as YAML (numbers, lists, true/false)."""
    if "=" not in item:
        raise LongAlignError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return key.strip().split("."), value


def load_config(preset: str | None = "cpu-demo", overrides: list[str] | None = None, **top: Any) -> Config:
    """Build a Config from defaults ← preset YAML ← `overrides` (`section.key=value`) ← keyword settings."""
    cfg = Config()
    if preset:
        path = Path(preset)
        if not (path.suffix in (".yaml", ".yml") and path.exists()):
            path = PRESET_DIR / f"{preset}.yaml"
            if not path.exists():
                raise LongAlignError(f"unknown preset '{preset}'; choose one of {', '.join(list_presets())} or a YAML path")
        _apply(cfg, _read_yaml(path), str(path))
        cfg.preset = preset
    for item in overrides or []:
        keys, value = parse_override(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "--set")
    if top:
        _apply(cfg, top, "settings")
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

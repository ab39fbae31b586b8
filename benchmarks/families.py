"""A coverage sweep over transformers model families: does the ``approxbp`` backend run them, and what does it do?

Every family is built from its own config class (``AutoConfig.for_model``) shrunk to a tiny model: 2 layers,
hidden 64, 4 heads, MLP 128, vocab 128, dropout 0, small images/audio, random weights (seeded), norm affines
randomized as in tests/architectures.py. The head is the one most fine-tuned for its kind (causal LM for
decoders, sequence classification or masked LM for encoders, seq2seq LM for encoder-decoders, image
classification for vision, CTC / audio classification for audio). Then, per family:

1. plain eager forward + backward: the reference output and the bytes one forward keeps for backward;
2. ``torch.compile(model, backend="approxbp", options={"inner": "eager"})`` forward + backward after a fresh
   ``torch._dynamo.reset()``: crash (exception type and first line), bytes against eager, forward relative L2
   against eager, whether every gradient is finite. The backend's own report of that compile (sites found,
   rewritten, skipped by reason) is captured from its log record: it is the report ``approxbp_fx.explain``
   prints, from the same run rather than a second trace;
3. which LayerNorm/RMSNorm-like modules feed a trainable linear, found independently of the package by
   forward hooks on the eager model (a norm's output, or a view of it, is a linear's input), and whether the
   report shows each of them rewritten (else the report's reason, or "not identified");
4. whether the model trains under plain ``torch.compile(backend="eager")`` (Dynamo only): a family that
   fails there too is not traceable by torch.compile, not a failure of the backend. By default only where
   the backend crashed or kept more bytes than eager (``dynamo_check="on-problem"``; "always", "never"), with
   its bytes: Dynamo's tracing alone can change what a model keeps.

Each family runs under a time budget (SIGALRM; "timeout") and the sweep under a total budget; families that
cannot be built are listed with why. ``benchmarks/coverage_table.py --families`` writes the Markdown table
and JSON (benchmarks/results/families.{md,json}) and, with ``--write-readme``, README.md's summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

BATCH, TOKENS = 2, 16
LAYERS, HIDDEN, HEADS, MLP, VOCAB = 2, 64, 4, 128, 128
IMAGE, PATCH, AUDIO_SAMPLES = 32, 4, 1600

KINDS = ("decoder", "encoder", "encoder-decoder", "vision", "audio")

# --- the family list ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One transformers model type, the head it is built with, and the config fields the generic shrinking
    (``small_config``) cannot guess."""

    name: str  # the model_type (transformers' CONFIG_MAPPING key)
    kind: str
    head: str  # an AutoModelFor... class name
    overrides: dict[str, Any] = field(default_factory=dict)
    inputs: str = ""  # input builder; default by kind
    exclusive: bool = False  # only with --families: too slow for the default sweep


def _audio_conv(**extra: Any) -> dict[str, Any]:
    """A three-layer convolutional feature encoder (wav2vec2-style) instead of seven 512-channel layers."""
    return {"conv_dim": (32, 32, 32), "conv_kernel": (10, 3, 3), "conv_stride": (5, 2, 2),
            "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4, "apply_spec_augment": False,
            "num_feat_extract_layers": 3, "mask_time_prob": 0.0, "mask_feature_prob": 0.0, "vocab_size": 32, **extra}


_SWIN = {"embed_dim": 32, "depths": [1, 1], "num_heads": [2, 4], "window_size": 4, "image_size": IMAGE,
         "patch_size": 2, "drop_path_rate": 0.0}
_CONVNEXT = {"hidden_sizes": [32, 64], "depths": [1, 1], "num_stages": 2, "drop_path_rate": 0.0}

FAMILIES: list[Family] = [
    # decoders: causal LM
    *(Family(n, "decoder", "AutoModelForCausalLM") for n in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2", "gpt_neo",
        "gptj", "gpt_neox", "opt", "bloom", "falcon", "mpt", "starcoder2", "olmo", "olmo2", "stablelm", "cohere",
        "codegen", "gpt_bigcode", "xglm", "biogpt", "persimmon", "granite", "nemotron", "helium", "glm",
        "smollm3", "openai-gpt", "ctrl")),
    Family("mixtral", "decoder", "AutoModelForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    Family("qwen2_moe", "decoder", "AutoModelForCausalLM",
           {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64}),
    Family("qwen3_moe", "decoder", "AutoModelForCausalLM",
           {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}),
    Family("olmoe", "decoder", "AutoModelForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}),
    Family("granitemoe", "decoder", "AutoModelForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    Family("mamba", "decoder", "AutoModelForCausalLM", {"state_size": 8, "expand": 2, "conv_kernel": 4}),
    Family("mamba2", "decoder", "AutoModelForCausalLM",
           {"state_size": 8, "expand": 2, "conv_kernel": 4, "num_heads": 8, "head_dim": 16, "n_groups": 1,
            "chunk_size": 16}),
    Family("rwkv", "decoder", "AutoModelForCausalLM", {"attention_hidden_size": 64, "context_length": 64}),
    # encoders: sequence classification (masked LM where there is no classification head)
    *(Family(n, "encoder", "AutoModelForSequenceClassification") for n in (
        "bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "albert", "xlm-roberta", "mpnet",
        "camembert", "ernie", "megatron-bert", "rembert", "roformer", "convbert", "modernbert", "nystromformer",
        "data2vec-text", "roberta-prelayernorm", "xlm-roberta-xl", "squeezebert", "mobilebert", "funnel",
        "ibert", "yoso", "fnet", "xlm", "flaubert", "mra")),
    Family("big_bird", "encoder", "AutoModelForSequenceClassification"),
    Family("longformer", "encoder", "AutoModelForSequenceClassification"),
    Family("esm", "encoder", "AutoModelForMaskedLM", {"vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32,
                                                       "position_embedding_type": "rotary"}),
    # encoder-decoders: seq2seq LM
    *(Family(n, "encoder-decoder", "AutoModelForSeq2SeqLM") for n in (
        "t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "blenderbot", "blenderbot-small", "plbart",
        "m2m_100", "fsmt", "led", "longt5", "prophetnet", "mvp", "bigbird_pegasus", "pegasus_x")),
    Family("switch_transformers", "encoder-decoder", "AutoModelForSeq2SeqLM", {"num_experts": 4,
                                                                                "num_sparse_encoder_layers": 1,
                                                                                "num_sparse_decoder_layers": 1}),
    # vision: image classification
    *(Family(n, "vision", "AutoModelForImageClassification") for n in (
        "vit", "deit", "beit", "dinov2", "data2vec-vision", "vit_msn", "ijepa", "dinov2_with_registers")),
    Family("swin", "vision", "AutoModelForImageClassification", _SWIN),
    Family("swinv2", "vision", "AutoModelForImageClassification", _SWIN),
    Family("donut-swin", "vision", "AutoModelForImageClassification", _SWIN),
    Family("convnext", "vision", "AutoModelForImageClassification", _CONVNEXT),
    Family("convnextv2", "vision", "AutoModelForImageClassification", _CONVNEXT),
    Family("focalnet", "vision", "AutoModelForImageClassification",
           {"embed_dim": 32, "depths": [1, 1], "focal_levels": [2, 2], "focal_windows": [3, 3], "patch_size": 4,
            "image_size": IMAGE}),
    Family("clip", "vision", "AutoModelForImageClassification"),
    Family("siglip", "vision", "AutoModelForImageClassification"),
    Family("levit", "vision", "AutoModelForImageClassification",
           {"hidden_sizes": [64, 96], "num_attention_heads": [2, 3], "depths": [1, 1], "key_dim": [16, 16],
            "attention_ratio": [2, 2], "mlp_ratio": [2, 2], "down_ops": [["Subsample", 16, 4, 4, 2, 2]],
            "image_size": 64, "patch_size": 16}),
    Family("poolformer", "vision", "AutoModelForImageClassification",
           {"hidden_sizes": [32, 64], "depths": [1, 1], "num_encoder_blocks": 2, "patch_sizes": [7, 3],
            "strides": [4, 2], "padding": [2, 1], "pool_size": 3}),
    Family("segformer", "vision", "AutoModelForImageClassification",
           {"hidden_sizes": [32, 64], "depths": [1, 1], "num_encoder_blocks": 2, "sr_ratios": [2, 1],
            "num_attention_heads": [1, 2], "patch_sizes": [7, 3], "strides": [4, 2], "mlp_ratios": [2, 2],
            "decoder_hidden_size": 64}),
    Family("pvt", "vision", "AutoModelForImageClassification",
           {"hidden_sizes": [32, 64], "depths": [1, 1], "num_encoder_blocks": 2, "sequence_reduction_ratios": [2, 1],
            "num_attention_heads": [1, 2], "patch_sizes": [4, 2], "strides": [4, 2], "mlp_ratios": [2, 2],
            "image_size": IMAGE}),
    Family("mobilevit", "vision", "AutoModelForImageClassification",
           {"hidden_sizes": [32, 48, 64], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64], "image_size": IMAGE,
            "patch_size": 2}),
    Family("resnet", "vision", "AutoModelForImageClassification",
           {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "layer_type": "basic"}),
    Family("regnet", "vision", "AutoModelForImageClassification",
           {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "groups_width": 8}),
    Family("bit", "vision", "AutoModelForImageClassification",
           {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "num_groups": 8}),
    # audio: CTC (speech recognition), audio classification, seq2seq
    *(Family(n, "audio", "AutoModelForCTC", _audio_conv(), inputs="waveform") for n in (
        "wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat", "sew")),
    Family("sew-d", "audio", "AutoModelForCTC", _audio_conv(squeeze_factor=2, position_buckets=32,
                                                            max_relative_positions=32), inputs="waveform"),
    Family("wav2vec2-conformer", "audio", "AutoModelForCTC", _audio_conv(conv_depthwise_kernel_size=7),
           inputs="waveform"),
    Family("whisper", "audio", "AutoModelForSpeechSeq2Seq",
           {"num_mel_bins": 16, "max_source_positions": 16, "max_target_positions": 32}, inputs="features"),
    Family("audio-spectrogram-transformer", "audio", "AutoModelForAudioClassification",
           {"num_mel_bins": 32, "max_length": 32, "patch_size": 8, "frequency_stride": 8, "time_stride": 8},
           inputs="spectrogram"),
]

BY_NAME = {f.name: f for f in FAMILIES}

# --- small configs -----------------------------------------------------------------------------------------

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers", "num_encoder_layers", "num_hidden_groups_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "n_embed", "emb_dim")
_INTER_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "hidden_dim",
               "decoder_intermediate_size")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "decoder_attention_heads",
              "n_heads", "num_attention_heads_per_layer")
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def _is_drop(key: str) -> bool:
    return "dropout" in key or key.endswith("_pdrop") or key.endswith("drop_rate") or key in (
        "layerdrop", "encoder_layerdrop", "decoder_layerdrop", "drop_path_rate", "hidden_dropout_prob",
        "attention_probs_dropout_prob", "classifier_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def _shrink(cfg: Any, fixed: set[str]) -> None:
    """Generic small-config conventions, applied to every field the config has (and ``fixed`` leaves alone)."""
    d = cfg.to_dict()

    def put(key: str, value: Any) -> None:
        if key in d and key not in fixed:
            setattr(cfg, key, value)

    for k in _LAYER_KEYS:
        if isinstance(d.get(k), int) and d[k] > LAYERS:
            put(k, LAYERS)
    for k in _HIDDEN_KEYS:
        if isinstance(d.get(k), int):
            put(k, HIDDEN)
    for k in _INTER_KEYS:
        if isinstance(d.get(k), int):
            put(k, MLP)
    for k in _HEAD_KEYS:
        if isinstance(d.get(k), int):
            put(k, HEADS)
    for k in _KV_KEYS:  # None means "as many as the query heads" in some configs, not "none"
        if k in d and (d[k] is None or isinstance(d[k], int) and d[k] > 0):
            put(k, 2)
    window = d.get("attention_window")  # Longformer, LED: local attention pads inputs to the window
    if isinstance(window, int):
        put("attention_window", 8)
    elif isinstance(window, list):
        put("attention_window", [8] * len(window))
    if d.get("attention_type") == "block_sparse":  # BigBird needs hundreds of tokens for its sparse pattern
        put("attention_type", "original_full")
    if isinstance(d.get("rotary_dim"), int):  # GPT-J, CodeGen: rotate part of each head
        put("rotary_dim", HIDDEN // HEADS // 2)
    if isinstance(d.get("head_dim"), int) or "head_dim" in d and d["head_dim"] is not None:
        put("head_dim", HIDDEN // HEADS)
    for k in ("d_kv", "kv_channels", "attention_head_size"):
        if isinstance(d.get(k), int):
            put(k, HIDDEN // HEADS)
    for k in _POSITION_KEYS:
        if isinstance(d.get(k), int) and d[k] > 128:
            put(k, 128)
    if isinstance(d.get("vocab_size"), int) and d["vocab_size"] > VOCAB:
        put("vocab_size", VOCAB)
    for k, v in d.items():
        if isinstance(v, float) and _is_drop(k) and k not in fixed:
            setattr(cfg, k, 0.0)
        if isinstance(v, list) and k == "layer_types" and k not in fixed:
            setattr(cfg, k, v[:LAYERS])
    put("use_cache", False)
    put("num_labels", 3)
    put("image_size", IMAGE)
    put("patch_size", PATCH)
    put("pooler_hidden_size", HIDDEN)  # DeBERTa's classification pooler
    put("embedding_size", HIDDEN)  # ALBERT, ELECTRA: embeddings projected up to hidden
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int):  # special token ids must lie inside the shrunk vocabulary
        for k, v in cfg.to_dict().items():
            if k.endswith("_token_id") and isinstance(v, int) and v >= vocab and k not in fixed:
                setattr(cfg, k, vocab - 1 - (hash(k) % 3))


def small_config(family: Family) -> Any:
    """The family's config class with its defaults, shrunk (``_shrink``), then the family's overrides."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(family.name)
    fixed = set(family.overrides)
    for sub in ("text_config", "vision_config", "audio_config", "encoder", "decoder"):
        if hasattr(getattr(config, sub, None), "to_dict"):  # composite configs: shrink the parts too
            _shrink(getattr(config, sub), fixed)
    _shrink(config, fixed)
    for k, v in family.overrides.items():
        setattr(config, k, v)
    for sub in ("text_config", "vision_config"):
        subcfg = getattr(config, sub, None)
        if hasattr(subcfg, "to_dict"):
            for k, v in family.overrides.items():
                if hasattr(subcfg, k):
                    setattr(subcfg, k, v)
    return config


def randomize_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """gamma ~ U(0.5, 1.5), beta ~ U(-0.5, 0.5) for every module whose class name contains "norm" (as in
    tests/architectures.py): with gamma = 1 and beta = 0 an affine-folding bug would hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "norm" not in type(m).__name__.lower():
                continue
            for name, lo in (("weight", 0.5), ("bias", -0.5)):
                p = getattr(m, name, None)
                if isinstance(p, Tensor) and p.is_floating_point():
                    p.copy_(torch.rand(p.shape, generator=g) + lo)
    return model


def build(family: Family, seed: int = 0) -> tuple[nn.Module, dict[str, Tensor]]:
    """A tiny fp32 model in train mode and its inputs."""
    import transformers

    config = small_config(family)
    auto = getattr(transformers, family.head)
    torch.manual_seed(seed)
    classes = auto._model_mapping[type(config)]
    if isinstance(classes, (tuple, list)):  # DeiT, LeViT: the plain head first, "with teacher" second
        model = classes[0](config)
    else:
        model = auto.from_config(config)
    model = randomize_norms(model.float().train(), seed + 1)
    return model, make_inputs(family, config, seed)


def _vocab(config: Any) -> int:
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "decoder", None)):
        v = getattr(cfg, "vocab_size", None)
        if isinstance(v, int):
            return v
    raise ValueError(f"{type(config).__name__} has no vocab_size")


def make_inputs(family: Family, config: Any, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    kind = family.inputs or {"vision": "image"}.get(family.kind, "tokens")
    if kind == "image":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", IMAGE)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(BATCH, getattr(vision, "num_channels", 3), size, size, generator=g)}
    if kind == "waveform":
        return {"input_values": torch.randn(BATCH, AUDIO_SAMPLES, generator=g)}
    if kind == "spectrogram":
        return {"input_values": torch.randn(BATCH, config.max_length, config.num_mel_bins, generator=g)}
    if kind == "features":  # whisper: log-mel frames, twice the encoder's positions
        vocab = _vocab(config)
        return {"input_features": torch.randn(BATCH, config.num_mel_bins, 2 * config.max_source_positions,
                                              generator=g),
                "decoder_input_ids": torch.randint(3, vocab, (BATCH, TOKENS), generator=g)}
    vocab = _vocab(config)
    # ids from 3 up: 0-2 are padding/bos/eos in most vocabularies, and a padding id changes position ids
    inputs = {"input_ids": torch.randint(3, vocab, (BATCH, TOKENS), generator=g)}
    if family.kind == "encoder-decoder":
        inputs["decoder_input_ids"] = torch.randint(3, vocab, (BATCH, TOKENS), generator=g)
    return inputs


# --- measuring ---------------------------------------------------------------------------------------------


def logits_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _loss_weight(shape: torch.Size) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(123))


@dataclass
class Run:
    out: Tensor
    saved_bytes: int
    grads_finite: bool


def train_step(model: nn.Module, fn: Callable[..., Any], inputs: dict[str, Tensor]) -> Run:
    """Forward + backward of ``fn`` (loss: a fixed random projection of the logits), then the bytes a second
    forward keeps for backward (``approxbp_fx.saved_activation_bytes``, parameters and buffers excluded)."""
    import approxbp_fx

    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = logits_of(fn(**inputs))
    (out.float() * _loss_weight(out.shape)).sum().backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    saved = approxbp_fx.saved_activation_bytes(fn, exclude=[model], **inputs)
    return Run(out.detach().float(), saved, finite)


def rel_l2(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


_NORM_TYPES = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_norm_like(m: nn.Module) -> bool:
    """LayerNorm / RMSNorm modules, including the hand-written ones models define (``LlamaRMSNorm``,
    ``T5LayerNorm``, ...). Batch and group norms are not row norms and are not counted."""
    # a suffix: RobertaPreLayerNormSelfAttention and HubertLayerNormConvLayer are no norms; MambaRMSNormGated is
    name = type(m).__name__.lower()
    return isinstance(m, _NORM_TYPES) or re.search(r"(layernorm|rmsnorm)(gated|1p|2d)?$", name) is not None


def norms_feeding_linears(model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, list[str]]:
    """{norm module path: [linear module paths]} for every LayerNorm/RMSNorm-like module whose output (or a
    view of it: same storage) is the input of a linear layer with a trainable weight, in one eager forward.

    Found with module hooks, independently of the graph rewrite. Norm outputs are held until the forward
    ends, so their memory cannot be reused by a later tensor and mistaken for them."""
    from transformers.pytorch_utils import Conv1D

    outputs: dict[int, str] = {}
    held: list[Tensor] = []
    feeds: dict[str, list[str]] = {}
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def on_norm(m: nn.Module, _args: Any, out: Any) -> None:
        t = out if isinstance(out, Tensor) else (out[0] if isinstance(out, (tuple, list)) and out else None)
        if isinstance(t, Tensor):
            held.append(t)
            outputs.setdefault(t.untyped_storage().data_ptr(), names[m])

    def on_linear(m: nn.Module, args: Any) -> None:
        if not args or not isinstance(args[0], Tensor) or not m.weight.requires_grad:
            return
        norm = outputs.get(args[0].untyped_storage().data_ptr())
        if norm is not None:
            feeds.setdefault(norm, []).append(names[m])

    for m in model.modules():
        if is_norm_like(m):
            handles.append(m.register_forward_hook(on_norm))
        elif isinstance(m, (nn.Linear, Conv1D)):
            handles.append(m.register_forward_pre_hook(on_linear))
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return feeds


@contextlib.contextmanager
def captured_reports():
    """One Report merging the reports of every graph compiled inside the block; the backend's INFO records
    do not reach the root logger's handlers meanwhile."""
    from approxbp_fx import Report, collect_reports

    logger = logging.getLogger("approxbp_fx")
    propagate, logger.propagate = logger.propagate, False
    merged = Report()
    try:
        with collect_reports() as reports:
            yield merged
    finally:
        logger.propagate = propagate
        for r in reports:
            merged.extend(r)


def reason_category(reason: str) -> str:
    """A short category for a skip reason (the full reasons stay in the JSON)."""
    r = reason.lower()
    if "through dropout" in r:
        return "reaches linears through dropout"
    if r.startswith("nothing to share"):
        return "no trainable linear reads it"
    m = re.match(r"consumer \S+ \(([^)]*)\) may keep", reason)
    if m:
        return f"other consumer ({m.group(1)})"
    m = re.search(r"feeds \S+ \(([^)]*)\)", reason)
    if m:
        return f"output also feeds {m.group(1)}"
    if "glu gate" in r:
        return "GLU gate (inner recomputes)"
    if "verification" in r:
        return "forward mismatch in verification"
    if "no gradients" in r:
        return "no gradients"
    if "dtype" in r:
        return "non-float input"
    if "normalized over" in r:
        return "multi-dim norm"
    return reason.split(";")[0].split(":")[0][:60]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


class FamilyTimeout(BaseException):
    """Raised by SIGALRM when a family runs past its time budget. A BaseException: the ``except Exception``
    clauses in the code it interrupts (the backend's own fall-back to the unrewritten graph, for one) must not
    take it for a failure of theirs."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``FamilyTimeout`` in the main thread after ``seconds`` (SIGALRM; no limit where unavailable)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise FamilyTimeout(f"past the {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Result:
    """What the sweep learned about one family; ``status`` is "ok", "crash" or a reason it was skipped."""

    family: str
    kind: str
    head: str = ""
    status: str = "ok"
    skip_reason: str = ""  # why it was not measured (build failure, timeout, budget)
    model_class: str = ""
    parameters: int = 0
    eager_bytes: int = 0
    approxbp_bytes: int = 0
    ratio: float | None = None
    forward_error: float | None = None
    grads_finite: bool | None = None
    crash: str = ""  # approxbp crash: exception type and first line
    dynamo_eager: str = ""  # "trains" or its exception
    dynamo_ratio: float | None = None  # bytes under plain torch.compile(backend="eager") / eager's
    sites: int = 0
    rewritten: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # category -> count
    skip_reasons: dict[str, str] = field(default_factory=dict)  # site path -> full reason
    by_family: dict[str, list[int]] = field(default_factory=dict)  # rewrite family -> [found, rewritten]
    norms_feeding_linears: int = 0
    norms_rewritten: int = 0
    norm_exceptions: dict[str, str] = field(default_factory=dict)  # norm module path -> why it is not rewritten
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def built(self) -> bool:
        return self.status in ("ok", "crash")

    @property
    def norms_ok(self) -> bool:
        return self.built and not self.crash and self.norms_rewritten == self.norms_feeding_linears


def _norm_status(feeds: dict[str, list[str]], report: Any, modules: list[str] | None = None) -> tuple[int, dict[str, str]]:
    """How many of the norms in ``feeds`` the report shows rewritten, and why each other one is not.

    A site's path is relative to the module Dynamo started tracing at: after a graph break that is a
    submodule (``layers.0.norm`` for ``model.encoder.layers.0.norm``), so a norm also takes the sites whose
    path ends its own. Where such a suffix fits several of ``modules`` (encoder and decoder layers), the
    norm counts as rewritten only if every site it fits is."""
    modules = list(feeds) if modules is None else modules
    by_path: dict[str, list[Any]] = {}
    for s in report.sites:
        if s.family == "norms":
            by_path.setdefault(s.path, []).append(s)
    rewritten, exceptions = 0, {}
    for path in feeds:
        exact = by_path.get(path, [])
        suffix = [s for p, sites in by_path.items() if p != path and path.endswith("." + p) for s in sites]
        sites = exact or suffix
        ambiguous = not exact and any(sum(m == p or m.endswith("." + p) for m in modules) > 1 for p in
                                      {s.path for s in suffix})
        if sites and (all(s.rewritten for s in sites) if ambiguous else any(s.rewritten for s in sites)):
            rewritten += 1
        elif sites:
            exceptions[path] = "; ".join(sorted({s.reason or "(its path is ambiguous after a graph break: some "
                                                 "sites with this path were rewritten)" for s in sites}))
        else:
            exceptions[path] = "not identified as a norm site by the norms family"
    return rewritten, exceptions


def measure_family(family: Family, budget_s: float = 60.0, dynamo_check: str = "on-problem") -> Result:
    """Build ``family`` and run the four measurements of the module docstring within ``budget_s`` seconds."""
    import approxbp_fx
    from approxbp_fx._compat import reset_dynamo

    res = Result(family.name, family.kind, family.head)
    start = time.perf_counter()
    try:
        with time_limit(budget_s):
            _measure_into(res, family, dynamo_check, approxbp_fx, reset_dynamo)
    except FamilyTimeout as exc:
        res.status, res.skip_reason = "timeout", f"timeout ({exc})"
    finally:
        reset_dynamo()
        res.seconds = time.perf_counter() - start
    return res


def _measure_into(res: Result, family: Family, dynamo_check: str, approxbp_fx: Any, reset_dynamo: Any) -> None:
    try:
        model, inputs = build(family)
    except FamilyTimeout:
        raise
    except Exception as exc:  # noqa: BLE001  (any build failure is a reason to list, not to stop the sweep)
        res.status, res.skip_reason = "not built", _build_reason(exc)
        return
    res.model_class = type(model).__name__
    res.parameters = sum(p.numel() for p in model.parameters())
    if res.parameters > 20_000_000:
        res.status, res.skip_reason = "not built", f"too large at the small config ({res.parameters / 1e6:.0f} M parameters)"
        return
    try:
        eager = train_step(model, model, inputs)
        feeds = norms_feeding_linears(model, inputs)
    except FamilyTimeout:
        raise
    except Exception as exc:  # noqa: BLE001
        res.status, res.skip_reason = "not built", f"eager forward/backward fails: {_first_line(exc)}"
        return
    res.eager_bytes = eager.saved_bytes
    res.norms_feeding_linears = len(feeds)

    reset_dynamo()
    with warnings.catch_warnings(record=True) as caught, captured_reports() as report:
        warnings.simplefilter("always")
        try:
            ours = train_step(model, torch.compile(model, backend="approxbp", options={"inner": "eager"}), inputs)
        except FamilyTimeout:
            raise
        except Exception as exc:  # noqa: BLE001
            res.status, res.crash = "crash", _first_line(exc)
            res.warnings.append(traceback.format_exc(limit=-3)[-600:])
            ours = None
    res.warnings += sorted({str(w.message)[:300] for w in caught if str(w.message).startswith("approxbp")})
    if ours is not None:
        res.approxbp_bytes = ours.saved_bytes
        res.ratio = ours.saved_bytes / eager.saved_bytes if eager.saved_bytes else None
        res.forward_error = rel_l2(ours.out, eager.out)
        res.grads_finite = ours.grads_finite
    res.sites, res.rewritten = len(report.sites), len(report.rewritten)
    for s in report.sites:
        counts = res.by_family.setdefault(s.family, [0, 0])
        counts[0] += 1
        counts[1] += int(s.rewritten)
        if not s.rewritten:
            cat = f"{s.family}: {reason_category(s.reason)}"
            res.skipped[cat] = res.skipped.get(cat, 0) + 1
            res.skip_reasons[f"{s.path} [{s.family}]"] = s.reason
    res.norms_rewritten, res.norm_exceptions = _norm_status(feeds, report, [n for n, _ in model.named_modules()])

    problem = bool(res.crash) or (res.ratio is not None and res.ratio > 1.0)
    if dynamo_check == "always" or dynamo_check == "on-problem" and problem:
        reset_dynamo()
        try:
            plain = train_step(model, torch.compile(model, backend="eager"), inputs)
            res.dynamo_eager = "trains"
            res.dynamo_ratio = plain.saved_bytes / eager.saved_bytes if eager.saved_bytes else None
        except FamilyTimeout:
            raise
        except Exception as exc:  # noqa: BLE001
            res.dynamo_eager = _first_line(exc)


def _build_reason(exc: BaseException) -> str:
    text = _first_line(exc)
    low = text.lower()
    if isinstance(exc, ImportError) or "requires the" in low or "pip install" in low:
        return f"import error / missing dependency: {text}"
    if "tokenizer" in low or "processor" in low:
        return f"needs a tokenizer/processor: {text}"
    if "from_pretrained" in low or "does not appear to have a file" in low or "huggingface.co" in low:
        return f"config needs external files: {text}"
    return f"does not build at the small config: {text}"


def select(names: list[str] | None, kinds: list[str] | None = None) -> list[Family]:
    """The families to sweep: ``names`` in that order (a name not in the list gets the generic treatment for
    its kind guessed from transformers' auto mappings), else every listed family not marked exclusive."""
    if names:
        out = []
        for n in names:
            out.append(BY_NAME[n] if n in BY_NAME else guess_family(n))
        return out
    chosen = [f for f in FAMILIES if not f.exclusive and (not kinds or f.kind in kinds)]
    # round robin over the kinds: if the total budget runs out, every kind loses its tail, not the last kind all
    queues = [[f for f in chosen if f.kind == k] for k in KINDS]
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def guess_family(name: str) -> Family:
    """A ``Family`` for a model type that is not in the list, from the auto mappings (generic shrinking only)."""
    from transformers.models.auto import modeling_auto as ma
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if name not in CONFIG_MAPPING_NAMES:
        raise ValueError(f"unknown model type {name!r}: not a key of transformers' CONFIG_MAPPING")
    for head, mapping, kind in (
        ("AutoModelForSeq2SeqLM", ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "encoder-decoder"),
        ("AutoModelForImageClassification", ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, "vision"),
        ("AutoModelForCTC", ma.MODEL_FOR_CTC_MAPPING_NAMES, "audio"),
        ("AutoModelForCausalLM", ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "decoder"),
        ("AutoModelForSequenceClassification", ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "encoder"),
        ("AutoModelForMaskedLM", ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES, "encoder"),
    ):
        if name in mapping:
            return Family(name, kind, head, inputs="waveform" if kind == "audio" else "")
    raise ValueError(f"model type {name!r} has no causal LM, seq2seq, classification or CTC head")


# --- the sweep and its tables ------------------------------------------------------------------------------


def sweep(families: list[Family], budget_s: float = 60.0, total_s: float = 1800.0, dynamo_check: str = "on-problem",
          progress: Callable[[str], None] | None = None) -> list[Result]:
    """``measure_family`` for each family in turn until ``total_s`` seconds are spent; the rest are listed as
    skipped for the total budget."""
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    _warm_up()
    start = time.perf_counter()
    results = []
    for i, family in enumerate(families):
        left = total_s - (time.perf_counter() - start)
        if left < 5:
            results.append(Result(family.name, family.kind, family.head, "budget",
                                  f"total budget of {total_s:.0f} s spent"))
            continue
        r = measure_family(family, min(budget_s, left), dynamo_check)
        results.append(r)
        if progress:
            progress(f"[{i + 1}/{len(families)}] {family.name}: {r.status} {r.skip_reason or r.crash} "
                     f"({r.seconds:.0f} s)")
    return results


def _warm_up() -> None:
    """One compile of a two-layer toy under the backend, outside any family's budget: the first compile in a
    process imports and initialises Dynamo and the ops, which would otherwise be charged to the first family."""
    from approxbp_fx._compat import reset_dynamo

    toy = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    torch.compile(toy, backend="approxbp", options={"inner": "eager"})(torch.randn(2, 8)).sum().backward()
    reset_dynamo()


def _fmt_ratio(r: Result) -> str:
    if r.ratio is None:
        return "-"
    plain = "" if r.dynamo_ratio is None else f" (plain Dynamo: {r.dynamo_ratio:.2f})"
    return f"{r.ratio:.2f}{plain}"


def _fmt_err(r: Result) -> str:
    return "-" if r.forward_error is None else f"{r.forward_error:.0e}"


def summary(results: list[Result]) -> dict[str, int]:
    built = [r for r in results if r.built]
    measured = [r for r in built if not r.crash]
    with_norms = [r for r in measured if r.norms_feeding_linears]
    return {
        "tried": len(results),
        "built": len(built),
        "no_crash": len(measured),
        "crash_but_dynamo_trains": sum(1 for r in built if r.crash and r.dynamo_eager == "trains"),
        "bytes_le_1": sum(1 for r in measured if r.ratio is not None and r.ratio <= 1.0 + 1e-9),
        "bytes_lt_1": sum(1 for r in measured if r.ratio is not None and r.ratio < 1.0 - 1e-9),
        "with_norm_linear": len(with_norms),
        "norms_all_rewritten": sum(1 for r in with_norms if r.norms_ok),
        "norm_linear_sites": sum(r.norms_feeding_linears for r in measured),
        "norm_linear_rewritten": sum(r.norms_rewritten for r in measured),
    }


def summary_line(results: list[Result]) -> str:
    s = summary(results)
    return (f"{s['tried']} families tried, {s['built']} built, {s['no_crash']} ran under the backend without a crash "
            f"({s['crash_but_dynamo_trains']} crashed where plain Dynamo trains), {s['bytes_le_1']} keep <= 1.00 of "
            f"eager's bytes ({s['bytes_lt_1']} fewer); {s['norms_all_rewritten']} of the {s['with_norm_linear']} "
            f"families with a LayerNorm/RMSNorm feeding a trainable linear have every such norm rewritten "
            f"({s['norm_linear_rewritten']} of {s['norm_linear_sites']} norms).")


def _norm_cell(r: Result) -> str:
    if not r.norms_feeding_linears:
        return "none"
    return f"{r.norms_rewritten}/{r.norms_feeding_linears}"


def _crash_cell(r: Result) -> str:
    if not r.crash:
        return "no" if r.grads_finite is not False else "no (non-finite grads)"
    plain = "plain Dynamo trains" if r.dynamo_eager == "trains" else f"plain Dynamo fails too: {r.dynamo_eager}"
    return f"**{r.crash}** ({plain})".replace("|", "\\|")


def markdown(results: list[Result], seconds: float, command: str) -> str:
    """The table, the summary line, and the lists of skipped families and norm exceptions."""
    rows = ["| family | kind | model | sites found / rewritten | skipped (by reason) | bytes vs eager | "
            "forward error | norms→linear rewritten | crash? | s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.built:
            continue
        skipped = ", ".join(f"{k} x{v}" for k, v in sorted(r.skipped.items())) or "-"
        rows.append(f"| {r.family} | {r.kind} | {r.model_class} | {r.sites} / {r.rewritten} | {skipped} | "
                    f"{_fmt_ratio(r)} | {_fmt_err(r)} | {_norm_cell(r)} | {_crash_cell(r)} | {r.seconds:.0f} |")
    skipped = [r for r in results if not r.built]
    skip_lines = [f"- {r.family} ({r.kind}): {r.skip_reason}" for r in skipped] or ["- none"]
    exc_lines = [f"- {r.family}: `{path}`: {why}" for r in results if r.built and not r.crash
                 for path, why in r.norm_exceptions.items()] or ["- none"]
    return "\n".join([
        f"**Summary.** {summary_line(results)}",
        "",
        f"Generated on CPU (torch {torch.__version__}, transformers {_tf_version()}) in {seconds / 60:.0f} min by "
        f"{command}. Eager inner; bytes one forward keeps for backward relative to plain eager; forward error: "
        "relative L2 of the logits against plain eager; norms→linear: LayerNorm/RMSNorm-like modules whose output "
        "feeds a trainable linear (found by hooks on the eager model), rewritten / all.",
        "",
        *rows,
        "",
        f"Families not measured ({len(skipped)}):",
        "",
        *skip_lines,
        "",
        "Norms feeding a trainable linear that were not rewritten, with the report's reason:",
        "",
        *exc_lines,
    ])


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def to_json(results: list[Result], seconds: float, command: str) -> dict[str, Any]:
    return {"summary": summary(results), "torch": torch.__version__, "transformers": _tf_version(),
            "seconds": seconds, "command": command, "families": [dataclasses.asdict(r) for r in results]}


def from_json(data: dict[str, Any]) -> tuple[list[Result], float, str]:
    """The results, seconds and command that ``to_json`` wrote (to rewrite the tables without a new sweep)."""
    names = {f.name for f in dataclasses.fields(Result)}
    results = [Result(**{k: v for k, v in r.items() if k in names}) for r in data["families"]]
    return results, float(data.get("seconds", 0.0)), str(data.get("command", ""))


if __name__ == "__main__":  # a quick look at a few families: python benchmarks/families.py llama bert
    for res in sweep(select(sys.argv[1:] or ["llama"]), progress=print):
        print(dataclasses.asdict(res))

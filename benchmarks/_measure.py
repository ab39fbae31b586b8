"""Models, configurations and the measurements ``benchmarks/run.py`` runs in its child processes.

Two kinds of child process, both started by ``run.py`` with ``python benchmarks/run.py --child SPEC``:

* ``memory``: one configuration of one row. Warm up (compile), then reset the peak counter and run one
  training step (forward, backward, optimizer step). CPU: ``MALLOC_MMAP_THRESHOLD_=65536`` in the
  environment, peak RSS reset by writing ``5`` to ``/proc/self/clear_refs``, ``VmHWM`` read from
  ``/proc/self/status`` (see BENCHMARKS.md, Method). CUDA: ``max_memory_allocated``.
* ``timing``: all configurations of one row in one process, sharing one set of parameters and one
  optimizer. Each is compiled and warmed up first; then rounds of one step per configuration, in
  rotating order, and the median per configuration. The same process measures the bytes saved for
  backward (``approxbp_fx.saved_tensors``) and classifies them by kind, estimates the ideal through
  ``approxbp_fx.explain``, and profiles (``torch.profiler``) where approxbp is slower than its baseline.

Each child prints one line ``RESULT <json>`` on stdout.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import re
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------- geometries


@dataclass(frozen=True)
class Geometry:
    name: str  # "vit-b16", "roberta-base", "gpt2-small", "llama"
    family: str  # vit | roberta | gpt2 | llama
    hidden: int
    layers: int
    heads: int
    mlp: int
    tokens: int  # ViT: 1 + (image / patch)^2
    batch: int
    vocab: int = 0
    image: int = 0
    patch: int = 0
    kv_heads: int = 0

    def describe(self) -> str:
        extra = f", image {self.image}/patch {self.patch}" if self.family == "vit" else f", vocab {self.vocab}"
        return (f"d {self.hidden}, {self.layers} layers, {self.heads} heads, MLP {self.mlp}, "
                f"{self.tokens} tokens, batch {self.batch}{extra}")


def _vit(image: int, patch: int, **kw: Any) -> Geometry:
    return Geometry("vit-b16", "vit", tokens=1 + (image // patch) ** 2, image=image, patch=patch, **kw)


# Full size: the geometries we report. Batches fit 24 GB on CPU (fp32 full fine-tuning, eager).
FULL = {
    "vit-b16": _vit(224, 16, hidden=768, layers=12, heads=12, mlp=3072, batch=32),
    "roberta-base": Geometry("roberta-base", "roberta", 768, 12, 12, 3072, 256, 16, vocab=50265),
    "gpt2-small": Geometry("gpt2-small", "gpt2", 768, 12, 12, 3072, 512, 8, vocab=50257),
    "llama": Geometry("llama", "llama", 2048, 4, 32, 5632, 512, 4, vocab=32000, kv_heads=4),
}
# Full size on a GPU: the paper's ViT-B batch (64).
FULL_CUDA = dict(FULL, **{"vit-b16": _vit(224, 16, hidden=768, layers=12, heads=12, mlp=3072, batch=64)})
# --quick on CPU: widths and token counts as in the full run, 2 layers, small batches, small vocabularies.
QUICK = {
    "vit-b16": _vit(224, 16, hidden=768, layers=2, heads=12, mlp=3072, batch=4),
    "roberta-base": Geometry("roberta-base", "roberta", 768, 2, 12, 3072, 256, 2, vocab=8192),
    "gpt2-small": Geometry("gpt2-small", "gpt2", 768, 2, 12, 3072, 512, 1, vocab=8192),
    "llama": Geometry("llama", "llama", 2048, 2, 32, 5632, 256, 1, vocab=8192, kv_heads=4),
}
SMOKE = {"vit-b16": _vit(32, 8, hidden=64, layers=1, heads=2, mlp=256, batch=2)}

LORA_QV = {"vit": ["q_proj", "v_proj"], "roberta": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def build_model(g: Geometry, tuning: str, seed: int = 0, precision: str = "fp32") -> nn.Module:
    """A randomly initialised HF model of geometry ``g`` in train mode, dropout 0; LoRA (r 8) through peft
    for ``tuning`` in {"lora-qv", "lora-all"}; every norm's affine randomized (a folding bug cannot hide).
    A ``+dropout`` suffix (``full+dropout``, ``lora-all+dropout``) sets HF's default dropout 0.1: hidden and
    attention dropout (RoBERTa, ViT), and ``lora_dropout``. ``precision="bf16w"``: the model's weights in
    bf16 (a bf16 checkpoint), PEFT's adapters in float32 as PEFT keeps them, no autocast."""
    import transformers as tf

    dropout = 0.1 if tuning.endswith("+dropout") else 0.0
    tuning = tuning.removesuffix("+dropout")
    torch.manual_seed(seed)
    if g.family == "vit":
        cfg = tf.ViTConfig(hidden_size=g.hidden, num_hidden_layers=g.layers, num_attention_heads=g.heads,
                           intermediate_size=g.mlp, image_size=g.image, patch_size=g.patch, num_labels=10,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        model = tf.ViTForImageClassification(cfg)
    elif g.family == "roberta":
        cfg = tf.RobertaConfig(vocab_size=g.vocab, hidden_size=g.hidden, num_hidden_layers=g.layers,
                               num_attention_heads=g.heads, intermediate_size=g.mlp, max_position_embeddings=g.tokens + 2,
                               num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        model = tf.RobertaForSequenceClassification(cfg)
    elif g.family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=g.vocab, n_positions=g.tokens, n_embd=g.hidden, n_layer=g.layers, n_head=g.heads,
                            n_inner=g.mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        model = tf.GPT2LMHeadModel(cfg)
    elif g.family == "llama":
        cfg = tf.LlamaConfig(vocab_size=g.vocab, hidden_size=g.hidden, num_hidden_layers=g.layers,
                             num_attention_heads=g.heads, num_key_value_heads=g.kv_heads or g.heads,
                             intermediate_size=g.mlp, max_position_embeddings=g.tokens, use_cache=False)
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(g.family)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if "norm" in type(m).__name__.lower():
                for name, lo in (("weight", 0.5), ("bias", -0.5)):
                    t = getattr(m, name, None)
                    if isinstance(t, Tensor):
                        t.copy_(torch.rand(t.shape, generator=gen) + lo)
    if precision == "bf16w" and g.family == "vit":
        raise ValueError("bf16w rows take token inputs; ViT's pixel values would need a cast")
    model = (model.to(torch.bfloat16) if precision == "bf16w" else model.float()).train()
    if tuning == "full":
        return model
    from peft import LoraConfig, get_peft_model

    targets = LORA_QV[g.family] if tuning == "lora-qv" else "all-linear"
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets))


def make_inputs(g: Geometry, device: str, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if g.family == "vit":
        d = {"pixel_values": torch.randn(g.batch, 3, g.image, g.image, generator=gen),
             "labels": torch.randint(0, 10, (g.batch,), generator=gen)}
    else:
        ids = torch.randint(0, g.vocab, (g.batch, g.tokens), generator=gen)
        labels = torch.randint(0, 3, (g.batch,), generator=gen) if g.family == "roberta" else ids.clone()
        d = {"input_ids": ids, "labels": labels}
    return {k: v.to(device) for k, v in d.items()}


# ------------------------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    name: str
    compiled: bool  # torch.compile with inductor (else eager, or approxbp with the eager inner)
    approxbp: bool
    budget: float | None = None  # torch._functorch.config.activation_memory_budget
    checkpointing: bool = False

    @property
    def baseline(self) -> str:
        """The configuration this one's step time and bytes are compared with."""
        return "torch.compile" if self.compiled else "eager"

    @property
    def without_approxbp(self) -> str:
        return self.name.replace("+approxbp", "")


CONFIGS = [
    Config("eager", False, False),
    Config("eager+approxbp", False, True),
    Config("torch.compile", True, False),
    Config("torch.compile+approxbp", True, True),
    Config("compile+budget0.7", True, False, 0.7),
    Config("compile+budget0.7+approxbp", True, True, 0.7),
    Config("compile+budget0.5", True, False, 0.5),
    Config("compile+budget0.5+approxbp", True, True, 0.5),
    Config("checkpointing", False, False, None, True),
    Config("checkpointing+approxbp", False, True, None, True),
]
CONFIG_BY_NAME = {c.name: c for c in CONFIGS}


def amp_context(device: str, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext


def budget_context(cfg: Config) -> contextlib.AbstractContextManager:
    if cfg.budget is None:
        return contextlib.nullcontext()
    return torch._functorch.config.patch(activation_memory_budget=cfg.budget)


def configure(model: nn.Module, cfg: Config) -> Callable[..., Any]:
    """The callable that runs ``model`` in configuration ``cfg`` (compiles lazily, on the first call)."""
    import approxbp_fx

    if cfg.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.compiled and not cfg.approxbp:
        return model
    fn = _entry(model, cfg.name)
    if cfg.compiled:
        with budget_context(cfg):
            return approxbp_fx.compile(fn) if cfg.approxbp else torch.compile(fn)
    return approxbp_fx.compile(fn, inner="eager")


def _entry(model: nn.Module, tag: str) -> Callable[..., Any]:
    """``model(**kwargs)`` behind a code object of its own. Dynamo caches compiled graphs per code object
    and guards on tensors, not on which compile call they came from: two ``torch.compile`` wrappers of
    models that share parameters (as here) would otherwise reuse each other's graphs (measured: the
    budget configurations silently ran torch.compile's graph)."""

    def forward(**kwargs: Any) -> Any:
        return model(**kwargs)

    forward.__code__ = forward.__code__.replace(co_name="forward_" + re.sub(r"\W", "_", tag))
    return forward


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers (one optimizer for all copies)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def train_step(fn: Callable[..., Any], inputs: dict[str, Tensor], opt: torch.optim.Optimizer, amp) -> None:
    opt.zero_grad(set_to_none=True)
    with amp():
        loss = fn(**inputs).loss
    loss.backward()
    opt.step()


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def warm_up(fn, inputs, opt, amp, cfg: Config, steps: int) -> None:
    # activation_memory_budget is read when the graph is partitioned, i.e. during the first call.
    with budget_context(cfg):
        train_step(fn, inputs, opt, amp)
    for _ in range(steps - 1):
        train_step(fn, inputs, opt, amp)


# --------------------------------------------------------------------------------------- saved bytes by kind

KINDS = ["hidden width", "MLP width", "attention q/k/v", "attention scores", "masks & 2-bit codes",
         "per-row stats", "weight copies", "other"]


def classify(t: Tensor, g: Geometry, param_shapes: set[tuple[int, ...]]) -> str:
    """What a saved tensor is, judged from its shape and dtype (works for eager and compiled graphs alike)."""
    shape = tuple(t.shape)
    if t.dtype in (torch.uint8, torch.int8, torch.bool):
        return "masks & 2-bit codes"
    if not shape or t.numel() <= g.batch * g.tokens * g.heads:
        return "per-row stats"
    if shape in param_shapes:  # autocast's bf16 casts, layout copies inductor makes (e.g. of conv weights)
        return "weight copies"
    if len(shape) >= 2 and shape[-1] == shape[-2] == g.tokens:
        return "attention scores"
    if shape[-1] in (g.mlp, 2 * g.mlp):
        return "MLP width"
    if len(shape) == 4 and shape[-1] == g.hidden // g.heads:
        return "attention q/k/v"
    if shape[-1] in (g.hidden, 3 * g.hidden):
        return "hidden width"
    return "other"


def saved_by_kind(fn, inputs, amp, model: nn.Module, g: Geometry) -> tuple[int, dict[str, int]]:
    import approxbp_fx

    param_shapes = {tuple(p.shape) for p in model.parameters()}
    with amp():
        tensors = approxbp_fx.saved_tensors(fn, exclude=[model], **inputs)
    by_kind = dict.fromkeys(KINDS, 0)
    for t in tensors:
        by_kind[classify(t, g, param_shapes)] += t.untyped_storage().nbytes()
    return sum(by_kind.values()), by_kind


# ------------------------------------------------------------------------------------------------- children


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one training step of one configuration (this process runs nothing else)."""
    g, device, amp = Geometry(**spec["geometry"]), spec["device"], amp_context(spec["device"], spec["precision"])
    cfg = CONFIG_BY_NAME[spec["config"]]
    model = build_model(g, spec["tuning"], precision=spec["precision"]).to(device)
    inputs = make_inputs(g, device)
    opt = make_optimizer(model)
    fn = configure(model, cfg)
    warm_up(fn, inputs, opt, amp, cfg, steps=2)
    gc.collect()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
        train_step(fn, inputs, opt, amp)
        sync(device)
        peak = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        resting = _status_kib("VmRSS") * 1024
        train_step(fn, inputs, opt, amp)
        # the kernel syncs per-thread RSS counters lazily: VmHWM can read a few pages below an earlier
        # VmRSS when the step itself needs no new pages (seen: 4 KiB and 16 KiB below); the peak is at least
        # the resting RSS
        peak = max(_status_kib("VmHWM") * 1024, resting)
    return {"peak_bytes": peak, "resting_bytes": resting}


def _profile(fns: dict[str, Callable[[], None]], device: str, steps: int = 2, top: int = 12) -> dict[str, Any]:
    """Self time per op (ms per step) of each callable, for the ``top`` ops of the largest differences."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    per: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    for name, run in fns.items():
        with profile(activities=activities) as prof:
            for _ in range(steps):
                run()
            sync(device)
        attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        per[name] = {e.key: getattr(e, attr) / 1000 / steps for e in prof.key_averages()}
        totals[name] = sum(per[name].values())
    names = list(fns)
    ops = set().union(*(per[n] for n in names))
    diff = lambda op: abs(per[names[-1]].get(op, 0.0) - per[names[0]].get(op, 0.0))  # noqa: E731
    rows = [[op] + [round(per[n].get(op, 0.0), 3) for n in names] for op in sorted(ops, key=diff, reverse=True)[:top]]
    return {"columns": names, "rows": rows, "totals_ms": {n: round(v, 3) for n, v in totals.items()},
            "time": "device" if device == "cuda" else "self CPU"}


def measure_timing(spec: dict[str, Any]) -> dict[str, Any]:
    """Saved bytes, ideal and interleaved step times of all of a row's configurations in this process."""
    import approxbp_fx

    g, device = Geometry(**spec["geometry"]), spec["device"]
    amp = amp_context(device, spec["precision"])
    base = build_model(g, spec["tuning"], precision=spec["precision"]).to(device)
    inputs = make_inputs(g, device)
    opt = make_optimizer(base)
    out: dict[str, Any] = {"configs": {}, "errors": {}}

    # The ideal: the backend's own per-site estimate of the bytes each rewritten site removes, with every
    # eligible site rewritten (the eager inner's decisions: the inductor inner leaves GLU gates exact).
    try:
        with amp():
            report = approxbp_fx.explain(base, options={"inner": "eager"}, **inputs)
        out["ideal_removed_bytes"] = report.bytes_saved
        out["sites"] = {"rewritten": len(report.rewritten), "skipped": len(report.skipped),
                        "skip_reasons": sorted({f"{s.pattern}: {s.reason}" for s in report.skipped})[:8]}
    except Exception as e:  # noqa: BLE001 (reported, not fatal)
        out["errors"]["explain"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    torch._dynamo.reset()

    runners: dict[str, Callable[[], None]] = {}
    for name in spec["configs"]:
        cfg = CONFIG_BY_NAME[name]
        try:
            model = sharing_copy(base)
            fn = configure(model, cfg)
            t0 = time.perf_counter()
            warm_up(fn, inputs, opt, amp, cfg, steps=spec["warmup"])
            sync(device)
            warm_s = time.perf_counter() - t0
            total, by_kind = saved_by_kind(fn, inputs, amp, model, g)
            runners[name] = (lambda fn=fn: train_step(fn, inputs, opt, amp))
            out["configs"][name] = {"saved_bytes": total, "saved_by_kind": by_kind, "warmup_s": round(warm_s, 2)}
        except Exception as e:  # noqa: BLE001
            out["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            traceback.print_exc()

    times: dict[str, list[float]] = {n: [] for n in runners}
    order = list(runners)
    for r in range(spec["rounds"]):
        for name in order[r % len(order):] + order[: r % len(order)] if order else []:
            sync(device)
            t0 = time.perf_counter()
            runners[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        out["configs"][name]["step_s"] = statistics.median(ts)
        out["configs"][name]["step_s_all"] = [round(t, 5) for t in ts]

    # Where approxbp is slower than its baseline: a profile of both.
    out["profiles"] = {}
    for name in runners:
        cfg = CONFIG_BY_NAME[name]
        if not cfg.approxbp:
            continue
        base_name = cfg.without_approxbp
        if base_name not in times:
            continue
        ratio = out["configs"][name]["step_s"] / out["configs"][base_name]["step_s"]
        if ratio > spec["profile_above"]:
            try:
                out["profiles"][name] = dict(_profile({base_name: runners[base_name], name: runners[name]}, device),
                                             ratio=round(ratio, 3))
            except Exception as e:  # noqa: BLE001
                out["errors"][f"profile {name}"] = f"{type(e).__name__}: {e}"
    return out


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    torch._dynamo.config.recompile_limit = 64
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "memory":
        return measure_memory(spec)
    return measure_timing(spec)


def geometry_dict(g: Geometry) -> dict[str, Any]:
    return asdict(g)


__all__ = ["CONFIGS", "CONFIG_BY_NAME", "Config", "FULL", "FULL_CUDA", "Geometry", "KINDS", "QUICK", "SMOKE",
           "build_model", "classify", "field", "geometry_dict", "make_inputs", "run_child"]

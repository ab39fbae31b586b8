"""LoRA fine-tuning of a small causal LM (LLaMA architecture) with PEFT, plain eager vs the ``approxbp`` backend.

    python examples/lora_causal_lm.py            # full run (~1 min on 2 idle CPU cores)
    python examples/lora_causal_lm.py --smoke    # CI: a few steps
    python examples/lora_causal_lm.py --inner inductor

The toy task: read 6 random digits and a separator, then write them sorted (``3 1 4 1 5 9 | 1 1 3 4 5 9``); the
loss is on the answer tokens only. A randomly initialised tiny LLaMA is wrapped with PEFT LoRA adapters on
every projection (q/k/v/o, gate/up/down), with the embeddings and the LM head trainable too (a random base
model knows no digits). The same model (same seed, same batches) is trained twice: plainly, and through
``approxbp_fx.compile(peft_model, inner=...)``, which rewrites LLaMA's decomposed RMSNorm -> projections
(MS-BP, exact) and SiLU (Approx-BP, 2-bit backward code). It prints the bytes one training forward keeps for
backward in each run, the loss curve and the answer-token accuracy on held-out sequences.

Needs ``pip install approxbp-fx[examples]`` (transformers, peft).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import Tensor

import approxbp_fx

DIGITS, LENGTH = 10, 6
SEP, VOCAB = DIGITS, DIGITS + 1


def make_batch(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """input_ids (n, 2*LENGTH+1) = digits, SEP, sorted digits; labels: -100 except on the answer."""
    x = torch.randint(0, DIGITS, (n, LENGTH), generator=g)
    ids = torch.cat([x, torch.full((n, 1), SEP), x.sort(dim=1).values], dim=1)
    labels = ids.clone()
    labels[:, : LENGTH + 1] = -100
    return ids, labels


def build_model(hidden: int, layers: int, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, modules_to_save=["embed_tokens", "lm_head"],
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(base, lora).train()


def answer_accuracy(model: torch.nn.Module, ids: Tensor, labels: Tensor) -> float:
    """Teacher-forced accuracy of the answer tokens (plain forward of the trained weights)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    mask = labels[:, 1:] != -100
    return (logits.argmax(-1)[mask] == labels[:, 1:][mask]).float().mean().item()


def train(name: str, compiled: bool, args: argparse.Namespace) -> dict:
    model = build_model(args.hidden, args.layers, args.seed)
    run = approxbp_fx.compile(model, inner=args.inner) if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    g = torch.Generator().manual_seed(args.seed + 1)
    probe_ids, probe_labels = make_batch(args.batch, torch.Generator().manual_seed(99))
    saved = approxbp_fx.saved_activation_bytes(run, exclude=[model], input_ids=probe_ids, labels=probe_labels)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        ids, labels = make_batch(args.batch, g)
        loss = run(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 0 or (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  [{name}] step {step + 1:4d}/{args.steps}  loss {loss.item():.4f}  "
                  f"({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    test_ids, test_labels = make_batch(256, torch.Generator().manual_seed(1234))
    return {"name": name, "saved": saved, "losses": losses, "seconds": seconds,
            "accuracy": answer_accuracy(model, test_ids, test_labels)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few steps, for CI (< 1 min)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--inner", choices=("eager", "aot_eager", "inductor"), default="eager")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.hidden, args.batch = 4, 64, 16
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    results = [train("plain", False, args), train(f"approxbp/{args.inner}", True, args)]
    base = results[0]["saved"]
    print(f"\nLoRA on a random-init LLaMA ({args.layers} layers, d={args.hidden}), {args.steps} steps, batch {args.batch}")
    print(f"{'run':18s} {'saved bytes/forward':>20s} {'vs plain':>9s} {'first loss':>11s} {'last loss':>10s} "
          f"{'answer acc':>11s} {'train s':>8s}")
    for r in results:
        last = sum(r["losses"][-10:]) / len(r["losses"][-10:])
        print(f"{r['name']:18s} {r['saved']:>20,d} {r['saved'] / base:>8.3f}x {r['losses'][0]:>11.4f} {last:>10.4f} "
              f"{r['accuracy']:>11.1%} {r['seconds']:>8.1f}")
    saved = base - results[1]["saved"]
    print(f"\nactivation memory saved by approxbp: {saved:,} bytes per forward ({100 * saved / base:.1f}%)")
    ok = all(r["losses"][-1] == r["losses"][-1] for r in results)  # no NaN
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

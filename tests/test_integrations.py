"""HF Trainer with the backend (``approxbp_fx.integrations.transformers.compile_for_trainer``).

A tiny BERT classifier is trained for a few Trainer steps on CPU three times from the same weights and data
order: plainly, with the backend in exact mode (``activations=False``: MS-BP only, so the weights must match
the plain run's) and with the defaults (Approx-BP too). The exact run's checkpoint must load into the plain
class with ``from_pretrained``: no missing or unexpected keys, the trained weights.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor

from models import VOCAB, tiny_bert

import transformers  # noqa: E402,F401

from approxbp_fx.integrations.transformers import compile_for_trainer, is_compiled_for_trainer  # noqa: E402

N, SEQ, STEPS, BATCH = 32, 16, 4, 8


class ToyDataset(torch.utils.data.Dataset):
    """Label = first token mod 3; an extra string column that Trainer's column filter must drop."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (N, SEQ), generator=g)
        self.labels = self.ids[:, 0] % 3

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "note": f"row {i}"}


def _train(tmp_path, compile_options: dict | None) -> tuple[torch.nn.Module, "transformers.Trainer", dict[str, Tensor]]:
    from transformers import Trainer, TrainingArguments

    torch._dynamo.reset()
    model = tiny_bert()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if compile_options is not None:
        assert compile_for_trainer(model, **compile_options) is model
        assert is_compiled_for_trainer(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=0.1, optim="sgd",
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, dataloader_drop_last=True, seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ToyDataset())
    trainer.train()
    return model, trainer, initial


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).double().norm() / (b.double().norm() + 1e-30)).item()


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("plain"), None)


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    logger = logging.getLogger("approxbp_fx")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run = _train(tmp_path_factory.mktemp("exact"), {"activations": False, "inner": "eager"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return run, "\n".join(r.getMessage() for r in records)


def test_backend_ran_inside_trainer(exact_run):
    """The compiled graph went through the backend (it logs each graph's report at INFO) and rewrote norm sites."""
    _, log = exact_run
    assert "rewritten" in log and "layer_norm" in log, log[:2000]


def test_exact_mode_trains_like_plain(plain_run, exact_run):
    """MS-BP is exact: after the same steps the weights equal the plain run's (to fp32 rounding)."""
    plain, plain_trainer, initial = plain_run
    (exact, exact_trainer, _), _ = exact_run
    p, e = plain.state_dict(), exact.state_dict()
    assert set(p) == set(e)
    # Compare the updates, all parameters at once (SGD: linear in the gradients; BERT's key bias has a zero
    # gradient in exact arithmetic, so its own update is rounding noise and cannot be compared alone).
    delta_p = torch.cat([(p[k] - initial[k]).flatten() for k in p])
    delta_e = torch.cat([(e[k] - initial[k]).flatten() for k in p])
    assert _rel(delta_e, delta_p) <= 1e-4
    assert sum(not torch.equal(initial[k], p[k]) for k in p) > len(p) // 2  # the plain run did train
    assert _losses(exact_trainer) == pytest.approx(_losses(plain_trainer), rel=1e-4)


def test_checkpoint_loads_into_plain_class(exact_run, tmp_path):
    from transformers import BertForSequenceClassification

    (model, trainer, initial), _ = exact_run
    trainer.save_model(str(tmp_path))
    loaded, info = BertForSequenceClassification.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    trained, fresh = model.state_dict(), loaded.state_dict()
    assert set(trained) == set(fresh)
    assert not any(k.startswith("_orig_mod") for k in fresh)
    for k in trained:
        assert torch.equal(trained[k], fresh[k]), k
    changed = [k for k in trained if not torch.equal(initial[k], trained[k])]
    assert len(changed) > len(trained) // 2, "the weights barely moved: did gradients flow?"


def test_default_options_train(tmp_path):
    """Approx-BP too: training runs, the weights move, the losses stay finite and go down over the steps."""
    model, trainer, initial = _train(tmp_path, {"inner": "eager"})
    losses = _losses(trainer)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[1:]) < losses[0]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(initial[k], v)]
    assert len(changed) > len(initial) // 2


def test_compile_for_trainer_checks_options():
    model = tiny_bert()
    with pytest.raises(ValueError, match="unknown option"):
        compile_for_trainer(model, activation=False)
    assert not is_compiled_for_trainer(model)
    with pytest.raises(TypeError, match="_orig_mod"):
        compile_for_trainer(torch.compile(model, backend="approxbp"))

"""HF Trainer integration: same bits as the plain loop, one draw per update step, clean weights outside
the window (eval, save, exceptions), sigma in the Trainer's logs and reporters, resume equality."""

import json
import os

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from flatlora import FlatLoRA, FlatLoRAConfig  # noqa: E402
from flatlora.integrations.hf import STATE_FILE, FlatLoRACallback, attach  # noqa: E402
from tests.integrations.helpers import (  # noqa: E402
    adapters, assert_same_bits, bits, collate, make_data, make_model, make_optimizer, plain_loop)

SIGMA = 0.1


def make_trainer(tmp_path, model, data, callbacks=(), batch=4, grad_accum=2, max_steps=2, **kw):
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
        gradient_accumulation_steps=grad_accum, max_steps=max_steps, max_grad_norm=0.0,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0,
    )
    defaults.update(kw)
    return Trainer(model=model, args=TrainingArguments(**defaults), train_dataset=data, eval_dataset=data[:8],
                   data_collator=collate, optimizers=make_optimizer(model), callbacks=list(callbacks))


def test_trainer_matches_plain_loop_bit_for_bit(tmp_path):
    data = make_data(16)
    ref = make_model()
    flat = FlatLoRA(ref, FlatLoRAConfig(sigma=SIGMA, total_steps=2, seed=3))
    plain_loop(ref, data, batch=4, grad_accum=2, steps=2, flat=flat)

    model = make_model()
    cb = FlatLoRACallback(sigma=SIGMA, seed=3)
    make_trainer(tmp_path, model, data, [cb]).train()
    assert_same_bits(adapters(model), adapters(ref))
    assert cb.flat.config.total_steps == 2 and cb.flat.last_step == 1
    # Without noise the run differs: the test would catch a callback that never perturbs.
    bare = make_model()
    plain_loop(bare, data, batch=4, grad_accum=2, steps=2)
    assert not all(torch.equal(a, b) for a, b in zip(adapters(bare).values(), adapters(model).values()))


class Probe(TrainerCallback):
    """Records what other callbacks see; placed before FlatLoRACallback like the reporting integrations."""

    def __init__(self, flat_cb, clean):
        self.flat_cb, self.clean, self.events, self.logs = flat_cb, clean, [], []

    def _check(self, name, model):
        self.events.append((name, self.flat_cb.flat.active))
        assert_same_bits(bits(model), self.clean)

    def on_evaluate(self, args, state, control, model=None, **kw):
        self._check("evaluate", model)

    def on_save(self, args, state, control, model=None, **kw):
        self._check("save", model)

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))


def test_grad_accum_4_draws_once_per_update_step(tmp_path, monkeypatch):
    calls, active_in_forward = [], []
    orig = FlatLoRA.begin_step

    def counting(self, step=None):
        calls.append(step)
        return orig(self, step)

    monkeypatch.setattr(FlatLoRA, "begin_step", counting)
    model = make_model()
    cb = FlatLoRACallback(sigma=SIGMA)
    model.register_forward_pre_hook(lambda m, a: active_in_forward.append(cb.flat.active) if m.training else None)
    make_trainer(tmp_path, model, make_data(48), [cb], batch=4, grad_accum=4, max_steps=3).train()
    assert calls == [0, 1, 2]
    assert cb.flat.draws == 2  # step 0 has sigma_0 = 0: a window, no draw
    assert active_in_forward == [True] * 12  # every micro-batch of every window runs under noise
    assert not cb.flat.active


def test_eval_save_and_end_see_clean_base_weights_and_sigma_is_logged(tmp_path):
    model = make_model()
    clean = bits(model)
    cb = FlatLoRACallback(sigma=SIGMA)
    probe = Probe(cb, clean)
    trainer = make_trainer(tmp_path, model, make_data(32), [probe, cb], max_steps=4,
                           eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=2)
    trainer.train()
    assert ("evaluate", False) in probe.events and ("save", False) in probe.events
    assert all(not active for _, active in probe.events)
    assert_same_bits(bits(model), clean)
    # sigma_t reaches the Trainer's history and a callback that runs before ours (as reporters do).
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [1, 2, 3, 4]
    assert [h["flatlora/sigma"] for h in train_logs] == pytest.approx([cb.flat.sigma_at(t) for t in range(4)])
    assert train_logs[-1]["flatlora/sigma"] == SIGMA  # the ramp ends exactly at sigma
    assert [l["flatlora/sigma"] for l in probe.logs if "loss" in l] == [h["flatlora/sigma"] for h in train_logs]
    assert trainer.callback_handler.callbacks[0] is cb  # moved first, so reporters get flatlora/sigma
    assert "training_step" not in vars(trainer)  # the exception guard is removed after train
    state = json.load(open(os.path.join(tmp_path, "checkpoint-2", STATE_FILE)))
    assert state["last_step"] == 1 and state["config"]["total_steps"] == 4


class Boom(Exception):
    pass


@pytest.mark.parametrize("use_attach", [False, True])
def test_exception_inside_the_window_restores_weights(tmp_path, use_attach):
    model = make_model()
    clean = bits(model)
    seen = []

    def explode(m, a):
        seen.append(1)
        if len(seen) == 4:  # step 1, second micro-batch: noise is on
            raise Boom()

    model.register_forward_pre_hook(explode)
    if use_attach:
        trainer = make_trainer(tmp_path, model, make_data(16))
        cb = attach(trainer, sigma=SIGMA)
    else:
        cb = FlatLoRACallback(sigma=SIGMA)
        trainer = make_trainer(tmp_path, model, make_data(16), [cb])
    with pytest.raises(Boom):
        trainer.train()
    assert cb.flat.last_step == 1 and not cb.flat.active
    assert_same_bits(bits(model), clean)


def test_resume_from_checkpoint_continues_schedule_and_noise(tmp_path, caplog):
    data = make_data(32)
    straight = make_model()
    make_trainer(tmp_path / "a", straight, data, [FlatLoRACallback(sigma=SIGMA, seed=5)], max_steps=4,
                 save_strategy="steps", save_steps=2).train()

    resumed = make_model()
    cb = FlatLoRACallback(sigma=SIGMA, seed=5)
    trainer = make_trainer(tmp_path / "a", resumed, data, [cb], max_steps=4)
    with caplog.at_level("WARNING", logger="flatlora"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert not [r for r in caplog.records if "different noise" in r.message]
    assert cb.flat.last_step == 3
    assert_same_bits(adapters(resumed), adapters(straight))

    # A different seed on resume is reported, not silently accepted.
    other = make_model()
    trainer = make_trainer(tmp_path / "a", other, data, [FlatLoRACallback(sigma=SIGMA, seed=6)], max_steps=4)
    with caplog.at_level("WARNING", logger="flatlora"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert [r for r in caplog.records if "different noise" in r.message]


def test_batchnorm_statistics_recalibrated_at_train_end(tmp_path):
    model = make_model(bn=True)
    cb = FlatLoRACallback(sigma=SIGMA)
    make_trainer(tmp_path, model, make_data(16), [cb]).train()
    assert cb.flat.bn_policy == "recalibrate" and not cb.flat.bn_stale
    bn = model.base_model.model.norm
    assert bn.num_batches_tracked.item() > 0


def test_callback_config_is_copied_and_validated():
    cfg = FlatLoRAConfig(sigma=0.2)
    cb = FlatLoRACallback(cfg, seed=4)
    assert cfg.seed == 0 and cb.config.seed == 4 and cb.config.sigma == 0.2
    with pytest.raises(ValueError):
        FlatLoRACallback(sigma=-1.0)

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
    adapters, assert_same_bits, bits, collate, hook_count, make_data, make_model, make_optimizer, plain_loop)

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

    # A different seed on resume is refused, naming the field, before any step runs on the wrong stream.
    other = make_model()
    trainer = make_trainer(tmp_path / "a", other, data, [FlatLoRACallback(sigma=SIGMA, seed=6)], max_steps=4)
    with pytest.raises(ValueError, match="seed: saved 5, now 6"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


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


# ---------------------------------------------------------------- arguments and seed (issue 14.1)
def test_flatlora_arguments_parse_next_to_training_arguments_and_follow_its_seed(tmp_path):
    from transformers import HfArgumentParser

    from flatlora.integrations.hf import FlatLoRAArguments

    parser = HfArgumentParser((TrainingArguments, FlatLoRAArguments))
    targs, fargs = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--seed", "123", "--flatlora_sigma", "0.1", "--flatlora_include", "*lin0",
         "--flatlora_per_rank_noise", "true", "--flatlora_mode", "forward", "--flatlora_bn_max_batches", "7"])
    cb = FlatLoRACallback.from_args(targs, fargs)
    assert (cb.config.sigma, cb.config.seed, cb.config.include, cb.config.per_rank_noise, cb.config.mode) == \
        (0.1, 123, ["*lin0"], True, "forward")
    assert cb.bn_max_batches == 7 and cb.config.total_steps is None  # total_steps comes from max_steps later
    _, fargs = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--flatlora_seed", "9"])
    assert FlatLoRACallback.from_args(targs, fargs).config.seed == 9  # explicit beats --seed
    # Every FlatLoRAConfig field has its flatlora_ twin with the same default (seed: None = follow --seed).
    names = {f for f in FlatLoRAArguments.__dataclass_fields__}
    cfg_fields = FlatLoRAConfig.__dataclass_fields__
    assert {"flatlora_" + f for f in cfg_fields} <= names
    for f in cfg_fields:
        want = None if f == "seed" else cfg_fields[f].default
        assert FlatLoRAArguments.__dataclass_fields__["flatlora_" + f].default == want, f
        assert FlatLoRAArguments.__dataclass_fields__["flatlora_" + f].metadata.get("help"), f
    # A bad value fails at parse time with the config's message.
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--flatlora_sigma", "-1"])


def test_noise_seed_follows_training_arguments_seed_unless_given(tmp_path):
    data = make_data(16)
    ref = make_model()
    plain_loop(ref, data, batch=4, grad_accum=2, steps=2, flat=FlatLoRA(ref, FlatLoRAConfig(sigma=SIGMA, total_steps=2, seed=123)))
    model = make_model()
    cb = FlatLoRACallback(sigma=SIGMA)
    make_trainer(tmp_path, model, data, [cb], seed=123).train()
    assert cb.flat.config.seed == 123 and cb.config.seed == 0  # the callback's own config stays the caller's
    assert_same_bits(adapters(model), adapters(ref))
    pinned = FlatLoRACallback(sigma=SIGMA, seed=0)
    make_trainer(tmp_path, make_model(), data, [pinned], seed=123).train()
    assert pinned.flat.config.seed == 0
    given = FlatLoRACallback(FlatLoRAConfig(sigma=SIGMA, seed=4))
    make_trainer(tmp_path, make_model(), data, [given], seed=123).train()
    assert given.flat.config.seed == 4


def test_a_second_train_replaces_the_engine_and_takes_the_old_hooks_off(tmp_path):
    data = make_data(16)
    model = make_model()
    before = hook_count(model)
    cb = FlatLoRACallback(sigma=SIGMA)
    trainer = make_trainer(tmp_path, model, data, [cb])
    trainer.train()
    first, with_one = cb.flat, hook_count(model)
    assert with_one > before  # guard hooks and the save_pretrained wrapper stay for later evaluate/save calls
    trainer.train()
    assert cb.flat is not first and not first.active and hook_count(model) == with_one
    assert cb.flat.config.seed == 0 and cb.flat.config.total_steps == 2


# ---------------------------------------------------------------- settings saved with the adapter (issue 14.2)
def _assert_card(folder, seed, total):
    from flatlora.integrations.hf import CONFIG_FILE, read_adapter_card

    assert os.path.isfile(os.path.join(folder, "adapter_config.json"))
    saved = json.load(open(os.path.join(folder, CONFIG_FILE)))
    assert saved["method"] == "flat-lora" and saved["config"]["sigma"] == SIGMA
    cfg = read_adapter_card(folder)
    assert (cfg.seed, cfg.total_steps) == (seed, total)
    card = open(os.path.join(folder, "README.md")).read()
    assert card.count("Trained with [Flat-LoRA](https://arxiv.org/abs/2409.14396)") == 1
    assert f"sigma={SIGMA}" in card and f"total_steps={total}" in card and f"seed={seed}" in card
    assert "- flat-lora" in card.split("\n---", 1)[0]  # a Hub tag in the card's metadata


def test_adapter_saves_carry_flatlora_config_and_model_card_line(tmp_path):
    import peft

    model = make_model()
    cb = FlatLoRACallback(sigma=SIGMA)
    trainer = make_trainer(tmp_path, model, make_data(32), [cb], max_steps=4, save_strategy="steps", save_steps=2, seed=11)
    trainer.train()
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        _assert_card(tmp_path / ckpt, seed=11, total=4)
    trainer.save_model(str(tmp_path / "final"))
    _assert_card(tmp_path / "final", seed=11, total=4)
    model.save_pretrained(str(tmp_path / "mine"))
    model.save_pretrained(str(tmp_path / "mine"))  # saving twice refreshes the section, never duplicates it
    _assert_card(tmp_path / "mine", seed=11, total=4)
    # The folder is still a plain PEFT adapter.
    loaded = peft.PeftModel.from_pretrained(make_model(peft_wrap=False), str(tmp_path / "mine"))
    for (n, a), (_, b) in zip(loaded.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n


def test_write_adapter_card_keeps_the_rest_of_the_card(tmp_path):
    from flatlora.integrations.card import write_adapter_card

    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\ntags:\n- lora\n---\n\n# My adapter\n\nNotes.\n")
    write_adapter_card(tmp_path, FlatLoRAConfig(sigma=0.2, total_steps=10, seed=3), extra={"last_step": 9})
    write_adapter_card(tmp_path, FlatLoRAConfig(sigma=0.3, total_steps=10, seed=3))
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: peft\ntags:\n- lora\n- flat-lora\n---\n\n# My adapter\n\nNotes.\n")
    assert text.count("## Flat-LoRA") == 1 and "sigma=0.3" in text and "sigma=0.2" not in text
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        write_adapter_card(tmp_path, {"sigma": -1})


# ---------------------------------------------------------------- noise never left on (issue 13, class 2)
class RaiseAtStepBegin(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Boom()


@pytest.mark.parametrize("use_attach", [False, True])
def test_exception_in_another_callbacks_step_begin_leaves_weights_clean(tmp_path, use_attach):
    model = make_model()
    clean = bits(model)
    if use_attach:
        trainer = make_trainer(tmp_path, model, make_data(16), [RaiseAtStepBegin(1)])
        cb = attach(trainer, sigma=SIGMA)
    else:
        cb = FlatLoRACallback(sigma=SIGMA)
        trainer = make_trainer(tmp_path, model, make_data(16), [cb, RaiseAtStepBegin(1)])
    with pytest.raises(Boom):
        trainer.train()
    assert cb.flat.last_step == 1 and not cb.flat.active  # step 1 was opened (sigma_1 > 0), then closed
    assert_same_bits(bits(model), clean)


def _interrupt_between_micro_batches(trainer, exc, at_call=2):
    """Raise `exc` where no wrapper of ours sees it: in the Trainer's loop between on_step_begin and training_step
    (accelerate's no_sync context of a non-final micro-batch). Call 2 = step 1, after its window opened."""
    original, calls = trainer.accelerator.no_sync, []

    def no_sync(*a, **k):
        calls.append(1)
        if len(calls) == at_call:
            exc()
        return original(*a, **k)

    trainer.accelerator.no_sync = no_sync


def test_ctrl_c_between_micro_batches_leaves_weights_clean(tmp_path):
    import signal

    before = signal.getsignal(signal.SIGINT)
    before = getattr(before, "_flatlora_previous", before)  # one left by a test whose train() died unobserved
    model = make_model()
    clean = bits(model)
    cb = FlatLoRACallback(sigma=SIGMA)
    trainer = make_trainer(tmp_path, model, make_data(16), [cb])
    _interrupt_between_micro_batches(trainer, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert cb.flat.last_step == 1 and not cb.flat.active
    assert_same_bits(bits(model), clean)
    assert signal.getsignal(signal.SIGINT) is before  # the process's Ctrl-C handling is back
    trainer.train()  # a new run starts clean and ends clean
    assert not cb.flat.active and signal.getsignal(signal.SIGINT) is before


class Unseen(Exception):
    pass


def _raise_unseen():
    raise Unseen()


@pytest.mark.parametrize("entry", ["evaluate", "predict", "save_model", "state_dict", "merge_and_unload", "train"])
def test_every_entry_point_sees_clean_weights_after_a_fault_left_the_window_open(tmp_path, entry):
    model = make_model()
    clean = bits(model)
    cb = FlatLoRACallback(sigma=SIGMA)
    data = make_data(16)
    trainer = make_trainer(tmp_path, model, data, [cb])
    _interrupt_between_micro_batches(trainer, _raise_unseen)
    with pytest.raises(Unseen):
        trainer.train()
    assert cb.flat.active  # the fault slipped past every wrapper: the window is still open ...
    seen = []
    lin0 = model.base_model.model.lin0
    lin0.register_forward_pre_hook(lambda m, a: seen.append(torch.equal(m.base_layer.weight, clean_w)))
    clean_w = make_model().base_model.model.lin0.base_layer.weight
    if entry == "evaluate":
        trainer.evaluate()
    elif entry == "predict":
        trainer.predict(data[:4])
    elif entry == "save_model":
        trainer.save_model(str(tmp_path / "out"))
        assert os.path.isfile(tmp_path / "out" / "flatlora_config.json")
    elif entry == "state_dict":
        sd = model.state_dict()
        assert torch.equal(sd["base_model.model.lin0.base_layer.weight"], clean_w)
    elif entry == "merge_and_unload":
        ref = make_model()  # clean base + the trained adapters
        with torch.no_grad():
            for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
                if p.requires_grad:
                    p.copy_(q)
        ref = ref.merge_and_unload()
        merged = model.merge_and_unload()
        assert torch.equal(merged.lin0.weight, ref.lin0.weight) and torch.equal(merged.lin1.weight, ref.lin1.weight)
        return
    elif entry == "train":
        trainer.train()
        seen = seen[:2]  # step 0 (sigma_0 = 0) runs on clean weights: the leftover noise was removed first
    assert not cb.flat.active  # ... and the entry point removed the noise before it used the weights
    assert all(seen)
    assert entry not in ("evaluate", "predict") or seen  # those did run the model
    assert_same_bits(bits(model), clean) if entry != "train" else None


def test_eval_forward_inside_a_window_pauses_the_noise_and_training_gets_it_back(tmp_path):
    # A callback evaluating between two micro-batches of a window: the evaluation sees clean weights, and the
    # rest of the window trains under the same noise (adapters equal to the plain loop's, bit for bit).
    class EvalMidWindow(TrainerCallback):
        def __init__(self):
            self.trainer, self.saw_clean = None, []

        def on_substep_end(self, args, state, control, model=None, **kw):
            model.eval()
            with torch.no_grad():
                model(**collate(data[:4]))
            self.saw_clean.append(torch.equal(model.base_model.model.lin0.base_layer.weight, clean_w))
            model.train()

    data = make_data(16)
    ref = make_model()
    plain_loop(ref, data, batch=4, grad_accum=2, steps=2, flat=FlatLoRA(ref, FlatLoRAConfig(sigma=SIGMA, total_steps=2, seed=0)))
    model = make_model()
    clean_w = model.base_model.model.lin0.base_layer.weight.detach().clone()
    probe = EvalMidWindow()
    make_trainer(tmp_path, model, data, [FlatLoRACallback(sigma=SIGMA), probe]).train()
    assert probe.saw_clean == [True, True]
    assert_same_bits(adapters(model), adapters(ref))


def test_missing_transformers_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "flatlora.integrations.hf")
    with pytest.raises(ImportError, match=r"pip install 'flatlora\[hf\]'"):
        importlib.import_module("flatlora.integrations.hf")

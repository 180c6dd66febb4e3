"""Randomness is the engine's own: seed replay, no global RNG use, one draw per window, resume."""

import pytest
import torch

import flatlora.core.noise_draw as noise_draw
from flatlora import FlatLoRA, FlatLoRAConfig
from flatlora.rng import canonical_name, layer_id, noise_key
from tests.conftest import batches, make_lora_mlp, trainable


def train(seed=0, steps=6, mode="inplace", start=0, pm=None, state=None, ga=1, stop=None):
    pm = pm if pm is not None else make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.2, total_steps=steps, seed=seed, mode=mode))
    if state is not None:
        flat.load_state_dict(state)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    xs = batches(steps * ga)
    for t in range(start, steps if stop is None else stop):
        with flat.step():  # default: the step after the last one
            for x in xs[t * ga:(t + 1) * ga]:
                pm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return pm, flat


@pytest.mark.parametrize("mode", ["inplace", "forward"])
def test_same_seed_same_adapter_bits(mode):
    a, _ = train(seed=3, mode=mode)
    b, _ = train(seed=3, mode=mode)
    c, _ = train(seed=4, mode=mode)
    ta, tb, tc = trainable(a), trainable(b), trainable(c)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    assert any(not torch.equal(ta[n], tc[n]) for n in ta)


@pytest.mark.parametrize("mode", ["inplace", "forward"])
def test_global_rng_untouched(mode):
    pm = make_lora_mlp()  # building the model uses the global RNG (nn.Linear init); training must not
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    train(steps=3, pm=pm, mode=mode)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(cuda_state, torch.cuda.get_rng_state_all() if cuda_state else []))


@pytest.mark.parametrize("mode", ["inplace", "forward"])
def test_one_draw_per_accumulation_window(mode, monkeypatch):
    calls = []
    real = noise_draw.standard_normal

    def counting(key, *a, **k):
        calls.append(key)
        return real(key, *a, **k)

    monkeypatch.setattr(noise_draw, "standard_normal", counting)
    pm, flat = train(steps=3, mode=mode, ga=4)
    n_layers = len(flat.targets)
    keys = set(calls)
    # steps 1 and 2 draw noise (step 0 has sigma_0 = 0): one key per layer and step, whatever the GA.
    assert len(keys) == 2 * n_layers
    assert flat.draws == 2
    if mode == "inplace":  # perturb + replayed restore
        assert len(calls) == 2 * len(keys)


def test_noise_is_the_same_for_every_micro_batch_of_a_window():
    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.3, total_steps=2, mode="forward"))
    x = batches(1)[0]
    with torch.no_grad(), flat.step(1):
        y1, y2 = pm(x), pm(x)
    with torch.no_grad():
        clean = pm(x)
    assert torch.equal(y1, y2) and not torch.allclose(y1, clean)


@pytest.mark.parametrize("mode", ["inplace", "forward"])
def test_state_dict_resume_continues_the_stream(mode):
    straight, _ = train(steps=6, mode=mode)
    half, flat = train(steps=6, stop=3, mode=mode)
    state = flat.state_dict()
    assert state["last_step"] == 2
    flat.close()  # releases the weights (a second live engine on them is refused)
    # A new engine on the same model resumes at step 3 of the 6-step schedule.
    resumed, flat2 = train(steps=6, start=3, mode=mode, pm=half, state=state)
    assert flat2.last_step == 5
    a, b = trainable(straight), trainable(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_state_dict_rejects_other_targets_and_garbage():
    _, flat = train(steps=2)
    state = flat.state_dict()
    state["config"]["include"] = ["*lin0*"]
    with pytest.raises(ValueError, match="include"):
        flat.load_state_dict(state)
    with pytest.raises(ValueError, match="not a FlatLoRA state dict"):
        flat.load_state_dict({"sigma": 1})


def test_keys_are_stable_and_distinct():
    assert canonical_name("module._fsdp_wrapped_module.base_model.model.lin0") == "lin0"
    assert canonical_name("model.base_model.model.layers.0.q") == "layers.0.q"  # Lightning's self.model
    assert canonical_name("module.encoder.lin0") == "encoder.lin0"
    assert layer_id("module.base_model.model.lin0") == layer_id("base_model.model.lin0") == layer_id("lin0")
    keys = {noise_key(s, t, l, r) for s in (0, 1) for t in range(50) for l in (1, 2, 3) for r in (None, 0, 1)}
    assert len(keys) == 2 * 50 * 3 * 3
    assert all(0 <= k < 2**63 for k in keys)


def test_the_key_derivation_is_fixed():
    """Every user's noise hangs on these keys (same seed -> same run across versions): splitmix64 of the seed, then
    of the step, the layer id and the rank word in turn, top 63 bits; a step's draws mix the seed and step once."""
    from flatlora.rng import _splitmix64, layer_key, step_key

    def spelled_out(seed, step, layer, rank):
        key = _splitmix64(seed % 2**64)
        for word in (step, layer, -1 if rank is None else rank):
            key = _splitmix64(key ^ (word % 2**64))
        return key >> 1

    assert noise_key(0, 0, 0) == 8738413394458714153
    assert noise_key(1234, 7, 0xDEADBEEF, 3) == 4638576160345356048
    assert noise_key(2**40, 2**33, 2**63 + 5) == 860298356843142085
    for seed, step, layer, rank in [(0, 0, 0, None), (1234, 7, 0xDEADBEEF, 3), (2**40, 2**33, 2**63 + 5, None), (-1, 5, 9, 0)]:
        assert noise_key(seed, step, layer, rank) == spelled_out(seed, step, layer, rank)
        assert layer_key(step_key(seed, step), layer, rank) == noise_key(seed, step, layer, rank)


def test_per_rank_noise_changes_the_key(monkeypatch):
    pm = make_lora_mlp()
    shared = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3))
    name = shared.targets[0].name
    eps = shared.noise(name, 2)
    shared.close()
    per_rank = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3, per_rank_noise=True))
    assert not torch.equal(eps, per_rank.noise(name, 2))


def test_cpu_stream_row_slices_equal_the_full_draw_and_are_gaussian():
    from flatlora.rng import CPU_BLOCK_ROWS, standard_normal

    m, n = 3 * CPU_BLOCK_ROWS + 17, 384  # several blocks (parallel fill) and a ragged last block
    full = standard_normal(42, m, n, "cpu")
    assert full.shape == (m, n)
    assert torch.equal(full, standard_normal(42, m, n, "cpu"))
    for rows in (slice(0, 5), slice(60, 70), slice(CPU_BLOCK_ROWS, 2 * CPU_BLOCK_ROWS), slice(m - 3, m), slice(100, m)):
        assert torch.equal(standard_normal(42, m, n, "cpu", rows), full[rows]), rows
    # blocks are independent draws, not copies of one another
    assert not torch.equal(full[:CPU_BLOCK_ROWS], full[CPU_BLOCK_ROWS:2 * CPU_BLOCK_ROWS])
    assert abs(full.mean().item()) < 0.01 and abs(full.std().item() - 1) < 0.01
    assert not torch.equal(full, standard_normal(43, m, n, "cpu"))


def test_cpu_stream_is_one_fresh_generator_per_block_whatever_the_threads(monkeypatch):
    # The stream's definition, written out: block b of key k is torch.randn from a fresh Generator seeded
    # splitmix64(k ^ b) >> 1. The fill reuses one generator per thread and splits the blocks over threads;
    # neither may change a bit, with one thread or several.
    from flatlora import rng

    m, n, key = 5 * rng.CPU_BLOCK_ROWS + 9, 384, (1 << 62) + 12345
    ref = torch.cat([torch.randn(min(rng.CPU_BLOCK_ROWS, m - b * rng.CPU_BLOCK_ROWS), n,
                                 generator=torch.Generator().manual_seed(rng._splitmix64(key ^ b) >> 1))
                     for b in range(-(-m // rng.CPU_BLOCK_ROWS))])
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        for _ in range(2):  # the second draw reuses the threads' generators
            assert torch.equal(rng.standard_normal(key, m, n, "cpu"), ref), threads
        assert torch.equal(rng.standard_normal(key, m, n, "cpu", slice(70, 200)), ref[70:200]), threads
        # the row scale, applied block by block inside the fill, is the same float32 product as a pass after it
        scale = torch.rand(m) * 0.01
        assert torch.equal(rng.standard_normal(key, m, n, "cpu", scale=scale), ref * scale[:, None]), threads
        assert torch.equal(rng.standard_normal(key, m, n, "cpu", slice(70, 200), scale=scale[70:200]),
                           ref[70:200] * scale[70:200, None]), threads
    # pinned values (drawn by the per-block pool of the previous session): resumed runs replay this stream
    z = rng.standard_normal(key, m, n, "cpu")
    assert (z[0, 0].item(), z[64, 1].item(), z[-1, -1].item()) == (1.7102998495101929, -0.7309643626213074,
                                                                   0.12007860839366913)

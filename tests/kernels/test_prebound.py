"""noisy_copy_'s pre-bound launch, on the CPU: when it applies, what its cache is keyed on, and that it calls
Triton's launcher with exactly the arguments an ordinary launch passes. Nothing is launched here: Triton's
kernel object is replaced by a recorder (kernel_cases.py's gpu tests run the real thing)."""

import inspect
import types

import pytest
import torch

triton = pytest.importorskip("triton")
knobs = pytest.importorskip("triton.knobs")  # Triton >= 3.4: where the fast path exists at all
from triton.knobs import HookChain  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from flatlora.kernels import triton_noise as K  # noqa: E402


def _runtime_knobs(enter=None, leave=None, debug=False, mode="", stages=None):
    rt = types.SimpleNamespace(launch_enter_hook=HookChain() if enter is None else enter,
                               launch_exit_hook=HookChain(reversed=True) if leave is None else leave,
                               debug=debug, add_stages_inspection_hook=stages)
    return rt, types.SimpleNamespace(instrumentation_mode=mode)


def test_plain_launch_only_without_hooks_and_key_settings():
    kernel = types.SimpleNamespace(pre_run_hooks=[])
    assert K._plain_launch(*_runtime_knobs(), kernel)
    rt, comp = _runtime_knobs()
    rt.launch_enter_hook = rt.launch_exit_hook = None  # Triton before hook chains: None when unset
    assert K._plain_launch(rt, comp, kernel)
    chain = HookChain()
    chain.add(lambda metadata: None)  # a profiler (proton) listening to every launch
    assert not K._plain_launch(*_runtime_knobs(enter=chain), kernel)
    assert not K._plain_launch(*_runtime_knobs(leave=chain), kernel)
    assert not K._plain_launch(*_runtime_knobs(enter=lambda metadata: None), kernel)  # a bare hook
    assert not K._plain_launch(*_runtime_knobs(debug=True), kernel)
    assert not K._plain_launch(*_runtime_knobs(mode="consan"), kernel)
    assert not K._plain_launch(*_runtime_knobs(stages=lambda: ("k", "h")), kernel)
    assert not K._plain_launch(*_runtime_knobs(), types.SimpleNamespace(pre_run_hooks=[print]))
    assert K._plain_launch(knobs.runtime, knobs.compilation, kernel)  # this process: nothing set


def test_copy_key_follows_what_triton_specializes_on():
    base = K._copy_key(0, 0, True, True, 512, 1024, 2048, 4096, 8192)
    assert base == K._copy_key(0, 0, True, True, 16, 32, 2048, 4096 + 48, 8192)  # other 16-byte aligned addresses
    assert base != K._copy_key(0, 0, True, True, 512, 1024, 2048, 4096 + 2, 8192)  # output one bf16 element further
    assert base != K._copy_key(0, 0, True, True, 520, 1024, 2048, 4096, 8192)  # unaligned table
    assert base != K._copy_key(0, 0, True, True, 512, 1028, 2048, 4096, 8192)  # unaligned tile map
    assert base != K._copy_key(0, 1, True, True, 512, 1024, 2048, 4096, 8192)  # float16: another constexpr
    assert base != K._copy_key(0, 0, False, True, 512, 1024, 2048, 4096, 8192)
    assert base != K._copy_key(0, 0, True, False, 512, 1024, 2048, 4096, 8192)
    assert base != K._copy_key(1, 0, True, True, 512, 1024, 2048, 4096, 8192)  # another GPU: another loaded module
    assert base != K._copy_key(0, 0, True, True, 512, 1024, 2048, 4096, 8196)  # std one float32 further
    assert base != K._copy_key(0, 0, True, True, 512, 1024, 2050, 4096, 8192)  # weight one bf16 element further


def test_copy_key_matches_tritons_own_specialization():
    """Triton's specialization of the arguments `_copy_key` stands for: a tensor's pointee type and whether its
    address is a multiple of 16; CAP = 0 is an i32 divisible by 16 whatever the layer."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    spec = lambda a: native_specialize_impl(BaseBackend, a, False, True, True)  # noqa: E731
    buf = torch.empty(64, dtype=torch.int16)
    assert buf.data_ptr() % 16 == 0
    assert spec(buf) == ("*i16", "D") and spec(buf[1:]) == ("*i16", "") and spec(buf[8:]) == ("*i16", "D")
    assert spec(buf.view(torch.bfloat16)) == ("*bf16", "D")  # why the output travels as its bits
    assert spec(0) == ("i32", "D")
    assert spec(1) == ("constexpr", 1)  # an integer 1 is a constant: CAP must never be 1 on this path


def test_runtime_probe(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K._runtime() is None  # the interpreter: no CompiledKernel to bind
    monkeypatch.delenv("TRITON_INTERPRET")

    def k(x_ptr):
        pass

    monkeypatch.setattr(K, "_noise_kernel", types.SimpleNamespace(pre_run_hooks=[]))  # e.g. interpreted
    assert K._runtime() is None
    monkeypatch.setattr(K, "_noise_kernel", JITFunction(k))
    rt, comp, device, stream = K._runtime()  # the installed Triton has every piece the fast path uses
    assert rt is knobs.runtime and comp is knobs.compilation and device is torch.cuda.current_device
    monkeypatch.setattr(K, "_RUNTIME", K._UNPROBED)
    assert K._prebound_device(torch.zeros(2, 2)) is None  # a CPU tensor never takes it
    assert K._RUNTIME is K._UNPROBED  # ... and probes nothing


def test_prebind_takes_only_a_loaded_compiled_kernel():
    launcher = lambda *a: None  # noqa: E731
    ck = types.SimpleNamespace(run=launcher, function=7, packed_metadata=(1, 2))
    assert K._prebind(ck) == (launcher, 7, (1, 2), ck)
    assert K._prebind(types.SimpleNamespace(result=lambda: ck)) == (launcher, 7, (1, 2), ck)  # 3.6 async future
    assert K._prebind(None) is None  # the interpreter returns nothing
    assert K._prebind(types.SimpleNamespace(run=launcher, function=None, packed_metadata=())) is None


class _Recorder:
    """Stands for `_noise_kernel`: records ordinary launches and returns a CompiledKernel-like object whose
    launcher records pre-bound ones."""

    pre_run_hooks: list = []

    def __init__(self):
        self.ordinary, self.prebound = [], []
        self.compiled = types.SimpleNamespace(run=lambda *a: self.prebound.append(a), function="fn",
                                              packed_metadata="packed")

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.ordinary.append((grid, args, kwargs))
            return self.compiled

        return launch


@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors posing as device -1 with the pre-bound path on; Triton's kernel replaced by a recorder."""
    params = list(inspect.signature(K._noise_kernel.fn).parameters)  # the real kernel's parameter order
    rec = _Recorder()
    chain = HookChain()
    rt, comp = _runtime_knobs(enter=chain)
    monkeypatch.setattr(K, "_noise_kernel", rec)
    monkeypatch.setattr(K, "_RUNTIME", (rt, comp, lambda: -1, lambda device: 1234))
    monkeypatch.setattr(K, "_prebound_device", lambda w: -1)
    monkeypatch.setattr(K, "_fast", lambda: True)  # compiled, as wherever _RUNTIME is set
    monkeypatch.setattr(K, "_ONE", {})
    monkeypatch.setattr(K, "_PREBOUND", {})
    return rec, params, chain


def _bound(params, args, kwargs):
    """What JITFunction.run hands its launcher after the launch configuration: every kernel argument in
    signature order (constexprs included), tensors as their addresses."""
    vals = list(args) + [kwargs[p] for p in params[len(args):]]
    assert len(vals) == len(params)
    return tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v for v in vals)


def test_prebound_launch_passes_what_the_ordinary_launch_passes(fake_gpu):
    rec, params, chain = fake_gpu
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(40, 96, generator=g) * 0.02).to(torch.bfloat16)
    std = torch.rand(40, generator=g)
    buf = torch.empty(2 * 40 * 96 + 8, dtype=torch.bfloat16)
    out_a = buf[:40 * 96].view(40, 96)  # 16-byte aligned
    out_b = buf[1:1 + 40 * 96].view(40, 96)  # one element further: misaligned
    out_c = buf[8:8 + 40 * 96].view(40, 96)  # aligned again

    K.noisy_copy_(w, std, 5, 0, out_a)  # first of its key: Triton's ordinary launch, and its kernel kept
    assert len(rec.ordinary) == 1 and not rec.prebound and len(K._PREBOUND) == 1
    grid, args, kwargs = rec.ordinary[0]
    assert kwargs.pop("num_warps") == K.NUM_WARPS[K.COPY] and kwargs["LAYER_ARGS"] and kwargs["CONTIG"]
    assert args[-4].dtype == torch.int16 and args[-4].data_ptr() == out_a.data_ptr()  # the output as its bits
    assert args[-3] is std and args[-2:] == (0, 5)  # std and the key's halves

    K.noisy_copy_(w, std, 5, 0, out_a)
    assert len(rec.ordinary) == 1 and len(rec.prebound) == 1
    launch = rec.prebound[0]
    # JITFunction.run: launcher(grid 0, 1, 2, stream, function, packed metadata, launch metadata, hooks, *args)
    assert launch[:9] == (grid[0], 1, 1, 1234, "fn", "packed", None, None, None)
    assert launch[9:] == _bound(params, args, kwargs)

    K.noisy_copy_(w, std, 5, 0, out_c)  # another aligned output: the same kernel
    assert len(rec.ordinary) == 1 and len(rec.prebound) == 2
    assert rec.prebound[1][9:] == _bound(params, args[:-4] + (out_c.data_ptr(),) + args[-3:], kwargs)

    # A new window: another std and key through the same table and kernel, as arguments
    std2, key2 = torch.rand(40, generator=g), (1 << 64) - 3
    K.noisy_copy_(w, std2, key2, 0, out_a)
    assert len(rec.ordinary) == 1 and len(rec.prebound) == 3 and len(K._ONE) == 1
    assert rec.prebound[2][9:] == _bound(params, args[:-3] + (std2, -1, -3), kwargs)
    rec.prebound.pop()

    K.noisy_copy_(w, std, 5, 0, out_b)  # misaligned: another specialization, so an ordinary launch first
    assert len(rec.ordinary) == 2 and len(K._PREBOUND) == 2
    _, args_b, kwargs_b = rec.ordinary[1]
    assert not kwargs_b["CONTIG"] and args_b[-4].data_ptr() % 16 == 2
    K.noisy_copy_(w, std, 5, 0, out_b)
    assert len(rec.ordinary) == 2 and rec.prebound[-1][9:] == _bound(params, args_b, kwargs_b)

    chain.add(lambda metadata: None)  # a launch hook: every launch is Triton's own again, and nothing is cached
    K.noisy_copy_(w, std, 5, 0, out_a)
    assert len(rec.ordinary) == 3 and len(rec.prebound) == 3 and len(K._PREBOUND) == 2

    with pytest.raises(ValueError, match="output must be a"):  # a wrong output is still refused on a hit
        K.noisy_copy_(w, std, 5, 0, torch.empty(40, 96, dtype=torch.float16))


def test_a_new_weight_tensor_at_every_call_reuses_the_table_and_the_prebound_kernel(fake_gpu):
    """A quantized base dequantizes into a fresh tensor at every forward (a gathered shard likewise): the table
    is keyed by shape and strides, and the weight's address travels as an argument like the output's."""
    rec, params, _ = fake_gpu
    g = torch.Generator().manual_seed(1)
    std = torch.rand(40, generator=g)
    out = torch.empty(40, 96, dtype=torch.bfloat16)
    ws = [(torch.randn(40, 96, generator=g) * 0.02).to(torch.bfloat16) for _ in range(3)]  # all alive: 3 addresses
    for w in ws:
        K.noisy_copy_(w, std, 5, 0, out)
    assert len(K._ONE) == 1 and len(rec.ordinary) == 1 and len(rec.prebound) == 2
    _, args, kwargs = rec.ordinary[0]
    assert args[-5].dtype == torch.int16 and args[-5].data_ptr() == ws[0].data_ptr()  # the weight as its bits
    for launch, w in zip(rec.prebound, ws[1:]):
        assert launch[9:] == _bound(params, args[:-5] + (w.data_ptr(),) + args[-4:], kwargs)
    buf = torch.empty(40 * 96 + 8, dtype=torch.bfloat16)
    K.noisy_copy_(buf[1:1 + 40 * 96].view(40, 96), std, 5, 0, out)  # a misaligned weight: another specialization
    assert len(rec.ordinary) == 2 and not rec.ordinary[1][2]["CONTIG"] and len(K._ONE) == 1


def test_other_device_or_cpu_output_takes_the_ordinary_launch(fake_gpu, monkeypatch):
    rec, _, _ = fake_gpu
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    std = torch.ones(8)
    out = torch.empty_like(w)
    K.noisy_copy_(w, std, 1, 0, out)
    K.noisy_copy_(w, std, 1, 0, out)
    assert (len(rec.ordinary), len(rec.prebound)) == (1, 1)
    rt, comp, _, stream = K._RUNTIME
    monkeypatch.setattr(K, "_RUNTIME", (rt, comp, lambda: 0, stream))  # the current device is another one
    K.noisy_copy_(w, std, 1, 0, out)
    assert (len(rec.ordinary), len(rec.prebound)) == (2, 1)


def test_key_halves_are_signed_int32s_that_rebuild_the_key():
    """The one-layer launch passes a 64-bit key as two i32 arguments (one compiled kernel for every key); the
    kernel rebuilds it as (hi << 32) | (lo & 0xFFFFFFFF) in int64, the table's two's complement of the key."""
    for key in (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15):
        hi, lo = K._key_halves(key)
        assert -2**31 <= hi < 2**31 and -2**31 <= lo < 2**31
        rebuilt = (hi << 32) | (lo & 0xFFFFFFFF)  # Python ints: sign-extended as the kernel's int64 is
        assert rebuilt & (2**64 - 1) == key and rebuilt == (key - 2**64 if key >= 2**63 else key)

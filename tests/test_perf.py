"""The evaluation-bound arithmetic (diffcap.perf) against the calls the samplers and DiffCAP really make, and the
speed options: each leaves the outputs equal within its stated tolerance (no timing is asserted here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcap import perf
from diffcap.denoisers import Denoiser, load_shapes_denoiser
from diffcap.purifiers import DiffCAP, DiffPure, bpda
from diffcap.samplers import DDIM, DDPMAncestral, ReverseSDE
from diffcap.unet import UNetModel
from diffcap.unet_blocks import _attention, _attention_sdpa
from tests.standins import Counting, TinyDenoiser, gens
from tests.test_denoisers import CKPT, TINY, _randomize
from tests.test_purifiers import PixelEncoder, smooth_images


class SizeEncoder(PixelEncoder):
    """PixelEncoder that records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        self.sizes.append(y.shape[0])
        return super().embed(y)


def _diffcap(den, enc, **kw) -> DiffCAP:
    return DiffCAP(den, **{"tau": 0.99, "encoder": "clip", "encoder_model": enc, "t_max": 0.095, **kw})


X6 = smooth_images([0.04, 0.03, 0.025, 0.02, 0.01, 0.0])


def test_call_sizes_arithmetic():
    assert perf.call_sizes([0, 3, 1, 3]) == [3, 2, 2]
    assert perf.call_sizes([]) == [] and perf.call_sizes([0, 0]) == []
    with pytest.raises(ValueError):
        perf.call_sizes([1, -1])
    assert perf.bound_seconds([3, 2, 2], {3: 0.3, 2: 0.25}) == pytest.approx(0.8)
    with pytest.raises(KeyError, match=r"\[1\]"):
        perf.bound_seconds([1, 2], {2: 1.0})
    assert perf.packed_bound(30, 16, 0.8) == pytest.approx(1.5)
    assert perf.ratio(1.0, 0.0) is None and perf.ratio(3.0, 2.0) == 1.5


@pytest.mark.parametrize("sampler", [DDIM(steps=90), ReverseSDE(), DDPMAncestral()])
def test_call_sizes_are_the_calls_diffcap_makes(sampler):
    """The bound counts exactly the batched calls of the reverse pass and of the walk, at their sizes."""
    den, enc = Counting(TinyDenoiser()), SizeEncoder()
    _, infos = _diffcap(den, enc, sampler=sampler).purify(X6, gens(6))
    assert len({i.denoiser_evals for i in infos}) >= 3  # partial batches really occur
    # the samplers may call in another order (late starters join as time passes): the multiset is the bound's
    assert sorted(n for n, _ in den.calls) == sorted(perf.call_sizes([i.denoiser_evals for i in infos]))
    assert enc.sizes == perf.call_sizes([i.encoder_evals for i in infos])


def test_unit_table_averages_the_measurements_around_a_block(monkeypatch):
    queue = iter([1.0, 2.0, 4.0, 3.0, 10.0])
    monkeypatch.setattr(perf, "median_seconds", lambda *a, **k: next(queue))
    table = perf.UnitTable(lambda n: (lambda: None))
    table.measure([2, 1, 2])  # distinct sizes in order: 1 -> 1.0, 2 -> 2.0
    table.measure([1])  # 1 -> 4.0
    assert table.unit() == {1: 2.5, 2: 2.0}
    table.measure([1, 2])  # 1 -> 3.0, 2 -> 10.0: only the last two of each count
    assert table.unit([2, 1]) == {1: 3.5, 2: 6.0}


def test_peak_memory_sees_an_allocation():
    with perf.peak_memory("cpu") as mem:
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del big
    if mem["peak_mib"] is None:
        pytest.skip("no /proc/self/status on this system")
    assert mem["peak_mib"] - mem["base_mib"] >= 48


# --------------------------------------------------------------------------------------------- speed options


def _unet_denoiser(seed: int = 0) -> Denoiser:
    den = Denoiser(UNetModel(**TINY))
    _randomize(den.unet, seed)
    return den.eval().requires_grad_(False)


def test_sdpa_kernel_is_guided_diffusions_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 16, 10, generator=g) for _ in range(3))  # (B * heads, ch, T)
    torch.testing.assert_close(_attention_sdpa(q, k, v), _attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{"attention": "sdpa"}, {"channels_last": True},
                                     {"attention": "sdpa", "channels_last": True}])
def test_exact_denoiser_options_keep_eps(options):
    """SDPA and channels_last compute the same function: eps within float32 reassociation (1e-5)."""
    x, t = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0.1, 0.5, 0.9])
    ref, fast = _unet_denoiser(), _unet_denoiser().set_speed(**options)
    assert any(getattr(m, "impl", None) == options.get("attention", "einsum") for m in fast.unet.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), ref(x, t), atol=1e-5, rtol=1e-5)
    assert fast.unet.state_dict().keys() == ref.unet.state_dict().keys()


def test_compile_option_calls_the_compiled_unet(monkeypatch):
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return lambda *a: module(*a) + 1.0  # distinguishable from the plain UNet
    monkeypatch.setattr(torch, "compile", fake_compile)
    den = _unet_denoiser()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([0.2])
    with torch.no_grad():
        plain = den(x, t)
        den.set_speed(compile=True)
        assert compiled == [den.unet] and "_compiled" not in dict(den.named_children())
        torch.testing.assert_close(den(x, t), plain + 1.0)


def test_bad_speed_options_are_refused():
    with pytest.raises(ValueError, match="denoiser.autocast"):
        _unet_denoiser().set_speed(autocast="float8")
    with pytest.raises(ValueError, match="denoiser.attention"):
        _unet_denoiser().set_speed(attention="flash")
    with pytest.raises(ValueError, match="reverse_grouping"):
        _diffcap(TinyDenoiser(), PixelEncoder(), reverse_grouping="never")


def test_bf16_autocast_stays_within_its_tolerance_with_ddim():
    """The README's tolerance for a precision option: no purified pixel moves by more than 1/255 (DDIM-10, the
    committed shapes denoiser; the reverse SDE exceeds it, which is why autocast is off by default)."""
    x = (0.5 + 0.3 * F.interpolate(torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7)),
                                   size=(64, 64), mode="bilinear")).clamp(0, 1)
    ref = DiffPure(load_shapes_denoiser(CKPT), sampler=DDIM(steps=10))
    fast = DiffPure(load_shapes_denoiser(CKPT, autocast="bfloat16"), sampler=DDIM(steps=10))
    y_ref, _ = ref.purify(x, gens(3))
    y_fast, _ = fast.purify(x, gens(3))
    change = float((y_ref - y_fast).abs().max())
    assert 0 < change <= 1 / 255


@pytest.mark.parametrize("grouping", ["start", "image"])
def test_reverse_grouping_gives_the_same_images(grouping):
    ref_den, den = Counting(TinyDenoiser()), Counting(TinyDenoiser())
    y_ref, i_ref = _diffcap(ref_den, PixelEncoder(), t_max=0.085).purify(X6, gens(6))
    assert len({i.t for i in i_ref}) < len(i_ref)  # some images share a start time (the cap), one group
    y, infos = _diffcap(den, PixelEncoder(), t_max=0.085, reverse_grouping=grouping).purify(X6, gens(6))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    assert [i.denoiser_evals for i in infos] == [i.denoiser_evals for i in i_ref]
    assert len(den.calls) > len(ref_den.calls)  # fewer images per call: what the benchmark measures
    evals, starts = [i.denoiser_evals for i in infos], [i.t for i in infos]
    assert sorted(n for n, _ in den.calls) == sorted(perf.grouped_call_sizes(evals, starts, grouping))
    assert perf.grouped_call_sizes(evals, starts, "rounds") == perf.call_sizes(evals)
    with pytest.raises(ValueError):
        perf.grouped_call_sizes(evals, starts, "never")


def test_reverse_groups_are_one_pass_per_start_time_or_image():
    """The grouping both the purifier and the bound use, spelled out (a wrong grouping would pass the call check
    above, since the calls and the bound would both follow it)."""
    starts = [0.1, 0.2, 0.1, 0.0]
    assert perf.reverse_groups(starts, "rounds") == [[0, 1, 2, 3]]
    assert perf.reverse_groups(starts, "start") == [[0, 2], [1], [3]]
    assert perf.reverse_groups(starts, "image") == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="grouping must be one of"):
        perf.reverse_groups(starts, "never")


def test_inference_mode_gives_the_same_images_and_bpda_still_differentiates():
    for make in (lambda **k: _diffcap(TinyDenoiser(), PixelEncoder(), **k),
                 lambda **k: DiffPure(TinyDenoiser(), sampler=DDIM(steps=3), **k)):
        y_ref, _ = make().purify(X6, gens(6))
        fast = make(inference_mode=True)
        y, _ = fast.purify(X6, gens(6))
        assert torch.equal(y, y_ref) and y.is_inference() and not y_ref.is_inference()
        x = X6.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(bpda(fast, x, gens(6)).sum(), x)
        assert torch.equal(g, torch.ones_like(x))


def test_reuse_embedding_skips_only_a_repeated_x0():
    enc_ref, enc = PixelEncoder(), PixelEncoder()
    ref, fast = _diffcap(TinyDenoiser(), enc_ref), _diffcap(TinyDenoiser(), enc, reuse_embedding=True)
    for draw in range(2):  # the runner purifies the same batch once per evaluation draw
        y_ref, i_ref = ref.purify(X6, gens(6, offset=10 * draw))
        y, infos = fast.purify(X6, gens(6, offset=10 * draw))
        assert torch.equal(y, y_ref) and [i.t for i in infos] == [i.t for i in i_ref]
        assert [i.encoder_evals for i in infos] == [i.encoder_evals - draw for i in i_ref]
    assert enc.rows == enc_ref.rows - 6
    _, other = fast.purify(X6.flip(0), gens(6))  # other pixels: computed again
    _, other_ref = ref.purify(X6.flip(0), gens(6))
    assert [i.encoder_evals for i in other] == [i.encoder_evals for i in other_ref]


def test_speed_switches_must_be_booleans():
    """A switch given as a string (YAML's "no" is truthy once quoted) is refused with the key to fix."""
    with pytest.raises(ValueError, match=r"^defense\.inference_mode must be true or false, got 'no'$"):
        DiffPure(TinyDenoiser(), inference_mode="no")
    with pytest.raises(ValueError, match=r"^defense\.reuse_embedding must be true or false, got 1$"):
        _diffcap(TinyDenoiser(), PixelEncoder(), reuse_embedding=1)
    with pytest.raises(ValueError, match=r"^denoiser\.compile must be true or false, got 'yes'$"):
        load_shapes_denoiser(CKPT, compile="yes")

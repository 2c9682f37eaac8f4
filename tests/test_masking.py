"""Masking properties on random shapes: counts, inverse restore, whole rows/columns for 2D modes."""
import pytest
import torch

from audiomae.masking import gather_tokens, mask_tokens, random_masking, structured_keep

SHAPES = [(1, 8, 1, 0.8), (3, 16, 8, 0.8), (2, 5, 3, 0.5), (4, 64, 8, 0.75), (2, 7, 9, 0.3)]


def _restore(m, x):
    B, L, D = x.shape
    masked = x.new_zeros(B, L - m.x.shape[1], D)
    return gather_tokens(torch.cat([m.x, masked], 1), m.ids_restore)


@pytest.mark.parametrize("B,T,F,ratio", SHAPES)
def test_unstructured(B, T, F, ratio):
    L = T * F
    x = torch.randn(B, L, 4)
    m = random_masking(x, ratio)
    keep = int(L * (1 - ratio))
    assert m.x.shape == (B, keep, 4)
    assert (m.mask.sum(1) == L - keep).all()
    # kept tokens are the ones with mask 0, and restore puts them back where they were
    restored = _restore(m, x)
    kept = m.mask == 0
    torch.testing.assert_close(restored[kept], x[kept])
    assert (restored[~kept] == 0).all()
    # ids_restore is the inverse permutation of the shuffle
    ids_shuffle = torch.argsort(m.ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :keep], m.ids_keep)
    assert (torch.gather(ids_shuffle, 1, m.ids_restore) == torch.arange(L)).all()
    assert (torch.gather(m.mask, 1, m.ids_keep) == 0).all()


def test_noise_reproduces_release_recipe():
    x = torch.randn(2, 12, 3)
    noise = torch.rand(2, 12)
    m = random_masking(x, 0.75, noise)
    ids_shuffle = torch.argsort(noise, 1)
    assert torch.equal(m.ids_keep, ids_shuffle[:, :3])
    assert torch.equal(m.ids_restore, torch.argsort(ids_shuffle, 1))
    ref = torch.ones(2, 12)
    ref[:, :3] = 0
    assert torch.equal(m.mask, torch.gather(ref, 1, m.ids_restore))
    with pytest.raises(ValueError, match="noise"):
        random_masking(x, 0.75, torch.rand(2, 11))


@pytest.mark.parametrize("mode", ["time", "frequency", "time_frequency"])
@pytest.mark.parametrize("B,T,F,ratio", SHAPES)
def test_structured_whole_lines(mode, B, T, F, ratio):
    x = torch.randn(B, T * F, 2)
    m = mask_tokens(x, (T, F), mode, ratio, t_ratio=ratio, f_ratio=0.5)
    grid = m.mask.view(B, T, F)
    rows_removed = grid.amin(2)  # a row counts as removed only when all its patches are
    cols_removed = grid.amin(1)
    kept_t = T - rows_removed.sum(1) if mode != "frequency" else torch.full((B,), T)
    kept_f = F - cols_removed.sum(1) if mode != "time" else torch.full((B,), F)
    # every patch is removed iff its row or its column is removed
    expect = torch.maximum(rows_removed[:, :, None], cols_removed[:, None, :])
    assert torch.equal(grid, expect)
    nt = max(1, int(T * (1 - ratio))) if mode != "frequency" else T
    nf = F if mode == "time" else max(1, int(F * (1 - (ratio if mode == "frequency" else 0.5))))
    assert (kept_t == nt).all() and (kept_f == nf).all()
    assert m.x.shape == (B, nt * nf, 2)
    restored = _restore(m, x)
    kept = m.mask == 0
    torch.testing.assert_close(restored[kept], x[kept])


def test_structured_noise_and_errors():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    keep = structured_keep(1, (4, 2), "time", 0.5, 0.0, noise=noise)
    assert keep.view(4, 2)[:, 0].tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match=r"\[B, 6\]"):
        structured_keep(1, (4, 2), "time_frequency", 0.5, 0.5, noise=noise)
    with pytest.raises(ValueError, match="mode"):
        structured_keep(1, (4, 2), "diagonal", 0.5, 0.5)


def test_model_masking_modes_run():
    from audiomae import AudioMAE, AudioMAEConfig
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    x = torch.randn(2, 1, 256, 128)
    for mode in ["time", "frequency", "time_frequency"]:
        out = model(x, mask_mode=mode)
        assert torch.isfinite(out.loss)
        g = out.mask.view(2, 16, 8)
        assert torch.equal(g, torch.maximum(g.amin(2, keepdim=True), g.amin(1, keepdim=True)))


def test_ties_keep_index_order_as_the_dispatched_op():
    """Equal noise values keep index order (a stable sort) in the reference the model calls, as in
    the dispatched op (audiomae.ops_cuda) and its CUDA kernel: a given noise gives one masking."""
    from audiomae import AudioMAE, AudioMAEConfig
    from audiomae.ops_cuda import random_masking_ids_reference
    from audiomae.reference.step import random_masking_ids

    ids_keep, ids_restore, mask = random_masking_ids(2, 128, 25, None, torch.zeros(2, 128))
    assert ids_keep.tolist() == [list(range(25))] * 2
    assert mask.tolist() == [[0.0] * 25 + [1.0] * 103] * 2
    torch.manual_seed(0)
    noise = torch.rand(4, 512).to(torch.bfloat16)  # quantised: many ties
    for a, b in zip(random_masking_ids(4, 512, 102, None, noise),
                    random_masking_ids_reference(4, 512, 102, None, noise)):
        assert torch.equal(a, b)
    m = random_masking(torch.randn(2, 128, 4), 0.8, torch.zeros(2, 128))
    assert m.ids_keep.tolist() == [list(range(25))] * 2
    model = AudioMAE(AudioMAEConfig.preset("tiny")).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 256, 128), noise=torch.zeros(1, 128))
    assert (out.mask[0] == 0).nonzero().flatten().tolist() == list(range(25))


@pytest.mark.parametrize("mode", ["time", "frequency", "time_frequency"])
def test_structured_ties_keep_index_order(mode):
    T, F = 32, 24
    n = {"time": T, "frequency": F, "time_frequency": T + F}[mode]
    keep = structured_keep(2, (T, F), mode, 0.5, 0.5, noise=torch.zeros(2, n)).view(2, T, F)
    kept_t = T if mode == "frequency" else T // 2  # all-equal noise: the first lines are kept
    kept_f = F if mode == "time" else F // 2
    assert keep.any(2).tolist() == [[t < kept_t for t in range(T)]] * 2
    assert keep.any(1).tolist() == [[f < kept_f for f in range(F)]] * 2


def test_masking_ratio_and_noise_errors():
    x = torch.randn(2, 16, 3)
    for bad in (-0.5, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
            random_masking(x, bad)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        random_masking(x, 0.5, [[0.1] * 16] * 2)
    with pytest.raises(ValueError, match=r"the time masking ratio must be in \[0, 1\]"):
        structured_keep(2, (4, 4), "time", 1.5, 0.5)
    with pytest.raises(ValueError, match=r"the frequency masking ratio must be in \[0, 1\]"):
        structured_keep(2, (4, 4), "time_frequency", 0.5, float("nan"))
    with pytest.raises(TypeError, match="noise for time masking must be a torch.Tensor"):
        structured_keep(2, (4, 4), "time", 0.5, 0.5, noise=[[0.1] * 4] * 2)
    assert structured_keep(2, (4, 4), "time", 1.0, 0.0).view(2, 4, 4).any(2).sum(1).tolist() == [1, 1]


def test_random_masking_ids_refuses_sizes_and_noise_it_cannot_use():
    """noise as a list was an AttributeError, a batch of -1 a RuntimeError from arange, 2.5 was cut to 2."""
    from audiomae.ops_cuda import random_masking_ids
    with pytest.raises(TypeError, match=r"noise must be a tensor \[B, L\], got list"):
        random_masking_ids(1, 3, 1, noise=[[0.3, 0.1, 0.2]])
    with pytest.raises(ValueError, match="batch must be a whole number of at least 0, got -1"):
        random_masking_ids(-1, 6, 2, seed=0)
    with pytest.raises(ValueError, match="batch must be a whole number, got 2.5"):
        random_masking_ids(2.5, 6, 2)
    assert random_masking_ids(2, 6, 2, seed=1)[0].shape == (2, 2)

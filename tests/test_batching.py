"""Caches say what they are: every layer cache joins (`concat`), keeps rows (`select_rows`), releases capacity
(`trim`) and grows (`reserve`) itself, so continuous batching (densa/serve/batching.py) is mixer-agnostic. The static
buffers keep the per-row behaviour of the old growing caches: a joined or trimmed row decodes what it would alone."""

import pytest
import torch
from conftest import tiny_model

from densa.model.cache import KVLayerCache, MegaLayerCache, Positions, slot_update, slots_write
from densa.serve.batching import concat_caches, drop_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def prefilled(model, n: int, seed: int):
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))
    cache = model.new_cache()
    token = model(ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    return cache, token


@pytest.mark.parametrize("mixer", ["mega", "attention"])
def test_joined_rows_decode_like_alone_and_leave(mixer):
    model = tiny_model(mixer=mixer)
    with torch.no_grad():
        (a, ta), (b, tb) = prefilled(model, 5, 1), (prefilled(model, 40, 2))
        alone = []
        for cache, token in ((prefilled(model, 5, 1)), (prefilled(model, 40, 2))):
            row = []
            for _ in range(12):
                token = model(token, cache=cache).logits[:, -1:].argmax(-1)
                row.append(int(token))
            alone.append(row)
        joined, token = concat_caches(a, b), torch.cat([ta, tb])
        got = [[], []]
        for _ in range(6):
            token = model(token, cache=joined).logits[:, -1:].argmax(-1)
            for i in range(2):
                got[i].append(int(token[i]))
        drop_rows(joined, [1])  # the short row leaves; the long one goes on alone
        token = token[1:]
        for _ in range(6):
            token = model(token, cache=joined).logits[:, -1:].argmax(-1)
            got[1].append(int(token[0]))
    assert got[0] == alone[0][:6] and got[1] == alone[1]


def test_layer_caches_carry_their_own_layout():
    mega, dense = tiny_model(), tiny_model(mixer="attention")
    assert all(isinstance(c, MegaLayerCache) for c in mega.new_cache().layers)
    assert all(isinstance(c, KVLayerCache) for c in dense.new_cache().layers)
    with torch.no_grad():
        m, _ = prefilled(mega, 40, 0)
        d, _ = prefilled(dense, 40, 0)
    ring = m.layers[0]
    assert ring.k.shape[2] == 16 and ring.k_pos[0].tolist() == [32 + s if s < 8 else 16 + s for s in range(16)]
    assert d.layers[0].k.shape[2] == 40
    with pytest.raises(TypeError, match="cannot join layer caches MegaLayerCache and KVLayerCache"):
        m.layers[0].concat(d.layers[0])
    with pytest.raises(ValueError, match="caches of different models"):
        concat_caches(m, dense.new_cache().__class__(d.layers[:1]))


def test_dense_capacity_doubles_and_is_released_when_rows_leave():
    model = tiny_model(mixer="attention")
    with torch.no_grad():
        (a, ta), (b, tb) = prefilled(model, 4, 1), prefilled(model, 60, 2)
        joined = concat_caches(a, b)
        assert joined.layers[0].k.shape[2] == 60  # the shorter row gets empty slots at the end
        token = torch.cat([ta, tb])
        model(token, cache=joined)
        assert joined.layers[0].capacity == 120  # a full cache doubles
        drop_rows(joined, [0])  # the long row leaves: position 5 is the furthest any remaining row reached
        assert joined.layers[0].k.shape[2] == 5 and joined.steps == 5
        before = joined.nbytes()
        model(ta, cache=joined)
        assert joined.nbytes() > before


def test_in_place_slot_write_equals_the_general_gather():
    """A padding-free multi-token write into a static K/V cache (slot = position) goes in place to its T slots
    (`slots_write`); it leaves the buffer exactly as the general gather (`slot_update`) would, for rows continuing
    from different positions, with the other slots untouched."""
    torch.manual_seed(0)
    buf = torch.randn(3, 2, 40, 5)
    new = torch.randn(3, 2, 6, 5)
    start = torch.tensor([0, 7, 30])
    pos = Positions(start[:, None] + torch.arange(6), None, start, 31)
    expected = slot_update(buf, new, pos, ring=False)
    slots_write(buf, new, pos)
    torch.testing.assert_close(buf, expected, atol=0, rtol=0)

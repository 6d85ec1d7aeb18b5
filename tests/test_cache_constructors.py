"""The cache classes take transformers 5.17's constructor arguments, with its defaults and meaning:
the same signatures, and each spelling decodes as transformers' cache of the same spelling does
(Llama, and Llama 4 whose chunked layers keep a window); offloading keeps a layer's keys/values on
the CPU between its updates (on a GPU, as transformers' offloaded caches, same tokens)."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

import herd
from herd.cache import Cache, DynamicCache, StaticCache
from tests.conftest import max_abs_diff, reference_llama, save_reference
from tests.models.llama4.test_modeling_llama4 import CHUNK, reference_llama4

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"llama": (reference, herd), "llama4": (...)}: Llama 4 with chunked layers of CHUNK positions."""
    folder = tmp_path_factory.mktemp("constructors")
    llama = reference_llama()
    llama4 = reference_llama4(interleave_moe_layer_step=2)
    llama4.save_pretrained(folder / "llama4")
    return {
        "llama": (llama, herd.LlamaForCausalLM.from_pretrained(save_reference(llama, folder / "llama"), progress=False)),
        "llama4": (llama4, herd.Llama4ForCausalLM.from_pretrained(folder / "llama4", progress=False)),
    }


@pytest.mark.parametrize("name", ["Cache", "DynamicCache", "StaticCache"])
def test_signatures_match_transformers(name):
    """transformers' parameters come first, in its order, with its defaults; herd's extras (StaticCache's
    max_batch_size, device, dtype) are keyword-only."""
    import transformers

    expected = list(inspect.signature(getattr(transformers, name).__init__).parameters.values())
    got = list(inspect.signature(getattr(herd, name).__init__).parameters.values())
    expected_named = [p for p in expected if p.kind is not p.VAR_KEYWORD]
    assert [p.name for p in got[: len(expected_named)]] == [p.name for p in expected_named]
    for theirs, ours in zip(expected_named, got):
        if theirs.default is not theirs.empty:
            assert ours.default == theirs.default, theirs.name
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in got[len(expected_named):])


# Each case: the constructor call, written once for both libraries (`lib` is transformers or herd).
SPELLINGS = {
    "DynamicCache()": lambda lib, config: lib.DynamicCache(),
    "DynamicCache(config=)": lambda lib, config: lib.DynamicCache(config=config),
    "DynamicCache(None, config)": lambda lib, config: lib.DynamicCache(None, config),
    "DynamicCache(config=, offloading=False, offload_only_non_sliding=True)":
        lambda lib, config: lib.DynamicCache(config=config, offloading=False, offload_only_non_sliding=True),
    "StaticCache(config, max_cache_len)": lambda lib, config: lib.StaticCache(config, 24),
    "StaticCache(config=, max_cache_len=, offloading=False)":
        lambda lib, config: lib.StaticCache(config=config, max_cache_len=24, offloading=False),
    "StaticCache(config=, max_cache_len=, offload_only_non_sliding=False)":
        lambda lib, config: lib.StaticCache(config=config, max_cache_len=24, offload_only_non_sliding=False),
}


def _decode(model, cache, ids, mask, prefill=7):
    """Logits of a prompt, then of one token at a time through `cache`."""
    with torch.no_grad():
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True)
        logits = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_each_spelling_decodes_as_transformers(models, family):
    import transformers

    reference, model = models[family]
    ids = torch.randint(3, 128, (2, 3 * CHUNK), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    real = mask.bool()
    for spelling, make in SPELLINGS.items():
        expected = _decode(reference, make(transformers, reference.config), ids, mask)
        ours = make(herd, model.config)
        got = _decode(model, ours, ids, mask)
        assert max_abs_diff(got[real], expected[real]) < TOL, spelling
        assert ours.get_seq_length() == ids.shape[1]


def test_dynamic_cache_from_ddp_data_continues_as_transformers(models):
    """ddp_cache_data: (keys, values) per layer, or (keys, values, window) as transformers' cache iterates."""
    import transformers

    reference, model = models["llama"]
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prefix = reference(ids[:, :6], use_cache=True).past_key_values
        data = [(layer.keys, layer.values) for layer in prefix.layers]
        expected = reference(ids[:, 6:], past_key_values=transformers.DynamicCache(data)).logits
        for entries in (data, [(*pair, None) for pair in data]):
            cache = DynamicCache(entries)
            assert cache.get_seq_length() == 6 and len(cache) == len(data)
            assert all(torch.equal(cache[i][0], keys) for i, (keys, _) in enumerate(data))
            assert max_abs_diff(model(ids[:, 6:], past_key_values=cache).logits, expected) < TOL
    keys, values = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    # that layer keeps its last window - 1 positions, as transformers' sliding-window layer does
    windowed = DynamicCache([(keys, values, torch.tensor(4))])
    reference_windowed = transformers.DynamicCache([(keys, values, torch.tensor(4))])
    assert windowed.windows == [4] and windowed.get_seq_length(0) == 6
    assert windowed.stored_length(0) == reference_windowed.layers[0].keys.shape[-2] == 3
    assert torch.equal(windowed[0][0], reference_windowed.layers[0].keys)


def test_iteration_gives_transformers_triples(models):
    """Iterating a DynamicCache gives (keys, values, window or None) per layer as transformers' does
    (Llama 4: its chunked layers' window), and those triples build the same cache again."""
    import transformers

    reference, model = models["llama4"]
    ids = torch.randint(3, 128, (1, CHUNK + 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = list(reference(ids, past_key_values=transformers.DynamicCache(config=reference.config)).past_key_values)
        ours = model(ids, past_key_values=DynamicCache(config=model.config)).past_key_values
    got = list(ours)
    assert len(got) == len(expected) and all(len(entry) == 3 for entry in got)
    for (keys, values, window), (ref_keys, ref_values, ref_window) in zip(got, expected):
        assert (window is None) == (ref_window is None)
        if window is not None:
            assert window.dtype == ref_window.dtype and int(window) == int(ref_window) == CHUNK
        # a chunked layer keeps its whole window, transformers' one position fewer: the last ones agree
        kept = ref_keys.shape[-2]
        assert keys.shape[-2] in (kept, kept + 1) and keys.shape[:2] == ref_keys.shape[:2]
        assert max_abs_diff(keys[..., -kept:, :], ref_keys) < TOL
        assert max_abs_diff(values[..., -kept:, :], ref_values) < TOL
    again = DynamicCache(got)
    assert [again._window(i) for i in range(len(got))] == [ours._window(i) for i in range(len(got))]
    assert all(torch.equal(again[i][0], keys) for i, (keys, _, _) in enumerate(got))
    assert [len(pair) for pair in ours.to_legacy_cache()] == [2] * len(got)


def test_config_given_first_is_the_config(models):
    """herd's earlier spelling, DynamicCache(model.config), still means config= (in transformers the
    first argument is ddp_cache_data)."""
    _, model = models["llama4"]
    assert DynamicCache(model.config).windows == DynamicCache(config=model.config).windows
    assert CHUNK in DynamicCache(model.config).windows


def test_refusals_and_ignored_arguments(models, caplog):
    _, model = models["llama"]
    with pytest.raises(ValueError, match=r"per-layer cache objects \(layers=...\).*DynamicCache\(config=...\)"):
        Cache(layers=[])
    with pytest.raises(ValueError, match="layer_class_to_replicate"):
        Cache(layer_class_to_replicate=object)
    with pytest.raises(TypeError, match="Cache is the interface"):
        Cache()
    with pytest.raises(TypeError):
        DynamicCache(config=model.config, max_cache_len=4)  # as in transformers: not a DynamicCache argument
    with caplog.at_level(logging.WARNING, logger="herd.cache"):
        cache = StaticCache(config=model.config, max_cache_len=8, layer_device_map={0: "cpu"})
    assert "layer_device_map" in caplog.text and cache.max_cache_len == 8
    # herd's older arguments keep their meaning
    cache = StaticCache(model.config, 8, max_batch_size=2, dtype=torch.float16)
    with torch.no_grad():
        model(torch.tensor([[4, 5], [6, 7]]), past_key_values=cache)
    assert cache.key_cache[0].shape[:3] == (2, 2, 8) and cache.key_cache[0].dtype == torch.float16
    with pytest.raises(ValueError, match="does not fit a StaticCache made for 2"):
        StaticCache(model.config, 8, max_batch_size=2).update(torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8), 0)


def test_offloading_moves_each_layer_around_its_update(models, monkeypatch):
    """On the CPU the moves are no-ops; which layers move, and when, is what transformers does:
    every layer of a DynamicCache (offload_only_non_sliding=False), only the full layers of a
    StaticCache (True), the chunked layers' windows staying put."""
    _, model = models["llama4"]
    config = model.config
    moves = []
    original = Cache._move_layer

    def recording(cache, layer_idx, device):
        moves.append((layer_idx, str(device)))
        original(cache, layer_idx, device)

    monkeypatch.setattr(Cache, "_move_layer", recording)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    full_layers = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    cases = {
        "dynamic": (DynamicCache(config=config, offloading=True), range(config.num_hidden_layers)),
        "dynamic, only non-sliding": (DynamicCache(config=config, offloading=True, offload_only_non_sliding=True),
                                      full_layers),
        "static": (StaticCache(config=config, max_cache_len=12, offloading=True), full_layers),
        "static, sliding too": (StaticCache(config, 12, True, False), range(config.num_hidden_layers)),
    }
    expected = _decode(model, DynamicCache(config=config), ids, mask)
    for label, (cache, moved_layers) in cases.items():
        moves.clear()
        got = _decode(model, cache, ids, mask)
        assert max_abs_diff(got, expected) < TOL, label
        steps = ids.shape[1] - 7 + 1
        assert moves == [(layer, "cpu") for _ in range(steps) for layer in moved_layers for _ in range(2)], label


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_offloaded_caches_on_cuda(models, tmp_path, kind):
    """Between steps an offloaded layer's keys/values are in CPU memory; the tokens are those of the
    cache kept on the GPU, and of transformers' offloaded cache."""
    import transformers

    reference, _ = models["llama4"]
    reference.save_pretrained(tmp_path / "ckpt")
    model = herd.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt", device_map="cuda", progress=False)
    reference = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt").cuda().eval()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0)).cuda()

    def make(lib, config, offloading):
        if kind == "dynamic":
            return lib.DynamicCache(config=config, offloading=offloading)
        return lib.StaticCache(config=config, max_cache_len=6 + 3 * CHUNK, offloading=offloading)

    kwargs = dict(max_new_tokens=3 * CHUNK, do_sample=False, eos_token_id=None, pad_token_id=0)
    resident = model.generate(ids, past_key_values=make(herd, model.config, False), **kwargs)
    offloaded_cache = make(herd, model.config, True)
    offloaded = model.generate(ids, past_key_values=offloaded_cache, **kwargs)
    assert torch.equal(offloaded, resident)
    if kind == "dynamic":  # (transformers 5.17's Llama 4 fails to build its masks over a StaticCache)
        expected = reference.generate(ids, past_key_values=make(transformers, reference.config, True), **kwargs)
        assert torch.equal(offloaded, expected)
    chunked = [kind == "chunked_attention" for kind in model.config.layer_types]
    stores = offloaded_cache if kind == "dynamic" else offloaded_cache._windowed
    for layer, is_chunked in enumerate(chunked):
        source = stores if is_chunked else offloaded_cache
        device = "cuda" if is_chunked and kind == "static" else "cpu"
        assert source.key_cache[layer].device.type == device, layer

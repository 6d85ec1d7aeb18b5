"""from_pretrained / config API inputs where herd used to differ from transformers (the oracle):
loading info, ignore_mismatched_sizes, config overrides and unused kwargs, tied weights as the
checkpoint holds them, resizing an untied vocabulary, a config object passed in."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import herd
from herd.loading import CheckpointError
from tests.conftest import max_abs_diff, reference_llama, save_reference

transformers.logging.set_verbosity_error()
IDS = torch.tensor([[3, 4, 5, 6, 7]])


def _edit(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference(reference_llama(), tmp_path_factory.mktemp("audit") / "ckpt")


def _both(path, cls_name="LlamaForCausalLM", **kwargs):
    theirs = getattr(transformers, cls_name).from_pretrained(path, **kwargs)
    ours = getattr(herd, cls_name).from_pretrained(path, progress=False, **kwargs)
    return theirs, ours


EDITS = {
    "missing": lambda t: t.pop("model.norm.weight"),
    "unexpected": lambda t: t.update({"model.extra.weight": torch.zeros(2)}),
    "mismatched": lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}),
}


@pytest.mark.parametrize("case", ["clean", "missing", "unexpected", "mismatched", "fewer_layers", "other_head"])
def test_output_loading_info_as_transformers(tmp_path, folder, case):
    import shutil

    path = folder
    kwargs, cls_name = {"output_loading_info": True}, "LlamaForCausalLM"
    if case in EDITS:
        path = _edit(shutil.copytree(folder, tmp_path / case), EDITS[case])
    if case == "mismatched":
        kwargs["ignore_mismatched_sizes"] = True
    elif case == "fewer_layers":
        kwargs["num_hidden_layers"] = 1
    elif case == "other_head":
        cls_name = "LlamaForSequenceClassification"
    (theirs, their_info), (ours, our_info) = _both(path, cls_name, **kwargs)
    assert our_info == their_info
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    if case in ("clean", "unexpected", "fewer_layers"):  # every weight loaded: same outputs
        with torch.no_grad():
            assert max_abs_diff(ours(IDS).logits, theirs(IDS).logits) < 1e-4
    if case == "mismatched":  # the others loaded as in the file, the mismatched one fresh (init std 0.02)
        fresh = ours.model.layers[0].self_attn.k_proj.weight
        assert fresh.shape == (16, 32) and 0.005 < fresh.std().item() < 0.05
        assert torch.equal(ours.model.layers[0].self_attn.q_proj.weight, theirs.model.layers[0].self_attn.q_proj.weight)


def test_mismatch_without_ignore_is_still_an_error_named_once(tmp_path, folder):
    import shutil

    path = _edit(shutil.copytree(folder, tmp_path / "m"), EDITS["mismatched"])
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.LlamaForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True") as error:
        herd.LlamaForCausalLM.from_pretrained(path, progress=False)
    assert "missing" not in str(error.value)  # the weight is mismatched, not also missing
    _, ours = _both(path, ignore_mismatched_sizes=True)
    assert ours.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)


@pytest.mark.parametrize("how", ["kwarg", "config object"])
def test_fewer_layers_than_the_checkpoint(folder, how):
    if how == "kwarg":
        theirs, ours = _both(folder, num_hidden_layers=1)
    else:
        configs = [lib.AutoConfig.from_pretrained(folder) for lib in (transformers, herd)]
        for config in configs:
            config.num_hidden_layers = 1
        theirs = transformers.LlamaForCausalLM.from_pretrained(folder, config=configs[0])
        ours = herd.LlamaForCausalLM.from_pretrained(folder, config=configs[1], progress=False)
    assert len(ours.model.layers) == len(theirs.model.layers) == 1
    with torch.no_grad():
        assert max_abs_diff(ours(IDS).logits, theirs(IDS).logits) < 1e-4


def test_config_object_passed_in_is_not_changed(folder):
    ours_config = herd.AutoConfig.from_pretrained(folder)
    theirs_config = transformers.AutoConfig.from_pretrained(folder)
    before = ours_config.to_dict()
    ours = herd.AutoModelForCausalLM.from_pretrained(folder, config=ours_config, attn_implementation="eager",
                                                     num_hidden_layers=1, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, config=theirs_config, attn_implementation="eager")
    assert (ours.config is ours_config) == (theirs.config is theirs_config) == False  # noqa: E712
    assert ours_config._attn_implementation == theirs_config._attn_implementation  # left unset
    assert ours_config.to_dict() == before and ours.config.num_hidden_layers == 1


def test_use_safetensors_false_is_refused(folder):
    with pytest.raises(ValueError, match="use_safetensors=False.*never loads"):
        herd.LlamaForCausalLM.from_pretrained(folder, use_safetensors=False, progress=False)


@pytest.mark.parametrize("case", ["only_lm_head", "both_different"])
def test_tied_config_with_lm_head_in_the_file(tmp_path, case):
    reference = reference_llama(tie_word_embeddings=True)
    path = save_reference(reference, tmp_path / "ckpt")
    if case == "only_lm_head":  # transformers 5 ties the embeddings to the weight that is there
        _edit(path, lambda t: t.update({"lm_head.weight": t.pop("model.embed_tokens.weight")}))
    else:  # both there with other values: transformers 5 keeps them apart
        _edit(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    theirs, ours = _both(path)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == (theirs.lm_head.weight is theirs.model.embed_tokens.weight)
    with torch.no_grad():
        assert max_abs_diff(ours(IDS).logits, theirs(IDS).logits) < 1e-4
    ours.save_pretrained(tmp_path / "out")  # what herd writes, transformers reads back the same
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert max_abs_diff(back(IDS).logits, theirs(IDS).logits) < 1e-4


@pytest.mark.parametrize("tie", [False, True])
def test_resize_token_embeddings_then_save_loads_in_transformers(tmp_path, tie):
    path = save_reference(reference_llama(tie_word_embeddings=tie), tmp_path / "ckpt")
    theirs, ours = _both(path)
    for model in (theirs, ours):
        model.resize_token_embeddings(150)
    assert ours.lm_head.weight.shape == theirs.lm_head.weight.shape == (150, 32)
    ours.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[3, 140, 5, 149]])
    with torch.no_grad():
        assert max_abs_diff(back(ids).logits, ours(ids).logits) == 0
        assert max_abs_diff(theirs(ids).logits, ours(ids).logits) < 1e-3  # transformers' new rows: mean plus tiny noise


def test_config_kwargs_and_return_unused_kwargs(folder):
    kwargs = dict(num_hidden_layers=3, foo=1, torch_dtype=torch.bfloat16, return_unused_kwargs=True)
    for loader in ("AutoConfig", "LlamaConfig"):
        theirs, their_unused = getattr(transformers, loader).from_pretrained(folder, **kwargs)
        ours, our_unused = getattr(herd, loader).from_pretrained(folder, **kwargs)
        assert our_unused == their_unused == {"foo": 1}
        assert not hasattr(ours, "foo") and not hasattr(ours, "return_unused_kwargs")
        assert ours.num_hidden_layers == theirs.num_hidden_layers == 3
        assert ours.dtype == str(theirs.dtype).removeprefix("torch.") == "bfloat16"
    assert herd.LlamaConfig.from_pretrained(folder, name_or_path="x").name_or_path == "x" == \
        transformers.LlamaConfig.from_pretrained(folder, name_or_path="x").name_or_path
    # without return_unused_kwargs the unknown key is dropped too
    assert not hasattr(herd.AutoConfig.from_pretrained(folder, foo=1), "foo")
    theirs, their_unused = transformers.LlamaConfig.from_dict(transformers.AutoConfig.from_pretrained(folder).to_dict(),
                                                              hidden_size=64, bar=2, return_unused_kwargs=True)
    ours, our_unused = herd.LlamaConfig.from_dict(herd.AutoConfig.from_pretrained(folder).to_dict(), hidden_size=64,
                                                  bar=2, return_unused_kwargs=True)
    assert our_unused == their_unused == {"bar": 2} and ours.hidden_size == theirs.hidden_size == 64


@pytest.mark.parametrize("name, kwargs", [("LlamaConfig", dict(vocab_size=64, num_labels=3, pad_token_id=5)),
                                          ("Llama4TextConfig", dict(hidden_size=64)),
                                          ("Llama4Config", dict(text_config=dict(hidden_size=64)))])
def test_to_diff_dict_keys_as_transformers(name, kwargs):
    theirs, ours = getattr(transformers, name)(**kwargs).to_diff_dict(), getattr(herd, name)(**kwargs).to_diff_dict()
    theirs.pop("transformers_version"), ours.pop("herd_version")
    # herd's LlamaConfig still carries rope_theta beside rope_parameters; Llama 4's composite config and its vision
    # part carry bos/eos/pad (models/, not this audit's files)
    extra = {"rope_theta", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"}
    assert set(theirs) <= set(ours) and set(ours) - set(theirs) <= extra
    assert {k: v for k, v in ours.items() if k in theirs and not isinstance(v, dict)} == \
        {k: v for k, v in theirs.items() if not isinstance(v, dict)}
    if "text_config" in theirs:
        assert theirs["text_config"] == ours["text_config"]

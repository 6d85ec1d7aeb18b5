"""BatchEncoding: what a tokenizer call returns.
"""

from __future__ import annotations

import copy

import pytest
import torch

from herd.tokenization import BatchEncoding
from tests.tokenization.common import llama31  # noqa: F401  (fixture)


def test_batch_encoding_access(llama31):
    herd_tok, ref_tok = llama31
    encoding = herd_tok(["Hello world", "Hi there"], return_tensors="pt")
    assert isinstance(encoding, BatchEncoding) and isinstance(encoding, dict)
    assert encoding.input_ids is encoding["input_ids"] and encoding.input_ids.dtype == torch.int64
    assert encoding.to("cpu") is encoding and encoding.attention_mask.device.type == "cpu"
    assert encoding.tokens(0) == ref_tok(["Hello world", "Hi there"]).tokens(0)
    assert encoding[0].ids == encoding.input_ids[0].tolist()
    assert encoding.char_to_token(0, 6) == ref_tok(["Hello world", "Hi there"]).char_to_token(0, 6)
    with pytest.raises(AttributeError):
        _ = encoding.not_a_key
    assert dict(herd_tok("Hi")) == {"input_ids": [128000, 13347], "attention_mask": [1, 1]}
    copied = copy.deepcopy(encoding)
    assert copied.input_ids.tolist() == encoding.input_ids.tolist() and copied.tokens(1) == encoding.tokens(1)
    assert encoding[:1]["input_ids"].tolist() == [encoding.input_ids[0].tolist()]


def test_batch_encoding_and_batch_feature_share_their_base():
    from herd.image_utils import BatchFeature
    from herd.tokenization.encodings import BatchDict

    for cls in (BatchEncoding, BatchFeature):
        out = cls({"input_ids": [[1, 2]], "scores": [[0.5, 1.5]], "empty": [[]]}, tensor_type="pt")
        assert isinstance(out, BatchDict) and out.data == dict(out) and out.scores is out["scores"]
        assert out.input_ids.dtype == out.empty.dtype == torch.int64
        with pytest.raises(ValueError, match="padding=True"):
            cls({"ids": [[1, 2], [3]]}, tensor_type="pt")
        assert cls({"ids": [[1, 2], [3]]}, tensor_type="np")["ids"].dtype == object
    # What is each one's own: a processor output casts its floating point tensors, a tokenizer
    # output takes a device only (as in transformers) and leaves a dtype unapplied.
    features = BatchFeature({"input_ids": [[1]], "scores": [[0.5]]}, tensor_type="pt").to(torch.float16)
    assert features.scores.dtype == torch.float16 and features.input_ids.dtype == torch.int64
    encoding = BatchEncoding({"input_ids": [[1]], "scores": [[0.5]]}, tensor_type="pt").to(torch.float16)
    assert encoding.scores.dtype == torch.float32

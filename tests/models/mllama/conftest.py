"""The Mllama tests run transformers' MllamaVisionModel as the reference. transformers' own
MllamaVisionEncoder.forward calls its layers with `hidden_state=` (modeling_mllama.py,
`encoder_layer(hidden_state=hidden_states, ...)`), a keyword its MllamaVisionEncoderLayer.forward
marks deprecated with @deprecate_kwarg, so every reference vision forward emits a FutureWarning
("`hidden_state` is deprecated ... Use `hidden_states` instead") that no caller can avoid: neither
herd's code nor these tests pass that keyword. The warning is silenced here, for exactly that
message and only in these tests; any other FutureWarning still shows (or fails under -W error)."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent
_TRANSFORMERS_OWN_DEPRECATION = "ignore:`hidden_state` is deprecated:FutureWarning"


def pytest_collection_modifyitems(items):
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.filterwarnings(_TRANSFORMERS_OWN_DEPRECATION))

"""AttentionMaskVisualizer: the printed grids against hand-computed visibility for causal, chunked
(Llama 4), Llama 4 image tokens and Mllama cross-attention masks, and against transformers'
printed rows for a causal model. Only config.json, the tokenizer and the processor files are
written: the visualizer never reads weights."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from herd.utils.attention_visualizer import GREEN, RESET, YELLOW, AttentionMaskVisualizer
from tests.conftest import SHARED_DATA

SENTENCE = "Hello world, how are you doing today"
NOBOS = SHARED_DATA / "tokenizers" / "llama3-nobos"
ROW = re.compile(r"^(?P<label>.*): +(?P<index>\d+) (?P<cells>[■⬚ |]+)$")


def _plain(text: str) -> str:
    for code in (GREEN, YELLOW, RESET, "\033[1m", "\033[0m"):
        text = text.replace(code, "")
    return text


def grid_rows(text: str) -> list[tuple[str, list[list[bool]]]]:
    """(label, one list of cells per panel) for every token row of the printed text."""
    rows = []
    for line in _plain(text).splitlines():
        match = ROW.match(line)
        if match:
            panels = [[cell == "■" for cell in part.split()] for part in match["cells"].split("|")]
            rows.append((match["label"].strip(), panels))
    return rows


def _folder(tmp_path, config, tokenizer=NOBOS):
    config.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, tmp_path / name)
    return tmp_path


def test_causal_rows_are_hand_computed_and_match_transformers(tmp_path, capsys):
    import transformers
    from transformers.utils.attention_visualizer import AttentionMaskVisualizer as Reference

    folder = _folder(tmp_path, transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=32, vocab_size=128256))
    AttentionMaskVisualizer(folder)(SENTENCE)
    ours = capsys.readouterr().out
    rows = grid_rows(ours)
    tokens = transformers.AutoTokenizer.from_pretrained(NOBOS).tokenize(SENTENCE)
    assert [label for label, _ in rows] == [repr(token) for token in tokens]  # a row per token
    for i, (_, panels) in enumerate(rows):
        assert len(panels) == 1
        assert panels[0] == [j <= i for j in range(len(tokens))]
    Reference(str(folder))(SENTENCE)
    reference = capsys.readouterr().out
    # transformers ends each row with an empty second panel ("    |    "); the rows are otherwise the same text
    reference_rows = [line.rstrip().removesuffix("|").rstrip() for line in reference.splitlines() if "■" in line][1:]
    our_rows = [line for line in ours.splitlines() if "■" in line][1:]  # [0] is the legend
    assert our_rows == reference_rows


def test_llama4_chunked_panel(tmp_path):
    import transformers

    chunk = 3
    config = transformers.Llama4TextConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=8, intermediate_size=16,
                                           intermediate_size_mlp=32, num_local_experts=2, vocab_size=128256,
                                           attention_chunk_size=chunk)
    text = AttentionMaskVisualizer(_folder(tmp_path, config)).render(SENTENCE)
    assert f"Chunked Attention Mask (chunk {chunk})" in text
    rows = grid_rows(text)
    assert len(rows) > 2 * chunk
    for i, (_, (full, chunked)) in enumerate(rows):
        assert full == [j <= i for j in range(len(rows))]
        assert chunked == [j <= i and j // chunk == i // chunk for j in range(len(rows))]


def _mllama_folder(tmp_path):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    tokenizer.pad_token = "<|end_of_text|>"
    tokenizer.save_pretrained(tmp_path)
    transformers.MllamaImageProcessor(size={"height": 56, "width": 56}, max_image_tiles=4).save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "processor_class": "MllamaProcessor"}))
    transformers.MllamaConfig(text_config=dict(num_hidden_layers=2, cross_attention_layers=[1], hidden_size=16,
                                               num_attention_heads=2, num_key_value_heads=1, intermediate_size=32),
                              vision_config=dict(image_size=56, max_num_tiles=4), image_token_index=128256
                              ).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mllama_cross_attention_panel(tmp_path):
    from PIL import Image

    visualizer = AttentionMaskVisualizer(_mllama_folder(tmp_path))
    wide = Image.new("RGB", (112, 40))  # two tiles side by side of a four-tile canvas
    text = visualizer.render("Look at <img> this picture", image=wide)
    rows = grid_rows(text)
    image_row = [label for label, _ in rows].index("'<|image|>'")
    assert f"{YELLOW}'<|image|>'" in text  # the image token's label
    for i, (_, (causal, cross)) in enumerate(rows):
        assert causal == [j <= i for j in range(len(rows))]
        # tokens before the image see none of its tiles; from the image token on, its two real tiles
        assert cross == ([False] * 4 if i < image_row else [True, True, False, False])


def test_llama4_image_tokens_are_marked(tmp_path):
    import transformers
    from transformers.models.llama4 import processing_llama4

    from herd.models.llama4 import Llama4ImageProcessorFast
    from tests.models.llama4.test_processing_llama4 import LLAMA4_TOKENS

    tokenizer = transformers.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA4_TOKENS})
    tokenizer.pad_token = "<|end_of_text|>"
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(processing_llama4.chat_template)
    Llama4ImageProcessorFast(size={"height": 56, "width": 56}, max_patches=1).save_pretrained(tmp_path)
    patch = tokenizer.convert_tokens_to_ids("<|patch|>")
    transformers.Llama4Config(
        text_config=dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         intermediate_size=16, intermediate_size_mlp=32, num_local_experts=2, vocab_size=len(tokenizer),
                         attention_chunk_size=5),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=56, patch_size=14, vision_output_dim=16, projector_input_dim=16,
                           projector_output_dim=16),
        image_token_index=patch).save_pretrained(tmp_path)
    text = AttentionMaskVisualizer(tmp_path).render("See <img> here")
    rows = grid_rows(text)
    is_image = [label == "'<|patch|>'" for label, _ in rows]
    assert sum(is_image) == 4  # (56 / 14)^2 patches, pixel shuffle 0.5
    lines = [line for line in text.splitlines() if ROW.match(_plain(line))]
    for i, line in enumerate(lines):
        # image tokens' labels and their cells towards other image tokens are yellow (and only those)
        assert line.startswith(YELLOW) == is_image[i]
        first_panel = line.split("    |    ")[0]
        assert first_panel.count(f"{YELLOW}■") == (sum(is_image[: i + 1]) if is_image[i] else 0)
    for i, (_, (causal, chunked)) in enumerate(rows):
        assert causal == [j <= i for j in range(len(rows))]
        assert chunked == [j <= i and j // 5 == i // 5 for j in range(len(rows))]


def test_a_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    import transformers

    transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises((OSError, ValueError), match="tokenizer"):
        AttentionMaskVisualizer(tmp_path).render("hi")

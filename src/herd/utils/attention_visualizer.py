"""Print which tokens each token of a sentence may attend to, from a model folder's config.

    from herd.utils.attention_visualizer import AttentionMaskVisualizer
    AttentionMaskVisualizer("meta-llama/Llama-3.2-1B")("The cat sat on the mat")

One row per token (its label, its index, then a cell per key: ■ sees it, ⬚ does not, the
diagonal in green), as transformers' visualizer prints it. What is drawn is herd's own rule,
not a copy of it: the masks come from `layers.attention.build_attention_mask` (the description
every attention backend realises; the rule itself is `decoding.visibility`), so the picture is
what the model computes.

- Every model: the causal mask of the full-attention layers.
- Llama 4 text: a second panel with its chunked layers' mask (a token sees only the earlier
  tokens of its own chunk of `attention_chunk_size` positions).
- Image models (a folder with a processor): the sentence's `<img>` (or the model's own image
  token) becomes an image; Llama 4's image tokens sit in the sequence and are drawn in yellow;
  Llama 3.2 Vision (Mllama) adds a cross-attention panel: which of the image's tiles each text
  token sees (a token before the first image sees none: its cross-attention output is zeroed).
  Without a given image a blank one is used (the masks depend on where the image token is and
  how many tiles it makes, not on the pixels); transformers downloads a photo instead.
"""

from __future__ import annotations

import os
from typing import Any

import torch

GREEN = "\033[92m"
YELLOW = "\033[93m"
RESET = "\033[0m"
BLACK_SQUARE = "■"
WHITE_SQUARE = "⬚"
PANEL_SEPARATOR = "    |    "


def _cell(allowed: bool, diagonal: bool = False, image: bool = False) -> str:
    if allowed and image:
        return f"{YELLOW}{BLACK_SQUARE}{RESET}"
    if diagonal:
        return f"{GREEN}{BLACK_SQUARE}{RESET}"
    return BLACK_SQUARE if allowed else WHITE_SQUARE


def self_attention_rows(allowed: torch.Tensor, is_image: list[bool]) -> list[str]:
    """One string of cells per query row of allowed (seq, seq); image-to-image cells in yellow."""
    seq = allowed.shape[0]
    return [" ".join(_cell(bool(allowed[i, j]), i == j, is_image[i] and is_image[j]) for j in range(seq))
            for i in range(seq)]


def index_header(count: int) -> list[str]:
    """The column indices written vertically: one line per digit."""
    width = len(str(count))
    digits = [str(index).rjust(width) for index in range(count)]
    return [" ".join(column[line] for column in digits) for line in range(width)]


def render_grid(tokens: list[str], panels: list[tuple[str, list[str], list[str]]], is_image: list[bool]) -> str:
    """tokens: row labels; panels: (title, column header lines, one cell string per row)."""
    label_width = max(len(repr(token)) for token in tokens)
    indent = " " * (label_width + 5)
    widths = [len(_visible_text(rows[0])) if rows else 0 for _, _, rows in panels]
    lines = [f" {GREEN}{BLACK_SQUARE}{RESET}: i == j (diagonal)   {YELLOW}{BLACK_SQUARE}{RESET}: image tokens",
             (indent + PANEL_SEPARATOR.join(title.ljust(width) for (title, _, _), width in zip(panels, widths))).rstrip()]
    for line in range(max(len(header) for _, header, _ in panels)):
        parts = [(header[line] if line < len(header) else "").ljust(width) for (_, header, _), width in zip(panels, widths)]
        lines.append((indent + PANEL_SEPARATOR.join(parts)).rstrip())
    for i, token in enumerate(tokens):
        label = repr(token).ljust(label_width)
        if is_image[i]:
            label = f"{YELLOW}{label}{RESET}"
        cells = PANEL_SEPARATOR.join(rows[i] for _, _, rows in panels)
        lines.append(f"{label}: {str(i).rjust(2)} {cells}")
    return "\n".join(lines)


def _visible_text(text: str) -> str:
    for code in (GREEN, YELLOW, RESET):
        text = text.replace(code, "")
    return text


def blank_image(size: int = 64):
    """A plain grey image: the masks depend on where the image goes and its tiles, not its pixels."""
    from PIL import Image

    return Image.new("RGB", (size, size), (128, 128, 128))


class AttentionMaskVisualizer:
    """`AttentionMaskVisualizer(folder_or_hub_id)("a sentence")` prints the attention masks of the
    model's layer kinds for that sentence (see the module docstring). `render(...)` returns the
    same text instead of printing it."""

    def __init__(self, model_name: str | os.PathLike, **hub_kwargs: Any):
        from ..auto import AutoConfig

        self.repo_id = str(model_name)
        self.hub_kwargs = hub_kwargs
        self.config = AutoConfig.from_pretrained(model_name, **hub_kwargs)
        text = self.config.get_text_config()
        layer_types = getattr(text, "layer_types", None) or []
        self.chunk_size = getattr(text, "attention_chunk_size", None) if "chunked_attention" in layer_types else None
        self.has_images = getattr(self.config, "vision_config", None) is not None
        self.image_token = "<img>"

    def __call__(self, input_sentence: str, suffix: str = "", image: Any = None) -> None:
        self.visualize_attention_mask(input_sentence, suffix=suffix, image=image)

    def visualize_attention_mask(self, input_sentence: str, suffix: str = "", image: Any = None) -> None:
        print(self.render(input_sentence + suffix, image=image))

    def _class_name(self) -> str:
        from ..auto import AutoModel, AutoModelForImageTextToText

        for auto in (AutoModel, AutoModelForImageTextToText):
            try:
                return auto._class_for(self.config).__name__
            except (KeyError, ValueError):
                continue
        return type(self.config).__name__

    def _encode(self, sentence: str, image: Any) -> tuple[dict[str, torch.Tensor], list[str], list[bool]]:
        """(the tokenizer's or processor's tensors, the token strings, which tokens are image tokens)."""
        from ..auto import AutoProcessor
        from ..tokenization import AutoTokenizer

        if self.has_images:
            processor = AutoProcessor.from_pretrained(self.repo_id, **self.hub_kwargs)
            tokenizer = processor.tokenizer
            model_image_token = getattr(processor, "image_token", None) or "<|image|>"
            sentence = sentence.replace(self.image_token, model_image_token)
            images = None
            if model_image_token in sentence:
                images = [image if image is not None else blank_image()] * sentence.count(model_image_token)
            inputs = processor(images=images, text=sentence, return_tensors="pt")
            # Llama 4: image features replace the config's image_token_index tokens (<|patch|>);
            # Mllama: the <|image|> token stands for the image its cross-attention layers read.
            image_id = getattr(self.config, "image_token_index", None)
            if image_id is None or self.config.model_type == "mllama":
                image_id = tokenizer.convert_tokens_to_ids(model_image_token)
        else:
            tokenizer = AutoTokenizer.from_pretrained(self.repo_id, **self.hub_kwargs)
            inputs = tokenizer(sentence, return_tensors="pt")
            image_id = None
        ids = inputs["input_ids"][0].tolist()
        tokens = tokenizer.convert_ids_to_tokens(ids)
        return dict(inputs), tokens, [token_id == image_id for token_id in ids]

    def masks(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{panel title: allowed (seq, seq or image tiles)} for this input, from herd's mask rule."""
        from ..layers.attention import build_attention_mask

        attention_mask = inputs.get("attention_mask")
        seq = inputs["input_ids"].shape[1]

        def self_attention(chunk_size: int | None) -> torch.Tensor:
            description = build_attention_mask(attention_mask, batch_size=1, query_length=seq, past_length=0,
                                               kv_length=seq, chunk_size=chunk_size)
            return description.boolean(torch.device("cpu"))[0, 0]  # (seq, seq)

        panels = {"Attention Matrix": self_attention(None)}
        if self.chunk_size is not None:
            panels[f"Chunked Attention Mask (chunk {self.chunk_size})"] = self_attention(self.chunk_size)
        cross = inputs.get("cross_attention_mask")
        if cross is not None:  # (1, seq, images, tiles): which tiles of which image each token sees
            panels["Cross-Attention (image tiles)"] = cross[0].reshape(seq, -1).bool()
        return panels

    def render(self, input_sentence: str, image: Any = None) -> str:
        """The text `__call__` prints."""
        inputs, tokens, is_image = self._encode(input_sentence, image)
        panels = []
        for title, allowed in self.masks(inputs).items():
            if title.startswith("Cross"):
                images, tiles = inputs["cross_attention_mask"].shape[2:]
                header = [" ".join(f"{image_index}" for image_index in range(images) for _ in range(tiles)),
                          " ".join(f"{tile}" for _ in range(images) for tile in range(tiles))]
                rows = [" ".join(_cell(bool(seen)) for seen in row) for row in allowed]
            else:
                header = index_header(len(tokens))
                rows = self_attention_rows(allowed, is_image)
            panels.append((title, header, rows))
        title = f"  Attention visualization for \033[1m{self.config.model_type}:{self.repo_id}\033[0m {self._class_name()}"
        border = "##" * (len(title) // 2 + 4)
        box = [border, "##" + title.center(len(border) - 4) + "##", border]
        return "\n".join(["", *box, render_grid(tokens, panels, is_image), border])


__all__ = ["AttentionMaskVisualizer"]

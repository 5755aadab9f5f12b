"""VisionLLM: camelid.LLM for a vision model; every text method also takes `image=` (a path, bytes or PIL image).

    llm = camelid.load("out/vision/hf")              # a folder written by `camelid vision train`
    llm.generate("What colour is the circle?", image="picture.png")      # -> "red"
    llm.chat([{"role": "user", "content": "What is in the picture?"}], image="picture.png")

Without an image a request runs on the text model alone, exactly as it would without the vision parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from camelid.llm import LLM, Message
from camelid.vision.image import ImageSource, load_image
from camelid.vision.prompt import conversation_ids


@dataclass
class VisionLLM(LLM):
    def stream(self, prompt: str | list[int], *, image: ImageSource | None = None,  # type: ignore[override]
               **kwargs: Any) -> Iterator[str]:
        """LLM.stream, looking at `image` (see the module docstring)."""
        if image is None:
            yield from super().stream(prompt, **kwargs)
            return
        model = self.model
        pixels = load_image(image, model.vision_config.vit.image_size)
        ids = prompt if isinstance(prompt, list) else self.encode_prompt(prompt, kwargs.pop("add_bos", None))
        with model.image(pixels):  # the image's keys and values (or tokens) are computed once, here
            yield from super().stream(model.with_image_tokens(ids), **kwargs)

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """The conversation in the format the vision model was trained on (camelid/vision/prompt.py), not the
        text model's chat template."""
        return conversation_ids(self._need_tokenizer(), messages)

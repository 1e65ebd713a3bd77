"""What the DiT is conditioned on: the prompt through Llama and CLIP-L, the start image through SigLIP.

As the official FramePack app computes it:
  - Llama (llava-llama-3-8b): the prompt inside the HunyuanVideo prompt template, at most 256 prompt tokens after the
    template, hidden states of layer -3; the template's own tokens are cropped off, so what is left is the prompt's
    tokens and the template's closing <|eot_id|> (when the prompt was not truncated).
  - CLIP-L: `pooler_output` of the bare prompt, padded or truncated to 77 tokens.
  - The negative prompt: encoded only when real CFG is above 1 (the official's zeros are never used otherwise).
  - SigLIP (flux_redux_bfl): `last_hidden_state` of the start image through its image processor.
The official app pads the Llama embeddings to 512 tokens with a mask; the DiT would crop that padding off again, so
the engine hands over the prompt's tokens alone (no mask, and no device-to-host copy of its length at each step).
"""

from __future__ import annotations

import gc
import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from framepack_engine.official import CLIP_MAX_TOKENS, LLAMA_HIDDEN_STATE_INDEX, PROMPT_TOKEN_LIMIT
from framepack_engine.errors import FramePackError, FramePackWarning
from framepack_engine.models.checkpoints import (DEFAULT_DTYPES, load_clip_text_encoder, load_llama_text_encoder, load_siglip_image_encoder)

# HunyuanVideo's video prompt template; the prompt goes where "{}" is.
HUNYUAN_VIDEO_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
# The official app hard-codes PROMPT_TEMPLATE_TOKENS (framepack_engine.official) for the llava-llama-3 tokenizer; we
# measure it from whichever tokenizer is loaded (`template_crop_start`).


@dataclass(frozen=True)
class PromptEmbedding:
    """One encoded prompt: treat the tensors as read-only, the encoder's cache shares them."""

    llama: torch.Tensor  # (1, tokens, llama hidden size): the prompt's tokens only, template cropped off
    clip_pooled: torch.Tensor  # (1, clip hidden size)

    @property
    def tokens(self) -> int:
        return self.llama.shape[1]

    def to(self, device=None, dtype=None) -> PromptEmbedding:
        return PromptEmbedding(self.llama.to(device=device, dtype=dtype),
                               self.clip_pooled.to(device=device, dtype=dtype))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def template_crop_start(tokenizer, template: str = HUNYUAN_VIDEO_PROMPT_TEMPLATE) -> int:
    """How many tokens the template puts before the prompt, counting the begin-of-text token the tokenizer adds."""
    prefix = template.split("{}", 1)[0]
    return len(tokenizer(prefix, add_special_tokens=True)["input_ids"])


@torch.no_grad()
def encode_llama(prompt: str, model, tokenizer, template: str = HUNYUAN_VIDEO_PROMPT_TEMPLATE,
                 max_prompt_tokens: int = PROMPT_TOKEN_LIMIT, crop_start: int | None = None) -> torch.Tensor:
    """Llama hidden states (layer -3) of the prompt's tokens inside the template: (1, tokens, hidden)."""
    if crop_start is None:
        crop_start = template_crop_start(tokenizer, template)
    text = template.format(prompt)
    inputs = tokenizer(
        [text], padding="max_length", max_length=max_prompt_tokens + crop_start, truncation=True,
        return_tensors="pt", return_attention_mask=True)
    full_length = len(tokenizer(text)["input_ids"])
    if full_length > max_prompt_tokens + crop_start:
        warnings.warn(FramePackWarning(
            f"The prompt is {full_length - crop_start} tokens long and the text encoder keeps the first "
            f"{max_prompt_tokens} (the official limit): the rest is ignored; shorten the prompt to use all of it."),
            stacklevel=2)
    device = _device_of(model)
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs["attention_mask"].to(device)
    # Right padding puts every real token before the first pad, so the prompt is the span [crop_start, length).
    length = int(attention_mask.sum())
    if not bool(attention_mask[0, :length].all()):
        raise FramePackError("The Llama tokenizer pads on the left: set its padding_side to 'right'.")
    hidden_states = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    return hidden_states[LLAMA_HIDDEN_STATE_INDEX][:, crop_start:length]


@torch.no_grad()
def encode_clip_pooled(prompt: str, model, tokenizer, max_tokens: int = CLIP_MAX_TOKENS) -> torch.Tensor:
    """CLIP-L's pooled output of the bare prompt: (1, hidden)."""
    input_ids = tokenizer([prompt], padding="max_length", max_length=max_tokens, truncation=True,
                          return_tensors="pt")["input_ids"]
    return model(input_ids.to(_device_of(model)), output_hidden_states=False).pooler_output


def encode_prompt(prompt: str, llama_model, llama_tokenizer, clip_model, clip_tokenizer,
                  template: str = HUNYUAN_VIDEO_PROMPT_TEMPLATE, max_prompt_tokens: int = PROMPT_TOKEN_LIMIT,
                  crop_start: int | None = None) -> PromptEmbedding:
    """The official `encode_prompt_conds`: Llama layer -3 of the templated prompt, and CLIP-L's pooled output."""
    if not isinstance(prompt, str):
        raise FramePackError(f"A prompt must be a string, not {type(prompt).__name__}: pass the text itself.")
    llama = encode_llama(prompt, llama_model, llama_tokenizer, template, max_prompt_tokens, crop_start)
    return PromptEmbedding(llama, encode_clip_pooled(prompt, clip_model, clip_tokenizer))


def _as_rgb_uint8(image) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image
    described = (f"an array of shape {image.shape} and dtype {image.dtype}" if isinstance(image, np.ndarray)
                 else f"a {type(image).__name__}")
    raise FramePackError(
        f"The image must be a uint8 (height, width, 3) RGB array or a PIL image, got {described}: "
        "load it with numpy.asarray(PIL.Image.open(path).convert('RGB')).")


@torch.no_grad()
def encode_image(image, processor, model) -> torch.Tensor:
    """SigLIP's last hidden state of an RGB image (uint8 HxWx3 array or PIL image): (1, tokens, hidden)."""
    pixels = processor.preprocess(images=_as_rgb_uint8(image), return_tensors="pt")["pixel_values"]
    parameter = next(model.parameters())
    return model(pixel_values=pixels.to(device=parameter.device, dtype=parameter.dtype)).last_hidden_state


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TextEncoder:
    """Llama + CLIP-L prompt encoding with a cache by prompt text, so repeated section prompts are encoded once.

    After `release()` the models are dropped (cached prompts are still served).
    """

    def __init__(self, llama_model, llama_tokenizer, clip_model, clip_tokenizer, *,
                 template: str = HUNYUAN_VIDEO_PROMPT_TEMPLATE, max_prompt_tokens: int = PROMPT_TOKEN_LIMIT,
                 crop_start: int | None = None, cache_size: int = 32):
        if max_prompt_tokens < 1:
            raise FramePackError(
                f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}: pass a positive count.")
        self.llama_model, self.llama_tokenizer = llama_model, llama_tokenizer
        self.clip_model, self.clip_tokenizer = clip_model, clip_tokenizer
        # The crop at the attention length needs real tokens first and pads after (llava-llama-3's own setting).
        self.llama_tokenizer.padding_side = "right"
        if self.llama_tokenizer.pad_token is None:
            self.llama_tokenizer.pad_token = self.llama_tokenizer.eos_token
        self.template = template
        self.max_prompt_tokens = max_prompt_tokens
        self.crop_start = template_crop_start(llama_tokenizer, template) if crop_start is None else crop_start
        self.cache_size = cache_size
        self._cache: OrderedDict[str, PromptEmbedding] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    @classmethod
    def from_pretrained(cls, source: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = DEFAULT_DTYPES["text_encoder"], allow_download: bool | None = None,
                        cache_dir: str | Path | None = None, **options) -> TextEncoder:
        """Both encoders from a HunyuanVideo-layout source (repo id or folder with text_encoder*/ tokenizer*/)."""
        llama_model, llama_tokenizer = load_llama_text_encoder(source, dtype, device, allow_download, cache_dir)
        clip_model, clip_tokenizer = load_clip_text_encoder(source, dtype, device, allow_download, cache_dir)
        return cls(llama_model, llama_tokenizer, clip_model, clip_tokenizer, **options)

    @property
    def loaded(self) -> bool:
        return self.llama_model is not None

    def encode(self, prompt: str) -> PromptEmbedding:
        """The prompt's embeddings, from the cache when this text was encoded before."""
        if not isinstance(prompt, str):
            raise FramePackError(f"A prompt must be a string, not {type(prompt).__name__}: pass the text itself.")
        cached = self._cache.get(prompt)
        if cached is not None:
            self.cache_hits += 1
            self._cache.move_to_end(prompt)
            return cached
        if not self.loaded:
            raise FramePackError(
                "The text encoders were released before this prompt was encoded: keep them loaded "
                "(release_encoders=False) or encode every prompt before releasing them.")
        self.cache_misses += 1
        embedding = encode_prompt(prompt, self.llama_model, self.llama_tokenizer, self.clip_model,
                                  self.clip_tokenizer, self.template, self.max_prompt_tokens, self.crop_start)
        if self.cache_size > 0:
            self._cache[prompt] = embedding
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding

    def cache_info(self) -> dict:
        return {"hits": self.cache_hits, "misses": self.cache_misses, "size": len(self._cache),
                "capacity": self.cache_size}

    def clear_cache(self) -> None:
        self._cache.clear()

    def release(self) -> None:
        """Drop the models so their memory can be freed; cached prompts stay available."""
        self.llama_model = None
        self.clip_model = None
        _free_memory()


class ImageEncoder:
    """SigLIP image embedding of the start (or end) frame, with a small cache by image content so a released encoder
    still serves the images it has seen (the black frame of text-to-video, a start image used again)."""

    def __init__(self, processor, model, cache_size: int = 4):
        self.processor = processor
        self.model = model
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @classmethod
    def from_pretrained(cls, source: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = DEFAULT_DTYPES["image_encoder"], allow_download: bool | None = None,
                        cache_dir: str | Path | None = None) -> ImageEncoder:
        """From a flux_redux_bfl-layout source (repo id or folder with feature_extractor/ and image_encoder/)."""
        processor, model = load_siglip_image_encoder(source, dtype, device, allow_download, cache_dir)
        return cls(processor, model)

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def encode(self, image) -> torch.Tensor:
        pixels = _as_rgb_uint8(image)
        key = (pixels.shape, hashlib.sha256(pixels.tobytes()).hexdigest())
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if not self.loaded:
            raise FramePackError("The image encoder was released before this image was encoded: keep it loaded "
                                 "(release_encoders=False) or create a new engine to encode new images.")
        embedding = encode_image(pixels, self.processor, self.model)
        if self.cache_size > 0:
            self._cache[key] = embedding
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding

    def release(self) -> None:
        """Drop the model so its memory can be freed; cached images stay available."""
        self.model = None
        _free_memory()

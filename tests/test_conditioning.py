"""Text and image conditioning against independent oracles on tiny random models.

Oracles: diffusers' FramePack pipeline (its Llama / CLIP prompt encoders called on the same tiny models), the raw
`tokenizers` library for the template crop, and transformers' SigLIP processor + model for the image embedding.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from framepack_engine.models.conditioning import (
    HUNYUAN_VIDEO_PROMPT_TEMPLATE,
    ImageEncoder,
    TextEncoder,
    encode_image,
    template_crop_start,
)
from framepack_engine.errors import FramePackError, FramePackWarning
from tests.fixtures import flux_redux_folder, hunyuan_video_base_folder  # noqa: F401 (pytest fixtures)
from tests.utils import TOLERANCE, assert_relative_error, relative_error

PROMPT = "a cat walks on the grass, the camera pans left"
NEGATIVE = "ugly, blurry, low quality"


@pytest.fixture(scope="module")
def oracle(hunyuan_video_base_folder):
    """The tiny text models loaded straight through transformers, float32, wrapped the way diffusers' pipeline
    methods expect `self` to look."""
    from transformers import CLIPTextModel, CLIPTokenizer, LlamaModel, PreTrainedTokenizerFast

    folder = hunyuan_video_base_folder
    return SimpleNamespace(
        text_encoder=LlamaModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval(),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer"),
        text_encoder_2=CLIPTextModel.from_pretrained(folder / "text_encoder_2", dtype=torch.float32).eval(),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        _execution_device=torch.device("cpu"),
    )


@pytest.fixture(scope="module")
def encoder(hunyuan_video_base_folder):
    return TextEncoder.from_pretrained(hunyuan_video_base_folder, dtype=torch.float32)


def diffusers_llama(oracle, prompt, crop_start, max_sequence_length=256):
    """diffusers' FramePack pipeline Llama encoding, cropped to the attention length as the official app does."""
    from diffusers import HunyuanVideoFramepackPipeline

    with torch.no_grad():
        embeddings, mask = HunyuanVideoFramepackPipeline._get_llama_prompt_embeds(
            oracle, prompt, {"template": HUNYUAN_VIDEO_PROMPT_TEMPLATE, "crop_start": crop_start},
            device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=max_sequence_length)
    tokens = int(mask.sum())
    assert bool(mask[0, :tokens].all())
    return embeddings[:, :tokens]


def diffusers_clip(oracle, prompt):
    from diffusers import HunyuanVideoFramepackPipeline

    with torch.no_grad():
        return HunyuanVideoFramepackPipeline._get_clip_prompt_embeds(
            oracle, prompt, device=torch.device("cpu"), dtype=torch.float32)


def raw_tokenizer(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer" / "tokenizer.json"))


def test_template_crop_leaves_exactly_the_prompt_tokens(encoder, hunyuan_video_base_folder):
    tokenizer = raw_tokenizer(hunyuan_video_base_folder)
    crop_start = template_crop_start(encoder.llama_tokenizer)
    assert crop_start == encoder.crop_start
    ids = tokenizer.encode(HUNYUAN_VIDEO_PROMPT_TEMPLATE.format(PROMPT)).ids
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    # What survives the crop: the prompt's own tokens and the template's closing <|eot_id|>.
    assert ids[crop_start:] == prompt_ids + [tokenizer.token_to_id("<|eot_id|>")]
    # What is cropped: the begin-of-text token and the template up to the prompt.
    prefix = HUNYUAN_VIDEO_PROMPT_TEMPLATE.split("{}")[0]
    assert tokenizer.decode(ids[:crop_start], skip_special_tokens=False) == "<|begin_of_text|>" + prefix
    assert encoder.encode(PROMPT).tokens == len(prompt_ids) + 1


def test_llama_embeddings_match_diffusers_pipeline(encoder, oracle):
    embedding = encoder.encode(PROMPT)
    expected = diffusers_llama(oracle, PROMPT, encoder.crop_start)
    assert embedding.llama.shape == expected.shape
    assert_relative_error(embedding.llama, expected, TOLERANCE[torch.float32], "llama layer -3")
    # The comparison can fail: another layer, or a crop off by one token, is far off.
    with torch.no_grad():
        other_layer = oracle.text_encoder(
            **oracle.tokenizer([HUNYUAN_VIDEO_PROMPT_TEMPLATE.format(PROMPT)], return_tensors="pt"),
            output_hidden_states=True).hidden_states[-2][:, encoder.crop_start:]
    assert relative_error(embedding.llama, other_layer) > 100 * TOLERANCE[torch.float32]
    cropped_one_more = diffusers_llama(oracle, PROMPT, encoder.crop_start + 1)
    assert relative_error(embedding.llama[:, :-1], cropped_one_more) > 100 * TOLERANCE[torch.float32]


def test_clip_pooled_matches_diffusers_pipeline(encoder, oracle):
    embedding = encoder.encode(PROMPT)
    expected = diffusers_clip(oracle, PROMPT)
    assert embedding.clip_pooled.shape == expected.shape == (1, 32)
    assert_relative_error(embedding.clip_pooled, expected, TOLERANCE[torch.float32], "clip pooled")
    assert relative_error(embedding.clip_pooled, diffusers_clip(oracle, NEGATIVE)) > 100 * TOLERANCE[torch.float32]


def test_prompt_is_limited_to_256_tokens(encoder, oracle):
    long_prompt = " ".join(["a girl dances gracefully with nice motion"] * 60)  # several hundred tokens
    with pytest.warns(FramePackWarning, match="keeps the first 256"):
        embedding = encoder.encode(long_prompt)
    assert embedding.tokens == 256
    expected = diffusers_llama(oracle, long_prompt, encoder.crop_start)
    assert_relative_error(embedding.llama, expected, TOLERANCE[torch.float32], "truncated prompt")
    # A smaller limit is honoured the same way.
    short = TextEncoder(encoder.llama_model, encoder.llama_tokenizer, encoder.clip_model, encoder.clip_tokenizer,
                        max_prompt_tokens=5)
    with pytest.warns(FramePackWarning, match="keeps the first 5"):
        assert short.encode(long_prompt).tokens == 5
    assert_relative_error(short.encode(long_prompt).llama, embedding.llama[:, :5], TOLERANCE[torch.float32])


def test_a_prompt_within_the_limit_gives_no_warning(encoder):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FramePackWarning)
        encoder.encode("a cat walks on the grass")


def test_empty_prompt_keeps_the_closing_token(encoder):
    # The official app's default negative prompt is empty: one token (<|eot_id|>) survives the crop.
    assert encoder.encode("").tokens == 1


def test_prompts_are_cached_by_text(hunyuan_video_base_folder, encoder):
    cached = TextEncoder(encoder.llama_model, encoder.llama_tokenizer, encoder.clip_model, encoder.clip_tokenizer,
                         cache_size=2)
    first = cached.encode("a cat")
    assert cached.encode("a cat") is first
    assert (cached.cache_hits, cached.cache_misses) == (1, 1)
    cached.encode("a dog")
    cached.encode("the moon")  # evicts the least recently used, "a cat"
    assert cached.cache_info() == {"hits": 1, "misses": 3, "size": 2, "capacity": 2}
    again = cached.encode("a cat")
    assert cached.cache_misses == 4 and again is not first
    assert torch.equal(again.llama, first.llama) and torch.equal(again.clip_pooled, first.clip_pooled)
    # Section prompts: each distinct text is encoded once.
    sections = TextEncoder(encoder.llama_model, encoder.llama_tokenizer, encoder.clip_model, encoder.clip_tokenizer)
    positives = [sections.encode(prompt) for prompt in ["a cat", "a dog", "a cat", "a cat", "a dog"]]
    assert sections.cache_misses == 2 and sections.cache_hits == 3
    assert positives[0] is positives[2]


def test_release_drops_models_but_keeps_cached_prompts(encoder):
    releasing = TextEncoder(encoder.llama_model, encoder.llama_tokenizer, encoder.clip_model, encoder.clip_tokenizer)
    positives = [releasing.encode(prompt) for prompt in ("a cat", "a dog")]
    assert releasing.loaded
    releasing.release()
    assert not releasing.loaded and releasing.llama_model is None and releasing.clip_model is None
    assert releasing.encode("a dog") is positives[1]
    with pytest.raises(FramePackError, match="released"):
        releasing.encode("something new")


def test_bad_prompts_raise_clear_errors(encoder):
    with pytest.raises(FramePackError, match="string"):
        encoder.encode(["a cat"])


@pytest.fixture(scope="module")
def image_oracle(flux_redux_folder):
    from transformers import SiglipImageProcessor, SiglipVisionModel

    processor = SiglipImageProcessor.from_pretrained(flux_redux_folder / "feature_extractor")
    model = SiglipVisionModel.from_pretrained(flux_redux_folder / "image_encoder", dtype=torch.float32).eval()
    return processor, model


def test_image_embedding_matches_transformers(flux_redux_folder, image_oracle):
    processor, model = image_oracle
    image = np.random.default_rng(0).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    encoder = ImageEncoder.from_pretrained(flux_redux_folder, dtype=torch.float32)
    embedding = encoder.encode(image)
    with torch.no_grad():
        expected = model(**processor.preprocess(images=image, return_tensors="pt")).last_hidden_state
    assert embedding.shape == expected.shape == (1, 16, 32)
    assert_relative_error(embedding, expected, TOLERANCE[torch.float32], "siglip last hidden state")
    # A PIL image gives the same embedding as its array.
    assert_relative_error(encoder.encode(Image.fromarray(image)), expected, TOLERANCE[torch.float32], "from PIL")
    # The comparison can fail: a changed patch of the image moves the embedding.
    changed = image.copy()
    changed[:16, :16] = 255 - changed[:16, :16]
    assert relative_error(encoder.encode(changed), expected) > 100 * TOLERANCE[torch.float32]
    # The free function is the same computation.
    assert torch.equal(encode_image(image, encoder.processor, encoder.model), embedding)


def test_bad_images_raise_clear_errors(flux_redux_folder):
    encoder = ImageEncoder.from_pretrained(flux_redux_folder, dtype=torch.float32)
    for bad in (np.zeros((8, 8, 3), dtype=np.float32), np.zeros((8, 8), dtype=np.uint8),
                np.zeros((8, 8, 4), dtype=np.uint8), torch.zeros(8, 8, 3, dtype=torch.uint8), "image.png"):
        with pytest.raises(FramePackError, match="uint8"):
            encoder.encode(bad)
    encoder.release()
    with pytest.raises(FramePackError, match="released"):
        encoder.encode(np.zeros((8, 8, 3), dtype=np.uint8))


def test_default_dtypes_are_the_official_fp16(hunyuan_video_base_folder, flux_redux_folder, encoder):
    half = TextEncoder.from_pretrained(hunyuan_video_base_folder)
    assert half.llama_model.dtype == torch.float16 and half.clip_model.dtype == torch.float16
    embedding = half.encode(PROMPT)
    assert embedding.llama.dtype == torch.float16
    reference = encoder.encode(PROMPT)
    assert_relative_error(embedding.llama.float(), reference.llama, TOLERANCE[torch.float16], "fp16 llama")
    assert_relative_error(embedding.clip_pooled.float(), reference.clip_pooled, TOLERANCE[torch.float16], "fp16 clip")
    assert ImageEncoder.from_pretrained(flux_redux_folder).model.dtype == torch.float16

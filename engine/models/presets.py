"""Model presets built in memory with random weights: no download, any machine.

`tiny` runs the whole engine (text and image encoders, DiT, VAE, samplers, section loops, video output) in seconds
on a CPU. Its weights are random, so its videos are noise: it exists to exercise and demonstrate the engine.
`small` keeps the real block structure at a reduced width (for CPU timing) and `full` is the real 13B
configuration (for benchmarks on a GPU); neither is meant for generation without real weights.
"""

from __future__ import annotations

import math

import torch

from framepack_engine.errors import FramePackError
from framepack_engine.official import OFFICIAL_DIT_CONFIG, VAE_SCALING_FACTOR

TINY_DIT_CONFIG = {
    "in_channels": 16, "out_channels": 16, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
    "num_single_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 2, "patch_size_t": 1,
    "qk_norm": "rms_norm", "guidance_embeds": True, "text_embed_dim": 32, "pooled_projection_dim": 16,
    "rope_theta": 256.0, "rope_axes_dim": [4, 6, 6], "has_image_proj": True, "image_proj_dim": 16,
    "has_clean_x_embedder": True,
}
FULL_DIT_CONFIG = {key: value for key, value in OFFICIAL_DIT_CONFIG.items() if not key.startswith("_")}
SMALL_DIT_CONFIG = {**FULL_DIT_CONFIG, "num_attention_heads": 8}  # the real blocks at a third of the width
DIT_PRESETS = {"tiny": TINY_DIT_CONFIG, "small": SMALL_DIT_CONFIG, "full": FULL_DIT_CONFIG}

TINY_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1, "norm_num_groups": 4, "spatial_compression_ratio": 8, "temporal_compression_ratio": 4,
    "mid_block_add_attention": True, "scaling_factor": VAE_SCALING_FACTOR,
}
# The preset's default output: 9 frames-per-window sections at a small size.
TINY_RESOLUTION = 64

_CORPUS = [
    "a cat walks on the grass in the sun", "a woman dances gracefully in a red dress", "the camera pans over a city",
    "a man jumps and waves at the camera", "waves crash on a rocky shore at sunset", "astronaut on the moon walking",
    "Describe the video by detailing the following aspects: main content theme color shape size texture quantity",
    "text spatial relationships objects actions events behaviors temporal physical movement changes background",
    "environment light style atmosphere camera angles movements transitions used in the video system user",
]
_LLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<pad>"]


def randomize_weights_(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.5,
                       norm_spread: float = 0.1, bias_scale: float = 0.05):
    """Random weights that let every layer act (default inits leave adaptive gates near zero): matrices
    N(0, scale^2 / fan_in), so activations keep their size through many blocks; 1-D weights (the norms') around 1
    with spread `norm_spread`; biases N(0, bias_scale^2). Each tensor is drawn in float32 on the parameter's device
    (the generator's) and cast there, so the same seed gives the same weights in any dtype and a large model is never
    built on the host. Parameters on the meta device (shapes only) are left as they are."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.is_meta:
                continue
            values = torch.randn(parameter.shape, generator=generator, device=parameter.device, dtype=torch.float32)
            if parameter.ndim >= 2:
                values *= scale / math.sqrt(math.prod(parameter.shape[1:]))
            elif name.endswith("weight"):
                values = values.mul_(norm_spread).add_(1.0)
            else:
                values *= bias_scale
            parameter.copy_(values)
            del values
    return module


def tiny_llama_tokenizer():
    """A byte-level BPE tokenizer with Llama 3's special tokens, trained in memory on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=_LLAMA_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS, trainer)
    begin = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", begin)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<pad>", padding_side="right")


def tiny_clip_tokenizer():
    """A word-level stand-in for CLIP's tokenizer: lower-cased words, start and end tokens, 77 positions."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for line in _CORPUS for word in line.lower().replace(":", " ").split()})
    vocabulary = {"<|unknown|>": 0, **{word: i + 1 for i, word in enumerate(words)}}
    vocabulary["<|startoftext|>"] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)  # last, as in CLIP, so the pooled token is found by argmax
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<|unknown|>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocabulary["<|startoftext|>"]), ("<|endoftext|>", vocabulary["<|endoftext|>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|unknown|>", model_max_length=77)


def tiny_text_encoder(generator: torch.Generator):
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from framepack_engine.models.conditioning import TextEncoder

    llama_tokenizer, clip_tokenizer = tiny_llama_tokenizer(), tiny_clip_tokenizer()
    llama = LlamaModel(LlamaConfig(
        vocab_size=len(llama_tokenizer), hidden_size=TINY_DIT_CONFIG["text_embed_dim"], intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        pad_token_id=llama_tokenizer.pad_token_id, bos_token_id=llama_tokenizer.bos_token_id,
        eos_token_id=llama_tokenizer.eos_token_id))
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=TINY_DIT_CONFIG["pooled_projection_dim"], intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        eos_token_id=clip_tokenizer.eos_token_id, bos_token_id=clip_tokenizer.bos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id))
    randomize_weights_(llama, generator, 0.5)
    randomize_weights_(clip, generator, 0.5)
    return TextEncoder(llama.eval(), llama_tokenizer, clip.eval(), clip_tokenizer)


def tiny_image_encoder(generator: torch.Generator):
    import transformers
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from framepack_engine.models.conditioning import ImageEncoder

    # The PIL processor (what the official app used) where transformers has one; it needs no torchvision.
    processor_class = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    processor = processor_class(size={"height": 32, "width": 32}, do_normalize=True,
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    model = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=TINY_DIT_CONFIG["image_proj_dim"], intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, image_size=32, patch_size=8))
    randomize_weights_(model, generator, 0.5)
    return ImageEncoder(processor, model.eval())


def tiny_dit(generator: torch.Generator, config: dict | None = None):
    from framepack_engine.models.dit import FramePackDiT

    model = FramePackDiT.from_config(config or TINY_DIT_CONFIG)
    return randomize_weights_(model, generator, 0.5).eval()


def tiny_vae(generator: torch.Generator):
    from framepack_engine.models.vae import HunyuanVideoVAE

    return randomize_weights_(HunyuanVideoVAE.from_config(TINY_VAE_CONFIG, device="cpu"), generator, 1.0).eval()


def build_preset_engine(engine_class, name: str = "tiny", variant: str = "bidirectional", device="cpu", seed: int = 0):
    """An Engine of random weights. Only `tiny` can generate (its sizes fit a CPU); see the module docstring."""
    if name != "tiny":
        raise FramePackError(
            f"Preset {name!r} is for benchmarks (framepack bench --preset {name}); generation presets: tiny.")
    generator = torch.Generator().manual_seed(seed)
    transformer = tiny_dit(generator).to(device)
    return engine_class(
        transformer=transformer, vae=tiny_vae(generator).to(device),
        text_encoder=tiny_text_encoder(generator), image_encoder=tiny_image_encoder(generator), variant=variant,
        device=device, dtype=torch.float32, name="preset:tiny", default_resolution=TINY_RESOLUTION,
        notice="Preset 'tiny' uses random weights: it exercises the whole engine and its video is noise.")

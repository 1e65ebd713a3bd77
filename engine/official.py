"""The official numbers of FramePack's models, written once: every module that needs one imports it from here.

Imports nothing of ours, so any wing may import it. Sources: lllyasviel/FramePack (demo_gradio.py,
diffusers_helper/hunyuan.py, diffusers_helper/bucket_tools.py), the config.json files of lllyasviel/FramePackI2V_HY,
hunyuanvideo-community/HunyuanVideo and lllyasviel/flux_redux_bfl.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- Text ------------------------------------------------------------------------------------------------------------
# Two official numbers, often confused: the app encodes at most PROMPT_TOKEN_LIMIT prompt tokens after the HunyuanVideo
# template (`encode_prompt_conds(max_length=256)`), then crops or pads the Llama states to DIT_TEXT_PADDED_TOKENS with a
# mask for the DiT (`crop_or_pad_yield_mask(length=512)`). We hand the DiT the valid tokens only (the padding would be
# cropped off again before the token refiner), so the DiT receives at most PROMPT_TOKEN_LIMIT text tokens.
PROMPT_TOKEN_LIMIT = 256
DIT_TEXT_PADDED_TOKENS = 512
PROMPT_TEMPLATE_TOKENS = 95  # the template's tokens the app crops off (with begin-of-text), llava-llama-3 tokenizer
CLIP_MAX_TOKENS = 77
LLAMA_HIDDEN_STATE_INDEX = -3  # the third-to-last hidden state: two layers before the final (normed) output

# ---- Image -----------------------------------------------------------------------------------------------------------
SIGLIP_IMAGE_TOKENS = 729  # SigLIP so400m at 384 px: a 27 x 27 grid of 14-pixel patches

# ---- VAE -------------------------------------------------------------------------------------------------------------
VAE_SPATIAL_COMPRESSION = 8  # pixels per latent along height and width
VAE_TEMPORAL_COMPRESSION = 4  # pixel frames per latent frame (the first latent frame holds a single pixel frame)
VAE_SCALING_FACTOR = 0.476986
VAE_LATENT_CHANNELS = 16

# ---- The DiT ---------------------------------------------------------------------------------------------------------
# lllyasviel/FramePackI2V_HY's config.json (the F1 checkpoint shares it).
OFFICIAL_DIT_CONFIG = {
    "_class_name": "HunyuanVideoTransformer3DModelPacked",
    "in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 20,
    "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2, "patch_size_t": 1,
    "qk_norm": "rms_norm", "guidance_embeds": True, "text_embed_dim": 4096, "pooled_projection_dim": 768,
    "rope_theta": 256.0, "rope_axes_dim": [16, 56, 56], "has_image_proj": True, "image_proj_dim": 1152,
    "has_clean_x_embedder": True,
}


@dataclass(frozen=True)
class HistoryScale:
    name: str  # "clean" (1x), "clean_2x", "clean_4x": the official keyword names
    kernel: tuple[int, int, int]  # (frames, rows, columns) of latents that one token covers
    history_frames: int  # latent frames taken from the history at this scale


# FramePack's history context, in packing order (the coarsest, oldest for F1, first): one frame at 1x (the noisy
# latents' patch kernel), two at 2x, sixteen at 4x. The 1x group also carries the start latent.
HISTORY_SCALES = (
    HistoryScale("clean_4x", (4, 8, 8), 16),
    HistoryScale("clean_2x", (2, 4, 4), 2),
    HistoryScale("clean", (1, 2, 2), 1),
)
START_LATENT_FRAMES = 1  # the 1x group holds the start latent in front of its history frame

# ---- The other models (what `framepack info --plan` sizes when no model is loaded) -----------------------------------
OFFICIAL_LLAMA = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8)
OFFICIAL_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77)
OFFICIAL_SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=384, patch_size=14)

# ---- Generation defaults of the official app -------------------------------------------------------------------------
DISTILLED_GUIDANCE = 10.0  # the DiT sees it x 1000

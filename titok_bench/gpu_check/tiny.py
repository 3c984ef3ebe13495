"""The dry run's models: official-format configs (tokenizer + generator) at toy size."""
from __future__ import annotations

from pathlib import Path


def tiny_config(path: Path, *, model_type: str, num_tokens: int, guidance_decay: str) -> str:
    """An official-format config (tokenizer + generator) at toy size: crop 64, 2-layer ViTs, 64 codes."""
    path.write_text(f"""\
model:
  vq_model:
    codebook_size: 64
    token_size: 12
    use_l2_norm: true
    commitment_cost: 0.25
    vit_enc_model_size: tiny
    vit_dec_model_size: tiny
    vit_enc_patch_size: 16
    vit_dec_patch_size: 16
    num_latent_tokens: {num_tokens}
    finetune_decoder: true
    pixel_decoder_hidden_channels: 32
  generator:
    model_type: {model_type}
    hidden_size: 64
    num_hidden_layers: 2
    num_attention_heads: 4
    intermediate_size: 128
    dropout: 0.1
    attn_drop: 0.1
    num_steps: 8
    class_label_dropout: 0.1
    image_seq_len: {num_tokens}
    condition_num_classes: 10
    randomize_temperature: 9.5
    guidance_scale: 4.5
    guidance_decay: {guidance_decay}
dataset:
  preprocessing:
    crop_size: 64
""")
    return str(path)

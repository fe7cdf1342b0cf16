"""Tiny random LLaVA-1.5 (CLIP or SigLIP tower) / LLaVA-NeXT checkpoints built from configs and
saved locally (weights, a word-level tokenizer, the HF processor): vLLM loads them without any
download.

Sizes vLLM's CPU build accepts: LLM head size 64 (its paged attention needs one of 32, 64, 80,
...), vision head size 32."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

IMAGE_SIZE, PATCH = 28, 7
N = (IMAGE_SIZE // PATCH) ** 2            # 16 visual tokens per crop
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + [f"w{i}" for i in range(123)]
PAD, BOS, EOS, IMAGE = 0, 1, 2, 4
# vLLM's chat front end puts "<image>" in the text content; this template joins the messages.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                 "{% else %}<image> {% endif %}{% endfor %}{% endif %} {% endfor %}w1 w2")


def configs(family: str):
    """``family``: "llava", "llava_siglip" (a SigLIP tower: no CLS token, every patch is a
    visual token) or "llava_next"."""
    sizes = dict(hidden_size=64, intermediate_size=128, image_size=IMAGE_SIZE, patch_size=PATCH,
                 num_hidden_layers=3, num_attention_heads=2)
    text = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(WORDS), max_position_embeddings=1024,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    if family == "llava_siglip":
        return transformers.LlavaConfig(vision_config=transformers.SiglipVisionConfig(**sizes),
                                        text_config=text, image_token_id=IMAGE,
                                        image_token_index=IMAGE,
                                        vision_feature_select_strategy="full",
                                        vision_feature_layer=-1)
    vision = transformers.CLIPVisionConfig(projection_dim=64, **sizes)
    if family == "llava":
        return transformers.LlavaConfig(vision_config=vision, text_config=text,
                                        image_token_id=IMAGE, image_token_index=IMAGE)
    return transformers.LlavaNextConfig(vision_config=vision, text_config=text,
                                        image_token_id=IMAGE, image_token_index=IMAGE,
                                        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])


def build(family: str, seed: int = 0):
    """The transformers model (fp32, eval), the same for one ``(family, seed)``."""
    torch.manual_seed(seed)
    cls = (transformers.LlavaNextForConditionalGeneration if family == "llava_next"
           else transformers.LlavaForConditionalGeneration)
    model = cls(configs(family)).eval()
    with torch.no_grad():       # a sharper LM head: greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    return model


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def processor(family: str):
    tok = tokenizer()
    if family == "llava":
        image = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                crop_size={"height": IMAGE_SIZE,
                                                           "width": IMAGE_SIZE})
        return transformers.LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=PATCH,
                                           vision_feature_select_strategy="default",
                                           num_additional_image_tokens=1,
                                           chat_template=CHAT_TEMPLATE)
    if family == "llava_siglip":
        image = transformers.SiglipImageProcessor(size={"height": IMAGE_SIZE,
                                                        "width": IMAGE_SIZE})
        return transformers.LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=PATCH,
                                           vision_feature_select_strategy="full",
                                           num_additional_image_tokens=0,
                                           chat_template=CHAT_TEMPLATE)
    image = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    return transformers.LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=PATCH,
                                           vision_feature_select_strategy="default",
                                           num_additional_image_tokens=1,
                                           chat_template=CHAT_TEMPLATE)


def save(model, family: str, path: str) -> str:
    """``model`` with its tokenizer and processor in ``path``, weights named as vLLM loads them."""
    model.save_pretrained(path)
    processor(family).save_pretrained(path)
    rename_vision_weights(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"]
    return path


def rename_vision_weights(path: str) -> None:
    """transformers 5 writes CLIP's weights as ``vision_tower.embeddings.*``; vLLM reads
    ``vision_tower.vision_model.*``."""
    def vllm_name(k):
        head, sep, rest = k.partition("vision_tower.")
        if sep and not rest.startswith("vision_model."):
            return f"{head}vision_tower.vision_model.{rest}"
        return k

    for name in os.listdir(path):                  # one file, or shards and their index
        file = os.path.join(path, name)
        if name.endswith(".safetensors"):
            tensors = load_file(file)
            save_file({vllm_name(k): v for k, v in tensors.items()}, file,
                      metadata={"format": "pt"})
        elif name.endswith(".safetensors.index.json"):
            with open(file) as f:
                index = json.load(f)
            index["weight_map"] = {vllm_name(k): v for k, v in index["weight_map"].items()}
            with open(file, "w") as f:
                json.dump(index, f)


def image(seed: int, size=(IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


# ------------------------------------------------------------------------------ Qwen2.5-VL
# A random Qwen2.5-VL: vision head size 32 (2 heads of a 64-wide tower), patch 14, 2×2 merge,
# 2×2-merged-token attention windows (window_size 56) in the last block, full attention in the
# first; LLM head size 64, M-RoPE sections 8 + 12 + 12 = 64 / 2.
QWEN_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<|image_pad|>", "<|video_pad|>",
              "<|vision_start|>", "<|vision_end|>"] + [f"w{i}" for i in range(120)]
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 4, 5, 6, 7
QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image> ", QWEN_PLACEHOLDER + " ")


def qwen_config():
    return transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=128, fullatt_block_indexes=[0], window_size=56),
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=len(QWEN_WORDS), max_position_embeddings=1024,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],
                                          "rope_theta": 10000.0}),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        tie_word_embeddings=False)


def build_qwen(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(qwen_config()).eval()
    with torch.no_grad():       # a sharper LM head: greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    return model


def qwen_processor():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(QWEN_WORDS)},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={
            "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    fast.chat_template = QWEN_CHAT_TEMPLATE
    # 4 to 20 merged tokens (28 × 28 pixels each) per image
    image = transformers.Qwen2VLImageProcessor(
        size={"shortest_edge": 4 * 28 * 28, "longest_edge": 20 * 28 * 28}, patch_size=14,
        merge_size=2, temporal_patch_size=2)
    video = transformers.Qwen2VLVideoProcessor(
        size={"shortest_edge": 4 * 28 * 28, "longest_edge": 20 * 28 * 28}, patch_size=14,
        merge_size=2, temporal_patch_size=2)
    return transformers.Qwen2_5_VLProcessor(image_processor=image, tokenizer=fast,
                                            video_processor=video,
                                            chat_template=QWEN_CHAT_TEMPLATE)


def save_qwen(model, path: str) -> str:
    model.save_pretrained(path)
    qwen_processor().save_pretrained(path)
    return path

"""Tiny random transformers image-text-to-text models, one per family, for offline tests.

Per family, a tiny random model built from its transformers config classes with a processor around a
locally built byte-level tokenizer (every byte a token, plus the family's special tokens) and a small
chat template that places the family's image token. ``save_family(name, folder)`` writes one as
``save_pretrained`` does (model, processor, tokenizer, chat template), ready for
``AutoModelForImageTextToText`` / ``AutoProcessor``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

BASE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}@IMG@{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QUESTIONS = ["what colour is the circle?", "how many squares are there?", "is the circle left of the square?",
             "describe the image.", "what shape is red?", "is there a triangle?", "which shape is on top?",
             "how many shapes are blue?"]
MAX_NEW = 6


def byte_tokenizer(specials: list[str], named: dict[str, str] | None = None, image_text: str = "<image>") -> Any:
    """A byte-level tokenizer (each byte one token, no merges: any text encodes) with ``specials`` added
    and ``named`` model-specific special tokens (``image_token="<image>"`` -> ``tokenizer.image_token``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(BASE_SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = [s for s in specials if s not in BASE_SPECIALS]
    tok.add_special_tokens(BASE_SPECIALS + extra)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=extra, chat_template=TEMPLATE.replace("@IMG@", image_text), **(named or {}),
    )


def _image(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    im = Image.new("RGB", size, colour)
    im.paste((255, 255, 0), (4, 4, 16, 12))
    return im


IMAGES = [_image((255, 0, 0)), _image((0, 0, 255), (40, 32)), _image((0, 255, 0)), _image((90, 90, 90), (32, 48)),
          _image((200, 30, 160), (48, 40)), _image((10, 10, 10)), _image((250, 250, 250), (32, 40)),
          _image((30, 120, 200), (56, 32))]


# --- the families: each returns (model, processor) ----------------------------------------------
def llava(tmp: Path) -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = byte_tokenizer(["<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**LM, vocab_size=len(tokenizer)),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
    return LlavaForConditionalGeneration(config), processor


def _qwen_vl(version: str) -> Callable[[Path], tuple[Any, Any]]:
    def build(tmp: Path) -> tuple[Any, Any]:
        import transformers as tf

        names = {"2": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
                 "2.5": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                         "Qwen2VLVideoProcessor"),
                 "3": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor")}
        config_cls, model_cls, processor_cls, video_cls = (getattr(tf, n) for n in names[version])
        specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        tokenizer = byte_tokenizer(specials, image_text="<|vision_start|><|image_pad|><|vision_end|>")
        ids = dict(zip(["vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"],
                       tokenizer.convert_tokens_to_ids(specials), strict=True))
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
        text = {**LM, "vocab_size": len(tokenizer), "rope_parameters": rope}
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=32, intermediate_size=64)
        if version == "3":  # head_dim 8: the three mrope sections cover its 4 frequencies, interleaved
            text = {**text, "head_dim": 8, "rope_parameters": {**rope, "mrope_interleaved": True}}
            vision = {**vision, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}
        config = config_cls(text_config=text, vision_config=vision, **ids)
        image_processor = tf.Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=16 * 16, max_pixels=64 * 64)
        video_processor = video_cls(patch_size=8, merge_size=2, temporal_patch_size=2)
        processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, chat_template=tokenizer.chat_template)
        return model_cls(config), processor

    return build


def gemma3(tmp: Path) -> tuple[Any, Any]:
    import transformers as tf

    named = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = byte_tokenizer(list(named.values()), named, image_text="<start_of_image>")
    boi, image, eoi = tokenizer.convert_tokens_to_ids(list(named.values()))
    text = {**LM, "vocab_size": len(tokenizer), "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=boi,
                             eoi_token_index=eoi, image_token_index=image)
    image_processor = tf.Gemma3ImageProcessor(size={"height": 32, "width": 32})
    processor = tf.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                   chat_template=tokenizer.chat_template)
    return tf.Gemma3ForConditionalGeneration(config), processor


def _idefics(family: str) -> Callable[[Path], tuple[Any, Any]]:
    def build(tmp: Path) -> tuple[Any, Any]:
        import transformers as tf

        specials = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
        specials += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
        tokenizer = byte_tokenizer(specials + (["<video>"] if family == "smolvlm" else []))
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                      patch_size=8)
        sizes = dict(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
        common = dict(tokenizer=tokenizer, image_seq_len=4, chat_template=tokenizer.chat_template)
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        text = {**LM, "vocab_size": len(tokenizer)}
        if family == "idefics3":
            config = tf.Idefics3Config(text_config=text, vision_config=vision, scale_factor=2, image_token_id=image_id)
            processor = tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessor(**sizes), **common)
            return tf.Idefics3ForConditionalGeneration(config), processor
        config = tf.SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=2, image_token_id=image_id)
        processor = tf.SmolVLMProcessor(image_processor=tf.SmolVLMImageProcessor(**sizes),
                                        video_processor=tf.SmolVLMVideoProcessor(), **common)
        return tf.SmolVLMForConditionalGeneration(config), processor

    return build


def internvl(tmp: Path) -> tuple[Any, Any]:
    import transformers as tf

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer = byte_tokenizer(list(named.values()), named, image_text="<IMG_CONTEXT>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = tf.InternVLConfig(text_config=tf.Qwen2Config(**LM, vocab_size=len(tokenizer)), vision_config=vision,
                               image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                               downsample_ratio=0.5)
    image_processor = tf.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=False)
    processor = tf.InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     video_processor=tf.InternVLVideoProcessor(), image_seq_length=4,
                                     chat_template=tokenizer.chat_template)
    return tf.InternVLForConditionalGeneration(config), processor


def llava_onevision(tmp: Path) -> tuple[Any, Any]:
    import transformers as tf

    tokenizer = byte_tokenizer(["<image>", "<video>"])
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    config = tf.LlavaOnevisionConfig(text_config=tf.Qwen2Config(**LM, vocab_size=len(tokenizer)),
                                     vision_config=tf.SiglipVisionConfig(**vision), image_token_index=image_id,
                                     video_token_index=video_id, image_grid_pinpoints=pinpoints,
                                     vision_feature_layer=-1)
    image_processor = tf.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = tf.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           video_processor=tf.LlavaOnevisionVideoProcessor(), num_image_tokens=16,
                                           vision_feature_select_strategy="full", chat_template=tokenizer.chat_template)
    return tf.LlavaOnevisionForConditionalGeneration(config), processor


FAMILIES: dict[str, Callable[[Path], tuple[Any, Any]]] = {
    "llava": llava,
    "qwen2_vl": _qwen_vl("2"),
    "qwen2_5_vl": _qwen_vl("2.5"),
    "qwen3_vl": _qwen_vl("3"),
    "gemma3": gemma3,
    "idefics3": _idefics("idefics3"),
    "smolvlm": _idefics("smolvlm"),
    "internvl": internvl,
    "llava_onevision": llava_onevision,
}


def save_family(name: str, folder: Path, seed: int = 0) -> Path:
    """Build family ``name`` (a key of :data:`FAMILIES`) with ``seed`` and save model + processor to ``folder``."""
    torch.manual_seed(seed)
    model, processor = FAMILIES[name](folder)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

"""Any transformers image-text-to-text folder behind the eval protocol (mllm/hf_native.py).

Per family, a tiny random model built from its transformers config classes is saved to a temporary
folder with a processor around a locally built byte-level tokenizer (every byte a token, plus the
family's special tokens) and a small chat template that places the family's image token. Then:
``NativeMLLM.generate`` equals transformers' own greedy ``generate`` run one sample at a time (inputs
from ``processor.apply_chat_template`` with the image in the message), and batch sizes 1 and 4 give
identical predictions. ``mllm chat`` runs on one native folder and on a tiny checkpoint of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mllm import cli, run
from mllm.hf_native import NativeMLLM, chat_content, load_generator
from mllm.model import MLLM, ModelError

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
             "describe the image."]
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


IMAGES = [_image((255, 0, 0)), _image((0, 0, 255), (40, 32)), _image((0, 255, 0)), _image((90, 90, 90), (32, 48))]


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


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def native_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    model, processor = FAMILIES[request.param](folder)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def reference(model: Any, processor: Any, image: Image.Image, question: str) -> list[int]:
    """transformers' own path for one sample: the processor's chat template with the image in the
    message, greedy ``generate``, the new tokens."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_generate_equals_transformers_one_by_one_and_batching_changes_nothing(native_folder: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    native = load_generator(native_folder, device="cpu")
    assert isinstance(native, NativeMLLM) and native.tokenizer.padding_side == "left"
    model = AutoModelForImageTextToText.from_pretrained(native_folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(native_folder, local_files_only=True)
    tokenizer = processor.tokenizer
    prompts = [f"<image>\n{q}" for q in QUESTIONS]
    want_ids = [reference(model, processor, im, q) for im, q in zip(IMAGES, QUESTIONS, strict=True)]
    want = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in want_ids]
    assert len({tuple(ids) for ids in want_ids}) > 1  # the answers depend on the input
    one = [native.generate([im], [p], max_new_tokens=MAX_NEW)[0] for im, p in zip(IMAGES, prompts, strict=True)]
    four = native.generate(IMAGES, prompts, max_new_tokens=MAX_NEW)
    assert one == want
    assert four == want


def test_eval_runs_every_generated_task_and_batch_size_changes_nothing(native_folder: Path, tmp_path: Path) -> None:
    """``mllm eval`` on a transformers folder: ShapesWorld (its default scenes, images) batched by 1 and
    4 gives the same predictions; the text-only arithmetic task (no image marker) runs too."""
    import json

    preds = {}
    for bs in (1, 4):
        run.evaluate_checkpoint(native_folder, "shapesworld", tmp_path / f"sw{bs}", batch_size=bs, max_new_tokens=4,
                                limit=6)
        lines = (tmp_path / f"sw{bs}" / "predictions.jsonl").read_text().splitlines()
        preds[bs] = [json.loads(line)["prediction"] for line in lines]
    assert len(preds[1]) == 6 and preds[1] == preds[4]
    metrics = run.evaluate_checkpoint(native_folder, "arithmetic", tmp_path / "ar", options=["test_size=3"],
                                      batch_size=2, max_new_tokens=3)
    assert metrics["n"] == 3


def test_chat_content_places_the_image_where_the_marker_is() -> None:
    assert chat_content("<image>\nwhat?") == [{"type": "image"}, {"type": "text", "text": "what?"}]
    assert chat_content("what?\n<image>") == [{"type": "text", "text": "what?"}, {"type": "image"}]
    assert chat_content("3 + 4") == [{"type": "text", "text": "3 + 4"}]


def test_chat_on_a_native_folder(native_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    IMAGES[0].save(image)
    assert cli.main(["chat", str(native_folder), "--image", str(image), QUESTIONS[0], "--max-new-tokens", "3"]) == 0
    answer = capsys.readouterr().out.rstrip("\n")
    native = NativeMLLM.from_pretrained(native_folder, device="cpu")
    assert answer == native.generate([IMAGES[0]], [f"<image>\n{QUESTIONS[0]}"], max_new_tokens=3)[0]


SMALL = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=1",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "data.image_size=32",
]


def test_chat_on_our_checkpoint_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mllm.config import load_config

    cfg = load_config("tiny", SMALL)
    run.build_model(cfg, run.build_tokenizer_for(cfg)).save_pretrained(tmp_path / "model")
    image = tmp_path / "a.png"
    IMAGES[0].save(image)
    assert cli.main(["chat", str(tmp_path / "model"), "--image", str(image), "what colour is the circle?",
                     "--max-new-tokens", "3"]) == 0
    answer = capsys.readouterr().out.rstrip("\n")
    ours = load_generator(tmp_path / "model")
    assert isinstance(ours, MLLM)
    assert answer == ours.generate([IMAGES[0]], ["<image>\nwhat colour is the circle?"], max_new_tokens=3)[0]

    (tmp_path / "bad.png").write_bytes(b"not an image")
    for bad in (tmp_path / "missing.png", tmp_path / "bad.png"):
        assert cli.main(["chat", str(tmp_path / "model"), "--image", str(bad), "what?"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0]
    assert cli.main(["chat", str(tmp_path), "--image", str(image), "what?"]) == 2  # neither ours nor transformers'
    assert "not a model folder" in capsys.readouterr().err
    with pytest.raises(ModelError, match="dtype"):
        load_generator(tmp_path / "model", dtype="int8")


def test_native_loading_errors_and_dtype(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer([])
    LlamaForCausalLM(LlamaConfig(**LM, vocab_size=len(tokenizer))).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    with pytest.raises(ModelError, match="cannot load it as an image-text-to-text model"):
        load_generator(tmp_path / "lm")  # a text-only LLM folder
    with pytest.raises(ModelError, match="config.json: not found"):
        NativeMLLM.from_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a model folder"):
        load_generator(tmp_path / "nowhere")


def test_dtype_is_the_callers_choice(tmp_path: Path) -> None:
    model, processor = llava(tmp_path)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    native = load_generator(tmp_path, device="cpu", dtype="bfloat16")
    assert native.dtype == torch.bfloat16 and native.device.type == "cpu"
    assert len(native.generate(IMAGES[:2], [f"<image>\n{q}" for q in QUESTIONS[:2]], max_new_tokens=2)) == 2

"""Any transformers vision model that returns ``hidden_states`` (CLIPVisionModel, SiglipVisionModel,
Dinov2Model, Dinov2WithRegistersModel, ...) as a vision encoder.

Tapped block ``l`` returns ``hidden_states[l + 1]`` (``hidden_states[0]`` is the embedding output),
the raw residual stream after block ``l`` — LLaVA's ``mm_vision_select_layer = -2`` is ``layers: [-2]``
here. Prefix tokens (CLS, registers) are counted once at build time by a shape-only forward on the
``meta`` device, so no model family is special-cased; ``drop_prefix`` removes them.

Weights come from a local folder only (``config.json`` + safetensors, ``local_files_only``,
``trust_remote_code`` off). A folder holding a dual-tower checkpoint (CLIP, SigLIP) loads its vision
tower through the vision sub-config's model class, as LLaVA's ``CLIPVisionModel.from_pretrained`` does.
Preprocessing is the folder's own ``AutoImageProcessor`` (or one built from a config mapping for
random init); it must produce one fixed image size, which is checked when the encoder is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from encoders.base import EncoderError, VisionEncoder, freeze, resolve_layers


@dataclass
class HFVisionConfig:
    path: str | None = None  # local folder with config.json + weights (+ preprocessor_config.json); None = random
    model_type: str = "clip_vision_model"  # transformers model_type for random init (path unset)
    arch: dict[str, Any] = field(default_factory=dict)  # AutoConfig.for_model(model_type, **arch) for random init
    processor: dict[str, Any] = field(default_factory=dict)  # image-processor overrides; for random init the
    # whole processor config, with image_processor_type (e.g. CLIPImageProcessor)
    layers: list[int] = field(default_factory=lambda: [-1])  # blocks to tap; negative = from the end
    drop_prefix: bool = True  # drop CLS / register tokens, keep only patch tokens
    frozen: bool = True


def build_image_processor(path: str | None, options: dict[str, Any], where: str) -> Any:
    """The image processor of folder ``path`` (``options`` override its fields), or, without a
    folder, the class named by ``options["image_processor_type"]`` built from ``options``."""
    from transformers import AutoImageProcessor
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    if path is not None and (Path(path) / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(path, local_files_only=True, **options)
    kind = options.get("image_processor_type")
    if kind is None:
        origin = f"{path} has no preprocessor_config.json" if path is not None else "random init"
        raise EncoderError(
            f"{where}.processor: {origin}; give the processor config, with image_processor_type "
            "(e.g. {image_processor_type: CLIPImageProcessor, size: {height: 224, width: 224}})"
        )
    cls = get_image_processor_class_from_name(kind)
    if cls is None:
        raise EncoderError(f"{where}.processor.image_processor_type: {kind!r} is not a transformers image processor")
    return cls(**{k: v for k, v in options.items() if k != "image_processor_type"})


def processed_size(processor: Any, where: str) -> tuple[int, int]:
    """Pixel size the processor outputs; it must not depend on the input's aspect ratio."""
    sizes = {
        tuple(processor(images=Image.new("RGB", wh), return_tensors="pt")["pixel_values"].shape[-2:])
        for wh in ((64, 64), (128, 64))
    }
    if len(sizes) != 1:
        raise EncoderError(
            f"{where}.processor: output size depends on the image's aspect ratio ({sorted(sizes)}); "
            "set size: {height: H, width: W} or enable center cropping"
        )
    rows, cols = sizes.pop()
    return int(rows), int(cols)


def load_hf_model(path: str, where: str, cls: Any = None) -> nn.Module:
    """A transformers model from local folder ``path`` (as ``cls`` when given); otherwise a
    dual-tower checkpoint (CLIP, SigLIP) gives its vision tower. Missing weights are an error."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if not Path(path).is_dir() or not (Path(path) / "config.json").is_file():
        raise EncoderError(f"{where}.path: {path} is not a folder with a transformers config.json")
    if cls is None:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        vision = getattr(config, "vision_config", None)
        cls = MODEL_MAPPING[type(vision)] if vision is not None and type(vision) in MODEL_MAPPING else AutoModel
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise EncoderError(f"{where}.path: cannot load {path}: {err}") from err
    if info["missing_keys"]:
        raise EncoderError(f"{where}.path: {path} lacks weights for {sorted(info['missing_keys'])[:3]}")
    return model


def block_list(model: nn.Module, depth: int, where: str) -> nn.ModuleList:
    """The model's list of ``depth`` transformer blocks (for FSDP wrapping and hooks)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise EncoderError(f"{where}: found no list of {depth} blocks in {type(model).__name__}")


class HFVisionEncoder(VisionEncoder):
    """A transformers vision model returning ``{block: tokens [B, N, D]}`` from ``hidden_states``."""

    config_cls = HFVisionConfig

    def __init__(self, cfg: HFVisionConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.cfg = cfg
        if cfg.path is not None:
            self.model = load_hf_model(cfg.path, "encoder")
        else:
            try:
                config = AutoConfig.for_model(cfg.model_type, **cfg.arch)
            except (ValueError, TypeError) as err:
                raise EncoderError(f"encoder.arch: cannot build a {cfg.model_type!r} config: {err}") from err
            self.model = AutoModel.from_config(config)
        self._processor = build_image_processor(cfg.path, cfg.processor, "encoder")
        self._image_size = processed_size(self._processor, "encoder")
        config = self.model.config
        depth = int(config.num_hidden_layers)
        self.layers = resolve_layers(cfg.layers, depth, where="layers")
        self._blocks = block_list(self.model, depth, "encoder")
        patch = config.patch_size
        if self._image_size[0] % patch or self._image_size[1] % patch:
            raise EncoderError(f"encoder.processor: image size {self._image_size} is not a multiple of patch {patch}")
        self._grid = (self._image_size[0] // patch, self._image_size[1] // patch)
        self._num_prefix = self._count_prefix(config)
        if cfg.frozen:
            freeze(self)
            self.frozen = True
            self.eval()

    def _count_prefix(self, config: Any) -> int:
        """Sequence length minus grid cells, from a forward on the meta device (shapes only)."""
        from transformers import AutoModel

        with torch.device("meta"):
            shadow = AutoModel.from_config(config)
            try:
                hidden = shadow(torch.empty(1, 3, *self._image_size), output_hidden_states=True).hidden_states
            except (RuntimeError, ValueError) as err:
                raise EncoderError(f"encoder: the model rejects {self._image_size} images: {err}") from err
        prefix = hidden[-1].shape[1] - self._grid[0] * self._grid[1]
        if prefix < 0:
            raise EncoderError(f"encoder: {hidden[-1].shape[1]} tokens for a {self._grid} grid")
        return int(prefix)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self._grid

    @property
    def num_patches(self) -> int:
        return self._grid[0] * self._grid[1] + (0 if self.cfg.drop_prefix else self._num_prefix)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    @property
    def fsdp_unit(self) -> type[nn.Module]:
        return type(self._blocks[0])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def forward(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        start = self._num_prefix if self.cfg.drop_prefix else 0
        return {layer: hidden[layer + 1][:, start:] for layer in self.layers}

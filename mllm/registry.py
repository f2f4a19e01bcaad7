"""One registry idiom and the tables that name every pluggable part.

A table maps a short name to a lazy ``"module:Class"`` path, so ``import mllm`` never imports
open_clip, Florence-2 or flash-attn; the class is imported the first time it is built. Every
registered class carries its config dataclass as ``config_cls`` (the leaves never import this
module: the dependency arrow points down, see README, "Layout", checked by tests/test_layering.py).

Adding a part = one file in its package + one line in a table below + its own test
(tests/test_registry_contract.py checks that every registered part has one).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from common.errors import UserError
from mllm.schema import from_dict

T = TypeVar("T")


class RegistryError(UserError, KeyError):
    """Unknown name in a registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> class table for one kind of part (encoder, projector, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._paths: dict[str, str] = {}
        self._loaded: dict[str, type[T]] = {}

    def register(self, name: str, target: str | type[T]) -> None:
        """Register ``target`` (a class or a lazy ``"module:Class"`` path) under ``name``."""
        if name in self._paths or name in self._loaded:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(target, str):
            if ":" not in target:
                raise ValueError(f"lazy path must be 'module:Class', got {target!r}")
            self._paths[name] = target
        else:
            self._loaded[name] = target

    def names(self) -> list[str]:
        return sorted({*self._paths, *self._loaded})

    def __contains__(self, name: object) -> bool:
        return name in self._paths or name in self._loaded

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``, importing its module on first use."""
        if name not in self:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.names())}"
            )
        if name not in self._loaded:
            module, _, attr = self._paths[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]

    def config_cls(self, name: str) -> type:
        """The config dataclass of part ``name`` (``cls.config_cls``)."""
        cls = self.get(name)
        cfg_cls = getattr(cls, "config_cls", None)
        if cfg_cls is None:
            raise TypeError(f"{self.kind} {name!r} ({cls.__name__}) does not declare config_cls")
        return cfg_cls

    def build(self, name: str, cfg: Any, **context: Any) -> T:
        """Instantiate part ``name`` from its config (a dataclass instance or a mapping)."""
        if isinstance(cfg, Mapping):
            cfg = from_dict(self.config_cls(name), cfg, where=f"{self.kind}:{name}")
        return self.get(name)(cfg, **context)


# --- the tables -------------------------------------------------------------------------------
ENCODERS: Registry[Any] = Registry("encoder")
ENCODERS.register("timm_vit", "encoders.dino:TimmViTEncoder")
ENCODERS.register("open_clip", "encoders.clip:OpenClipEncoder")
ENCODERS.register("hf_vision", "encoders.hf:HFVisionEncoder")
ENCODERS.register("florence2", "encoders.florence:FlorenceEncoder")
ENCODERS.register("fused", "mllm.fused:FusedFromParts")  # towers + fusion, parsed as typed parts (mllm/fused.py)

ENCODER_FUSIONS: Registry[Any] = Registry("encoder fusion")  # built as CLS(cfg, inputs=[FeatureSpec, ...])
ENCODER_FUSIONS.register("concat", "encoders.fusion.concat:ConcatFusion")
ENCODER_FUSIONS.register("comm", "encoders.fusion.comm:CommFusion")
ENCODER_FUSIONS.register("ftz", "encoders.fusion.ftz:FtZFusion")
ENCODER_FUSIONS.register("dbfusion", "encoders.fusion.dbfusion:DBFusion")
ENCODER_FUSIONS.register("convgate", "encoders.fusion.convgate:ConvGateFusion")

PROJECTORS: Registry[Any] = Registry("projector")
PROJECTORS.register("linear", "projectors.linear:LinearProjector")
PROJECTORS.register("mlp", "projectors.mlp:MLPProjector")
PROJECTORS.register("pool_adapter", "projectors.pool_adapter:PoolAdapterProjector")
PROJECTORS.register("pyramid", "projectors.pyramid:PyramidPoolProjector")

INJECTORS: Registry[Any] = Registry("injector")  # built as CLS(cfg, spec=InjectionSpec), then attach(llm)
INJECTORS.register("gated_xattn", "mllm.injection.gated_xattn:GatedXAttnInjector")
INJECTORS.register("ffn_embed", "mllm.injection.ffn_embed:FFNEmbedInjector")
INJECTORS.register("pyramid", "mllm.injection.pyramid:PyramidInjector")

AUX_HEADS: Registry[Any] = Registry("auxiliary head")  # built as CLS(cfg, spec=HeadSpec): a training-only loss
AUX_HEADS.register("object_heads", "mllm.heads.object_heads:ObjectHeads")

# Merge methods are not built: each class exposes a pure per-tensor ``merge`` and its params dataclass as
# ``config_cls`` (mllm/merge/methods/base.py); the registry key is the method's only name.
MERGE_METHODS: Registry[Any] = Registry("merge method")
MERGE_METHODS.register("linear", "mllm.merge.methods.linear:Linear")
MERGE_METHODS.register("task_arithmetic", "mllm.merge.methods.task_arithmetic:TaskArithmetic")
MERGE_METHODS.register("ties", "mllm.merge.methods.ties:Ties")
MERGE_METHODS.register("dare_linear", "mllm.merge.methods.dare_linear:DareLinear")
MERGE_METHODS.register("dare_ties", "mllm.merge.methods.dare_ties:DareTies")
MERGE_METHODS.register("breadcrumbs", "mllm.merge.methods.breadcrumbs:Breadcrumbs")
MERGE_METHODS.register("breadcrumbs_ties", "mllm.merge.methods.breadcrumbs_ties:BreadcrumbsTies")
MERGE_METHODS.register("della", "mllm.merge.methods.della:Della")
MERGE_METHODS.register("della_linear", "mllm.merge.methods.della_linear:DellaLinear")
MERGE_METHODS.register("sce", "mllm.merge.methods.sce:Sce")
MERGE_METHODS.register("ram", "mllm.merge.methods.ram:Ram")
MERGE_METHODS.register("ramplus_tl", "mllm.merge.methods.ramplus_tl:RamPlusTL")
MERGE_METHODS.register("lines", "mllm.merge.methods.lines:Lines")
MERGE_METHODS.register("layer_swap", "mllm.merge.methods.layer_swap:LayerSwap")
MERGE_METHODS.register("passthrough", "mllm.merge.methods.passthrough:Passthrough")  # slices: layer stacking
MERGE_METHODS.register("widen", "mllm.merge.methods.widen:Widen")
MERGE_METHODS.register("frank", "mllm.merge.methods.frank:Frank")
MERGE_METHODS.register("slerp", "mllm.merge.methods.slerp:Slerp")
MERGE_METHODS.register("nuslerp", "mllm.merge.methods.nuslerp:Nuslerp")
MERGE_METHODS.register("multislerp", "mllm.merge.methods.multislerp:Multislerp")
MERGE_METHODS.register("karcher", "mllm.merge.methods.karcher:Karcher")
MERGE_METHODS.register("model_stock", "mllm.merge.methods.model_stock:ModelStock")
MERGE_METHODS.register("nearswap", "mllm.merge.methods.nearswap:Nearswap")
MERGE_METHODS.register("arcee_fusion", "mllm.merge.methods.arcee_fusion:ArceeFusion")

EVAL_TASKS: Registry[Any] = Registry("eval task")  # built as TASK(cfg) (ShapesWorld: TASK(cfg, split=...))
EVAL_TASKS.register("shapesworld", "eval.tasks.shapesworld:ShapesWorldTask")
EVAL_TASKS.register("vqav2", "eval.tasks.vqav2:VQAv2Task")
EVAL_TASKS.register("gqa", "eval.tasks.gqa:GQATask")
EVAL_TASKS.register("textvqa", "eval.tasks.textvqa:TextVQATask")
EVAL_TASKS.register("scienceqa_img", "eval.tasks.scienceqa:ScienceQAImgTask")
EVAL_TASKS.register("pope", "eval.tasks.pope:POPETask")
EVAL_TASKS.register("refcoco", "eval.tasks.refcoco:RefCOCOTask")
EVAL_TASKS.register("refcoco+", "eval.tasks.refcoco:RefCOCOPlusTask")
EVAL_TASKS.register("refcocog", "eval.tasks.refcoco:RefCOCOgTask")
EVAL_TASKS.register("arithmetic", "eval.tasks.arithmetic:ArithmeticTask")  # FRANK toy: text-only skill
EVAL_TASKS.register("compositional", "eval.tasks.compositional:CompositionalTask")  # FRANK toy: count + arithmetic
EVAL_TASKS.register("vizwiz_vqa_val", "eval.tasks.vizwiz:VizWizTask")
EVAL_TASKS.register("chartqa", "eval.tasks.chartqa:ChartQATask")
EVAL_TASKS.register("docvqa_val", "eval.tasks.docvqa:DocVQATask")
EVAL_TASKS.register("ocrbench", "eval.tasks.ocrbench:OCRBenchTask")
EVAL_TASKS.register("ai2d", "eval.tasks.ai2d:AI2DTask")
EVAL_TASKS.register("mme", "eval.tasks.mme:MMETask")
EVAL_TASKS.register("mmbench_en_dev", "eval.tasks.mmbench:MMBenchTask")
EVAL_TASKS.register("seedbench", "eval.tasks.seed:SEEDBenchTask")
EVAL_TASKS.register("mmmu_val", "eval.tasks.mmmu:MMMUTask")
EVAL_TASKS.register("mathvista_testmini", "eval.tasks.mathvista:MathVistaTask")

"""clsmask: class-specific token masking for weakly supervised semantic segmentation, as a transformers package.

Importing this package registers the model with transformers' Auto classes (no remote code needed locally);
checkpoints saved from it also carry the remote-code files and `auto_map`, so they load with
`trust_remote_code=True` where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

from .configuration_clsmask import ClsMaskConfig
from .image_processing_clsmask import ClsMaskImageProcessor
from .modeling_clsmask import (
    ClsMaskForMultiLabelClassification,
    ClsMaskForSemanticSegmentation,
    ClsMaskModel,
    ClsMaskPreTrainedModel,
)
from .pipeline_clsmask import ClsMaskSegmentationPipeline
from .pseudo_masks import masks_from_class_maps, nearest_fill, normalize_maps


AutoConfig.register("clsmask", ClsMaskConfig, exist_ok=True)
AutoModel.register(ClsMaskConfig, ClsMaskModel, exist_ok=True)
AutoModelForImageClassification.register(ClsMaskConfig, ClsMaskForMultiLabelClassification, exist_ok=True)
AutoModelForSemanticSegmentation.register(ClsMaskConfig, ClsMaskForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(ClsMaskConfig, image_processor_classes={"pil": ClsMaskImageProcessor}, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "ClsMaskConfig",
    "ClsMaskImageProcessor",
    "ClsMaskModel",
    "ClsMaskPreTrainedModel",
    "ClsMaskForMultiLabelClassification",
    "ClsMaskForSemanticSegmentation",
    "ClsMaskSegmentationPipeline",
    "masks_from_class_maps",
    "nearest_fill",
    "normalize_maps",
]

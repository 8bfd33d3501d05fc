"""The path pipeline folders saved before the SiT transformer moved record for it.

``model_index.json`` names a custom component by its module, and folders written earlier (among
them the embedded ``assets/digits-sit``) say ``["diffusers_am.models.sit_transformer",
"SiTTransformer2DModel"]``. :class:`SiTTransformer2DModel` lives in
:mod:`diffusers_am.pipelines.sit_transformer`, next to the pipeline that samples it, which also
answers for this name in ``sys.modules`` (what ``DiffusionPipeline.from_pretrained`` consults);
this module serves an explicit ``import diffusers_am.models.sit_transformer`` made before that, naming
the same class (and ``ModelMixin``, which ``from_pretrained`` looks up to pick its loading method).
"""

from diffusers.models.modeling_utils import ModelMixin

from ..pipelines.sit_transformer import SiTTransformer2DModel

__all__ = ["ModelMixin", "SiTTransformer2DModel"]

"""The path pipeline folders saved before the SiT transformer moved record for it.

``model_index.json`` names a custom component by its module, and folders written earlier (among
them the embedded ``assets/digits-sit``) say ``["diffusers_am.models.sit_transformer",
"SiTTransformer2DModel"]``. :class:`SiTTransformer2DModel` lives in
:mod:`diffusers_am.pipelines.sit_transformer`, next to the pipeline that samples it; this module
names the same class (and ``ModelMixin``, which ``DiffusionPipeline.from_pretrained`` looks up here
to pick its loading method) so that those folders keep loading.
"""

from diffusers.models.modeling_utils import ModelMixin

from ..pipelines.sit_transformer import SiTTransformer2DModel

__all__ = ["ModelMixin", "SiTTransformer2DModel"]

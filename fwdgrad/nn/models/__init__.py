"""Models used in the experiments. Each takes its input shape and class count from the dataset.

Data shape is the model's business: every model accepts a batch of shape ``(N, *input_shape)`` (images as
``(N, C, H, W)``, tabular data as ``(N, F)``), so all of them share one data pipeline.

==========================  =========================================================================
``configs/model/``          model
==========================  =========================================================================
``logreg``                  :class:`LogisticRegression` (:mod:`.basic`)
``mlp``                     :class:`MLP`, the paper's 784-1024-1024-10 network (:mod:`.basic`)
``conv``                    :class:`ConvNet`, a small VGG-style conv net (:mod:`.basic`)
``lenet5``                  :class:`LeNet5` with BatchNorm, as frog trains it (:mod:`.lenet`)
``resnet18``                :class:`ResNet`, ResNet-18 in its CIFAR variant (:mod:`.resnet`)
``vit``                     :class:`VisionTransformer`, frog's small ViT (:mod:`.vit`)
``mlp_mixer``               :class:`MLPMixer`, frog's MLP-Mixer (:mod:`.mixer`)
``local_mixer``             :class:`LocalMixer`, Ren et al.'s MLP-Mixer for local losses (:mod:`.local_mixer`)
==========================  =========================================================================

``resnet18`` to ``mlp_mixer`` are the models of the multi-tangent paper's Section 4.5 (Fluegel et al. 2024); what the
forward-mode engine does for each is in ``docs/models.md``.
"""

from fwdgrad.nn.models.basic import ACTIVATIONS, MLP, ConvNet, LogisticRegression, image_shape, output_shape
from fwdgrad.nn.models.lenet import LeNet5
from fwdgrad.nn.models.local_mixer import LocalMixer
from fwdgrad.nn.models.mixer import MLPMixer
from fwdgrad.nn.models.resnet import ResNet
from fwdgrad.nn.models.vit import VisionTransformer

__all__ = ["ACTIVATIONS", "MLP", "ConvNet", "LeNet5", "LocalMixer", "LogisticRegression", "MLPMixer", "ResNet",
           "VisionTransformer", "image_shape", "output_shape"]

"""Model registry. Every model takes `num_classes`, `norm_layer`, `act_layer` and `conv_layer` (for
the convolutions that feed a normalizer) and never names a normalizer."""
from torch import nn

from models.imagenet import resnet18, resnet34, resnet50, vgg16_imagenet
from models.nin import nin
from models.resnet_cifar import resnet20, resnet56
from models.vgg import vgg16

MODELS = {"resnet20": resnet20, "resnet56": resnet56, "vgg16": vgg16, "nin": nin,  # CIFAR
          "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "vgg16_imagenet": vgg16_imagenet}


def build_model(name, num_classes, norm_layer, act_layer, conv_layer=nn.Conv2d):
    if name not in MODELS:
        raise KeyError(name)
    return MODELS[name](num_classes=num_classes, norm_layer=norm_layer, act_layer=act_layer, conv_layer=conv_layer)

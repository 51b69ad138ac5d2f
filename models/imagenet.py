"""ImageNet models of the paper's Table 3: torchvision's ResNet-18/34/50 (their builders accept
`norm_layer`) and VGG-16 with a norm after every convolution."""
import torchvision
from torch import nn

from models.vgg import VGG16, make_features


def _resnet(builder):
    def build(num_classes=1000, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU):
        model = builder(weights=None, num_classes=num_classes, norm_layer=norm_layer)
        model.residual = True
        return model
    return build


resnet18 = _resnet(torchvision.models.resnet18)
resnet34 = _resnet(torchvision.models.resnet34)
resnet50 = _resnet(torchvision.models.resnet50)


def vgg16_imagenet(num_classes=1000, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU):
    model = torchvision.models.VGG(make_features(VGG16, norm_layer, act_layer), num_classes=num_classes)
    model.residual = False
    return model

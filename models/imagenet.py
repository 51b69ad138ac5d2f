"""ImageNet models of the paper's Table 3: torchvision's ResNet-18/34/50 (their builders accept
`norm_layer`) and VGG-16 with a norm after every convolution."""
import torchvision
from torch import nn

from models.vgg import VGG16


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
    layers, cin = [], 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), norm_layer(v), act_layer()]
            cin = v
    model = torchvision.models.VGG(nn.Sequential(*layers), num_classes=num_classes)
    model.residual = False
    return model

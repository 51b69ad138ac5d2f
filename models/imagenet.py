"""ImageNet models of the paper's Table 3: torchvision's ResNet-18/34/50 (their builders accept
`norm_layer`) and VGG-16 with a norm after every convolution."""
import torchvision
from torch import nn

from models.vgg import VGG16, make_features


def swap_convs(model: nn.Module, conv_layer) -> nn.Module:
    """Rebuild every Conv2d of a torchvision model with `conv_layer` (same shape and weights)."""
    if conv_layer is nn.Conv2d:
        return model
    for parent in list(model.modules()):
        for name, c in list(parent.named_children()):
            if type(c) is nn.Conv2d:
                new = conv_layer(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                                 c.dilation, c.groups, c.bias is not None)
                new.load_state_dict(c.state_dict())
                setattr(parent, name, new)
    return model


def _resnet(builder):
    def build(num_classes=1000, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU, conv_layer=nn.Conv2d):
        model = swap_convs(builder(weights=None, num_classes=num_classes, norm_layer=norm_layer), conv_layer)
        model.residual = True
        return model
    return build


resnet18 = _resnet(torchvision.models.resnet18)
resnet34 = _resnet(torchvision.models.resnet34)
resnet50 = _resnet(torchvision.models.resnet50)


def vgg16_imagenet(num_classes=1000, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU, conv_layer=nn.Conv2d):
    model = torchvision.models.VGG(make_features(VGG16, norm_layer, act_layer, conv_layer), num_classes=num_classes)
    model.residual = False
    return model

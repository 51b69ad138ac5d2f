"""VGG-16 for CIFAR (the usual "VGG-BN" variant): thirteen 3x3 convolutions, each followed by a
norm and a ReLU, five max-pools, one linear classifier on the 512-d feature."""
from torch import nn

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def make_features(layout, norm_layer, act_layer, conv_layer=nn.Conv2d) -> nn.Sequential:
    """3x3 conv -> norm -> activation for every number in `layout`, a 2x2 max-pool for every "M"."""
    layers, cin = [], 3
    for v in layout:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [conv_layer(cin, v, 3, padding=1, bias=False), norm_layer(v), act_layer()]
            cin = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    residual = False

    def __init__(self, layout=VGG16, num_classes=10, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU,
                 conv_layer=nn.Conv2d):
        super().__init__()
        self.features = make_features(layout, norm_layer, act_layer, conv_layer)
        self.classifier = nn.Linear([v for v in layout if v != "M"][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def vgg16(**kw):
    return VGG(VGG16, **kw)

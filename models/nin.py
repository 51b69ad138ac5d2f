"""Network in Network for CIFAR (Lin et al. 2014): three mlpconv blocks (a spatial convolution
and two 1x1 convolutions), a norm after every convolution but the last, which gives the
class maps that global average pooling turns into logits. Dropout is left out, as usual when
the network is normalized."""
from torch import nn


class NIN(nn.Module):
    residual = False

    def __init__(self, num_classes=10, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU, conv_layer=nn.Conv2d):
        super().__init__()

        def conv(cin, cout, k):
            return [conv_layer(cin, cout, k, padding=k // 2, bias=False), norm_layer(cout), act_layer()]

        self.features = nn.Sequential(
            *conv(3, 192, 5), *conv(192, 160, 1), *conv(160, 96, 1),
            nn.MaxPool2d(3, 2, padding=1),
            *conv(96, 192, 5), *conv(192, 192, 1), *conv(192, 192, 1),
            nn.AvgPool2d(3, 2, padding=1),
            *conv(192, 192, 3), *conv(192, 192, 1),
            nn.Conv2d(192, num_classes, 1),  # feeds no normalizer
        )
        # He init for the convolutions that feed a norm and ReLU; the classifier keeps PyTorch's
        # default (fan-in) init, like VGG's Linear: fan-out He init with 10 outputs gave logits of
        # std ~3 at init, which a normalizer without batch statistics did not survive
        for m in self.features[:-1].modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.features(x).mean((2, 3))


def nin(**kw):
    return NIN(**kw)

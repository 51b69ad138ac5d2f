"""CIFAR ResNets (He et al. 2016, sec. 4.2): depth 6n+2, stages of 16/32/64 channels, identity
shortcuts with zero-padded channels where the shape changes (option A)."""
import torch.nn.functional as F
from torch import nn


def conv3x3(conv_layer, cin, cout, stride=1):
    return conv_layer(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm_layer, act_layer, conv_layer):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(conv_layer, cin, cout, stride), norm_layer(cout)
        self.conv2, self.bn2 = conv3x3(conv_layer, cout, cout), norm_layer(cout)
        self.act1, self.act2 = act_layer(), act_layer()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))

    def shortcut(self, x):
        """Option A: identity, subsampled and zero-padded in channels where the shape changes."""
        if self.stride == 1 and not self.extra:
            return x
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class CifarResNet(nn.Module):
    residual = True

    def __init__(self, depth, num_classes=10, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU, conv_layer=nn.Conv2d):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1, self.bn1, self.act1 = conv3x3(conv_layer, 3, 16), norm_layer(16), act_layer()
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, norm_layer, act_layer, conv_layer))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in")

    def forward(self, x):
        x = self.blocks(self.act1(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def resnet20(**kw):
    return CifarResNet(20, **kw)


def resnet56(**kw):
    return CifarResNet(56, **kw)

"""A small U-Net whose long skips cross stages (docs/skip.md).

Each encoder level stashes its activation; the decoder level of the same
depth pops it. On two stages the outer skips go straight from stage 0 to
stage 1 through the engine (one copy), not through every layer between.

    PYTHONPATH=python python examples/python/train_unet.py
"""
import torch
from torch import nn

import pipegear
from pipegear.skip import pop, skippable, stash


def conv(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


def encoder(level, cin, cout):
    @skippable(stash=[f"enc{level}"])
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv(cin, cout)

        def forward(self, x):
            x = self.conv(x)
            yield stash(f"enc{level}", x)  # kept for the decoder
            return nn.functional.max_pool2d(x, 2)

    return Encoder()


def decoder(level, cin, cout):
    @skippable(pop=[f"enc{level}"])
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
            self.conv = conv(2 * cout, cout)

        def forward(self, x):
            skip = yield pop(f"enc{level}")
            return self.conv(torch.cat([self.up(x), skip], dim=1))

    return Decoder()


def unet(channels=(8, 16, 32)):
    c1, c2, c3 = channels
    return nn.Sequential(
        encoder(1, 1, c1), encoder(2, c1, c2),  # 32x32 -> 8x8
        conv(c2, c3),                            # the bottom
        decoder(2, c3, c2), decoder(1, c2, c1),  # 8x8 -> 32x32
        nn.Conv2d(c1, 1, 1))


def main():
    torch.manual_seed(0)
    model = unet()
    # Stage 0: both encoders and the bottom; stage 1: the decoders. Both
    # skips cross the boundary; the pipeline finds that from the layers.
    pipe = pipegear.GPipe(model, balance=[3, 3], chunks=4,
                          checkpoint="except_last")
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1)
    x = torch.randn(16, 1, 32, 32)
    target = (x > 0).float()  # a toy segmentation: the positive pixels
    for step in range(5):
        optimizer.zero_grad()
        loss = pipe.step(x, target, nn.BCEWithLogitsLoss())
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()

"""Networks: the ADM-style U-Net and the noisy encoder classifier."""

from cascade.nn.classifier import EncoderClassifier
from cascade.nn.unet import UNet

__all__ = ["UNet", "EncoderClassifier"]

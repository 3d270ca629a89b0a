"""The first convolution of a ResNet, rearranged for GPU tensor cores with the same result.

A bfloat16 convolution on 3 input channels runs unpadded on a GPU: XLA pads channels
for tensor cores only for float16 (``cudnn_pad_for_convolutions``). :class:`StemConv`
keeps ``nn.Conv``'s parameter (the kernel ``(k, k, c, features)``, same name, same
initializer, so checkpoints and initial values are unchanged) and computes the same
convolution (symmetric padding k//2, no bias) in one of two rearranged ways:

``pad4``: the input gets zero channels up to a multiple of 4 and the kernel zero
input rows to match; each added product is 0·0, so the sum is unchanged.

``s2d`` (space-to-depth, for the ImageNet stem's 7×7 stride 2 on even sizes): with the
kernel w given one leading zero tap (w'[0] = 0, w'[t + 1] = w[t], 8 taps), output
position i reads::

  o[i] = Σ_t x[2i + t − 3]·w[t] = Σ_{t'<8} x[2i + t' − 4]·w'[t']
       = Σ_{a<4} Σ_{r<2} x[2(i + a − 2) + r]·w'[2a + r]

so the input's blocks of 2×2 pixels become 4c channels, x₂[p, q, (r, s, c)] =
x[2p + r, 2q + s, c], and the convolution is 4×4, stride 1, padding (2, 1) on a half-size,
4c-channel image with kernel k₂[a, b, (r, s, c), f] = w'[2a + r, 2b + s, c, f]
(as in Google's MLPerf ResNet-50 for TPUs, which did the rearrangement on the host).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

STEM_IMPLS = ("conv", "pad4", "s2d")  # the ResNet's stem_impl switch
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


class StemConv(nn.Module):
    """``nn.Conv(features, (size, size), strides=stride, padding=size // 2, use_bias=False)``.

    Attributes:
      features: output channels.
      size: kernel size (odd).
      stride: 1 or 2; "s2d" needs stride 2, size 7 and even image sizes.
      impl: "pad4" or "s2d" (see the module docstring).
      dtype: compute dtype of input and kernel (as ``nn.Conv``'s ``dtype``).
      kernel_init: initializer of the float32 kernel.
    """

    features: int
    size: int
    stride: int
    impl: str
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.impl not in ("pad4", "s2d"):
            raise ValueError(f"StemConv: impl must be 'pad4' or 's2d', got {self.impl!r}")
        channels = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init,
                            (self.size, self.size, channels, self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.impl == "pad4":
            extra = -channels % 4
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
            kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
            pad = self.size // 2
            return lax.conv_general_dilated(x, kernel, (self.stride, self.stride),
                                            ((pad, pad), (pad, pad)),
                                            dimension_numbers=_DIMENSIONS)
        return _space_to_depth_conv(x, kernel, self.size, self.stride)


def _space_to_depth_conv(x: jax.Array, kernel: jax.Array, size: int, stride: int) -> jax.Array:
    n, h, w, c = x.shape
    if size != 7 or stride != 2 or h % 2 or w % 2:
        raise ValueError(f"StemConv: impl 's2d' needs a 7x7 stride-2 stem on even image sizes, "
                         f"got {size}x{size} stride {stride} on {h}x{w}")
    blocks = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    blocks = blocks.reshape(n, h // 2, w // 2, 4 * c)
    k8 = jnp.pad(kernel, ((1, 0), (1, 0), (0, 0), (0, 0)))  # one leading zero tap
    f = kernel.shape[-1]
    k2 = k8.reshape(4, 2, 4, 2, c, f).transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * c, f)
    return lax.conv_general_dilated(blocks, k2, (1, 1), ((2, 1), (2, 1)),
                                    dimension_numbers=_DIMENSIONS)

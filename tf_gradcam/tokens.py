"""Token feature maps: a transformer's patch tokens laid back on their grid.

A Vision Transformer turns an image into `(batch, tokens, channels)`: a few
*prefix* tokens (the class token, DeiT's distillation token, DINOv2's register
tokens) followed by one token per patch, in row-major order. Grad-CAM's
equations hold on the patch tokens once they are a `(batch, rows, columns,
channels)` map: α_k is the mean of the gradients over the patch positions
(eq. 1, prefix tokens left out: they have no place in the image) and the map
is upsampled to the image like a convolutional one.

`TokenLayout` says how: `prefix` tokens dropped, the rest reshaped to `grid`.
`token_layout` infers it from the token count and the image size, using the
model's `patch_size` when one of its layers states it (keras-hub's patch
embeddings do); `GradCAM(..., reshape=callable)` takes over for layouts that
are not a prefix plus a row-major grid (`CustomLayout`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from tf_gradcam.errors import NotSpatialError

__all__ = ["CustomLayout", "TokenLayout", "token_layout"]

#: At most this many tokens before the patches (class + distillation + registers).
MAX_PREFIX = 8


@dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens of a `(batch, tokens, channels)` output sit.

    Attributes:
        prefix: tokens before the patch grid (class, distillation, registers), dropped.
        grid: `(rows, columns)` of the patch tokens, in row-major order.
        patch_size: the patch size it was derived from, or `None` (inferred from counts).
    """

    prefix: int
    grid: tuple[int, int]
    patch_size: int | None = None

    @property
    def tokens(self) -> int:
        """The token count this layout fits."""
        return self.prefix + self.grid[0] * self.grid[1]

    def to_grid(self, tokens: tf.Tensor, *, batch_axes: int = 1) -> tf.Tensor:
        """`(*batch, tokens, channels)` → `(*batch, rows, columns, channels)`.

        The patches are the *last* `rows × columns` tokens: a layer whose declared
        token count is off (keras-hub 0.32's SigLIP patch embedding counts a class
        token it does not produce) still gives the right grid.
        """
        patch_count = self.grid[0] * self.grid[1]
        patches = tokens[(slice(None),) * batch_axes + (slice(-patch_count, None),)]
        shape = tf.shape(patches)
        target = tf.concat(
            [shape[:batch_axes], tf.constant(self.grid, tf.int32), shape[batch_axes + 1 :]], 0
        )
        return tf.reshape(patches, target)

    def describe(self) -> str:
        patch = f", patch size {self.patch_size}" if self.patch_size else ""
        return f"{self.prefix} prefix token(s) dropped, {self.grid[0]}x{self.grid[1]} grid{patch}"


@dataclass(frozen=True)
class CustomLayout:
    """A user's `reshape(tokens) -> (batch, rows, columns, channels)` function.

    Attributes:
        reshape: the function; it must be written with TensorFlow / `keras.ops`
            operations (it runs in the compiled step) and keep the batch axis.
    """

    reshape: Callable[[Any], Any]

    def to_grid(self, tokens: tf.Tensor, *, batch_axes: int = 1) -> tf.Tensor:
        if batch_axes == 1:
            return tf.convert_to_tensor(self.reshape(tokens))
        shape = tf.shape(tokens)
        merged = tf.reshape(tokens, tf.concat([[-1], shape[batch_axes:]], 0))
        grid = tf.convert_to_tensor(self.reshape(merged))
        return tf.reshape(grid, tf.concat([shape[:batch_axes], tf.shape(grid)[1:]], 0))

    def describe(self) -> str:
        name = getattr(self.reshape, "__name__", type(self.reshape).__name__)
        return f"custom reshape {name}"


def _patch_sizes(layers: Any) -> set[int]:
    sizes = set()
    for layer in layers:
        size = getattr(layer, "patch_size", None)
        if isinstance(size, (tuple, list)) and len(set(size)) == 1:
            size = size[0]
        if isinstance(size, int) and size > 0:
            sizes.add(size)
    return sizes


def token_layout(
    tokens: int | None,
    image_size: tuple[int | None, int | None],
    *,
    layers: Any = (),
    where: str = "the layer",
) -> TokenLayout:
    """The grid of a `(batch, tokens, channels)` output computed from an image.

    With a `patch_size` stated by one of `layers`, the grid is
    `(height // patch, width // patch)` and the prefix is what is left. Otherwise
    the smallest prefix (0 to 8) whose remaining count is
    `(height // p) × (width // p)` for a patch size p dividing both sides.

    Args:
        tokens: the token count (static).
        image_size: the image's `(height, width)` (static).
        layers: the model's layers, searched for a `patch_size` attribute.
        where: how to name the layer in errors.

    Returns:
        A `TokenLayout`.

    Raises:
        NotSpatialError: unknown sizes, or a count that fits no grid; the
            message says to pass `reshape=`.
    """
    height, width = image_size
    fix = (
        "Pass `reshape=` to GradCAM: a function from (batch, tokens, channels) to "
        "(batch, rows, columns, channels), e.g. dropping the class token and reshaping."
    )
    if tokens is None or height is None or width is None:
        raise NotSpatialError(
            f"{where} outputs tokens, but the token count ({tokens}) or the image size "
            f"({height}x{width}) is not fixed, so the patch grid cannot be inferred. {fix}"
        )
    for patch in sorted(_patch_sizes(layers)):
        grid = (height // patch, width // patch)
        prefix = tokens - grid[0] * grid[1]
        if 0 <= prefix <= MAX_PREFIX:
            return TokenLayout(prefix, grid, patch)
    for prefix in range(min(MAX_PREFIX, tokens - 1) + 1):
        for patch in range(1, min(height, width) + 1):
            if height % patch or width % patch:
                continue
            grid = (height // patch, width // patch)
            if grid[0] * grid[1] == tokens - prefix:
                return TokenLayout(prefix, grid, None)
    raise NotSpatialError(
        f"{where} outputs {tokens} tokens, which do not form a patch grid of the "
        f"{height}x{width} image after 0 to {MAX_PREFIX} prefix tokens (class, "
        f"distillation, registers). {fix}"
    )

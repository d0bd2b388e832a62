"""Find the layer to explain and build the gradient model that exposes it.

Grad-CAM needs two things from one forward pass: the activations ``A`` of an
inner layer and the target score computed *from* them. The widely copied
``keras.Model(model.inputs, [layer.output, model.output])`` breaks on nested
models ("Graph disconnected") and on Sequential models without inputs. This
module instead *re-runs the model's graph* on fresh inputs, layer by layer,
descending into nested Functional and Sequential models at any depth, and
records every layer's output on the way. The result is a functional
"gradient model" that shares the user's layers and weights.

The user's model is never modified, not even for a moment: every user layer
is called through a thin `_LayerCall` wrapper, so no Keras graph nodes are
added to the user's layers (``layer.output`` keeps working), and a layer whose
activation must differ (the trailing softmax, or a guided ReLU) is run as a
twin, a shallow copy sharing its variables with its own activation, so no
other caller of the model ever sees a changed layer.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import keras

from tf_gradcam.capture import build_subclassed_gradient_model, layer_candidates, resolve_layer
from tf_gradcam.class_token import ClassTokenGradientModel, class_token_tail
from tf_gradcam.errors import (
    InputError,
    LayerNotFoundError,
    NotSpatialError,
    UnsupportedModelError,
)
from tf_gradcam.image import spatial_size
from tf_gradcam.keras_adapter import (
    SQUASHING_OPERATIONS,
    is_expandable,
    is_legacy_keras,
    is_operation,
    run_functional_graph,
    twin,
)
from tf_gradcam.legacy import build_legacy_gradient_model
from tf_gradcam.tokens import CustomLayout, TokenLayout, token_layout

__all__ = [
    "CallOverride",
    "GradientModel",
    "build_gradient_model",
    "call_with_activation",
    "layer_paths",
]

#: Activations that turn scores into probabilities; the paper's y^c is taken before them.
_SQUASHING_ACTIVATIONS = ("softmax", "sigmoid")

#: Layers after which a feature map has no spatial extent left: the default
#: layer is never one of them or anything computed only from their outputs
#: (MobileNet's 1x1 `conv_preds` classifier, squeeze-and-excitation branches).
_GLOBAL_POOLING = (
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
)

#: Downsampling after the last convolution only coarsens its map: the default
#: layer steps back over such trailing layers (VGG16's `block5_pool` gives way
#: to `block5_conv3`, the paper's 14x14 "conv5_3" maps, §3).
_LOCAL_POOLING = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
)

#: Convolutions that can be a fully-convolutional classifier's class-score layer: one
#: output channel per class, globally pooled into the scores (Network in Network,
#: SqueezeNet's `conv10`, mini-Xception). The default layer steps back from such a
#: convolution to the feature map it reads (see `_default_path`).
#: Layers that only resize a map: a segmenter's class scores brought to the image's size.
_RESIZES = (
    keras.layers.Resizing,
    keras.layers.UpSampling1D,
    keras.layers.UpSampling2D,
    keras.layers.UpSampling3D,
)

_CLASS_CONVOLUTIONS = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
)

#: Layers that keep a map's channels apart (elementwise or per-channel), so that after
#: the class-score convolution channel c still carries class c's evidence alone: its own
#: activation, batch normalisation, dropout.
_PER_CHANNEL = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
    keras.layers.BatchNormalization,
    keras.layers.Dropout,  # and SpatialDropout*, its subclasses
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.Identity,
)

#: Layers that may follow the global pooling of class scores on the way to the output:
#: the pooled value of channel c stays the score of class c (bare softmax/sigmoid
#: operations count too, see `is_squashing_head`).
_SCORE_PRESERVING = (
    *_PER_CHANNEL,
    keras.layers.Softmax,
    keras.layers.Flatten,
    keras.layers.Reshape,
)

#: A function that may replace a layer's call: given the user's layer, return
#: ``None`` to call it as it is, or a callable run *instead of* ``layer(...)``.
CallOverride = Callable[[keras.layers.Layer], "Callable[..., Any] | None"]


def _activation_name(layer: keras.layers.Layer) -> str | None:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", None)


def is_squashing_head(layer: keras.layers.Layer) -> bool:
    """Whether the layer ends in softmax/sigmoid, so its pre-activation scores exist."""
    if isinstance(layer, keras.layers.Softmax):
        return True
    if is_operation(layer):
        return type(layer).__name__ in SQUASHING_OPERATIONS
    return _activation_name(layer) in _SQUASHING_ACTIVATIONS


def _linear_call(layer: keras.layers.Layer) -> Callable[..., Any]:
    """The call computing a squashing head's scores before its softmax/sigmoid."""
    if is_operation(layer):  # keras.ops.softmax(x, ...): the scores are x
        return lambda scores, *args, **kwargs: scores
    return call_with_activation(layer, keras.activations.linear)


def call_with_activation(
    layer: keras.layers.Layer, activation: Callable[..., Any]
) -> Callable[..., Any]:
    """A function that calls `layer` as if its activation were `activation`.

    The user's layer is never touched: each call runs a *twin*, a shallow copy
    of the layer (the same variables, the same configuration, the same
    `call`) whose own `activation` attribute is `activation`. No other caller
    of the layer, in this thread or another, can observe the substitution.
    A `Softmax` layer, which has no activation attribute, is treated as its
    identity when `activation` is linear. Use it from a `call_override`.

    Args:
        layer: a layer with an `activation` attribute (Dense, Conv*, Activation).
        activation: the function to apply instead.

    Returns:
        A callable with the layer's call signature.

    Example:
        >>> logits = call_with_activation(dense, keras.activations.linear)(features)
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        if isinstance(layer, keras.layers.Softmax):
            return activation(args[0])
        return twin(layer, activation=activation)(*args, **kwargs)

    return run


class _LayerCall(keras.layers.Layer):
    """Calls a user layer on behalf of the gradient model.

    Being a layer of its own, it keeps Keras from adding graph nodes to the
    user's layer when the gradient model is built. With `replace` set, that
    callable runs instead of the layer (a guided ReLU, the logits of a softmax
    head); it must compute from the user's layer and its weights.
    """

    def __init__(
        self, layer: keras.Operation, *, replace: Callable[..., Any] | None = None
    ) -> None:
        # Bare operations (`x + 3.0`) have no dtype policy: they compute in their inputs' dtype.
        dtype = getattr(layer, "dtype_policy", None)
        # Unique: a layer called twice (a shared resize) or a softmax head whose
        # output also feeds other layers (its logits twin) gets two wrappers.
        uid = keras.backend.get_uid(f"{layer.name}_call")
        name = f"{layer.name}_call" if uid == 1 else f"{layer.name}_call_{uid}"
        super().__init__(name=name, dtype=dtype, autocast=False)
        self.wrapped = layer
        self._replace = replace
        self.built = True

    def call(self, *args: Any, **kwargs: Any) -> Any:
        if self._replace is not None:
            return self._replace(*args, **kwargs)
        return self.wrapped(*args, **kwargs)

    def compute_output_spec(self, *args: Any, **kwargs: Any) -> Any:
        # The user's layer knows its output spec: layers whose call needs concrete
        # shapes (keras-hub DeepLabV3's resizing UpSampling2D) cannot be traced on
        # placeholders, which Keras' default inference would do through `call`.
        if self._replace is None:
            return self.wrapped.compute_output_spec(*args, **kwargs)
        return super().compute_output_spec(*args, **kwargs)


def _wrapped_call(
    layer: keras.Operation,
    replace: Callable[..., Any] | None,
    args: tuple,
    kwargs: dict,
) -> Any:
    """Call `layer` (or `replace`) through a fresh `_LayerCall` on symbolic `args`.

    Bare operations may take constants positionally (`x + 3.0` is `Add()(x, 3.0)`),
    and some layers take nested arguments mixing tensors and Python values
    (D-FINE's encoder: `inputs_embeds=[...], output_hidden_states=True`), both of
    which a layer call refuses: their symbolic tensors are passed as one list
    and the other values are put back in place inside the call.
    """
    if not is_operation(layer):
        try:
            return _LayerCall(layer, replace=replace)(*args, **kwargs)
        except ValueError as error:  # Keras: "you cannot mix tensors and non-tensors"
            if "mix tensors and non-tensors" not in str(error):
                raise
    flat = keras.tree.flatten((args, kwargs))
    positions = [i for i, value in enumerate(flat) if isinstance(value, keras.KerasTensor)]
    function = replace if replace is not None else layer

    def run(tensors: list[Any]) -> Any:
        values = list(flat)
        for i, tensor in zip(positions, tensors, strict=True):
            values[i] = tensor
        call_args, call_kwargs = keras.tree.pack_sequence_as((args, kwargs), values)
        return function(*call_args, **call_kwargs)

    return _LayerCall(layer, replace=run)([flat[i] for i in positions])


@dataclass
class _Rewiring:
    """State of one pass that re-runs a model's graph on fresh inputs."""

    call_override: CallOverride | None = None
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    layers: dict[str, keras.layers.Layer] = field(default_factory=dict)
    logits: dict[int, Any] = field(default_factory=dict)
    #: ids of tensors computed only from globally pooled features (see `_GLOBAL_POOLING`).
    pooled: set[int] = field(default_factory=set)
    #: id of each tensor → positions (in the flattened inputs) of the inputs it depends on.
    sources: dict[int, frozenset[int]] = field(default_factory=dict)
    #: `data_format` of the first layer with one that reads each input position.
    formats: dict[int, str] = field(default_factory=dict)
    #: id of each tensor → the `data_format` of the nearest layer before it that has one.
    layouts: dict[int, str] = field(default_factory=dict)
    #: input position → vocabulary size of an `Embedding` that reads that input directly.
    vocabularies: dict[int, int] = field(default_factory=dict)
    #: id of each input tensor → its position in the flattened inputs.
    input_positions: dict[int, int] = field(default_factory=dict)
    #: input position → rank of that input (3: signals, 4: images, 5: volumes).
    input_ranks: dict[int, int] = field(default_factory=dict)
    #: input position → (height, width) of a 4-D image input.
    input_shapes: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    #: ids of model outputs at an input's resolution (a segmenter's per-pixel scores).
    dense_predictions: set[int] = field(default_factory=set)

    def run(self, model: keras.Model, inputs: Any, prefix: str) -> Any:
        if isinstance(model, keras.Sequential):
            x = inputs
            for layer in model.layers:
                x = self.call(layer, (x,), {}, prefix)
            return x
        # Functional models: walk their graph node by node.
        return run_functional_graph(
            model, inputs, lambda layer, *a, **k: self.call(layer, a, k, prefix)
        )

    def call(self, layer: keras.layers.Layer, args: tuple, kwargs: dict, prefix: str) -> Any:
        path = f"{prefix}{layer.name}"
        if is_expandable(layer):
            inner_inputs = args[0] if len(args) == 1 else list(args)
            y = self.run(layer, inner_inputs, prefix=f"{path}/")
        else:
            replacement = self.call_override(layer) if self.call_override else None
            y = _wrapped_call(layer, replacement, args, kwargs)
            if is_squashing_head(layer) and not isinstance(y, (list, tuple, dict)):
                self.logits[id(y)] = _wrapped_call(layer, _linear_call(layer), args, kwargs)
            symbolic = [
                t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)
            ]
            if isinstance(layer, _GLOBAL_POOLING) or (
                symbolic and all(id(t) in self.pooled for t in symbolic)
            ):
                self.pooled.update(id(t) for t in keras.tree.flatten(y))
            self._track_sources(layer, symbolic, y)
        if path not in self.outputs:
            self.order.append(path)
        self.outputs.setdefault(path, []).append(y)
        self.layers[path] = layer
        return y

    def _track_sources(self, layer: keras.Operation, symbolic: list, y: Any) -> None:
        """Record which inputs `y` depends on, its layout, and each input's first layout."""
        sources = frozenset().union(*(self.sources.get(id(t), frozenset()) for t in symbolic))
        data_format = getattr(layer, "data_format", None)
        if data_format in ("channels_first", "channels_last"):
            for position in sources:
                self.formats.setdefault(position, data_format)
        else:  # layout-preserving layers (activations, BatchNorm, Add...) pass theirs on
            data_format = next(
                (self.layouts[id(t)] for t in symbolic if id(t) in self.layouts), None
            )
        for tensor in keras.tree.flatten(y):
            self.sources[id(tensor)] = sources
            if data_format is not None:
                self.layouts[id(tensor)] = data_format
        if isinstance(layer, keras.layers.Embedding) and symbolic:
            position = self.input_positions.get(id(symbolic[0]))
            if position is not None:
                size = self.vocabularies.get(position, layer.input_dim)
                self.vocabularies[position] = min(size, layer.input_dim)

    def channels_first(self, activation: Any) -> bool:
        """Whether a 4-D tensor of the graph is (batch, channels, h, w).

        The `data_format` of the nearest layer before it that has one; failing
        that, the layout of the image it is computed from (see `image_input`).
        """
        data_format = self.layouts.get(id(activation))
        if data_format is None:
            positions = sorted(self.sources.get(id(activation), ()))
            data_format = next(
                (self.formats[p] for p in positions if p in self.formats),
                keras.config.image_data_format(),
            )
        return data_format == "channels_first"

    def is_spatial(self, tensor: Any) -> bool:
        """Whether a tensor of the graph is a feature map Grad-CAM can explain.

        4-D `(batch, height, width, channels)` tensors always are; 3-D
        `(batch, length, channels)` and 5-D `(batch, depth, height, width,
        channels)` ones when they are computed from an input of the same rank
        (a Conv1D network on signals, a Conv3D network on volumes), so the
        token sequences of an image model are not taken for 1-D maps.
        """
        rank = _rank(tensor)
        if rank == 4:
            return True
        if rank not in (3, 5):
            return False
        return any(self.input_ranks.get(p) == rank for p in self.sources.get(id(tensor), ()))

    def image_input(self, inputs: Any, activation: Any | None) -> tuple[int | None, bool]:
        """The image input a map is sized after, and whether it is channels-first.

        The first input that `activation` is computed from with as many spatial
        axes as the map (a 4-D image for 2-D maps; a signal or a volume for
        1-D and 3-D maps); the first 4-D input when `activation` is `None`, or
        computed from none: with two images of different sizes, each layer's
        heatmaps take the size of its own image. An input is channels-first
        when the first layer with a `data_format` that reads it says so (else
        `keras.config.image_data_format()`).
        """
        flat = keras.tree.flatten(inputs)
        if activation is not None:
            rank = _rank(activation)
        else:  # the first image; failing that, the first volume, then the first signal
            ranks = {len(leaf.shape) for leaf in flat}
            rank = next((r for r in (4, 5, 3) if r in ranks), 4)
        images = [i for i, leaf in enumerate(flat) if len(leaf.shape) == rank]
        if not images:
            return None, False
        feeding = self.sources.get(id(activation), frozenset()) if activation is not None else ()
        position = next((i for i in images if i in feeding), images[0])
        data_format = self.formats.get(position, keras.config.image_data_format())
        return position, data_format == "channels_first"


class GradientModel:
    """The re-run graph of a model: its inputs, every layer's output, the scores.

    Built once by `build_gradient_model`. `model(inputs)` returns the
    activations of the chosen layer (or `None`) and the model's outputs, with a
    trailing softmax/sigmoid removed when ``logits=True``.

    Attributes:
        layer_path: `"outer/inner/layer"` path of the explained layer, or `None`.
        keras_model: the functional model computing `[activations, *outputs]`.
        inputs: the symbolic inputs, in the structure of the user's model.
        output_structure: a sample of the output structure (tensor, list or dict).
        channels_first: whether the layer's activations are (batch, channels, h, w).
        image_index: position, in the flattened inputs, of the image the maps are
            sized after (the one the layer is computed from), or `None` if no
            input is 4-D.
        image_channels_first: whether that image is (batch, channels, h, w).
        vocabularies: input position → vocabulary size, for inputs read by an
            `Embedding` layer (token ids must be below it).
        layout: for a `(batch, tokens, channels)` layer, how its tokens form a
            grid (`tf_gradcam.tokens`); `None` for feature maps.
    """

    def __init__(
        self,
        keras_model: keras.Model,
        *,
        layer_path: str | None,
        output_structure: Any,
        channels_first: bool,
        image_index: int | None = None,
        image_channels_first: bool = False,
        vocabularies: dict[int, int] | None = None,
        layout: TokenLayout | CustomLayout | None = None,
    ) -> None:
        self.keras_model = keras_model
        self.layout = layout
        self.layer_path = layer_path
        self.output_structure = output_structure
        self.channels_first = channels_first
        self.image_index = image_index
        self.image_channels_first = image_channels_first
        self.vocabularies = dict(vocabularies or {})

    def image(self, inputs: Any) -> Any:
        """The image input of `inputs` (same structure as `self.inputs`)."""
        return image_of(inputs, self.image_index)

    def image_size(self, inputs: Any) -> Any:
        """`(height, width)` of the image input, as a tensor."""
        return spatial_size(self.image(inputs), self.image_channels_first)

    @property
    def inputs(self) -> Any:
        return self.keras_model.input

    def __call__(self, inputs: Any) -> tuple[Any, Any]:
        values = self.keras_model(inputs, training=False)
        flat = list(values) if isinstance(values, (list, tuple)) else [values]
        if self.layer_path is None:
            activations, flat_outputs = None, flat
        else:
            activations, flat_outputs = flat[0], flat[1:]
        outputs = keras.tree.pack_sequence_as(self.output_structure, flat_outputs)
        return activations, outputs


def image_of(inputs: Any, index: int | None) -> Any:
    """The flattened `inputs`' leaf at `index`; an `InputError` when no input is an image."""
    if index is None:
        raise InputError(
            "None of the model's inputs is a 4-D (batch, height, width, channels) image "
            "(or, for 1-D and 3-D feature maps, a signal or a volume of their rank); "
            "Grad-CAM heatmaps are sized after that input."
        )
    return keras.tree.flatten(inputs)[index]


def _rank(tensor: Any) -> int | None:
    shape = getattr(tensor, "shape", None)
    return None if shape is None else len(shape)


def _fresh_inputs(model: keras.Model, sample_shape: tuple[int, ...] | None) -> Any:
    """New `keras.Input`s with the model's input structure and a free batch size."""
    try:
        reference = model.input
    except (AttributeError, ValueError):
        reference = None
    if reference is None:
        if sample_shape is None:
            raise UnsupportedModelError(
                f"Model {model.name!r} has no defined inputs yet (a Sequential model built "
                "without `keras.Input`). Call it once on a batch, declare "
                "`keras.Input(shape)` as its first layer, or pass images so the input "
                "shape can be inferred."
            )
        return keras.Input(shape=tuple(sample_shape[1:]), dtype=model.dtype)
    if isinstance(reference, dict):  # Keras wants each dict key to be its input's name
        return {
            key: keras.Input(shape=tuple(x.shape[1:]), dtype=x.dtype, name=key)
            for key, x in reference.items()
        }
    return keras.tree.map_structure(
        lambda x: keras.Input(shape=tuple(x.shape[1:]), dtype=x.dtype), reference
    )


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        if is_legacy_keras(model):
            module = type(model).__module__
            raise UnsupportedModelError(
                f"`model` is a tf.keras (Keras 2) model ({module}.{type(model).__name__}); "
                "this method re-runs a Keras 3 graph layer by layer (GradCAM, the CAM "
                "methods but Ablation-CAM, the guided methods and GradCAMCallback take "
                "tf.keras models). Rebuild the architecture with Keras 3 (`import keras`) "
                "and load the weights into it, e.g. model.save_weights('w.h5') under "
                "tf.keras, then keras_model.load_weights(...) on a Keras 3 model with the "
                "same layers."
            )
        raise UnsupportedModelError(
            f"`model` must be a keras.Model. Received: model={type(model).__name__}."
        )
    if not is_expandable(model):
        raise UnsupportedModelError(
            f"Model {model.name!r} is a subclassed keras.Model ({type(model).__name__}); "
            "its call() hides the inner layers this method needs (GradCAM and the CAM "
            "methods built on it explain it by capturing a layer during its call: pass "
            "layer=). Build it as a functional "
            "model (keras.Model(inputs, outputs)) or keras.Sequential, e.g. by calling its "
            "layers on `keras.Input` tensors, then explain that model; its weights are shared."
        )


def _rewire(
    model: keras.Model, sample_shape: tuple[int, ...] | None, call_override: CallOverride | None
) -> tuple[_Rewiring, Any, Any]:
    _check_model(model)
    inputs = _fresh_inputs(model, sample_shape)
    rewiring = _Rewiring(call_override=call_override)
    for position, leaf in enumerate(keras.tree.flatten(inputs)):
        rewiring.sources[id(leaf)] = frozenset({position})
        rewiring.input_positions[id(leaf)] = position
        rewiring.input_ranks[position] = len(leaf.shape)
        if len(leaf.shape) == 4:
            channels_first = keras.config.image_data_format() == "channels_first"
            rewiring.input_shapes[position] = (
                tuple(leaf.shape[2:4]) if channels_first else tuple(leaf.shape[1:3])
            )
    outputs = rewiring.run(model, inputs, prefix="")
    sizes = {tuple(leaf.shape[1:-1]) for leaf in keras.tree.flatten(inputs)}
    rewiring.dense_predictions = {
        id(tensor)
        for tensor in keras.tree.flatten(outputs)
        if _rank(tensor) in (3, 4, 5) and tuple(tensor.shape[1:-1]) in sizes
    }
    return rewiring, inputs, outputs


def layer_paths(model: keras.Model, *, spatial_only: bool = False) -> list[str]:
    """Paths of the model's layers, nested models expanded, in call order.

    Args:
        model: a Functional or Sequential `keras.Model`.
        spatial_only: keep only layers with a feature-map output: 4-D
            `(batch, height, width, channels)`, or 3-D / 5-D in Conv1D / Conv3D
            networks (see `_Rewiring.is_spatial`).

    Returns:
        Paths such as `"resnet50/conv5_block3_out"`; top-level layers have no prefix.

    Raises:
        UnsupportedModelError: for subclassed models.

    Example:
        >>> layer_paths(model, spatial_only=True)[-1]
        'conv2d_2'
    """
    rewiring, _, _ = _rewire(model, None, None)
    paths = rewiring.order
    if spatial_only:
        paths = [p for p in paths if rewiring.is_spatial(rewiring.outputs[p][0])]
    return paths


def _default_path(model: keras.Model, rewiring: _Rewiring) -> str:
    """The layer `layer=None` explains: the last feature map before the global pooling.

    The rule, in three steps:

    1. The candidates are the feature maps (4-D, or 3-D / 5-D in networks on
       signals / volumes, see `_Rewiring.is_spatial`) of leaf layers (nested models
       opened, input layers and layers called more than once left out). Those
       computed only from globally pooled
       features are dropped unless nothing else is left: MobileNet's 1x1
       `conv_preds` classifier after the pooling, squeeze-and-excitation branches.
       So is a model output at an input's resolution (a segmenter's per-pixel
       scores are the scores, not a feature map), and a convolution whose
       output only gets resized into such an output (SegFormer's class scores
       at 1/4 resolution): the default steps back to the layer feeding it.
    2. Trailing max/average pooling is stepped over (VGG16: `block5_conv3`, the
       paper's conv5_3, not `block5_pool`).
    3. A *class-score convolution* is stepped over. When the last candidate is
       a convolution (`Conv2D`, `SeparableConv2D`, or their 1-D/3-D kin), or
       its own activation, batch normalisation or dropout, and its output
       reaches the model's output through global pooling and a softmax or
       sigmoid, with nothing else on the way but `Activation`, `Flatten`,
       `Reshape`, batch normalisation or dropout, then it has one channel per
       class and the pooled channel c *is* the score y^c (Network in Network,
       SqueezeNet's `conv10`, mini-Xception). Grad-CAM there is ReLU(A^c / Z),
       the class's own channel, not a gradient-weighted sum of features, and
       the paper (§3) explains the last convolutional *feature* layer: the
       default is the layer that feeds the class-score convolution (dropout and
       max/average pooling between the two stepped over too). Left alone: a
       convolution followed, after the pooling, by anything else (a `Dense`
       layer, a 1x1 classifier), whatever its number of channels, as it is a
       feature layer; a head without softmax/sigmoid (a backbone with
       `pooling="avg"` outputs features, not class scores); a class
       convolution reading the input directly, or whose scores also depend on
       other layers. `benchmarks/default_layer.py` compares the layers.

    `layer=` still selects any layer, the class-score convolution included.
    """
    candidates = [
        p
        for p in rewiring.order
        if rewiring.is_spatial(rewiring.outputs[p][0])
        and not isinstance(rewiring.layers[p], keras.layers.InputLayer)
        and not is_expandable(rewiring.layers[p])
    ]
    # A layer called on several inputs (a detector's head shared by the pyramid levels)
    # has no single activation to explain.
    candidates = [p for p in candidates if len(rewiring.outputs[p]) == 1] or candidates
    if not candidates:
        transformer = _default_token_path(model, rewiring)
        if transformer is not None:
            return transformer
        raise NotSpatialError(
            f"Model {model.name!r} has no layer with a 4-D (batch, height, width, "
            "channels) output (nor a 3-D / 5-D one computed from a signal / volume input), "
            "so there is no convolutional feature map to explain. "
            "Grad-CAM needs a convolutional layer; pass `layer=` explicitly if one "
            "exists inside a layer this library cannot open."
        )
    before_pooling = [p for p in candidates if id(rewiring.outputs[p][0]) not in rewiring.pooled]
    candidates = before_pooling or candidates
    # A per-pixel output (segmentation scores at the image's size) is the scores
    # themselves, not a feature map: the default is the layer before it.
    features = [
        p for p in candidates if id(rewiring.outputs[p][0]) not in rewiring.dense_predictions
    ]
    candidates = features or candidates
    if _resized_class_scores(rewiring, candidates):
        candidates = candidates[:-1]
        while len(candidates) > 1 and isinstance(
            rewiring.layers[candidates[-1]], keras.layers.Dropout
        ):
            candidates.pop()
    while len(candidates) > 1 and isinstance(rewiring.layers[candidates[-1]], _LOCAL_POOLING):
        candidates.pop()
    return _class_conv_feeder(rewiring, candidates) or candidates[-1]


def _default_token_path(model: keras.Model, rewiring: _Rewiring) -> str | None:
    """`layer=None` for a transformer on images (no convolutional feature map), else `None`.

    The token layers are the graph's `(batch, tokens, channels)` outputs computed
    from an image whose tokens lie on a patch grid (`tf_gradcam.tokens`). When the
    last of them has no prefix token (Swin: the head averages all tokens), it is
    the default, as the last feature map is for a CNN. When it has a class token,
    the head reads that token only and the last block's output gives zero
    gradients on the patches: the default is the *input of the last block*, the
    output of the block before it (with one block, or blocks that are graph
    nodes, the token layer before the last). `benchmarks/vit_layers.py`
    compares the layers (docs/transformers.md).
    The blocks are the shallowest list of two or more layers of one class among
    the model's attributes (keras-hub's `ViTEncoder.encoder_layers`, DINOv2's
    `encoder.layers`), captured during the model's call.
    """
    image = {position for position, rank in rewiring.input_ranks.items() if rank == 4}
    tokens = [
        p
        for p in rewiring.order
        if _rank(rewiring.outputs[p][0]) == 3
        and not isinstance(rewiring.layers[p], keras.layers.InputLayer)
        and not is_expandable(rewiring.layers[p])
        and id(rewiring.outputs[p][0]) not in rewiring.pooled
        and rewiring.sources.get(id(rewiring.outputs[p][0]), frozenset()) & image
    ]
    layouts = {}
    for p in tokens:
        tensor = rewiring.outputs[p][0]
        source = min(rewiring.sources[id(tensor)] & image)
        size = rewiring.input_shapes[source]
        try:
            layouts[p] = token_layout(tensor.shape[1], size, layers=rewiring.layers.values())
        except NotSpatialError:
            continue
    tokens = [p for p in tokens if p in layouts]
    if not tokens:
        return None
    if layouts[tokens[-1]].prefix == 0:
        return tokens[-1]
    lists: dict[str, list[Any]] = {}
    for path, layer in layer_candidates(model):
        parent, _, index = path.rpartition("/")
        if index.isdigit():
            lists.setdefault(parent, []).append(layer)
    blocks = [
        (parent.count("/"), -len(items), parent)
        for parent, items in lists.items()
        if len(items) >= 2 and len({type(item) for item in items}) == 1
    ]
    if blocks:
        _, count, parent = min(blocks)
        return f"{parent}/{-count - 2}"
    # blocks as graph nodes (or a single block): the token layer before the last
    return tokens[-2] if len(tokens) >= 2 else tokens[0]


def _resized_class_scores(rewiring: _Rewiring, candidates: list[str]) -> bool:
    """Whether `candidates[-1]` is a segmenter's class-score convolution at low resolution.

    A convolution whose output reaches a per-pixel model output through
    resizing and activations only (SegFormer's head: class scores at 1/4 of
    the image, then `Resizing`) holds the scores, not features.
    """
    if len(candidates) < 2 or not isinstance(rewiring.layers[candidates[-1]], _CLASS_CONVOLUTIONS):
        return False
    leaves = [p for p in rewiring.order if not is_expandable(rewiring.layers[p])]
    after = leaves[leaves.index(candidates[-1]) + 1 :]
    return (
        bool(after)
        and any(isinstance(rewiring.layers[p], _RESIZES) for p in after)
        and all(
            isinstance(
                rewiring.layers[p], (*_RESIZES, keras.layers.Activation, keras.layers.Softmax)
            )
            for p in after
        )
        and id(rewiring.outputs[after[-1]][0]) in rewiring.dense_predictions
    )


def _class_conv_feeder(rewiring: _Rewiring, candidates: list[str]) -> str | None:
    """The feature layer feeding a class-score convolution at `candidates[-1]`, else `None`.

    Step 3 of `_default_path`. The layers are read in call order, which in a
    chain ending in the model's output is the graph's order; a functional model
    built between the feature map and the output then checks that the chain
    is the whole graph between them.
    """
    leaves = [p for p in rewiring.order if not is_expandable(rewiring.layers[p])]
    conv_at = leaves.index(candidates[-1])
    while conv_at > 0 and isinstance(rewiring.layers[leaves[conv_at]], _PER_CHANNEL):
        conv_at -= 1  # the class convolution's own activation, batch norm, dropout
    conv = rewiring.layers[leaves[conv_at]]
    if not isinstance(conv, _CLASS_CONVOLUTIONS):
        return None
    feeder_at = conv_at - 1
    while feeder_at >= 0 and isinstance(
        rewiring.layers[leaves[feeder_at]], (keras.layers.Dropout, *_LOCAL_POOLING)
    ):
        feeder_at -= 1
    if feeder_at < 0 or leaves[feeder_at] not in candidates:
        return None
    head = [rewiring.layers[p] for p in leaves[conv_at + 1 :]]
    pooling = [i for i, layer in enumerate(head) if isinstance(layer, _GLOBAL_POOLING)]
    if len(pooling) != 1:
        return None
    before, after = head[: pooling[0]], head[pooling[0] + 1 :]
    if not all(isinstance(layer, _PER_CHANNEL) for layer in before) or not all(
        isinstance(layer, _SCORE_PRESERVING) or (is_operation(layer) and is_squashing_head(layer))
        for layer in after
    ):
        return None
    if not any(is_squashing_head(layer) for layer in after):
        return None  # pooled features, not class scores: a backbone with `pooling="avg"`
    chain = leaves[feeder_at:]
    if any(len(rewiring.outputs[p]) != 1 for p in chain):
        return None  # a shared layer: the call order says nothing about its other calls
    # Global pooling, then layers that keep each value apart: one score per channel of `conv`.
    features, scores = rewiring.outputs[chain[0]][0], rewiring.outputs[chain[-1]][0]
    try:
        between = keras.Model(features, scores, name="class_head_check").operations
    except ValueError:  # the scores depend on more than this feature map
        return None
    wrapped = [getattr(op, "wrapped", op) for op in between]
    wrapped = [op for op in wrapped if not isinstance(op, keras.layers.InputLayer)]
    if wrapped != [rewiring.layers[p] for p in chain[1:]]:
        return None
    return chain[0]


def _resolve_path(
    model: keras.Model, layer: str | keras.Operation | None, rewiring: _Rewiring
) -> str:
    """Turn the user's `layer` argument into a path of the rewired graph."""
    paths = rewiring.order
    if layer is None:
        return _default_path(model, rewiring)
    if isinstance(layer, keras.Operation):
        matches = [p for p in paths if rewiring.layers[p] is layer]
        if not matches:
            raise LayerNotFoundError(
                f"Layer {layer.name!r} is not part of model {model.name!r}. Received: "
                f"layer={layer!r}. Pass one of the model's layers or its name."
            )
        return matches[0]
    if not isinstance(layer, str):
        raise LayerNotFoundError(
            f"`layer` must be a name, a path 'outer/inner', a keras Layer or None. "
            f"Received: layer={layer!r} of type {type(layer).__name__}."
        )
    if layer in rewiring.outputs:
        return layer
    by_name = [p for p in paths if p.rsplit("/", 1)[-1] == layer]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        raise LayerNotFoundError(
            f"Layer name {layer!r} is ambiguous in model {model.name!r}: it matches "
            f"{by_name}. Pass the full path instead, e.g. layer={by_name[-1]!r}."
        )
    close = difflib.get_close_matches(
        layer, paths + [p.rsplit("/", 1)[-1] for p in paths], n=5, cutoff=0.4
    )
    spatial = [p for p in paths if rewiring.is_spatial(rewiring.outputs[p][0])][-8:]
    hint = f" Closest names: {close}." if close else ""
    raise LayerNotFoundError(
        f"No layer {layer!r} in model {model.name!r}.{hint} Layers with a spatial "
        f"(4-D) output, last ones: {spatial}."
    )


def build_gradient_model(
    model: keras.Model,
    layer: str | keras.layers.Layer | None = None,
    *,
    logits: bool = True,
    expose_layer: bool = True,
    call_override: CallOverride | None = None,
    sample_shape: tuple[int, ...] | None = None,
    reshape: Callable[[Any], Any] | None = None,
) -> GradientModel:
    """Build the model that returns a layer's activations together with the scores.

    Args:
        model: a Functional or Sequential `keras.Model`, possibly with nested models;
            a subclassed model is handed to `tf_gradcam.capture` (run as it is).
        layer: name, `"outer/inner"` path, `Layer` object, or `None` for the last feature
            map before the global pooling (searching inside nested models; the rule is
            `_default_path`'s).
        logits: remove a trailing softmax/sigmoid from the outputs (the paper's y^c is
            the score *before* the softmax). The user's model is not changed.
        expose_layer: when `False`, only the outputs are computed (guided backprop).
        call_override: optional function returning a replacement call for a layer
            (used for guided/deconv ReLU).
        sample_shape: shape of a batch, used when the model has no defined inputs.
        reshape: a function turning the layer's `(batch, tokens, channels)` output into
            `(batch, rows, columns, channels)`; by default the patch grid of a token
            output computed from an image is inferred (`tf_gradcam.tokens`).

    A layer that is not a node of the model's graph but sits inside one of its
    layers (a transformer block inside keras-hub's `ViTEncoder`: a path of
    attributes such as `"backbone/encoder/encoder_layers/1"`, or the layer
    object) is captured while the model runs as it is (`tf_gradcam.capture`).

    Returns:
        A `GradientModel`.

    Raises:
        UnsupportedModelError: unbuilt Sequential models; see
            `capture.build_subclassed_gradient_model` for subclassed ones.
        LayerNotFoundError: unknown or ambiguous layer, with the closest names.
        NotSpatialError: the layer's output is not `(batch, height, width, channels)`.

    Example:
        >>> gm = build_gradient_model(model, "conv2d_1")
        >>> activations, scores = gm(images)
    """
    if isinstance(model, keras.Model) and not is_expandable(model):
        return build_subclassed_gradient_model(
            model,
            layer,
            logits=logits,
            expose_layer=expose_layer,
            call_override=call_override,
            sample_shape=sample_shape,
            reshape=reshape,
        )
    if is_legacy_keras(model):
        return build_legacy_gradient_model(
            model,
            layer,
            logits=logits,
            expose_layer=expose_layer,
            call_override=call_override,
        )
    rewiring, inputs, outputs = _rewire(model, sample_shape, call_override)
    flat_outputs = keras.tree.flatten(outputs)
    if logits:
        flat_outputs = [rewiring.logits.get(id(t), t) for t in flat_outputs]

    path = None
    channels_first = False
    exposed: list[Any] = []
    layout = None
    if expose_layer:
        try:
            path = _resolve_path(model, layer, rewiring)
        except LayerNotFoundError:
            if not _inside_a_layer(model, layer):
                raise
            path = layer
        if path not in rewiring.outputs:  # inside a layer: captured during the call
            # a ViT classifier's last block run for the class token only (same values)
            tail = None if reshape else class_token_tail(model, resolve_layer(model, path)[1])
            return build_subclassed_gradient_model(
                model,
                path,
                logits=logits,
                expose_layer=True,
                call_override=call_override,
                sample_shape=_input_shape(inputs),
                reshape=reshape,
                model_class=None if tail is None else partial(ClassTokenGradientModel, tail=tail),
            )
        calls = rewiring.outputs[path]
        if len(calls) > 1:
            raise LayerNotFoundError(
                f"Layer {path!r} is called {len(calls)} times in model {model.name!r} "
                "(a shared layer), so its activations are ambiguous. Choose a layer "
                "that is called once."
            )
        activation = calls[0]
        if isinstance(activation, (list, tuple, dict)):
            raise NotSpatialError(_not_spatial_message(path, activation, rewiring))
        if reshape is not None or (_rank(activation) == 3 and not rewiring.is_spatial(activation)):
            layout = _token_layout(model, path, activation, inputs, rewiring, reshape)
        elif not rewiring.is_spatial(activation):
            raise NotSpatialError(_not_spatial_message(path, activation, rewiring))
        channels_first = layout is None and rewiring.channels_first(activation)
        exposed = [activation]

    image_index, image_channels_first = rewiring.image_input(
        inputs, exposed[0] if exposed and layout is None else None
    )
    keras_model = keras.Model(inputs, exposed + flat_outputs, name=f"{model.name}_gradcam")
    return GradientModel(
        keras_model,
        layer_path=path,
        output_structure=outputs,
        channels_first=channels_first,
        image_index=image_index,
        image_channels_first=image_channels_first,
        vocabularies=rewiring.vocabularies,
        layout=layout,
    )


def _inside_a_layer(model: keras.Model, layer: Any) -> bool:
    """Whether `layer` names a layer reached through attributes, not a graph node."""
    if layer is None:
        return False
    try:
        resolve_layer(model, layer)
    except LayerNotFoundError:
        return False
    return True


def _input_shape(inputs: Any) -> Any:
    flat = keras.tree.flatten(inputs)
    if len(flat) != 1:
        raise UnsupportedModelError(
            "A layer inside another layer is captured during the model's call, which is "
            f"supported for models with one input; this model has {len(flat)}."
        )
    return tuple(flat[0].shape)


def _token_layout(
    model: keras.Model,
    path: str,
    activation: Any,
    inputs: Any,
    rewiring: _Rewiring,
    reshape: Callable[[Any], Any] | None,
) -> TokenLayout | CustomLayout:
    """The patch grid of a token output computed from an image (or the user's reshape)."""
    if reshape is not None:
        return CustomLayout(reshape)
    index, channels_first = rewiring.image_input(inputs, None)
    if index is None or _rank(keras.tree.flatten(inputs)[index]) != 4:
        raise NotSpatialError(_not_spatial_message(path, activation, rewiring))
    shape = keras.tree.flatten(inputs)[index].shape
    size = tuple(shape[2:4]) if channels_first else tuple(shape[1:3])
    return token_layout(
        activation.shape[1],
        size,
        layers=rewiring.layers.values(),
        where=f"Layer {path!r} (output shape {tuple(activation.shape)})",
    )


def _not_spatial_message(path: str, activation: Any, rewiring: _Rewiring) -> str:
    """Why a layer's output is no feature map, and which layers are."""
    shape = getattr(activation, "shape", "several tensors")
    candidates = [p for p in rewiring.order if rewiring.is_spatial(rewiring.outputs[p][0])][-3:]
    if _rank(activation) == 3 and not rewiring.is_spatial(activation):
        return (
            f"Layer {path!r} has output shape {shape}: a sequence computed from no image "
            "(nor from a 1-D signal input), so it is neither a signal's feature map nor "
            "a transformer's patch tokens. Choose a layer computed from the image or signal, "
            f"e.g. {candidates}, or pass `reshape=` to lay the sequence on a grid."
        )
    return (
        f"Layer {path!r} has output shape {shape}; Grad-CAM needs a convolutional feature "
        "map: 4-D (batch, height, width, channels), or 3-D (batch, length, channels) / 5-D "
        "(batch, depth, height, width, channels) in a network on signals / volumes. Choose "
        f"a convolutional layer, e.g. {candidates}."
    )

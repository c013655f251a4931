"""SegNet in Keras 3: a VGG16 encoder mirrored by a decoder that unpools with the pooling indices.

`build(name, num_classes, ...)` is the one builder that scripts, tests and benchmarks use:

- ``segnet``: VGG16's 13 convolutions in five blocks (64,64 | 128,128 | 256×3 | 512×3 | 512×3),
  each convolution followed by batch normalisation and ReLU, each block ending in 2×2 max pooling
  that remembers where its maxima were. The decoder mirrors the encoder block by block: it
  unpools with the matching indices (each value goes back to where its maximum was, zeros
  elsewhere), then runs convolutions mirroring the encoder's; the last convolution of decoder
  block k has the channel count of encoder block k-1 (Badrinarayanan et al., "SegNet", TPAMI
  2017, fig. 2). A 1×1 convolution to the classes and a float32 softmax close it: about 29.5 M
  trainable parameters at width 1, as in the paper.
- ``segnet-basic``: the same idea with four blocks of one convolution each (64, 128, 256, 512),
  for small machines. SegNet-Basic used 7×7 kernels; we use 3×3, which costs 49/9 ≈ 5.4× fewer
  multiply-adds per convolution and is what makes the model usable on CPUs.

Models take float32 (B, S, S, 3) RGB in 0..255 and return float32 (B, S, S, num_classes) softmax
probabilities. The first layer subtracts ImageNet's mean RGB (123.68, 116.779, 103.939) and does
not rescale: the input convention of Keras's VGG16 weights ("caffe" mode), whose blue-green-red
channel order is folded into the first kernel when those weights are copied in.

Pooling and unpooling are written with `keras.ops` only, so the JAX and PyTorch backends run
them too. The pooling mask is a (B, H, W, C) tensor in the compute dtype, 1 at each 2×2 window's
maximum (the first in row-major order on ties, so exactly one per window) and 0 elsewhere.

Batch normalisation runs through TensorFlow's fused kernel on that backend (same variables and
maths as Keras's layer, which it falls back to elsewhere). Measured on a 2-core AVX-512 CPU
(bench/results/model.json, CPU time): training segnet at 256×256 batch 8 reaches about 75% of
the machine's matmul rate in float32 and in bfloat16, 1.1-1.4× the same network in PyTorch.

Mixed precision (``mixed_precision=True``) gives every layer the ``mixed_bfloat16`` policy on
CPUs or ``mixed_float16`` on GPUs (variables stay float32; the softmax runs in float32); the
global Keras policy is left alone. XLA: pass ``jit_compile=`` to ``model.compile``;
`jit_compile_default()` says what we measured to be faster on this backend and device.

weights.hdf5 (written by `save`, read by `read_config` and `load`) is plain HDF5 (h5py):

- root attributes: ``format`` = "osmseg-weights", ``format_version`` = 1, ``config`` = JSON text
  of an object with ``name`` ("segnet" | "segnet-basic"), ``width`` (float), ``input_size``
  (int, pixels), ``num_classes`` (int, background included), ``classes`` (the classes file's
  JSON text, `osmseg.classes.Classes.to_json`, background not listed), ``mixed_precision``
  (bool), ``bn_momentum`` (float, optional, 0.99 if absent), plus whatever else the trainer
  adds (epochs, learning rate...); ``keras_version``, ``backend``.
- one float32 dataset per model variable, named by its layer path, in model order (attribute
  ``variables`` on the root lists the names in that order):
  ``encoder{k}_conv{i}/kernel`` (3, 3, in, out) and ``/bias`` (out,) for encoder block k=1..5
  (1..4 for segnet-basic) and its i-th convolution; ``encoder{k}_bn{i}/gamma``, ``beta``,
  ``moving_mean``, ``moving_variance`` (out,) for the batch normalisation after it (epsilon
  1e-3, y = gamma (x - mean) / sqrt(var + eps) + beta); ``decoder{k}_conv{i}`` and
  ``decoder{k}_bn{i}`` likewise for decoder block k (run from k=5 down to 1);
  ``classifier/kernel`` (1, 1, 64·width, num_classes) and ``classifier/bias``.
  Kernels are (height, width, in_channels, out_channels), inputs NHWC in RGB order after the
  mean subtraction above; padding "same"; pooling 2×2 stride 2.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from osmseg import atomic
from osmseg.classes import parse_classes
from osmseg.errors import ClassesError, WeightsError

MODELS = ("segnet", "segnet-basic")
FORMAT = "osmseg-weights"
FORMAT_VERSION = 1

# (filters, convolutions) per encoder block.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# SegNet-Basic's four levels, one convolution each.
BASIC_BLOCKS = ((64, 1), (128, 1), (256, 1), (512, 1))
ARCHITECTURES = {"segnet": VGG16_BLOCKS, "segnet-basic": BASIC_BLOCKS}

# ImageNet's mean RGB, which Keras's VGG16 weights expect subtracted ("caffe" preprocessing).
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
# Keras's default running-average momentum of batch norm; train.py chooses its own for new runs.
BN_MOMENTUM = 0.99
# Keras's published VGG16 convolutions without the classifier, as keras.applications.VGG16
# (include_top=False) fetches and checks them, into Keras's cache under the same name.
VGG16_NOTOP = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG16_NOTOP_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + VGG16_NOTOP
VGG16_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"
REQUIRED_CONFIG = ("name", "width", "input_size", "num_classes", "classes", "mixed_precision")


def channels(filters: int, width: float) -> int:
    """A block's channel count at a width multiplier: at least 1, a multiple of 8 from 8 up."""
    scaled = filters * width
    if scaled >= 8:
        return max(8, round(scaled / 8) * 8)
    return max(1, round(scaled))


def check_input_size(name: str, input_size: int) -> None:
    """Raise ValueError unless `input_size` is divisible by 2^(the model's poolings)."""
    step = 2 ** len(ARCHITECTURES[name])
    if not isinstance(input_size, int) or input_size < step or input_size % step:
        below = max(step, (int(input_size) // step) * step) if isinstance(input_size, (int, float)) else step
        raise ValueError(
            f"input size {input_size!r}: {name} pools {len(ARCHITECTURES[name])} times, so the size "
            f"must be a positive multiple of {step}; the nearest valid sizes are {below} and {below + step}"
        )


def dtype_policy(mixed_precision: bool | str) -> str:
    """The Keras dtype policy name for the mixed_precision option.

    True picks ``mixed_float16`` when Keras sees a GPU and ``mixed_bfloat16`` otherwise; a
    policy name ("float32", "mixed_bfloat16", "mixed_float16") is taken as given.
    """
    if isinstance(mixed_precision, str):
        if mixed_precision not in ("float32", "mixed_bfloat16", "mixed_float16"):
            raise ValueError(
                f"mixed_precision {mixed_precision!r}: use true/false, 'mixed_bfloat16' or 'mixed_float16'"
            )
        return mixed_precision
    if not mixed_precision:
        return "float32"
    if _has_gpu():
        return "mixed_float16"
    if not _cpu_has_bfloat16():
        warnings.warn("mixed precision: this CPU has no bfloat16 instructions, so it would be slower; using float32")
        return "float32"
    return "mixed_bfloat16"


def _cpu_has_bfloat16() -> bool:
    """Whether the CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # cannot tell (not Linux): let the backend decide
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _has_gpu() -> bool:
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def training_optimizer(optimizer, mixed_precision: bool | str):
    """The optimizer to compile with: wrapped in loss scaling when the policy is mixed_float16.

    Keras wraps it by itself only when the model's own policy is mixed_float16, and ours stays
    float32 (the policy is set per layer), so train.py calls this. bfloat16 needs no scaling.
    """
    import keras

    if dtype_policy(mixed_precision) == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def jit_compile_default() -> bool:
    """Whether to pass jit_compile=True to model.compile on this backend and device.

    On CPUs, TensorFlow's oneDNN convolutions beat XLA's: a segnet-basic training step took
    2.7× longer with jit_compile=True (bench/bench_model.py --jit), so XLA is only the default
    where a GPU is present.
    """
    return _has_gpu()


def _layers():
    """Our layers (pooling, unpooling, batch norm), defined on first use so that importing this
    module stays light (no keras)."""
    global MaxPoolingWithArgmax, MaxUnpooling, FusedBatchNormalization
    if "MaxPoolingWithArgmax" in globals():
        return MaxPoolingWithArgmax, MaxUnpooling, FusedBatchNormalization
    import keras
    from keras import layers, ops

    def _upsample(x):
        """Nearest-neighbour 2× upsampling: every value fills its 2×2 window."""
        return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)

    @keras.saving.register_keras_serializable(package="osmseg")
    class MaxPoolingWithArgmax(layers.Layer):
        """2×2 max pooling with stride 2 that also returns where each window's maximum was.

        Call on x (B, H, W, C) with even H and W. Returns (pooled, mask): pooled (B, H/2, W/2, C)
        holds each window's maximum; mask (B, H, W, C), in x's dtype, is 1 at the first maximum
        of each window in row-major order and 0 at the window's three other positions.
        """

        def call(self, inputs):
            height, width, depth = inputs.shape[1], inputs.shape[2], inputs.shape[3]
            pooled = ops.max_pool(inputs, pool_size=2, strides=2, padding="valid")
            # A pure reshape: window (i, j) of x is windows[:, i, :, j, :, :]. Positions that
            # hold their window's maximum score their row-major priority (4, 3, 2, 1); the
            # best score marks the first maximum. Two poolings and a few element-wise passes:
            # measured 2× faster on CPU than argmax over transposed windows, and than
            # tf.nn.max_pool_with_argmax with a scatter.
            windows = ops.reshape(inputs, (-1, height // 2, 2, width // 2, 2, depth))
            maxima = ops.reshape(pooled, (-1, height // 2, 1, width // 2, 1, depth))
            priority = ops.cast(ops.reshape(ops.array([[4, 3], [2, 1]]), (1, 1, 2, 1, 2, 1)), inputs.dtype)
            score = ops.where(ops.equal(windows, maxima), priority, ops.zeros_like(priority))
            score = ops.reshape(score, (-1, height, width, depth))
            best = ops.max_pool(score, pool_size=2, strides=2, padding="valid")
            mask = ops.cast(ops.equal(score, _upsample(best)), inputs.dtype)
            # The indices carry no gradient; the values' gradient flows through the pooling
            # kernel to the single maximum it picked.
            return pooled, ops.stop_gradient(mask)

        def compute_output_spec(self, inputs):
            batch, height, width, depth = inputs.shape
            pooled = keras.KerasTensor((batch, height // 2, width // 2, depth), dtype=self.compute_dtype)
            mask = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
            return pooled, mask

    @keras.saving.register_keras_serializable(package="osmseg")
    class MaxUnpooling(layers.Layer):
        """SegNet's upsampling: each value goes back to where its pooling window's maximum was.

        Call on [x, mask]: x (B, H, W, C) and the mask (B, 2H, 2W, C) that MaxPoolingWithArgmax
        returned. Returns (B, 2H, 2W, C): x at the mask's ones, zeros elsewhere.
        """

        def call(self, inputs):
            values, mask = inputs
            return _upsample(values) * ops.cast(mask, values.dtype)

        def compute_output_spec(self, inputs):
            _, mask = inputs
            return keras.KerasTensor(mask.shape, dtype=self.compute_dtype)

    @keras.saving.register_keras_serializable(package="osmseg")
    class FusedBatchNormalization(layers.BatchNormalization):
        """Keras's batch normalisation, run by TensorFlow's fused kernel on that backend.

        Same variables, same inference maths. Keras 3 normalises with separate mean, variance
        and scaling passes (and casts bfloat16 activations to float32 for the statistics);
        the fused kernel does it in one, measured 3× faster in float32 and 4× in bfloat16 for
        forward and backward on CPU. The moving variance is updated with the batch's unbiased
        variance (TensorFlow's convention) rather than the biased one. Other backends, and
        anything this path does not cover (masks, renorm, other axes), use Keras's own call.
        """

        def call(self, inputs, training=None, mask=None):
            if (
                keras.backend.backend() != "tensorflow"
                or mask is not None
                or self.renorm
                or self.synchronized
                or self.axis not in (-1, len(inputs.shape) - 1)
                or len(inputs.shape) != 4
            ):
                return super().call(inputs, training=training, mask=mask)
            import tensorflow as tf

            x = ops.cast(inputs, self.compute_dtype)
            scale = self.gamma if self.scale else tf.ones(x.shape[-1])
            offset = self.beta if self.center else tf.zeros(x.shape[-1])
            if training and self.trainable:
                y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                    x, scale, offset, self.moving_mean, self.moving_variance, epsilon=self.epsilon,
                    data_format="NHWC", is_training=True, exponential_avg_factor=1.0 - self.momentum,
                )
                self.moving_mean.assign(mean)
                self.moving_variance.assign(variance)
                return y
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, scale, offset, self.moving_mean, self.moving_variance, epsilon=self.epsilon,
                data_format="NHWC", is_training=False,
            )
            return y

    return MaxPoolingWithArgmax, MaxUnpooling, FusedBatchNormalization


def build(name: str, num_classes: int, input_size: int = 256, width: float = 1.0, **options: Any):
    """Build a SegNet.

    Args:
        name: one of MODELS.
        num_classes: the number of outputs per pixel, background included.
        input_size: the side of the square input in pixels; a multiple of 32 for segnet,
            16 for segnet-basic.
        width: channel multiplier (0.125 gives a tiny model for tests).
        **options: encoder_weights (None | "imagenet" | path to Keras's VGG16 weights .h5;
            segnet at width 1 only), mixed_precision (bool or a policy name), seed (int,
            for the initial weights), bn_momentum (the batch-norm layers' running-average
            momentum; default BN_MOMENTUM).

    Returns:
        A keras.Model from float32 (B, S, S, 3) RGB 0..255 to float32 (B, S, S, num_classes)
        softmax probabilities.

    Raises:
        ValueError: unknown name or option, bad input size, width or class count.
        WeightsError: encoder weights that cannot be had or do not fit.
    """
    unknown = set(options) - {"encoder_weights", "mixed_precision", "seed", "bn_momentum"}
    if unknown:
        raise ValueError(
            f"unknown model option(s) {sorted(unknown)}: use encoder_weights, mixed_precision, seed, bn_momentum"
        )
    bn_momentum = float(options.get("bn_momentum", BN_MOMENTUM))
    if not 0 <= bn_momentum < 1:
        raise ValueError(f"batch-norm momentum {bn_momentum!r}: use a fraction in [0, 1), e.g. 0.9")
    if name not in MODELS:
        raise ValueError(f"model {name!r}: choose one of {', '.join(MODELS)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes {num_classes!r}: need at least 2 (background and one class)")
    if not width > 0:
        raise ValueError(f"width {width!r}: use a positive multiplier such as 1.0 or 0.5")
    check_input_size(name, input_size)
    encoder_weights = options.get("encoder_weights")
    if encoder_weights is not None and (name != "segnet" or width != 1.0):
        raise ValueError(
            f"encoder weights are VGG16's: they fit segnet at width 1, not {name} at width {width}"
        )

    import keras
    from keras import layers

    seed = options.get("seed")
    seeds = iter(range(0 if seed is None else int(seed) * 1000, 10**9))
    policy = dtype_policy(options.get("mixed_precision", False))
    MaxPooling, Unpooling, BatchNormalization = _layers()
    blocks = [(channels(filters, width), convs) for filters, convs in ARCHITECTURES[name]]

    def initializer():
        # He initialisation suits ReLU networks (the SegNet paper used it); a seed makes the
        # initial weights reproducible without touching Keras's global random state.
        return keras.initializers.HeNormal(seed=None if seed is None else next(seeds))

    def conv_bn_relu(x, filters, label):
        block, index = label
        x = layers.Conv2D(
            filters, 3, padding="same", kernel_initializer=initializer(), name=f"{block}_conv{index}", dtype=policy
        )(x)
        x = BatchNormalization(name=f"{block}_bn{index}", momentum=bn_momentum, dtype=policy)(x)
        return layers.ReLU(name=f"{block}_relu{index}", dtype=policy)(x)

    inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="image")
    x = layers.Rescaling(1.0, offset=[-m for m in IMAGENET_MEAN_RGB], name="imagenet_mean", dtype=policy)(inputs)

    # Encoder: VGG16's blocks; each pooling step remembers where its maxima were.
    masks = []
    for number, (filters, convs) in enumerate(blocks, start=1):
        for index in range(1, convs + 1):
            x = conv_bn_relu(x, filters, (f"encoder{number}", index))
        x, mask = MaxPooling(name=f"encoder{number}_pool", dtype=policy)(x)
        masks.append(mask)

    # Decoder: the encoder in reverse; unpool with block k's indices, then convolve, the last
    # convolution narrowing to block k-1's channels (block 1's own at the end).
    for number in range(len(blocks), 0, -1):
        filters, convs = blocks[number - 1]
        narrowed = blocks[number - 2][0] if number > 1 else filters
        x = Unpooling(name=f"decoder{number}_unpool", dtype=policy)([x, masks[number - 1]])
        for index in range(1, convs + 1):
            x = conv_bn_relu(x, narrowed if index == convs else filters, (f"decoder{number}", index))

    x = layers.Conv2D(num_classes, 1, kernel_initializer=initializer(), name="classifier", dtype=policy)(x)
    outputs = layers.Softmax(axis=-1, name="softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name=name.replace("-", "_"))

    if encoder_weights is not None:
        load_vgg16_encoder(model, *_vgg16_convs(encoder_weights))
    return model


def _vgg16_convs(encoder_weights: str) -> tuple[str, list]:
    """(origin, [(name, kernel, bias), ...]) of VGG16's convolutions, from a file or Keras's cache."""
    if encoder_weights != "imagenet":
        path = Path(encoder_weights)
        if not path.is_file():
            raise WeightsError(
                f"encoder weights {encoder_weights}: no such file; pass Keras's VGG16 weights "
                f"({VGG16_NOTOP}), 'imagenet' or none"
            )
        return str(path), _read_vgg16_convs(path)
    path = imagenet_vgg16_file()
    return f"Keras's VGG16 ImageNet weights ({path})", _read_vgg16_convs(path)


def imagenet_vgg16_file() -> Path:
    """Keras's VGG16 ImageNet weights without the classifier: the copy in Keras's cache,
    $KERAS_HOME/models (default ~/.keras/models), else downloaded there once, checksum checked.

    A copy already there is read unchecked: whoever put it there (a download from another
    machine, a mirror) chose it, and one that is not VGG16's fails in load_vgg16_encoder.

    Raises:
        WeightsError: no copy in the cache and the download failed (offline, say).
    """
    # Read here, not from Keras's config: Keras reads KERAS_HOME once, when imported.
    cached = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models" / VGG16_NOTOP
    if cached.is_file():
        return cached
    import keras

    try:
        downloaded = keras.utils.get_file(
            VGG16_NOTOP, VGG16_NOTOP_URL, cache_dir=str(cached.parent.parent), cache_subdir="models",
            file_hash=VGG16_NOTOP_MD5,
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001  (keras raises a bare Exception when a download fails)
        raise WeightsError(
            f"encoder weights 'imagenet': {cached} is missing and Keras's VGG16 ImageNet weights could not be "
            f"downloaded ({error}); this needs network access once. Download {VGG16_NOTOP_URL} elsewhere and "
            f"put it at {cached} (or pass its PATH), or use --encoder-weights none"
        ) from None
    return Path(downloaded)


def _read_vgg16_convs(path: Path) -> list[tuple[str, Any, Any]]:
    """(name, kernel, bias) of the 3×3 convolutions in a Keras VGG16 weights file, in order.

    Reads Keras 2's legacy layout (root attribute layer_names; a group per layer whose
    weight_names attribute lists kernel then bias), which is what keras.applications
    downloads, and Keras 3's .weights.h5 (layers/<name>/vars/0 and 1) by layer name order.
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise WeightsError(f"encoder weights {path}: not an HDF5 file ({error}); pass Keras's VGG16 weights .h5") from None
    convs = []
    with f:
        if "layer_names" in f.attrs:
            for layer in f.attrs["layer_names"]:
                layer = layer.decode() if isinstance(layer, bytes) else str(layer)
                group = f[layer]
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
                arrays = [group[n][()] for n in names]
                if len(arrays) == 2 and arrays[0].ndim == 4:
                    convs.append((layer, arrays[0], arrays[1]))
        elif "layers" in f:
            for layer in sorted(f["layers"], key=_natural_key):
                group = f["layers"][layer]
                if "vars" in group and len(group["vars"]) == 2 and group["vars"]["0"].ndim == 4:
                    convs.append((layer, group["vars"]["0"][()], group["vars"]["1"][()]))
    return convs


def _natural_key(text: str) -> list:
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def load_vgg16_encoder(model, origin: str, convs: list) -> None:
    """Copy VGG16's 13 convolutions (from _vgg16_convs) into a segnet's encoder, in order.

    The first kernel's input channels are reversed: VGG16 was trained on blue-green-red input
    and our models take red-green-blue.

    Raises:
        WeightsError: the file is unreadable or its convolutions do not fit the encoder.
    """
    targets = [layer for layer in model.layers if layer.name.startswith("encoder") and "_conv" in layer.name]
    if len(convs) != len(targets):
        raise WeightsError(
            f"encoder weights {origin}: found {len(convs)} convolutions, segnet's encoder has {len(targets)}; "
            "pass Keras's VGG16 weights (include_top or not)"
        )
    for number, ((source, kernel, bias), layer) in enumerate(zip(convs, targets)):
        if number == 0:
            kernel = kernel[:, :, ::-1, :]
        expected = tuple(layer.kernel.shape)
        if kernel.shape != expected or bias.shape != tuple(layer.bias.shape):
            raise WeightsError(
                f"encoder weights {origin}: {source} has kernel {kernel.shape}, {layer.name} needs {expected}"
            )
        layer.kernel.assign(kernel)
        layer.bias.assign(bias)


def _check_config(config: dict, origin: str) -> dict:
    """Raise WeightsError naming the key when a weights config is incomplete or inconsistent."""
    missing = [key for key in REQUIRED_CONFIG if key not in config]
    if missing:
        raise WeightsError(f"{origin}: config lacks {', '.join(missing)}; re-train to write a complete weights file")
    if config["name"] not in MODELS:
        raise WeightsError(f"{origin}: unknown architecture {config['name']!r} (this version knows {', '.join(MODELS)})")
    try:
        classes = parse_classes(config["classes"], origin=f"{origin} classes", require_filters=False)
    except ClassesError as error:
        raise WeightsError(f"{origin}: its classes do not parse: {error}") from None
    if classes.num_classes != config["num_classes"]:
        raise WeightsError(
            f"{origin}: num_classes {config['num_classes']} but its classes list {classes.num_classes} "
            "(background included); the file is inconsistent, re-train"
        )
    return config


def save(model, path: str | os.PathLike, config: dict) -> None:
    """Write the model's variables and its configuration to an HDF5 file, atomically.

    Args:
        model: a model from build().
        path: the weights file (conventionally weights.hdf5).
        config: name, width, input_size, num_classes, classes (Classes.to_json() text),
            mixed_precision, plus any extra JSON-able keys (kept as given).
    """
    import h5py
    import keras

    missing = [key for key in REQUIRED_CONFIG if key not in config]
    if missing:
        raise ValueError(f"save: config lacks {', '.join(missing)}")
    try:
        _check_config(config, "save config")
    except WeightsError as error:
        raise ValueError(str(error)) from None
    output_classes = model.outputs[0].shape[-1]
    if output_classes != config["num_classes"]:
        raise ValueError(f"save: model has {output_classes} outputs, config says {config['num_classes']}")
    names = [variable.path for variable in model.weights]
    if len(set(names)) != len(names):
        raise ValueError("save: the model's variable paths are not unique")
    with atomic.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["config"] = json.dumps(config, sort_keys=True)
        f.attrs["keras_version"] = keras.__version__
        f.attrs["backend"] = keras.backend.backend()
        f.attrs["variables"] = json.dumps(names)
        for variable in model.weights:
            f.create_dataset(variable.path, data=keras.ops.convert_to_numpy(variable.value).astype("float32"))


def _open(path: str | os.PathLike):
    import h5py

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such weights file; train one with `make train` (train.py) or pass its path")
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise WeightsError(f"{path}: not a readable HDF5 file ({error}); it is corrupt or not a weights file") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise WeightsError(
            f"{path}: not an osmseg weights file (no format attribute {FORMAT!r}); "
            "Keras's own .weights.h5 files are loaded with keras, ours are written by train.py"
        )
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        f.close()
        raise WeightsError(f"{path}: weights format version {version} is newer than this code's {FORMAT_VERSION}; update osmseg")
    return f


def read_config(path: str | os.PathLike) -> dict:
    """The configuration a weights file was saved with (see save); raises WeightsError."""
    with _open(path) as f:
        try:
            config = json.loads(f.attrs["config"])
        except (KeyError, ValueError) as error:
            raise WeightsError(f"{path}: its config attribute is missing or not JSON ({error}); re-train") from None
    return _check_config(config, str(path))


def check_compatible(config: dict, expect: dict, origin: str = "weights") -> None:
    """Raise WeightsError if a weights config differs from what the caller needs.

    Args:
        config: a config from read_config.
        expect: keys and the values needed, e.g. {"num_classes": 7, "name": "segnet"};
            "classes" compares class names and colours.
        origin: the weights file's name, for the message.
    """
    for key, wanted in expect.items():
        if key == "classes":
            have = parse_classes(config["classes"], require_filters=False)
            want = parse_classes(wanted, require_filters=False) if isinstance(wanted, str) else wanted
            have_pairs = [(c.name, c.color) for c in have.classes]
            want_pairs = [(c.name, c.color) for c in want.classes]
            if have_pairs != want_pairs:
                raise WeightsError(
                    f"{origin}: trained for classes {have.names} but these are {want.names} "
                    "(names or colours differ); use the classes file it was trained with or re-train"
                )
        elif config.get(key) != wanted:
            what = {"name": "architecture", "num_classes": "number of classes"}.get(key, key)
            raise WeightsError(
                f"{origin}: made for {what} {config.get(key)!r}, expected {wanted!r}; "
                "pass the matching weights file or re-train"
            )


def load(path: str | os.PathLike, input_size: int | None = None, expect: dict | None = None):
    """Rebuild the model a weights file describes and load its variables.

    Args:
        path: a file written by save().
        input_size: build for this input size instead of the trained one (the convolutions
            do not depend on it).
        expect: checked with check_compatible before anything is built.

    Returns:
        (model, config).

    Raises:
        WeightsError: missing, corrupt, not ours, or not what `expect` asks for.
    """
    config = read_config(path)
    if expect:
        check_compatible(config, expect, str(path))
    size = config["input_size"] if input_size is None else input_size
    model = build(
        config["name"], config["num_classes"], input_size=size, width=config["width"],
        mixed_precision=config["mixed_precision"], bn_momentum=config.get("bn_momentum", BN_MOMENTUM),
    )
    with _open(path) as f:
        stored = set(json.loads(f.attrs["variables"])) if "variables" in f.attrs else None
        wanted = [variable.path for variable in model.weights]
        if stored is not None and stored != set(wanted):
            extra, lacking = sorted(stored - set(wanted)), sorted(set(wanted) - stored)
            raise WeightsError(
                f"{path}: its variables do not match a {config['name']} at width {config['width']} "
                f"(missing {lacking[:3]}, unexpected {extra[:3]}); the file is corrupt or edited"
            )
        for variable in model.weights:
            try:
                array = f[variable.path][()]
            except (KeyError, OSError) as error:
                raise WeightsError(f"{path}: cannot read variable {variable.path} ({error}); the file is corrupt") from None
            if tuple(array.shape) != tuple(variable.shape):
                raise WeightsError(
                    f"{path}: variable {variable.path} has shape {array.shape}, the model needs "
                    f"{tuple(variable.shape)}; the file is corrupt or edited"
                )
            variable.assign(array)
    return model, config


def inference(model):
    """A function running the model in inference mode on a batch: float32 (B, S, S, 3)
    RGB 0..255 -> numpy (B, S, S, num_classes) probabilities.

    With TensorFlow it is a tf.function around the model's call, traced once per batch
    shape, whose output numpy shares the tensor's memory: 7-10% less time a batch of eight
    than predict_on_batch, which runs a distribution step and copies its output (demo
    model, issue 8). Other backends use predict_on_batch.
    """
    import keras
    import numpy as np

    if keras.backend.backend() != "tensorflow":
        return model.predict_on_batch
    import tensorflow as tf

    call = tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)
    return lambda batch: np.asarray(call(batch))


def flops_per_image(model) -> int:
    """Forward floating-point operations per image: 2 × the convolutions' multiply-adds.

    Batch normalisation, activations, pooling and the softmax are left out: they are memory
    bound and below 1% of the count. Training costs about 3× this (forward, and the gradients
    with respect to inputs and to weights).
    """
    total = 0
    for layer in model.layers:
        if layer.__class__.__name__ == "Conv2D":
            _, height, width, out_channels = layer.output.shape
            kh, kw, in_channels, _ = layer.kernel.shape
            total += 2 * height * width * out_channels * kh * kw * in_channels
    return int(total)


def parameter_count(model, trainable_only: bool = True) -> int:
    """The number of (trainable) parameters."""
    variables = model.trainable_weights if trainable_only else model.weights
    return int(sum(math.prod(v.shape) for v in variables))

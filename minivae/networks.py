"""The encoder and decoder networks, each written down as a short list of layers.

A :class:`Layer` names one op pair and the parameters it owns; it holds no arrays and runs nothing.
:class:`~minivae.model.VAE` walks the lists: forward in order, backward in reverse order, every layer
through its own op pair (``VAE._layer_forward`` / ``VAE._layer_backward``).  So the objective chain
(reparameterization, KL, likelihood, IWAE, free bits) is written once, in the model, and only these
lists differ between architectures.

A VAE has four lists (:class:`Networks`):

    encoder     x rows (N, D) -> h            e.g. dense enc.0, act
    enc_heads   h -> mu, h -> logvar          two layers that both read h (their gradients add)
    decoder     z (M, L) -> g                 e.g. dense dec.0, act
    dec_heads   g -> out [, g -> out_logvar]  the raw outputs, flattened to rows (M, D) by the model

For the fully connected VAE (``hidden=(400,)``)::

    encoder   = [dense enc.0 (784, 400), act]
    enc_heads = [dense enc.mu (400, L), dense enc.logvar (400, L)]
    decoder   = [dense dec.0 (L, 400), act]
    dec_heads = [dense dec.out (400, 784)]           (+ dense dec.out_logvar for a learned variance)

The convolutional VAEs (``arch="conv"`` and ``"conv-pool"``, image (C, H, W), H and W divisible by
4, F = (64, H/4, W/4) the feature map, |F| = 64·H/4·W/4) differ only in these lists::

    arch="conv"                                     arch="conv-pool"
    encoder   unflatten (C, H, W)                   unflatten (C, H, W)
              conv enc.conv.0 C->32 k4 s2 p1, act   conv enc.conv.0 C->32 k3 p1, act, maxpool 2
              conv enc.conv.1 32->64 k4 s2 p1, act  conv enc.conv.1 32->64 k3 p1, act, maxpool 2
              flatten, dense enc.0 |F|->256, act    (the same)
    enc_heads dense enc.mu, enc.logvar 256->L       (the same)
    decoder   dense dec.0 L->256, act               (the same)
              dense dec.1 256->|F|, act             (the same)
              unflatten F                           unflatten F
              deconv dec.deconv.0 64->32 k4 s2 p1,  upsample 2, conv dec.conv.0 64->32 k3 p1, act,
              act                                   upsample 2
    dec_heads deconv dec.deconv.1 32->C k4 s2 p1    conv dec.conv.1 32->C k3 p1

(256 is ``hidden``; more widths add dense layers as in the fully connected VAE.)  A learned output
variance adds a head ``dec.out_logvar`` of the same kind as the output head.

A conditional VAE (``n_classes=K``, :mod:`minivae.conditional`) adds one layer without parameters,
``concat`` ([h, onehot(y)], K more columns), right before the first dense layer of each network: the
first layer of the fully connected encoder, the encoder's dense layer after ``flatten`` for conv, and the
decoder's input z.  The dense layer after it reads K more inputs::

    encoder   = [concat y, dense enc.0 (784 + K, 400), act]          (conv: ..., flatten, concat y, dense enc.0)
    decoder   = [concat y, dense dec.0 (L + K, 400), act]

``VAEConfig.label_decoder`` says how the decoder reads y (:data:`LABEL_DECODERS`); the encoder is the same::

    "input"   decoder = [concat y, dense dec.0 (L + K, 400), act]                    (the default above)
    "outer"   decoder = [outer y, concat y, dense dec.0 (L + L·K + K, 400), act]     [z, vec(z ⊗ y), y]
    "every"   decoder = [concat y, dense dec.0 (L + K, 400), act, concat y]; dec_heads read 400 + K

and ``VAEConfig.label_encoder="outer"`` ends the encoder with ``outer y``: its heads read [h, vec(h ⊗ y)],
400 + 400·K inputs (:data:`LABEL_ENCODERS`).

The order of the parameters (``model.params``) is the order of the layers in
``encoder + enc_heads + decoder + dec_heads``, W before b.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from .likelihoods import LIKELIHOODS


class Layer(NamedTuple):
    """One op pair and its parameters.

    op    "dense" (y = x @ W + b), "act" (the config's activation), "conv" (conv2d), "deconv"
          (conv_transpose2d), "maxpool", "upsample", "flatten" (N, C, H, W) -> (N, C·H·W) or
          "unflatten" (N, C·H·W) -> (N, C, H, W), "concat" (N, H) -> (N, H + K), [h, onehot(y)], or "outer"
          (N, H) -> (N, H + H·K), [h, vec(h ⊗ onehot(y))]
    name  parameter prefix: the layer owns ``params[name + ".W"]`` and ``params[name + ".b"]``
          (None for a layer without parameters)
    W     the weight's shape: (in, out) for dense, (F, C, KH, KW) for conv,
          (C_in, C_out, KH, KW) for deconv
    arg   the op's extra arguments: (stride, padding) for conv and deconv, (size,) for maxpool,
          (scale,) for upsample, the (C, H, W) shape for unflatten, (K,) for concat and outer
    """

    op: str
    name: str = None
    W: tuple = None
    arg: tuple = ()

    def param_shapes(self):
        """``[(name.W, shape), (name.b, shape)]``, or ``[]`` for a layer without parameters."""
        if self.name is None:
            return []
        n_out = self.W[0] if self.op == "conv" else self.W[1]       # conv: F; dense: out; deconv: C_out
        return [(f"{self.name}.W", tuple(self.W)), (f"{self.name}.b", (n_out,))]


ACT = Layer("act")

# How a conditional decoder reads the one-hot label y (VAEConfig.label_decoder); the encoder always reads
# [x, y] in its first dense layer, and with VAEConfig.label_encoder="outer" its two heads read [h, vec(h ⊗ y)].
LABEL_ENCODERS = {
    "input": "[x, y] into the first dense layer",
    "outer": "[x, y] into the first dense layer, and [h, vec(h ⊗ y)] into the mu and logvar heads: a per-class "
             "map of the features to the posterior",
}
LABEL_DECODERS = {
    "input": "[z, y] into the first dense layer (y adds a per-class bias to it)",
    "every": "y joins the input of every dense layer of the decoder, the output layer too (fully connected only)",
    "outer": "[z, vec(z ⊗ y), y] into the first dense layer: a per-class linear map of z as well as a per-class "
             "bias",
}


def _concat_y(config):
    """``([concat y], K)`` for a conditional config (the layer that joins the one-hot label), else ``([], 0)``."""
    K = config.n_classes
    return ([Layer("concat", arg=(K,))], K) if K else ([], 0)


class Networks(NamedTuple):
    """The four layer lists of a VAE (see the module docstring)."""

    encoder: list
    enc_heads: list
    decoder: list
    dec_heads: list

    def layers(self):
        """Every layer, in parameter order."""
        return [*self.encoder, *self.enc_heads, *self.decoder, *self.dec_heads]


def _dense_stack(prefix, n_in, widths):
    """``[dense prefix.0 (n_in, w0), act, dense prefix.1 (w0, w1), act, ...]`` and the width it ends with.

    The hidden dense layers of every architecture: the encoder's (``enc``, the ``hidden`` widths) and the
    decoder's (``dec``, the widths reversed).  No widths: no layers, and the width stays ``n_in``."""
    layers, prev = [], n_in
    for i, w in enumerate(widths):
        layers += [Layer("dense", f"{prefix}.{i}", (prev, w)), ACT]
        prev = w
    return layers, prev


def _dense_vae(config, enc_front, enc_in, dec_widths):
    """The layers every architecture shares: the encoder's dense stack on its ``enc_in`` features (after the
    layers ``enc_front``), the two Gaussian heads, and the decoder's dense stack from z over ``dec_widths``.
    A conditional config joins the one-hot label right before each dense stack (:func:`_concat_y`); how the
    decoder reads it is ``config.label_decoder`` (:data:`LABEL_DECODERS`).

    Returns ``(encoder, enc_heads, decoder, g)``, g the width the decoder's dense stack ends with (K more
    with ``label_decoder="every"``: the output heads read the label too)."""
    c = config
    concat, K = _concat_y(c)
    stack, h = _dense_stack("enc", enc_in + K, c.hidden)
    if K and c.label_encoder == "outer":     # the heads read [h, vec(h ⊗ y)]: a per-class map of h to mu, logvar
        stack, h = [*stack, Layer("outer", arg=(K,))], h * (1 + K)
    enc_heads = [Layer("dense", "enc.mu", (h, c.z_dim)), Layer("dense", "enc.logvar", (h, c.z_dim))]
    mode = c.label_decoder if K else "input"
    if mode == "outer":                      # [z, vec(z ⊗ y)], then [.., y]: L + L·K + K inputs
        decoder, g = _dense_stack("dec", c.z_dim * (1 + K) + K, dec_widths)
        return [*enc_front, *concat, *stack], enc_heads, [Layer("outer", arg=(K,)), *concat, *decoder], g
    if mode == "every":                      # y joins the input of every dense layer, the output layer's too
        decoder, g = [], c.z_dim
        for i, w in enumerate(dec_widths):
            decoder += [*concat, Layer("dense", f"dec.{i}", (g + K, w)), ACT]
            g = w
        return [*enc_front, *concat, *stack], enc_heads, [*decoder, *concat], g + K
    decoder, g = _dense_stack("dec", c.z_dim + K, dec_widths)
    decoder, g = _dense_stack("dec", c.z_dim + K, dec_widths)
    return [*enc_front, *concat, *stack], enc_heads, [*concat, *decoder], g


def _out_heads(config, op, first, w_shape, arg=()):
    """The decoder's output heads, one per head of the config's likelihood, each a layer ``op`` with weight
    shape ``w_shape``: the first named ``first``, a learned variance's ``dec.out_logvar``."""
    heads = LIKELIHOODS[config.likelihood].heads
    return [Layer(op, first if i == 0 else f"dec.{head}", w_shape, arg) for i, head in enumerate(heads)]


def mlp(config):
    """The fully connected VAE: ``hidden`` widths in the encoder, mirrored (reversed) in the decoder."""
    c = config
    encoder, enc_heads, decoder, g = _dense_vae(c, [], c.x_dim, tuple(reversed(c.hidden)))
    return Networks(encoder, enc_heads, decoder, _out_heads(c, "dense", "dec.out", (g, c.x_dim)))


CHANNELS = (32, 64)          # the two convolution widths


def conv(config):
    """The convolutional VAEs, ``arch="conv"`` or ``"conv-pool"`` (see the module docstring)."""
    c = config
    C, H, W = c.image_shape
    c1, c2 = CHANNELS
    feat = (c2, H // 4, W // 4)
    n_feat = c2 * (H // 4) * (W // 4)
    if c.arch == "conv":
        front = [Layer("unflatten", arg=(C, H, W)),
                 Layer("conv", "enc.conv.0", (c1, C, 4, 4), (2, 1)), ACT,
                 Layer("conv", "enc.conv.1", (c2, c1, 4, 4), (2, 1)), ACT]
    else:
        front = [Layer("unflatten", arg=(C, H, W)),
                 Layer("conv", "enc.conv.0", (c1, C, 3, 3), (1, 1)), ACT, Layer("maxpool", arg=(2,)),
                 Layer("conv", "enc.conv.1", (c2, c1, 3, 3), (1, 1)), ACT, Layer("maxpool", arg=(2,))]
    encoder, enc_heads, decoder, _ = _dense_vae(c, [*front, Layer("flatten")], n_feat,
                                                (*reversed(c.hidden), n_feat))
    decoder.append(Layer("unflatten", arg=feat))
    if c.arch == "conv":
        decoder += [Layer("deconv", "dec.deconv.0", (c2, c1, 4, 4), (2, 1)), ACT]
        heads = _out_heads(c, "deconv", "dec.deconv.1", (c1, C, 4, 4), (2, 1))
    else:
        decoder += [Layer("upsample", arg=(2,)), Layer("conv", "dec.conv.0", (c1, c2, 3, 3), (1, 1)), ACT,
                    Layer("upsample", arg=(2,))]
        heads = _out_heads(c, "conv", "dec.conv.1", (C, c1, 3, 3), (1, 1))
    return Networks(encoder, enc_heads, decoder, heads)


# ----------------------------------------------------------------------------
# The registry: the architectures a VAEConfig can name
# ----------------------------------------------------------------------------
class Architecture(NamedTuple):
    """One network family.

    build           config -> :class:`Networks`
    image           an image model: it needs the images' (C, H, W) (``VAEConfig.image_shape``), and its
                    output bias is one number per channel
    default_hidden  the dense widths when the config gives none
    image_divisor   image height and width must be divisible by this (1: any size)
    widest_row      config -> the numbers per row (per example or draw of z) of the widest array one forward
                    pass holds, which bounds the rows of one IWAE chunk (``VAE._iwae_chunk``)
    eval_rows       rows per model call in evaluation, to bound memory (None: no bound)
    summary         one line for the command line's help
    """

    build: Callable
    image: bool
    default_hidden: tuple
    image_divisor: int
    widest_row: Callable
    eval_rows: int | None
    summary: str


ARCHITECTURES = {}   # name -> Architecture


def register_architecture(name, architecture):
    """Make ``name`` an architecture that VAEConfig, the model and the command line accept."""
    if not isinstance(architecture, Architecture):
        raise TypeError(f"architecture {name!r}: expected an Architecture, got {type(architecture).__name__}")
    ARCHITECTURES[name] = architecture
    return architecture


def _dense_widest_row(config):
    return max((config.x_dim, *config.hidden))


def _conv_widest_row(config):
    return 160 * config.x_dim        # im2col's patch matrices: up to ~144·D per row (3x3 on 64 channels at H/2)


# The conv architectures' ops hold im2col patch matrices, ~100 KB per row for "conv" and ~0.5 MB per row for
# "conv-pool" (a 3x3 convolution at 28x28): evaluation calls them on 1000 and 250 rows at a time.
register_architecture("mlp", Architecture(mlp, False, (400,), 1, _dense_widest_row, None,
                                          "mlp (fully connected)"))
register_architecture("conv", Architecture(conv, True, (256,), 4, _conv_widest_row, 1000,
                                           "conv (strided convolutions)"))
register_architecture("conv-pool", Architecture(conv, True, (256,), 4, _conv_widest_row, 250,
                                                "conv-pool (convolutions, max-pooling, upsampling)"))


def get_architecture(name):
    """The registered :class:`Architecture` ``name``; ValueError naming the known ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}: choose one of {', '.join(ARCHITECTURES)}") from None


def build(config):
    """The :class:`Networks` of a config, built by its registered architecture."""
    return get_architecture(config.arch).build(config)


def param_shapes(config):
    """Ordered list of ``(name, shape)`` of a config's parameters."""
    return [s for layer in build(config).layers() for s in layer.param_shapes()]


def _layer_macs(layer, shape):
    """Multiply-adds of one layer on one row whose input has ``shape`` ((C, H, W) or None for a flat row), and
    the shape of its output.  A dense layer uses each weight once; a convolution each weight once per output
    position, a transposed convolution once per input position."""
    op, W, arg = layer.op, layer.W, layer.arg
    if op == "dense":
        return W[0] * W[1], None
    if op == "unflatten":
        return 0, tuple(arg)
    if op == "flatten":
        return 0, None
    if op == "conv":
        (s, p), (_, H, Wd) = arg, shape
        Ho, Wo = (H + 2 * p - W[2]) // s + 1, (Wd + 2 * p - W[3]) // s + 1
        return W[0] * W[1] * W[2] * W[3] * Ho * Wo, (W[0], Ho, Wo)
    if op == "deconv":
        (s, p), (_, H, Wd) = arg, shape
        return W[0] * W[1] * W[2] * W[3] * H * Wd, (W[1], (H - 1) * s - 2 * p + W[2], (Wd - 1) * s - 2 * p + W[3])
    if op == "maxpool":
        return 0, (shape[0], shape[1] // arg[0], shape[2] // arg[0])
    if op == "upsample":
        return 0, (shape[0], shape[1] * arg[0], shape[2] * arg[0])
    return 0, shape                                   # act, concat, outer: no weights


def _stack_macs(layers, heads):
    """Multiply-adds of ``layers`` in turn, then of each of ``heads`` on their common input."""
    total, shape = 0, None
    for layer in layers:
        n, shape = _layer_macs(layer, shape)
        total += n
    return total + sum(_layer_macs(head, shape)[0] for head in heads)


def work(config, labelled=False):
    """``(once, per_draw)``: the multiply-adds of one example's forward pass, the encoder's (once) and the
    decoder's (per draw of z), counted layer by layer (a convolution at every position it slides to)."""
    net = build(config)
    return _stack_macs(net.encoder, net.enc_heads), _stack_macs(net.decoder, net.dec_heads)


def fan_in(w_shape):
    """The fan-in of a weight of this shape, as PyTorch's default init counts it.

    Dense (in, out): in.  Conv (F, C, KH, KW): C·KH·KW.  PyTorch computes the fan-in of any weight
    of 3 or more axes as shape[1]·KH·KW, so for a transposed convolution's (C_in, C_out, KH, KW) it
    is C_out·KH·KW (not C_in); we do the same, so the two inits draw from the same ranges.
    """
    if len(w_shape) == 2:
        return w_shape[0]
    return w_shape[1] * w_shape[2] * w_shape[3]

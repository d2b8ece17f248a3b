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

The order of the parameters (``model.params``) is the order of the layers in
``encoder + enc_heads + decoder + dec_heads``, W before b.
"""
from __future__ import annotations

from typing import NamedTuple


class Layer(NamedTuple):
    """One op pair and its parameters.

    op    "dense" (y = x @ W + b), "act" (the config's activation), "conv" (conv2d), "deconv"
          (conv_transpose2d), "maxpool", "upsample", "flatten" (N, C, H, W) -> (N, C·H·W) or
          "unflatten" (N, C·H·W) -> (N, C, H, W), or "concat" (N, H) -> (N, H + K), [h, onehot(y)]
    name  parameter prefix: the layer owns ``params[name + ".W"]`` and ``params[name + ".b"]``
          (None for a layer without parameters)
    W     the weight's shape: (in, out) for dense, (F, C, KH, KW) for conv,
          (C_in, C_out, KH, KW) for deconv
    arg   the op's extra arguments: (stride, padding) for conv and deconv, (size,) for maxpool,
          (scale,) for upsample, the (C, H, W) shape for unflatten, (K,) for concat
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


def mlp(config):
    """The fully connected VAE: ``hidden`` widths in the encoder, mirrored (reversed) in the decoder."""
    c = config
    encoder, K = _concat_y(c)
    prev = c.x_dim + K
    for i, h in enumerate(c.hidden):
        encoder += [Layer("dense", f"enc.{i}", (prev, h)), ACT]
        prev = h
    enc_heads = [Layer("dense", "enc.mu", (prev, c.z_dim)), Layer("dense", "enc.logvar", (prev, c.z_dim))]
    decoder, K = _concat_y(c)
    prev = c.z_dim + K
    for i, h in enumerate(reversed(c.hidden)):
        decoder += [Layer("dense", f"dec.{i}", (prev, h)), ACT]
        prev = h
    dec_heads = [Layer("dense", "dec.out", (prev, c.x_dim))]
    if c.likelihood == "gaussian_learned_var":
        dec_heads.append(Layer("dense", "dec.out_logvar", (prev, c.x_dim)))
    return Networks(encoder, enc_heads, decoder, dec_heads)


CHANNELS = (32, 64)          # the two convolution widths


def conv(config):
    """The convolutional VAEs, ``arch="conv"`` or ``"conv-pool"`` (see the module docstring)."""
    c = config
    C, H, W = c.image_shape
    c1, c2 = CHANNELS
    feat = (c2, H // 4, W // 4)
    n_feat = c2 * (H // 4) * (W // 4)
    if c.arch == "conv":
        encoder = [Layer("unflatten", arg=(C, H, W)),
                   Layer("conv", "enc.conv.0", (c1, C, 4, 4), (2, 1)), ACT,
                   Layer("conv", "enc.conv.1", (c2, c1, 4, 4), (2, 1)), ACT]
    else:
        encoder = [Layer("unflatten", arg=(C, H, W)),
                   Layer("conv", "enc.conv.0", (c1, C, 3, 3), (1, 1)), ACT, Layer("maxpool", arg=(2,)),
                   Layer("conv", "enc.conv.1", (c2, c1, 3, 3), (1, 1)), ACT, Layer("maxpool", arg=(2,))]
    concat, K = _concat_y(c)
    encoder += [Layer("flatten"), *concat]
    prev = n_feat + K
    for i, h in enumerate(c.hidden):
        encoder += [Layer("dense", f"enc.{i}", (prev, h)), ACT]
        prev = h
    enc_heads = [Layer("dense", "enc.mu", (prev, c.z_dim)), Layer("dense", "enc.logvar", (prev, c.z_dim))]
    decoder, K = _concat_y(c)
    prev = c.z_dim + K
    for i, h in enumerate((*reversed(c.hidden), n_feat)):
        decoder += [Layer("dense", f"dec.{i}", (prev, h)), ACT]
        prev = h
    decoder.append(Layer("unflatten", arg=feat))
    if c.arch == "conv":
        decoder += [Layer("deconv", "dec.deconv.0", (c2, c1, 4, 4), (2, 1)), ACT]
        heads = [("deconv", "dec.deconv.1", (c1, C, 4, 4), (2, 1))]
    else:
        decoder += [Layer("upsample", arg=(2,)), Layer("conv", "dec.conv.0", (c1, c2, 3, 3), (1, 1)), ACT,
                    Layer("upsample", arg=(2,))]
        heads = [("conv", "dec.conv.1", (C, c1, 3, 3), (1, 1))]
    if c.likelihood == "gaussian_learned_var":
        op, _, w, arg = heads[0]
        heads.append((op, "dec.out_logvar", w, arg))
    return Networks(encoder, enc_heads, decoder, [Layer(*h) for h in heads])


def build(config):
    """The :class:`Networks` of a config."""
    return mlp(config) if config.arch == "mlp" else conv(config)


def param_shapes(config):
    """Ordered list of ``(name, shape)`` of a config's parameters."""
    return [s for layer in build(config).layers() for s in layer.param_shapes()]


def fan_in(w_shape):
    """The fan-in of a weight of this shape, as PyTorch's default init counts it.

    Dense (in, out): in.  Conv (F, C, KH, KW): C·KH·KW.  PyTorch computes the fan-in of any weight
    of 3 or more axes as shape[1]·KH·KW, so for a transposed convolution's (C_in, C_out, KH, KW) it
    is C_out·KH·KW (not C_in); we do the same, so the two inits draw from the same ranges.
    """
    if len(w_shape) == 2:
        return w_shape[0]
    return w_shape[1] * w_shape[2] * w_shape[3]

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

The order of the parameters (``model.params``) is the order of the layers in
``encoder + enc_heads + decoder + dec_heads``, W before b.
"""
from __future__ import annotations

from typing import NamedTuple


class Layer(NamedTuple):
    """One op pair and its parameters.

    op    "dense" (y = x @ W + b) or "act" (the config's activation, no parameters)
    name  parameter prefix: the layer owns ``params[name + ".W"]`` and ``params[name + ".b"]``
          (None for a layer without parameters)
    W     the weight's shape: (in, out) for dense
    arg   the op's extra arguments (none for dense and act)
    """

    op: str
    name: str = None
    W: tuple = None
    arg: tuple = ()

    def param_shapes(self):
        """``[(name.W, shape), (name.b, shape)]``, or ``[]`` for a layer without parameters."""
        if self.name is None:
            return []
        return [(f"{self.name}.W", tuple(self.W)), (f"{self.name}.b", (self.W[1],))]


ACT = Layer("act")


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
    encoder, prev = [], c.x_dim
    for i, h in enumerate(c.hidden):
        encoder += [Layer("dense", f"enc.{i}", (prev, h)), ACT]
        prev = h
    enc_heads = [Layer("dense", "enc.mu", (prev, c.z_dim)), Layer("dense", "enc.logvar", (prev, c.z_dim))]
    decoder, prev = [], c.z_dim
    for i, h in enumerate(reversed(c.hidden)):
        decoder += [Layer("dense", f"dec.{i}", (prev, h)), ACT]
        prev = h
    dec_heads = [Layer("dense", "dec.out", (prev, c.x_dim))]
    if c.likelihood == "gaussian_learned_var":
        dec_heads.append(Layer("dense", "dec.out_logvar", (prev, c.x_dim)))
    return Networks(encoder, enc_heads, decoder, dec_heads)


def build(config):
    """The :class:`Networks` of a config."""
    return mlp(config)


def param_shapes(config):
    """Ordered list of ``(name, shape)`` of a config's parameters."""
    return [s for layer in build(config).layers() for s in layer.param_shapes()]


def fan_in(w_shape):
    """The fan-in of a weight of this shape, as PyTorch counts it: ``in`` for a dense (in, out) weight."""
    return w_shape[0]

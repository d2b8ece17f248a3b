"""The table of course exercises: id, where it lives, what it is, and the hint.

Every id here has one or more regions in the reference code marked

    ### BEGIN SOLUTION <id>
    ...
    ### END SOLUTION

(``make`` checks that the table and the markers agree).  The order of the
table is the order of the assignment and of the grade report.  All exercises
weigh the same: the score is 100 * passed / total.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    id: str
    file: str          # module under minivae/ that holds the region(s)
    title: str
    kind: str          # "backward" (checked with finite differences) or "forward" (checked against values)
    hint: str          # shown in the stub's NotImplementedError
    needs: tuple = ()  # exercises whose functions the reference solution calls (see grading: the graded copy)


EXERCISES = (
    Exercise("dense_backward", "layers.py", "dense layer backward: dx, dW, db", "backward",
             "from y = x @ W + b and G = dL/dy, return dx (N, D_in), dW (D_in, D_out) and db (D_out,); "
             "match every shape, and sum db over the batch rows"),
    Exercise("relu_backward", "layers.py", "ReLU backward", "backward",
             "dL/dx = dL/dy where the input x was positive, 0 elsewhere (the cache is x)"),
    Exercise("tanh_backward", "layers.py", "tanh backward", "backward",
             "the cache is the output y = tanh(x); write dy/dx in terms of y"),
    Exercise("sigmoid_backward", "layers.py", "sigmoid backward", "backward",
             "the cache is the output y = sigmoid(x); write dy/dx in terms of y"),
    Exercise("reparameterize_forward", "gaussian.py", "reparameterization trick (forward)", "forward",
             "logvar is log sigma^2, so sigma = exp(logvar / 2); set sigma (it goes into the cache) "
             "and z = mu + sigma * eps, which broadcasts over a leading sample axis"),
    Exercise("reparameterize_backward", "gaussian.py", "reparameterization trick (backward)", "backward",
             "differentiate z = mu + sigma * eps with sigma = exp(logvar / 2); when dz is (S, N, L), "
             "sum over the sample axis so dmu and dlogvar are (N, L)"),
    Exercise("kl_forward", "gaussian.py", "Gaussian KL to N(0, I) (forward)", "forward",
             "KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2), one value per example; "
             "set var = exp(logvar) (it goes into the cache) and kl (N,)"),
    Exercise("kl_backward", "gaussian.py", "Gaussian KL to N(0, I) (backward)", "backward",
             "dkl is (N,), one upstream value per example: broadcast it over L; "
             "the cache holds mu and var = exp(logvar)"),
    Exercise("bernoulli_nll_forward", "likelihoods.py", "Bernoulli negative log-likelihood from logits", "forward",
             "-log p(x | l) = softplus(l) - x * l per pixel, summed over the last axis; use the stable "
             "softplus from layers so large |logits| never produce log(0)"),
    Exercise("bernoulli_nll_backward", "likelihoods.py", "Bernoulli negative log-likelihood (backward)", "backward",
             "d/dl [softplus(l) - x l] = sigmoid(l) - x; dnll has one value per example (N,) or (S, N), "
             "so add a trailing axis before multiplying"),
    Exercise("conv2d_backward", "conv.py", "2-D convolution backward: dx, dW, db", "backward",
             "with G = dy as (F, OH*OW*N) (dy.transpose(1, 2, 3, 0): the batch last, like the columns of col) and "
             "col (C*KH*KW, OH*OW*N) from the cache: dW = G @ col.T reshaped "
             "like W (it sums over every example and position), dcol = Wm.T @ G with Wm = W.reshape(F, -1), "
             "dx = col2im(dcol, x_shape, KH, KW, stride, padding), and db sums G over all but F"),
    Exercise("conv_transpose2d_forward", "conv.py", "transposed convolution (forward)", "forward",
             "the adjoint of conv2d (its dx): X = x as (C_in, H*W*N) (x.transpose(1, 2, 3, 0), the batch last), "
             "col = Wm.T @ X with "
             "Wm = W.reshape(C_in, C_out*KH*KW), y = col2im(col, (N, C_out, OH, OW), KH, KW, stride, padding), "
             "plus b on each output channel; do not flip the kernel"),
    Exercise("maxpool2d_backward", "conv.py", "max-pooling backward", "backward",
             "only the element each window selected (its offset arg = i*size + j is in the cache) gets dy; "
             "every other element of the window gets 0, and so do pixels outside every window"),
    Exercise("upsample_nearest2d_backward", "conv.py", "nearest-neighbour upsampling backward", "backward",
             "every input pixel was copied to a scale x scale block of y: its gradient is the sum of dy "
             "over that block"),
    Exercise("masked_dense_backward", "made.py", "MADE's masked dense layer backward: dx, dW, db", "backward",
             "y = x @ (M * W) + b with a fixed 0/1 mask M; the cache holds x, the masked weight Wm = M * W and M. "
             "dx and db are those of a dense layer with the weight Wm (dense_backward may do that part: when it is "
             "an exercise of yours too, it must pass first); a masked-out weight is not in the forward pass, so dW "
             "must be 0 there", needs=("dense_backward",)),
    Exercise("planar_joint_backward", "flows.py", "planar flow step backward, log-determinant included "
             "(planar_backward, checked through planar_joint_backward)", "backward",
             "f = z + u tanh(a), a = z @ w + b, logdet = log|1 + (1 - h^2)(w . u)|; first dL/da = (df @ u)(1 - h^2) "
             "+ dlogdet * d logdet/da (with d(1 - h^2)/da = -2 h (1 - h^2)), then dz = df + dL/da w, and du, dw each get a term "
             "from f and one from logdet (r = dlogdet (1 - h^2) / det); db = sum of dL/da, shape (1,)"),
    Exercise("adam_step", "optim.py", "one Adam update", "forward",
             "update m and v in place with betas b1, b2, then p -= lr * m_hat / (sqrt(v_hat) + eps) "
             "with the bias corrections m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)"),
    Exercise("vae_backward", "model.py", "the full VAE backward (three regions in model.py)", "backward",
             "chain the op backwards in reverse order of the forward: loss -> reconstruction and KL -> decoder -> "
             "reparameterization -> encoder heads -> encoder layers; add gradients where a value feeds two paths "
             "(h feeds mu and logvar; mu and logvar feed both z and the KL)"),
)

BY_ID = {e.id: e for e in EXERCISES}
IDS = tuple(e.id for e in EXERCISES)


def select(spec):
    """Parse an ``--exercises`` value into a tuple of ids (table order).

    ``None`` or ``"all"`` -> every exercise; ``"none"`` or ``""`` -> none;
    otherwise a comma-separated list of ids.  Unknown ids raise ValueError.
    """
    if spec is None or spec.strip().lower() == "all":
        return IDS
    if spec.strip().lower() in ("", "none"):
        return ()
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in BY_ID]
    if unknown:
        raise ValueError(f"unknown exercise {', '.join(map(repr, unknown))}: choose from {', '.join(IDS)}")
    return tuple(i for i in IDS if i in wanted)
